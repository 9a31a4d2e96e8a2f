// Dense linear algebra for the weight-mutating LoRA inits (PiSSA, OLoRA, orthogonal): thin SVD by one-sided
// Jacobi, Householder QR with LAPACK's sign convention (so OLoRA's A and B match torch.linalg.qr), and the
// randomized low-rank SVD of torch.svd_lowrank (Halko et al.). Row-major Float64Array matrices; sizes here are
// single weight matrices, so plain O(n^3) loops are fine.

import type { Rng } from '../../core/rng.ts';

/** A row-major matrix. */
export interface Mat {
  rows: number;
  cols: number;
  data: Float64Array;
}

export function mat(rows: number, cols: number, data?: ArrayLike<number>): Mat {
  const d = new Float64Array(rows * cols);
  if (data) for (let i = 0; i < d.length; i++) d[i] = data[i]!;
  return { rows, cols, data: d };
}

export function transposeMat(a: Mat): Mat {
  const t = mat(a.cols, a.rows);
  for (let i = 0; i < a.rows; i++) for (let j = 0; j < a.cols; j++) t.data[j * a.rows + i] = a.data[i * a.cols + j]!;
  return t;
}

/** C = A @ B. */
export function matmulMat(a: Mat, b: Mat): Mat {
  if (a.cols !== b.rows) throw new RangeError(`matmulMat: ${a.rows}x${a.cols} @ ${b.rows}x${b.cols}`);
  const c = mat(a.rows, b.cols);
  for (let i = 0; i < a.rows; i++)
    for (let l = 0; l < a.cols; l++) {
      const v = a.data[i * a.cols + l]!;
      if (v === 0) continue;
      const bo = l * b.cols;
      const co = i * b.cols;
      for (let j = 0; j < b.cols; j++) c.data[co + j] += v * b.data[bo + j]!;
    }
  return c;
}

/** Columns [from, to) of a. */
export function colsOf(a: Mat, from: number, to: number): Mat {
  const out = mat(a.rows, to - from);
  for (let i = 0; i < a.rows; i++)
    for (let j = from; j < to; j++) out.data[i * out.cols + j - from] = a.data[i * a.cols + j]!;
  return out;
}

/** Rows [from, to) of a. */
export function rowsOf(a: Mat, from: number, to: number): Mat {
  return { rows: to - from, cols: a.cols, data: a.data.slice(from * a.cols, to * a.cols) };
}

/**
 * Householder QR, reduced: A [m, n] = Q [m, k] R [k, n] with k = min(m, n). Each reflector follows LAPACK's dlarfg
 * (beta = -sign(alpha) * ||x||), as torch.linalg.qr does, so the signs of R's diagonal agree with PyTorch's.
 */
export function qr(a: Mat): { q: Mat; r: Mat } {
  const m = a.rows;
  const n = a.cols;
  const k = Math.min(m, n);
  const w = a.data.slice();
  const vs: Float64Array[] = [];
  const taus: number[] = [];
  for (let j = 0; j < k; j++) {
    const alpha = w[j * n + j]!;
    let xnorm2 = 0;
    for (let i = j + 1; i < m; i++) xnorm2 += w[i * n + j]! ** 2;
    const v = new Float64Array(m - j);
    v[0] = 1;
    if (xnorm2 === 0) {
      vs.push(v);
      taus.push(0);
      continue;
    }
    const h = Math.hypot(alpha, Math.sqrt(xnorm2));
    const beta = alpha >= 0 ? -h : h;
    const tau = (beta - alpha) / beta;
    const inv = 1 / (alpha - beta);
    for (let i = j + 1; i < m; i++) v[i - j] = w[i * n + j]! * inv;
    // apply H = I - tau v v^T to the trailing columns
    w[j * n + j] = beta;
    for (let i = j + 1; i < m; i++) w[i * n + j] = 0;
    for (let c = j + 1; c < n; c++) {
      let s = 0;
      for (let i = j; i < m; i++) s += v[i - j]! * w[i * n + c]!;
      s *= tau;
      for (let i = j; i < m; i++) w[i * n + c] -= s * v[i - j]!;
    }
    vs.push(v);
    taus.push(tau);
  }
  const r = mat(k, n);
  for (let i = 0; i < k; i++) for (let c = i; c < n; c++) r.data[i * n + c] = w[i * n + c]!;
  // Q = H_0 H_1 ... H_{k-1} applied to the first k columns of the identity (back to front, as dorgqr)
  const q = mat(m, k);
  for (let i = 0; i < k; i++) q.data[i * k + i] = 1;
  for (let j = k - 1; j >= 0; j--) {
    const v = vs[j]!;
    const tau = taus[j]!;
    if (tau === 0) continue;
    for (let c = 0; c < k; c++) {
      let s = 0;
      for (let i = j; i < m; i++) s += v[i - j]! * q.data[i * k + c]!;
      s *= tau;
      for (let i = j; i < m; i++) q.data[i * k + c] -= s * v[i - j]!;
    }
  }
  return { q, r };
}

/**
 * Thin SVD A [m, n] = U [m, k] diag(S) Vt [k, n], k = min(m, n), singular values descending. One-sided Jacobi
 * (Hestenes) on the columns of A (or of A^T when m < n): accurate to working precision, simple, and fast enough
 * for one weight matrix.
 */
