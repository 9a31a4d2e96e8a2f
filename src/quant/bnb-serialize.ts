// The on-disk form of a bitsandbytes 4-bit Linear weight in a transformers checkpoint, and the
// "quantization_config" block of its config.json.
//
// For a module at prefix P (e.g. "model.layers.0.self_attn.q_proj"), bitsandbytes' Linear4bit
// _save_to_state_dict writes, in this order (QuantState.as_dict(packed=True)):
//   P.weight                                  U8 [ceil(n/2) / itemsize, 1]  packed codes (quant_storage dtype)
//   P.weight.absmax                           F32 [nblocks], or U8 [nblocks] with double quantization
//   P.weight.quant_map                        F32 [16]
//   P.weight.nested_absmax                    F32 [ceil(nblocks/256)]       double quantization only
//   P.weight.nested_quant_map                 F32 [256]                     double quantization only
//   P.weight.quant_state.bitsandbytes__nf4    U8 [len]  UTF-8 of json.dumps({"quant_type", "blocksize",
//                                             "dtype", "shape", ["nested_blocksize", "nested_dtype",
//                                             "nested_offset"]}) with Python's default separators.
// Sources: bitsandbytes functional.py QuantState.as_dict / from_dict, utils.py pack_dict_to_tensor,
// nn/modules.py Linear4bit._save_to_state_dict, backends/cuda/ops.py quantize_4bit (output shape);
// transformers utils/quantization_config.py BitsAndBytesConfig.

import { ConfigError, FormatError, fmtShape } from '../core/errors.ts';
import { type RawTensor, type SafetensorsDType, safetensorsItemSize } from '../formats/safetensors.ts';
import {
  BLOCKSIZES_4BIT,
  type DoubleQuantAbsmax,
  isDoubleQuant,
  type QuantState4bit,
  WEIGHT_DTYPES,
  type WeightDtypeName,
} from './blockwise4.ts';
import { code4bit, type QuantType4 } from './codebooks.ts';
import { pyJsonDumps } from './pyjson.ts';

/** safetensors dtype names and raw tensors, as the safetensors reader and writer use them. */
export type SafetensorsDtype = SafetensorsDType;
export type { RawTensor };

/** bnb_4bit_quant_storage values transformers accepts, and their safetensors dtype. */
export type QuantStorage = 'uint8' | 'int8' | 'float16' | 'bfloat16' | 'float32' | 'float64';
const STORAGE_DTYPE: Record<QuantStorage, SafetensorsDtype> = {
  uint8: 'U8',
  int8: 'I8',
  float16: 'F16',
  bfloat16: 'BF16',
  float32: 'F32',
  float64: 'F64',
};

const QS_PREFIX = 'quant_state.bitsandbytes__';
const VALID_QS_KEYS = new Set([
  'quant_type',
  'blocksize',
  'dtype',
  'shape',
  'nested_blocksize',
  'nested_dtype',
  'nested_offset',
]);
/** Keys bitsandbytes' QuantState.from_dict accepts under "P.weight." (besides the packed blob). */
const VALID_TENSOR_SUFFIXES = new Set(['absmax', 'quant_map', 'nested_absmax', 'nested_quant_map']);

const littleEndian = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

function f32Bytes(a: Float32Array): Uint8Array {
  if (!littleEndian) throw new Error('bnb-serialize: big-endian hosts are not supported');
  return new Uint8Array(a.buffer.slice(a.byteOffset, a.byteOffset + a.byteLength));
}

function f32FromBytes(b: Uint8Array): Float32Array {
  if (!littleEndian) throw new Error('bnb-serialize: big-endian hosts are not supported');
  // Copy: the bytes may sit at an offset that is not a multiple of 4 inside a file buffer.
  const copy = new Uint8Array(b.length);
  copy.set(b);
  return new Float32Array(copy.buffer);
}

function numel(shape: readonly number[]): number {
  let n = 1;
  for (const d of shape) n *= d;
  return n;
}

