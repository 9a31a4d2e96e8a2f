// bitsandbytes-compatible blockwise 4-bit quantization (NF4 and FP4), with optional double quantization
// of the absmax values (QLoRA, Dettmers et al. 2023, arXiv 2305.14314, section 3).
//
// Semantics follow the CUDA kernels kQuantizeBlockwise / kQuantizeBlockwiseSmall and kDequantizeBlockwise
// (bitsandbytes csrc/kernels.cu) and functional.py quantize_4bit / dequantize_4bit:
//  - the weight is flattened row-major; blocks are `blocksize` consecutive elements; the last block may be
//    partial and gets its own absmax;
//  - absmax = max|x| per block in float32; each x is multiplied by the float32 reciprocal 1/absmax;
//  - the code is chosen by the kernel's decision tree (dQuantizeNF4 / dQuantizeFP4) with strict `x > t`,
//    so a value exactly on a boundary takes the lower code;
//  - two codes per byte, the even element in the HIGH nibble; an odd count is padded with the code of 0.
// An all-zero block has absmax 0; as in the kernel, 0 * (1/0) is NaN, which the trees map to code 0,
// and it decodes to 0 * code = 0. bitsandbytes is built with --use_fast_math, so its reciprocal may differ
// from the IEEE one by an ulp; codes can then differ only for values within about an ulp of a boundary.

import { bf16ToF32, f16ToF32 } from '../core/dtype.ts';
import { ConfigError, fmtShape, ShapeError } from '../core/errors.ts';
import { quantizeBlockwise8 } from './blockwise8.ts';
import { code4bit, DYNAMIC_MAP_SIGNED, type QuantType4 } from './codebooks.ts';

export type { QuantType4 } from './codebooks.ts';

const f = Math.fround;

/** Block sizes bitsandbytes accepts for 4-bit quantization. transformers always uses 64. */
export const BLOCKSIZES_4BIT: readonly number[] = [32, 64, 128, 256, 512, 1024, 2048, 4096];
/** Block size of the second (8-bit) quantization of the absmax values. */
export const NESTED_BLOCKSIZE = 256;

/** Original weight dtypes recorded in the quant state ("dtype" in bitsandbytes' JSON). */
export type WeightDtypeName = 'float32' | 'bfloat16' | 'float16';
export const WEIGHT_DTYPES: readonly WeightDtypeName[] = ['float32', 'bfloat16', 'float16'];

/** Double-quantized absmax: 8-bit codes over the dynamic map, per 256-block scales and a global offset. */
export interface DoubleQuantAbsmax {
  /** One uint8 code per 4-bit block ("P.weight.absmax" with double quantization). */
  quantizedAbsmax: Uint8Array;
  /** max|absmax - offset| per block of `nestedBlocksize` absmax values, float32. */
  nestedAbsmax: Float32Array;
  /** The 256-value code (the signed dynamic map). */
  nestedQuantMap: Float32Array;
  /** mean(absmax) in float32, subtracted before the second quantization. */
  offset: number;
  nestedBlocksize: number;
  nestedDtype: 'float32';
}

export interface QuantState4bit {
  /** ceil(n/2) bytes, element 2i in the high nibble of byte i. */
  packed: Uint8Array;
  /** Per-block absmax in float32, or its double-quantized form. */
  absmax: Float32Array | DoubleQuantAbsmax;
  /** The 16-value code (NF4_CODE or FP4_CODE), stored as "P.weight.quant_map". */
  quantMap: Float32Array;
  /** The original weight shape, e.g. [out_features, in_features]. */
  shape: number[];
  /** The original weight dtype. */
  dtype: WeightDtypeName;
  blocksize: number;
  quantType: QuantType4;
}

export interface Quantize4bitOptions {
  quantType: QuantType4;
  /** 32..4096, a power of two; default 64. */
  blocksize?: number;
  /** Double quantization (bnb compress_statistics, bnb_4bit_use_double_quant); default false. */
  doubleQuant?: boolean;
  /** The weight's shape; default [w.length]. */
  shape?: readonly number[];
  /**
   * The original dtype, recorded in the state. A Uint16Array input holds raw bf16 or f16 bits and needs
   * 'bfloat16' or 'float16' here; a Float32Array input defaults to 'float32'.
   */
  dtype?: WeightDtypeName;
}

