// LoraConfig: PEFT's fields, names and defaults (peft/tuners/lora/config.py), its validation, and the
// adapter_config.json it reads and writes. Field names stay in PEFT's snake_case so the JSON maps 1:1.

import { ConfigError } from '../../core/errors.ts';

export type TaskType = 'SEQ_CLS' | 'SEQ_2_SEQ_LM' | 'CAUSAL_LM' | 'TOKEN_CLS' | 'QUESTION_ANS' | 'FEATURE_EXTRACTION';
export const TASK_TYPES: readonly TaskType[] = [
  'SEQ_CLS',
  'SEQ_2_SEQ_LM',
  'CAUSAL_LM',
  'TOKEN_CLS',
  'QUESTION_ANS',
  'FEATURE_EXTRACTION',
];

/** true (kaiming A, zero B), false (no reset), 'gaussian', 'pissa', 'pissa_niter_<n>', 'olora', 'orthogonal'. */
export type InitLoraWeights = boolean | string;

export type LoraBias = 'none' | 'all' | 'lora_only';

export interface LoraConfig {
  peft_type: 'LORA';
  task_type: TaskType | null;
  base_model_name_or_path: string | null;
  revision: string | null;
  inference_mode: boolean;
  /** Rank (> 0). */
  r: number;
  lora_alpha: number;
  lora_dropout: number;
  /** A string is a regex full-matched against module names; a list matches names or '.'-suffixes. */
  target_modules: string | string[] | null;
  exclude_modules: string | string[] | null;
  fan_in_fan_out: boolean;
  bias: LoraBias;
  use_rslora: boolean;
  modules_to_save: string[] | null;
  init_lora_weights: InitLoraWeights;
  layers_to_transform: number | number[] | null;
  layers_pattern: string | string[] | null;
  rank_pattern: Record<string, number>;
  alpha_pattern: Record<string, number>;
  use_dora: boolean;
  lora_bias: boolean;
  /**
   * The other fields of PEFT's LoraConfig (eva_config, loftq_config, peft_version, auto_mapping, ...) as read
   * from a file or at their defaults; written back unchanged.
   */
  extra: Record<string, unknown>;
}

export type LoraConfigInput = Partial<Omit<LoraConfig, 'peft_type' | 'extra'>> & {
  peft_type?: string;
  extra?: Record<string, unknown>;
};

/** PEFT's defaults for the fields this library does not interpret (config.py, LoraConfig at 0.20.x). */
export const OTHER_FIELD_DEFAULTS: Readonly<Record<string, unknown>> = {
  alora_invocation_tokens: null,
  arrow_config: null,
  auto_mapping: null,
  corda_config: null,
  ensure_weight_tying: false,
  eva_config: null,
  kasa_config: null,
  layer_replication: null,
  loftq_config: {},
  lora_ga_config: null,
  megatron_config: null,
  megatron_core: 'megatron.core',
  monteclora_config: null,
  peft_version: null,
  qalora_group_size: 16,
  target_parameters: null,
  trainable_token_indices: null,
  use_bdlora: null,
  use_qalora: false,
  velora_config: null,
};

/**
 * Fields whose non-default value changes the adapter's math in a way this library does not implement: loading
 * such an adapter would silently give wrong outputs, so it is refused.
 */
const UNSUPPORTED_WHEN_SET = [
  'alora_invocation_tokens',
  'arrow_config',
  'kasa_config',
  'layer_replication',
  'monteclora_config',
  'target_parameters',
  'trainable_token_indices',
  'use_bdlora',
  'use_qalora',
  'velora_config',
] as const;

const OWN_FIELDS = [
  'peft_type',
  'task_type',
  'base_model_name_or_path',
  'revision',
  'inference_mode',
  'r',
  'lora_alpha',
  'lora_dropout',
  'target_modules',
  'exclude_modules',
  'fan_in_fan_out',
  'bias',
  'use_rslora',
  'modules_to_save',
  'init_lora_weights',
  'layers_to_transform',
  'layers_pattern',
  'rank_pattern',
  'alpha_pattern',
  'use_dora',
  'lora_bias',
] as const;

/** Every key PEFT writes in a LoRA adapter_config.json. */
export const ADAPTER_CONFIG_KEYS: readonly string[] = [...OWN_FIELDS, ...Object.keys(OTHER_FIELD_DEFAULTS)].sort();

