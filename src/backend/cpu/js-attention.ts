// TypeScript reference for the attention kernels: straightforward loops over (batch, query, head), f64
// accumulation, O(Tk + D) scratch per row (never a Tq x Tk matrix). The backward recomputes each row's
// probabilities from the saved log-sum-exp: P = exp(S - lse), dS = P * (dP - rowsum(dO * O)).

import type { Tensor } from '../../core/tensor.ts';
import type { AttentionArgs, AttentionKernels } from '../kernels/attention.ts';
import { f32, reader } from './js-core.ts';

interface Dims {
  B: number;
  Tq: number;
  Tk: number;
  Hq: number;
  Hkv: number;
  D: number;
  group: number;
}

function dims(a: AttentionArgs): Dims {
  const [B, Tq, Hq, D] = a.q.shape as [number, number, number, number];
  const Tk = a.k.shape[1]!;
  const Hkv = a.k.shape[2]!;
  return { B, Tq, Tk, Hq, Hkv, D, group: Hq / Hkv };
}

/** Copies the D values of a row starting at absolute element index off into dst (any float dtype). */
function rowLoader(t: Tensor, D: number): (off: number, dst: Float64Array) => void {
  const d = t.data;
  if (t.dtype === 'f32')
    return (off, dst) => {
      for (let x = 0; x < D; x++) dst[x] = d[off + x]!;
    };
  const r = reader(t);
  return (off, dst) => {
    for (let x = 0; x < D; x++) dst[x] = r(off + x);
  };
}

/** Element index of row (b, t, h) of a [B, T, H, D] view. */
function rowIndex(t: Tensor, b: number, i: number, h: number): number {
  return t.offset + b * t.strides[0]! + i * t.strides[1]! + h * t.strides[2]!;
}

/** Fills vis with the keys query i of batch b sees; returns how many. */
function visibleKeys(a: AttentionArgs, dm: Dims, b: number, i: number, vis: Int32Array): number {
  const p = dm.Tk - dm.Tq + i;
  const lo = a.window > 0 ? Math.max(0, p - a.window + 1) : 0;
  const mask = a.keyMask ? a.keyMask.data : null;
  const mOff = a.keyMask ? a.keyMask.offset + b * dm.Tk : 0;
  const seq = a.seqIds ? a.seqIds.data : null;
  const sOff = a.seqIds ? a.seqIds.offset + b * dm.Tk : 0;
  const own = seq ? seq[sOff + p]! : 0;
  let n = 0;
  for (let j = lo; j <= p; j++) {
    if (mask && mask[mOff + j] === 0) continue;
    if (seq && seq[sOff + j] !== own) continue;
    vis[n++] = j;
  }
  return n;
}

function dot(x: Float64Array, y: Float64Array, D: number): number {
  let s = 0;
  for (let d = 0; d < D; d++) s += x[d]! * y[d]!;
  return s;
}

function attentionForward(a: AttentionArgs, out: Tensor, lse: Tensor): void {
  const dm = dims(a);
  const { B, Tq, Tk, Hq, D, group } = dm;
  const od = f32(out);
  const ld = f32(lse);
  const loadQ = rowLoader(a.q, D);
  const loadK = rowLoader(a.k, D);
  const loadV = rowLoader(a.v, D);
  const vis = new Int32Array(Tk);
  const s = new Float64Array(Tk);
  const qr = new Float64Array(D);
  const kr = new Float64Array(D);
  const vr = new Float64Array(D);
  const acc = new Float64Array(D);
  for (let b = 0; b < B; b++) {
    for (let i = 0; i < Tq; i++) {
      const n = visibleKeys(a, dm, b, i, vis);
      for (let h = 0; h < Hq; h++) {
        const kvh = Math.floor(h / group);
        const o = out.offset + ((b * Tq + i) * Hq + h) * D;
        const li = lse.offset + (b * Hq + h) * Tq + i;
        if (n === 0) {
          od.fill(0, o, o + D);
          ld[li] = Number.NEGATIVE_INFINITY;
          continue;
        }
        loadQ(rowIndex(a.q, b, i, h), qr);
        let m = Number.NEGATIVE_INFINITY;
        for (let c = 0; c < n; c++) {
          loadK(rowIndex(a.k, b, vis[c]!, kvh), kr);
          s[c] = a.scale * dot(qr, kr, D);
          if (s[c]! > m) m = s[c]!;
        }
        let sum = 0;
        acc.fill(0);
        for (let c = 0; c < n; c++) {
          const e = Math.exp(s[c]! - m);
          sum += e;
          loadV(rowIndex(a.v, b, vis[c]!, kvh), vr);
          for (let d = 0; d < D; d++) acc[d] += e * vr[d]!;
        }
        for (let d = 0; d < D; d++) od[o + d] = acc[d]! / sum;
        ld[li] = m + Math.log(sum);
      }
    }
  }
}