/** The JSON text bitsandbytes packs into "P.weight.quant_state.bitsandbytes__<type>". */
export function quantStateJson(state: QuantState4bit): string {
  const d: Record<string, unknown> = {
    quant_type: state.quantType,
    blocksize: state.blocksize,
    dtype: state.dtype,
    shape: state.shape,
  };
  const a = state.absmax;
  if (isDoubleQuant(a)) {
    d.nested_blocksize = a.nestedBlocksize;
    d.nested_dtype = a.nestedDtype;
    d.nested_offset = a.offset;
  }
  return pyJsonDumps(d, { floatKeys: new Set(['nested_offset']) });
}

export interface ToBnbOptions {
  /** bnb_4bit_quant_storage: the dtype the packed bytes are viewed as; default 'uint8'. */
  quantStorage?: QuantStorage;
}

/**
 * The tensors a transformers bnb-4bit checkpoint holds for `${name}.weight` (name = module prefix, e.g.
 * "model.layers.0.mlp.down_proj"), in bitsandbytes' order. The bias, if any, is the caller's.
 */
export function toBnb4bitTensors(
  name: string,
  state: QuantState4bit,
  opts: ToBnbOptions = {},
): Record<string, RawTensor> {
  const storage = opts.quantStorage ?? 'uint8';
  const dtype = STORAGE_DTYPE[storage];
  if (!dtype)
    throw new ConfigError(`quantStorage must be one of ${Object.keys(STORAGE_DTYPE).join(', ')} (got ${storage})`);
  const itemSize = safetensorsItemSize(dtype);
  if (state.packed.length % itemSize !== 0) {
    throw new ConfigError(
      `quantStorage ${storage}: ${state.packed.length} packed bytes of ${name}.weight are not a multiple of ${itemSize}`,
    );
  }
  const w = `${name}.weight`;
  const out: Record<string, RawTensor> = {};
  out[w] = { dtype, shape: [state.packed.length / itemSize, 1], data: state.packed.slice() };
  const a = state.absmax;
  if (isDoubleQuant(a)) {
    out[`${w}.absmax`] = { dtype: 'U8', shape: [a.quantizedAbsmax.length], data: a.quantizedAbsmax.slice() };
  } else {
    out[`${w}.absmax`] = { dtype: 'F32', shape: [a.length], data: f32Bytes(a) };
  }
  out[`${w}.quant_map`] = { dtype: 'F32', shape: [state.quantMap.length], data: f32Bytes(state.quantMap) };
  if (isDoubleQuant(a)) {
    out[`${w}.nested_absmax`] = { dtype: 'F32', shape: [a.nestedAbsmax.length], data: f32Bytes(a.nestedAbsmax) };
    out[`${w}.nested_quant_map`] = {
      dtype: 'F32',
      shape: [a.nestedQuantMap.length],
      data: f32Bytes(a.nestedQuantMap),
    };
  }
  const json = new TextEncoder().encode(quantStateJson(state));
  out[`${w}.${QS_PREFIX}${state.quantType}`] = { dtype: 'U8', shape: [json.length], data: json };
  return out;
}

/** Module prefixes P that hold a bnb-4bit weight (a "P.weight.quant_state.bitsandbytes__*" key). */
export function findBnb4bitModules(names: Iterable<string>): string[] {
  const out: string[] = [];
  const marker = `.weight.${QS_PREFIX}`;
  for (const k of names) {
    const i = k.lastIndexOf(marker);
    if (i > 0) out.push(k.slice(0, i));
  }
  return [...new Set(out)].sort();
}

function fail(tensor: string, what: string): never {
  throw new FormatError(`bnb-4bit tensor ${tensor}: ${what}`);
}

