// Text generation with a KV cache: prefill the prompt, then decode one token at a time. Batched generation
// left-pads the prompts and masks the padding. A streaming async iterator yields each token with the text
// it completes (multi-byte characters and possible stop strings are held back until they are whole).

import { RequestError } from '../core/errors.ts';
import { Rng } from '../core/rng.ts';
import { tidy } from '../core/scope.ts';
import type { Tensor } from '../core/tensor.ts';
import { Module } from '../nn/module.ts';
import { intTensor } from '../ops/create.ts';
import { slice } from '../ops/shape.ts';
import { noGrad } from '../ops/tape.ts';
import { DecodePlan } from './decode-plan.ts';
import { KVCache, type KvDtypeOption, resolveKvDtype } from './kv-cache.ts';
import type { ForwardContext, LlamaForCausalLM } from './llama.ts';
import { DEFAULT_SAMPLING, type SamplingParams, sampleToken, validateSampling } from './sampling.ts';

/** What generation needs from a tokenizer. */
export interface GenTokenizer {
  decode(ids: readonly number[], opts?: { skipSpecialTokens?: boolean }): string;
  isEos(id: number): boolean;
}

export interface GenerateOptions extends Partial<SamplingParams> {
  maxTokens?: number;
  seed?: number;
  /** Generation stops before any of these strings; they are not part of the output. */
  stop?: readonly string[];
  /** Extra token ids that end generation (the tokenizer's EOS ids always do unless ignoreEos). */
  stopTokenIds?: readonly number[];
  ignoreEos?: boolean;
  /** Extra context for adapter layers (per-row adapter selection). */
  adapterRows?: unknown;
  /** What the KV cache stores (kv-cache.ts; default 'auto': bf16 for a bf16 model, else f32). */
  kvCacheDtype?: KvDtypeOption;
}

export interface GenerationStep {
  token: number;
  /** Text completed by this token (may be empty while a character or a possible stop string is pending). */
  text: string;
}

export type FinishReason = 'stop' | 'length';

export interface GenerationResult {
  tokens: number[];
  text: string;
  finishReason: FinishReason;
  promptTokens: number;
  completionTokens: number;
}

function samplingOf(o: GenerateOptions): SamplingParams {
  const p: SamplingParams = {
    temperature: o.temperature ?? DEFAULT_SAMPLING.temperature,
    topK: o.topK ?? 0,
    topP: o.topP ?? 1,
    minP: o.minP ?? 0,
    repetitionPenalty: o.repetitionPenalty ?? 1,
  };
  validateSampling(p);
  return p;
}

/** One decoding session over a batch of prompts sharing a KV cache. */
export class DecodeSession {
  readonly cache: KVCache;
  private readonly mask: number[][];
  private readonly nextPos: number[];

  constructor(
    readonly model: LlamaForCausalLM,
    readonly batch: number,
    capacity: number,
    readonly adapterRows?: unknown,
    /** Decoding steps through DecodePlan where the model allows (false: always the module forward). */
    readonly usePlan = adapterRows === undefined,
    /** What the KV cache stores (kv-cache.ts). */
    kvCacheDtype: KvDtypeOption = 'auto',
  ) {
    this.cache = new KVCache(model.config, batch, capacity, resolveKvDtype(model, kvCacheDtype));
    this.mask = Array.from({ length: batch }, () => []);
    this.nextPos = new Array(batch).fill(0);
  }

