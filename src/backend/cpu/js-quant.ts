// TypeScript reference kernels for 4-bit weights: unpack a tile of rows into a small f32 scratch, multiply
// with f64 accumulation. A decode (m = 1) fuses unpacking and the dot product, so no scratch is written.

import { DTypeError, fmtShape, ShapeError } from '../../core/errors.ts';
import type { Tensor } from '../../core/tensor.ts';
import type { QuantKernels, Weight4bit } from '../kernels/quant.ts';
import { f32, reader } from './js-core.ts';

/** Rows unpacked at a time by the general path (64 rows x 8192 cols = 2 MiB of scratch). */
export const TILE_ROWS = 64;
/** Inputs with at most this many rows take the GEMV path (one weight row at a time). */
export const SKINNY_M = 16;
/** Rows of dx accumulated in f64 at once by the backward (at most ~8 MiB of accumulators). */
const BACKWARD_ACC_ELEMS = 1 << 20;

function u8(t: Tensor, what: string): Uint8Array {
  const d = t.data;
  if (!(d instanceof Uint8Array)) throw new DTypeError(`4-bit weight: ${what} must be u8, got ${t.dtype}`);
  return d;
}

/** Typed views and offsets of a checked weight. */
interface W4 {
  rows: number;
  cols: number;
  bs: number;
  code: Float32Array;
  p: Uint8Array;
  pOff: number;
  /** Plain absmax (f32) or null. */
  am: Float32Array | null;
  /** Double quantization: absmax codes, nested scales, nested code, offset. */
  q: Uint8Array | null;
  na: Float32Array | null;
  nc: Float32Array | null;
  amOff: number;
  naOff: number;
  ncOff: number;
  nbs: number;
  offset: number;
}

function check(w: Weight4bit): W4 {
  const { rows, cols, blocksize: bs } = w;
  if (!Number.isInteger(rows) || !Number.isInteger(cols) || rows < 0 || cols < 0)
    throw new ShapeError(`4-bit weight: invalid shape [${rows}, ${cols}]`);
  if (!Number.isInteger(bs) || bs < 2 || bs % 2 !== 0)
    throw new ShapeError(`4-bit weight: blocksize must be an even positive integer, got ${bs}`);
  const n = rows * cols;
  const nblocks = Math.ceil(n / bs);
  if (w.packed.size < Math.ceil(n / 2))
    throw new ShapeError(`4-bit weight: ${w.packed.size} packed bytes cannot hold [${rows}, ${cols}]`);
  if (w.absmax.size !== nblocks)
    throw new ShapeError(
      `4-bit weight: ${w.absmax.size} absmax values for ${n} elements in blocks of ${bs} (need ${nblocks})`,
    );
  if (w.code.size !== 16 || !w.code.isContiguous())
    throw new ShapeError(`4-bit weight: the code must be 16 contiguous f32 values, got ${fmtShape(w.code.shape)}`);
  const code = f32(w.code).subarray(w.code.offset, w.code.offset + 16);
  const out: W4 = {
    rows,
    cols,
    bs,
    code,
    p: u8(w.packed, 'packed'),
    pOff: w.packed.offset,
    am: null,
    q: null,
    na: null,
    nc: null,
    amOff: w.absmax.offset,
    naOff: 0,
    ncOff: 0,
    nbs: w.nestedBlocksize,
    offset: w.offset,
  };
  if (w.absmax.dtype === 'f32') {
    out.am = f32(w.absmax);
  } else if (w.absmax.dtype === 'u8') {
    if (!w.nestedAbsmax || !w.nestedCode)
      throw new ShapeError('4-bit weight: u8 absmax (double quantization) needs nestedAbsmax and nestedCode');
    if (!Number.isInteger(w.nestedBlocksize) || w.nestedBlocksize <= 0)
      throw new ShapeError(`4-bit weight: invalid nestedBlocksize ${w.nestedBlocksize}`);
    if (w.nestedAbsmax.size !== Math.ceil(nblocks / w.nestedBlocksize))
      throw new ShapeError(
        `4-bit weight: ${w.nestedAbsmax.size} nested absmax values for ${nblocks} blocks (need ${Math.ceil(nblocks / w.nestedBlocksize)})`,
      );
    if (w.nestedCode.size !== 256)
      throw new ShapeError(`4-bit weight: nested code has ${w.nestedCode.size} values, expected 256`);
    out.q = u8(w.absmax, 'absmax');
    out.na = f32(w.nestedAbsmax);
    out.nc = f32(w.nestedCode);
    out.naOff = w.nestedAbsmax.offset;
    out.ncOff = w.nestedCode.offset;
  } else {
    throw new DTypeError(`4-bit weight: absmax must be f32 or u8 (double quantization), got ${w.absmax.dtype}`);
  }
  return out;
}

