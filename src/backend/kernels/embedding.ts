// Embedding kernels: a row lookup of integer ids in a table, and its backward, a scatter-add into the table's
// gradient. The table may be f32, bf16 or f16 (converted while read); the output is f32.

import type { Tensor } from '../../core/tensor.ts';

export interface EmbeddingKernels {
  /**
   * out[i, :] = weight[ids[i], :] for i < ids.size. weight: contiguous [vocab, dim] (f32, bf16 or f16);
   * ids: contiguous i32 (any shape); out: contiguous f32 [ids.size, dim].
   * Throws IndexError naming the id and its position in ids when an id is outside [0, vocab), before writing.
   */
  embeddingForward(weight: Tensor, ids: Tensor, out: Tensor, vocab: number, dim: number): void;
  /**
   * dWeight[ids[i], :] += g[i, :] for every i whose id is not paddingIdx (paddingIdx < 0: none skipped),
   * adding in increasing i (deterministic). g: contiguous f32 [ids.size, dim]; dWeight: contiguous f32
   * [vocab, dim], accumulated into (the caller zero-fills it). The ids were checked by the forward.
   */
  embeddingBackward(g: Tensor, ids: Tensor, dWeight: Tensor, vocab: number, dim: number, paddingIdx: number): void;
}
