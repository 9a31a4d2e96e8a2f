// Normalisation kernels: RMSNorm (Llama, Mistral, Qwen2/3, and Qwen3's per-head q/k norm) as one fused
// forward and one fused backward, as llm.c does. Layout: x is viewed as [rows, dim]; the normalised axis is
// the last one, so any leading shape ([N, D], [B, T, D], [B, T, H, D]) folds into rows.

import type { Tensor } from '../../core/tensor.ts';

export interface NormKernels {
  /**
   * y[r, :] = x[r, :] * rstd[r] * w, with rstd[r] = 1 / sqrt(mean(x[r, :]^2) + eps) (Hugging Face Llama
   * semantics: the normalisation in f32, then times the weight).
   * x: contiguous f32, rows*dim elements. w: contiguous [dim], f32, bf16 or f16 (converted while read).
   * y: contiguous f32, rows*dim (written). rstd: contiguous f32 [rows] (written; saved for the backward).
   */
  rmsNormForward(x: Tensor, w: Tensor, y: Tensor, rstd: Tensor, rows: number, dim: number, eps: number): void;
  /**
   * The gradients of rmsNormForward for the incoming gradient g (contiguous f32, rows*dim):
   *   dx[r, j] = rstd[r] * (g[r, j] * w[j] - x[r, j] * rstd[r]^2 * mean_k(g[r, k] * w[k] * x[r, k]))
   *   dw[j]    = sum_r g[r, j] * x[r, j] * rstd[r]
   * dx (contiguous f32, rows*dim) and dw (contiguous f32 [dim]) are written (not accumulated); either may be
   * null, and then it is not computed (a frozen norm weight costs nothing).
   */
  rmsNormBackward(
    g: Tensor,
    x: Tensor,
    w: Tensor,
    rstd: Tensor,
    dx: Tensor | null,
    dw: Tensor | null,
    rows: number,
    dim: number,
  ): void;
}