function checkRaw(key: string, t: RawTensor, dtypes: readonly SafetensorsDtype[], shape?: number[]): void {
  if (!dtypes.includes(t.dtype)) fail(key, `dtype ${t.dtype}, expected ${dtypes.join(' or ')}`);
  if (!Array.isArray(t.shape) || t.shape.some((d) => !Number.isInteger(d) || d < 0)) {
    fail(key, `invalid shape ${JSON.stringify(t.shape)}`);
  }
  const bytes = numel(t.shape) * safetensorsItemSize(t.dtype);
  if (!(t.data instanceof Uint8Array) || t.data.length !== bytes) {
    fail(key, `${t.data?.length ?? 'no'} data bytes for ${t.dtype} ${fmtShape(t.shape)} (need ${bytes})`);
  }
  if (shape && (t.shape.length !== shape.length || t.shape.some((d, i) => d !== shape[i]))) {
    fail(key, `shape ${fmtShape(t.shape)}, expected ${fmtShape(shape)}`);
  }
}

function isPosInt(v: unknown): v is number {
  return typeof v === 'number' && Number.isInteger(v) && v > 0;
}

/**
 * Parses the tensors of one bnb-4bit weight back into a QuantState4bit. `tensors` may be a whole state
 * dict; only keys under `${name}.weight` are read, and every one of them must be a known part.
 * Throws FormatError naming the tensor for anything missing, unknown, or of the wrong dtype or size.
 */