// Decision tree thresholds of dQuantizeNF4 (midpoints between adjacent NF4 codes), as float32 literals.
const NF4_T = [
  -0.8480964004993439, -0.6106329262256622, -0.4599952697753906, -0.33967943489551544, -0.23460740596055984,
  -0.13791173323988914, -0.045525018125772476, 0.03979014977812767, 0.1202552504837513, 0.2035212516784668,
  0.2920137718319893, 0.3893125355243683, 0.5016634166240692, 0.6427869200706482, 0.8614784181118011,
].map(f);
const [N0, N1, N2, N3, N4, N5, N6, N7, N8, N9, N10, N11, N12, N13, N14] = NF4_T as [
  number,
  number,
  number,
  number,
  number,
  number,
  number,
  number,
  number,
  number,
  number,
  number,
  number,
  number,
  number,
];

/** NF4 code of x (scaled to [-1, 1]) by bitsandbytes' dQuantizeNF4 tree: strict `>`, NaN -> 0. */
export function quantizeNf4Value(x: number): number {
  if (x > N7) {
    if (x > N11) {
      if (x > N13) return x > N14 ? 0b1111 : 0b1110;
      return x > N12 ? 0b1101 : 0b1100;
    }
    if (x > N9) return x > N10 ? 0b1011 : 0b1010;
    return x > N8 ? 0b1001 : 0b1000;
  }
  if (x > N3) {
    if (x > N5) return x > N6 ? 0b0111 : 0b0110;
    return x > N4 ? 0b0101 : 0b0100;
  }
  if (x > N1) return x > N2 ? 0b0011 : 0b0010;
  return x > N0 ? 0b0001 : 0b0000;
}

// dQuantizeFP4 thresholds on |x| (the kernel's float literals; close to, not exactly, the midpoints).
const F_0 = f(0.00260417);
const F_1 = f(0.0859375);
const F_2 = f(0.20833333);
const F_3 = f(0.29166667);
const F_4 = f(0.4166667);
const F_5 = f(0.583333);
const F_6 = f(0.8333333);

/** FP4 code of x (scaled to [-1, 1]) by bitsandbytes' dQuantizeFP4 tree: sign bit 8 only for x < 0. */
export function quantizeFp4Value(x: number): number {
  const sign = x < 0 ? 0b1000 : 0;
  const a = Math.abs(x);
  if (a > F_3) {
    if (a > F_5) return (a > F_6 ? 0b0011 : 0b0010) + sign;
    return (a > F_4 ? 0b0101 : 0b0100) + sign;
  }
  if (a > F_1) return (a > F_2 ? 0b0111 : 0b0110) + sign;
  return (a > F_0 ? 0b0001 : 0b0000) + sign;
}

export function checkBlocksize4bit(blocksize: number, where = 'blocksize'): void {
  if (!BLOCKSIZES_4BIT.includes(blocksize)) {
    throw new ConfigError(`${where} must be one of ${BLOCKSIZES_4BIT.join(', ')} (got ${blocksize})`);
  }
}

function numel(shape: readonly number[]): number {
  let n = 1;
  for (const d of shape) n *= d;
  return n;
}

/**
 * Blockwise 4-bit quantization of a flat weight (row-major), as bitsandbytes quantize_4bit.
 * With doubleQuant the absmax values are centered on their mean and quantized again to 8 bits over the
 * dynamic map in blocks of 256.
 */
