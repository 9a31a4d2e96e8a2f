// TypeScript reference kernels for embeddings: row lookup (converting the table's dtype while read) and the
// scatter-add backward, in increasing position order (deterministic).

import { IndexError } from '../../core/errors.ts';
import type { Tensor } from '../../core/tensor.ts';
import type { EmbeddingKernels } from '../kernels/embedding.ts';
import { f32, i32, reader } from './js-core.ts';

/** A flat element index of a tensor of the given shape as a position for messages: 5, or [1, 2] for n-D. */
export function fmtPosition(shape: readonly number[], flat: number): string {
  if (shape.length <= 1) return `${flat}`;
  const idx = new Array<number>(shape.length);
  let rest = flat;
  for (let d = shape.length - 1; d >= 0; d--) {
    idx[d] = rest % shape[d]!;
    rest = Math.floor(rest / shape[d]!);
  }
  return `[${idx.join(', ')}]`;
}

function embeddingForward(weight: Tensor, ids: Tensor, out: Tensor, vocab: number, dim: number): void {
  const id = i32(ids);
  const n = ids.size;
  for (let i = 0; i < n; i++) {
    const v = id[ids.offset + i]!;
    if (v < 0 || v >= vocab)
      throw new IndexError(
        `embedding: id ${v} at position ${fmtPosition(ids.shape, i)} of ids ${JSON.stringify(ids.shape)} is out of range [0, ${vocab})`,
      );
  }
  const o = f32(out);
  const wd = weight.data;
  const rw = reader(weight);
  const same = weight.dtype === 'f32';
  for (let i = 0; i < n; i++) {
    const src = weight.offset + id[ids.offset + i]! * dim;
    const dst = out.offset + i * dim;
    if (same) o.set(wd.subarray(src, src + dim), dst);
    else for (let j = 0; j < dim; j++) o[dst + j] = rw(src + j);
  }
}

function embeddingBackward(
  g: Tensor,
  ids: Tensor,
  dWeight: Tensor,
  _vocab: number,
  dim: number,
  paddingIdx: number,
): void {
  const id = i32(ids);
  const gd = f32(g);
  const o = f32(dWeight);
  const n = ids.size;
  for (let i = 0; i < n; i++) {
    const v = id[ids.offset + i]!;
    if (v === paddingIdx) continue;
    const dst = dWeight.offset + v * dim;
    const src = g.offset + i * dim;
    for (let j = 0; j < dim; j++) o[dst + j] += gd[src + j]!;
  }
}

export const jsEmbeddingKernels: EmbeddingKernels = { embeddingForward, embeddingBackward };