  /**
   * Feeds tokens [B][T] (equal lengths; `valid[b][t]` = 0 marks left padding) and returns the last position's
   * logits per row as host arrays.
   */
  step(tokens: number[][], valid?: number[][]): Float32Array[] {
    const B = this.batch;
    const T = tokens[0]!.length;
    const ids: number[] = [];
    const pos: number[] = [];
    for (let b = 0; b < B; b++) {
      for (let t = 0; t < T; t++) {
        const ok = valid ? valid[b]![t]! : 1;
        ids.push(tokens[b]![t]!);
        pos.push(ok ? this.nextPos[b]! : 0);
        if (ok) this.nextPos[b]!++;
        else this.paddedRows = true;
        this.mask[b]!.push(ok);
      }
    }
    const keyMask = () => (this.paddedRows ? intTensor(this.mask.flat(), [B, this.mask[0]!.length]) : null);
    // one token per row: the decoding plan (the same kernels on reused buffers), while the model is one it covers
    if (T === 1 && this.usePlan) {
      if (this.plan && !this.plan.current()) {
        this.plan.dispose();
        this.plan = null;
      }
      // a model the plan does not cover is checked again only once its modules change
      if (!this.plan && this.noPlanAt !== Module.structureVersion) {
        this.plan = DecodePlan.build(this.model, B);
        if (!this.plan) this.noPlanAt = Module.structureVersion;
      }
      if (this.plan) {
        const plan = this.plan;
        return noGrad(() => tidy(() => plan.step(this.cache, ids, pos, keyMask())));
      }
    }
    return noGrad(() =>
      tidy(() => {
        const idT = intTensor(ids, [B, T]);
        const ctx: ForwardContext = {
          positions: intTensor(pos, [B, T]),
          keyMask: keyMask(),
          cache: this.cache,
          adapterRows: this.adapterRows,
        };
        const h = this.model.hidden(idT, ctx);
        this.cache.length += T;
        const last = slice(h, 1, T - 1, T);
        const logits = this.model.head(last);
        const V = logits.shape[2]!;
        const all = logits.toF32();
        return Array.from({ length: B }, (_, b) => all.slice(b * V, (b + 1) * V));
      }),
    );
  }

  private plan: DecodePlan | null = null;
  private noPlanAt = -1;
  /** Whether any row holds padding (then every step needs the key mask). */
  private paddedRows = false;

  dispose(): void {
    this.plan?.dispose();
    this.plan = null;
    this.cache.dispose();
  }
}

/** Logits [T, V] for every position of one sequence with a plain forward (no cache): the reference. */
export function fullLogits(model: LlamaForCausalLM, ids: readonly number[]): Float32Array {
  return noGrad(() =>
    tidy(() => {
      const T = ids.length;
      const positions = intTensor(
        Array.from({ length: T }, (_, i) => i),
        [1, T],
      );
      const out: Tensor = model.forward(intTensor(ids, [1, T]), { positions });
      return out.toF32();
    }),
  );
}

/**
 * The text of `out` as it reads after the prompt: decoded together with the prompt's last few tokens and
 * that prefix's own text removed, so a SentencePiece word-initial space is kept ("Tom had" + " a ball").
 */
export function decodeAfter(tok: GenTokenizer, prompt: readonly number[], out: readonly number[]): string {
  const tail = prompt.slice(-4);
  const o = { skipSpecialTokens: true };
  const prefix = tok.decode(tail, o);
  const both = tok.decode([...tail, ...out], o);
  return both.startsWith(prefix) ? both.slice(prefix.length) : tok.decode(out, o);
}

/** Holds back text that might be the start of a stop string. */
function splitAtStop(text: string, stops: readonly string[]): { emit: number; hit: boolean } {
  let cut = -1;
  for (const s of stops) {
    if (!s) continue;
    const i = text.indexOf(s);
    if (i >= 0 && (cut < 0 || i < cut)) cut = i;
  }
  if (cut >= 0) return { emit: cut, hit: true };
  let hold = 0;
  for (const s of stops)
    for (let k = Math.min(s.length - 1, text.length); k > 0; k--)
      if (text.endsWith(s.slice(0, k))) {
        hold = Math.max(hold, k);
        break;
      }
  return { emit: text.length - hold, hit: false };
}

/**
 * Streams the generation for one prompt. The return value (when the iterator finishes) is the whole result.
 */
export async function* generateStream(
  model: LlamaForCausalLM,
  tok: GenTokenizer,
  promptIds: readonly number[],
  opts: GenerateOptions = {},
): AsyncGenerator<GenerationStep, GenerationResult> {
  const it = generateSteps(model, tok, promptIds, opts);
  while (true) {
    const r = it.next();
    if (r.done) return r.value;
    yield r.value;
    await new Promise((res) => setImmediate(res));
  }
}

