// TypeScript reference kernels for the core ops: plain loops, the oracle for the native backend.

import { type DType, encodeScalar, readScalar } from '../../core/dtype.ts';
import { IndexError } from '../../core/errors.ts';
import { allocCpu, type CpuStorage } from '../../core/storage.ts';
import { forEachIndex, type Tensor } from '../../core/tensor.ts';
import type { BinaryOp, CoreKernels, GemmArgs, ReduceOp, UnaryOp } from '../backend.ts';

/** f32 view of a tensor's data (throws if it is not f32). */
export function f32(t: Tensor): Float32Array {
  const d = t.data;
  if (!(d instanceof Float32Array)) throw new TypeError(`kernel expects f32, got ${t.dtype}`);
  return d;
}
export function i32(t: Tensor): Int32Array {
  const d = t.data;
  if (!(d instanceof Int32Array)) throw new TypeError(`kernel expects i32, got ${t.dtype}`);
  return d;
}

/** A reader returning element i (absolute index) as a number, for any float dtype. */
export function reader(t: Tensor): (i: number) => number {
  const d = t.data;
  const dt = t.dtype;
  if (dt === 'f32' || dt === 'i32' || dt === 'u8') return (i) => d[i]!;
  return (i) => readScalar(dt, d, i);
}

function gemm(p: GemmArgs): void {
  const { m, n, k, alpha, beta, transA, transB, lda, ldb, ldc } = p;
  const batch = p.batch ?? 1;
  const ra = reader(p.a);
  const rb = reader(p.b);
  const c = f32(p.c);
  const acc = new Float64Array(n);
  for (let bi = 0; bi < batch; bi++) {
    const aBase = p.aOff + bi * (p.strideA ?? 0);
    const bBase = p.bOff + bi * (p.strideB ?? 0);
    const cBase = p.cOff + bi * (p.strideC ?? 0);
    for (let i = 0; i < m; i++) {
      acc.fill(0);
      for (let l = 0; l < k; l++) {
        const av = ra(transA ? aBase + l * lda + i : aBase + i * lda + l);
        if (av === 0) continue;
        if (transB) for (let j = 0; j < n; j++) acc[j] += av * rb(bBase + j * ldb + l);
        else {
          const row = bBase + l * ldb;
          for (let j = 0; j < n; j++) acc[j] += av * rb(row + j);
        }
      }
      const crow = cBase + i * ldc;
      if (beta === 0) for (let j = 0; j < n; j++) c[crow + j] = alpha * acc[j]!;
      else for (let j = 0; j < n; j++) c[crow + j] = alpha * acc[j]! + beta * c[crow + j]!;
    }
  }
}

function copy(src: Tensor, dst: Tensor): void {
  const out = dst.data;
  const sd = src.data;
  const same = src.dtype === dst.dtype;
  const decode = reader(src);
  const enc = dst.dtype;
  if (src.isContiguous() && dst.isContiguous() && same) {
    out.set(sd.subarray(src.offset, src.offset + src.size), dst.offset);
    return;
  }
  const nd = src.ndim;
  if (same && nd >= 2 && src.strides[nd - 1] === 1 && dst.strides[nd - 1] === 1) {
    // rows contiguous on both sides (a KV-cache write): one typed-array copy per row
    const inner = src.shape[nd - 1]!;
    const outer = src.size / inner;
    let si = src.offset;
    let di = dst.offset;
    const idx = new Array<number>(nd - 1).fill(0);
    for (let r = 0; r < outer; r++) {
      out.set(sd.subarray(si, si + inner), di);
      for (let d = nd - 2; d >= 0; d--) {
        si += src.strides[d]!;
        di += dst.strides[d]!;
        if (++idx[d]! < src.shape[d]!) break;
        si -= src.strides[d]! * src.shape[d]!;
        di -= dst.strides[d]! * dst.shape[d]!;
        idx[d] = 0;
      }
    }
    return;
  }
  let dIdx: Int32Array | null = null;
  if (!dst.isContiguous()) {
    const di = new Int32Array(dst.size);
    forEachIndex(dst.shape, dst.strides, dst.offset, (s, d) => {
      di[d] = s;
    });
    dIdx = di;
  }
  const o = dst.offset;
  forEachIndex(src.shape, src.strides, src.offset, (s, d) => {
    out[dIdx ? dIdx[d]! : o + d] = same ? sd[s]! : encodeScalar(enc, decode(s));
  });
}

function fill(dst: Tensor, value: number): void {
  const v = encodeScalar(dst.dtype, value);
  dst.data.fill(v, dst.offset, dst.offset + dst.size);
}

const binaryFns: Record<BinaryOp, (a: number, b: number) => number> = {
  add: (a, b) => a + b,
  sub: (a, b) => a - b,
  mul: (a, b) => a * b,
  div: (a, b) => a / b,
  max: Math.max,
  min: Math.min,
  eq: (a, b) => (a === b ? 1 : 0),
};

function binary(op: BinaryOp, a: Tensor, b: Tensor, out: Tensor): void {
  const o = f32(out);
  const oo = out.offset;
  const ad = f32(a);
  const bd = f32(b);
  const fn = binaryFns[op];
  const n = out.size;
  if (a.isContiguous() && b.isContiguous()) {
    const ao = a.offset;
    const bo = b.offset;
    if (op === 'add') for (let i = 0; i < n; i++) o[oo + i] = ad[ao + i]! + bd[bo + i]!;
    else if (op === 'mul') for (let i = 0; i < n; i++) o[oo + i] = ad[ao + i]! * bd[bo + i]!;
    else for (let i = 0; i < n; i++) o[oo + i] = fn(ad[ao + i]!, bd[bo + i]!);
    return;
  }
  // general strided walk: collect b's indices in the same row-major order as a's
  const bIdx = new Int32Array(n);
  forEachIndex(b.shape, b.strides, b.offset, (s, d) => {
    bIdx[d] = s;
  });
  forEachIndex(a.shape, a.strides, a.offset, (s, d) => {
    o[oo + d] = fn(ad[s]!, bd[bIdx[d]!]!);
  });
}

