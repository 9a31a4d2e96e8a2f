// The native CPU backend: the TypeScript reference kernels with the hot ones replaced by the C++ addon's
// (native/ops_*.cc, OpenMP, AVX-512 / AVX2 / generic chosen at load). Each kernel here checks what the
// native code supports (dtypes, layouts) and hands anything else to the reference, which also raises the
// reference's errors for bad input, so both backends fail alike. Errors a kernel detects itself (an id or
// target out of range) are raised here with the reference's message before the addon is called.

import { type DType, encodeScalar } from '../../core/dtype.ts';
import { IndexError } from '../../core/errors.ts';
import type { Tensor } from '../../core/tensor.ts';
import type { Backend, BinaryOp, CoreKernels, GemmArgs, RecordedPlan, ReduceOp, UnaryOp } from '../backend.ts';
import type { AttentionArgs } from '../kernels/attention.ts';
import type { LoraRowsGroup } from '../kernels/lora.ts';
import type { Weight4bit } from '../kernels/quant.ts';
import { jsBackend } from './js.ts';
import { dropoutThreshold } from './js-dropout.ts';
import { fmtPosition } from './js-embedding.ts';
import { checkLoraSizes, checkLoraWeights, checkRowGroups } from './js-lora.ts';
import { loadNativeAddon, type NativeAddon } from './native-addon.ts';

type F32 = Float32Array;
type Arr = Float32Array | Uint16Array | Int32Array | Uint8Array;
type OptArr = Arr | null;

/** The op kernels of the addon (native/ops_addon.cc); argument lists as documented there. */
export interface NativeOps {
  binary(op: number, a: F32, aOff: number, b: F32, bOff: number, out: F32, outOff: number, desc: Float64Array): void;
  unary(op: number, x: F32, xOff: number, out: F32, outOff: number, n: number, scalar: number): void;
  reduce(op: number, x: F32, xOff: number, out: F32, outOff: number, outer: number, n: number, inner: number): void;
  copy(src: Arr, srcOff: number, srcDt: number, dst: Arr, dstOff: number, dstDt: number, desc: Float64Array): void;
  fill(dst: Arr, off: number, n: number, dtype: number, value: number): void;
  gatherRows(
    x: Arr,
    xOff: number,
    xDt: number,
    xRows: number,
    idx: Int32Array,
    idxOff: number,
    count: number,
    cols: number,
    out: Arr,
    outOff: number,
    outDt: number,
  ): void;
  scatterAddRows(
    g: F32,
    gOff: number,
    idx: Int32Array,
    idxOff: number,
    count: number,
    cols: number,
    out: F32,
    outOff: number,
    outRows: number,
    skip: number,
  ): void;
  gemmRows(...args: (number | boolean | Arr)[]): void;
  rmsNormForward(...args: (number | Arr)[]): void;
  rmsNormBackward(...args: (number | OptArr)[]): void;
  rope(...args: (number | Arr)[]): void;
  swigluForward(...args: (number | Arr)[]): void;
  swigluBackward(...args: (number | OptArr)[]): void;
  softmaxForward(x: F32, xOff: number, out: F32, oOff: number, rows: number, cols: number, log: boolean): void;
  softmaxBackward(...args: (number | boolean | Arr)[]): void;
  attentionForward(...args: (number | boolean | OptArr | Float64Array)[]): void;
  attentionBackward(...args: (number | boolean | OptArr | Float64Array)[]): void;
  crossEntropyForward(...args: (number | OptArr)[]): number;
  crossEntropyBackward(...args: (number | OptArr)[]): void;
  adamwStep(...args: (number | Arr | Float64Array)[]): void;
  sumSquares(x: F32, off: number, n: number): number;
  dropout(...args: (number | Arr)[]): void;
  loraWeightNorm(...args: (number | boolean | Arr)[]): void;
  loraRows(
    x: F32,
    xOff: number,
    out: F32,
    oOff: number,
    rows: number,
    inF: number,
    outF: number,
    rowGroup: Int32Array,
    rgOff: number,
    desc: Float64Array,
    ngroups: number,
    ...buffers: ArrayBufferLike[]
  ): void;
  gemm4bit(...args: (number | boolean | OptArr | Float64Array)[]): void;
  gemm4bitBackwardInput(...args: (number | boolean | OptArr | Float64Array)[]): void;
  dequantize4bitRows(...args: (number | boolean | OptArr | Float64Array)[]): void;
  opsIsa(): string;
  allocStreamed?(bytes: number): ArrayBuffer;
  argmax?(x: F32, off: number, n: number): number;
  planCreate?(): object;
  planAdd?(plan: object, name: string, ...args: unknown[]): void;
  planDynamic?(plan: object, step: number): void;
  planRun?(plan: object, L: number, mask: Int32Array | null, maskOff: number): void;
  planFree?(plan: object): void;
  loraPackedFloats(r: number, inF: number, outF: number): number;
  loraPack(
    a: F32,
    aOff: number,
    b: F32,
    bOff: number,
    r: number,
    inF: number,
    outF: number,
    out: F32,
    outOff: number,
  ): void;
}