export function quantize4bit(w: Float32Array | Uint16Array, opts: Quantize4bitOptions): QuantState4bit {
  const { quantType } = opts;
  if (quantType !== 'nf4' && quantType !== 'fp4') {
    throw new ConfigError(`quantType must be 'nf4' or 'fp4' (got ${String(quantType)})`);
  }
  const blocksize = opts.blocksize ?? 64;
  checkBlocksize4bit(blocksize);
  const n = w.length;
  const shape = opts.shape ? [...opts.shape] : [n];
  if (shape.some((d) => !Number.isInteger(d) || d < 0) || numel(shape) !== n) {
    throw new ShapeError(`quantize4bit: shape ${fmtShape(shape)} does not hold ${n} elements`);
  }
  let dtype: WeightDtypeName;
  let read: ((bits: number) => number) | null = null;
  if (w instanceof Uint16Array) {
    if (opts.dtype !== 'bfloat16' && opts.dtype !== 'float16') {
      throw new ConfigError(`quantize4bit: a Uint16Array weight needs dtype 'bfloat16' or 'float16'`);
    }
    dtype = opts.dtype;
    read = dtype === 'bfloat16' ? bf16ToF32 : f16ToF32;
  } else {
    dtype = opts.dtype ?? 'float32';
    if (!WEIGHT_DTYPES.includes(dtype)) throw new ConfigError(`quantize4bit: unknown dtype ${String(dtype)}`);
  }

  const quantize = quantType === 'nf4' ? quantizeNf4Value : quantizeFp4Value;
  const nblocks = Math.ceil(n / blocksize);
  const packed = new Uint8Array(Math.ceil(n / 2));
  const absmax = new Float32Array(nblocks);
  const block = new Float32Array(blocksize);
  let lastInv = 0;
  for (let b = 0; b < nblocks; b++) {
    const start = b * blocksize;
    const len = Math.min(blocksize, n - start);
    let m = 0;
    for (let j = 0; j < len; j++) {
      const v = read ? read((w as Uint16Array)[start + j]!) : (w as Float32Array)[start + j]!;
      block[j] = v;
      const a = Math.abs(v);
      if (a > m) m = a; // as fmaxf: a NaN never wins
    }
    absmax[b] = m;
    const inv = f(1 / m);
    lastInv = inv;
    // blocksize is even, so a block starts on a byte boundary.
    for (let j = 0; j < len; j++) {
      const q = quantize(f(block[j]! * inv));
      const i = start + j;
      if ((i & 1) === 0) packed[i >> 1] = q << 4;
      else packed[i >> 1]! |= q;
    }
  }
  // Odd count: the kernel quantizes a zero pad value with the last block's scale.
  if (n & 1) packed[n >> 1]! |= quantize(f(0 * lastInv));

  const state: QuantState4bit = {
    packed,
    absmax,
    quantMap: Float32Array.from(code4bit(quantType)),
    shape,
    dtype,
    blocksize,
    quantType,
  };
  if (opts.doubleQuant) state.absmax = doubleQuantizeAbsmax(absmax);
  return state;
}

/** Double quantization of the absmax values: offset = mean, then 8-bit blockwise over the dynamic map. */
export function doubleQuantizeAbsmax(absmax: Float32Array): DoubleQuantAbsmax {
  // torch's absmax.mean() in float32; accumulated in double here, then rounded to float32 once
  // (CUDA's reduction order may give a result one ulp away for some inputs).
  let sum = 0;
  for (let i = 0; i < absmax.length; i++) sum += absmax[i]!;
  const offset = absmax.length > 0 ? f(sum / absmax.length) : 0;
  const centered = new Float32Array(absmax.length);
  for (let i = 0; i < absmax.length; i++) centered[i] = f(absmax[i]! - offset);
  const { q, absmax: nestedAbsmax } = quantizeBlockwise8(centered, DYNAMIC_MAP_SIGNED, NESTED_BLOCKSIZE);
  return {
    quantizedAbsmax: q,
    nestedAbsmax,
    nestedQuantMap: Float32Array.from(DYNAMIC_MAP_SIGNED),
    offset,
    nestedBlocksize: NESTED_BLOCKSIZE,
    nestedDtype: 'float32',
  };
}

export function isDoubleQuant(absmax: QuantState4bit['absmax']): absmax is DoubleQuantAbsmax {
  return !(absmax instanceof Float32Array);
}

/** The float32 absmax per 4-bit block: code[q] * nestedAbsmax[i / 256] + offset for double quantization. */
export function dequantizeAbsmax(state: QuantState4bit): Float32Array {
  const a = state.absmax;
  if (!isDoubleQuant(a)) return a;
  const out = new Float32Array(a.quantizedAbsmax.length);
  const code = a.nestedQuantMap;
  const bs = a.nestedBlocksize;
  for (let i = 0; i < out.length; i++) {
    out[i] = f(f(code[a.quantizedAbsmax[i]!]! * a.nestedAbsmax[Math.floor(i / bs)]!) + a.offset);
  }
  return out;
}

function checkState(state: QuantState4bit, absmax: Float32Array, where: string): number {
  const n = numel(state.shape);
  if (state.packed.length !== Math.ceil(n / 2)) {
    throw new ShapeError(
      `${where}: ${state.packed.length} packed bytes cannot hold shape ${fmtShape(state.shape)} (need ${Math.ceil(n / 2)})`,
    );
  }
  const bs = state.blocksize;
  if (absmax.length !== Math.ceil(n / bs)) {
    throw new ShapeError(
      `${where}: ${absmax.length} absmax values for ${n} elements in blocks of ${bs} (need ${Math.ceil(n / bs)})`,
    );
  }
  return n;
}

