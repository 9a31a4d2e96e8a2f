// Loss kernels: cross-entropy fused with log-softmax (as llm.c and Unsloth). The forward keeps only the
// per-row log-sum-exp; the backward writes (softmax - onehot) * scale straight into the one logits-sized
// gradient buffer, so no probability tensor and no second logits-sized temporary ever exists.

import type { Tensor } from '../../core/tensor.ts';

/** 'mean' averages over the counted (non-ignored) rows, 'sum' adds them, 'none' gives one loss per row. */
export type LossReduction = 'mean' | 'sum' | 'none';

export interface LossKernels {
  /**
   * logits: contiguous f32 [rows, vocab]. targets: contiguous i32, `rows` elements (any shape: error messages
   * name the position in it); a target equal to ignoreIndex is not counted.
   * Writes lse (contiguous f32 [rows]): log(sum(exp(logits[r, :]))) for counted rows, 0 for ignored ones.
   * Writes loss: for 'none' contiguous f32 [rows], lse[r] - logits[r, target[r]] (0 for ignored rows);
   * for 'sum' one f32, the sum of those; for 'mean' one f32, the sum divided by the number of counted rows,
   * 0 when no row is counted (never NaN).
   * Throws IndexError naming the position and value of a target outside [0, vocab) that is not ignoreIndex,
   * before writing anything.
   */
  crossEntropyForward(
    logits: Tensor,
    targets: Tensor,
    lse: Tensor,
    loss: Tensor,
    rows: number,
    vocab: number,
    ignoreIndex: number,
    reduction: LossReduction,
  ): void;
  /**
   * dlogits[r, j] = (exp(logits[r, j] - lse[r]) - (j == target[r])) * s_r, where s_r = gradOut[r] for 'none',
   * gradOut[0] for 'sum', gradOut[0] / count for 'mean' (count = counted rows); ignored rows get 0.
   * gradOut: contiguous f32, [rows] for 'none', one element otherwise. dlogits: contiguous f32
   * [rows, vocab], every element written (it may be the only logits-sized buffer the backward allocates).
   */
  crossEntropyBackward(
    gradOut: Tensor,
    logits: Tensor,
    targets: Tensor,
    lse: Tensor,
    dlogits: Tensor,
    rows: number,
    vocab: number,
    ignoreIndex: number,
    reduction: LossReduction,
  ): void;
}