export type NativeWithOps = NativeAddon & NativeOps;

const DT: Partial<Record<DType, number>> = { f32: 0, bf16: 1, f16: 2, i32: 3, u8: 4 };
const isFloatDt = (t: Tensor) => t.dtype === 'f32' || t.dtype === 'bf16' || t.dtype === 'f16';
const isF32 = (t: Tensor) => t.dtype === 'f32';
/** f32 and contiguous. */
const f32c = (t: Tensor) => t.dtype === 'f32' && t.isContiguous();

const BINARY: Record<BinaryOp, number> = { add: 0, sub: 1, mul: 2, div: 3, max: 4, min: 5, eq: 6 };
const UNARY: Record<UnaryOp, number> = {
  neg: 0,
  exp: 1,
  log: 2,
  sqrt: 3,
  rsqrt: 4,
  abs: 5,
  square: 6,
  recip: 7,
  sigmoid: 8,
  tanh: 9,
  relu: 10,
  silu: 11,
  gelu: 12,
  pow: 13,
  scale: 14,
  addScalar: 15,
  sign: 16,
  sigmoidGrad: 17,
  tanhGrad: 18,
  reluGrad: 19,
  siluGrad: 20,
};
const REDUCE: Record<ReduceOp, number> = { sum: 0, max: 1, min: 2 };
const UNARY_GELU_TANH = 12;

/**
 * Below this many elements the call overhead of the addon is not worth it. Only for kernels whose native
 * result is bit-identical to the reference's: switching implementation by size must never change a value,
 * or a row's result would depend on how many rows share the call.
 */
const SMALL = 256;

/**
 * Merges the dims of a shape that every stride set lets merge (drops size-1 dims), so that typical views
 * become at most 4 dims. Returns null when more than 4 remain.
 */
export function collapseDims(
  shape: readonly number[],
  strides: (readonly number[])[],
): { shape: number[]; strides: number[][] } | null {
  const sh: number[] = [];
  const st: number[][] = strides.map(() => []);
  for (let d = 0; d < shape.length; d++) {
    if (shape[d] === 1) continue;
    const last = sh.length - 1;
    if (last >= 0 && strides.every((s, i) => st[i]![last] === s[d]! * shape[d]!)) {
      sh[last] = sh[last]! * shape[d]!;
      strides.forEach((s, i) => {
        st[i]![last] = s[d]!;
      });
    } else {
      sh.push(shape[d]!);
      for (let i = 0; i < strides.length; i++) st[i]!.push(strides[i]![d]!);
    }
  }
  if (sh.length === 0) {
    sh.push(1);
    for (const s of st) s.push(1);
  }
  if (sh.length > 4) return null;
  return { shape: sh, strides: st };
}

/** desc = [ndim, shape[4], strides0[4], strides1[4]] for the binary and copy kernels. */
function stridedDesc(c: { shape: number[]; strides: number[][] }): Float64Array {
  const d = new Float64Array(13);
  d[0] = c.shape.length;
  for (let k = 0; k < c.shape.length; k++) {
    d[1 + k] = c.shape[k]!;
    d[5 + k] = c.strides[0]![k]!;
    d[9 + k] = c.strides[1]![k]!;
  }
  return d;
}

function checkRowIndex(op: string, idx: Int32Array, off: number, count: number, rows: number): void {
  for (let i = 0; i < count; i++) {
    const r = idx[off + i]!;
    if (r < 0 || r >= rows) throw new IndexError(`${op}: index ${r} at position ${i} is out of range [0, ${rows})`);
  }
}

function w4Args(w: Weight4bit): (number | boolean | OptArr | Float64Array)[] {
  const u8 = w.absmax.dtype === 'u8';
  const nc = w.nestedCode;
  const desc = new Float64Array([w.rows, w.cols, w.blocksize, w.nestedBlocksize, w.offset, nc ? nc.offset : 0]);
  return [
    w.code.data,
    w.code.offset,
    w.packed.data,
    w.packed.offset,
    w.absmax.data,
    w.absmax.offset,
    u8,
    w.nestedAbsmax ? w.nestedAbsmax.data : null,
    w.nestedAbsmax ? w.nestedAbsmax.offset : 0,
    nc ? nc.data : null,
    desc,
  ];
}

/** Whether the native 4-bit kernels take this weight (anything else goes to the reference, which validates). */
function w4Ok(w: Weight4bit): boolean {
  const { rows, cols, blocksize: bs } = w;
  if (!Number.isInteger(rows) || !Number.isInteger(cols) || rows < 0 || cols < 0) return false;
  if (!Number.isInteger(bs) || bs < 2 || bs % 2 !== 0) return false;
  const n = rows * cols;
  const nblocks = Math.ceil(n / bs);
  if (w.packed.dtype !== 'u8' || w.packed.size < Math.ceil(n / 2) || !w.packed.isContiguous()) return false;
  if (w.code.dtype !== 'f32' || w.code.size !== 16 || !w.code.isContiguous()) return false;
  if (w.absmax.size !== nblocks || !w.absmax.isContiguous()) return false;
  if (w.absmax.dtype === 'f32') return true;
  if (w.absmax.dtype !== 'u8' || !w.nestedAbsmax || !w.nestedCode) return false;
  if (!Number.isInteger(w.nestedBlocksize) || w.nestedBlocksize <= 0) return false;
  return (
    f32c(w.nestedAbsmax) &&
    w.nestedAbsmax.size === Math.ceil(nblocks / w.nestedBlocksize) &&
    f32c(w.nestedCode) &&
    w.nestedCode.size === 256
  );
}

