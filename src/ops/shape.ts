// Views and data movement: reshape, transpose/permute, slice, concat, index-select, contiguous, cast.
// Views share storage; their backward maps the gradient back to the input's layout.

import { getBackend } from '../backend/index.ts';
import type { DType } from '../core/dtype.ts';
import { fmtShape, IndexError, ShapeError } from '../core/errors.ts';
import { contiguousStrides, numel, type Shape, type Tensor } from '../core/tensor.ts';
import { empty } from './create.ts';
import { record } from './tape.ts';

function normAxis(op: string, axis: number, nd: number): number {
  const a = axis < 0 ? axis + nd : axis;
  if (a < 0 || a >= nd || !Number.isInteger(a))
    throw new ShapeError(`${op}: axis ${axis} is out of range for a tensor of ${nd} dims`);
  return a;
}

/** A contiguous copy of t (or t itself when it already is). */
export function contiguous(t: Tensor): Tensor {
  if (t.isContiguous()) return t;
  const out = empty(t.shape, t.dtype);
  getBackend().copy(t, out);
  return record(out, 'contiguous', [t], (g) => [g]);
}

/** Converts to dtype (a copy). Gradient flows back as f32. */
export function cast(t: Tensor, dtype: DType): Tensor {
  const out = empty(t.shape, dtype);
  getBackend().copy(t, out);
  return record(out, 'cast', [t], (g) => [g]);
}

/** f32 input for a kernel: t itself when it is already contiguous f32. */
export function f32c(t: Tensor): Tensor {
  if (t.dtype !== 'f32') return cast(t, 'f32');
  return contiguous(t);
}

function resolveShape(op: string, size: number, shape: Shape): number[] {
  const out = [...shape];
  const neg = out.indexOf(-1);
  if (neg >= 0) {
    const rest = numel(out.filter((_, i) => i !== neg));
    if (rest === 0 || size % rest !== 0)
      throw new ShapeError(`${op}: cannot infer -1 in ${fmtShape(shape)} for ${size} elements`);
    out[neg] = size / rest;
  }
  if (numel(out) !== size || out.some((d) => !Number.isInteger(d) || d < 0))
    throw new ShapeError(`${op}: cannot reshape ${size} elements into ${fmtShape(shape)}`);
  return out;
}

export function reshape(t: Tensor, shape: Shape): Tensor {
  const target = resolveShape('reshape', t.size, shape);
  const src = contiguous(t);
  const out = src.view(target, contiguousStrides(target), src.offset);
  if (src !== t) src.dispose();
  const inShape = t.shape;
  return record(out, 'reshape', [t], (g) => [reshape(g, inShape)]);
}

export function permute(t: Tensor, dims: readonly number[]): Tensor {
  const nd = t.ndim;
  if (dims.length !== nd || new Set(dims.map((d) => normAxis('permute', d, nd))).size !== nd)
    throw new ShapeError(`permute: ${fmtShape(dims)} is not a permutation of ${nd} dims (tensor ${fmtShape(t.shape)})`);
  const d = dims.map((x) => normAxis('permute', x, nd));
  const out = t.view(
    d.map((i) => t.shape[i]!),
    d.map((i) => t.strides[i]!),
    t.offset,
  );
  const inv = new Array<number>(nd);
  d.forEach((src, i) => {
    inv[src] = i;
  });
  return record(out, 'permute', [t], (g) => [contiguous(permute(g, inv))]);
}

export function transpose(t: Tensor, a = -2, b = -1): Tensor {
  const nd = t.ndim;
  const x = normAxis('transpose', a, nd);
  const y = normAxis('transpose', b, nd);
  const dims = [...Array(nd).keys()];
  dims[x] = y;
  dims[y] = x;
  return permute(t, dims);
}

/** t[..., start:end, ...] along axis (a view). */
export function slice(t: Tensor, axis: number, start: number, end: number): Tensor {
  const ax = normAxis('slice', axis, t.ndim);
  const dim = t.shape[ax]!;
  if (!(Number.isInteger(start) && Number.isInteger(end) && start >= 0 && start <= end && end <= dim))
    throw new IndexError(`slice: [${start}, ${end}) is out of range for axis ${ax} of ${fmtShape(t.shape)}`);
  const shape = [...t.shape];
  shape[ax] = end - start;
  const out = t.view(shape, t.strides, t.offset + start * t.strides[ax]!);
  const inShape = t.shape;
  return record(out, 'slice', [t], (g) => {
    const gi = empty(inShape);
    const region = gi.view(shape, gi.strides, start * gi.strides[ax]!);
    getBackend().copy(g, region);
    region.dispose();
    return [gi];
  });
}

