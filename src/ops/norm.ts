// RMSNorm as one fused node (Decision 2): y = x * rsqrt(mean(x^2, -1) + eps) * w over the last axis, for any
// leading shape ([N, D], [B, T, D], or Qwen3's per-head q/k norm on [B, T, H, D]). The forward saves the
// per-row rstd (f32 [rows]) besides x and w, so the backward needs no recomputation of the row norms.

import { getBackend } from '../backend/index.ts';
import { isFloat } from '../core/dtype.ts';
import { ConfigError, DTypeError, fmtShape, ShapeError } from '../core/errors.ts';
import type { Tensor } from '../core/tensor.ts';
import { emptyForOutput } from './create.ts';
import { contiguous, f32c } from './shape.ts';
import { noGrad, record } from './tape.ts';

/**
 * Root-mean-square normalisation of x over its last axis, times weight (Hugging Face LlamaRMSNorm: the
 * normalisation in f32, then times the weight). weight [D] may be f32, bf16 or f16 and is read in place.
 * Output f32, x's shape. Gradients: dx when x needs one, dw only when weight requires a gradient.
 */
export function rmsnorm(x: Tensor, weight: Tensor, eps = 1e-6): Tensor {
  if (!isFloat(x.dtype) || !isFloat(weight.dtype))
    throw new DTypeError(`rmsnorm: x (${x.dtype}) and weight (${weight.dtype}) must be float tensors`);
  if (x.ndim < 1 || weight.ndim !== 1 || weight.shape[0] !== x.shape[x.ndim - 1] || weight.shape[0] === 0)
    throw new ShapeError(
      `rmsnorm: weight ${fmtShape(weight.shape)} must be [D] for the last axis D of x ${fmtShape(x.shape)}`,
    );
  if (!(eps >= 0)) throw new ConfigError(`rmsnorm: eps must be >= 0, got ${eps}`);
  const dim = weight.shape[0]!;
  const rows = x.size / dim;
  const xc = noGrad(() => f32c(x));
  const wc = noGrad(() => contiguous(weight));
  const y = emptyForOutput(x.shape);
  const rstd = emptyForOutput([rows]);
  getBackend().rmsNormForward(xc, wc, y, rstd, rows, dim, eps);
  const xShape = x.shape;
  record(
    y,
    'rmsnorm',
    [x, weight],
    (g, needs, [sx, sw, sr]) => {
      const dx = needs[0] ? emptyForOutput(xShape) : null;
      const dw = needs[1] ? emptyForOutput([dim]) : null;
      getBackend().rmsNormBackward(g, sx!, sw!, sr!, dx, dw, rows, dim);
      return [dx, dw];
    },
    [xc, wc, rstd],
  );
  if (xc !== x) xc.dispose();
  if (wc !== weight) wc.dispose();
  rstd.dispose();
  return y;
}
