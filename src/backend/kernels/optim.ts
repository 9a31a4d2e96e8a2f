// Optimizer kernels: the fused AdamW update and the squared norm used for gradient clipping.

import type { Tensor } from '../../core/tensor.ts';

export interface AdamWArgs {
  lr: number;
  beta1: number;
  beta2: number;
  eps: number;
  weightDecay: number;
  /** 1-based step count (for bias correction). */
  step: number;
  /** Multiplies the gradient first (gradient clipping and accumulation averaging folded in). */
  gradScale: number;
}

export interface OptimKernels {
  /**
   * Decoupled-weight-decay Adam (Loshchilov & Hutter; PyTorch's AdamW): p -= lr*wd*p; m = b1 m + (1-b1) g;
   * v = b2 v + (1-b2) g²; p -= lr * m̂ / (sqrt(v̂) + eps). p, m, v f32 contiguous (p may be bf16/f16 is not
   * supported: trainable weights are f32); g f32 contiguous of the same size.
   */
  adamwStep(p: Tensor, g: Tensor, m: Tensor, v: Tensor, a: AdamWArgs): void;
  /** Sum of squares of a contiguous f32 tensor (f64 accumulation). */
  sumSquares(x: Tensor): number;
}
