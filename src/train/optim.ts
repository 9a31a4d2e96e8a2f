// AdamW with decoupled weight decay, gradient clipping by global norm, and learning-rate schedules
// (constant, linear, cosine, with warmup) as transformers defines them.

import { getBackend } from '../backend/index.ts';
import { ConfigError } from '../core/errors.ts';
import { keep } from '../core/scope.ts';
import type { Tensor } from '../core/tensor.ts';
import { empty } from '../ops/create.ts';

export interface AdamWOptions {
  lr: number;
  beta1?: number;
  beta2?: number;
  eps?: number;
  weightDecay?: number;
}

export interface AdamWState {
  step: number;
  /** Per parameter name: first and second moments (f32 arrays). */
  moments: Record<string, { m: Float32Array; v: Float32Array }>;
}

export class AdamW {
  readonly beta1: number;
  readonly beta2: number;
  readonly eps: number;
  readonly weightDecay: number;
  lr: number;
  stepCount = 0;
  private readonly m = new Map<string, Tensor>();
  private readonly v = new Map<string, Tensor>();

  constructor(
    readonly params: readonly [string, Tensor][],
    o: AdamWOptions,
  ) {
    this.lr = o.lr;
    this.beta1 = o.beta1 ?? 0.9;
    this.beta2 = o.beta2 ?? 0.999;
    this.eps = o.eps ?? 1e-8;
    this.weightDecay = o.weightDecay ?? 0;
    for (const [name, p] of params) {
      if (p.dtype !== 'f32') throw new ConfigError(`AdamW: trainable parameter '${name}' must be f32, got ${p.dtype}`);
      this.m.set(name, keep(empty(p.shape)));
      this.v.set(name, keep(empty(p.shape)));
    }
  }

  /** One update with the gradients in each parameter's .grad, multiplied by gradScale first. */
  step(gradScale = 1): void {
    this.stepCount++;
    const b = getBackend();
    for (const [name, p] of this.params) {
      if (!p.grad) continue;
      b.adamwStep(p, p.grad, this.m.get(name)!, this.v.get(name)!, {
        lr: this.lr,
        beta1: this.beta1,
        beta2: this.beta2,
        eps: this.eps,
        weightDecay: this.weightDecay,
        step: this.stepCount,
        gradScale,
      });
    }
  }

  zeroGrad(): void {
    for (const [, p] of this.params) {
      p.grad?.dispose();
      p.grad = null;
    }
  }

  state(): AdamWState {
    const moments: AdamWState['moments'] = {};
    for (const [name] of this.params) moments[name] = { m: this.m.get(name)!.toF32(), v: this.v.get(name)!.toF32() };
    return { step: this.stepCount, moments };
  }

  loadState(s: AdamWState): void {
    this.stepCount = s.step;
    for (const [name] of this.params) {
      const st = s.moments[name];
      if (!st) throw new ConfigError(`optimizer state has no moments for '${name}' (checkpoint from another config?)`);
      const m = this.m.get(name)!;
      const v = this.v.get(name)!;
      if (st.m.length !== m.size) throw new ConfigError(`optimizer state for '${name}' has the wrong size`);
      (m.data as Float32Array).set(st.m);
      (v.data as Float32Array).set(st.v);
    }
  }

  dispose(): void {
    for (const t of [...this.m.values(), ...this.v.values()]) t.dispose();
  }
}

/** The global L2 norm of the gradients (with each .grad scaled by `scale`). */
export function gradNorm(params: readonly [string, Tensor][], scale = 1): number {
  const b = getBackend();
  let s = 0;
  for (const [, p] of params) if (p.grad) s += b.sumSquares(p.grad);
  return Math.sqrt(s) * Math.abs(scale);
}

/** The factor that clips a global norm to maxNorm (PyTorch: maxNorm / (norm + 1e-6) when above). */
export function clipFactor(norm: number, maxNorm: number): number {
  if (!(maxNorm > 0) || norm <= maxNorm) return 1;
  return maxNorm / (norm + 1e-6);
}

export type SchedulerType = 'constant' | 'linear' | 'cosine' | 'constant_with_warmup';

/** The learning-rate multiplier at `step` (0-based) as transformers' get_scheduler computes it. */
export function lrLambda(type: SchedulerType, step: number, warmup: number, total: number): number {
  if (step < warmup) return type === 'constant' ? 1 : step / Math.max(1, warmup);
  if (type === 'constant' || type === 'constant_with_warmup') return 1;
  const progress = (step - warmup) / Math.max(1, total - warmup);
  if (type === 'linear') return Math.max(0, (total - step) / Math.max(1, total - warmup));
  return Math.max(0, 0.5 * (1 + Math.cos(Math.PI * 0.5 * 2 * progress)));
}
