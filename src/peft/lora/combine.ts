// Combining LoRA adapters into a new one: PEFT's LoraModel.add_weighted_adapter (peft/tuners/lora/model.py) with
// the task-vector merges of peft/utils/merge_utils.py (task arithmetic, TIES, DARE, magnitude pruning).
//
// Three families, as in PEFT:
// - cat: A = rows [w_i s_i A_i], B = columns [B_i]; rank Σ r_i; exactly Σ w_i s_i B_i A_i.
// - linear, ties, dare_linear, dare_ties, magnitude_prune: the A matrices and the B matrices are merged separately
//   with weights √|w_i s_i|·sign on A and √|w_i s_i| on B (so B A has cross terms B_i A_j, as in PEFT); equal ranks.
// - svd, ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd: the full deltas ΔW_i = s_i B_i A_i are merged
//   with weights w_i, then truncated: U, S, Vh = svd(ΔW), B = U[:, :r] diag(S[:r]), A = Vh[:r], optionally clamped
//   to the svd_clamp quantile of their values.
// The new adapter has r = the new rank and lora_alpha = r (scaling 1), target_modules the union of the sources'.
//
// Deliberate differences from PEFT (each also noted where it happens):
// - *_svd: the adapter scaling is applied once. PEFT multiplies get_delta_weight (which already holds s_i) by
//   w_i·s_i, so its deltas carry s_i²; here the task tensors are the true ΔW_i = s_i B_i A_i and the weights w_i.
// - DARE draws its Bernoulli(density) masks from the seeded Rng (same distribution as torch.bernoulli, other
//   draws); magnitude pruning breaks ties in |value| by flat index (torch.topk leaves that unspecified).
// - The svd merge is computed exactly from the factors (QR of the stacked factors and SVD of the small core), the
//   pruned *_svd merges through the eigendecomposition of the dense delta's Gram matrix; the top singular triplets
//   are those of torch.linalg.svd up to rounding and the signs of singular vectors (B A is unchanged). Components
//   beyond the delta's rank (or beyond min(out, in)) are zero rows of A and columns of B, where PEFT has arbitrary
//   orthonormal rows (or fails). The pruned *_svd types cost a dense O(n³) eigensolve per targeted matrix on the CPU
//   (about 3 s for 576×1536); svd costs O((out + in) R²) with R the summed source ranks.
// - Refused: a new name that exists (PEFT returns silently), a weights list of another length than the adapters
//   (PEFT's zip truncates), DoRA or lora_bias sources (PEFT gives the new adapter a freshly initialised magnitude or
//   bias instead of combining them), linear-family layers whose ranks differ (PEFT fails in torch.stack).
// - The new config: use_rslora false (PEFT PR #3449, else an rsLoRA source makes it overscaled by √r), rank and
//   alpha patterns cleared with tensors zero-padded to the new rank (PEFT #3737/#3744: unloadable adapters), bias
//   'none' (PEFT raises when a second adapter trains biases), init_lora_weights true for base-rewriting inits (PEFT
//   would rerun PiSSA/OLoRA on the base while injecting), modules_to_save the union of the sources' with the one
//   trained copy carried over (PEFT keeps the first adapter's list and fresh copies of the original module).
// - When the first adapter's layers_to_transform / layers_pattern / exclude_modules would leave out a layer another
//   source adapts, target_modules becomes the list of the adapted module paths (PEFT drops those layers' deltas);
//   a targeted layer no source adapts gets zeros (PEFT raises "No matching LoRAs found").

import { getBackend } from '../../backend/index.ts';
import { ConfigError } from '../../core/errors.ts';
import type { Rng } from '../../core/rng.ts';
import type { Tensor } from '../../core/tensor.ts';
import { tensor } from '../../ops/create.ts';
import { noGrad } from '../../ops/tape.ts';
import type { LoraConfig } from './config.ts';
import { initNeedsBase } from './init.ts';
import { LoraEmbedding, type LoraLinear } from './layer.ts';
import { type Mat, mat, qr, svd } from './linalg.ts';
import type { LoraModel } from './model.ts';
import { checkTargetModuleExists } from './target.ts';

export type CombinationType =
  | 'svd'
  | 'linear'
  | 'cat'
  | 'ties'
  | 'ties_svd'
  | 'dare_linear'
  | 'dare_ties'
  | 'dare_linear_svd'
  | 'dare_ties_svd'
  | 'magnitude_prune'
  | 'magnitude_prune_svd';

export const COMBINATION_TYPES: readonly CombinationType[] = [
  'svd',
  'linear',
  'cat',
  'ties',
  'ties_svd',
  'dare_linear',
  'dare_ties',
  'dare_linear_svd',
  'dare_ties_svd',
  'magnitude_prune',
  'magnitude_prune_svd',
];

/** The merge of a list of task tensors (merge_utils.py): what each combination type does to A, B or ΔW. */
export type TaskMerge = 'linear' | 'ties' | 'dare_linear' | 'dare_ties' | 'magnitude_prune';

export type MajoritySignMethod = 'total' | 'frequency';