export function concat(ts: readonly Tensor[], axis: number): Tensor {
  if (ts.length === 0) throw new ShapeError('concat: no tensors');
  const first = ts[0]!;
  const ax = normAxis('concat', axis, first.ndim);
  for (const t of ts)
    if (t.ndim !== first.ndim || t.shape.some((d, i) => i !== ax && d !== first.shape[i]))
      throw new ShapeError(`concat: shapes ${ts.map((x) => fmtShape(x.shape)).join(', ')} differ outside axis ${ax}`);
  const shape = [...first.shape];
  shape[ax] = ts.reduce((s, t) => s + t.shape[ax]!, 0);
  const dtype = ts.every((t) => t.dtype === first.dtype) ? first.dtype : 'f32';
  const out = empty(shape, dtype);
  let at = 0;
  const offsets: number[] = [];
  for (const t of ts) {
    offsets.push(at);
    const sh = [...shape];
    sh[ax] = t.shape[ax]!;
    const region = out.view(sh, out.strides, at * out.strides[ax]!);
    getBackend().copy(t, region);
    region.dispose();
    at += t.shape[ax]!;
  }
  return record(out, 'concat', ts, (g, needs) =>
    ts.map((t, i) => (needs[i] ? contiguous(slice(g, ax, offsets[i]!, offsets[i]! + t.shape[ax]!)) : null)),
  );
}

/** Rows of t along axis picked by idx (i32, 1-D). */
export function indexSelect(t: Tensor, axis: number, idx: Tensor): Tensor {
  const ax = normAxis('indexSelect', axis, t.ndim);
  if (idx.dtype !== 'i32' || idx.ndim !== 1)
    throw new ShapeError(`indexSelect: indices must be 1-D i32, got ${fmtShape(idx.shape)} ${idx.dtype}`);
  if (ax !== 0) {
    const dims = [...Array(t.ndim).keys()];
    dims[0] = ax;
    dims[ax] = 0;
    return permute(indexSelect(contiguous(permute(t, dims)), 0, idx), dims);
  }
  const src = contiguous(t);
  const cols = numel(t.shape.slice(1));
  const shape = [idx.size, ...t.shape.slice(1)];
  const out = empty(shape, t.dtype);
  const ids = contiguous(idx);
  getBackend().gatherRows(src, ids, out, cols);
  const inShape = t.shape;
  return record(
    out,
    'indexSelect',
    [t],
    (g, _n, [savedIdx]) => {
      const gi = empty(inShape);
      getBackend().scatterAddRows(g, savedIdx!, gi, cols);
      return [gi];
    },
    [ids],
  );
}

export function unsqueeze(t: Tensor, axis: number): Tensor {
  const ax = axis < 0 ? axis + t.ndim + 1 : axis;
  const shape = [...t.shape];
  shape.splice(ax, 0, 1);
  return reshape(t, shape);
}

export function squeeze(t: Tensor, axis: number): Tensor {
  const ax = normAxis('squeeze', axis, t.ndim);
  if (t.shape[ax] !== 1) throw new ShapeError(`squeeze: axis ${ax} of ${fmtShape(t.shape)} is not 1`);
  return reshape(
    t,
    t.shape.filter((_, i) => i !== ax),
  );
}

/** A broadcast view of t with the target shape (stride 0 on broadcast dims). */
export function expandView(op: string, t: Tensor, shape: Shape): Tensor {
  const nd = shape.length;
  if (t.ndim > nd) throw new ShapeError(`${op}: cannot broadcast ${fmtShape(t.shape)} to ${fmtShape(shape)}`);
  const strides = new Array<number>(nd).fill(0);
  for (let i = 0; i < nd; i++) {
    const j = i - (nd - t.ndim);
    if (j < 0) continue;
    const d = t.shape[j]!;
    if (d === shape[i]) strides[i] = d === 1 ? 0 : t.strides[j]!;
    else if (d === 1) strides[i] = 0;
    else throw new ShapeError(`${op}: cannot broadcast ${fmtShape(t.shape)} to ${fmtShape(shape)}`);
  }
  return t.view(shape, strides, t.offset);
}

export function broadcastShapes(op: string, a: Shape, b: Shape): number[] {
  const nd = Math.max(a.length, b.length);
  const out = new Array<number>(nd);
  for (let i = 0; i < nd; i++) {
    const x = a[i - (nd - a.length)] ?? 1;
    const y = b[i - (nd - b.length)] ?? 1;
    if (x !== y && x !== 1 && y !== 1)
      throw new ShapeError(`${op}: shapes ${fmtShape(a)} and ${fmtShape(b)} do not broadcast`);
    out[i] = x === 1 ? y : x;
  }
  return out;
}
