// Fused LoRA ops, each one node on the tape with a hand-written backward (DESIGN decision 2):
//
//   loraLinear:  y = x W^T + b + s (xl A^T) B^T (+ s b_B)        xl = dropout(x), or x itself
//   doraLinear:  y = b + x W^T + (k - 1) (xl W^T) + k s (xl A^T) B^T,   k = m / ||W + s B A||_row (a constant)
//                (with xl = x this is PEFT's y = b + k (x W^T + s x A^T B^T))
//   addRowsAt:   y = r with rows idx of a batch incremented by d (mixed-adapter batches)
//
// The frozen base weight W never gets a gradient product: the backward computes dx = g W (+ the LoRA path),
// dA and dB from the small u = xl A^T, and dW only if W itself requires a gradient.

import { getBackend } from '../../backend/index.ts';
import type { LoraRowsGroup } from '../../backend/kernels/lora.ts';
import { fmtShape, ShapeError } from '../../core/errors.ts';
import type { Tensor } from '../../core/tensor.ts';
import { empty, emptyForOutput } from '../../ops/create.ts';
import { gemmInto } from '../../ops/matmul.ts';
import { sum } from '../../ops/reduce.ts';
import { f32c } from '../../ops/shape.ts';
import { isGradEnabled, needsGrad, noGrad, record } from '../../ops/tape.ts';

/** A [rows, cols] view of a contiguous tensor. */
function rowsView(t: Tensor, rows: number, cols: number): Tensor {
  return t.view([rows, cols], [cols, 1], t.offset);
}

/** The transpose of a 2-D tensor as a view (no copy). */
function tview(t: Tensor): Tensor {
  return t.view([t.shape[1]!, t.shape[0]!], [t.strides[1]!, t.strides[0]!], t.offset);
}

/**
 * lora_B's gradient s g^T u [out, r] for g [rows, out], u [rows, r], computed as (s u^T g)^T: the GEMM takes the
 * product with rank-r rows about a third faster than with rank-r columns (in-process A/B: 700 -> 453 us at 688 x 16
 * x 2048, 798 -> 581 us at 1536 x 16 x 1024), and the transpose of r x out values is nothing beside it.
 */
function loraGradB(g: Tensor, u: Tensor, s: number): Tensor {
  const outF = g.shape[1]!;
  const r = u.shape[1]!;
  const t = emptyForOutput([r, outF]);
  const ut = tview(u);
  gemm(ut, g, t, s, 0);
  ut.dispose();
  const gb = emptyForOutput([outF, r]);
  const tt = tview(t);
  getBackend().copy(tt, gb);
  tt.dispose();
  t.dispose();
  return gb;
}

/** c = alpha a b + beta c through views that are disposed afterwards. */
function gemm(a: Tensor, b: Tensor, c: Tensor, alpha: number, beta: number): void {
  gemmInto(a, b, c, alpha, beta);
}

function f32NoGrad(t: Tensor): Tensor {
  return noGrad(() => f32c(t));
}

/** t as contiguous f32 (itself when it is already), a conversion pushed on temps otherwise. */
function asF32(t: Tensor, temps: Tensor[]): Tensor {
  const sh = t.shape;
  const st = t.strides;
  const dense =
    sh.length === 2
      ? (sh[1]! <= 1 || st[1] === 1) && (sh[0]! <= 1 || st[0] === sh[1])
      : sh.length === 1
        ? sh[0]! <= 1 || st[0] === 1
        : t.isContiguous();
  if (t.dtype === 'f32' && dense) return t;
  const c = f32NoGrad(t);
  temps.push(c);
  return c;
}

interface Dims {
  inF: number;
  outF: number;
  r: number;
  rows: number;
}

