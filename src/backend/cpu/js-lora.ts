// TypeScript reference kernels for LoRA: the DoRA weight norm, one output row at a time (f64 accumulation),
// and mixed-adapter rows, with the reference gemm's arithmetic (js-core.ts: f64 sums, rounded once per product).

import { fmtShape, IndexError, ShapeError } from '../../core/errors.ts';
import type { Tensor } from '../../core/tensor.ts';
import type { LoraKernels, LoraRowsGroup } from '../kernels/lora.ts';
import { f32, i32, reader } from './js-core.ts';

function loraWeightNorm(
  w: Tensor,
  a: Tensor,
  b: Tensor,
  scale: number,
  out: Tensor,
  outF: number,
  inF: number,
  r: number,
  wTransposed: boolean,
): void {
  const rw = reader(w);
  const ad = f32(a);
  const bd = f32(b);
  const o = f32(out);
  const row = new Float64Array(inF);
  for (let oi = 0; oi < outF; oi++) {
    for (let i = 0; i < inF; i++) row[i] = rw(w.offset + (wTransposed ? i * outF + oi : oi * inF + i));
    for (let j = 0; j < r; j++) {
      const bv = scale * bd[b.offset + oi * r + j]!;
      if (bv === 0) continue;
      const ao = a.offset + j * inF;
      for (let i = 0; i < inF; i++) row[i] += bv * ad[ao + i]!;
    }
    let s = 0;
    for (let i = 0; i < inF; i++) s += row[i]! * row[i]!;
    o[out.offset + oi] = Math.sqrt(s);
  }
}

/** Whether a [rows, cols] tensor is laid out row-major without gaps (Tensor.isContiguous for two dims). */
function dense2d(t: Tensor, rows: number, cols: number): boolean {
  const st = t.strides;
  return (cols <= 1 || st[1] === 1) && (rows <= 1 || st[0] === cols);
}

/** A group's weights as checkLoraRows found them (a tensor's shape, strides and dtype never change). */
export interface LoraWeightsChecked {
  b: Tensor;
  lb: Tensor | null;
  inF: number;
  outF: number;
  r: number;
  /** The native backend's view of the weights: ArrayBuffers and float offsets (filled there). */
  native?: {
    a: ArrayBufferLike;
    aOff: number;
    b: ArrayBufferLike;
    bOff: number;
    lb: ArrayBufferLike | null;
    lbOff: number;
  };
  /**
   * The native kernel's packed copy of a frozen adapter's A and B (made once, in the layout of the ISA named;
   * a frozen adapter's weights are never changed in place, so it stays valid while the tensors live).
   */
  packed?: { isa: string; data: Float32Array };
}

/** Weights already checked, by lora_A (each group's weights are checked once, not at every call). */
const checkedWeights = new WeakMap<Tensor, LoraWeightsChecked>();

/** Checks one group's weights (shapes, contiguous f32), or finds them checked before. */
export function checkLoraWeights(g: LoraRowsGroup, k: number, inF: number, outF: number): LoraWeightsChecked {
  const { a, b, loraBias: lb } = g;
  const c = checkedWeights.get(a);
  if (c && c.b === b && c.lb === lb && c.inF === inF && c.outF === outF) return c;
  const r = a.shape[0]!;
  if (
    a.ndim !== 2 ||
    a.shape[1] !== inF ||
    b.ndim !== 2 ||
    b.shape[0] !== outF ||
    b.shape[1] !== r ||
    (lb && (lb.ndim !== 1 || lb.shape[0] !== outF))
  )
    throw new ShapeError(
      `loraRows: lora_A ${fmtShape(a.shape)} and lora_B ${fmtShape(b.shape)} do not fit [${outF}, ${inF}]`,
    );
  if (
    a.dtype !== 'f32' ||
    b.dtype !== 'f32' ||
    (lb && (lb.dtype !== 'f32' || (outF > 1 && lb.strides[0] !== 1))) ||
    !dense2d(a, r, inF) ||
    !dense2d(b, outF, r)
  )
    throw new TypeError(`loraRows: the weights of group ${k} must be contiguous f32`);
  const info: LoraWeightsChecked = { b, lb, inF, outF, r };
  checkedWeights.set(a, info);
  return info;
}