const NEEDS_DENSITY = new Set<CombinationType>([
  'ties',
  'ties_svd',
  'dare_linear',
  'dare_ties',
  'dare_linear_svd',
  'dare_ties_svd',
  'magnitude_prune',
  'magnitude_prune_svd',
]);

/** The types that need equal ranks and merge A and B separately. */
const FACTOR_WISE = new Set<CombinationType>(['linear', 'ties', 'dare_linear', 'dare_ties', 'magnitude_prune']);

// ---------------------------------------------------------------------------------------------------------------
// merge_utils.py: task tensors are flat Float64Arrays of one shape; weights one number per tensor.

/** Keeps the int(density·n) largest |values| (ties by lower flat index), zeroes the rest. */
export function magnitudeBasedPruning(t: Float64Array, density: number): Float64Array {
  const k = Math.floor(density * t.length);
  const out = new Float64Array(t.length);
  if (k <= 0) return out;
  const order = Array.from({ length: t.length }, (_, i) => i);
  order.sort((x, y) => Math.abs(t[y]!) - Math.abs(t[x]!) || x - y);
  for (let j = 0; j < k; j++) out[order[j]!] = t[order[j]!]!;
  return out;
}

/** Keeps each value with probability density (Bernoulli mask from rng), optionally rescaled by 1/density. */
export function randomPruning(t: Float64Array, density: number, rescale: boolean, rng: Rng): Float64Array {
  const out = new Float64Array(t.length);
  for (let i = 0; i < t.length; i++) {
    const kept = rng.uniform() < density ? t[i]! : 0;
    // PEFT: (tensor * mask) / density
    out[i] = rescale ? kept / density : kept;
  }
  return out;
}

/** PEFT's prune: density ≥ 1 keeps everything (no rescaling); 'random' needs rng. */
export function prune(
  t: Float64Array,
  density: number,
  method: 'magnitude' | 'random',
  opts: { rescale?: boolean; rng?: Rng } = {},
): Float64Array {
  if (density >= 1) return t.slice();
  if (!(density >= 0)) throw new ConfigError(`density should be >= 0, got ${density}`);
  if (method === 'magnitude') return magnitudeBasedPruning(t, density);
  if (!opts.rng) throw new ConfigError('random pruning (DARE) needs an rng');
  return randomPruning(t, density, opts.rescale ?? false, opts.rng);
}

/**
 * Per tensor, where its sign agrees with the elected sign: +1 where the sum ('total') or the sum of signs
 * ('frequency') over the tensors is ≥ 0, else -1. Zeros never agree (sign(0) = 0).
 */
export function calculateMajoritySignMask(tensors: readonly Float64Array[], method: MajoritySignMethod): Uint8Array[] {
  const n = tensors[0]!.length;
  const majority = new Int8Array(n);
  for (let i = 0; i < n; i++) {
    let m = 0;
    for (const t of tensors) m += method === 'total' ? t[i]! : Math.sign(t[i]!);
    majority[i] = m >= 0 ? 1 : -1;
  }
  return tensors.map((t) => {
    const mask = new Uint8Array(n);
    for (let i = 0; i < n; i++) mask[i] = Math.sign(t[i]!) === majority[i] ? 1 : 0;
    return mask;
  });
}

/** Mean over the tensors that agree with the elected sign (sum / max(count, 1)). */
export function disjointMerge(tensors: readonly Float64Array[], masks: readonly Uint8Array[]): Float64Array {
  const n = tensors[0]!.length;
  const out = new Float64Array(n);
  for (let i = 0; i < n; i++) {
    let s = 0;
    let c = 0;
    tensors.forEach((t, j) => {
      if (masks[j]![i]) {
        s += t[i]!;
        c++;
      }
    });
    out[i] = s / Math.max(c, 1);
  }
  return out;
}

function weightedSum(tensors: readonly Float64Array[], weights: readonly number[]): Float64Array {
  const out = new Float64Array(tensors[0]!.length);
  tensors.forEach((t, j) => {
    const w = weights[j]!;
    for (let i = 0; i < out.length; i++) out[i] += w * t[i]!;
  });
  return out;
}

/** Σ w_j T_j. */
export function taskArithmetic(tensors: readonly Float64Array[], weights: readonly number[]): Float64Array {
  return weightedSum(tensors, weights);
}

export interface TaskMergeOptions {
  density?: number;
  majoritySignMethod?: MajoritySignMethod;
  /** For DARE. */
  rng?: Rng;
}

/**
 * One merge of merge_utils.py: linear (task_arithmetic), magnitude_prune (prune each, then Σ w T), ties (prune
 * each by magnitude, elect the sign on the unweighted pruned tensors, disjoint mean of the weighted ones),
 * dare_linear / dare_ties (the same with random pruning rescaled by 1/density). The rng is used tensor by tensor,
 * element by element, in order.
 */
