// LLM.int8()-style row-wise ("vector-wise") absmax 8-bit weights (Dettmers et al. 2022, arXiv 2208.07339),
// as bitsandbytes int8_vectorwise_quant / int8_vectorwise_dequant store them for Linear8bitLt:
// "P.weight" int8 [out, in] and "P.SCB" float32 [out], the per-row absmax.
//
// Semantics (bitsandbytes csrc/kernels.cu kInt8VectorQuant, backends/default/ops.py):
//   SCB[r] = max_c |W[r, c]|;  q = round_half_even(W * (127 / SCB[r]))  (float32);
//   dequant = q * SCB[r] * (1/127 as float32).
// A row of zeros has SCB 0 and quantizes to zeros (the kernel's NaN -> 0 conversion).
// Outlier decomposition (threshold > 0) is an activation-time matter and is not part of the stored weight.

import { ShapeError } from '../core/errors.ts';

const f = Math.fround;
const INV_127 = f(7.874015718698502e-3);

export interface Int8Rowwise {
  int8: Int8Array;
  /** Per-row absmax (bitsandbytes' SCB), float32. */
  scale: Float32Array;
}

function checkDims(len: number, rows: number, cols: number, where: string): void {
  if (!Number.isInteger(rows) || !Number.isInteger(cols) || rows < 0 || cols < 0 || rows * cols !== len) {
    throw new ShapeError(`${where}: ${len} elements do not form a [${rows}, ${cols}] matrix`);
  }
}

/** Round half to even, as torch.round and CUDA __float2int_rn. */
function roundHalfEven(x: number): number {
  const r = Math.round(x);
  return r - x === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

export function quantizeInt8Rowwise(w: Float32Array, rows: number, cols: number): Int8Rowwise {
  checkDims(w.length, rows, cols, 'quantizeInt8Rowwise');
  const int8 = new Int8Array(rows * cols);
  const scale = new Float32Array(rows);
  for (let r = 0; r < rows; r++) {
    const base = r * cols;
    let m = 0;
    for (let c = 0; c < cols; c++) {
      const a = Math.abs(w[base + c]!);
      if (a > m) m = a;
    }
    scale[r] = m;
    if (m === 0) continue;
    const s = f(127 / m);
    for (let c = 0; c < cols; c++) {
      const q = roundHalfEven(f(w[base + c]! * s));
      int8[base + c] = Number.isNaN(q) ? 0 : Math.max(-127, Math.min(127, q));
    }
  }
  return { int8, scale };
}

export function dequantizeInt8Rowwise(
  q: Int8Rowwise,
  rows: number,
  cols: number,
  out: Float32Array = new Float32Array(rows * cols),
): Float32Array {
  checkDims(q.int8.length, rows, cols, 'dequantizeInt8Rowwise');
  if (q.scale.length !== rows) {
    throw new ShapeError(`dequantizeInt8Rowwise: ${q.scale.length} row scales for ${rows} rows`);
  }
  for (let r = 0; r < rows; r++) {
    const s = q.scale[r]!;
    const base = r * cols;
    for (let c = 0; c < cols; c++) out[base + c] = f(f(q.int8[base + c]! * s) * INV_127);
  }
  return out;
}
