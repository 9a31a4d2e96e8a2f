// Elementwise ops with broadcasting: add, sub, mul, div, scale, and unary math. Inputs of other float
// dtypes are converted to f32 (the CPU compute dtype).

import type { BinaryOp, UnaryOp } from '../backend/backend.ts';
import { getBackend } from '../backend/index.ts';
import { numel, sameShape, type Tensor } from '../core/tensor.ts';
import { emptyForOutput, scalar } from './create.ts';
import { sumToShape } from './reduce.ts';
import { broadcastShapes, expandView, f32c } from './shape.ts';
import { record } from './tape.ts';

function binaryRaw(op: BinaryOp, a: Tensor, b: Tensor): Tensor {
  const shape = broadcastShapes(op, a.shape, b.shape);
  const out = emptyForOutput(shape);
  if (sameShape(a.shape, shape) && sameShape(b.shape, shape)) {
    getBackend().binary(op, a, b, out);
    return out;
  }
  const av = expandView(op, a, shape);
  const bv = expandView(op, b, shape);
  getBackend().binary(op, av, bv, out);
  av.dispose();
  bv.dispose();
  return out;
}

function asTensor(x: Tensor | number): Tensor {
  return typeof x === 'number' ? scalar(x) : x;
}

export function add(a: Tensor, b: Tensor | number): Tensor {
  if (typeof b === 'number') return addScalar(a, b);
  const x = f32c(a);
  const y = f32c(b);
  const out = binaryRaw('add', x, y);
  return record(out, 'add', [a, b], (g, needs) => [
    needs[0] ? sumToShape(g, a.shape) : null,
    needs[1] ? sumToShape(g, b.shape) : null,
  ]);
}

export function sub(a: Tensor, b: Tensor | number): Tensor {
  if (typeof b === 'number') return addScalar(a, -b);
  const x = f32c(a);
  const y = f32c(b);
  const out = binaryRaw('sub', x, y);
  return record(out, 'sub', [a, b], (g, needs) => [
    needs[0] ? sumToShape(g, a.shape) : null,
    needs[1] ? sumToShape(unaryRaw('neg', g), b.shape) : null,
  ]);
}

export function mul(a: Tensor, b: Tensor | number): Tensor {
  if (typeof b === 'number') return scale(a, b);
  const x = f32c(a);
  const y = f32c(b);
  const out = binaryRaw('mul', x, y);
  return record(
    out,
    'mul',
    [a, b],
    (g, needs, [sx, sy]) => [
      needs[0] ? sumToShape(binaryRaw('mul', g, sy!), a.shape) : null,
      needs[1] ? sumToShape(binaryRaw('mul', g, sx!), b.shape) : null,
    ],
    [x, y],
  );
}

export function div(a: Tensor, b: Tensor | number): Tensor {
  if (typeof b === 'number') return scale(a, 1 / b);
  const x = f32c(a);
  const y = f32c(asTensor(b));
  const out = binaryRaw('div', x, y);
  return record(
    out,
    'div',
    [a, b],
    (g, needs, [sy, so]) => {
      const ga = needs[0] ? sumToShape(binaryRaw('div', g, sy!), a.shape) : null;
      let gb: Tensor | null = null;
      if (needs[1]) {
        // d(a/b)/db = -(a/b)/b
        const t = binaryRaw('mul', g, so!);
        const u = binaryRaw('div', t, sy!);
        gb = sumToShape(unaryRaw('neg', u), b.shape);
      }
      return [ga, gb];
    },
    [y, out],
  );
}

function unaryRaw(op: UnaryOp, x: Tensor, s?: number): Tensor {
  const out = emptyForOutput(x.shape);
  getBackend().unary(op, x, out, s);
  return out;
}

export function scale(x: Tensor, s: number): Tensor {
  const out = unaryRaw('scale', f32c(x), s);
  return record(out, 'scale', [x], (g) => [unaryRaw('scale', g, s)]);
}

export function addScalar(x: Tensor, s: number): Tensor {
  const out = unaryRaw('addScalar', f32c(x), s);
  return record(out, 'addScalar', [x], (g) => [g]);
}

export function neg(x: Tensor): Tensor {
  return scale(x, -1);
}

export function exp(x: Tensor): Tensor {
  const out = unaryRaw('exp', f32c(x));
  return record(out, 'exp', [x], (g, _n, [so]) => [binaryRaw('mul', g, so!)], [out]);
}

export function log(x: Tensor): Tensor {
  const xc = f32c(x);
  const out = unaryRaw('log', xc);
  return record(out, 'log', [x], (g, _n, [sx]) => [binaryRaw('div', g, sx!)], [xc]);
}

export function sqrt(x: Tensor): Tensor {
  const out = unaryRaw('sqrt', f32c(x));
  return record(
    out,
    'sqrt',
    [x],
    (g, _n, [so]) => {
      const t = binaryRaw('div', g, so!);
      return [unaryRaw('scale', t, 0.5)];
    },
    [out],
  );
}

export function pow(x: Tensor, p: number): Tensor {
  const xc = f32c(x);
  const out = unaryRaw('pow', xc, p);
  return record(
    out,
    'pow',
    [x],
    (g, _n, [sx]) => {
      const d = unaryRaw('pow', sx!, p - 1);
      const e = unaryRaw('scale', d, p);
      return [binaryRaw('mul', g, e)];
    },
    [xc],
  );
}

const gradOp = { sigmoid: 'sigmoidGrad', tanh: 'tanhGrad', relu: 'reluGrad', silu: 'siluGrad', abs: 'sign' } as const;

function activation(op: keyof typeof gradOp, x: Tensor): Tensor {
  const xc = f32c(x);
  const out = unaryRaw(op, xc);
  return record(
    out,
    op,
    [x],
    (g, _n, [sx]) => {
      const d = unaryRaw(gradOp[op], sx!);
      return [binaryRaw('mul', g, d)];
    },
    [xc],
  );
}

export const sigmoid = (x: Tensor): Tensor => activation('sigmoid', x);
export const tanh = (x: Tensor): Tensor => activation('tanh', x);
export const relu = (x: Tensor): Tensor => activation('relu', x);
export const silu = (x: Tensor): Tensor => activation('silu', x);
export const abs = (x: Tensor): Tensor => activation('abs', x);

/** Number of elements as a plain number (helper for ops that average). */
export function count(x: Tensor): number {
  return numel(x.shape);
}
