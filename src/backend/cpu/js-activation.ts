// TypeScript reference kernels for activations: SwiGLU, GELU (erf and tanh forms), softmax, log-softmax.
// Transcendentals in f64, row sums in f64.

import type { Tensor } from '../../core/tensor.ts';
import type { ActivationKernels, GeluApproximate } from '../kernels/activation.ts';
import { f32 } from './js-core.ts';

const TWO_OVER_SQRT_PI = 2 / Math.sqrt(Math.PI);
const SQRT_2_OVER_PI = Math.sqrt(2 / Math.PI);
const INV_SQRT_2 = Math.SQRT1_2;
const INV_SQRT_2PI = 1 / Math.sqrt(2 * Math.PI);
const GELU_TANH_C = 0.044715;

/**
 * The error function to about 1e-16 relative error. For |x| < 6 the series
 * erf(x) = 2/sqrt(pi) * exp(-x^2) * sum_n 2^n x^(2n+1) / (1*3*...*(2n+1)) has only positive terms (no
 * cancellation); beyond, erfc(6) < 3e-17, so erf is +-1 in double precision.
 */
export function erf(x: number): number {
  if (Number.isNaN(x)) return x;
  const ax = Math.abs(x);
  if (ax >= 6) return Math.sign(x);
  const x2 = ax * ax;
  let term = ax;
  let sum = ax;
  for (let n = 1; term > sum * 1e-17; n++) {
    term *= (2 * x2) / (2 * n + 1);
    sum += term;
  }
  const r = TWO_OVER_SQRT_PI * Math.exp(-x2) * sum;
  return x < 0 ? -r : r;
}

function sigmoid(v: number): number {
  return 1 / (1 + Math.exp(-v));
}

function swigluForward(gate: Tensor, up: Tensor, out: Tensor): void {
  const a = f32(gate);
  const b = f32(up);
  const o = f32(out);
  const n = out.size;
  for (let i = 0; i < n; i++) {
    const v = a[gate.offset + i]!;
    o[out.offset + i] = v * sigmoid(v) * b[up.offset + i]!;
  }
}

function swigluBackward(g: Tensor, gate: Tensor, up: Tensor, dGate: Tensor | null, dUp: Tensor | null): void {
  const gd = f32(g);
  const a = f32(gate);
  const b = f32(up);
  const da = dGate ? f32(dGate) : null;
  const db = dUp ? f32(dUp) : null;
  const n = g.size;
  for (let i = 0; i < n; i++) {
    const v = a[gate.offset + i]!;
    const s = sigmoid(v);
    const gi = gd[g.offset + i]!;
    if (da && dGate) da[dGate.offset + i] = gi * b[up.offset + i]! * s * (1 + v * (1 - s));
    if (db && dUp) db[dUp.offset + i] = gi * v * s;
  }
}

function gelu(v: number, approximate: GeluApproximate): number {
  if (approximate === 'tanh') return 0.5 * v * (1 + Math.tanh(SQRT_2_OVER_PI * (v + GELU_TANH_C * v * v * v)));
  return 0.5 * v * (1 + erf(v * INV_SQRT_2));
}

function geluGrad(v: number, approximate: GeluApproximate): number {
  if (approximate === 'tanh') {
    const t = Math.tanh(SQRT_2_OVER_PI * (v + GELU_TANH_C * v * v * v));
    return 0.5 * (1 + t) + 0.5 * v * (1 - t * t) * SQRT_2_OVER_PI * (1 + 3 * GELU_TANH_C * v * v);
  }
  // Phi(v) + v * phi(v)
  return 0.5 * (1 + erf(v * INV_SQRT_2)) + v * INV_SQRT_2PI * Math.exp(-0.5 * v * v);
}

function geluForward(x: Tensor, out: Tensor, approximate: GeluApproximate): void {
  const xd = f32(x);
  const o = f32(out);
  const n = out.size;
  for (let i = 0; i < n; i++) o[out.offset + i] = gelu(xd[x.offset + i]!, approximate);
}