function checkShapes(op: string, x: Tensor, w: Tensor | null, bias: Tensor | null, a: Tensor, b: Tensor): Dims {
  const inF = x.shape[x.ndim - 1]!;
  if (a.ndim !== 2 || a.shape[1] !== inF)
    throw new ShapeError(`${op}: lora_A ${fmtShape(a.shape)} does not fit input ${fmtShape(x.shape)} ([r, in])`);
  const r = a.shape[0]!;
  if (b.ndim !== 2 || b.shape[1] !== r)
    throw new ShapeError(`${op}: lora_B ${fmtShape(b.shape)} does not fit lora_A ${fmtShape(a.shape)} ([out, r])`);
  const outF = b.shape[0]!;
  if (w && (w.ndim !== 2 || w.shape[0] !== outF || w.shape[1] !== inF))
    throw new ShapeError(`${op}: weight ${fmtShape(w.shape)} does not fit [${outF}, ${inF}]`);
  if (bias && (bias.ndim !== 1 || bias.shape[0] !== outF))
    throw new ShapeError(`${op}: bias ${fmtShape(bias.shape)} does not fit ${outF} outputs`);
  return { inF, outF, r, rows: x.size / inF };
}

/** out rows = bias (+ s * loraBias), broadcast; returns whether anything was written. */
function fillBias(
  o2: Tensor,
  rows: number,
  outF: number,
  bias: Tensor | null,
  loraBias: Tensor | null,
  s: number,
): boolean {
  if (!bias && !loraBias) return false;
  const be = getBackend();
  const vec = empty([outF]);
  if (bias) be.copy(bias, vec);
  if (loraBias) {
    const lb = empty([outF]);
    be.copy(loraBias, lb);
    be.unary('scale', lb, lb, s);
    be.binary('add', vec, lb, vec);
    lb.dispose();
  }
  const bv = vec.view([rows, outF], [0, 1], 0);
  be.copy(bv, o2);
  bv.dispose();
  vec.dispose();
  return true;
}

/** o2 [rows, n] += s v (v [n] broadcast over the rows). */
function addScaledRows(o2: Tensor, v: Tensor, s: number, rows: number, n: number): void {
  const be = getBackend();
  const lb = empty([n]);
  be.copy(v, lb);
  be.unary('scale', lb, lb, s);
  const lv = lb.view([rows, n], [0, 1], 0);
  be.binary('add', o2, lv, o2);
  lv.dispose();
  lb.dispose();
}

function sumRows(g2: Tensor, s = 1): Tensor {
  const t = sum(g2, 0);
  if (s !== 1) getBackend().unary('scale', t, t, s);
  return t;
}

export interface LoraLinearOptions {
  /** The input of the LoRA branch (dropout(x)); x itself when absent. */
  xl?: Tensor | null;
  /** lora_B's bias (PEFT lora_bias=True), added as s * b_B. */
  loraBias?: Tensor | null;
}

/**
 * y = x W^T + bias + s (xl A^T) B^T (+ s loraBias) for x [..., in], W [out, in] (f32/bf16/f16, or null for the
 * LoRA branch alone), A [r, in], B [out, r]. One tape node: gradients for x, xl, A, B, biases; W's only when W
 * itself requires one.
 */