export function mergeTaskTensors(
  method: TaskMerge,
  tensors: readonly Float64Array[],
  weights: readonly number[],
  opts: TaskMergeOptions = {},
): Float64Array {
  if (tensors.length === 0) throw new ConfigError('mergeTaskTensors: no tensors');
  if (weights.length !== tensors.length)
    throw new ConfigError(`mergeTaskTensors: ${weights.length} weights for ${tensors.length} tensors`);
  if (method === 'linear') return taskArithmetic(tensors, weights);
  const density = opts.density;
  if (density === undefined) throw new ConfigError(`density is required for ${method}`);
  const random = method === 'dare_linear' || method === 'dare_ties';
  const pruned = tensors.map((t) =>
    prune(t, density, random ? 'random' : 'magnitude', { rescale: random, rng: opts.rng }),
  );
  if (method === 'magnitude_prune' || method === 'dare_linear') return weightedSum(pruned, weights);
  const masks = calculateMajoritySignMask(pruned, opts.majoritySignMethod ?? 'total');
  const weighted = pruned.map((t, j) => {
    const w = weights[j]!;
    return t.map((v) => v * w);
  });
  return disjointMerge(weighted, masks);
}

// ---------------------------------------------------------------------------------------------------------------
// Truncated SVD into LoRA factors.

/** torch.quantile(values, q) with linear interpolation. */
export function quantile(values: ArrayLike<number>, q: number): number {
  const s = Float64Array.from(values).sort();
  if (s.length === 0) throw new ConfigError('quantile of no values');
  const pos = q * (s.length - 1);
  const lo = Math.floor(pos);
  const hi = Math.min(lo + 1, s.length - 1);
  return s[lo]! + (s[hi]! - s[lo]!) * (pos - lo);
}

export interface LoraFactors {
  /** [rank, in] */
  a: Mat;
  /** [out, rank] */
  b: Mat;
}

/**
 * B = U[:, :rank] diag(S[:rank]), A = Vh[:rank] from a thin SVD (U [m, k], S [k] descending, Vt [k, n]),
 * zero-padded where k < rank, then clamped to ±quantile(cat(B, A), clamp) when clamp is given (PEFT's svd_clamp).
 */
export function svdToFactors(u: Mat, s: ArrayLike<number>, vt: Mat, rank: number, clamp?: number): LoraFactors {
  const m = u.rows;
  const n = vt.cols;
  const k = Math.min(rank, s.length, u.cols, vt.rows);
  const b = mat(m, rank);
  const a = mat(rank, n);
  for (let j = 0; j < k; j++) {
    const sj = s[j]!;
    for (let i = 0; i < m; i++) b.data[i * rank + j] = u.data[i * u.cols + j]! * sj;
    a.data.set(vt.data.subarray(j * n, (j + 1) * n), j * n);
  }
  if (clamp !== undefined) {
    const all = new Float64Array(b.data.length + a.data.length);
    all.set(b.data);
    all.set(a.data, b.data.length);
    const hi = quantile(all, clamp);
    const lo = -hi;
    // torch.clamp(x, lo, hi) = min(max(x, lo), hi), also when lo > hi
    for (const d of [b.data, a.data]) for (let i = 0; i < d.length; i++) d[i] = Math.min(Math.max(d[i]!, lo), hi);
  }
  return { a, b };
}

/**
 * The thin SVD of W = Bc Ac (Bc [m, R], Ac [R, n]) without forming W: Bc = Qb Rb, Ac^T = Qa Ra, then the SVD of
 * the small core Rb Ra^T gives U = Qb Uc and Vt = Vct Qa^T. Exact; O((m + n) R²).
 */
export function svdOfProduct(bc: Mat, ac: Mat): { u: Mat; s: Float64Array; vt: Mat } {
  const { q: qb, r: rb } = qr(bc); // qb [m, k1], rb [k1, R]
  const act = transposeOf(ac); // [n, R]
  const { q: qa, r: ra } = qr(act); // qa [n, k2], ra [k2, R]
  const core = matmul(rb, transposeOf(ra)); // [k1, k2]
  const c = svd(core); // u [k1, k], vt [k, k2]
  return { u: matmul(qb, c.u), s: c.s, vt: matmul(c.vt, transposeOf(qa)) };
}

/**
 * The `k` leading singular triplets of a dense W [m, n] (U [m, k], S [k], Vt [k, n]) from the symmetric
 * eigendecomposition of its Gram matrix on the smaller side (Householder tridiagonalisation and implicit QL).
 * About 10× faster than one-sided Jacobi on weight-sized matrices; the leading triplets agree with a direct SVD to
 * rounding relative to the largest singular value, and U diag(S) Vt is the projection of W on them.
 */
