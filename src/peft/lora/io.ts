// PEFT's on-disk adapter format: adapter_config.json (every field, sorted keys) and adapter_model.safetensors
// (metadata {"format": "pt"}) with keys base_model.model.<module path>.lora_A.weight / .lora_B.weight /
// .lora_magnitude_vector / .lora_embedding_A / .lora_embedding_B — the adapter name removed, as
// get_peft_model_state_dict does — plus modules_to_save as plain keys, learnable biases and, when an embedding is
// targeted, the embedding base weights. The adapter "default" goes in the dir itself, others in <dir>/<name>/.
// Writes are atomic. Adapters saved by PEFT load here and the other way round.
//
// Loading checks the file against the adapter's key layout (layout.ts) before the model changes: shapes always,
// missing / unexpected keys as PEFT's warnings or, with `strict`, a FormatError; `baseWeights` decides whether
// tensors that belong to the base model (embedding copies, trained biases) may be written. weights.ts holds the
// same loading for adapters read into memory.

import { existsSync, mkdirSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { ConfigError, FormatError } from '../../core/errors.ts';
import type { Tensor } from '../../core/tensor.ts';
import { writeFileAtomic } from '../../formats/atomic.ts';
import { openSafetensors, saveSafetensors, type TensorSource } from '../../formats/safetensors.ts';
import type { Architecture } from '../../models/config.ts';
import type { LlamaForCausalLM } from '../../models/llama.ts';
import { tensorSource } from '../../models/save.ts';
import { fillFromRaw } from '../../models/weights.ts';
import { noGrad } from '../../ops/tape.ts';
import { adapterConfigToJson, type LoraConfig, parseAdapterConfig } from './config.ts';
import { LoraEmbedding, LoraLinear } from './layer.ts';
import {
  adapterLayout,
  type BaseWeightsPolicy,
  checkKeys,
  diskKey,
  EMBEDDING_PATHS,
  embeddingTargeted,
  keyWarnings,
  type WeightSource,
} from './layout.ts';
import { LoraModel, type LoraModelOptions } from './model.ts';

export { type BaseWeightsPolicy, removeAdapterName } from './layout.ts';

export const ADAPTER_CONFIG_NAME = 'adapter_config.json';
export const ADAPTER_WEIGHTS_NAME = 'adapter_model.safetensors';

const CLASS_OF: Record<Architecture, [string, string]> = {
  llama: ['LlamaForCausalLM', 'transformers.models.llama.modeling_llama'],
  mistral: ['MistralForCausalLM', 'transformers.models.mistral.modeling_mistral'],
  qwen2: ['Qwen2ForCausalLM', 'transformers.models.qwen2.modeling_qwen2'],
  qwen3: ['Qwen3ForCausalLM', 'transformers.models.qwen3.modeling_qwen3'],
};

/**
 * The adapter's tensors by their on-disk key (live tensors of the model): what PEFT's get_peft_model_state_dict
 * returns for this adapter. Reads the adapter's own layers (and, for the base-weight keys, the base model's
 * module tree), not the other adapters': its cost does not grow with their number.
 */
export function adapterStateDict(pm: LoraModel, name: string): Map<string, Tensor> {
  const cfg = pm.configs.get(name);
  if (!cfg) throw new ConfigError(`adapter '${name}' does not exist (have: ${pm.adapterNames.join(', ') || 'none'})`);
  const chosen = new Map<string, Tensor>();
  // tuner layers: the adapter's matrices (DoRA's lora_magnitude_vector.<name> without ".weight": the old
  // ParameterDict format PEFT saves)
  for (const [path, l] of pm.adapterLayersOf(name)) {
    if (l instanceof LoraLinear) {
      chosen.set(`${path}.lora_A.${name}.weight`, l.loraA.get(name)!.weight);
      const b = l.loraB.get(name)!;
      chosen.set(`${path}.lora_B.${name}.weight`, b.weight);
      if (b.bias) chosen.set(`${path}.lora_B.${name}.bias`, b.bias);
    } else {
      chosen.set(`${path}.lora_embedding_A.${name}`, l.embA.get(name)!);
      chosen.set(`${path}.lora_embedding_B.${name}`, l.embB.get(name)!);
    }
    const m = l.magnitude.get(name);
    if (m) chosen.set(`${path}.lora_magnitude_vector.${name}`, m.weight);
  }
  const copies: [string, Tensor][] = [];
  for (const [path, w] of pm.savedModulesOf(name))
    for (const [k, p] of w.copies.get(name)!.namedParameters())
      copies.push([`${path}.modules_to_save.${name}.${k}`, p]);
  if (cfg.bias === 'all') {
    for (const [k, p] of pm.baseParameters()) if (k === 'bias' || k.endsWith('.bias')) chosen.set(k, p);
    for (const [k, p] of copies) if (k.endsWith('.bias')) chosen.set(k, p);
  } else if (cfg.bias === 'lora_only') {
    for (const [path, l] of pm.adapterLayers()) {
      const b = l.base.getParam('bias');
      if (b) chosen.set(`${path}.base_layer.bias`, b);
    }
  }
  // modules_to_save: <path>.modules_to_save.<name>.<param> is saved as <path>.<param>
  for (const [k, p] of copies) chosen.set(k, p);
  // targeted embedding layers: their base weights are saved too
  if (embeddingTargeted(cfg, pm))
    for (const path of EMBEDDING_PATHS) {
      const l = pm.model.getModule(path);
      if (l instanceof LoraEmbedding || l instanceof LoraLinear)
        for (const [k, p] of l.base.namedParameters(`${path}.base_layer`)) chosen.set(k, p);
    }
  const out = new Map<string, Tensor>();
  for (const [k, p] of chosen) out.set(diskKey(k, name), p);
  return out;
}

export interface SaveAdapterOptions {
  /** Which adapters (default: all). */
  adapters?: readonly string[];
  /** Fills base_model_name_or_path when the config has none. */
  baseModelNameOrPath?: string | null;
}

/** Writes adapters in PEFT's layout: dir/ for "default", dir/<name>/ for the others. */
export async function saveAdapter(pm: LoraModel, dir: string, opts: SaveAdapterOptions = {}): Promise<string[]> {
  const names = opts.adapters ? [...opts.adapters] : pm.adapterNames;
  if (names.length === 0) throw new ConfigError('saveAdapter: the model has no adapters');
  const written: string[] = [];
  for (const name of names) {
    const cfg = pm.configs.get(name);
    if (!cfg) throw new ConfigError(`adapter '${name}' does not exist`);
    const out = name === 'default' ? dir : join(dir, name);
    if (existsSync(out) && !statSync(out).isDirectory()) throw new ConfigError(`${out} exists and is not a directory`);
    mkdirSync(out, { recursive: true });
    const sources: Record<string, TensorSource> = {};
    for (const [k, t] of adapterStateDict(pm, name)) sources[k] = tensorSource(t);
    await saveSafetensors(join(out, ADAPTER_WEIGHTS_NAME), sources, { format: 'pt' });
    const [cls, lib] = CLASS_OF[pm.model.config.architecture];
    const json = adapterConfigToJson(
      { ...cfg, base_model_name_or_path: cfg.base_model_name_or_path ?? opts.baseModelNameOrPath ?? null },
      { autoMapping: cfg.task_type === null ? { base_model_class: cls, parent_library: lib } : null },
    );
    await writeFileAtomic(join(out, ADAPTER_CONFIG_NAME), `${JSON.stringify(json, null, 2)}\n`);
    written.push(out);
  }
  return written;
}

/** Reads and validates an adapter dir's adapter_config.json. */
export function readAdapterConfig(dir: string, onWarning?: (m: string) => void): LoraConfig {
  if (!existsSync(dir) || !statSync(dir).isDirectory())
    throw new ConfigError(`adapter '${dir}' is not a directory (give the folder holding ${ADAPTER_CONFIG_NAME})`);
  const file = join(dir, ADAPTER_CONFIG_NAME);
  if (!existsSync(file)) throw new ConfigError(`${dir}: no ${ADAPTER_CONFIG_NAME} (is this a PEFT adapter dir?)`);
  let json: unknown;
  try {
    json = JSON.parse(readFileSync(file, 'utf8'));
  } catch (e) {
    throw new FormatError(`${file}: invalid JSON: ${(e as Error).message}`);
  }
  const { config, warnings } = parseAdapterConfig(json, file);
  for (const w of warnings) (onWarning ?? ((m) => console.warn(`warning: ${m}`)))(w);
  return config;
}

export interface LoadAdapterOptions extends LoraModelOptions {
  /** The name to load it under (default "default"). */
  adapterName?: string;
  /** Trainable (PEFT's is_trainable); default false: inference mode, frozen. */
  isTrainable?: boolean;
  /**
   * Make it active even when other adapters exist. Unset: the first adapter of a model is activated, as PEFT
   * does; false: the active adapters stay as they are (a server selecting adapters per row).
   */
  activate?: boolean;
  /**
   * Missing or unexpected keys throw a FormatError naming the file and the keys, instead of warnings (PEFT's
   * behaviour, the default). Embedding base weights a file lacks are not missing.
   */
  strict?: boolean;
  /**
   * Tensors that load into the base model: the embedding base weights PEFT saves when embed_tokens / lm_head are
   * targeted, and the biases bias 'all' / 'lora_only' trains. 'load' (default, as PEFT) writes them into the
   * model; 'skip' leaves the base alone and ignores the saved embedding copies (an adapter whose trained biases
   * would be lost is refused); 'refuse' throws if the file holds any. Under 'skip' and 'refuse' adapters whose
   * init rewrites the base on load (PiSSA, OLoRA) are refused, so the base model is never written.
   */
  baseWeights?: BaseWeightsPolicy;
}

/** Where loadFrom reads tensors: a WeightSource that also copies a tensor into the model's. */
export interface FillSource extends WeightSource {
  fill(key: string, dst: Tensor): void;
}

/**
 * Adds adapter `name` with config cfg to target and fills it from src: the keys are checked against the
 * adapter's layout first (nothing changes when that fails), then the adapter is injected and filled. A failure
 * while filling removes the adapter again (and unwraps a model this call wrapped).
 */
export function loadFrom(
  target: LlamaForCausalLM | LoraModel,
  name: string,
  cfg: LoraConfig,
  src: FillSource,
  opts: LoadAdapterOptions & { where: string },
): LoraModel {
  const warn = opts.onWarning ?? ((m: string) => console.warn(`warning: ${m}`));
  const pm = target instanceof LoraModel ? target : new LoraModel(target, null, name, opts);
  try {
    const plan = pm.planAdapter(name, cfg, { forLoading: true });
    const check = checkKeys(adapterLayout(pm, plan), plan.config, src, opts);
    pm.addAdapter(name, plan.config, { forLoading: true, activate: opts.activate, plan });
    try {
      const live = adapterStateDict(pm, name);
      noGrad(() => {
        for (const key of check.load) {
          const t = live.get(key);
          if (!t) throw new Error(`internal: the layout of adapter '${name}' has '${key}' but the model does not`);
          src.fill(key, t);
        }
      });
    } catch (e) {
      if (pm.configs.has(name)) pm.deleteAdapter(name);
      throw e;
    }
    if (!opts.strict) for (const m of keyWarnings(check, opts.where)) warn(m);
  } catch (e) {
    if (!(target instanceof LoraModel)) pm.unload();
    throw e;
  }
  return pm;
}

/**
 * Loads a PEFT adapter dir onto a model (a plain model is wrapped in a new LoraModel; a LoraModel gets one more
 * adapter). Keys are matched structurally; missing and unexpected keys are reported as warnings, as PEFT does,
 * or thrown with `strict`.
 */
export function loadAdapter(
  target: LlamaForCausalLM | LoraModel,
  dir: string,
  opts: LoadAdapterOptions = {},
): LoraModel {
  const warn = opts.onWarning ?? ((m: string) => console.warn(`warning: ${m}`));
  const name = opts.adapterName ?? 'default';
  const cfg = readAdapterConfig(dir, warn);
  const weights = adapterWeightsFile(dir);
  cfg.inference_mode = !opts.isTrainable;
  const reader = openSafetensors(weights);
  try {
    const src: FillSource = {
      file: weights,
      keys: () => reader.names(),
      shape: (key) => reader.info(key).shape,
      fill: (key, dst) => fillFromRaw(dst, reader.read(key), `${weights}: tensor '${key}'`),
    };
    return loadFrom(target, name, cfg, src, { ...opts, where: dir });
  } finally {
    reader.close();
  }
}

/** dir/adapter_model.safetensors, or a FormatError saying what is there instead. */
export function adapterWeightsFile(dir: string): string {
  const weights = join(dir, ADAPTER_WEIGHTS_NAME);
  if (!existsSync(weights)) {
    if (existsSync(join(dir, 'adapter_model.bin')))
      throw new FormatError(
        `${dir}: only adapter_model.bin (a PyTorch pickle) is present; lowrank reads adapter_model.safetensors (save with safe_serialization=True)`,
      );
    throw new FormatError(`${dir}: no ${ADAPTER_WEIGHTS_NAME}`);
  }
  return weights;
}