/**
 * Checks loraRows' operands (shared by the native backend, which raises the same errors): shapes, the weights
 * contiguous f32, the row groups in range.
 */
export function checkLoraRows(
  x: Tensor,
  out: Tensor,
  rowGroup: Tensor,
  groups: readonly LoraRowsGroup[],
  rows: number,
  inF: number,
  outF: number,
): void {
  checkLoraSizes(x, out, rowGroup, rows, inF, outF);
  for (let k = 0; k < groups.length; k++) checkLoraWeights(groups[k]!, k, inF, outF);
  checkRowGroups(rowGroup, rows, groups.length);
}

export function checkLoraSizes(
  x: Tensor,
  out: Tensor,
  rowGroup: Tensor,
  rows: number,
  inF: number,
  outF: number,
): void {
  if (x.size !== rows * inF || out.size !== rows * outF || rowGroup.size !== rows)
    throw new ShapeError(
      `loraRows: x ${fmtShape(x.shape)}, out ${fmtShape(out.shape)} and row groups ${fmtShape(rowGroup.shape)} do not fit ${rows} rows of ${inF} -> ${outF}`,
    );
}

/** Row groups in [-1, ng) (IndexError otherwise). */
export function checkRowGroups(rowGroup: Tensor, rows: number, ng: number): void {
  const rg = i32(rowGroup);
  const r0 = rowGroup.offset;
  for (let i = 0; i < rows; i++) {
    const g = rg[r0 + i]!;
    if (g < -1 || g >= ng) throw new IndexError(`loraRows: row group ${g} of row ${i} is out of range [-1, ${ng})`);
  }
}

function loraRows(
  x: Tensor,
  out: Tensor,
  rowGroup: Tensor,
  groups: readonly LoraRowsGroup[],
  rows: number,
  inF: number,
  outF: number,
): void {
  checkLoraRows(x, out, rowGroup, groups, rows, inF, outF);
  const xd = f32(x);
  const od = f32(out);
  const rg = i32(rowGroup);
  let rmax = 0;
  for (const g of groups) rmax = Math.max(rmax, g.a.shape[0]!);
  const u = new Float32Array(rmax);
  const acc = new Float64Array(Math.max(rmax, outF));
  for (let i = 0; i < rows; i++) {
    const gi = rg[rowGroup.offset + i]!;
    if (gi < 0) continue;
    const g = groups[gi]!;
    const r = g.a.shape[0]!;
    const s = g.scale;
    const ob = out.offset + i * outF;
    if (g.loraBias) {
      // (the unary scale op, rounded, then added)
      const lb = f32(g.loraBias);
      const lo = g.loraBias.offset;
      for (let o = 0; o < outF; o++) od[ob + o] = od[ob + o]! + Math.fround(lb[lo + o]! * s);
    }
    // shrink: u = x A^T (beta 0)
    const ad = f32(g.a);
    const xb = x.offset + i * inF;
    acc.fill(0, 0, r);
    for (let l = 0; l < inF; l++) {
      const av = xd[xb + l]!;
      if (av === 0) continue;
      for (let j = 0; j < r; j++) acc[j] += av * ad[g.a.offset + j * inF + l]!;
    }
    for (let j = 0; j < r; j++) u[j] = acc[j]!;
    // expand: out = s (u B^T) + out (beta 1)
    const bd = f32(g.b);
    acc.fill(0, 0, outF);
    for (let l = 0; l < r; l++) {
      const av = u[l]!;
      if (av === 0) continue;
      for (let o = 0; o < outF; o++) acc[o] += av * bd[g.b.offset + o * r + l]!;
    }
    for (let o = 0; o < outF; o++) od[ob + o] = s * acc[o]! + od[ob + o]!;
  }
}

export const jsLoraKernels: LoraKernels = { loraWeightNorm, loraRows };