export function topSvd(w: Mat, k: number): { u: Mat; s: Float64Array; vt: Mat } {
  const m = w.rows;
  const n = w.cols;
  const wide = m < n;
  const p = wide ? m : n;
  k = Math.min(k, p);
  // G = W^T W [n, n] (tall) or W W^T [m, m] (wide), upper triangle then mirrored
  const g = new Float64Array(p * p);
  const d = w.data;
  if (!wide) {
    for (let r = 0; r < m; r++) {
      const ro = r * n;
      for (let i = 0; i < n; i++) {
        const wi = d[ro + i]!;
        if (wi === 0) continue;
        const go = i * n;
        for (let j = i; j < n; j++) g[go + j] += wi * d[ro + j]!;
      }
    }
  } else {
    for (let i = 0; i < m; i++)
      for (let j = i; j < m; j++) {
        let s = 0;
        const io = i * n;
        const jo = j * n;
        for (let c = 0; c < n; c++) s += d[io + c]! * d[jo + c]!;
        g[i * m + j] = s;
      }
  }
  for (let i = 0; i < p; i++) for (let j = 0; j < i; j++) g[i * p + j] = g[j * p + i]!;
  const { values, vectors } = symmetricEigen(g, p); // ascending; vectors as rows
  const s = new Float64Array(k);
  const u = mat(m, k);
  const vt = mat(k, n);
  const top = values[p - 1]! > 0 ? Math.sqrt(values[p - 1]!) : 0;
  const tiny = top * Math.max(m, n) * 2 ** -52;
  for (let j = 0; j < k; j++) {
    const idx = p - 1 - j;
    const sj = values[idx]! > 0 ? Math.sqrt(values[idx]!) : 0;
    s[j] = sj;
    const vec = vectors.subarray(idx * p, (idx + 1) * p);
    if (!wide) {
      // v_j from the eigenvector, u_j = W v_j / s_j
      vt.data.set(vec, j * n);
      if (sj > tiny)
        for (let r = 0; r < m; r++) {
          let acc = 0;
          const ro = r * n;
          for (let c = 0; c < n; c++) acc += d[ro + c]! * vec[c]!;
          u.data[r * k + j] = acc / sj;
        }
    } else {
      // u_j from the eigenvector, v_j = W^T u_j / s_j
      for (let r = 0; r < m; r++) u.data[r * k + j] = vec[r]!;
      if (sj > tiny)
        for (let r = 0; r < m; r++) {
          const ur = vec[r]! / sj;
          if (ur === 0) continue;
          const ro = r * n;
          const vo = j * n;
          for (let c = 0; c < n; c++) vt.data[vo + c] += ur * d[ro + c]!;
        }
    }
  }
  return { u, s, vt };
}

/**
 * Eigen-decomposition of a symmetric matrix (row-major [n, n], not modified): eigenvalues ascending and the
 * orthonormal eigenvectors as rows. Householder reduction to tridiagonal form and the implicit QL algorithm
 * (tred2 / tql2 of EISPACK, as in JAMA).
 */
