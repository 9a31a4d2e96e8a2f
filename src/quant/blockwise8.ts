// 8-bit blockwise quantization over a sorted 256-value code (bitsandbytes quantize_blockwise /
// dequantize_blockwise), used by double quantization for the 4-bit absmax values.
//
// Semantics follow the CUDA kernel kQuantizeBlockwise<..., General8bit> with dQuantize<0>
// (bitsandbytes csrc/kernels.cu): per block absmax = max|x| in float32, then each x is multiplied by the
// float32 reciprocal 1/absmax and mapped to a code by a 7-step binary search plus a midpoint test.

import { ConfigError } from '../core/errors.ts';

const f = Math.fround;

/**
 * The code index bitsandbytes' dQuantize<0> picks for x (already scaled to [-1, 1]) in a sorted
 * 256-entry code. It is the nearest code except on an exact midpoint, where it goes to whichever side
 * the binary search ended on; NaN maps to 0. Midpoints are computed in float32 as (a + b) * 0.5.
 */
export function quantizeToCode8(code: Float32Array, x: number): number {
  let pivot = 127;
  let upperPivot = 255;
  let lowerPivot = 0;
  let lower = -1.0;
  let upper = 1.0;
  let val = code[pivot]!;
  for (let i = 64; i > 0; i >>= 1) {
    if (x > val) {
      lowerPivot = pivot;
      lower = val;
      pivot += i;
    } else {
      upperPivot = pivot;
      upper = val;
      pivot -= i;
    }
    val = code[pivot]!;
  }
  if (upperPivot === 255) upper = code[upperPivot]!;
  if (lowerPivot === 0) lower = code[lowerPivot]!;
  if (x > val) {
    const midpoint = f(f(upper + val) * 0.5);
    return x > midpoint ? upperPivot : pivot;
  }
  const midpoint = f(f(lower + val) * 0.5);
  return x < midpoint ? lowerPivot : pivot;
}

export interface Blockwise8 {
  /** One code index per value. */
  q: Uint8Array;
  /** max|x| per block of `blocksize` consecutive values (the last block may be partial), float32. */
  absmax: Float32Array;
}

/** quantize_blockwise(values, code, blocksize): blocks of consecutive values, absmax in float32. */
export function quantizeBlockwise8(values: Float32Array, code: Float32Array, blocksize: number): Blockwise8 {
  checkCode256(code);
  if (!Number.isInteger(blocksize) || blocksize <= 0) {
    throw new ConfigError(`quantizeBlockwise8: blocksize must be a positive integer, got ${blocksize}`);
  }
  const n = values.length;
  const nblocks = Math.ceil(n / blocksize);
  const q = new Uint8Array(n);
  const absmax = new Float32Array(nblocks);
  for (let b = 0; b < nblocks; b++) {
    const start = b * blocksize;
    const end = Math.min(n, start + blocksize);
    let m = 0;
    for (let i = start; i < end; i++) {
      const a = Math.abs(values[i]!);
      if (a > m) m = a; // as fmaxf: a NaN never wins
    }
    absmax[b] = m;
    const inv = f(1 / m); // Infinity for an all-zero block: 0 * Infinity = NaN -> code 0, decoded as 0
    for (let i = start; i < end; i++) q[i] = quantizeToCode8(code, f(values[i]! * inv));
  }
  return { q, absmax };
}

/** dequantize_blockwise: code[q] * absmax[block] in float32. */
export function dequantizeBlockwise8(
  q: Uint8Array,
  absmax: Float32Array,
  code: Float32Array,
  blocksize: number,
  out: Float32Array = new Float32Array(q.length),
): Float32Array {
  checkCode256(code);
  if (absmax.length !== Math.ceil(q.length / blocksize)) {
    throw new ConfigError(
      `dequantizeBlockwise8: ${q.length} codes in blocks of ${blocksize} need ${Math.ceil(q.length / blocksize)} absmax values, got ${absmax.length}`,
    );
  }
  for (let i = 0; i < q.length; i++) out[i] = f(code[q[i]!]! * absmax[Math.floor(i / blocksize)]!);
  return out;
}

function checkCode256(code: Float32Array): void {
  if (code.length !== 256) throw new ConfigError(`8-bit blockwise code must have 256 values, got ${code.length}`);
}