export function fromBnb4bitTensors(tensors: Record<string, RawTensor>, name: string): QuantState4bit {
  const w = `${name}.weight`;
  const parts = new Map<string, RawTensor>();
  for (const [k, t] of Object.entries(tensors)) if (k.startsWith(`${w}.`)) parts.set(k.slice(w.length + 1), t);
  const qsKeys = [...parts.keys()].filter((k) => k.startsWith('quant_state.'));
  if (qsKeys.length === 0) fail(`${w}.${QS_PREFIX}*`, 'missing (the packed quant state, bitsandbytes__nf4 or __fp4)');
  if (qsKeys.length > 1)
    fail(`${w}.quant_state`, `expected exactly one quant_state tensor, found ${qsKeys.join(', ')}`);
  const qsKey = `${w}.${qsKeys[0]}`;
  if (!qsKeys[0]!.startsWith(QS_PREFIX)) fail(qsKey, `unknown quant_state key (expected ${QS_PREFIX}nf4 or fp4)`);
  const suffixType = qsKeys[0]!.slice(QS_PREFIX.length);
  if (suffixType !== 'nf4' && suffixType !== 'fp4') fail(qsKey, `unknown quant type "${suffixType}" (nf4 or fp4)`);
  for (const k of parts.keys()) {
    if (k !== qsKeys[0] && !VALID_TENSOR_SUFFIXES.has(k)) fail(`${w}.${k}`, 'unknown bnb-4bit quant state part');
  }

  // The JSON blob.
  const qsT = parts.get(qsKeys[0]!)!;
  checkRaw(qsKey, qsT, ['U8']);
  if (qsT.shape.length !== 1) fail(qsKey, `shape ${fmtShape(qsT.shape)}, expected 1-D`);
  let meta: Record<string, unknown>;
  try {
    meta = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(qsT.data));
  } catch (e) {
    fail(qsKey, `not UTF-8 JSON (${(e as Error).message})`);
  }
  if (meta === null || typeof meta !== 'object' || Array.isArray(meta)) fail(qsKey, 'JSON is not an object');
  for (const k of Object.keys(meta)) if (!VALID_QS_KEYS.has(k)) fail(qsKey, `unknown key "${k}" in quant state JSON`);
  const quantType = meta.quant_type;
  if (quantType !== suffixType) fail(qsKey, `quant_type ${JSON.stringify(quantType)} does not match the key suffix`);
  const blocksize = meta.blocksize;
  if (!isPosInt(blocksize) || !BLOCKSIZES_4BIT.includes(blocksize)) {
    fail(qsKey, `blocksize ${JSON.stringify(blocksize)} (expected one of ${BLOCKSIZES_4BIT.join(', ')})`);
  }
  const dtype = meta.dtype;
  if (typeof dtype !== 'string' || !WEIGHT_DTYPES.includes(dtype as WeightDtypeName)) {
    fail(qsKey, `dtype ${JSON.stringify(dtype)} (expected ${WEIGHT_DTYPES.join(', ')})`);
  }
  const shape = meta.shape;
  if (!Array.isArray(shape) || shape.some((d) => typeof d !== 'number' || !Number.isInteger(d) || d < 0)) {
    fail(qsKey, `shape ${JSON.stringify(shape)} (expected a list of non-negative integers)`);
  }
  const n = numel(shape as number[]);
  const nblocks = Math.ceil(n / blocksize);

  // Packed weight.
  const wT = tensors[w];
  if (!wT) fail(w, 'missing');
  const storageTypes: SafetensorsDtype[] = ['U8', 'I8', 'F16', 'BF16', 'F32', 'F64'];
  checkRaw(w, wT, storageTypes);
  const packedBytes = Math.ceil(n / 2);
  const item = safetensorsItemSize(wT.dtype);
  if (packedBytes % item !== 0) fail(w, `${packedBytes} packed bytes cannot be stored as ${wT.dtype}`);
  checkRaw(w, wT, storageTypes, [packedBytes / item, 1]);

  // quant_map: bitsandbytes' kernels decode with their built-in table, so the stored map must agree.
  const qmKey = `${w}.quant_map`;
  const qmT = parts.get('quant_map');
  if (!qmT) fail(qmKey, 'missing');
  checkRaw(qmKey, qmT, ['F32'], [16]);
  const quantMap = f32FromBytes(qmT.data);
  const expected = code4bit(quantType as QuantType4);
  for (let i = 0; i < 16; i++) {
    if (!(Math.abs(quantMap[i]! - expected[i]!) <= 1e-6)) {
      fail(qmKey, `value ${i} is ${quantMap[i]}, the bitsandbytes ${quantType} table has ${expected[i]}`);
    }
  }

  // absmax, plain or double-quantized.
  const nestedKeys = ['nested_blocksize', 'nested_dtype', 'nested_offset'].filter((k) => k in meta);
  const nestedTensors = ['nested_absmax', 'nested_quant_map'].filter((k) => parts.has(k));
  const nested = nestedKeys.length > 0 || nestedTensors.length > 0;
  if (nested && (nestedKeys.length !== 3 || nestedTensors.length !== 2)) {
    const missingT = ['nested_absmax', 'nested_quant_map'].filter((k) => !parts.has(k));
    if (missingT.length > 0) fail(`${w}.${missingT[0]}`, 'missing (the weight is double-quantized)');
    fail(qsKey, 'double quantization needs nested_blocksize, nested_dtype and nested_offset in the JSON');
  }
  const amKey = `${w}.absmax`;
  const amT = parts.get('absmax');
  if (!amT) fail(amKey, 'missing');
  let absmax: Float32Array | DoubleQuantAbsmax;
  if (!nested) {
    checkRaw(amKey, amT, ['F32'], [nblocks]);
    absmax = f32FromBytes(amT.data);
  } else {
    checkRaw(amKey, amT, ['U8'], [nblocks]);
    const nbs = meta.nested_blocksize;
    if (!isPosInt(nbs)) fail(qsKey, `nested_blocksize ${JSON.stringify(nbs)} (expected a positive integer)`);
    if (meta.nested_dtype !== 'float32')
      fail(qsKey, `nested_dtype ${JSON.stringify(meta.nested_dtype)} (expected "float32")`);
    const offset = meta.nested_offset;
    if (typeof offset !== 'number' || !Number.isFinite(offset)) {
      fail(qsKey, `nested_offset ${JSON.stringify(offset)} (expected a finite number)`);
    }
    const naKey = `${w}.nested_absmax`;
    const naT = parts.get('nested_absmax')!;
    checkRaw(naKey, naT, ['F32'], [Math.ceil(nblocks / nbs)]);
    const nqKey = `${w}.nested_quant_map`;
    const nqT = parts.get('nested_quant_map')!;
    checkRaw(nqKey, nqT, ['F32'], [256]);
    absmax = {
      quantizedAbsmax: amT.data.slice(),
      nestedAbsmax: f32FromBytes(naT.data),
      nestedQuantMap: f32FromBytes(nqT.data),
      offset: Math.fround(offset),
      nestedBlocksize: nbs,
      nestedDtype: 'float32',
    };
  }

  return {
    packed: wT.data.slice(),
    absmax,
    quantMap,
    shape: [...(shape as number[])],
    dtype: dtype as WeightDtypeName,
    blocksize,
    quantType: quantType as QuantType4,
  };
}

