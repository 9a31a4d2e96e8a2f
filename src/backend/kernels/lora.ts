// LoRA kernels. DoRA needs the row norms of the adapted weight, ||W + s B A||, every forward (PEFT computes
// them by materialising the full [out, in] matrix); this kernel computes them row by row without that copy.
// The LoRA products themselves are gemms (core kernels), and mixed-adapter batches use gatherRows and
// scatterAddRows around them.

import type { Tensor } from '../../core/tensor.ts';

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
}
