// Inverted dropout: in training, each element is zeroed with probability p and the rest scaled by 1/(1-p).
// The mask is counter-based (see src/backend/kernels/dropout.ts): the op draws two 32-bit keys from the Rng,
// and the backward regenerates the same mask from them, so nothing mask-sized is ever stored. The same Rng
// state gives the same mask on every backend.

import { getBackend } from '../backend/index.ts';
import { isFloat } from '../core/dtype.ts';
import { ConfigError, DTypeError, fmtShape } from '../core/errors.ts';
import type { Rng } from '../core/rng.ts';
import type { Tensor } from '../core/tensor.ts';
import { empty } from './create.ts';
import { f32c } from './shape.ts';
import { noGrad, record } from './tape.ts';

/**
 * dropout(x, p, rng, training): with training false or p = 0 it returns x itself (no node, no copy).
 * Otherwise an f32 tensor of x's shape; the rng advances by two 32-bit draws per call.
 */
export function dropout(x: Tensor, p: number, rng: Rng, training = true): Tensor {
  if (!(p >= 0 && p <= 1)) throw new ConfigError(`dropout: p must be in [0, 1], got ${p}`);
  if (!training || p === 0) return x;
  if (!isFloat(x.dtype)) throw new DTypeError(`dropout: input ${fmtShape(x.shape)} is ${x.dtype}, not a float tensor`);
  const key0 = rng.nextU32();
  const key1 = rng.nextU32();
  const xc = noGrad(() => f32c(x));
  const out = empty(x.shape);
  getBackend().dropout(xc, out, p, key0, key1);
  if (xc !== x) xc.dispose();
  const shape = x.shape;
  return record(out, 'dropout', [x], (g) => {
    const dx = empty(shape);
    getBackend().dropout(g, dx, p, key0, key1);
    return [dx];
  });
}