const DEFAULTS: Omit<LoraConfig, 'extra'> = {
  peft_type: 'LORA',
  task_type: null,
  base_model_name_or_path: null,
  revision: null,
  inference_mode: false,
  r: 8,
  lora_alpha: 8,
  lora_dropout: 0,
  target_modules: null,
  exclude_modules: null,
  fan_in_fan_out: false,
  bias: 'none',
  use_rslora: false,
  modules_to_save: null,
  init_lora_weights: true,
  layers_to_transform: null,
  layers_pattern: null,
  rank_pattern: {},
  alpha_pattern: {},
  use_dora: false,
  lora_bias: false,
};

/** Inits that create a new adapter here; 'pissa_niter_<n>' is matched separately. */
const CREATABLE_INITS = new Set(['gaussian', 'pissa', 'olora', 'orthogonal']);
/** Inits PEFT knows that only matter at creation and leave a plain LoRA behind (loading is fine). */
const LOADABLE_ONLY_INITS = new Set(['eva', 'mica']);

function err(where: string, field: string, msg: string): never {
  throw new ConfigError(`${where}: ${field} ${msg}`);
}

function isStringList(v: unknown): v is string[] {
  return Array.isArray(v) && v.every((x) => typeof x === 'string');
}

function stringOrList(where: string, field: string, v: unknown): string | string[] | null {
  if (v === null || v === undefined) return null;
  if (typeof v === 'string') return v;
  if (isStringList(v)) return [...new Set(v)];
  return err(where, field, `must be a string (regex), a list of strings or null, got ${JSON.stringify(v)}`);
}

function numberMap(where: string, field: string, v: unknown, integer: boolean): Record<string, number> {
  if (v === null || v === undefined) return {};
  if (typeof v !== 'object' || Array.isArray(v)) return err(where, field, `must be an object {pattern: number}`);
  const out: Record<string, number> = {};
  for (const [k, x] of Object.entries(v as Record<string, unknown>)) {
    if (typeof x !== 'number' || !Number.isFinite(x) || (integer && (!Number.isInteger(x) || x <= 0)))
      err(
        where,
        `${field}['${k}']`,
        `must be ${integer ? 'a positive integer' : 'a number'}, got ${JSON.stringify(x)}`,
      );
    out[k] = x;
  }
  return out;
}

function bool(where: string, field: string, v: unknown, fallback: boolean): boolean {
  if (v === undefined || v === null) return fallback;
  if (typeof v !== 'boolean') return err(where, field, `must be true or false, got ${JSON.stringify(v)}`);
  return v;
}

function nullableString(where: string, field: string, v: unknown): string | null {
  if (v === undefined || v === null) return null;
  if (typeof v !== 'string') return err(where, field, `must be a string or null, got ${JSON.stringify(v)}`);
  return v;
}

/** Whether an init_lora_weights value names PiSSA with a fast randomized SVD; returns the iteration count. */
export function pissaNiter(init: InitLoraWeights): number | null {
  if (typeof init !== 'string') return null;
  const m = /^pissa_niter_(\d+)$/.exec(init);
  return m ? Number(m[1]) : null;
}

function checkInit(where: string, v: unknown): InitLoraWeights {
  if (v === undefined || v === null) return true;
  if (typeof v === 'boolean') return v;
  if (typeof v === 'string') {
    if (CREATABLE_INITS.has(v) || LOADABLE_ONLY_INITS.has(v) || pissaNiter(v) !== null) return v;
    if (v === 'corda' || v === 'loftq' || v === 'lora_ga')
      return err(
        where,
        'init_lora_weights',
        `'${v}' is not supported: it needs a calibration pass or a quantized residual base that lowrank does not produce (use true, 'gaussian', 'pissa', 'pissa_niter_<n>', 'olora' or 'orthogonal')`,
      );
    if (/^pissa_niter_/.test(v))
      return err(where, 'init_lora_weights', `'${v}': the number of iterations must be a non-negative integer`);
  }
  return err(
    where,
    'init_lora_weights',
    `must be true, false, 'gaussian', 'pissa', 'pissa_niter_<n>', 'olora' or 'orthogonal', got ${JSON.stringify(v)}`,
  );
}

/**
 * A validated LoraConfig from user input (PEFT's defaults fill the rest). `where` names the source in errors.
 * Throws ConfigError naming the field.
 */