/** absmax of blocks [b0, b1) into s[0 .. b1 - b0), in f32 as bitsandbytes computes them. */
function blockScales(w: W4, b0: number, b1: number, s: Float32Array): void {
  if (w.am) {
    for (let b = b0; b < b1; b++) s[b - b0] = w.am[w.amOff + b]!;
    return;
  }
  const q = w.q!;
  const na = w.na!;
  const nc = w.nc!;
  const f = Math.fround;
  for (let b = b0; b < b1; b++) {
    s[b - b0] = f(f(nc[w.ncOff + q[w.amOff + b]!]! * na[w.naOff + Math.floor(b / w.nbs)]!) + w.offset);
  }
}

/** A scratch for the scales of the blocks that flat range [start, end) touches; returns its first block. */
function scalesFor(w: W4, start: number, end: number, s: Float32Array | null): [Float32Array, number] {
  const b0 = Math.floor(start / w.bs);
  const b1 = end > start ? Math.floor((end - 1) / w.bs) + 1 : b0;
  const need = b1 - b0;
  const buf = s && s.length >= need ? s : new Float32Array(Math.max(need, 1));
  blockScales(w, b0, b1, buf);
  return [buf, b0];
}

/**
 * Unpacks flat elements [start, end) into out[o...]. Per block a 16-entry table code[j] * absmax is built
 * (each entry rounded to f32, the value bitsandbytes computes), so an element costs one lookup.
 */
function decodeSpan(
  w: W4,
  scales: Float32Array,
  sBase: number,
  start: number,
  end: number,
  out: Float32Array,
  o: number,
  tbl: Float32Array,
): void {
  const { p, pOff, code, bs } = w;
  let i = start;
  while (i < end) {
    const b = Math.floor(i / bs);
    const s = scales[b - sBase]!;
    for (let j = 0; j < 16; j++) tbl[j] = code[j]! * s;
    const segEnd = Math.min(end, (b + 1) * bs);
    if (i & 1) {
      out[o++] = tbl[p[pOff + (i >> 1)]! & 15]!;
      i++;
    }
    let byte = pOff + (i >> 1);
    for (; i + 1 < segEnd; i += 2) {
      const v = p[byte++]!;
      out[o++] = tbl[v >> 4]!;
      out[o++] = tbl[v & 15]!;
    }
    if (i < segEnd) {
      out[o++] = tbl[p[pOff + (i >> 1)]! >> 4]!;
      i++;
    }
  }
}

/** sum_k x[xo + k] * (unpacked element start + k) over [start, end): the fused GEMV inner loop. */
function decodeDot(
  w: W4,
  scales: Float32Array,
  sBase: number,
  start: number,
  end: number,
  x: Float32Array,
  xo: number,
  tbl: Float32Array,
): number {
  const { p, pOff, code, bs } = w;
  let acc = 0;
  let i = start;
  let k = xo;
  while (i < end) {
    const b = Math.floor(i / bs);
    const s = scales[b - sBase]!;
    for (let j = 0; j < 16; j++) tbl[j] = code[j]! * s;
    const segEnd = Math.min(end, (b + 1) * bs);
    if (i & 1) {
      acc += tbl[p[pOff + (i >> 1)]! & 15]! * x[k++]!;
      i++;
    }
    let byte = pOff + (i >> 1);
    // four independent sums: the loop is bound by the latency of the adds, not by the loads
    let a0 = 0;
    let a1 = 0;
    let a2 = 0;
    let a3 = 0;
    for (; i + 3 < segEnd; i += 4) {
      const v = p[byte]!;
      const u = p[byte + 1]!;
      byte += 2;
      a0 += tbl[v >> 4]! * x[k]!;
      a1 += tbl[v & 15]! * x[k + 1]!;
      a2 += tbl[u >> 4]! * x[k + 2]!;
      a3 += tbl[u & 15]! * x[k + 3]!;
      k += 4;
    }
    for (; i + 1 < segEnd; i += 2) {
      const v = p[byte++]!;
      a0 += tbl[v >> 4]! * x[k]!;
      a1 += tbl[v & 15]! * x[k + 1]!;
      k += 2;
    }
    acc += a0 + a1 + (a2 + a3);
    if (i < segEnd) {
      acc += tbl[p[pOff + (i >> 1)]! >> 4]! * x[k++]!;
      i++;
    }
  }
  return acc;
}

function dot(a: Float32Array, ao: number, b: Float32Array, bo: number, n: number): number {
  let s0 = 0;
  let s1 = 0;
  let s2 = 0;
  let s3 = 0;
  let k = 0;
  for (; k + 3 < n; k += 4) {
    s0 += a[ao + k]! * b[bo + k]!;
    s1 += a[ao + k + 1]! * b[bo + k + 1]!;
    s2 += a[ao + k + 2]! * b[bo + k + 2]!;
    s3 += a[ao + k + 3]! * b[bo + k + 3]!;
  }
  for (; k < n; k++) s0 += a[ao + k]! * b[bo + k]!;
  return s0 + s1 + (s2 + s3);
}

