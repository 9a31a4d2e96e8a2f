// Gradient checkpointing: run a segment (a decoder layer) without recording, keep only its input, and
// recompute it with recording on during backward. Trades one extra forward for the segment's activations.

import { getBackend } from '../backend/index.ts';
import type { Rng } from '../core/rng.ts';
import { keep } from '../core/scope.ts';
import type { Tensor } from '../core/tensor.ts';
import { empty } from './create.ts';
import { backward, enableGrad, isGradEnabled, noGrad, record } from './tape.ts';

/**
 * y = fn(x), recomputed in backward. `params` are the trainable tensors used inside fn (their gradients
 * accumulate during the recomputation); `rng` (if fn draws from one, e.g. dropout) is rewound so the
 * recomputation sees the same random numbers.
 */
export function checkpoint(fn: (x: Tensor) => Tensor, x: Tensor, params: readonly Tensor[], rng?: Rng): Tensor {
  if (!isGradEnabled() || !(x.requiresGrad || params.some((p) => p.requiresGrad))) return fn(x);
  const rngState = rng?.state();
  const out = noGrad(() => fn(x));
  return record(
    out,
    'checkpoint',
    [x, ...params],
    (g, needs, [sx]) => {
      const xi = keep(empty(sx!.shape));
      getBackend().copy(sx!, xi);
      xi.requiresGrad = needs[0]!;
      const after = rng?.state();
      if (rng && rngState) rng.setState(rngState);
      const y = enableGrad(() => fn(xi));
      if (rng && after) rng.setState(after);
      if (y.requiresGrad) backward(y, g);
      const gx = needs[0] ? xi.grad : null;
      xi.grad = null;
      xi.dispose();
      y.dispose();
      return [gx, ...params.map(() => null)];
    },
    [x],
  );
}