export function symmetricEigen(a: Float64Array, n: number): { values: Float64Array; vectors: Float64Array } {
  const V = a.slice(); // V[i][j] = V[i*n+j]
  const dd = new Float64Array(n);
  const e = new Float64Array(n);
  if (n === 0) return { values: dd, vectors: V };
  // tred2
  for (let j = 0; j < n; j++) dd[j] = V[(n - 1) * n + j]!;
  for (let i = n - 1; i > 0; i--) {
    let scale = 0;
    let h = 0;
    for (let k = 0; k < i; k++) scale += Math.abs(dd[k]!);
    if (scale === 0) {
      e[i] = dd[i - 1]!;
      for (let j = 0; j < i; j++) {
        dd[j] = V[(i - 1) * n + j]!;
        V[i * n + j] = 0;
        V[j * n + i] = 0;
      }
    } else {
      for (let k = 0; k < i; k++) {
        dd[k] = dd[k]! / scale;
        h += dd[k]! * dd[k]!;
      }
      let f = dd[i - 1]!;
      let g = Math.sqrt(h);
      if (f > 0) g = -g;
      e[i] = scale * g;
      h -= f * g;
      dd[i - 1] = f - g;
      for (let j = 0; j < i; j++) e[j] = 0;
      for (let j = 0; j < i; j++) {
        f = dd[j]!;
        V[j * n + i] = f;
        g = e[j]! + V[j * n + j]! * f;
        for (let k = j + 1; k <= i - 1; k++) {
          g += V[k * n + j]! * dd[k]!;
          e[k] = e[k]! + V[k * n + j]! * f;
        }
        e[j] = g;
      }
      f = 0;
      for (let j = 0; j < i; j++) {
        e[j] = e[j]! / h;
        f += e[j]! * dd[j]!;
      }
      const hh = f / (h + h);
      for (let j = 0; j < i; j++) e[j] = e[j]! - hh * dd[j]!;
      for (let j = 0; j < i; j++) {
        f = dd[j]!;
        g = e[j]!;
        for (let k = j; k <= i - 1; k++) V[k * n + j] = V[k * n + j]! - (f * e[k]! + g * dd[k]!);
        dd[j] = V[(i - 1) * n + j]!;
        V[i * n + j] = 0;
      }
    }
    dd[i] = h;
  }
  for (let i = 0; i < n - 1; i++) {
    V[(n - 1) * n + i] = V[i * n + i]!;
    V[i * n + i] = 1;
    const h = dd[i + 1]!;
    if (h !== 0) {
      for (let k = 0; k <= i; k++) dd[k] = V[k * n + i + 1]! / h;
      for (let j = 0; j <= i; j++) {
        let g = 0;
        for (let k = 0; k <= i; k++) g += V[k * n + i + 1]! * V[k * n + j]!;
        for (let k = 0; k <= i; k++) V[k * n + j] = V[k * n + j]! - g * dd[k]!;
      }
    }
    for (let k = 0; k <= i; k++) V[k * n + i + 1] = 0;
  }
  for (let j = 0; j < n; j++) {
    dd[j] = V[(n - 1) * n + j]!;
    V[(n - 1) * n + j] = 0;
  }
  V[(n - 1) * n + n - 1] = 1;
  e[0] = 0;
  // tql2, with the eigenvector matrix transposed (Z[i] = column i of V) so the rotations touch contiguous rows
  const Z = new Float64Array(n * n);
  for (let i = 0; i < n; i++) for (let k = 0; k < n; k++) Z[i * n + k] = V[k * n + i]!;
  for (let i = 1; i < n; i++) e[i - 1] = e[i]!;
  e[n - 1] = 0;
  let f = 0;
  let tst1 = 0;
  const eps = 2 ** -52;
  for (let l = 0; l < n; l++) {
    tst1 = Math.max(tst1, Math.abs(dd[l]!) + Math.abs(e[l]!));
    let m = l;
    while (m < n) {
      if (Math.abs(e[m]!) <= eps * tst1) break;
      m++;
    }
    if (m > l) {
      let iter = 0;
      do {
        if (++iter > 100) throw new Error('symmetricEigen: the QL iteration did not converge');
        let g = dd[l]!;
        let p = (dd[l + 1]! - g) / (2 * e[l]!);
        let r = Math.hypot(p, 1);
        if (p < 0) r = -r;
        dd[l] = e[l]! / (p + r);
        dd[l + 1] = e[l]! * (p + r);
        const dl1 = dd[l + 1]!;
        let h = g - dd[l]!;
        for (let i = l + 2; i < n; i++) dd[i] = dd[i]! - h;
        f += h;
        p = dd[m]!;
        let c = 1;
        let c2 = c;
        let c3 = c;
        const el1 = e[l + 1]!;
        let s = 0;
        let s2 = 0;
        for (let i = m - 1; i >= l; i--) {
          c3 = c2;
          c2 = c;
          s2 = s;
          g = c * e[i]!;
          h = c * p;
          r = Math.hypot(p, e[i]!);
          e[i + 1] = s * r;
          s = e[i]! / r;
          c = p / r;
          p = c * dd[i]! - s * g;
          dd[i + 1] = h + s * (c * g + s * dd[i]!);
          const zi = i * n;
          const zi1 = (i + 1) * n;
          for (let k = 0; k < n; k++) {
            const hk = Z[zi1 + k]!;
            const vk = Z[zi + k]!;
            Z[zi1 + k] = s * vk + c * hk;
            Z[zi + k] = c * vk - s * hk;
          }
        }
        p = (-s * s2 * c3 * el1 * e[l]!) / dl1;
        e[l] = s * p;
        dd[l] = c * p;
      } while (Math.abs(e[l]!) > eps * tst1);
    }
    dd[l] = dd[l]! + f;
    e[l] = 0;
  }
  // sort ascending
  const order = Array.from({ length: n }, (_, i) => i).sort((x, y) => dd[x]! - dd[y]!);
  const values = new Float64Array(n);
  const vectors = new Float64Array(n * n);
  order.forEach((src, dst) => {
    values[dst] = dd[src]!;
    vectors.set(Z.subarray(src * n, (src + 1) * n), dst * n);
  });
  return { values, vectors };
}

function transposeOf(a: Mat): Mat {
  const t = mat(a.cols, a.rows);
  for (let i = 0; i < a.rows; i++) for (let j = 0; j < a.cols; j++) t.data[j * a.rows + i] = a.data[i * a.cols + j]!;
  return t;
}

