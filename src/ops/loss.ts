// Cross-entropy fused with log-softmax as one node (Decision 2, as llm.c and Unsloth). The forward keeps only
// the per-row log-sum-exp (f32 [N]) beside the logits it already has; the backward writes
// (softmax - onehot) * g / count straight into one new logits-sized gradient buffer. With a 32k-150k vocab
// this is the difference between one and three logits-sized buffers.

import { getBackend } from '../backend/index.ts';
import type { LossReduction } from '../backend/kernels/loss.ts';
import { ConfigError, DTypeError, fmtShape, ShapeError } from '../core/errors.ts';
import { sameShape, type Tensor } from '../core/tensor.ts';
import { empty, emptyForOutput } from './create.ts';
import { contiguous, f32c } from './shape.ts';
import { noGrad, record } from './tape.ts';

export type { LossReduction };

export interface CrossEntropyOptions {
  /** Targets equal to this are not counted (PyTorch's ignore_index, default -100). */
  ignoreIndex?: number;
  /** 'mean' (default) over counted targets, 'sum', or 'none' (one loss per target, 0 where ignored). */
  reduction?: LossReduction;
}

/**
 * Cross-entropy of logits [..., V] (e.g. [N, V] or [B, T, V]) against i32 targets [...] (the logits' shape
 * without the last axis), as torch.nn.functional.cross_entropy. 'mean' and 'sum' give a scalar (shape []);
 * when every target is ignored the loss and its gradient are 0, not NaN. A target outside [0, V) that is
 * not ignoreIndex throws IndexError naming its position. Logits of other float dtypes are converted to f32.
 */
export function crossEntropy(logits: Tensor, targets: Tensor, opts: CrossEntropyOptions = {}): Tensor {
  const ignoreIndex = opts.ignoreIndex ?? -100;
  const reduction = opts.reduction ?? 'mean';
  if (reduction !== 'mean' && reduction !== 'sum' && reduction !== 'none')
    throw new ConfigError(`crossEntropy: reduction must be 'mean', 'sum' or 'none', got '${reduction}'`);
  if (targets.dtype !== 'i32')
    throw new DTypeError(
      `crossEntropy: targets ${fmtShape(targets.shape)} must be i32 token ids, got ${targets.dtype}`,
    );
  if (logits.dtype === 'i32' || logits.dtype === 'u8')
    throw new DTypeError(`crossEntropy: logits ${fmtShape(logits.shape)} must be a float tensor, got ${logits.dtype}`);
  if (logits.ndim < 1 || !sameShape(logits.shape.slice(0, -1), targets.shape))
    throw new ShapeError(
      `crossEntropy: logits ${fmtShape(logits.shape)} and targets ${fmtShape(targets.shape)} do not fit: targets must be the logits' shape without the last (vocab) axis`,
    );
  const vocab = logits.shape[logits.ndim - 1]!;
  const rows = targets.size;
  const x = noGrad(() => f32c(logits));
  const t = contiguous(targets);
  const lse = empty([rows]);
  const loss = empty(reduction === 'none' ? targets.shape : []);
  try {
    getBackend().crossEntropyForward(x, t, lse, loss, rows, vocab, ignoreIndex, reduction);
  } catch (e) {
    for (const u of [loss, lse]) u.dispose();
    if (t !== targets) t.dispose();
    if (x !== logits) x.dispose();
    throw e;
  }
  const shape = logits.shape;
  record(
    loss,
    'crossEntropy',
    [logits],
    (g, _needs, [sx, st, sl]) => {
      const dlogits = emptyForOutput(shape);
      getBackend().crossEntropyBackward(g, sx!, st!, sl!, dlogits, rows, vocab, ignoreIndex, reduction);
      return [dlogits];
    },
    [x, t, lse],
  );
  if (x !== logits) x.dispose();
  if (t !== targets) t.dispose();
  lse.dispose();
  return loss;
}