export function loraLinear(
  x: Tensor,
  w: Tensor | null,
  bias: Tensor | null,
  a: Tensor,
  b: Tensor,
  s: number,
  opts: LoraLinearOptions = {},
): Tensor {
  const { inF, outF, r, rows } = checkShapes('loraLinear', x, w, bias, a, b);
  const xlIn = opts.xl && opts.xl !== x ? opts.xl : null;
  if (xlIn && (xlIn.ndim !== x.ndim || xlIn.shape.some((d, i) => d !== x.shape[i])))
    throw new ShapeError(`loraLinear: branch input ${fmtShape(xlIn.shape)} differs from input ${fmtShape(x.shape)}`);
  const loraBias = opts.loraBias ?? null;
  if (loraBias && (loraBias.ndim !== 1 || loraBias.shape[0] !== outF))
    throw new ShapeError(`loraLinear: lora_B bias ${fmtShape(loraBias.shape)} does not fit ${outF} outputs`);
  const xc = f32NoGrad(x);
  const xlc = xlIn ? f32NoGrad(xlIn) : xc;
  const a32 = f32NoGrad(a);
  const b32 = f32NoGrad(b);
  const x2 = rowsView(xc, rows, inF);
  const xl2 = xlc === xc ? x2 : rowsView(xlc, rows, inF);
  // shrink: u = xl A^T [rows, r]
  const u = emptyForOutput([rows, r]);
  const at = tview(a32);
  gemm(xl2, at, u, 1, 0);
  at.dispose();
  const out = emptyForOutput([...x.shape.slice(0, -1), outF]);
  const o2 = rowsView(out, rows, outF);
  // with a base weight: (x W^T + bias) + s b_B + s u B^T, in the order a mixed batch adds them to the base
  // layer's output (loraMixedRows), so a row computes the same bits alone and in a mixed batch
  let beta = fillBias(o2, rows, outF, bias, w ? null : loraBias, s) ? 1 : 0;
  if (w) {
    const wt = tview(w);
    gemm(x2, wt, o2, 1, beta);
    wt.dispose();
    beta = 1;
    if (loraBias) addScaledRows(o2, loraBias, s, rows, outF);
  }
  // expand: y += s u B^T
  const bt = tview(b32);
  gemm(u, bt, o2, s, beta);
  bt.dispose();
  o2.dispose();
  if (xl2 !== x2) xl2.dispose();
  x2.dispose();
  const xShape = x.shape;
  const wNeeds = !!w?.requiresGrad;
  const saved = [a32, b32, xlc, u];
  if (w) saved.push(w);
  if (wNeeds) saved.push(xc);
  const node = record(
    out,
    'loraLinear',
    [x, w, bias, a, b, xlIn, loraBias],
    (g, needs, sv) => {
      const [sa, sb, sxl, su, sw, sx] = sv as Tensor[];
      const g2 = rowsView(g, rows, outF);
      const needDu = needs[0] || needs[3] || needs[5];
      let du: Tensor | null = null;
      if (needDu) {
        du = emptyForOutput([rows, r]);
        gemm(g2, sb!, du, s, 0); // du = s g B
      }
      let gx: Tensor | null = null;
      if (needs[0]) {
        gx = emptyForOutput(xShape);
        const gx2 = rowsView(gx, rows, inF);
        let bx = 0;
        if (w) {
          gemm(g2, sw!, gx2, 1, 0); // g W
          bx = 1;
        }
        if (!xlIn)
          gemm(du!, sa!, gx2, 1, bx); // + du A (the branch input is x)
        else if (!w) getBackend().fill(gx2, 0);
        gx2.dispose();
      }
      let gxl: Tensor | null = null;
      if (xlIn && needs[5]) {
        gxl = emptyForOutput(xShape);
        const gxl2 = rowsView(gxl, rows, inF);
        gemm(du!, sa!, gxl2, 1, 0);
        gxl2.dispose();
      }
      let ga: Tensor | null = null;
      if (needs[3]) {
        ga = emptyForOutput([r, inF]);
        const dut = tview(du!);
        const sxl2 = rowsView(sxl!, rows, inF);
        gemm(dut, sxl2, ga, 1, 0); // du^T xl
        dut.dispose();
        sxl2.dispose();
      }
      let gb: Tensor | null = null;
      if (needs[4]) gb = loraGradB(g2, su!, s); // s g^T u
      let gw: Tensor | null = null;
      if (needs[1] && w) {
        gw = emptyForOutput([outF, inF]);
        const gt = tview(g2);
        const sx2 = rowsView(sx!, rows, inF);
        gemm(gt, sx2, gw, 1, 0);
        gt.dispose();
        sx2.dispose();
      }
      const gbias = needs[2] ? sumRows(g2) : null;
      const glb = needs[6] ? sumRows(g2, s) : null;
      du?.dispose();
      g2.dispose();
      return [gx, gw, gbias, ga, gb, gxl, glb];
    },
    saved,
  );
  disposeTemps([...saved, xc], [x, xlIn, a, b, w]);
  return node;
}