function attnDesc(a: AttentionArgs): Float64Array | null {
  const { q, k, v } = a;
  if (q.ndim !== 4 || k.ndim !== 4 || v.ndim !== 4) return null;
  if (!isFloatDt(q) || !isFloatDt(k) || !isFloatDt(v)) return null;
  if (q.strides[3] !== 1 || k.strides[3] !== 1 || v.strides[3] !== 1) return null;
  for (const t of [q, k, v]) if (t.strides.some((s) => s < 0)) return null;
  const [B, Tq, Hq, D] = q.shape as [number, number, number, number];
  const [kb, Tk, Hkv, kd] = k.shape as [number, number, number, number];
  if (kb !== B || kd !== D || Hkv < 1 || Hq % Hkv !== 0 || Tq > Tk) return null;
  if (v.shape[0] !== B || v.shape[1] !== Tk || v.shape[2] !== Hkv || v.shape[3] !== D) return null;
  if (a.keyMask && (!(a.keyMask.dtype === 'u8' || a.keyMask.dtype === 'i32') || !a.keyMask.isContiguous())) return null;
  if (a.seqIds && (a.seqIds.dtype !== 'i32' || !a.seqIds.isContiguous())) return null;
  if (!Number.isInteger(a.window) || a.window < 0) return null;
  const d = new Float64Array(22);
  d.set([B, Tq, Tk, Hq, Hkv, D]);
  d.set([q.offset, q.strides[0]!, q.strides[1]!, q.strides[2]!], 6);
  d.set([k.offset, k.strides[0]!, k.strides[1]!, k.strides[2]!], 10);
  d.set([v.offset, v.strides[0]!, v.strides[1]!, v.strides[2]!], 14);
  d[18] = a.scale;
  d[19] = a.keyMask ? a.keyMask.offset : 0;
  d[20] = a.seqIds ? a.seqIds.offset : 0;
  d[21] = a.window;
  return d;
}

function attnHead(a: AttentionArgs): (number | boolean | OptArr)[] {
  return [
    a.q.data,
    DT[a.q.dtype]!,
    a.k.data,
    DT[a.k.dtype]!,
    a.v.data,
    DT[a.v.dtype]!,
    a.keyMask ? a.keyMask.data : null,
    a.keyMask ? a.keyMask.dtype === 'i32' : false,
    a.seqIds ? a.seqIds.data : null,
  ];
}

// loraRows' arguments, reused from call to call: the weights' ArrayBuffers (each once in a row: tensors sharing a
// storage pass one) and per group aBuffer, aOff, bBuffer, bOff, r, scale, biasBuffer (-1: none), biasOff, with
// offsets in floats from the buffer's start.
const loraBuffers: ArrayBufferLike[] = [];
let loraDescBuf = new Float64Array(64 * 8);

function loraBuffer(desc: Float64Array, d: number, buf: ArrayBufferLike, off: number): void {
  const k = loraBuffers.length - 1;
  desc[d] = k >= 0 && loraBuffers[k] === buf ? k : loraBuffers.push(buf) - 1;
  desc[d + 1] = off;
}

/** A tensor's ArrayBuffer and its offset there in floats. */
function bufferOf(t: Tensor): [ArrayBufferLike, number] {
  const arr = t.data as F32;
  return [arr.buffer, arr.byteOffset / 4 + t.offset];
}

/**
 * Checks the operands as the reference does and fills loraBuffers and the descriptor. A group's buffers are
 * found once (kept with its checked weights); later calls only check that the tensors were not disposed. A
 * frozen adapter (neither A nor B requires a gradient: served and generating adapters) is packed for the kernel
 * once and passed packed (lora_B's buffer index -1), which spares every call its transposes.
 */
