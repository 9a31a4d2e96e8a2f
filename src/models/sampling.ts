// Sampling from logits: greedy, temperature, top-k, top-p, min-p, repetition penalty, with a seeded RNG.
// The order follows transformers' logits processors: repetition penalty, temperature, top-k, top-p, min-p.

import { getBackend } from '../backend/index.ts';
import { RequestError } from '../core/errors.ts';
import type { Rng } from '../core/rng.ts';

export interface SamplingParams {
  /** 0 (or less) means greedy. */
  temperature: number;
  /** 0 = off. */
  topK: number;
  /** 1 = off. */
  topP: number;
  /** 0 = off. */
  minP: number;
  /** 1 = off; >1 discourages tokens already in the context (HF semantics). */
  repetitionPenalty: number;
}

export const DEFAULT_SAMPLING: SamplingParams = { temperature: 1, topK: 0, topP: 1, minP: 0, repetitionPenalty: 1 };

export function validateSampling(p: SamplingParams, where = 'sampling'): void {
  if (!(p.temperature >= 0) || !Number.isFinite(p.temperature))
    throw new RequestError(`${where}: temperature must be >= 0, got ${p.temperature}`);
  if (!(p.topP > 0 && p.topP <= 1)) throw new RequestError(`${where}: top_p must be in (0, 1], got ${p.topP}`);
  if (!(p.minP >= 0 && p.minP <= 1)) throw new RequestError(`${where}: min_p must be in [0, 1], got ${p.minP}`);
  if (!Number.isInteger(p.topK) || p.topK < 0)
    throw new RequestError(`${where}: top_k must be an integer >= 0, got ${p.topK}`);
  if (!(p.repetitionPenalty > 0))
    throw new RequestError(`${where}: repetition_penalty must be > 0, got ${p.repetitionPenalty}`);
}

/**
 * The first index of the largest element (NaN is never largest); 0 when none exceeds -inf. A vocabulary of f32
 * logits goes to the backend's kernel where it has one (49152 logits: ~0.1 ms a token here in JavaScript).
 */
export function argmax(x: ArrayLike<number>): number {
  if (x instanceof Float32Array && x.length >= 1024) {
    const be = getBackend();
    if (be.argmax) return be.argmax(x);
  }
  return argmaxLoop(x);
}

/** argmax in JavaScript (what a backend's kernel must answer). */
export function argmaxLoop(x: ArrayLike<number>): number {
  let best = 0;
  let bv = Number.NEGATIVE_INFINITY;
  for (let i = 0; i < x.length; i++)
    if (x[i]! > bv) {
      bv = x[i]!;
      best = i;
    }
  return best;
}

/** Picks the next token from one row of logits (the array is modified). */
export function sampleToken(logits: Float32Array, p: SamplingParams, rng: Rng, context: readonly number[]): number {
  if (p.repetitionPenalty !== 1) {
    const seen = new Set(context);
    for (const t of seen) {
      if (t < 0 || t >= logits.length) continue;
      const v = logits[t]!;
      logits[t] = v > 0 ? v / p.repetitionPenalty : v * p.repetitionPenalty;
    }
  }
  if (p.temperature <= 0) return argmax(logits);
  const V = logits.length;
  // candidate set, sorted by logit descending when a truncation needs it
  let idx: number[];
  if (p.topK > 0 && p.topK < V) {
    idx = topKIndices(logits, p.topK);
  } else idx = Array.from({ length: V }, (_, i) => i);
  const needSort = p.topP < 1 || p.topK > 0;
  if (needSort) idx.sort((a, b) => logits[b]! - logits[a]!);
  const maxLogit = logits[argmaxOf(idx, logits)]!;
  const probs = new Float64Array(idx.length);
  let z = 0;
  for (let i = 0; i < idx.length; i++) {
    const e = Math.exp((logits[idx[i]!]! - maxLogit) / p.temperature);
    probs[i] = e;
    z += e;
  }
  for (let i = 0; i < probs.length; i++) probs[i]! /= z;
  let n = idx.length;
  if (p.topP < 1) {
    let cum = 0;
    for (let i = 0; i < n; i++) {
      cum += probs[i]!;
      if (cum >= p.topP) {
        n = i + 1;
        break;
      }
    }
  }
  if (p.minP > 0) {
    let pmax = 0;
    for (let i = 0; i < n; i++) pmax = Math.max(pmax, probs[i]!);
    const thr = p.minP * pmax;
    let m = 0;
    for (let i = 0; i < n; i++)
      if (probs[i]! >= thr) {
        probs[m] = probs[i]!;
        idx[m] = idx[i]!;
        m++;
      }
    n = m;
  }
  let total = 0;
  for (let i = 0; i < n; i++) total += probs[i]!;
  let r = rng.uniform() * total;
  for (let i = 0; i < n; i++) {
    r -= probs[i]!;
    if (r < 0) return idx[i]!;
  }
  return idx[n - 1]!;
}

function argmaxOf(idx: number[], logits: Float32Array): number {
  let best = idx[0]!;
  for (const i of idx) if (logits[i]! > logits[best]!) best = i;
  return best;
}

function topKIndices(x: Float32Array, k: number): number[] {
  // partial selection: keep a sorted buffer of the k largest
  const buf: number[] = [];
  for (let i = 0; i < x.length; i++) {
    const v = x[i]!;
    if (buf.length < k) {
      buf.push(i);
      if (buf.length === k) buf.sort((a, b) => x[b]! - x[a]!);
    } else if (v > x[buf[k - 1]!]!) {
      let j = k - 1;
      while (j > 0 && x[buf[j - 1]!]! < v) {
        buf[j] = buf[j - 1]!;
        j--;
      }
      buf[j] = i;
    }
  }
  return buf;
}
