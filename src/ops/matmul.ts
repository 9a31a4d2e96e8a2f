// Matrix products: matmul (batched, transposed views without copies) and linear (x @ W^T + b).
// linear computes no weight gradient when W does not require one: a frozen base weight costs only the
// input-gradient product in backward.

import type { GemmArgs } from '../backend/backend.ts';
import { getBackend } from '../backend/index.ts';
import { fmtShape, ShapeError } from '../core/errors.ts';
import { numel, type Tensor } from '../core/tensor.ts';
import { emptyForOutput } from './create.ts';
import { sum } from './reduce.ts';
import { contiguous, f32c, reshape } from './shape.ts';
import { record } from './tape.ts';

/** How a matrix operand is laid out: row-major as is, or the transpose of a row-major matrix. */
interface MatLayout {
  t: Tensor; // tensor whose storage is used (may be a fresh contiguous copy)
  trans: boolean;
  ld: number;
  batchStride: number;
  owned: boolean;
}

function layout(x: Tensor): MatLayout {
  const nd = x.ndim;
  const r = x.shape[nd - 2]!;
  const c = x.shape[nd - 1]!;
  const sr = x.strides[nd - 2]!;
  const sc = x.strides[nd - 1]!;
  const batchOk = (inner: number) => {
    // leading (batch) dims must be packed contiguously above the matrix
    let acc = inner;
    for (let i = nd - 3; i >= 0; i--) {
      if (x.shape[i] !== 1 && x.strides[i] !== acc) return false;
      acc *= x.shape[i]!;
    }
    return true;
  };
  if ((c === 1 || sc === 1) && (r === 1 || sr === c) && batchOk(r * c))
    return { t: x, trans: false, ld: Math.max(c, 1), batchStride: r * c, owned: false };
  if ((r === 1 || sr === 1) && (c === 1 || sc === r) && batchOk(r * c))
    return { t: x, trans: true, ld: Math.max(r, 1), batchStride: r * c, owned: false };
  const cx = contiguous(x);
  return { t: cx, trans: false, ld: c, batchStride: r * c, owned: cx !== x };
}

/** C = A @ B for A [..., m, k] and B [..., k, n] (batch dims equal) or B [k, n]. f32 out. */
export function matmul(a: Tensor, b: Tensor): Tensor {
  if (a.ndim < 2 || b.ndim < 2)
    throw new ShapeError(`matmul: operands need >= 2 dims, got ${fmtShape(a.shape)} and ${fmtShape(b.shape)}`);
  const m = a.shape[a.ndim - 2]!;
  const k = a.shape[a.ndim - 1]!;
  const k2 = b.shape[b.ndim - 2]!;
  const n = b.shape[b.ndim - 1]!;
  const aBatch = a.shape.slice(0, -2);
  const bBatch = b.shape.slice(0, -2);
  const batch = numel(aBatch);
  const bBroadcast = b.ndim === 2 && a.ndim > 2;
  if (k !== k2 || (!bBroadcast && (aBatch.length !== bBatch.length || aBatch.some((d, i) => d !== bBatch[i]))))
    throw new ShapeError(`matmul: shapes ${fmtShape(a.shape)} and ${fmtShape(b.shape)} do not multiply`);
  if (bBroadcast) {
    // fold the batch into rows: [batch*m, k] @ [k, n]
    const a2 = reshape(a, [batch * m, k]);
    const c2 = matmul(a2, b);
    return reshape(c2, [...aBatch, m, n]);
  }
  const out = emptyForOutput([...aBatch, m, n]);
  gemmInto(a, b, out, 1, 0);
  return record(
    out,
    'matmul',
    [a, b],
    (g, needs, [sa, sb]) => {
      const ga = needs[0] ? matmul(g, transposeView(sb!)) : null;
      const gb = needs[1] ? matmul(transposeView(sa!), g) : null;
      return [ga, gb];
    },
    [a, b],
  );
}

export function transposeView(x: Tensor): Tensor {
  const nd = x.ndim;
  const shape = [...x.shape];
  const strides = [...x.strides];
  [shape[nd - 2], shape[nd - 1]] = [shape[nd - 1]!, shape[nd - 2]!];
  [strides[nd - 2], strides[nd - 1]] = [strides[nd - 1]!, strides[nd - 2]!];
  return x.view(shape, strides, x.offset);
}

const NONE: Tensor[] = [];