function loraDesc(
  n: NativeWithOps,
  x: Tensor,
  out: Tensor,
  rowGroup: Tensor,
  groups: readonly LoraRowsGroup[],
  rows: number,
  inF: number,
  outF: number,
): Float64Array {
  checkLoraSizes(x, out, rowGroup, rows, inF, outF);
  if (loraDescBuf.length < 8 * groups.length) loraDescBuf = new Float64Array(16 * groups.length);
  const desc = loraDescBuf;
  loraBuffers.length = 0;
  let isa: string | undefined;
  for (let k = 0; k < groups.length; k++) {
    const g = groups[k]!;
    const c = checkLoraWeights(g, k, inF, outF);
    let nv = c.native;
    if (!nv) {
      const [a, aOff] = bufferOf(g.a);
      const [b, bOff] = bufferOf(g.b);
      const [lb, lbOff] = g.loraBias ? bufferOf(g.loraBias) : [null, 0];
      nv = c.native = { a, aOff, b, bOff, lb, lbOff };
    } else {
      // a disposed tensor fails as when its data is read
      void g.a.storage;
      void g.b.storage;
      if (g.loraBias) void g.loraBias.storage;
    }
    const d = 8 * k;
    if (!g.a.requiresGrad && !g.b.requiresGrad) {
      isa ??= n.opsIsa();
      if (c.packed?.isa !== isa) {
        const data = new Float32Array(n.loraPackedFloats(c.r, inF, outF));
        n.loraPack(g.a.data as F32, g.a.offset, g.b.data as F32, g.b.offset, c.r, inF, outF, data, 0);
        c.packed = { isa, data };
      }
      loraBuffer(desc, d, c.packed.data.buffer, 0);
      desc[d + 2] = -1;
      desc[d + 3] = 0;
    } else {
      loraBuffer(desc, d, nv.a, nv.aOff);
      loraBuffer(desc, d + 2, nv.b, nv.bOff);
    }
    desc[d + 4] = c.r;
    desc[d + 5] = g.scale;
    if (nv.lb) loraBuffer(desc, d + 6, nv.lb, nv.lbOff);
    else {
      desc[d + 6] = -1;
      desc[d + 7] = 0;
    }
  }
  checkRowGroups(rowGroup, rows, groups.length);
  return desc;
}

