// Activations as fused nodes: SwiGLU (silu(gate) * up, one node instead of three), GELU in both of Hugging
// Face's forms, and numerically stable softmax / log-softmax over the last axis. Inputs of other float dtypes
// or layouts are converted to contiguous f32 first (the CPU compute dtype).

import { getBackend } from '../backend/index.ts';
import type { GeluApproximate } from '../backend/kernels/activation.ts';
import { isFloat } from '../core/dtype.ts';
import { ConfigError, DTypeError, fmtShape, ShapeError } from '../core/errors.ts';
import { sameShape, type Tensor } from '../core/tensor.ts';
import { emptyForOutput } from './create.ts';
import { relu, sigmoid, silu, tanh } from './elementwise.ts';
import { f32c } from './shape.ts';
import { noGrad, record } from './tape.ts';

export type { GeluApproximate };

function floatInput(op: string, x: Tensor): Tensor {
  if (!isFloat(x.dtype)) throw new DTypeError(`${op}: input ${fmtShape(x.shape)} is ${x.dtype}, not a float tensor`);
  return noGrad(() => f32c(x));
}

function release(converted: Tensor, original: Tensor): void {
  if (converted !== original) converted.dispose();
}

/**
 * silu(gate) * up for gate and up of equal shape (the Llama / Mistral / Qwen MLP). One node; the backward
 * recomputes the sigmoid from the saved inputs rather than saving it.
 */
export function swiglu(gate: Tensor, up: Tensor): Tensor {
  if (!sameShape(gate.shape, up.shape))
    throw new ShapeError(`swiglu: gate ${fmtShape(gate.shape)} and up ${fmtShape(up.shape)} must have the same shape`);
  const a = floatInput('swiglu', gate);
  const b = floatInput('swiglu', up);
  const out = emptyForOutput(gate.shape);
  getBackend().swigluForward(a, b, out);
  const shape = gate.shape;
  record(
    out,
    'swiglu',
    [gate, up],
    (g, needs, [sa, sb]) => {
      const da = needs[0] ? emptyForOutput(shape) : null;
      const db = needs[1] ? emptyForOutput(shape) : null;
      getBackend().swigluBackward(g, sa!, sb!, da, db);
      return [da, db];
    },
    [a, b],
  );
  release(a, gate);
  release(b, up);
  return out;
}

/**
 * GELU. approximate 'none' (default) is the exact 0.5 x (1 + erf(x / sqrt 2)), HF's 'gelu'; 'tanh' (or
 * true) is the tanh approximation, HF's 'gelu_pytorch_tanh' / 'gelu_new'.
 */
export function gelu(x: Tensor, approximate: GeluApproximate | boolean = 'none'): Tensor {
  const mode: GeluApproximate = approximate === true || approximate === 'tanh' ? 'tanh' : 'none';
  if (typeof approximate === 'string' && approximate !== 'none' && approximate !== 'tanh')
    throw new ConfigError(`gelu: approximate must be 'none' or 'tanh', got '${approximate}'`);
  const xc = floatInput('gelu', x);
  const out = emptyForOutput(x.shape);
  getBackend().geluForward(xc, out, mode);
  const shape = x.shape;
  record(
    out,
    'gelu',
    [x],
    (g, _needs, [sx]) => {
      const dx = emptyForOutput(shape);
      getBackend().geluBackward(g, sx!, dx, mode);
      return [dx];
    },
    [xc],
  );
  release(xc, x);
  return out;
}

function rowsCols(op: string, x: Tensor): [number, number] {
  if (x.ndim < 1) throw new ShapeError(`${op}: needs at least one axis, got a scalar ${fmtShape(x.shape)}`);
  const cols = x.shape[x.ndim - 1]!;
  return [cols === 0 ? 0 : x.size / cols, cols];
}

/** softmax over the last axis (max-subtracted; a row of only -inf gives zeros). Saves its output. */
export function softmax(x: Tensor): Tensor {
  const [rows, cols] = rowsCols('softmax', x);
  const xc = floatInput('softmax', x);
  const out = emptyForOutput(x.shape);
  getBackend().softmaxForward(xc, out, rows, cols);
  release(xc, x);
  const shape = x.shape;
  return record(
    out,
    'softmax',
    [x],
    (g, _needs, [sy]) => {
      const dx = emptyForOutput(shape);
      getBackend().softmaxBackward(g, sy!, dx, rows, cols);
      return [dx];
    },
    [out],
  );
}

/** log(softmax(x)) over the last axis, computed as x - logsumexp(x) (stable). Saves its output. */
export function logSoftmax(x: Tensor): Tensor {
  const [rows, cols] = rowsCols('logSoftmax', x);
  const xc = floatInput('logSoftmax', x);
  const out = emptyForOutput(x.shape);
  getBackend().logSoftmaxForward(xc, out, rows, cols);
  release(xc, x);
  const shape = x.shape;
  return record(
    out,
    'logSoftmax',
    [x],
    (g, _needs, [sy]) => {
      const dx = emptyForOutput(shape);
      getBackend().logSoftmaxBackward(g, sy!, dx, rows, cols);
      return [dx];
    },
    [out],
  );
}

/**
 * The activation a Hugging Face config names in hidden_act / hidden_activation (transformers' ACT2FN):
 * silu/swish, gelu (exact), gelu_pytorch_tanh/gelu_new/gelu_fast (tanh approximation), relu, tanh, sigmoid.
 */
export function activationByName(name: string): (x: Tensor) => Tensor {
  switch (name) {
    case 'silu':
    case 'swish':
      return silu;
    case 'gelu':
      return (x) => gelu(x, 'none');
    case 'gelu_pytorch_tanh':
    case 'gelu_new':
    case 'gelu_fast':
      return (x) => gelu(x, 'tanh');
    case 'relu':
      return relu;
    case 'tanh':
      return tanh;
    case 'sigmoid':
      return sigmoid;
    default:
      throw new ConfigError(
        `hidden_act '${name}' is not supported; use one of silu, swish, gelu, gelu_pytorch_tanh, gelu_new, gelu_fast, relu, tanh, sigmoid`,
      );
  }
}
