// Tensor factories on the active backend.

import { getBackend } from '../backend/index.ts';
import { type AnyTypedArray, allocTyped, type DType, fromF32, itemSize, typedOver } from '../core/dtype.ts';
import { fmtShape, ShapeError } from '../core/errors.ts';
import { globalRng, type Rng } from '../core/rng.ts';
import { checkShape, numel, type Shape, Tensor } from '../core/tensor.ts';

/** A new zero-filled tensor (f32 unless told). */
export function empty(shape: Shape, dtype: DType = 'f32'): Tensor {
  checkShape('empty', shape);
  return new Tensor(getBackend().alloc(dtype, numel(shape)), shape);
}
export const zeros = empty;

/** A new tensor whose contents are unspecified: only for an output that is written whole before it is read. */
export function emptyForOutput(shape: Shape, dtype: DType = 'f32'): Tensor {
  checkShape('emptyForOutput', shape);
  return new Tensor(getBackend().alloc(dtype, numel(shape), true), shape);
}

/**
 * A new zero-filled tensor for weights streamed whole on every decoding step (the decoding layout's): the
 * native backend gives it huge pages (a TLB miss every 4 KiB slowed streaming by about a quarter) and reads it
 * ahead of the products that use it. Elsewhere, plain fresh memory.
 */
export function emptyStreamed(shape: Shape, dtype: DType = 'f32'): Tensor {
  checkShape('emptyStreamed', shape);
  const n = numel(shape);
  const be = getBackend();
  const data = be.allocStreamed ? typedOver(dtype, be.allocStreamed(n * itemSize(dtype))) : allocTyped(dtype, n);
  return Tensor.fromTyped(data, shape, dtype);
}

export function full(shape: Shape, value: number, dtype: DType = 'f32'): Tensor {
  const t = empty(shape, dtype);
  if (value !== 0) getBackend().fill(t, value);
  return t;
}
export function ones(shape: Shape, dtype: DType = 'f32'): Tensor {
  return full(shape, 1, dtype);
}

/** A tensor from values (numbers are encoded into dtype; typed arrays of the right kind are copied). */
export function tensor(values: ArrayLike<number> | AnyTypedArray, shape?: Shape, dtype: DType = 'f32'): Tensor {
  const sh = shape ?? [values.length];
  checkShape('tensor', sh);
  if (numel(sh) !== values.length)
    throw new ShapeError(`tensor: ${values.length} values do not fill shape ${fmtShape(sh)}`);
  const data = fromF32(dtype, values as ArrayLike<number>);
  return Tensor.fromTyped(data, sh, dtype);
}

export function scalar(v: number): Tensor {
  return tensor([v], []);
}

export function randn(shape: Shape, opts: { std?: number; mean?: number; rng?: Rng; dtype?: DType } = {}): Tensor {
  const rng = opts.rng ?? globalRng;
  const n = numel(shape);
  const v = new Float32Array(n);
  const std = opts.std ?? 1;
  const mean = opts.mean ?? 0;
  for (let i = 0; i < n; i++) v[i] = mean + std * rng.normal();
  return opts.dtype && opts.dtype !== 'f32' ? tensor(v, shape, opts.dtype) : Tensor.fromTyped(v, shape, 'f32');
}

export function uniform(shape: Shape, low: number, high: number, rng: Rng = globalRng, dtype: DType = 'f32'): Tensor {
  const n = numel(shape);
  const v = new Float32Array(n);
  for (let i = 0; i < n; i++) v[i] = low + (high - low) * rng.uniform();
  return dtype !== 'f32' ? tensor(v, shape, dtype) : Tensor.fromTyped(v, shape, 'f32');
}

export function arange(n: number, dtype: DType = 'i32'): Tensor {
  const v = new Float64Array(n);
  for (let i = 0; i < n; i++) v[i] = i;
  return tensor(v, [n], dtype);
}

/** Integer tensor (token ids, indices). */
export function intTensor(values: ArrayLike<number>, shape?: Shape): Tensor {
  return Tensor.fromTyped(Int32Array.from(values as ArrayLike<number>), shape ?? [values.length], 'i32');
}

/** A parameter-like leaf: requiresGrad set. */
export function leaf(t: Tensor, requiresGrad = true): Tensor {
  t.requiresGrad = requiresGrad;
  return t;
}