export function svd(a: Mat): { u: Mat; s: Float64Array; vt: Mat } {
  if (a.rows < a.cols) {
    const t = svd(transposeMat(a));
    return { u: transposeMat(t.vt), s: t.s, vt: transposeMat(t.u) };
  }
  const m = a.rows;
  const n = a.cols;
  // work column-major: col j of A is g[j*m .. j*m+m)
  const g = new Float64Array(m * n);
  for (let i = 0; i < m; i++) for (let j = 0; j < n; j++) g[j * m + i] = a.data[i * n + j]!;
  const v = new Float64Array(n * n); // column-major too
  for (let j = 0; j < n; j++) v[j * n + j] = 1;
  const eps = 1e-15;
  for (let sweep = 0; sweep < 60; sweep++) {
    let rotated = false;
    for (let p = 0; p < n - 1; p++)
      for (let q = p + 1; q < n; q++) {
        let alpha = 0;
        let beta = 0;
        let gamma = 0;
        const po = p * m;
        const qo = q * m;
        for (let i = 0; i < m; i++) {
          const x = g[po + i]!;
          const y = g[qo + i]!;
          alpha += x * x;
          beta += y * y;
          gamma += x * y;
        }
        if (gamma === 0 || Math.abs(gamma) <= eps * Math.sqrt(alpha * beta)) continue;
        rotated = true;
        const zeta = (beta - alpha) / (2 * gamma);
        const t = Math.sign(zeta || 1) / (Math.abs(zeta) + Math.sqrt(1 + zeta * zeta));
        const c = 1 / Math.sqrt(1 + t * t);
        const s = c * t;
        for (let i = 0; i < m; i++) {
          const x = g[po + i]!;
          const y = g[qo + i]!;
          g[po + i] = c * x - s * y;
          g[qo + i] = s * x + c * y;
        }
        const pv = p * n;
        const qv = q * n;
        for (let i = 0; i < n; i++) {
          const x = v[pv + i]!;
          const y = v[qv + i]!;
          v[pv + i] = c * x - s * y;
          v[qv + i] = s * x + c * y;
        }
      }
    if (!rotated) break;
  }
  const norms = new Float64Array(n);
  for (let j = 0; j < n; j++) {
    let s = 0;
    for (let i = 0; i < m; i++) s += g[j * m + i]! ** 2;
    norms[j] = Math.sqrt(s);
  }
  const order = [...norms.keys()].sort((x, y) => norms[y]! - norms[x]!);
  const u = mat(m, n);
  const vt = mat(n, n);
  const sv = new Float64Array(n);
  order.forEach((j, k) => {
    const sj = norms[j]!;
    sv[k] = sj;
    for (let i = 0; i < m; i++) u.data[i * n + k] = sj > 0 ? g[j * m + i]! / sj : 0;
    for (let i = 0; i < n; i++) vt.data[k * n + i] = v[j * n + i]!;
  });
  completeZeroColumns(u, sv);
  return { u, s: sv, vt };
}

/** Columns of U whose singular value is 0 are set to unit vectors orthogonal to the others (Gram-Schmidt). */
function completeZeroColumns(u: Mat, s: Float64Array): void {
  const m = u.rows;
  const n = u.cols;
  for (let k = 0; k < n; k++) {
    if (s[k]! > 0) continue;
    for (let e = 0; e < m; e++) {
      const col = new Float64Array(m);
      col[e] = 1;
      for (let j = 0; j < n; j++) {
        if (j === k || (s[j]! === 0 && j > k)) continue;
        let d = 0;
        for (let i = 0; i < m; i++) d += u.data[i * n + j]! * col[i]!;
        for (let i = 0; i < m; i++) col[i] -= d * u.data[i * n + j]!;
      }
      const nrm = Math.hypot(...col);
      if (nrm > 1e-8) {
        for (let i = 0; i < m; i++) u.data[i * n + k] = col[i]! / nrm;
        break;
      }
    }
  }
}

/**
 * Randomized rank-q SVD of A [m, n] as torch.svd_lowrank(A, q, niter): a Gaussian sketch, `niter` subspace
 * (power) iterations with re-orthonormalisation, then the exact SVD of the small projected matrix.
 * Returns U [m, q], S [q], V [n, q] (V, not V^T, as torch does).
 */
export function svdLowrank(a: Mat, q: number, niter: number, rng: Rng): { u: Mat; s: Float64Array; v: Mat } {
  const m = a.rows;
  const n = a.cols;
  const k = Math.min(q, m, n);
  const at = transposeMat(a);
  const sketch = mat(n, k);
  for (let i = 0; i < sketch.data.length; i++) sketch.data[i] = rng.normal();
  let basis = qr(matmulMat(a, sketch)).q; // [m, k]
  for (let it = 0; it < niter; it++) {
    const z = qr(matmulMat(at, basis)).q; // [n, k]
    basis = qr(matmulMat(a, z)).q;
  }
  const b = matmulMat(transposeMat(basis), a); // [k, n]
  const small = svd(b);
  return { u: matmulMat(basis, small.u), s: small.s, v: transposeMat(small.vt) };
}