// ---------------------------------------------------------------------------------------------------
// config.json "quantization_config"

const COMPUTE_DTYPES: readonly string[] = ['float32', 'float16', 'bfloat16', 'float64'];
const STORAGE_NAMES: readonly string[] = ['float16', 'float32', 'int8', 'uint8', 'float64', 'bfloat16'];

/** BitsAndBytesConfig.to_dict(), keys in transformers' order. */
export interface BnbQuantizationConfig {
  quant_method: 'bitsandbytes';
  _load_in_8bit: boolean;
  _load_in_4bit: boolean;
  llm_int8_threshold: number;
  llm_int8_skip_modules: string[] | null;
  llm_int8_enable_fp32_cpu_offload: boolean;
  llm_int8_has_fp16_weight: boolean;
  bnb_4bit_quant_type: QuantType4;
  bnb_4bit_use_double_quant: boolean;
  bnb_4bit_compute_dtype: string;
  bnb_4bit_quant_storage: string;
  load_in_4bit: boolean;
  load_in_8bit: boolean;
}

export interface BnbConfigOptions {
  loadIn4bit?: boolean;
  loadIn8bit?: boolean;
  /** transformers' default is 'fp4'; the QLoRA recipe is 'nf4'. */
  quantType?: QuantType4;
  /** transformers' default is false; the QLoRA recipe is true. */
  doubleQuant?: boolean;
  /** transformers' default is float32; the QLoRA recipe is bfloat16. */
  computeDtype?: 'float32' | 'float16' | 'bfloat16' | 'float64';
  quantStorage?: QuantStorage;
  llmInt8Threshold?: number;
  skipModules?: string[] | null;
  llmInt8EnableFp32CpuOffload?: boolean;
  llmInt8HasFp16Weight?: boolean;
}

/**
 * The "quantization_config" object transformers writes for BitsAndBytesConfig(...). Defaults are
 * transformers' (load_in_4bit false, fp4, no double quant, float32 compute, uint8 storage).
 * Serialize it with pyJsonDumps and BNB_CONFIG_FLOAT_KEYS so llm_int8_threshold prints as 6.0:
 * transformers rejects an integer there.
 */
export function bnbQuantizationConfig(opts: BnbConfigOptions = {}): BnbQuantizationConfig {
  const cfg: BnbQuantizationConfig = {
    quant_method: 'bitsandbytes',
    _load_in_8bit: opts.loadIn8bit ?? false,
    _load_in_4bit: opts.loadIn4bit ?? false,
    llm_int8_threshold: opts.llmInt8Threshold ?? 6.0,
    llm_int8_skip_modules: opts.skipModules ?? null,
    llm_int8_enable_fp32_cpu_offload: opts.llmInt8EnableFp32CpuOffload ?? false,
    llm_int8_has_fp16_weight: opts.llmInt8HasFp16Weight ?? false,
    bnb_4bit_quant_type: opts.quantType ?? 'fp4',
    bnb_4bit_use_double_quant: opts.doubleQuant ?? false,
    bnb_4bit_compute_dtype: opts.computeDtype ?? 'float32',
    bnb_4bit_quant_storage: opts.quantStorage ?? 'uint8',
    load_in_4bit: opts.loadIn4bit ?? false,
    load_in_8bit: opts.loadIn8bit ?? false,
  };
  return parseBnbQuantizationConfig(cfg);
}

/** Float-typed fields of quantization_config (for pyJsonDumps floatKeys). */
export const BNB_CONFIG_FLOAT_KEYS: ReadonlySet<string> = new Set(['llm_int8_threshold']);