function geluBackward(g: Tensor, x: Tensor, dx: Tensor, approximate: GeluApproximate): void {
  const gd = f32(g);
  const xd = f32(x);
  const o = f32(dx);
  const n = dx.size;
  for (let i = 0; i < n; i++) o[dx.offset + i] = gd[g.offset + i]! * geluGrad(xd[x.offset + i]!, approximate);
}

/** Row maximum and sum(exp(x - max)) in f64; max is -inf for an all -inf (or empty) row. */
function rowStats(xd: Float32Array, base: number, cols: number): [number, number] {
  let m = Number.NEGATIVE_INFINITY;
  for (let j = 0; j < cols; j++) {
    const v = xd[base + j]!;
    if (v > m || Number.isNaN(v)) m = v;
  }
  if (m === Number.NEGATIVE_INFINITY) return [m, 0];
  let s = 0;
  for (let j = 0; j < cols; j++) s += Math.exp(xd[base + j]! - m);
  return [m, s];
}

function softmaxForward(x: Tensor, out: Tensor, rows: number, cols: number): void {
  const xd = f32(x);
  const o = f32(out);
  for (let r = 0; r < rows; r++) {
    const xb = x.offset + r * cols;
    const ob = out.offset + r * cols;
    const [m, s] = rowStats(xd, xb, cols);
    if (m === Number.NEGATIVE_INFINITY) {
      o.fill(0, ob, ob + cols);
      continue;
    }
    const inv = 1 / s;
    for (let j = 0; j < cols; j++) o[ob + j] = Math.exp(xd[xb + j]! - m) * inv;
  }
}

function softmaxBackward(g: Tensor, y: Tensor, dx: Tensor, rows: number, cols: number): void {
  const gd = f32(g);
  const yd = f32(y);
  const o = f32(dx);
  for (let r = 0; r < rows; r++) {
    const gb = g.offset + r * cols;
    const yb = y.offset + r * cols;
    const ob = dx.offset + r * cols;
    let dot = 0;
    for (let j = 0; j < cols; j++) dot += gd[gb + j]! * yd[yb + j]!;
    for (let j = 0; j < cols; j++) o[ob + j] = yd[yb + j]! * (gd[gb + j]! - dot);
  }
}

function logSoftmaxForward(x: Tensor, out: Tensor, rows: number, cols: number): void {
  const xd = f32(x);
  const o = f32(out);
  for (let r = 0; r < rows; r++) {
    const xb = x.offset + r * cols;
    const ob = out.offset + r * cols;
    const [m, s] = rowStats(xd, xb, cols);
    if (m === Number.NEGATIVE_INFINITY) {
      o.fill(Number.NEGATIVE_INFINITY, ob, ob + cols);
      continue;
    }
    const lse = m + Math.log(s);
    for (let j = 0; j < cols; j++) o[ob + j] = xd[xb + j]! - lse;
  }
}

function logSoftmaxBackward(g: Tensor, y: Tensor, dx: Tensor, rows: number, cols: number): void {
  const gd = f32(g);
  const yd = f32(y);
  const o = f32(dx);
  for (let r = 0; r < rows; r++) {
    const gb = g.offset + r * cols;
    const yb = y.offset + r * cols;
    const ob = dx.offset + r * cols;
    let gs = 0;
    for (let j = 0; j < cols; j++) gs += gd[gb + j]!;
    for (let j = 0; j < cols; j++) o[ob + j] = gd[gb + j]! - Math.exp(yd[yb + j]!) * gs;
  }
}

export const jsActivationKernels: ActivationKernels = {
  swigluForward,
  swigluBackward,
  geluForward,
  geluBackward,
  softmaxForward,
  softmaxBackward,
  logSoftmaxForward,
  logSoftmaxBackward,
};