function checkIo(op: string, t: Tensor, elems: number, what: string): Float32Array {
  const d = f32(t);
  if (!t.isContiguous() || t.size < elems)
    throw new ShapeError(`${op}: ${what} ${fmtShape(t.shape)} must be contiguous f32 with ${elems} elements`);
  return d;
}

function gemm4bit(x: Tensor, w: Weight4bit, bias: Tensor | null, y: Tensor, m: number): void {
  const W = check(w);
  const { rows: N, cols: K } = W;
  const xd = checkIo('gemm4bit', x, m * K, 'x');
  const yd = checkIo('gemm4bit', y, m * N, 'y');
  if (bias && bias.size !== N) throw new ShapeError(`gemm4bit: bias ${fmtShape(bias.shape)} does not fit ${N} rows`);
  const rb = bias ? reader(bias) : null;
  const bOff = bias ? bias.offset : 0;
  const xo = x.offset;
  const yo = y.offset;
  const tbl = new Float32Array(16);
  let scales: Float32Array | null = null;
  let sBase = 0;
  if (m === 1) {
    // Decoding: one pass over the packed weight, each element decoded once and used at once.
    for (let n = 0; n < N; n++) {
      const start = n * K;
      [scales, sBase] = scalesFor(W, start, start + K, scales);
      const acc = decodeDot(W, scales, sBase, start, start + K, xd, xo, tbl);
      yd[yo + n] = rb ? acc + rb(bOff + n) : acc;
    }
    return;
  }
  const tileRows = m <= SKINNY_M ? 1 : Math.max(1, Math.min(TILE_ROWS, N));
  const scratch = new Float32Array(tileRows * K);
  for (let n0 = 0; n0 < N; n0 += tileRows) {
    const rows = Math.min(tileRows, N - n0);
    const start = n0 * K;
    const end = start + rows * K;
    [scales, sBase] = scalesFor(W, start, end, scales);
    decodeSpan(W, scales, sBase, start, end, scratch, 0, tbl);
    for (let i = 0; i < m; i++) {
      const xr = xo + i * K;
      const yr = yo + i * N + n0;
      for (let r = 0; r < rows; r++) {
        const acc = dot(xd, xr, scratch, r * K, K);
        yd[yr + r] = rb ? acc + rb(bOff + n0 + r) : acc;
      }
    }
  }
}

function gemm4bitBackwardInput(g: Tensor, w: Weight4bit, dx: Tensor, m: number): void {
  const W = check(w);
  const { rows: N, cols: K } = W;
  const gd = checkIo('gemm4bitBackwardInput', g, m * N, 'g');
  const dd = checkIo('gemm4bitBackwardInput', dx, m * K, 'dx');
  const go = g.offset;
  const dOff = dx.offset;
  if (K === 0 || m === 0) return;
  const tileRows = Math.max(1, Math.min(TILE_ROWS, N));
  const scratch = new Float32Array(tileRows * K);
  const tbl = new Float32Array(16);
  let scales: Float32Array | null = null;
  let sBase = 0;
  // dx rows in chunks whose f64 accumulators stay small; the weight is unpacked once per chunk.
  const mc = Math.max(1, Math.min(m, Math.floor(BACKWARD_ACC_ELEMS / K)));
  const acc = new Float64Array(mc * K);
  for (let m0 = 0; m0 < m; m0 += mc) {
    const mrows = Math.min(mc, m - m0);
    acc.fill(0, 0, mrows * K);
    for (let n0 = 0; n0 < N; n0 += tileRows) {
      const rows = Math.min(tileRows, N - n0);
      const start = n0 * K;
      const end = start + rows * K;
      [scales, sBase] = scalesFor(W, start, end, scales);
      decodeSpan(W, scales, sBase, start, end, scratch, 0, tbl);
      for (let i = 0; i < mrows; i++) {
        const gr = go + (m0 + i) * N + n0;
        const ar = i * K;
        for (let r = 0; r < rows; r++) {
          const gv = gd[gr + r]!;
          if (gv === 0) continue;
          const wr = r * K;
          for (let k = 0; k < K; k++) acc[ar + k] += gv * scratch[wr + k]!;
        }
      }
    }
    for (let i = 0; i < mrows * K; i++) dd[dOff + m0 * K + i] = acc[i]!;
  }
}

function dequantize4bitRows(w: Weight4bit, row0: number, count: number, out: Tensor): void {
  const W = check(w);
  if (!Number.isInteger(row0) || !Number.isInteger(count) || row0 < 0 || count < 0 || row0 + count > W.rows)
    throw new ShapeError(`dequantize4bitRows: rows [${row0}, ${row0 + count}) outside [0, ${W.rows})`);
  const od = checkIo('dequantize4bitRows', out, count * W.cols, 'out');
  const start = row0 * W.cols;
  const end = start + count * W.cols;
  const [scales, sBase] = scalesFor(W, start, end, null);
  decodeSpan(W, scales, sBase, start, end, od, out.offset, new Float32Array(16));
}

export const jsQuantKernels: QuantKernels = { gemm4bit, gemm4bitBackwardInput, dequantize4bitRows };
