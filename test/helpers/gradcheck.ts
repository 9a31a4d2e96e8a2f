// Central finite differences in f64 against the tape's gradients.
// The loss is L = sum(w * f(inputs)) with fixed random w, accumulated in f64 on the host, so the only f32
// rounding is in the op's own outputs.

import assert from 'node:assert/strict';
import { Rng } from '../../src/core/rng.ts';
import { tidy } from '../../src/core/scope.ts';
import { Tensor } from '../../src/core/tensor.ts';
import { tensor } from '../../src/ops/create.ts';
import { mul } from '../../src/ops/elementwise.ts';
import { sum } from '../../src/ops/reduce.ts';
import { backward, noGrad } from '../../src/ops/tape.ts';

export interface GradcheckOptions {
  eps?: number;
  atol?: number;
  rtol?: number;
  /** At most this many elements per input are perturbed (a seeded random subset). */
  maxChecks?: number;
  seed?: number;
}

export function randomTensor(shape: number[], rng: Rng, scale = 1, requiresGrad = true): Tensor {
  const n = shape.reduce((a, b) => a * b, 1);
  const v = new Float32Array(n);
  for (let i = 0; i < n; i++) v[i] = rng.normal() * scale;
  const t = Tensor.fromTyped(v, shape, 'f32');
  t.requiresGrad = requiresGrad;
  return t;
}

function weightedSum(out: Tensor, w: Float64Array): number {
  const o = out.toF32();
  let s = 0;
  for (let i = 0; i < o.length; i++) s += o[i]! * w[i]!;
  return s;
}

/** Checks d sum(w*f(...inputs)) / d input against central differences, for each input with requiresGrad. */
export function gradcheck(
  name: string,
  f: (...xs: Tensor[]) => Tensor,
  inputs: Tensor[],
  opts: GradcheckOptions = {},
): void {
  const eps = opts.eps ?? 1e-2;
  const atol = opts.atol ?? 2e-3;
  const rtol = opts.rtol ?? 2e-2;
  const rng = new Rng(opts.seed ?? 1234);
  for (const x of inputs)
    if (x.requiresGrad) {
      x.grad?.dispose();
      x.grad = null;
    }
  // analytic
  const wArr = tidy(() => {
    const out = f(...inputs);
    const w = new Float64Array(out.size);
    for (let i = 0; i < w.length; i++) w[i] = rng.normal();
    const wt = tensor(w, out.shape);
    const loss = sum(mul(out, wt));
    backward(loss);
    return w;
  });
  for (const [xi, x] of inputs.entries()) {
    if (!x.requiresGrad) continue;
    assert.ok(x.grad, `${name}: input ${xi} got no gradient`);
    const analytic = x.grad.toF32();
    const data = x.data as Float32Array;
    const n = x.size;
    const idx = [...Array(n).keys()];
    const maxChecks = opts.maxChecks ?? 64;
    const picks = n <= maxChecks ? idx : rng.shuffle(idx).slice(0, maxChecks);
    for (const i of picks) {
      const j = x.offset + i;
      const orig = data[j]!;
      data[j] = orig + eps;
      const lp = noGrad(() => tidy(() => weightedSum(f(...inputs), wArr)));
      data[j] = orig - eps;
      const lm = noGrad(() => tidy(() => weightedSum(f(...inputs), wArr)));
      data[j] = orig;
      const h = orig + eps - (orig - eps); // the step actually taken in f32
      const hp = Math.fround(orig + eps) - Math.fround(orig - eps);
      const fd = (lp - lm) / (hp || h);
      const a = analytic[i]!;
      const err = Math.abs(a - fd);
      assert.ok(
        err <= atol + rtol * Math.max(Math.abs(a), Math.abs(fd)),
        `${name}: input ${xi} element ${i}: analytic ${a} vs finite difference ${fd} (|diff| ${err.toExponential(2)})`,
      );
    }
    x.grad?.dispose();
    x.grad = null;
  }
}