/**
 * Drops this op's own handles on temporaries (the tape keeps its own views of what it saved); the caller's
 * tensors are never disposed.
 */
function disposeTemps(temps: Tensor[], inputs: (Tensor | null | undefined)[]): void {
  for (const t of new Set(temps)) if (!inputs.includes(t)) t.dispose();
}

/**
 * The DoRA weight norm ||W + s B A||_2 per output row, [outF] f32, no gradient (PEFT detaches it). With
 * `transposed`, W is stored [in, out] (an embedding table [V, D] whose columns are the outputs).
 */
export function doraWeightNorm(w: Tensor, a: Tensor, b: Tensor, s: number, transposed = false): Tensor {
  const r = a.shape[0]!;
  const inF = a.shape[1]!;
  const outF = b.shape[0]!;
  const wShape = transposed ? [inF, outF] : [outF, inF];
  if (w.ndim !== 2 || w.shape[0] !== wShape[0] || w.shape[1] !== wShape[1] || b.shape[1] !== r)
    throw new ShapeError(
      `doraWeightNorm: weight ${fmtShape(w.shape)}, lora_A ${fmtShape(a.shape)} and lora_B ${fmtShape(b.shape)} do not fit`,
    );
  return noGrad(() => {
    const wc = w.isContiguous() ? w : f32c(w);
    const a32 = f32c(a);
    const b32 = f32c(b);
    const out = empty([outF]);
    getBackend().loraWeightNorm(wc, a32, b32, s, out, outF, inF, r, transposed);
    if (wc !== w) wc.dispose();
    if (a32 !== a) a32.dispose();
    if (b32 !== b) b32.dispose();
    return out;
  });
}

export interface DoraLinearOptions {
  xl?: Tensor | null;
  /** The detached weight norm [out] (computed from W, A, B and s when absent). */
  weightNorm?: Tensor | null;
}

/**
 * DoRA on a linear layer as one node:
 *   y = b + x W^T + (k - 1) (xl W^T) + k s (xl A^T) B^T,   k = m / ||W + s B A||_row (treated as a constant).
 * With xl = x (no dropout) this is y = b + k (x W^T + s (x A^T) B^T). Gradients for x, xl, A, B, m and the bias.
 */