/**
 * The backend's arguments for c = alpha * a @ b + beta * c with batch dims folded, and the contiguous copies
 * made of a or b where their layout needed one (the caller disposes them after the product).
 */
export function gemmArgs(
  a: Tensor,
  b: Tensor,
  c: Tensor,
  alpha: number,
  beta: number,
): { args: GemmArgs; owned: Tensor[] } {
  const la = layout(a);
  const lb = layout(b);
  const m = a.shape[a.ndim - 2]!;
  const k = a.shape[a.ndim - 1]!;
  const n = b.shape[b.ndim - 1]!;
  const batch = numel(a.shape.slice(0, -2));
  const args: GemmArgs = {
    transA: la.trans,
    transB: lb.trans,
    m,
    n,
    k,
    alpha,
    beta,
    a: la.t,
    aOff: la.t.offset,
    lda: la.ld,
    b: lb.t,
    bOff: lb.t.offset,
    ldb: lb.ld,
    c,
    cOff: c.offset,
    ldc: n,
    batch,
    strideA: la.batchStride,
    strideB: b.ndim === 2 ? 0 : lb.batchStride,
    strideC: m * n,
  };
  return { args, owned: la.owned || lb.owned ? [la, lb].filter((l) => l.owned).map((l) => l.t) : NONE };
}

/** c = alpha * a @ b + beta * c with batch dims folded; a, b any float dtype and layout. */
export function gemmInto(a: Tensor, b: Tensor, c: Tensor, alpha: number, beta: number): void {
  const { args, owned } = gemmArgs(a, b, c, alpha, beta);
  getBackend().gemm(args);
  for (const t of owned) t.dispose();
}

/**
 * y = x @ W^T (+ bias) for x [..., in] and W [out, in] (f32, bf16 or f16). Gradients: dx = g @ W always
 * (when x needs it), dW = g^T @ x only when W requires a gradient, db = sum(g).
 */
export function linear(x: Tensor, w: Tensor, bias?: Tensor | null): Tensor {
  const inF = x.shape[x.ndim - 1]!;
  if (w.ndim !== 2 || w.shape[1] !== inF)
    throw new ShapeError(`linear: input ${fmtShape(x.shape)} does not fit weight ${fmtShape(w.shape)} ([out, in])`);
  const outF = w.shape[0]!;
  if (bias && (bias.ndim !== 1 || bias.shape[0] !== outF))
    throw new ShapeError(`linear: bias ${fmtShape(bias.shape)} does not fit weight ${fmtShape(w.shape)}`);
  const rows = x.size / inF;
  const xc = f32c(x);
  const x2 = xc.view([rows, inF], [inF, 1], xc.offset);
  const out = emptyForOutput([...x.shape.slice(0, -1), outF]); // the bias copy or the product writes it whole
  const o2 = out.view([rows, outF], [outF, 1], out.offset);
  const wt = transposeView(w);
  if (bias) {
    const bv = bias.view([rows, outF], [0, 1], bias.offset);
    getBackend().copy(bv, o2);
    bv.dispose();
  }
  gemmInto(x2, wt, o2, 1, bias ? 1 : 0);
  wt.dispose();
  o2.dispose();
  x2.dispose();
  const xShape = x.shape;
  return record(
    out,
    'linear',
    [x, w, bias ?? null],
    (g, needs, [sw, sx]) => {
      const g2 = g.view([rows, outF], [outF, 1], g.offset);
      let gx: Tensor | null = null;
      if (needs[0]) {
        gx = emptyForOutput(xShape);
        const gx2 = gx.view([rows, inF], [inF, 1], 0);
        gemmInto(g2, sw!, gx2, 1, 0);
        gx2.dispose();
      }
      let gw: Tensor | null = null;
      if (needs[1]) {
        gw = emptyForOutput([outF, inF]);
        const x2s = sx!.view([rows, inF], [inF, 1], sx!.offset);
        const g2t = transposeView(g2);
        gemmInto(g2t, x2s, gw, 1, 0);
        g2t.dispose();
        x2s.dispose();
      }
      const gb = needs[2] ? sum(g2, 0) : null;
      g2.dispose();
      return [gx, gw, gb];
    },
    // x is kept for backward only when W needs a gradient (a frozen weight's layer saves just W, no copy)
    w.requiresGrad ? [w, xc] : [w],
  );
}