/** The synchronous core of generateStream. */
export function* generateSteps(
  model: LlamaForCausalLM,
  tok: GenTokenizer,
  promptIds: readonly number[],
  opts: GenerateOptions = {},
): Generator<GenerationStep, GenerationResult> {
  if (promptIds.length === 0) throw new RequestError('generate: the prompt is empty (no tokens)');
  const params = samplingOf(opts);
  const maxTokens = opts.maxTokens ?? 128;
  if (!Number.isInteger(maxTokens) || maxTokens < 0)
    throw new RequestError(`max_tokens must be an integer >= 0, got ${maxTokens}`);
  const rng = new Rng(opts.seed ?? 0);
  const stops = opts.stop ?? [];
  const stopIds = new Set(opts.stopTokenIds ?? []);
  const capacity = promptIds.length + maxTokens;
  const session = new DecodeSession(model, 1, capacity, opts.adapterRows, undefined, opts.kvCacheDtype);
  const context = [...promptIds];
  const out: number[] = [];
  let emitted = 0; // characters of the (stop-truncated) text already yielded
  let finish: FinishReason = 'length';
  let text = '';
  try {
    let logits = maxTokens > 0 ? session.step([[...promptIds]])[0]! : null;
    while (logits) {
      const t = sampleToken(logits, params, rng, context);
      if ((!opts.ignoreEos && tok.isEos(t)) || stopIds.has(t)) {
        finish = 'stop';
        // release text that was held back as a possible stop-string prefix
        if (text.length > emitted) yield { token: t, text: text.slice(emitted) };
        emitted = text.length;
        break;
      }
      out.push(t);
      context.push(t);
      const last = out.length >= maxTokens;
      const decoded = decodeAfter(tok, promptIds, out);
      // a trailing U+FFFD is an incomplete UTF-8 sequence: wait for the next token unless this is the last
      const stable = !last && decoded.endsWith('\uFFFD') ? decoded.slice(0, decoded.lastIndexOf('\uFFFD')) : decoded;
      const { emit, hit } = splitAtStop(stable, stops);
      text = hit ? stable.slice(0, emit) : stable;
      const upTo = hit || last ? text.length : emit;
      const delta = upTo > emitted ? text.slice(emitted, upTo) : '';
      emitted = Math.max(emitted, upTo);
      yield { token: t, text: delta };
      if (hit) {
        finish = 'stop';
        break;
      }
      if (last) break;
      logits = session.step([[t]])[0]!;
    }
  } finally {
    session.dispose();
  }
  return { tokens: out, text, finishReason: finish, promptTokens: promptIds.length, completionTokens: out.length };
}

/** Runs generation to the end. */
export function generate(
  model: LlamaForCausalLM,
  tok: GenTokenizer,
  promptIds: readonly number[],
  opts: GenerateOptions = {},
): GenerationResult {
  const it = generateSteps(model, tok, promptIds, opts);
  while (true) {
    const r = it.next();
    if (r.done) return r.value;
  }
}

/** Greedy/sampled generation for several prompts at once (left-padded batch); returns the tokens per row. */
export function generateBatch(
  model: LlamaForCausalLM,
  prompts: number[][],
  opts: GenerateOptions & { eosIds?: number[] } = {},
): number[][] {
  const params = samplingOf(opts);
  const maxTokens = opts.maxTokens ?? 32;
  const B = prompts.length;
  const L = Math.max(...prompts.map((p) => p.length));
  const session = new DecodeSession(model, B, L + maxTokens, opts.adapterRows, undefined, opts.kvCacheDtype);
  const rngs = prompts.map((_, b) => new Rng((opts.seed ?? 0) + b));
  const outs: number[][] = prompts.map(() => []);
  const done = new Array(B).fill(false);
  try {
    const tokens = prompts.map((p) => [...new Array(L - p.length).fill(0), ...p]);
    const valid = prompts.map((p) => [...new Array(L - p.length).fill(0), ...new Array(p.length).fill(1)]);
    let logits = session.step(tokens, valid);
    for (let s = 0; s < maxTokens; s++) {
      const next = logits.map((lg, b) => sampleToken(lg, params, rngs[b]!, [...prompts[b]!, ...outs[b]!]));
      next.forEach((t, b) => {
        if (done[b]) return;
        if (opts.eosIds?.includes(t)) done[b] = true;
        else outs[b]!.push(t);
      });
      if (done.every(Boolean) || s === maxTokens - 1) break;
      logits = session.step(next.map((t) => [t]));
    }
  } finally {
    session.dispose();
  }
  return outs;
}