export function doraLinear(
  x: Tensor,
  w: Tensor,
  bias: Tensor | null,
  a: Tensor,
  b: Tensor,
  m: Tensor,
  s: number,
  opts: DoraLinearOptions = {},
): Tensor {
  const { inF, outF, r, rows } = checkShapes('doraLinear', x, w, bias, a, b);
  if (m.ndim !== 1 || m.shape[0] !== outF)
    throw new ShapeError(`doraLinear: magnitude ${fmtShape(m.shape)} does not fit ${outF} outputs`);
  const xlIn = opts.xl && opts.xl !== x ? opts.xl : null;
  const be = getBackend();
  const norm = opts.weightNorm ? f32NoGrad(opts.weightNorm) : doraWeightNorm(w, a, b, s);
  const m32 = f32NoGrad(m);
  const k = empty([outF]);
  be.binary('div', m32, norm, k);
  const xc = f32NoGrad(x);
  const xlc = xlIn ? f32NoGrad(xlIn) : xc;
  const a32 = f32NoGrad(a);
  const b32 = f32NoGrad(b);
  const x2 = rowsView(xc, rows, inF);
  const xl2 = xlc === xc ? x2 : rowsView(xlc, rows, inF);
  const u = empty([rows, r]);
  const at = tview(a32);
  gemm(xl2, at, u, 1, 0);
  at.dispose();
  const wt = tview(w);
  // P = xl W^T + s u B^T (the adapted linear output without bias)
  const p = empty([rows, outF]);
  gemm(xl2, wt, p, 1, 0);
  const out = empty([...x.shape.slice(0, -1), outF]);
  const o2 = rowsView(out, rows, outF);
  if (xlIn) {
    // y = x W^T - xl W^T + k P (+ b)
    gemm(x2, wt, o2, 1, 0);
    be.binary('sub', o2, p, o2);
  }
  const bt = tview(b32);
  gemm(u, bt, p, s, 1);
  bt.dispose();
  wt.dispose();
  const kv = k.view([rows, outF], [0, 1], 0);
  const kp = empty([rows, outF]);
  be.binary('mul', p, kv, kp);
  if (xlIn) be.binary('add', o2, kp, o2);
  else be.copy(kp, o2);
  kp.dispose();
  kv.dispose();
  if (bias) {
    const bias32 = empty([outF]);
    be.copy(bias, bias32);
    const bv = bias32.view([rows, outF], [0, 1], 0);
    be.binary('add', o2, bv, o2);
    bv.dispose();
    bias32.dispose();
  }
  o2.dispose();
  if (xl2 !== x2) xl2.dispose();
  x2.dispose();
  const xShape = x.shape;
  const saved = [a32, b32, xlc, u, w, p, k, norm];
  const node = record(
    out,
    'doraLinear',
    [x, w, bias, a, b, m, xlIn],
    (g, needs, sv) => {
      const [sa, sb, sxl, su, sw, sp, sk, sn] = sv as Tensor[];
      const bk = getBackend();
      const g2 = rowsView(g, rows, outF);
      const kvw = sk!.view([rows, outF], [0, 1], 0);
      const gk = empty([rows, outF]);
      bk.binary('mul', g2, kvw, gk); // g k
      kvw.dispose();
      let du: Tensor | null = null;
      if (needs[0] || needs[3] || needs[6]) {
        du = empty([rows, r]);
        gemm(gk, sb!, du, s, 0); // du = s (g k) B
      }
      let gx: Tensor | null = null;
      if (needs[0]) {
        gx = empty(xShape);
        const gx2 = rowsView(gx, rows, inF);
        if (!xlIn) {
          gemm(gk, sw!, gx2, 1, 0); // (g k) W
          gemm(du!, sa!, gx2, 1, 1); // + du A
        } else gemm(g2, sw!, gx2, 1, 0); // dx = g W
        gx2.dispose();
      }
      let gxl: Tensor | null = null;
      if (xlIn && needs[6]) {
        gxl = empty(xShape);
        const gxl2 = rowsView(gxl, rows, inF);
        const gkm = empty([rows, outF]);
        bk.binary('sub', gk, g2, gkm); // g (k - 1)
        gemm(gkm, sw!, gxl2, 1, 0);
        gemm(du!, sa!, gxl2, 1, 1);
        gkm.dispose();
        gxl2.dispose();
      }
      let ga: Tensor | null = null;
      if (needs[3]) {
        ga = empty([r, inF]);
        const dut = tview(du!);
        const sxl2 = rowsView(sxl!, rows, inF);
        gemm(dut, sxl2, ga, 1, 0);
        dut.dispose();
        sxl2.dispose();
      }
      let gb: Tensor | null = null;
      if (needs[4]) {
        gb = empty([outF, r]);
        const gkt = tview(gk);
        gemm(gkt, su!, gb, s, 0); // s (g k)^T u
        gkt.dispose();
      }
      let gm: Tensor | null = null;
      if (needs[5]) {
        // dm = sum_rows(g P) / ||W + s B A||
        const gp = empty([rows, outF]);
        bk.binary('mul', g2, sp!, gp);
        gm = sumRows(gp);
        gp.dispose();
        bk.binary('div', gm, sn!, gm);
      }
      const gbias = needs[2] ? sumRows(g2) : null;
      gk.dispose();
      du?.dispose();
      g2.dispose();
      return [gx, null, gbias, ga, gb, gm, gxl];
    },
    saved,
  );
  disposeTemps([...saved, xc, m32], [x, xlIn, a, b, w, m, opts.weightNorm]);
  return node;
}

