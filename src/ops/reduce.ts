// Reductions: sum, mean, max over axes; sumToShape (the backward of broadcasting); broadcastTo.

import { getBackend } from '../backend/index.ts';
import { fmtShape, ShapeError } from '../core/errors.ts';
import { numel, type Shape, sameShape, type Tensor } from '../core/tensor.ts';
import { empty } from './create.ts';
import { expandView, f32c } from './shape.ts';
import { record } from './tape.ts';

function axesOf(op: string, t: Tensor, axes?: number | readonly number[]): number[] {
  if (axes === undefined) return [...Array(t.ndim).keys()];
  const list = typeof axes === 'number' ? [axes] : [...axes];
  const out = list.map((a) => (a < 0 ? a + t.ndim : a));
  for (const a of out)
    if (a < 0 || a >= t.ndim || !Number.isInteger(a))
      throw new ShapeError(`${op}: axis ${a} is out of range for ${fmtShape(t.shape)}`);
  return [...new Set(out)].sort((x, y) => x - y);
}

/** Reduces the listed axes with the kernel, one axis at a time (keepdim shape). No autograd. */
function reduceRaw(op: 'sum' | 'max' | 'min', x: Tensor, axes: number[]): Tensor {
  let cur = f32c(x);
  for (const a of axes) {
    const outer = numel(cur.shape.slice(0, a));
    const n = cur.shape[a]!;
    const inner = numel(cur.shape.slice(a + 1));
    const shape = [...cur.shape];
    shape[a] = 1;
    const out = empty(shape);
    getBackend().reduce(op, cur, out, outer, n, inner);
    if (cur !== x) cur.dispose();
    cur = out;
  }
  return cur === x ? copyTensor(x) : cur;
}

function copyTensor(x: Tensor): Tensor {
  const out = empty(x.shape);
  getBackend().copy(x, out);
  return out;
}

function dropAxes(shape: Shape, axes: number[]): number[] {
  return shape.filter((_, i) => !axes.includes(i));
}

/** A contiguous copy of t broadcast to shape. */
export function broadcastTo(t: Tensor, shape: Shape): Tensor {
  if (sameShape(t.shape, shape)) return t;
  const v = expandView('broadcastTo', t, shape);
  const out = empty(shape);
  getBackend().copy(v, out);
  v.dispose();
  const inShape = t.shape;
  return record(out, 'broadcastTo', [t], (g) => [sumToShape(g, inShape)]);
}

/** Sums g over the dims that were broadcast to get from `shape` to g.shape. */
export function sumToShape(g: Tensor, shape: Shape): Tensor {
  if (sameShape(g.shape, shape)) return g;
  const lead = g.ndim - shape.length;
  const axes: number[] = [];
  for (let i = 0; i < g.ndim; i++) {
    const d = i < lead ? 1 : shape[i - lead]!;
    if (d === 1 && g.shape[i] !== 1) axes.push(i);
    else if (d !== g.shape[i])
      throw new ShapeError(`sumToShape: ${fmtShape(g.shape)} does not reduce to ${fmtShape(shape)}`);
  }
  const r = reduceRaw('sum', g, axes);
  const out = r.view(shape, contiguousOf(shape), r.offset);
  r.dispose();
  return out;
}

function contiguousOf(shape: Shape): number[] {
  const s: number[] = [];
  let acc = 1;
  for (let i = shape.length - 1; i >= 0; i--) {
    s[i] = acc;
    acc *= shape[i]!;
  }
  return s;
}

export function sum(x: Tensor, axes?: number | readonly number[], keepdim = false): Tensor {
  const ax = axesOf('sum', x, axes);
  const r = reduceRaw('sum', x, ax);
  const shape = keepdim ? r.shape : dropAxes(x.shape, ax);
  const out = r.view(shape, contiguousOf(shape), r.offset);
  r.dispose();
  const inShape = x.shape;
  const kdShape = x.shape.map((d, i) => (ax.includes(i) ? 1 : d));
  return record(out, 'sum', [x], (g) => {
    const gk = g.view(kdShape, contiguousOf(kdShape), g.offset);
    const v = expandView('sum', gk, inShape);
    const gi = empty(inShape);
    getBackend().copy(v, gi);
    v.dispose();
    gk.dispose();
    return [gi];
  });
}

export function mean(x: Tensor, axes?: number | readonly number[], keepdim = false): Tensor {
  const ax = axesOf('mean', x, axes);
  const count = ax.reduce((c, a) => c * x.shape[a]!, 1);
  const s = sum(x, ax, keepdim);
  const out = empty(s.shape);
  getBackend().unary('scale', s, out, 1 / count);
  return record(out, 'mean', [s], (g) => {
    const gi = empty(g.shape);
    getBackend().unary('scale', g, gi, 1 / count);
    return [gi];
  });
}

/** Max over axes. The gradient goes to the maximal entries, shared equally among ties. */
export function max(x: Tensor, axes?: number | readonly number[], keepdim = false): Tensor {
  return extremum('max', x, axes, keepdim);
}
export function min(x: Tensor, axes?: number | readonly number[], keepdim = false): Tensor {
  return extremum('min', x, axes, keepdim);
}

function extremum(
  op: 'max' | 'min',
  x: Tensor,
  axes: number | readonly number[] | undefined,
  keepdim: boolean,
): Tensor {
  const ax = axesOf(op, x, axes);
  const xc = f32c(x);
  const r = reduceRaw(op, xc, ax);
  const shape = keepdim ? r.shape : dropAxes(x.shape, ax);
  const out = r.view(shape, contiguousOf(shape), r.offset);
  const inShape = x.shape;
  return record(
    out,
    op,
    [x],
    (g, _n, [sx, sr]) => {
      const b = getBackend();
      const kd = sr!.shape;
      const mask = empty(inShape);
      const rv = expandView(op, sr!, inShape);
      b.binary('eq', sx!, rv, mask);
      rv.dispose();
      const cnt = reduceRaw('sum', mask, ax);
      const gk = g.view(kd, contiguousOf(kd), g.offset);
      const share = empty(kd);
      b.binary('div', gk, cnt, share);
      const sv = expandView(op, share, inShape);
      const gi = empty(inShape);
      b.binary('mul', mask, sv, gi);
      for (const t of [sv, share, gk, cnt, mask]) t.dispose();
      return [gi];
    },
    [xc, r],
  );
}