export function loraConfig(input: LoraConfigInput = {}, where = 'LoraConfig'): LoraConfig {
  const i = input as Record<string, unknown>;
  if (i.peft_type !== undefined && i.peft_type !== null && i.peft_type !== 'LORA')
    err(where, 'peft_type', `is '${String(i.peft_type)}', but only 'LORA' adapters are supported`);
  const r = i.r ?? DEFAULTS.r;
  if (typeof r !== 'number' || !Number.isInteger(r) || r <= 0)
    err(where, 'r', `must be a positive integer, got ${JSON.stringify(r)}`);
  const alpha = i.lora_alpha ?? DEFAULTS.lora_alpha;
  if (typeof alpha !== 'number' || !Number.isFinite(alpha))
    err(where, 'lora_alpha', `must be a number, got ${JSON.stringify(alpha)}`);
  const dropout = i.lora_dropout ?? DEFAULTS.lora_dropout;
  if (typeof dropout !== 'number' || !(dropout >= 0 && dropout < 1))
    err(where, 'lora_dropout', `must be a number in [0, 1), got ${JSON.stringify(dropout)}`);
  const bias = i.bias ?? DEFAULTS.bias;
  if (bias !== 'none' && bias !== 'all' && bias !== 'lora_only')
    err(where, 'bias', `must be 'none', 'all' or 'lora_only', got ${JSON.stringify(bias)}`);
  const task = i.task_type ?? null;
  if (task !== null && !TASK_TYPES.includes(task as TaskType))
    err(where, 'task_type', `must be one of ${TASK_TYPES.join(', ')} or null, got ${JSON.stringify(task)}`);
  const targets = stringOrList(where, 'target_modules', i.target_modules);
  const exclude = stringOrList(where, 'exclude_modules', i.exclude_modules);
  let mts: string[] | null = null;
  if (i.modules_to_save !== undefined && i.modules_to_save !== null) {
    if (!isStringList(i.modules_to_save))
      err(where, 'modules_to_save', `must be a list of module names or null, got ${JSON.stringify(i.modules_to_save)}`);
    mts = [...i.modules_to_save];
  }
  let ltt: number | number[] | null = null;
  const lttIn = i.layers_to_transform;
  if (lttIn !== undefined && lttIn !== null) {
    const ok = (x: unknown) => typeof x === 'number' && Number.isInteger(x) && x >= 0;
    if (ok(lttIn)) ltt = lttIn as number;
    else if (Array.isArray(lttIn) && lttIn.every(ok)) ltt = [...(lttIn as number[])];
    else err(where, 'layers_to_transform', `must be a layer index or a list of them, got ${JSON.stringify(lttIn)}`);
  }
  const lp = stringOrList(where, 'layers_pattern', i.layers_pattern);
  if (typeof targets === 'string' && ltt !== null)
    err(where, 'layers_to_transform', 'cannot be used when target_modules is a str (regex)');
  if (typeof targets === 'string' && lp !== null)
    err(where, 'layers_pattern', 'cannot be used when target_modules is a str (regex)');
  if (lp !== null && (lp.length ?? 0) > 0 && ltt === null)
    err(where, 'layers_pattern', 'needs layers_to_transform to be set as well');
  const init = checkInit(where, i.init_lora_weights);
  const useDora = bool(where, 'use_dora', i.use_dora, false);
  const loraBias = bool(where, 'lora_bias', i.lora_bias, false);
  if (loraBias && typeof init !== 'boolean')
    err(where, 'lora_bias', `is only supported with init_lora_weights true or false, got '${String(init)}'`);
  if (loraBias && useDora) err(where, 'lora_bias', 'is not supported with DoRA (use_dora)');
  const extra: Record<string, unknown> = { ...OTHER_FIELD_DEFAULTS, ...(input.extra ?? {}) };
  return {
    peft_type: 'LORA',
    task_type: task as TaskType | null,
    base_model_name_or_path: nullableString(where, 'base_model_name_or_path', i.base_model_name_or_path),
    revision: nullableString(where, 'revision', i.revision),
    inference_mode: bool(where, 'inference_mode', i.inference_mode, false),
    r: r as number,
    lora_alpha: alpha as number,
    lora_dropout: dropout as number,
    target_modules: targets,
    exclude_modules: exclude,
    fan_in_fan_out: bool(where, 'fan_in_fan_out', i.fan_in_fan_out, false),
    bias: bias as LoraBias,
    use_rslora: bool(where, 'use_rslora', i.use_rslora, false),
    modules_to_save: mts,
    init_lora_weights: init,
    layers_to_transform: ltt,
    layers_pattern: lp,
    rank_pattern: numberMap(where, 'rank_pattern', i.rank_pattern, true),
    alpha_pattern: numberMap(where, 'alpha_pattern', i.alpha_pattern, false),
    use_dora: useDora,
    lora_bias: loraBias,
    extra,
  };
}