/** One adapter's rows in a mixed batch. */
export interface RowGroup {
  /** i32 [n]: the batch rows that use this adapter. */
  idx: Tensor;
  a: Tensor;
  b: Tensor;
  scale: number;
  loraBias?: Tensor | null;
}

export interface LoraMixedRowsOptions {
  /**
   * base is the caller's temporary and may be overwritten: without a gradient, the result is base itself
   * (when it is contiguous f32) with the adapters' rows added in place.
   */
  inPlace?: boolean;
}

/**
 * Mixed-adapter batch as one node (PEFT's adapter_names; an SGMV on the CPU): base [B, ..., out] is the base
 * layer's output for x [B, ..., in]; every row of group g gets base + s_g (x A_g^T) B_g^T, other rows keep base.
 * Each row is rounded exactly as when it runs alone through loraLinear. Without a gradient every group goes in
 * one backend loraRows call; with one, per group: a gather, a shrink (x A^T), an expand (accumulated into the
 * gathered base rows) and a scatter.
 */
export function loraMixedRows(
  base: Tensor,
  x: Tensor,
  groups: readonly RowGroup[],
  opts: LoraMixedRowsOptions = {},
): Tensor {
  const B = x.shape[0]!;
  const inF = x.shape[x.ndim - 1]!;
  const outF = base.shape[base.ndim - 1]!;
  const perRow = x.size / B / inF; // tokens per batch row
  if (base.shape[0] !== B || base.size / B / outF !== perRow)
    throw new ShapeError(`loraMixedRows: base ${fmtShape(base.shape)} does not fit input ${fmtShape(x.shape)}`);
  const inputs: (Tensor | null)[] = [base, x];
  if (isGradEnabled()) for (const g of groups) inputs.push(g.a, g.b, g.loraBias ?? null);
  if (!needsGrad(...inputs)) {
    const out = mixedRowsNoGrad(base, x, groups, B, perRow, inF, outF, !!opts.inPlace);
    if (out) return out;
  }
  const be = getBackend();
  const bc = f32NoGrad(base);
  const xc = f32NoGrad(x);
  const out = empty(base.shape);
  const covered = new Uint8Array(B);
  const us: Tensor[] = [];
  const xgs: Tensor[] = [];
  for (const g of groups) {
    const n = g.idx.size;
    checkGroup(g, inF, outF);
    for (const i of g.idx.toTyped()) covered[i] = 1;
    const r = g.a.shape[0]!;
    const xg = empty([n * perRow, inF]);
    be.gatherRows(xc, g.idx, xg, perRow * inF);
    const yg = empty([n * perRow, outF]);
    be.gatherRows(bc, g.idx, yg, perRow * outF);
    if (g.loraBias) addScaledRows(yg, g.loraBias, g.scale, n * perRow, outF);
    const u = empty([n * perRow, r]);
    const a32 = f32NoGrad(g.a);
    const b32 = f32NoGrad(g.b);
    const at = tview(a32);
    gemm(xg, at, u, 1, 0);
    at.dispose();
    const bt = tview(b32);
    gemm(u, bt, yg, g.scale, 1);
    bt.dispose();
    if (a32 !== g.a) a32.dispose();
    if (b32 !== g.b) b32.dispose();
    be.scatterAddRows(yg, g.idx, out, perRow * outF); // rows of out are still zero: an exact copy
    yg.dispose();
    us.push(u);
    xgs.push(xg);
  }
  const rest = [...covered.keys()].filter((i) => !covered[i]);
  if (rest.length) {
    const idx = Int32Array.from(rest);
    const ri = empty([rest.length], 'i32');
    (ri.data as Int32Array).set(idx, ri.offset);
    const rows = empty([rest.length * perRow, outF]);
    be.gatherRows(bc, ri, rows, perRow * outF);
    be.scatterAddRows(rows, ri, out, perRow * outF);
    rows.dispose();
    ri.dispose();
  }
  if (bc !== base) bc.dispose();
  if (xc !== x) xc.dispose();
  const xShape = x.shape;
  const saved: Tensor[] = [];
  for (let k = 0; k < groups.length; k++) saved.push(groups[k]!.idx, groups[k]!.a, groups[k]!.b, us[k]!, xgs[k]!);
  const node = record(
    out,
    'loraMixedRows',
    inputs,
    (g, needs, sv) => {
      const bk = getBackend();
      const grads: (Tensor | null)[] = [needs[0] ? g : null, null];
      let gx: Tensor | null = needs[1] ? empty(xShape) : null;
      for (let k = 0; k < groups.length; k++) {
        const [sidx, sa, sb, su, sxg] = sv.slice(5 * k, 5 * k + 5) as Tensor[];
        const n = sidx!.size;
        const r = sa!.shape[0]!;
        const s = groups[k]!.scale;
        const gg = empty([n * perRow, outF]);
        bk.gatherRows(g, sidx!, gg, perRow * outF);
        const base3 = 2 + 3 * k;
        let du: Tensor | null = null;
        if (needs[1] || needs[base3]) {
          du = empty([n * perRow, r]);
          gemm(gg, sb!, du, s, 0);
        }
        if (gx && du) {
          const gxg = empty([n * perRow, inF]);
          gemm(du, sa!, gxg, 1, 0);
          bk.scatterAddRows(gxg, sidx!, gx, perRow * inF);
          gxg.dispose();
        }
        let ga: Tensor | null = null;
        if (needs[base3]) {
          ga = empty(sa!.shape);
          const dut = tview(du!);
          gemm(dut, sxg!, ga, 1, 0);
          dut.dispose();
        }
        let gb: Tensor | null = null;
        if (needs[base3 + 1]) gb = loraGradB(gg, su!, s);
        const glb = needs[base3 + 2] ? sumRows(gg, s) : null;
        du?.dispose();
        gg.dispose();
        grads.push(ga, gb, glb);
      }
      grads[1] = gx;
      gx = null;
      return grads;
    },
    saved,
  );
  for (const t of [...us, ...xgs]) t.dispose();
  return node;
}