/** Builds the native backend over a loaded addon. */
export function makeNativeBackend(addon: NativeWithOps): Backend {
  // swapped for recorders while a plan is recorded (recordPlan)
  let n: NativeWithOps = addon;
  let js: Backend = jsBackend;
  let recording = false;
  const f = (t: Tensor) => t.data as F32;

  const core: Partial<CoreKernels> = {
    ...(n.allocStreamed && { allocStreamed: (bytes: number) => n.allocStreamed!(bytes) }),
    ...(addon.argmax && { argmax: (x: Float32Array) => addon.argmax!(x, 0, x.length) }),
    ...(addon.planCreate && { recordPlan: (body) => recordPlan(body) }),
    gemm(p: GemmArgs) {
      if (!isFloatDt(p.a) || !isFloatDt(p.b) || !isF32(p.c)) return js.gemm(p);
      // With A transposed the rows of C are not batch rows (weight gradients: K runs over the tokens), so no
      // row-invariance is owed: take the addon's fastest paths (its skinny kernels for LoRA's rank-r sides).
      const run = p.transA ? n.gemmBatched.bind(n) : n.gemmRows.bind(n);
      run(
        p.batch ?? 1,
        p.transA,
        p.transB,
        p.m,
        p.n,
        p.k,
        p.alpha,
        p.a.data,
        p.aOff,
        p.lda,
        p.strideA ?? 0,
        DT[p.a.dtype]!,
        p.b.data,
        p.bOff,
        p.ldb,
        p.strideB ?? 0,
        DT[p.b.dtype]!,
        p.beta,
        p.c.data,
        p.cOff,
        p.ldc,
        p.strideC ?? 0,
      );
    },
    copy(src: Tensor, dst: Tensor) {
      const sameDt = src.dtype === dst.dtype;
      if ((src.size < SMALL && !recording) || (!sameDt && !(isFloatDt(src) && isFloatDt(dst))) || src.size !== dst.size)
        return js.copy(src, dst);
      if (src.shape.length !== dst.shape.length || src.shape.some((d, i) => d !== dst.shape[i]))
        return js.copy(src, dst);
      const c = collapseDims(src.shape, [src.strides, dst.strides]);
      if (!c) return js.copy(src, dst);
      n.copy(src.data, src.offset, DT[src.dtype]!, dst.data, dst.offset, DT[dst.dtype]!, stridedDesc(c));
    },
    fill(dst: Tensor, value: number) {
      if (dst.size < 65536 || !isFloatDt(dst) || !dst.isContiguous()) return js.fill(dst, value);
      n.fill(dst.data, dst.offset, dst.size, DT[dst.dtype]!, encodeScalar(dst.dtype, value));
    },
    binary(op: BinaryOp, a: Tensor, b: Tensor, out: Tensor) {
      if ((out.size < SMALL && !recording) || !isF32(a) || !isF32(b) || !f32c(out)) return js.binary(op, a, b, out);
      const c = collapseDims(a.shape, [a.strides, b.strides]);
      if (!c) return js.binary(op, a, b, out);
      n.binary(BINARY[op], f(a), a.offset, f(b), b.offset, f(out), out.offset, stridedDesc(c));
    },
    unary(op: UnaryOp, x: Tensor, out: Tensor, scalar = 0) {
      if (!f32c(x) || !f32c(out)) return js.unary(op, x, out, scalar);
      n.unary(UNARY[op], f(x), x.offset, f(out), out.offset, x.size, scalar);
    },
    reduce(op: ReduceOp, x: Tensor, out: Tensor, outer: number, len: number, inner: number) {
      if (!f32c(x) || !f32c(out)) return js.reduce(op, x, out, outer, len, inner);
      n.reduce(REDUCE[op], f(x), x.offset, f(out), out.offset, outer, len, inner);
    },
    gatherRows(x: Tensor, idx: Tensor, out: Tensor, cols: number) {
      const ok =
        (x.dtype === out.dtype || (isFloatDt(x) && isFloatDt(out))) &&
        idx.dtype === 'i32' &&
        x.isContiguous() &&
        out.isContiguous() &&
        cols > 0 &&
        Number.isInteger(x.size / cols);
      if (!ok || idx.size * cols < SMALL) return js.gatherRows(x, idx, out, cols);
      const rows = x.size / cols;
      const id = idx.data as Int32Array;
      checkRowIndex('gatherRows', id, idx.offset, idx.size, rows);
      n.gatherRows(
        x.data,
        x.offset,
        DT[x.dtype]!,
        rows,
        id,
        idx.offset,
        idx.size,
        cols,
        out.data,
        out.offset,
        DT[out.dtype]!,
      );
    },
    scatterAddRows(g: Tensor, idx: Tensor, out: Tensor, cols: number) {
      const ok = f32c(g) && f32c(out) && idx.dtype === 'i32' && cols > 0 && Number.isInteger(out.size / cols);
      if (!ok || idx.size * cols < SMALL) return js.scatterAddRows(g, idx, out, cols);
      const rows = out.size / cols;
      const id = idx.data as Int32Array;
      checkRowIndex('scatterAddRows', id, idx.offset, idx.size, rows);
      n.scatterAddRows(f(g), g.offset, id, idx.offset, idx.size, cols, f(out), out.offset, rows, -1);
    },
  };

  const kernels: Partial<Backend> = {
    ropeForward(x, positions, invFreq, out) {
      if (!rotOk(x, positions, invFreq, out)) return js.ropeForward(x, positions, invFreq, out);
      rope(x, positions, invFreq, out, 1);
    },
    ropeBackward(g, positions, invFreq, gx) {
      if (!rotOk(g, positions, invFreq, gx)) return js.ropeBackward(g, positions, invFreq, gx);
      rope(g, positions, invFreq, gx, -1);
    },

    attentionForward(a, out, lse) {
      const d = attnDesc(a);
      if (!d || !f32c(out) || !f32c(lse)) return js.attentionForward(a, out, lse);
      n.attentionForward(...attnHead(a), f(out), out.offset, f(lse), lse.offset, d);
    },
    attentionBackward(a, out, lse, gOut, dq, dk, dv) {
      const d = attnDesc(a);
      const okOut = (t: Tensor | null) => t === null || f32c(t);
      if (!d || !f32c(out) || !f32c(lse) || !f32c(gOut) || !okOut(dq) || !okOut(dk) || !okOut(dv))
        return js.attentionBackward(a, out, lse, gOut, dq, dk, dv);
      n.attentionBackward(
        ...attnHead(a),
        f(out),
        out.offset,
        f(lse),
        lse.offset,
        f(gOut),
        gOut.offset,
        dq ? f(dq) : null,
        dq ? dq.offset : 0,
        dk ? f(dk) : null,
        dk ? dk.offset : 0,
        dv ? f(dv) : null,
        dv ? dv.offset : 0,
        d,
      );
    },

    rmsNormForward(x, w, y, rstd, rows, dim, eps) {
      if (!f32c(x) || !isFloatDt(w) || !w.isContiguous() || !f32c(y) || !f32c(rstd))
        return js.rmsNormForward(x, w, y, rstd, rows, dim, eps);
      n.rmsNormForward(
        f(x),
        x.offset,
        w.data,
        w.offset,
        DT[w.dtype]!,
        f(y),
        y.offset,
        f(rstd),
        rstd.offset,
        rows,
        dim,
        eps,
      );
    },
    rmsNormBackward(g, x, w, rstd, dx, dw, rows, dim) {
      const ok = (t: Tensor | null) => t === null || f32c(t);
      if (!f32c(g) || !f32c(x) || !isFloatDt(w) || !w.isContiguous() || !f32c(rstd) || !ok(dx) || !ok(dw))
        return js.rmsNormBackward(g, x, w, rstd, dx, dw, rows, dim);
      n.rmsNormBackward(
        f(g),
        g.offset,
        f(x),
        x.offset,
        w.data,
        w.offset,
        DT[w.dtype]!,
        f(rstd),
        rstd.offset,
        dx ? f(dx) : null,
        dx ? dx.offset : 0,
        dw ? f(dw) : null,
        dw ? dw.offset : 0,
        rows,
        dim,
      );
    },

    swigluForward(gate, up, out) {
      if (!f32c(gate) || !f32c(up) || !f32c(out)) return js.swigluForward(gate, up, out);
      n.swigluForward(f(gate), gate.offset, f(up), up.offset, f(out), out.offset, out.size);
    },
    swigluBackward(g, gate, up, dGate, dUp) {
      const ok = (t: Tensor | null) => t === null || f32c(t);
      if (!f32c(g) || !f32c(gate) || !f32c(up) || !ok(dGate) || !ok(dUp))
        return js.swigluBackward(g, gate, up, dGate, dUp);
      n.swigluBackward(
        f(g),
        g.offset,
        f(gate),
        gate.offset,
        f(up),
        up.offset,
        dGate ? f(dGate) : null,
        dGate ? dGate.offset : 0,
        dUp ? f(dUp) : null,
        dUp ? dUp.offset : 0,
        g.size,
      );
    },
    geluForward(x, out, approximate) {
      // the tanh form is the core unary 'gelu' (same formula, f64); the erf form stays on the reference
      if (approximate !== 'tanh' || !f32c(x) || !f32c(out)) return js.geluForward(x, out, approximate);
      n.unary(UNARY_GELU_TANH, f(x), x.offset, f(out), out.offset, out.size, 0);
    },
    softmaxForward(x, out, rows, cols) {
      if (!f32c(x) || !f32c(out)) return js.softmaxForward(x, out, rows, cols);
      n.softmaxForward(f(x), x.offset, f(out), out.offset, rows, cols, false);
    },
    softmaxBackward(g, y, dx, rows, cols) {
      if (!f32c(g) || !f32c(y) || !f32c(dx)) return js.softmaxBackward(g, y, dx, rows, cols);
      n.softmaxBackward(f(g), g.offset, f(y), y.offset, f(dx), dx.offset, rows, cols, false);
    },
    logSoftmaxForward(x, out, rows, cols) {
      if (!f32c(x) || !f32c(out)) return js.logSoftmaxForward(x, out, rows, cols);
      n.softmaxForward(f(x), x.offset, f(out), out.offset, rows, cols, true);
    },
    logSoftmaxBackward(g, y, dx, rows, cols) {
      if (!f32c(g) || !f32c(y) || !f32c(dx)) return js.logSoftmaxBackward(g, y, dx, rows, cols);
      n.softmaxBackward(f(g), g.offset, f(y), y.offset, f(dx), dx.offset, rows, cols, true);
    },

    crossEntropyForward(logits, targets, lse, loss, rows, vocab, ignoreIndex, reduction) {
      if (!f32c(logits) || targets.dtype !== 'i32' || !targets.isContiguous() || !f32c(lse) || !f32c(loss))
        return js.crossEntropyForward(logits, targets, lse, loss, rows, vocab, ignoreIndex, reduction);
      const t = targets.data as Int32Array;
      let count = 0;
      for (let r = 0; r < rows; r++) {
        const v = t[targets.offset + r]!;
        if (v === ignoreIndex) continue;
        if (v < 0 || v >= vocab)
          throw new IndexError(
            `crossEntropy: target ${v} at position ${fmtPosition(targets.shape, r)} of targets ${JSON.stringify(targets.shape)} is out of range [0, ${vocab}) and is not the ignore index ${ignoreIndex}`,
          );
        count++;
      }
      const none = reduction === 'none';
      const total = n.crossEntropyForward(
        f(logits),
        logits.offset,
        t,
        targets.offset,
        f(lse),
        lse.offset,
        none ? f(loss) : null,
        none ? loss.offset : 0,
        rows,
        vocab,
        ignoreIndex,
      );
      if (reduction === 'sum') f(loss)[loss.offset] = total;
      else if (reduction === 'mean') f(loss)[loss.offset] = count > 0 ? total / count : 0;
    },
    crossEntropyBackward(gradOut, logits, targets, lse, dlogits, rows, vocab, ignoreIndex, reduction) {
      if (
        !f32c(gradOut) ||
        !f32c(logits) ||
        targets.dtype !== 'i32' ||
        !targets.isContiguous() ||
        !f32c(lse) ||
        !f32c(dlogits)
      )
        return js.crossEntropyBackward(gradOut, logits, targets, lse, dlogits, rows, vocab, ignoreIndex, reduction);
      const t = targets.data as Int32Array;
      const g = f(gradOut);
      let shared = 0;
      if (reduction !== 'none') {
        let count = 0;
        if (reduction === 'mean') for (let r = 0; r < rows; r++) if (t[targets.offset + r]! !== ignoreIndex) count++;
        shared = reduction === 'mean' ? (count > 0 ? g[gradOut.offset]! / count : 0) : g[gradOut.offset]!;
      }
      const none = reduction === 'none';
      n.crossEntropyBackward(
        none ? g : null,
        none ? gradOut.offset : 0,
        shared,
        f(logits),
        logits.offset,
        t,
        targets.offset,
        f(lse),
        lse.offset,
        f(dlogits),
        dlogits.offset,
        rows,
        vocab,
        ignoreIndex,
      );
    },

    embeddingForward(weight, ids, out, vocab, dim) {
      if (!isFloatDt(weight) || !weight.isContiguous() || ids.dtype !== 'i32' || !ids.isContiguous() || !f32c(out))
        return js.embeddingForward(weight, ids, out, vocab, dim);
      const id = ids.data as Int32Array;
      const cnt = ids.size;
      for (let i = 0; i < cnt; i++) {
        const v = id[ids.offset + i]!;
        if (v < 0 || v >= vocab)
          throw new IndexError(
            `embedding: id ${v} at position ${fmtPosition(ids.shape, i)} of ids ${JSON.stringify(ids.shape)} is out of range [0, ${vocab})`,
          );
      }
      n.gatherRows(
        weight.data,
        weight.offset,
        DT[weight.dtype]!,
        vocab,
        id,
        ids.offset,
        cnt,
        dim,
        f(out),
        out.offset,
        0,
      );
    },
    embeddingBackward(g, ids, dWeight, vocab, dim, paddingIdx) {
      if (!f32c(g) || ids.dtype !== 'i32' || !ids.isContiguous() || !f32c(dWeight))
        return js.embeddingBackward(g, ids, dWeight, vocab, dim, paddingIdx);
      n.scatterAddRows(
        f(g),
        g.offset,
        ids.data as Int32Array,
        ids.offset,
        ids.size,
        dim,
        f(dWeight),
        dWeight.offset,
        vocab,
        paddingIdx < 0 ? -1 : paddingIdx,
      );
    },

    dropout(x, out, p, key0, key1) {
      if (out.size < SMALL || !f32c(x) || !f32c(out)) return js.dropout(x, out, p, key0, key1);
      n.dropout(
        f(x),
        x.offset,
        f(out),
        out.offset,
        out.size,
        dropoutThreshold(p),
        p < 1 ? 1 / (1 - p) : 0,
        key0 >>> 0,
        key1 >>> 0,
      );
    },

    adamwStep(p, g, m, v, a) {
      if (!f32c(p) || !f32c(g) || !f32c(m) || !f32c(v) || g.size !== p.size) return js.adamwStep(p, g, m, v, a);
      const bc1 = 1 - a.beta1 ** a.step;
      const bc2 = 1 - a.beta2 ** a.step;
      const desc = new Float64Array([
        a.beta1,
        a.beta2,
        1 - a.beta1,
        1 - a.beta2,
        bc2,
        a.lr / bc1,
        1 - a.lr * a.weightDecay,
        a.eps,
        a.gradScale,
      ]);
      n.adamwStep(f(p), p.offset, f(g), g.offset, f(m), m.offset, f(v), v.offset, p.size, desc);
    },
    sumSquares(x) {
      if (!f32c(x)) return js.sumSquares(x);
      return n.sumSquares(f(x), x.offset, x.size);
    },

    loraWeightNorm(w, a, b, scale, out, outF, inF, r, wTransposed) {
      if (!isFloatDt(w) || !w.isContiguous() || !f32c(a) || !f32c(b) || !f32c(out))
        return js.loraWeightNorm(w, a, b, scale, out, outF, inF, r, wTransposed);
      n.loraWeightNorm(
        w.data,
        w.offset,
        DT[w.dtype]!,
        f(a),
        a.offset,
        f(b),
        b.offset,
        scale,
        f(out),
        out.offset,
        outF,
        inF,
        r,
        wTransposed,
      );
    },

    loraRows(x, out, rowGroup, groups, rows, inF, outF) {
      if (!f32c(x) || !f32c(out) || rowGroup.dtype !== 'i32' || !rowGroup.isContiguous())
        return js.loraRows(x, out, rowGroup, groups, rows, inF, outF);
      const desc = loraDesc(n, x, out, rowGroup, groups, rows, inF, outF);
      n.loraRows(
        f(x),
        x.offset,
        f(out),
        out.offset,
        rows,
        inF,
        outF,
        rowGroup.data as Int32Array,
        rowGroup.offset,
        desc,
        groups.length,
        ...loraBuffers,
      );
      loraBuffers.length = 0;
    },

    gemm4bit(x, w, bias, y, m) {
      const ok =
        w4Ok(w) &&
        f32c(x) &&
        x.size >= m * w.cols &&
        f32c(y) &&
        y.size >= m * w.rows &&
        (bias === null || (isFloatDt(bias) && bias.isContiguous() && bias.size === w.rows));
      if (!ok) return js.gemm4bit(x, w, bias, y, m);
      n.gemm4bit(
        f(x),
        x.offset,
        ...w4Args(w),
        bias ? bias.data : null,
        bias ? bias.offset : 0,
        bias ? DT[bias.dtype]! : 0,
        f(y),
        y.offset,
        m,
      );
    },
    gemm4bitBackwardInput(g, w, dx, m) {
      const ok = w4Ok(w) && f32c(g) && g.size >= m * w.rows && f32c(dx) && dx.size >= m * w.cols;
      if (!ok) return js.gemm4bitBackwardInput(g, w, dx, m);
      n.gemm4bitBackwardInput(f(g), g.offset, ...w4Args(w), f(dx), dx.offset, m);
    },
    dequantize4bitRows(w, row0, count, out) {
      const ok =
        w4Ok(w) &&
        Number.isInteger(row0) &&
        Number.isInteger(count) &&
        row0 >= 0 &&
        count >= 0 &&
        row0 + count <= w.rows &&
        f32c(out) &&
        out.size >= count * w.cols;
      if (!ok) return js.dequantize4bitRows(w, row0, count, out);
      n.dequantize4bitRows(...w4Args(w), row0, count, f(out), out.offset);
    },
  };

  function rotOk(x: Tensor, positions: Tensor, invFreq: Tensor, out: Tensor): boolean {
    return (
      x.ndim === 4 &&
      f32c(x) &&
      f32c(out) &&
      out.size === x.size &&
      positions.dtype === 'i32' &&
      positions.isContiguous() &&
      positions.size === x.shape[0]! * x.shape[1]! &&
      f32c(invFreq) &&
      2 * invFreq.size <= x.shape[3]!
    );
  }
  function rope(x: Tensor, positions: Tensor, invFreq: Tensor, out: Tensor, sign: number): void {
    const [B, T, H, D] = x.shape as [number, number, number, number];
    n.rope(
      f(x),
      x.offset,
      positions.data,
      positions.offset,
      f(invFreq),
      invFreq.offset,
      invFreq.size,
      f(out),
      out.offset,
      B * T,
      H,
      D,
      sign,
    );
  }

  function recordPlan(body: (dynamic: (step: number) => void) => void): RecordedPlan | null {
    const a = addon as Required<NativeWithOps>;
    const plan = a.planCreate();
    const unrecordable = new Error('not recordable');
    const refuse = <T extends object>(target: T, record: (name: string) => ((...args: unknown[]) => void) | null) =>
      new Proxy(target, {
        get(t, k) {
          const rec = typeof k === 'string' ? record(k) : null;
          if (rec) return rec;
          const v = Reflect.get(t, k);
          return typeof v === 'function'
            ? () => {
                throw unrecordable;
              }
            : v;
        },
      });
    const saved = { n, js };
    n = refuse(addon, (name) => (PLAN_OPS.has(name) ? (...args) => a.planAdd(plan, name, ...args) : null));
    js = refuse(jsBackend, () => null); // a call the addon does not take (or one under SMALL) would run now
    recording = true;
    try {
      body((step) => a.planDynamic(plan, step));
    } catch (e) {
      a.planFree(plan);
      if (e === unrecordable) return null;
      throw e;
    } finally {
      ({ n, js } = saved);
      recording = false;
    }
    return {
      run(L, keyMask) {
        if (keyMask && (keyMask.dtype !== 'i32' || !keyMask.isContiguous()))
          throw new Error('RecordedPlan.run: the key mask must be a contiguous i32 tensor');
        a.planRun(plan, L, keyMask ? (keyMask.data as Int32Array) : null, keyMask ? keyMask.offset : 0);
      },
      dispose() {
        a.planFree(plan);
      },
    };
  }

  return { ...jsBackend, ...core, ...kernels, name: 'native' } as Backend;
}

