// LoRA kernels. DoRA needs the row norms of the adapted weight, ||W + s B A||, every forward (PEFT computes
// them by materialising the full [out, in] matrix); this kernel computes them row by row without that copy.
// The LoRA products of training are gemms (core kernels). Mixed-adapter batches without gradients (serving,
// per-row generation) take every adapter group of one projection in a single loraRows call (Punica's SGMV):
// the per-group gathers, products and scatters of the gemm path cost more than the arithmetic on small models.

import type { Tensor } from '../../core/tensor.ts';

/** One adapter of a loraRows call. */
export interface LoraRowsGroup {
  /** lora_A, contiguous f32 [r, inF]. */
  a: Tensor;
  /** lora_B, contiguous f32 [outF, r]. */
  b: Tensor;
  /** The scaling s. */
  scale: number;
  /** lora_B's bias, contiguous f32 [outF] (added as s * bias), or null. */
  loraBias: Tensor | null;
}

export interface LoraKernels {
  /**
   * out[o] = sqrt(sum_i (W[o, i] + scale * sum_j B[o, j] * A[j, i])^2) for o < outF, i < inF, j < r.
   * W: contiguous, f32, bf16 or f16 (converted while read), laid out [outF, inF], or [inF, outF] when
   * wTransposed (an embedding table seen as its transpose). A: contiguous f32 [r, inF]. B: contiguous f32 [outF, r].
   * out: contiguous f32 [outF] (written). Accumulates in f64.
   */
  loraWeightNorm(
    w: Tensor,
    a: Tensor,
    b: Tensor,
    scale: number,
    out: Tensor,
    outF: number,
    inF: number,
    r: number,
    wTransposed: boolean,
  ): void;
  /**
   * Mixed-adapter rows: for every row i with g = rowGroup[i] >= 0 (-1: the row is left alone),
   *   out[i] = (out[i] + s_g b_g) + s_g (x[i] A_g^T) B_g^T
   * with each row computed exactly as the two gemms a row takes alone (u = x A^T with beta 0, then
   * out += s u B^T with beta 1), bit for bit on this backend, whatever rows share the call. x: contiguous f32
   * [rows, inF]; out: contiguous f32 [rows, outF] holding the base output (added into); rowGroup: contiguous i32
   * [rows], values in [-1, groups.length).
   */
  loraRows(
    x: Tensor,
    out: Tensor,
    rowGroup: Tensor,
    groups: readonly LoraRowsGroup[],
    rows: number,
    inF: number,
    outF: number,
  ): void;
}