/**
 * Validates a config.json "quantization_config" of quant_method "bitsandbytes" and returns it normalized
 * (all fields, transformers' defaults filled in, key order as transformers writes). Accepts both the
 * `_load_in_4bit` and the public `load_in_4bit` spelling. Throws ConfigError naming the field.
 */
export function parseBnbQuantizationConfig(raw: unknown, where = 'quantization_config'): BnbQuantizationConfig {
  if (raw === null || typeof raw !== 'object' || Array.isArray(raw))
    throw new ConfigError(`${where} must be an object`);
  const o = raw as Record<string, unknown>;
  const err = (key: string, what: string): never => {
    throw new ConfigError(`${where}.${key}: ${what}`);
  };
  if (o.quant_method !== 'bitsandbytes') {
    err('quant_method', `expected "bitsandbytes", got ${JSON.stringify(o.quant_method)}`);
  }
  const bool = (key: string, def: boolean): boolean => {
    const v = o[key];
    if (v === undefined || v === null) return def;
    if (typeof v !== 'boolean') err(key, `must be true or false, got ${JSON.stringify(v)}`);
    return v as boolean;
  };
  const load4 = bool('load_in_4bit', bool('_load_in_4bit', false));
  const load8 = bool('load_in_8bit', bool('_load_in_8bit', false));
  if ('_load_in_4bit' in o && bool('_load_in_4bit', false) !== load4) {
    err('load_in_4bit', 'disagrees with _load_in_4bit');
  }
  if ('_load_in_8bit' in o && bool('_load_in_8bit', false) !== load8) {
    err('load_in_8bit', 'disagrees with _load_in_8bit');
  }
  if (load4 && load8) err('load_in_4bit', 'load_in_4bit and load_in_8bit are both true; only one can be used');
  const threshold = o.llm_int8_threshold ?? 6.0;
  if (typeof threshold !== 'number' || !Number.isFinite(threshold)) {
    err('llm_int8_threshold', `must be a number, got ${JSON.stringify(threshold)}`);
  }
  const skip = o.llm_int8_skip_modules ?? null;
  if (skip !== null && (!Array.isArray(skip) || skip.some((s) => typeof s !== 'string'))) {
    err('llm_int8_skip_modules', 'must be null or a list of module names');
  }
  const quantType = o.bnb_4bit_quant_type ?? 'fp4';
  if (quantType !== 'nf4' && quantType !== 'fp4') {
    err('bnb_4bit_quant_type', `must be "nf4" or "fp4", got ${JSON.stringify(quantType)}`);
  }
  const dtypeName = (key: string, def: string, allowed: readonly string[]): string => {
    let v = o[key] ?? def;
    if (typeof v === 'string' && v.startsWith('torch.')) v = v.slice('torch.'.length);
    if (typeof v !== 'string' || !allowed.includes(v)) {
      err(key, `must be one of ${allowed.join(', ')}, got ${JSON.stringify(o[key])}`);
    }
    return v as string;
  };
  return {
    quant_method: 'bitsandbytes',
    _load_in_8bit: load8,
    _load_in_4bit: load4,
    llm_int8_threshold: threshold as number,
    llm_int8_skip_modules: skip === null ? null : [...(skip as string[])],
    llm_int8_enable_fp32_cpu_offload: bool('llm_int8_enable_fp32_cpu_offload', false),
    llm_int8_has_fp16_weight: bool('llm_int8_has_fp16_weight', false),
    bnb_4bit_quant_type: quantType as QuantType4,
    bnb_4bit_use_double_quant: bool('bnb_4bit_use_double_quant', false),
    bnb_4bit_compute_dtype: dtypeName('bnb_4bit_compute_dtype', 'float32', COMPUTE_DTYPES),
    bnb_4bit_quant_storage: dtypeName('bnb_4bit_quant_storage', 'uint8', STORAGE_NAMES),
    load_in_4bit: load4,
    load_in_8bit: load8,
  };
}
