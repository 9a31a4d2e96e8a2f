// The keys of a PEFT adapter file, worked out before the adapter is injected: from an AdapterPlan (which layers
// the config reaches) and the model, the on-disk key, shape and role of every tensor that adapterStateDict will
// give once the adapter is added. Loaders check a file against it (shapes, missing and unexpected keys, base
// weights) before they change the model, and a server can check an adapter held in memory without injecting it.
//
// Roles: 'adapter' tensors belong to the adapter (lora_A/B, magnitudes, lora_B biases, modules_to_save copies);
// 'bias' are base-model biases that bias 'all' / 'lora_only' trains; 'embedding_base' are the base weights of
// targeted embedding layers, which PEFT saves with the adapter (save_embedding_layers="auto").

import { ConfigError, FormatError, fmtShape } from '../../core/errors.ts';
import type { LoraConfig } from './config.ts';
import { initNeedsBase } from './init.ts';
import { LoraEmbedding, LoraLinear, ModulesToSaveWrapper } from './layer.ts';
import type { AdapterPlan, LoraModel } from './model.ts';
import { ALL_LINEAR, EMBEDDING_LAYER_NAMES, fullMatch } from './target.ts';

export const PEFT_PREFIX = 'base_model.model.';

/** What a loader does with tensors that load into the base model (embedding base weights, trained biases). */
export type BaseWeightsPolicy = 'load' | 'skip' | 'refuse';

export type KeyRole = 'adapter' | 'bias' | 'embedding_base';

export interface LayoutEntry {
  shape: readonly number[];
  role: KeyRole;
}

/** PEFT's _remove_adapter_name_from_state_dict_key. */
export function removeAdapterName(key: string, adapter: string): string {
  if (!key.includes('.')) return key;
  if (key.endsWith(`.${adapter}`)) return key.slice(0, -adapter.length - 1);
  const cut = key.lastIndexOf('.');
  let head = key.slice(0, cut);
  if (head.endsWith(`.${adapter}`)) head = head.slice(0, -adapter.length - 1);
  return `${head}${key.slice(cut)}`;
}

/**
 * The on-disk key of an in-memory parameter name of adapter `name`: modules_to_save copies lose
 * `.modules_to_save.<name>`, the adapter name goes (get_peft_model_state_dict), base_model.model. is prefixed.
 */
export function diskKey(k: string, name: string): string {
  let key = k;
  const mts = /^(.*)\.modules_to_save\.([^.]+)\.(.+)$/.exec(k);
  if (mts && mts[2] === name) key = `${mts[1]}.${mts[3]}`;
  return PEFT_PREFIX + removeAdapterName(key, name);
}

/** Whether the config targets an embedding layer (PEFT's save_embedding_layers="auto" rule). */
export function embeddingTargeted(cfg: LoraConfig, pm: LoraModel): boolean {
  const t = cfg.target_modules;
  if (typeof t === 'string') {
    if (t === ALL_LINEAR) return false;
    for (const [k] of pm.baseModules())
      if (EMBEDDING_LAYER_NAMES.some((e) => new RegExp(`^(.*\\.)?${e}$`).test(k)) && fullMatch(t, k)) return true;
    return false;
  }
  return !!t && EMBEDDING_LAYER_NAMES.some((e) => t.includes(e));
}

/** The model paths whose base weights are saved with a targeted embedding layer. */
export const EMBEDDING_PATHS = ['model.embed_tokens', 'lm_head'] as const;

const isBias = (n: string) => n === 'bias' || n.endsWith('.bias');

/**
 * Every key adapterStateDict(pm, plan.name) will give once the planned adapter is added, with its shape and
 * role, computed without changing the model.
 */
export function adapterLayout(pm: LoraModel, plan: AdapterPlan): Map<string, LayoutEntry> {
  const { name, config: cfg } = plan;
  const chosen = new Map<string, LayoutEntry>();
  const put = (k: string, shape: readonly number[], role: KeyRole) => {
    if (!chosen.has(k)) chosen.set(k, { shape, role });
  };
  const planned = new Map(plan.layers.map((l) => [l.path, l]));
  for (const l of plan.layers) {
    const p = l.path;
    if (l.kind === 'linear') {
      put(`${p}.lora_A.${name}.weight`, [l.r, l.inF], 'adapter');
      put(`${p}.lora_B.${name}.weight`, [l.outF, l.r], 'adapter');
      if (cfg.lora_bias) put(`${p}.lora_B.${name}.bias`, [l.outF], 'adapter');
    } else {
      put(`${p}.lora_embedding_A.${name}`, [l.r, l.inF], 'adapter');
      put(`${p}.lora_embedding_B.${name}`, [l.outF, l.r], 'adapter');
    }
    if (cfg.use_dora) put(`${p}.lora_magnitude_vector.${name}`, [l.outF], 'adapter');
  }
  // modules_to_save copies: the same parameters as the module they copy
  const copies: [string, readonly number[]][] = [];
  for (const path of plan.saved) {
    const m = pm.model.getModule(path)!;
    const src = m instanceof ModulesToSaveWrapper ? m.original : m;
    for (const [k, t] of src.namedParameters()) copies.push([`${path}.modules_to_save.${name}.${k}`, t.shape]);
  }
  const newlyWrapped = new Set(plan.layers.filter((l) => !l.wrapped).map((l) => l.path));
  const newlySaved = new Set(plan.saved.filter((p) => !(pm.model.getModule(p) instanceof ModulesToSaveWrapper)));
  if (cfg.bias === 'all') {
    // every base bias under the name it will have once the adapter is injected, and the adapter's own biases
    for (const [n, t] of pm.baseParameters()) {
      if (!isBias(n)) continue;
      const cut = n.lastIndexOf('.');
      const owner = cut < 0 ? '' : n.slice(0, cut);
      const leaf = n.slice(cut + 1);
      const renamed = newlyWrapped.has(owner)
        ? `${owner}.base_layer.${leaf}`
        : newlySaved.has(owner)
          ? `${owner}.original_module.${leaf}`
          : n;
      put(renamed, t.shape, 'bias');
    }
    for (const [k, shape] of copies) if (isBias(k)) put(k, shape, 'adapter');
  } else if (cfg.bias === 'lora_only') {
    for (const [path, m] of pm.baseModules()) {
      const base = m instanceof LoraLinear || m instanceof LoraEmbedding ? m.base : planned.has(path) ? m : null;
      const b = base?.getParam('bias');
      if (b) put(`${path}.base_layer.bias`, b.shape, 'bias');
    }
  }
  for (const [k, shape] of copies) put(k, shape, 'adapter');
  if (embeddingTargeted(cfg, pm))
    for (const path of EMBEDDING_PATHS) {
      const m = pm.model.getModule(path);
      if (!m) continue;
      const base = m instanceof LoraLinear || m instanceof LoraEmbedding ? m.base : planned.has(path) ? m : null;
      if (base) for (const [k, t] of base.namedParameters(`${path}.base_layer`)) put(k, t.shape, 'embedding_base');
    }
  const out = new Map<string, LayoutEntry>();
  for (const [k, e] of chosen) out.set(diskKey(k, name), e);
  return out;
}