function matmul(a: Mat, b: Mat): Mat {
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

// ---------------------------------------------------------------------------------------------------------------
// add_weighted_adapter

export interface AddWeightedAdapterOptions {
  /** Default 'svd', as PEFT. With a single source adapter PEFT always uses 'linear' (so does this). */
  combinationType?: CombinationType;
  /** Rank of the result of the *svd types (default: the largest source rank). */
  svdRank?: number;
  /** Quantile in [0, 1] at which the *svd factors are clamped (default: no clamping). */
  svdClamp?: number;
  /** Fraction of values kept, in (0, 1]: required by the ties, dare and magnitude_prune types. */
  density?: number;
  /** How TIES elects the sign: 'total' (sum of values, default) or 'frequency' (sum of signs). */
  majoritySignMethod?: MajoritySignMethod;
  /** Randomness for DARE (default: the model's RNG). */
  rng?: Rng;
  /** Where warnings go (default console.warn). */
  onWarning?: (message: string) => void;
}

export interface WeightedAdapterResult {
  name: string;
  /** The type used ('linear' when one adapter was given). */
  combinationType: CombinationType;
  /** The new adapter's rank (its lora_alpha is the same, so its scaling is 1). */
  r: number;
  /** Module paths where the new adapter holds a combination. */
  layers: string[];
}

interface Source {
  /** [r, in] (embedding: [r, V]) */
  a: Float64Array;
  /** [out, r] (embedding: [D, r]) */
  b: Float64Array;
  r: number;
  /** The user's weight. */
  w: number;
  /** The layer's scaling of this adapter (alpha / r or alpha / √r, times any set_scale weight). */
  s: number;
}

function fail(field: string, msg: string): never {
  throw new ConfigError(`addWeightedAdapter: ${field} ${msg}`);
}

function f64(t: { toF32(): Float32Array }): Float64Array {
  return Float64Array.from(t.toF32());
}

/** Largest rank an adapter has anywhere (r or its rank_pattern values), as PEFT sizes the new adapter. */
function maxRank(cfg: LoraConfig): number {
  return Math.max(cfg.r, ...Object.values(cfg.rank_pattern));
}

function padRows(a: Float64Array, rows: number, cols: number, toRows: number): Float32Array {
  const out = new Float32Array(toRows * cols);
  out.set(a.subarray(0, rows * cols));
  return out;
}

function padCols(b: Float64Array, rows: number, cols: number, toCols: number): Float32Array {
  const out = new Float32Array(rows * toCols);
  for (let i = 0; i < rows; i++) for (let j = 0; j < cols; j++) out[i * toCols + j] = b[i * cols + j]!;
  return out;
}

/**
 * PEFT's add_weighted_adapter: adds adapter `newName`, a combination of `adapters` with `weights`, to the model
 * (inactive; activate it with setAdapter). Each source's scaling is its layer's current one (alpha / r, or
 * alpha / √r with rsLoRA, times any setAdapter / setAdapterWeight weight, as PEFT's set_scale changes `scaling`),
 * so pass the combination weights here, not also through setAdapter. Errors are ConfigErrors naming the field.
 */
export function addWeightedAdapter(
  pm: LoraModel,
  adapters: readonly string[],
  weights: readonly number[],
  newName: string,
  opts: AddWeightedAdapterOptions = {},
): WeightedAdapterResult {
  const warn = opts.onWarning ?? ((m: string) => console.warn(`warning: ${m}`));
  if (!Array.isArray(adapters) || adapters.length === 0) fail('adapters', 'must name at least one adapter');
  for (const a of adapters)
    if (!pm.configs.has(a))
      fail('adapters', `names '${a}', which does not exist (have: ${pm.adapterNames.join(', ') || 'none'})`);
  if (!Array.isArray(weights) || weights.length !== adapters.length)
    fail('weights', `gives ${weights?.length ?? 0} weight(s) for ${adapters.length} adapter(s); give one per adapter`);
  weights.forEach((w, i) => {
    if (typeof w !== 'number' || !Number.isFinite(w))
      fail('weights', `[${i}] must be a finite number, got ${JSON.stringify(w)}`);
  });
  if (typeof newName !== 'string' || newName === '') fail('newName', 'must be a non-empty adapter name');
  // PEFT returns silently when the name exists; that hides that nothing was combined
  if (pm.configs.has(newName)) fail('newName', `'${newName}' is an existing adapter; choose another name`);
  const requested = opts.combinationType ?? 'svd';
  if (!COMBINATION_TYPES.includes(requested))
    fail('combinationType', `'${String(requested)}' is not one of ${COMBINATION_TYPES.join(', ')}`);
  const density = opts.density;
  if (density !== undefined && (typeof density !== 'number' || !(density > 0 && density <= 1)))
    fail('density', `must be a number in (0, 1], got ${JSON.stringify(density)}`);
  const sign = opts.majoritySignMethod ?? 'total';
  if (sign !== 'total' && sign !== 'frequency')
    fail('majoritySignMethod', `must be 'total' or 'frequency', got ${JSON.stringify(sign)}`);
  const svdRank = opts.svdRank;
  if (svdRank !== undefined && (typeof svdRank !== 'number' || !Number.isInteger(svdRank) || svdRank <= 0))
    fail('svdRank', `must be a positive integer, got ${JSON.stringify(svdRank)}`);
  const clamp = opts.svdClamp;
  if (clamp !== undefined && (typeof clamp !== 'number' || !(clamp >= 0 && clamp <= 1)))
    fail('svdClamp', `must be a quantile in [0, 1], got ${JSON.stringify(clamp)}`);

  // if there is only one adapter, PEFT can only use linear merging
  const type: CombinationType = adapters.length === 1 ? 'linear' : requested;
  if (type !== requested)
    warn(`addWeightedAdapter: one source adapter: using 'linear' instead of '${requested}' (as PEFT does)`);
  if (NEEDS_DENSITY.has(type) && density === undefined) fail('density', `is required for combinationType '${type}'`);

  const cfgs = adapters.map((a) => pm.configs.get(a)!);
  cfgs.forEach((c, i) => {
    if (c.use_dora)
      fail(
        'adapters',
        `'${adapters[i]}' uses DoRA; DoRA adapters cannot be combined (their magnitude vectors have no combination rule)`,
      );
    if (c.lora_bias) fail('adapters', `'${adapters[i]}' has lora_bias; adapters with a LoRA bias cannot be combined`);
  });

  // the new rank, as PEFT's _check_add_weighted_adapter
  const ranks = cfgs.map(maxRank);
  let newRank: number;
  if (FACTOR_WISE.has(type)) {
    if (new Set(ranks).size !== 1)
      fail(
        'adapters',
        `must all have the same r for combinationType '${type}' (${adapters.map((a, i) => `'${a}' r=${ranks[i]}`).join(', ')}); use 'cat' or an svd type`,
      );
    newRank = ranks[0]!;
  } else if (type === 'cat') newRank = ranks.reduce((x, y) => x + y, 0);
  else newRank = svdRank ?? Math.max(...ranks);

  // every layer's combination, computed before the model changes
  const rng = opts.rng ?? pm.rt.rng;
  const results = new Map<string, { a: Float32Array; b: Float32Array }>();
  for (const [path, layer] of pm.adapterLayers()) {
    const present = adapters.map((n, i) => [n, i] as const).filter(([n]) => layer.has(n));
    if (present.length === 0) continue;
    const emb = layer instanceof LoraEmbedding;
    const out = emb ? layer.dim : (layer as LoraLinear).outFeatures;
    const inF = emb ? layer.numEmbeddings : (layer as LoraLinear).inFeatures;
    const srcs: Source[] = present.map(([n, i]) => {
      const a = emb ? layer.embA.get(n)! : (layer as LoraLinear).loraA.get(n)!.weight;
      const b = emb ? layer.embB.get(n)! : (layer as LoraLinear).loraB.get(n)!.weight;
      return { a: f64(a), b: f64(b), r: a.shape[0]!, w: weights[i]!, s: layer.scalingOf(n) };
    });
    results.set(path, combineLayer(type, srcs, out, inF, newRank, path, { density, sign, clamp, rng }));
  }
  if (results.size === 0) fail('adapters', 'hold no adapter layer');

  // the new config: a copy of the first adapter's, as PEFT's replace(...)
  const first = cfgs[0]!;
  const targetTypes = new Set(cfgs.map((c) => (typeof c.target_modules === 'string' ? 'str' : 'list')));
  if (targetTypes.size > 1)
    fail(
      'adapters',
      'mix target_modules given as a regex string and as a list; PEFT cannot combine those, and neither can this',
    );
  let targets: string | string[] = targetTypes.has('str')
    ? cfgs.map((c) => `(${c.target_modules as string})`).join('|')
    : [...new Set(cfgs.flatMap((c) => (c.target_modules as string[] | null) ?? []))];
  const mts = [...new Set(cfgs.flatMap((c) => c.modules_to_save ?? []))];
  if (cfgs.some((c) => c.bias !== 'none'))
    warn(
      `addWeightedAdapter: the new adapter '${newName}' gets bias 'none' (only one adapter may train biases; they live in the base model)`,
    );
  const cfg: LoraConfig = {
    ...first,
    extra: { ...first.extra },
    r: newRank,
    lora_alpha: newRank,
    target_modules: targets,
    rank_pattern: {},
    alpha_pattern: {},
    // PEFT PR #3449: with rsLoRA copied, scaling would be r/√r instead of 1
    use_rslora: false,
    use_dora: false,
    lora_bias: false,
    bias: 'none',
    modules_to_save: mts.length ? mts : null,
    // a base-rewriting init (PiSSA, OLoRA) would rewrite the base again while the new adapter is injected
    init_lora_weights: initNeedsBase(first.init_lora_weights) ? true : first.init_lora_weights,
  };
  const missed = [...results.keys()].filter((p) => checkTargetModuleExists(cfg, p) !== 'match');
  if (missed.length) {
    // the first adapter's layers_to_transform / layers_pattern / exclude_modules leave out layers another source
    // adapts: name the adapted modules instead
    targets = [...results.keys()];
    cfg.target_modules = targets;
    cfg.layers_to_transform = null;
    cfg.layers_pattern = null;
    cfg.exclude_modules = null;
    const still = targets.filter((p) => checkTargetModuleExists(cfg, p) !== 'match');
    if (still.length)
      fail('adapters', `adapt module(s) the combined adapter cannot target: ${still.slice(0, 4).join(', ')}`);
  }

  // modules_to_save: at most one source may hold a trained copy of a module (as PEFT)
  const copyFrom = new Map<string, string>();
  for (const [path, w] of pm.savedModules()) {
    const holders = [...new Set(adapters.filter((a) => w.has(a)))];
    if (holders.length > 1)
      fail(
        'adapters',
        `${holders.map((h) => `'${h}'`).join(' and ')} each have a trained copy of '${path}' (modules_to_save); such adapters cannot be combined`,
      );
    if (holders.length === 1) copyFrom.set(path, holders[0]!);
  }

  pm.addAdapter(newName, cfg, { forLoading: true });
  try {
    const be = getBackend();
    noGrad(() => {
      const put = (dst: Tensor, v: Float32Array) => {
        const t = tensor(v, dst.shape);
        be.copy(t, dst);
        t.dispose();
      };
      const layers = new Map(pm.adapterLayers());
      for (const [path, { a, b }] of results) {
        const layer = layers.get(path);
        if (!layer?.has(newName))
          throw new ConfigError(`addWeightedAdapter: the combined adapter did not reach '${path}'`);
        if (layer instanceof LoraEmbedding) {
          put(layer.embA.get(newName)!, a);
          put(layer.embB.get(newName)!, b);
        } else {
          put(layer.loraA.get(newName)!.weight, a);
          put(layer.loraB.get(newName)!.weight, b);
        }
      }
      for (const [path, w] of pm.savedModules()) {
        const from = copyFrom.get(path);
        if (!from || !w.has(newName)) continue;
        const src = new Map(w.copies.get(from)!.namedParameters());
        for (const [n, p] of w.copies.get(newName)!.namedParameters()) be.copy(src.get(n)!, p);
      }
    });
  } catch (e) {
    pm.deleteAdapter(newName);
    throw e;
  }
  return { name: newName, combinationType: type, r: newRank, layers: [...results.keys()] };
}

interface LayerOptions {
  density: number | undefined;
  sign: MajoritySignMethod;
  clamp: number | undefined;
  rng: Rng;
}

/** One layer's new A [rank, in] and B [out, rank] from the sources present there. */
function combineLayer(
  type: CombinationType,
  srcs: Source[],
  out: number,
  inF: number,
  rank: number,
  path: string,
  o: LayerOptions,
): { a: Float32Array; b: Float32Array } {
  if (type === 'cat') {
    // A = rows [w s A_i], B = columns [B_i]; zero rows / columns where the layer's ranks sum to less
    const a = new Float32Array(rank * inF);
    const b = new Float32Array(out * rank);
    let at = 0;
    for (const src of srcs) {
      const c = src.w * src.s;
      for (let i = 0; i < src.r * inF; i++) a[at * inF + i] = src.a[i]! * c;
      for (let i = 0; i < out; i++) for (let j = 0; j < src.r; j++) b[i * rank + at + j] = src.b[i * src.r + j]!;
      at += src.r;
    }
    return { a, b };
  }
  if (FACTOR_WISE.has(type)) {
    const r = srcs[0]!.r;
    if (srcs.some((x) => x.r !== r))
      throw new ConfigError(
        `addWeightedAdapter: ${path}: the adapters have ranks ${srcs.map((x) => x.r).join(', ')} here (rank_pattern); combinationType '${type}' needs equal ranks (use 'cat' or an svd type)`,
      );
    // √|w s| on both, the sign on A only, so that B A carries w s (and negative weights subtract)
    const wA = srcs.map((x) => Math.sqrt(Math.abs(x.w * x.s)) * (x.w * x.s >= 0 ? 1 : -1));
    const wB = srcs.map((x) => Math.sqrt(Math.abs(x.w * x.s)));
    const mo = { density: o.density, majoritySignMethod: o.sign, rng: o.rng };
    const a = mergeTaskTensors(
      type as TaskMerge,
      srcs.map((x) => x.a),
      wA,
      mo,
    );
    const b = mergeTaskTensors(
      type as TaskMerge,
      srcs.map((x) => x.b),
      wB,
      mo,
    );
    return { a: padRows(a, r, inF, rank), b: padCols(b, out, r, rank) };
  }
  let f: LoraFactors;
  if (type === 'svd') {
    // Σ w s B_i A_i = [w s B_1 | w s B_2 | ...] [A_1; A_2; ...]: the exact SVD from the factors
    const R = srcs.reduce((t, x) => t + x.r, 0);
    const bc = mat(out, R);
    const ac = mat(R, inF);
    let at = 0;
    for (const src of srcs) {
      const c = src.w * src.s;
      for (let i = 0; i < out; i++) for (let j = 0; j < src.r; j++) bc.data[i * R + at + j] = src.b[i * src.r + j]! * c;
      ac.data.set(src.a, at * inF);
      at += src.r;
    }
    const d = svdOfProduct(bc, ac);
    f = svdToFactors(d.u, d.s, d.vt, rank, o.clamp);
  } else {
    // the dense deltas ΔW_i = s B_i A_i (scaling once; PEFT's get_delta_weight times w·s carries s twice)
    const deltas = srcs.map((x) => {
      const dW = new Float64Array(out * inF);
      for (let i = 0; i < out; i++)
        for (let l = 0; l < x.r; l++) {
          const v = x.b[i * x.r + l]! * x.s;
          if (v === 0) continue;
          const ao = l * inF;
          const o2 = i * inF;
          for (let j = 0; j < inF; j++) dW[o2 + j] += v * x.a[ao + j]!;
        }
      return dW;
    });
    const merged = mergeTaskTensors(
      type.slice(0, -'_svd'.length) as TaskMerge,
      deltas,
      srcs.map((x) => x.w),
      { density: o.density, majoritySignMethod: o.sign, rng: o.rng },
    );
    const d = topSvd({ rows: out, cols: inF, data: merged }, rank);
    f = svdToFactors(d.u, d.s, d.vt, rank, o.clamp);
  }
  return { a: Float32Array.from(f.a.data), b: Float32Array.from(f.b.data) };
}
