// Rotary position embedding kernels (HF Llama convention, "rotate_half"): for a head vector x of D dims with
// rotary_dim R = 2 * half (R <= D), pair dim j with dim j + half (j < half), at angle a = pos * invFreq[j]:
//   y[j]        = x[j] * cos a - x[j + half] * sin a
//   y[j + half] = x[j + half] * cos a + x[j] * sin a
// and y[R..D) = x[R..D) (partial rotary passes the tail through). The backward is the inverse rotation
// (angle -a) applied to the output gradient. Scaling variants (linear, llama3) are folded into invFreq.

import type { Tensor } from '../../core/tensor.ts';

export interface RopeKernels {
  /**
   * out = rope(x). x and out: contiguous f32 [B, T, H, D] (out may be x itself: in place).
   * positions: contiguous i32 [B, T] (any integer, no upper bound: angles are computed on the fly as
   * f32(pos * invFreq[j]), as HF does in f32). invFreq: contiguous f32 [half], rotary_dim = 2 * half <= D.
   */
  ropeForward(x: Tensor, positions: Tensor, invFreq: Tensor, out: Tensor): void;
  /** gx = rope^-1(g): the rotation by -angle. Same layouts as ropeForward (gx may be g itself). */
  ropeBackward(g: Tensor, positions: Tensor, invFreq: Tensor, gx: Tensor): void;
}