/** Where a loader reads tensors from: a safetensors file, or tensors held in memory. */
export interface WeightSource {
  /** The file the tensors come from (named in errors). */
  readonly file: string;
  keys(): string[];
  shape(key: string): readonly number[];
}

export interface KeyCheck {
  /** Keys to copy into the model. */
  load: string[];
  /** Expected keys the source lacks (left at their initial values). */
  missing: string[];
  /** Source keys the adapter does not have (ignored). */
  unexpected: string[];
  /** Base-model keys present and left alone (baseWeights 'skip'). */
  skipped: string[];
}

export interface KeyCheckOptions {
  strict?: boolean;
  baseWeights?: BaseWeightsPolicy;
}

const some = (keys: readonly string[]) =>
  `${keys.slice(0, 8).join(', ')}${keys.length > 8 ? ` and ${keys.length - 8} more` : ''}`;

/**
 * Checks a source against the layout before anything is loaded: shapes, the base-weights policy, and with
 * `strict` missing and unexpected keys (FormatError naming the file and the keys). Embedding base weights that
 * a file lacks never count as missing under `strict` (PEFT can save without them).
 */
export function checkKeys(
  layout: Map<string, LayoutEntry>,
  cfg: LoraConfig,
  src: WeightSource,
  opts: KeyCheckOptions = {},
): KeyCheck {
  const policy = opts.baseWeights ?? 'load';
  if (policy !== 'load' && initNeedsBase(cfg.init_lora_weights))
    throw new ConfigError(
      `${src.file}: init_lora_weights '${cfg.init_lora_weights}' rewrites the base weights when the adapter is loaded, and baseWeights is '${policy}'; convert the adapter to plain LoRA (PEFT's path_initial_model_for_weight_conversion) first`,
    );
  const present = new Set(src.keys());
  for (const [key, e] of layout) {
    if (!present.has(key)) continue;
    const shape = src.shape(key);
    if (shape.join() !== e.shape.join())
      throw new FormatError(
        `${src.file}: tensor '${key}' has shape ${fmtShape(shape)} but the adapter config gives ${fmtShape(e.shape)} (check r, rank_pattern and target_modules)`,
      );
  }
  const baseKeys = [...layout].filter(([k, e]) => e.role !== 'adapter' && present.has(k)).map(([k]) => k);
  if (policy === 'refuse' && baseKeys.length)
    throw new FormatError(
      `${src.file}: holds base-model weights (${some(baseKeys)}); loading them would change the base model, and baseWeights is 'refuse'`,
    );
  const trainedBiases = baseKeys.filter((k) => layout.get(k)!.role === 'bias');
  if (policy === 'skip' && trainedBiases.length)
    throw new FormatError(
      `${src.file}: bias '${cfg.bias}' trained base-model biases (${some(trainedBiases)}); skipping them would change the adapter's outputs: load them (baseWeights 'load')`,
    );
  const skipped = policy === 'skip' ? baseKeys : [];
  const skip = new Set(skipped);
  const load = [...layout.keys()].filter((k) => present.has(k) && !skip.has(k));
  const missing = [...layout]
    .filter(([k, e]) => !present.has(k) && (e.role !== 'embedding_base' || policy === 'load'))
    .map(([k]) => k);
  const unexpected = [...present].filter((k) => !layout.has(k));
  if (opts.strict) {
    const strictMissing = missing.filter((k) => layout.get(k)!.role !== 'embedding_base');
    const parts: string[] = [];
    if (strictMissing.length) parts.push(`missing adapter keys: ${some(strictMissing)}`);
    if (unexpected.length) parts.push(`unexpected keys: ${some(unexpected)}`);
    if (parts.length)
      throw new FormatError(
        `${src.file}: does not match the adapter config (${parts.join('; ')}); check target_modules, r and rank_pattern, or that the adapter was made for this model`,
      );
  }
  return { load, missing, unexpected, skipped };
}

/** The warnings PEFT gives for a non-strict load (missing keys stay at their initial values). */
export function keyWarnings(check: KeyCheck, where: string): string[] {
  const out: string[] = [];
  if (check.missing.length)
    out.push(`${where}: missing adapter keys (left at their initial values): ${some(check.missing)}`);
  if (check.unexpected.length) out.push(`${where}: unexpected keys ignored: ${some(check.unexpected)}`);
  return out;
}