/** Whether init_lora_weights can create a new adapter here (not only load one). */
export function checkCreatableInit(cfg: LoraConfig, where = 'LoraConfig'): void {
  const v = cfg.init_lora_weights;
  if (typeof v === 'string' && LOADABLE_ONLY_INITS.has(v))
    err(
      where,
      'init_lora_weights',
      `'${v}' needs data or a variant that lowrank does not implement for new adapters; adapters made with it load fine (use true, 'gaussian', 'pissa', 'pissa_niter_<n>', 'olora' or 'orthogonal')`,
    );
}

export interface ParsedAdapterConfig {
  config: LoraConfig;
  /** Messages for tolerated oddities (unknown keys from a newer PEFT). */
  warnings: string[];
}

/**
 * Reads an adapter_config.json object as PEFT does: unknown keys are dropped with a warning (forward compatible),
 * `peft_type` must be LORA, and fields that change the math in ways lowrank does not support are refused.
 */
export function parseAdapterConfig(json: unknown, where = 'adapter_config.json'): ParsedAdapterConfig {
  if (json === null || typeof json !== 'object' || Array.isArray(json))
    throw new ConfigError(`${where}: expected a JSON object`);
  const o = json as Record<string, unknown>;
  if (o.peft_type === undefined)
    throw new ConfigError(`${where}: peft_type is missing (a PEFT adapter config always names its type, e.g. "LORA")`);
  const warnings: string[] = [];
  const own: Record<string, unknown> = {};
  const extra: Record<string, unknown> = {};
  const unknown: string[] = [];
  for (const [k, v] of Object.entries(o)) {
    if ((OWN_FIELDS as readonly string[]).includes(k)) own[k] = v;
    else if (k in OTHER_FIELD_DEFAULTS) extra[k] = v;
    else unknown.push(k);
  }
  if (unknown.length)
    warnings.push(
      `${where}: ignoring unknown field(s) ${unknown.map((k) => `'${k}'`).join(', ')} (written by a newer PEFT?)`,
    );
  for (const k of UNSUPPORTED_WHEN_SET) {
    const v = extra[k];
    if (v !== undefined && v !== null && v !== false && !(Array.isArray(v) && v.length === 0))
      throw new ConfigError(
        `${where}: ${k} is set (${JSON.stringify(v)}), which changes the adapter's computation in a way lowrank does not implement`,
      );
  }
  return { config: loraConfig({ ...own, extra } as LoraConfigInput, where), warnings };
}

/** The adapter_config.json object PEFT writes: every field, keys sorted, lists for sets, inference_mode true. */
export function adapterConfigToJson(
  cfg: LoraConfig,
  opts: { autoMapping?: Record<string, string> | null } = {},
): Record<string, unknown> {
  const list = (v: string | string[] | null) => (Array.isArray(v) ? [...v].sort() : v);
  const all: Record<string, unknown> = {
    ...OTHER_FIELD_DEFAULTS,
    ...cfg.extra,
    peft_type: 'LORA',
    task_type: cfg.task_type,
    base_model_name_or_path: cfg.base_model_name_or_path,
    revision: cfg.revision,
    inference_mode: true,
    r: cfg.r,
    lora_alpha: cfg.lora_alpha,
    lora_dropout: cfg.lora_dropout,
    target_modules: list(cfg.target_modules),
    exclude_modules: list(cfg.exclude_modules),
    fan_in_fan_out: cfg.fan_in_fan_out,
    bias: cfg.bias,
    use_rslora: cfg.use_rslora,
    modules_to_save: cfg.modules_to_save,
    init_lora_weights: cfg.init_lora_weights,
    layers_to_transform: cfg.layers_to_transform,
    layers_pattern: cfg.layers_pattern,
    rank_pattern: cfg.rank_pattern,
    alpha_pattern: cfg.alpha_pattern,
    use_dora: cfg.use_dora,
    lora_bias: cfg.lora_bias,
  };
  if (opts.autoMapping !== undefined) all.auto_mapping = opts.autoMapping;
  const out: Record<string, unknown> = {};
  for (const k of Object.keys(all).sort()) out[k] = all[k];
  return out;
}

/** Scaling of an adapter: alpha / r, or alpha / sqrt(r) with rsLoRA. */
export function loraScaling(alpha: number, r: number, rslora: boolean): number {
  return rslora ? alpha / Math.sqrt(r) : alpha / r;
}