function attentionBackward(
  a: AttentionArgs,
  out: Tensor,
  lse: Tensor,
  gOut: Tensor,
  dq: Tensor | null,
  dk: Tensor | null,
  dv: Tensor | null,
): void {
  const dm = dims(a);
  const { B, Tq, Tk, Hq, Hkv, D, group } = dm;
  const od = f32(out);
  const ld = f32(lse);
  const gd = f32(gOut);
  const loadQ = rowLoader(a.q, D);
  const loadK = rowLoader(a.k, D);
  const loadV = rowLoader(a.v, D);
  // dk, dv accumulate over query rows and grouped heads: f64 scratch the size of k (O(T), not O(T^2))
  const dkAcc = dk ? new Float64Array(B * Tk * Hkv * D) : null;
  const dvAcc = dv ? new Float64Array(B * Tk * Hkv * D) : null;
  const dqd = dq ? f32(dq) : null;
  const vis = new Int32Array(Tk);
  const qr = new Float64Array(D);
  const kr = new Float64Array(D);
  const vr = new Float64Array(D);
  const gr = new Float64Array(D);
  const dqAcc = new Float64Array(D);
  for (let b = 0; b < B; b++) {
    for (let i = 0; i < Tq; i++) {
      const n = visibleKeys(a, dm, b, i, vis);
      for (let h = 0; h < Hq; h++) {
        const kvh = Math.floor(h / group);
        const o = ((b * Tq + i) * Hq + h) * D;
        const L = ld[lse.offset + (b * Hq + h) * Tq + i]!;
        dqAcc.fill(0);
        if (n > 0 && L !== Number.NEGATIVE_INFINITY) {
          loadQ(rowIndex(a.q, b, i, h), qr);
          let rowDot = 0; // rowsum(dO * O)
          for (let d = 0; d < D; d++) {
            gr[d] = gd[gOut.offset + o + d]!;
            rowDot += gr[d]! * od[out.offset + o + d]!;
          }
          for (let c = 0; c < n; c++) {
            const j = vis[c]!;
            loadK(rowIndex(a.k, b, j, kvh), kr);
            loadV(rowIndex(a.v, b, j, kvh), vr);
            const p = Math.exp(a.scale * dot(qr, kr, D) - L);
            const ds = p * (dot(gr, vr, D) - rowDot);
            const kv = ((b * Tk + j) * Hkv + kvh) * D;
            if (dvAcc) for (let d = 0; d < D; d++) dvAcc[kv + d] += p * gr[d]!;
            if (dkAcc) for (let d = 0; d < D; d++) dkAcc[kv + d] += ds * qr[d]!;
            if (dqd) for (let d = 0; d < D; d++) dqAcc[d] += ds * kr[d]!;
          }
        }
        if (dqd) {
          const qo = dq!.offset + o;
          for (let d = 0; d < D; d++) dqd[qo + d] = a.scale * dqAcc[d]!;
        }
      }
    }
  }
  if (dk && dkAcc) {
    const dkd = f32(dk);
    for (let x = 0; x < dkAcc.length; x++) dkd[dk.offset + x] = a.scale * dkAcc[x]!;
  }
  if (dv && dvAcc) {
    const dvd = f32(dv);
    for (let x = 0; x < dvAcc.length; x++) dvd[dv.offset + x] = dvAcc[x]!;
  }
}

export const jsAttentionKernels: AttentionKernels = { attentionForward, attentionBackward };
