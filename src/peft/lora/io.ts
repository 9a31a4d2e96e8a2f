// PEFT's on-disk adapter format: adapter_config.json (every field, sorted keys) and adapter_model.safetensors
// (metadata {"format": "pt"}) with keys base_model.model.<module path>.lora_A.weight / .lora_B.weight /
// .lora_magnitude_vector / .lora_embedding_A / .lora_embedding_B — the adapter name removed, as
// get_peft_model_state_dict does — plus modules_to_save as plain keys, learnable biases and, when an embedding is
// targeted, the embedding base weights. The adapter "default" goes in the dir itself, others in <dir>/<name>/.
// Writes are atomic. Adapters saved by PEFT load here and the other way round.

import { existsSync, mkdirSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { ConfigError, FormatError, fmtShape } from '../../core/errors.ts';
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
import { LoraModel, type LoraModelOptions } from './model.ts';
import { ALL_LINEAR, EMBEDDING_LAYER_NAMES, fullMatch } from './target.ts';

export const ADAPTER_CONFIG_NAME = 'adapter_config.json';
export const ADAPTER_WEIGHTS_NAME = 'adapter_model.safetensors';
const PREFIX = 'base_model.model.';

const CLASS_OF: Record<Architecture, [string, string]> = {
  llama: ['LlamaForCausalLM', 'transformers.models.llama.modeling_llama'],
  mistral: ['MistralForCausalLM', 'transformers.models.mistral.modeling_mistral'],
  qwen2: ['Qwen2ForCausalLM', 'transformers.models.qwen2.modeling_qwen2'],
  qwen3: ['Qwen3ForCausalLM', 'transformers.models.qwen3.modeling_qwen3'],
};

/** PEFT's _remove_adapter_name_from_state_dict_key. */
export function removeAdapterName(key: string, adapter: string): string {
  if (!key.includes('.')) return key;
  if (key.endsWith(`.${adapter}`)) return key.slice(0, -adapter.length - 1);
  const cut = key.lastIndexOf('.');
  let head = key.slice(0, cut);
  if (head.endsWith(`.${adapter}`)) head = head.slice(0, -adapter.length - 1);
  return `${head}${key.slice(cut)}`;
}

/** Whether the config targets an embedding layer (PEFT's save_embedding_layers="auto" rule). */
function embeddingTargeted(cfg: LoraConfig, model: LlamaForCausalLM): boolean {
  const t = cfg.target_modules;
  if (typeof t === 'string') {
    if (t === ALL_LINEAR) return false;
    for (const [k] of model.namedModules())
      if (EMBEDDING_LAYER_NAMES.some((e) => new RegExp(`^(.*\\.)?${e}$`).test(k)) && fullMatch(t, k)) return true;
    return false;
  }
  return !!t && EMBEDDING_LAYER_NAMES.some((e) => t.includes(e));
}

/**
 * The adapter's tensors by their on-disk key (live tensors of the model): what PEFT's get_peft_model_state_dict
 * returns for this adapter.
 */
export function adapterStateDict(pm: LoraModel, name: string): Map<string, Tensor> {
  const cfg = pm.configs.get(name);
  if (!cfg) throw new ConfigError(`adapter '${name}' does not exist (have: ${pm.adapterNames.join(', ') || 'none'})`);
  const unwanted = pm.adapterNames.filter((n) => n !== name);
  const all = new Map<string, Tensor>();
  for (const [k, p] of pm.model.namedParameters())
    if (!unwanted.some((u) => k.includes(`.${u}.`) || k.endsWith(`.${u}`))) all.set(k, p);
  const chosen = new Map<string, Tensor>();
  // tuner layers: everything on a LoRA layer except its base layer
  const layers = pm.adapterLayers();
  for (const [path] of layers)
    for (const [k, p] of all)
      if (k.startsWith(`${path}.`) && !k.startsWith(`${path}.base_layer.`)) {
        // DoRA: lora_magnitude_vector.<name>.weight is stored without ".weight" (the old ParameterDict format)
        const key = k.endsWith(`lora_magnitude_vector.${name}.weight`) ? k.slice(0, -'.weight'.length) : k;
        chosen.set(key, p);
      }
  if (cfg.bias === 'all') {
    for (const [k, p] of all) if (k === 'bias' || k.endsWith('.bias')) chosen.set(k, p);
  } else if (cfg.bias === 'lora_only') {
    for (const [path] of layers) {
      const k = `${path}.base_layer.bias`;
      if (all.has(k)) chosen.set(k, all.get(k)!);
    }
  }
  // modules_to_save: <path>.modules_to_save.<name>.<param> is saved as <path>.<param>
  for (const [path, w] of pm.savedModules())
    if (w.has(name))
      for (const [k, p] of w.copies.get(name)!.namedParameters()) chosen.set(`${path}.modules_to_save.${name}.${k}`, p);
  // targeted embedding layers: their base weights are saved too
  if (embeddingTargeted(cfg, pm.model))
    for (const path of ['model.embed_tokens', 'lm_head']) {
      const l = pm.model.getModule(path);
      if (l instanceof LoraEmbedding || l instanceof LoraLinear)
        for (const [k, p] of all) if (k.startsWith(`${path}.base_layer.`)) chosen.set(k, p);
    }
  const out = new Map<string, Tensor>();
  for (const [k, p] of chosen) {
    let key = k;
    const mts = /^(.*)\.modules_to_save\.([^.]+)\.(.+)$/.exec(k);
    if (mts && mts[2] === name) key = `${mts[1]}.${mts[3]}`;
    out.set(PREFIX + removeAdapterName(key, name), p);
  }
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
  /** Make it active even when other adapters exist (the first adapter always is). */
  activate?: boolean;
}

/**
 * Loads a PEFT adapter dir onto a model (a plain model is wrapped in a new LoraModel; a LoraModel gets one more
 * adapter). Keys are matched structurally; missing and unexpected keys are reported as warnings, as PEFT does.
 */
export function loadAdapter(
  target: LlamaForCausalLM | LoraModel,
  dir: string,
  opts: LoadAdapterOptions = {},
): LoraModel {
  const warn = opts.onWarning ?? ((m: string) => console.warn(`warning: ${m}`));
  const name = opts.adapterName ?? 'default';
  const cfg = readAdapterConfig(dir, warn);
  const weights = join(dir, ADAPTER_WEIGHTS_NAME);
  if (!existsSync(weights)) {
    if (existsSync(join(dir, 'adapter_model.bin')))
      throw new FormatError(
        `${dir}: only adapter_model.bin (a PyTorch pickle) is present; lowrank reads adapter_model.safetensors (save with safe_serialization=True)`,
      );
    throw new FormatError(`${dir}: no ${ADAPTER_WEIGHTS_NAME}`);
  }
  cfg.inference_mode = !opts.isTrainable;
  const pm = target instanceof LoraModel ? target : new LoraModel(target, null, name, opts);
  const reader = openSafetensors(weights);
  try {
    try {
      pm.addAdapter(name, cfg, { forLoading: true, activate: opts.activate });
      const expected = adapterStateDict(pm, name);
      const present = new Set(reader.names());
      const missing: string[] = [];
      noGrad(() => {
        for (const [key, t] of expected) {
          if (!present.has(key)) {
            missing.push(key);
            continue;
          }
          const info = reader.info(key);
          if (info.shape.join() !== t.shape.join())
            throw new FormatError(
              `${weights}: tensor '${key}' has shape ${fmtShape(info.shape)} but the adapter config gives ${fmtShape(t.shape)} (check r, rank_pattern and target_modules)`,
            );
          fillFromRaw(t, reader.read(key), `${weights}: tensor '${key}'`);
          present.delete(key);
        }
      });
      if (missing.length)
        warn(
          `${dir}: missing adapter keys (left at their initial values): ${missing.slice(0, 8).join(', ')}${missing.length > 8 ? ` and ${missing.length - 8} more` : ''}`,
        );
      if (present.size)
        warn(
          `${dir}: unexpected keys ignored: ${[...present].slice(0, 8).join(', ')}${present.size > 8 ? ` and ${present.size - 8} more` : ''}`,
        );
    } catch (e) {
      if (pm.configs.has(name)) pm.deleteAdapter(name);
      if (!(target instanceof LoraModel)) pm.unload();
      throw e;
    }
  } finally {
    reader.close();
  }
  return pm;
}