const SQRT_2_OVER_PI = Math.sqrt(2 / Math.PI);
function unary(op: UnaryOp, x: Tensor, out: Tensor, scalar = 0): void {
  const xd = f32(x);
  const o = f32(out);
  const xo = x.offset;
  const oo = out.offset;
  const n = x.size;
  let f: (v: number) => number;
  switch (op) {
    case 'neg':
      f = (v) => -v;
      break;
    case 'exp':
      f = Math.exp;
      break;
    case 'log':
      f = Math.log;
      break;
    case 'sqrt':
      f = Math.sqrt;
      break;
    case 'rsqrt':
      f = (v) => 1 / Math.sqrt(v);
      break;
    case 'abs':
      f = Math.abs;
      break;
    case 'square':
      f = (v) => v * v;
      break;
    case 'recip':
      f = (v) => 1 / v;
      break;
    case 'sigmoid':
      f = (v) => 1 / (1 + Math.exp(-v));
      break;
    case 'tanh':
      f = Math.tanh;
      break;
    case 'relu':
      f = (v) => Math.max(v, 0);
      break;
    case 'silu':
      f = (v) => v / (1 + Math.exp(-v));
      break;
    case 'gelu':
      // tanh approximation (gelu_pytorch_tanh), as used by Gemma-style MLPs
      f = (v) => 0.5 * v * (1 + Math.tanh(SQRT_2_OVER_PI * (v + 0.044715 * v * v * v)));
      break;
    case 'pow':
      f = (v) => v ** scalar;
      break;
    case 'scale':
      f = (v) => v * scalar;
      break;
    case 'addScalar':
      f = (v) => v + scalar;
      break;
    case 'sign':
      f = Math.sign;
      break;
    case 'sigmoidGrad':
      f = (v) => {
        const s = 1 / (1 + Math.exp(-v));
        return s * (1 - s);
      };
      break;
    case 'tanhGrad':
      f = (v) => 1 - Math.tanh(v) ** 2;
      break;
    case 'reluGrad':
      f = (v) => (v > 0 ? 1 : 0);
      break;
    case 'siluGrad':
      f = (v) => {
        const s = 1 / (1 + Math.exp(-v));
        return s * (1 + v * (1 - s));
      };
      break;
  }
  for (let i = 0; i < n; i++) o[oo + i] = f(xd[xo + i]!);
}

function reduce(op: ReduceOp, x: Tensor, out: Tensor, outer: number, n: number, inner: number): void {
  const xd = f32(x);
  const o = f32(out);
  const xo = x.offset;
  const oo = out.offset;
  for (let a = 0; a < outer; a++) {
    for (let c = 0; c < inner; c++) {
      const base = xo + a * n * inner + c;
      if (op === 'sum') {
        let s = 0;
        for (let j = 0; j < n; j++) s += xd[base + j * inner]!;
        o[oo + a * inner + c] = s;
      } else {
        let m = op === 'max' ? Number.NEGATIVE_INFINITY : Number.POSITIVE_INFINITY;
        for (let j = 0; j < n; j++) {
          const v = xd[base + j * inner]!;
          if (op === 'max' ? v > m : v < m) m = v;
          else if (Number.isNaN(v)) m = v;
        }
        o[oo + a * inner + c] = m;
      }
    }
  }
}

function checkIndex(op: string, idx: Int32Array, off: number, count: number, rows: number): void {
  for (let i = 0; i < count; i++) {
    const r = idx[off + i]!;
    if (r < 0 || r >= rows) throw new IndexError(`${op}: index ${r} at position ${i} is out of range [0, ${rows})`);
  }
}

function gatherRows(x: Tensor, idx: Tensor, out: Tensor, cols: number): void {
  const id = i32(idx);
  const count = idx.size;
  const rows = x.size / cols;
  checkIndex('gatherRows', id, idx.offset, count, rows);
  const xd = x.data;
  const od = out.data;
  const same = x.dtype === out.dtype;
  const rd = reader(x);
  for (let i = 0; i < count; i++) {
    const src = x.offset + id[idx.offset + i]! * cols;
    const dst = out.offset + i * cols;
    if (same) od.set(xd.subarray(src, src + cols), dst);
    else for (let j = 0; j < cols; j++) od[dst + j] = encodeScalar(out.dtype, rd(src + j));
  }
}

function scatterAddRows(g: Tensor, idx: Tensor, out: Tensor, cols: number): void {
  const id = i32(idx);
  const count = idx.size;
  const rows = out.size / cols;
  checkIndex('scatterAddRows', id, idx.offset, count, rows);
  const gd = f32(g);
  const od = f32(out);
  for (let i = 0; i < count; i++) {
    const dst = out.offset + id[idx.offset + i]! * cols;
    const src = g.offset + i * cols;
    for (let j = 0; j < cols; j++) od[dst + j] += gd[src + j]!;
  }
}

function alloc(dtype: DType, n: number, uninit = false): CpuStorage {
  if (!Number.isSafeInteger(n) || n < 0) throw new IndexError(`alloc: invalid element count ${n}`);
  return allocCpu(dtype, n, !uninit);
}

export const jsCoreKernels: CoreKernels = {
  name: 'js',
  device: 'cpu',
  alloc,
  gemm,
  copy,
  fill,
  binary,
  unary,
  reduce,
  gatherRows,
  scatterAddRows,
};
