// LoRA initialisations (PEFT layer.py: reset_lora_parameters, pissa_init, olora_init, orthogonal_init).
// All work on host f32/f64 arrays of one layer; PiSSA and OLoRA also return the rewritten base weight
// W - s B A (the residual), which the caller stores in the base weight's dtype.

import { ConfigError } from '../../core/errors.ts';
import type { Rng } from '../../core/rng.ts';
import { type InitLoraWeights, pissaNiter } from './config.ts';
import { colsOf, mat, matmulMat, qr, rowsOf, svd, svdLowrank, transposeMat } from './linalg.ts';

export interface LinearInit {
  /** lora_A [r, in]. */
  a: Float32Array;
  /** lora_B [out, r]. */
  b: Float32Array;
  /** The new base weight [out, in] when the init rewrites it (PiSSA, OLoRA). */
  base?: Float32Array;
}

function uniform(n: number, bound: number, rng: Rng): Float32Array {
  const v = new Float32Array(n);
  for (let i = 0; i < n; i++) v[i] = (2 * rng.uniform() - 1) * bound;
  return v;
}

function normal(n: number, std: number, rng: Rng): Float32Array {
  const v = new Float32Array(n);
  for (let i = 0; i < n; i++) v[i] = std * rng.normal();
  return v;
}

/** Whether this init reads (and rewrites) the base weight. */
export function initNeedsBase(init: InitLoraWeights): boolean {
  return init === 'pissa' || init === 'olora' || pissaNiter(init) !== null;
}

/**
 * Initial A and B of a linear adapter. `weight` (the base weight as f32 [out, in]) is only read by PiSSA and OLoRA.
 * `where` names the module in errors.
 */
export function initLinear(
  init: InitLoraWeights,
  outF: number,
  inF: number,
  r: number,
  scaling: number,
  rng: Rng,
  weight: (() => Float32Array) | null,
  where: string,
): LinearInit {
  if (init === true) {
    // kaiming_uniform_(a=sqrt(5)) on [r, in]: U(-1/sqrt(in), 1/sqrt(in)); B = 0
    return { a: uniform(r * inF, 1 / Math.sqrt(inF), rng), b: new Float32Array(outF * r) };
  }
  if (init === false) {
    // no reset: nn.Linear's own init for both (kaiming_uniform a=sqrt(5) over each one's fan-in)
    return { a: uniform(r * inF, 1 / Math.sqrt(inF), rng), b: uniform(outF * r, 1 / Math.sqrt(r), rng) };
  }
  if (init === 'gaussian') return { a: normal(r * inF, 1 / r, rng), b: new Float32Array(outF * r) };
  if (init === 'orthogonal') {
    if (r % 2 !== 0) throw new ConfigError(`${where}: init_lora_weights 'orthogonal' needs an even r, got ${r}`);
    const x = mat(r, r, normal(r * r, 1, rng));
    const q = qr(x).q;
    const half = r / 2;
    const qOdd = mat(half, r);
    const qEven = mat(half, r);
    for (let i = 0; i < half; i++)
      for (let j = 0; j < r; j++) {
        qOdd.data[i * r + j] = q.data[2 * i * r + j]!;
        qEven.data[i * r + j] = q.data[(2 * i + 1) * r + j]!;
      }
    const a = transposeMat(matmulMat(mat(inF, half, normal(inF * half, 1, rng)), qOdd));
    const b = matmulMat(transposeMat(mat(half, outF, normal(half * outF, 1, rng))), qEven);
    return { a: Float32Array.from(a.data, (v) => v / 10), b: Float32Array.from(b.data, (v) => v / 10) };
  }
  const niter = pissaNiter(init);
  if (init === 'pissa' || niter !== null || init === 'olora') {
    if (!weight) throw new ConfigError(`${where}: init_lora_weights '${init}' needs the base weight`);
    if (r > Math.min(outF, inF))
      throw new ConfigError(
        `${where}: init_lora_weights '${init}' needs r <= min(out, in) = ${Math.min(outF, inF)}, got r = ${r}`,
      );
    const w = mat(outF, inF, weight());
    let a: Float64Array;
    let b: Float64Array;
    if (init === 'olora') {
      // W = Q R; A = R[:r], B = Q[:, :r]
      const { q, r: rr } = qr(w);
      a = rowsOf(rr, 0, r).data;
      b = colsOf(q, 0, r).data;
    } else {
      // W = V S Uh; Sr = S[:r] / scaling; A = diag(sqrt Sr) Uh[:r]; B = V[:, :r] diag(sqrt Sr)
      let v: Float64Array;
      let sv: Float64Array;
      let uh: Float64Array;
      if (niter === null) {
        const d = svd(w);
        v = colsOf(d.u, 0, r).data;
        sv = d.s.slice(0, r);
        uh = rowsOf(d.vt, 0, r).data;
      } else {
        const d = svdLowrank(w, r, niter, rng);
        v = d.u.data;
        sv = d.s.slice(0, r);
        uh = transposeMat(d.v).data;
      }
      const sq = Float64Array.from(sv, (x) => Math.sqrt(x / scaling));
      a = new Float64Array(r * inF);
      b = new Float64Array(outF * r);
      for (let j = 0; j < r; j++) for (let i = 0; i < inF; i++) a[j * inF + i] = sq[j]! * uh[j * inF + i]!;
      for (let o = 0; o < outF; o++) for (let j = 0; j < r; j++) b[o * r + j] = v[o * r + j]! * sq[j]!;
    }
    const a32 = Float32Array.from(a);
    const b32 = Float32Array.from(b);
    // residual W - s B A (from the f32 factors, as PEFT computes it)
    const base = new Float32Array(outF * inF);
    for (let o = 0; o < outF; o++)
      for (let i = 0; i < inF; i++) {
        let acc = 0;
        for (let j = 0; j < r; j++) acc += b32[o * r + j]! * a32[j * inF + i]!;
        base[o * inF + i] = w.data[o * inF + i]! - scaling * acc;
      }
    return { a: a32, b: b32, base };
  }
  throw new ConfigError(`${where}: init_lora_weights ${JSON.stringify(init)} cannot create a new adapter`);
}

/**
 * Initial lora_embedding_A [r, V] and lora_embedding_B [D, r]. As PEFT's Embedding layer: every truthy init
 * (PiSSA and the others included) resets to A = 0, B ~ N(0, 1); false leaves both ~ N(0, 1).
 */
export function initEmbedding(
  init: InitLoraWeights,
  numEmbeddings: number,
  dim: number,
  r: number,
  rng: Rng,
): { a: Float32Array; b: Float32Array } {
  if (init === false) return { a: normal(r * numEmbeddings, 1, rng), b: normal(dim * r, 1, rng) };
  return { a: new Float32Array(r * numEmbeddings), b: normal(dim * r, 1, rng) };
}