/**
 * Dequantizes to float32, row-major in state.shape: code[nibble] * absmax[block], computed in float32 as
 * bitsandbytes does before it casts to state.dtype. The code is bitsandbytes' built-in table for the
 * quant type (its kernels ignore the stored quant_map; bnb-serialize checks that they agree).
 */
export function dequantize4bit(state: QuantState4bit, out?: Float32Array): Float32Array {
  const absmax = dequantizeAbsmax(state);
  const n = checkState(state, absmax, 'dequantize4bit');
  const result = out ?? new Float32Array(n);
  if (result.length < n) throw new ShapeError(`dequantize4bit: output holds ${result.length} < ${n} elements`);
  dequantize4bitRange(state, absmax, 0, n, result, 0);
  return result;
}

/**
 * Dequantizes elements [start, start + count) of the flat weight into out[outOffset...], for kernels that
 * unpack a tile of rows at a time instead of a full float32 copy. `absmax` is dequantizeAbsmax(state),
 * computed once per weight. Same values as dequantize4bit.
 */
export function dequantize4bitRange(
  state: QuantState4bit,
  absmax: Float32Array,
  start: number,
  count: number,
  out: Float32Array,
  outOffset = 0,
): Float32Array {
  const n = checkState(state, absmax, 'dequantize4bitRange');
  if (!Number.isInteger(start) || !Number.isInteger(count) || start < 0 || count < 0 || start + count > n) {
    throw new ShapeError(`dequantize4bitRange: range [${start}, ${start + count}) outside [0, ${n})`);
  }
  if (outOffset < 0 || outOffset + count > out.length) {
    throw new ShapeError(`dequantize4bitRange: output holds ${out.length} < ${outOffset + count} elements`);
  }
  const code = code4bit(state.quantType);
  const p = state.packed;
  const bs = state.blocksize;
  const end = start + count;
  let i = start;
  while (i < end) {
    const b = Math.floor(i / bs);
    const s = absmax[b]!;
    const blockEnd = Math.min(end, (b + 1) * bs);
    for (; i < blockEnd; i++) {
      const byte = p[i >> 1]!;
      out[outOffset + i - start] = f(code[(i & 1) === 0 ? byte >> 4 : byte & 0x0f]! * s);
    }
  }
  return out;
}

/** Bytes a quant state takes in a safetensors file, tensors only (the JSON blob is extra, ~150 B). */
export function quantStateBytes(state: QuantState4bit): number {
  const a = state.absmax;
  const tensors = state.packed.length + state.quantMap.length * 4;
  if (!isDoubleQuant(a)) return tensors + a.length * 4;
  return tensors + a.quantizedAbsmax.length + a.nestedAbsmax.length * 4 + a.nestedQuantMap.length * 4;
}

/** Options for the storage accounting of a 4-bit tensor. */
export interface Storage4bitOptions {
  blocksize?: number;
  doubleQuant?: boolean;
  /** Count the per-tensor constants: the 16-value map and, with double quantization, the 256-value map. */
  perTensorConstants?: boolean;
}

/**
 * Bytes one 4-bit tensor of n elements takes on disk and in memory: ceil(n/2) packed bytes plus the
 * scales (float32 absmax per block; or uint8 per block + float32 per 256 blocks with double quantization),
 * and optionally the per-tensor maps. The JSON blob (~150 B) is not counted.
 */
export function storageBytes4bit(n: number, opts: Storage4bitOptions = {}): number {
  const bs = opts.blocksize ?? 64;
  const nblocks = Math.ceil(n / bs);
  let bytes = Math.ceil(n / 2);
  if (opts.doubleQuant) {
    bytes += nblocks + Math.ceil(nblocks / NESTED_BLOCKSIZE) * 4;
    if (opts.perTensorConstants) bytes += 16 * 4 + 256 * 4;
  } else {
    bytes += nblocks * 4;
    if (opts.perTensorConstants) bytes += 16 * 4;
  }
  return bytes;
}

/**
 * Storage bits per weight (storageBytes4bit * 8 / n). For large n: 4 + 32/blocksize without double
 * quantization (4.5 at 64); 4 + 8/blocksize + 32/(blocksize*256) with it (4.126953125 at 64, the
 * QLoRA paper's 4.127).
 */
export function bitsPerParam4bit(n: number, opts: Storage4bitOptions = {}): number {
  return (storageBytes4bit(n, opts) * 8) / n;
}
