// Reference optimizer kernels.

import type { Tensor } from '../../core/tensor.ts';
import type { AdamWArgs, OptimKernels } from '../kernels/optim.ts';
import { f32 } from './js-core.ts';

function adamwStep(p: Tensor, g: Tensor, m: Tensor, v: Tensor, a: AdamWArgs): void {
  const pd = f32(p);
  const gd = f32(g);
  const md = f32(m);
  const vd = f32(v);
  const n = p.size;
  const bc1 = 1 - a.beta1 ** a.step;
  const bc2 = 1 - a.beta2 ** a.step;
  const stepSize = a.lr / bc1;
  const decay = 1 - a.lr * a.weightDecay;
  const po = p.offset;
  const go = g.offset;
  const mo = m.offset;
  const vo = v.offset;
  for (let i = 0; i < n; i++) {
    const gi = gd[go + i]! * a.gradScale;
    const mi = a.beta1 * md[mo + i]! + (1 - a.beta1) * gi;
    const vi = a.beta2 * vd[vo + i]! + (1 - a.beta2) * gi * gi;
    md[mo + i] = mi;
    vd[vo + i] = vi;
    const denom = Math.sqrt(vi / bc2) + a.eps;
    pd[po + i] = pd[po + i]! * decay - (stepSize * mi) / denom;
  }
}

function sumSquares(x: Tensor): number {
  const d = f32(x);
  let s = 0;
  for (let i = x.offset, e = x.offset + x.size; i < e; i++) s += d[i]! * d[i]!;
  return s;
}

export const jsOptimKernels: OptimKernels = { adamwStep, sumSquares };
