// Dropout kernel: inverted dropout with a counter-based mask, so the mask is never stored. The op draws two
// 32-bit key words from a seeded Rng; the kernel decides element i from (key, i) alone, so the backward
// regenerates exactly the forward's mask, and every backend (JS, native, CUDA) produces the same bits.
//
// The mask, exactly (all arithmetic on unsigned 32-bit integers, i the row-major element index mod 2^32):
//   fmix32(h) = h ^= h >> 16; h *= 0x85ebca6b; h ^= h >> 13; h *= 0xc2b2ae35; h ^= h >> 16   (MurmurHash3)
//   u(i)      = fmix32(fmix32(i ^ key0) ^ key1)
//   keep(i)   = u(i) >= ceil(p * 2^32)                     (threshold computed exactly, in double precision)
// so an element is kept with probability 1 - p (p = 1 keeps none).

import type { Tensor } from '../../core/tensor.ts';

export interface DropoutKernels {
  /**
   * out[i] = keep(i) ? x[i] * (1 / (1 - p)) : 0, with keep as above (p = 1: all zeros). x and out
   * contiguous f32, same size. The backward is this same kernel applied to the gradient with the same keys.
   */
  dropout(x: Tensor, out: Tensor, p: number, key0: number, key1: number): void;
}