/** The addon entry points a plan records (planAdd in native/ops_addon.cc). */
const PLAN_OPS = new Set(['binary', 'copy', 'gemmRows', 'rmsNormForward', 'rope', 'swigluForward', 'attentionForward']);

/** Whether a loaded addon has the op kernels (an addon built before them lacks them). */
export function hasOps(addon: NativeAddon): addon is NativeWithOps {
  const a = addon as Partial<NativeWithOps>;
  return (
    typeof a.gemmRows === 'function' &&
    typeof a.attentionForward === 'function' &&
    typeof a.opsIsa === 'function' &&
    typeof a.loraRows === 'function' &&
    typeof a.loraPack === 'function'
  );
}

/**
 * The kernels run on the addon's own worker threads (native/pool.cc, LOWRANK_SPIN_US); OpenMP is left with
 * the thread count (OMP_NUM_THREADS) and the machine-limit probes of the benches (fmaPeak, memBandwidth).
 * libgomp's idle threads spin for a long while after each parallel region (300000 spins), which on a machine
 * with few cores steals the CPU from everything else in the process, so its spin is kept short. Applies only
 * when the user set neither OMP_WAIT_POLICY nor GOMP_SPINCOUNT, and only before the addon (and with it
 * libgomp, which reads them once) is loaded.
 */
function configureOpenMP(): void {
  if (process.env.OMP_WAIT_POLICY === undefined && process.env.GOMP_SPINCOUNT === undefined)
    process.env.GOMP_SPINCOUNT = '1000';
}

/** The native backend, or null when the addon is not available (loadNativeAddon says why, once). */
export function createNativeBackend(): Backend | null {
  configureOpenMP();
  const addon = loadNativeAddon();
  if (!addon) return null;
  if (!hasOps(addon)) {
    console.warn(
      'lowrank: the native addon is out of date (no op kernels); run `npm run build:native`. Using the TypeScript kernels.',
    );
    return null;
  }
  return makeNativeBackend(addon);
}

/** The loaded addon with its op kernels, or null (for tests and benchmarks). */
export function nativeOps(): NativeWithOps | null {
  configureOpenMP();
  const addon = loadNativeAddon();
  return addon && hasOps(addon) ? addon : null;
}
