// TypeScript reference kernel for dropout: the counter-based mask specified in ../kernels/dropout.ts.

import type { Tensor } from '../../core/tensor.ts';
import type { DropoutKernels } from '../kernels/dropout.ts';
import { f32 } from './js-core.ts';

/** MurmurHash3's 32-bit finaliser. */
function fmix32(h: number): number {
  h ^= h >>> 16;
  h = Math.imul(h, 0x85ebca6b);
  h ^= h >>> 13;
  h = Math.imul(h, 0xc2b2ae35);
  h ^= h >>> 16;
  return h >>> 0;
}

/** The uniform 32-bit draw for element i under the key (key0, key1). */
export function dropoutBits(i: number, key0: number, key1: number): number {
  return fmix32((fmix32((i ^ key0) >>> 0) ^ key1) >>> 0);
}

/** Draws at or above this are kept: ceil(p * 2^32), exact in double precision. */
export function dropoutThreshold(p: number): number {
  return Math.ceil(p * 4294967296);
}

function dropout(x: Tensor, out: Tensor, p: number, key0: number, key1: number): void {
  const xd = f32(x);
  const o = f32(out);
  const n = out.size;
  const threshold = dropoutThreshold(p);
  const scale = p < 1 ? 1 / (1 - p) : 0;
  for (let i = 0; i < n; i++)
    o[out.offset + i] = dropoutBits(i, key0, key1) >= threshold ? xd[x.offset + i]! * scale : 0;
}

export const jsDropoutKernels: DropoutKernels = { dropout };