function checkGroup(g: RowGroup, inF: number, outF: number): void {
  if (
    g.a.ndim !== 2 ||
    g.a.shape[1] !== inF ||
    g.b.ndim !== 2 ||
    g.b.shape[0] !== outF ||
    g.b.shape[1] !== g.a.shape[0]
  )
    throw new ShapeError(
      `loraMixedRows: lora_A ${fmtShape(g.a.shape)} and lora_B ${fmtShape(g.b.shape)} do not fit [${outF}, ${inF}]`,
    );
}

/**
 * Adapter weights that loraRows takes as they are (contiguous f32 of fitting shapes), by lora_A: a tensor's
 * shape, strides and dtype never change, so a group's weights are checked once.
 */
const readyWeights = new WeakMap<Tensor, { b: Tensor; lb: Tensor | null; inF: number; outF: number }>();

/**
 * loraMixedRows without a gradient: every group in one backend loraRows call (the same bits per row as the
 * gemms of the general path). Returns null, leaving it to the general path, for row indexes that are not a
 * partition of distinct rows in range (that path raises the errors, or adds a row's groups one after another).
 */
function mixedRowsNoGrad(
  base: Tensor,
  x: Tensor,
  groups: readonly RowGroup[],
  B: number,
  perRow: number,
  inF: number,
  outF: number,
  inPlace: boolean,
): Tensor | null {
  const rows = B * perRow;
  if (!Number.isInteger(rows) || rows <= 0) return null;
  // the weights: checked once per lora_A (readyWeights), or here
  const ready: boolean[] = new Array(groups.length);
  for (let k = 0; k < groups.length; k++) {
    const g = groups[k]!;
    const c = readyWeights.get(g.a);
    ready[k] = !!c && c.b === g.b && c.lb === (g.loraBias ?? null) && c.inF === inF && c.outF === outF;
    if (!ready[k]) checkGroup(g, inF, outF);
  }
  // the group of every token row
  const rg = empty([rows], 'i32');
  const rgd = rg.data as Int32Array;
  const r0 = rg.offset;
  rgd.fill(-1, r0, r0 + rows);
  for (let k = 0; k < groups.length; k++) {
    const idx = groups[k]!.idx;
    const n = idx.size;
    const contiguous = idx.dtype === 'i32' && idx.isContiguous();
    const ids = contiguous ? (idx.data as Int32Array) : idx.dtype === 'i32' ? (idx.toTyped() as Int32Array) : null;
    const off = contiguous ? idx.offset : 0;
    for (let q = 0; q < n; q++) {
      const b = ids ? ids[off + q]! : -1;
      if (!(b >= 0 && b < B) || rgd[r0 + b * perRow] !== -1) {
        rg.dispose();
        return null;
      }
      if (perRow === 1) rgd[r0 + b] = k;
      else rgd.fill(k, r0 + b * perRow, r0 + (b + 1) * perRow);
    }
  }
  const be = getBackend();
  const temps: Tensor[] = [rg];
  try {
    const xc = f32NoGrad(x);
    if (xc !== x) temps.push(xc);
    let out: Tensor;
    if (inPlace && base.dtype === 'f32' && base.isContiguous()) out = base;
    else {
      const bc = f32NoGrad(base);
      if (bc !== base) temps.push(bc);
      out = empty(base.shape);
      be.copy(bc, out);
    }
    const lg: LoraRowsGroup[] = new Array(groups.length);
    for (let k = 0; k < groups.length; k++) {
      const g = groups[k]!;
      const lb0 = g.loraBias ?? null;
      if (ready[k]) {
        lg[k] = { a: g.a, b: g.b, scale: g.scale, loraBias: lb0 };
        continue;
      }
      const n = temps.length;
      const a = asF32(g.a, temps);
      const b = asF32(g.b, temps);
      const lb = lb0 ? asF32(lb0, temps) : null;
      if (temps.length === n) readyWeights.set(g.a, { b: g.b, lb: lb0, inF, outF });
      lg[k] = { a, b, scale: g.scale, loraBias: lb };
    }
    be.loraRows(xc, out, rg, lg, rows, inF, outF);
    return out;
  } finally {
    for (const t of temps) t.dispose();
  }
}

