// TypeScript reference kernels for RMSNorm: plain loops, row sums in f64.

import type { Tensor } from '../../core/tensor.ts';
import type { NormKernels } from '../kernels/norm.ts';
import { f32, reader } from './js-core.ts';

/** The weight as f64 values (dim is small: one row, never a whole matrix). */
function weightRow(w: Tensor, dim: number): Float64Array {
  const rw = reader(w);
  const out = new Float64Array(dim);
  for (let j = 0; j < dim; j++) out[j] = rw(w.offset + j);
  return out;
}

function rmsNormForward(x: Tensor, w: Tensor, y: Tensor, rstd: Tensor, rows: number, dim: number, eps: number): void {
  const xd = f32(x);
  const yd = f32(y);
  const rd = f32(rstd);
  const wv = weightRow(w, dim);
  for (let r = 0; r < rows; r++) {
    const xb = x.offset + r * dim;
    const yb = y.offset + r * dim;
    let ss = 0;
    for (let j = 0; j < dim; j++) {
      const v = xd[xb + j]!;
      ss += v * v;
    }
    // rstd rounded to f32 first: the saved value and the one used here must agree exactly
    const s = Math.fround(1 / Math.sqrt(ss / dim + eps));
    rd[rstd.offset + r] = s;
    for (let j = 0; j < dim; j++) yd[yb + j] = Math.fround(xd[xb + j]! * s) * wv[j]!;
  }
}

function rmsNormBackward(
  g: Tensor,
  x: Tensor,
  w: Tensor,
  rstd: Tensor,
  dx: Tensor | null,
  dw: Tensor | null,
  rows: number,
  dim: number,
): void {
  const gd = f32(g);
  const xd = f32(x);
  const rd = f32(rstd);
  const wv = weightRow(w, dim);
  const dwAcc = dw ? new Float64Array(dim) : null;
  const dxd = dx ? f32(dx) : null;
  for (let r = 0; r < rows; r++) {
    const gb = g.offset + r * dim;
    const xb = x.offset + r * dim;
    const s = rd[rstd.offset + r]!;
    if (dwAcc) for (let j = 0; j < dim; j++) dwAcc[j] += gd[gb + j]! * xd[xb + j]! * s;
    if (dxd && dx) {
      let dot = 0;
      for (let j = 0; j < dim; j++) dot += gd[gb + j]! * wv[j]! * xd[xb + j]!;
      const c = (s * s * dot) / dim;
      const db = dx.offset + r * dim;
      for (let j = 0; j < dim; j++) dxd[db + j] = s * (gd[gb + j]! * wv[j]! - xd[xb + j]! * c);
    }
  }
  if (dw && dwAcc) {
    const dwd = f32(dw);
    for (let j = 0; j < dim; j++) dwd[dw.offset + j] = dwAcc[j]!;
  }
}

export const jsNormKernels: NormKernels = { rmsNormForward, rmsNormBackward };
