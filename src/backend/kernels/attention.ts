// Fused causal self-attention kernels with grouped-query heads (flash-attention style: the forward keeps only
// the per-row log-sum-exp, the backward recomputes the probabilities from it; no Tq x Tk matrix is stored).
//
// Layouts: q [B, Tq, Hq, D]; k, v [B, Tk, Hkv, D], all f32, bf16 or f16, any strides with the last dim's
// stride 1 (k and v may be the first Tk positions of a larger KV cache). Hq is a multiple of Hkv: query head
// h reads kv head floor(h / (Hq / Hkv)). Query i (0-based in Tq, Tq <= Tk) sits at absolute position
// p = Tk - Tq + i and sees key j when
//   j <= p                                     (causal)
//   and keyMask[b, j] != 0                     (if keyMask: u8 or i32 [B, Tk], contiguous; 0 = padding)
//   and seqIds[b, j] == seqIds[b, p]           (if seqIds: i32 [B, Tk], contiguous; packed sequences)
//   and j > p - window                         (if window > 0: sliding window of `window` keys, self included)
// scores s_j = scale * q_i . k_j; out_i = softmax(s) @ v; lse_i = log sum_j exp(s_j). A row that sees no
// key gets out_i = 0 and lse_i = -Infinity (and no gradient).

import type { Tensor } from '../../core/tensor.ts';

export interface AttentionArgs {
  q: Tensor;
  k: Tensor;
  v: Tensor;
  scale: number;
  keyMask: Tensor | null;
  seqIds: Tensor | null;
  /** Sliding-window size in keys (0 = unlimited). */
  window: number;
}

export interface AttentionKernels {
  /** Writes out (contiguous f32 [B, Tq, Hq, D]) and lse (contiguous f32 [B, Hq, Tq]). */
  attentionForward(a: AttentionArgs, out: Tensor, lse: Tensor): void;
  /**
   * From the forward's out and lse and the output gradient gOut (contiguous f32 [B, Tq, Hq, D]), overwrites
   * dq (contiguous f32, q's shape), dk and dv (contiguous f32, k's shape; summed over the query heads that
   * share a kv head). A null output is not computed.
   */
  attentionBackward(
    a: AttentionArgs,
    out: Tensor,
    lse: Tensor,
    gOut: Tensor,
    dq: Tensor | null,
    dk: Tensor | null,
    dv: Tensor | null,
  ): void;
}
