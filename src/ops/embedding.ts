// Embedding lookup as one node: out[..., :] = weight[ids[...], :]. The table (f32, bf16 or f16) is read in
// place and the output is f32. The backward scatter-adds into a dense f32 table gradient, and only when the
// table requires a gradient (a frozen base embedding records nothing).

import { getBackend } from '../backend/index.ts';
import { isFloat } from '../core/dtype.ts';
import { DTypeError, fmtShape, IndexError, ShapeError } from '../core/errors.ts';
import type { Tensor } from '../core/tensor.ts';
import { empty } from './create.ts';
import { contiguous } from './shape.ts';
import { noGrad, record } from './tape.ts';

export interface EmbeddingOptions {
  /**
   * PyTorch's padding_idx: this row gets no gradient (its lookups still return the row). Negative values
   * count from the end, as in PyTorch.
   */
  paddingIdx?: number | null;
}

/**
 * Looks up ids (i32, any shape) in weight [V, D]; returns f32 [...ids.shape, D]. An id outside [0, V) throws
 * IndexError naming the id and its position.
 */
export function embedding(ids: Tensor, weight: Tensor, opts: EmbeddingOptions = {}): Tensor {
  if (ids.dtype !== 'i32') throw new DTypeError(`embedding: ids ${fmtShape(ids.shape)} must be i32, got ${ids.dtype}`);
  if (!isFloat(weight.dtype))
    throw new DTypeError(`embedding: weight ${fmtShape(weight.shape)} must be f32, bf16 or f16, got ${weight.dtype}`);
  if (weight.ndim !== 2) throw new ShapeError(`embedding: weight ${fmtShape(weight.shape)} must be [V, D]`);
  const vocab = weight.shape[0]!;
  const dim = weight.shape[1]!;
  let paddingIdx = -1;
  if (opts.paddingIdx !== undefined && opts.paddingIdx !== null) {
    const p = opts.paddingIdx < 0 ? opts.paddingIdx + vocab : opts.paddingIdx;
    if (!Number.isInteger(p) || p < 0 || p >= vocab)
      throw new IndexError(`embedding: paddingIdx ${opts.paddingIdx} is out of range for a table of ${vocab} rows`);
    paddingIdx = p;
  }
  const idc = contiguous(ids);
  const wc = noGrad(() => contiguous(weight));
  const out = empty([...ids.shape, dim]);
  try {
    getBackend().embeddingForward(wc, idc, out, vocab, dim);
  } catch (e) {
    out.dispose();
    if (idc !== ids) idc.dispose();
    throw e;
  } finally {
    if (wc !== weight) wc.dispose();
  }
  record(
    out,
    'embedding',
    [null, weight],
    (g, needs, [sid]) => {
      if (!needs[1]) return [null, null];
      const dw = empty([vocab, dim]);
      getBackend().embeddingBackward(g, sid!, dw, vocab, dim, paddingIdx);
      return [null, dw];
    },
    [idc],
  );
  if (idc !== ids) idc.dispose();
  return out;
}