/**
 * y = base with d added to the batch rows idx: base [B, ...], d [n, ...] (the same trailing shape), idx i32 [n].
 * The scatter of a mixed-adapter batch (one group's LoRA output back into its rows).
 */
export function addRowsAt(base: Tensor, idx: Tensor, d: Tensor): Tensor {
  const B = base.shape[0]!;
  const cols = base.size / B;
  if (d.size !== idx.size * cols || d.shape.slice(1).join() !== base.shape.slice(1).join())
    throw new ShapeError(`addRowsAt: rows ${fmtShape(d.shape)} do not fit ${fmtShape(base.shape)} at ${idx.size} rows`);
  const be = getBackend();
  const bc = f32NoGrad(base);
  const dc = f32NoGrad(d);
  const out = empty(base.shape);
  be.copy(bc, out);
  be.scatterAddRows(dc, idx, out, cols);
  if (bc !== base) bc.dispose();
  if (dc !== d) dc.dispose();
  const dShape = d.shape;
  return record(
    out,
    'addRowsAt',
    [base, d],
    (g, needs, [sidx]) => {
      let gd: Tensor | null = null;
      if (needs[1]) {
        gd = empty(dShape);
        getBackend().gatherRows(g, sidx!, gd, cols);
      }
      return [needs[0] ? g : null, gd];
    },
    [idx],
  );
}
