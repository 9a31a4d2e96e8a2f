// The serving engine: continuous batching of many requests over one base model and many LoRA adapters.
// Synchronous and single-threaded by design: the worker thread (worker.ts) owns one Engine and calls
// step() in a loop, taking in new requests and cancellations between steps. Each step admits waiting
// requests (scheduler.ts), runs one decode forward over every sequence with a token to feed and the prompt
// chunks that fit the prefill budget, samples one token per sequence that produced logits, and returns the
// events (started, text deltas, done, errors) for the HTTP side.
//
// Batches mix adapters: rows are ordered by adapter so each adapter's rows are contiguous, and the adapter
// pool turns the per-row choice into the model's ForwardContext.adapterRows (every adapter layer then runs all
// of a batch's adapter groups in one loraRows kernel call; base weights are never modified).

import { randomBytes } from 'node:crypto';
import { LowrankError, RequestError } from '../core/errors.ts';
import { Rng } from '../core/rng.ts';
import { tidy } from '../core/scope.ts';
import { type KvDtype, type KvDtypeOption, kvBytesPerToken, resolveKvDtype } from '../models/kv-cache.ts';
import type { LlamaForCausalLM } from '../models/llama.ts';
import { type SamplingParams, sampleToken, validateSampling } from '../models/sampling.ts';
import { intTensor } from '../ops/create.ts';
import { slice } from '../ops/shape.ts';
import { noGrad } from '../ops/tape.ts';
import type { Tokenizer } from '../tokenize/tokenizer.ts';
import { BatchKV, type BatchRow, KvScratch, SeqKV } from './kv.ts';
import { type AdmitResult, Scheduler, type SchedulerLimits } from './scheduler.ts';
import { TextStream } from './text.ts';

/** One adapter of a request, as resolved by the registry: its name, file version and weight. */
export interface AdapterRef {
  name: string;
  /** Bumped when the adapter's files are replaced (load_inplace, a changed dir): a new cache entry. */
  version: number;
  /** The adapter dir (already checked against the configured roots). */
  path: string;
  /** The factor on this adapter's delta (the per-request scale, or the mixture weight). */
  weight: number;
}

/** The adapters a request runs with: one, or a weighted mixture; none means the base model. */
export type AdapterSpec = readonly AdapterRef[];

/** The cache key of an adapter set: equal keys compute the same function. */
export function adapterKey(spec: AdapterSpec): string {
  return spec.map((a) => `${a.name}@${a.version}*${a.weight}`).join('+');
}

/** An adapter set made usable for forwards; held by a running sequence until it finishes. */
export interface AdapterLease {
  readonly key: string;
}

/** The worker-side adapter cache the engine draws on (adapter-cache.ts). */
export interface AdapterPool {
  /** Makes the set usable in the next forward, or null when no resident slot can be freed now. Throws on a bad adapter. */
  acquire(spec: AdapterSpec): AdapterLease | null;
  release(lease: AdapterLease): void;
  /** ForwardContext.adapterRows for a forward whose rows use these leases (null = base model rows). */
  rows(leases: readonly (AdapterLease | null)[]): unknown;
}

export interface EngineOptions extends SchedulerLimits {
  /** Longest sequence (prompt + max_tokens) accepted. */
  maxModelLen: number;
  /** What the sequences' KV caches store (models/kv-cache.ts; default 'auto': bf16 for a bf16 model). */
  kvCacheDtype?: KvDtypeOption;
}

/** A generation request as the engine takes it (already tokenized and validated by the HTTP side). */
export interface EngineRequest {
  id: string;
  prompt: number[];
  maxTokens: number;
  sampling: SamplingParams;
  /** Unset: a random seed (sampled requests differ); set: the same tokens every time. */
  seed?: number;
  stop?: string[];
  stopTokenIds?: number[];
  ignoreEos?: boolean;
  /** token id -> added to its logit (OpenAI logit_bias). */
  logitBias?: Record<number, number>;
  presencePenalty?: number;
  frequencyPenalty?: number;
  adapters?: AdapterSpec;
}

export type FinishReason = 'stop' | 'length';

export type EngineEvent =
  | { type: 'started'; id: string; queueMs: number }
  | { type: 'delta'; id: string; text: string; tokens: number }
  | {
      type: 'done';
      id: string;
      finishReason: FinishReason;
      promptTokens: number;
      completionTokens: number;
      queueMs: number;
      ttftMs: number;
      totalMs: number;
    }
  | { type: 'error'; id: string; status: number; code: string; message: string };

export interface EngineStats {
  waiting: number;
  running: number;
  kvUsedTokens: number;
  kvBudgetTokens: number;
  kvBytesPerToken: number;
  steps: number;
  promptTokens: number;
  generatedTokens: number;
}

interface Seq {
  req: EngineRequest;
  reserve: number;
  promptLength: number;
  prefilled: number;
  arrival: number;
  admittedAt: number;
  firstTokenAt: number;
  state: 'waiting' | 'prefill' | 'decode' | 'done';
  kv: SeqKV | null;
  lease: AdapterLease | null;
  /** Prompt and generated ids: the context of the repetition penalty. */
  context: number[];
  generated: number;
  /** OpenAI presence/frequency penalties need counts of generated ids. */
  counts: Map<number, number> | null;
  /** The last sampled token, fed by the next decode forward. */
  pending: number;
  rng: Rng;
  text: TextStream;
  stopIds: Set<number>;
}

export class Engine {
  private readonly sched: Scheduler<Seq>;
  private readonly byId = new Map<string, Seq>();
  private readonly scratch: KvScratch;
  readonly kvDtype: KvDtype;
  private events: EngineEvent[] = [];
  private readonly counters = { steps: 0, promptTokens: 0, generatedTokens: 0 };

  constructor(
    readonly model: LlamaForCausalLM,
    readonly tokenizer: Tokenizer,
    readonly adapters: AdapterPool | null,
    readonly opts: EngineOptions,
  ) {
    this.sched = new Scheduler<Seq>(opts);
    this.kvDtype = resolveKvDtype(model, opts.kvCacheDtype);
    this.scratch = new KvScratch(model.config, this.kvDtype);
  }

  /** Queues a request. Problems that make it unservable come back as an error event from the next step. */
  submit(req: EngineRequest): void {
    try {
      if (this.byId.has(req.id)) throw new RequestError(`duplicate request id ${req.id}`, 500, 'internal_error');
      const seq = this.makeSeq(req);
      this.byId.set(req.id, seq);
      this.sched.enqueue(seq);
    } catch (e) {
      this.fail(req.id, e);
    }
  }

  /** Drops a request (the client went away, or it timed out); no further events for it. */
  cancel(id: string): void {
    const seq = this.byId.get(id);
    if (seq) this.finishSeq(seq);
  }

  hasWork(): boolean {
    return this.sched.waiting.length > 0 || this.sched.running.length > 0 || this.events.length > 0;
  }

  stats(): EngineStats {
    return {
      waiting: this.sched.waiting.length,
      running: this.sched.running.length,
      kvUsedTokens: this.sched.usedTokens,
      kvBudgetTokens: this.opts.kvBudgetTokens,
      kvBytesPerToken: kvBytesPerToken(this.model.config, this.kvDtype),
      ...this.counters,
    };
  }

  /** One iteration; returns the events it produced. */
  step(): EngineEvent[] {
    const now = performance.now();
    for (const seq of this.sched.admit(now, (s) => this.acquire(s))) {
      seq.admittedAt = now;
      seq.kv = new SeqKV(this.model.config, seq.reserve, this.kvDtype);
      this.emit({ type: 'started', id: seq.req.id, queueMs: now - seq.arrival });
    }
    const decode = this.sched.decodeRows();
    const groups = this.sched.prefillGroups();
    if (decode.length > 0 || groups.length > 0) this.counters.steps++;
    if (decode.length > 0)
      this.forward(
        decode.map((seq) => ({ seq, tokens: [seq.pending], done: true })),
        () => {},
      );
    for (const g of groups) {
      this.forward(
        g.map(({ seq, n }) => ({
          seq,
          tokens: seq.req.prompt.slice(seq.prefilled, seq.prefilled + n),
          done: seq.prefilled + n === seq.promptLength,
        })),
        (seq, n) => {
          seq.prefilled += n;
          this.counters.promptTokens += n;
        },
      );
    }
    // an idle engine gives the gather buffers back (they grow with the batch and the longest sequence)
    if (this.sched.running.length === 0) this.scratch.dispose();
    const out = this.events;
    this.events = [];
    return out;
  }

  /** Frees every sequence and the scratch buffers. */
  dispose(): void {
    for (const seq of [...this.byId.values()]) this.finishSeq(seq);
    this.scratch.dispose();
  }

  private makeSeq(req: EngineRequest): Seq {
    if (!Array.isArray(req.prompt) || req.prompt.length === 0)
      throw new RequestError('the prompt is empty (no tokens)', 400, 'invalid_prompt');
    const V = this.model.config.vocab_size;
    for (const t of req.prompt)
      if (!Number.isInteger(t) || t < 0 || t >= V)
        throw new RequestError(`prompt token id ${t} is out of range [0, ${V})`, 400, 'invalid_prompt');
    if (!Number.isInteger(req.maxTokens) || req.maxTokens < 1)
      throw new RequestError(`max_tokens must be an integer >= 1, got ${req.maxTokens}`);
    validateSampling(req.sampling, 'request');
    const reserve = req.prompt.length + req.maxTokens;
    if (reserve > this.opts.maxModelLen)
      throw new RequestError(
        `this model's maximum context length is ${this.opts.maxModelLen} tokens; the request needs ${reserve} ` +
          `(${req.prompt.length} in the prompt + ${req.maxTokens} max_tokens). Shorten the prompt or lower max_tokens.`,
      );
    if (reserve > this.opts.kvBudgetTokens)
      throw new RequestError(
        `the request needs ${reserve} KV cache positions (prompt + max_tokens) but the server's KV cache holds ` +
          `${this.opts.kvBudgetTokens}; lower max_tokens`,
      );
    const seed = req.seed ?? randomBytes(4).readUInt32LE(0);
    return {
      req,
      reserve,
      promptLength: req.prompt.length,
      prefilled: 0,
      arrival: performance.now(),
      admittedAt: 0,
      firstTokenAt: 0,
      state: 'waiting',
      kv: null,
      lease: null,
      context: [...req.prompt],
      generated: 0,
      counts: req.presencePenalty || req.frequencyPenalty ? new Map() : null,
      pending: -1,
      rng: new Rng(seed),
      text: new TextStream(this.tokenizer, req.stop ?? [], req.prompt),
      stopIds: new Set(req.stopTokenIds ?? []),
    };
  }

  private acquire(seq: Seq): AdmitResult {
    const spec = seq.req.adapters;
    if (!spec || spec.length === 0) return 'ok';
    if (!this.adapters) {
      this.fail(seq.req.id, new RequestError('this server has no adapter support', 400));
      this.byId.delete(seq.req.id);
      return 'failed';
    }
    try {
      const lease = this.adapters.acquire(spec);
      if (!lease) return 'blocked';
      seq.lease = lease;
      return 'ok';
    } catch (e) {
      this.fail(seq.req.id, e);
      this.byId.delete(seq.req.id);
      return 'failed';
    }
  }

  /**
   * Runs one forward over rows (each feeding its tokens), then, for rows whose `done` is set (a decode
   * token or the last prompt chunk), samples the next token. On an internal error every row's request fails.
   */
  private forward(rows: { seq: Seq; tokens: number[]; done: boolean }[], fed: (seq: Seq, n: number) => void): void {
    // rows of one adapter next to each other (each adapter group's rows contiguous)
    rows.sort((a, b) => (a.seq.lease?.key ?? '').localeCompare(b.seq.lease?.key ?? ''));
    let logits: Float32Array[];
    try {
      logits = this.run(rows.map((r) => ({ kv: r.seq.kv!, tokens: r.tokens, lease: r.seq.lease })));
    } catch (e) {
      for (const r of rows) {
        this.fail(r.seq.req.id, e);
        this.finishSeq(r.seq);
      }
      return;
    }
    const now = performance.now();
    rows.forEach((r, b) => {
      fed(r.seq, r.tokens.length);
      if (r.done) this.advance(r.seq, logits[b]!, now);
    });
  }

  /** The batched model call: returns the last position's logits per row. */
  private run(rows: { kv: SeqKV; tokens: number[]; lease: AdapterLease | null }[]): Float32Array[] {
    const B = rows.length;
    const T = Math.max(...rows.map((r) => r.tokens.length));
    const ids = new Int32Array(B * T);
    rows.forEach((r, b) => {
      ids.set(r.tokens, b * T + T - r.tokens.length);
    });
    const batchRows: BatchRow[] = rows.map((r) => ({ kv: r.kv, add: r.tokens.length }));
    const leases = rows.map((r) => r.lease);
    return noGrad(() =>
      tidy(() => {
        const cache = new BatchKV(batchRows, T, this.scratch);
        const h = this.model.hidden(intTensor(ids, [B, T]), {
          positions: cache.positions(),
          keyMask: cache.keyMask(),
          cache,
          adapterRows: this.adapters ? this.adapters.rows(leases) : undefined,
        });
        cache.commit();
        const last = T === 1 ? h : slice(h, 1, T - 1, T);
        const all = this.model.head(last).toF32();
        const V = all.length / B;
        return Array.from({ length: B }, (_, b) => all.subarray(b * V, (b + 1) * V));
      }),
    );
  }

  /** Samples a sequence's next token and moves it on: a text delta, and done when it ends. */
  private advance(seq: Seq, logits: Float32Array, now: number): void {
    const { req } = seq;
    if (req.logitBias)
      for (const [id, bias] of Object.entries(req.logitBias)) {
        const i = Number(id);
        if (i >= 0 && i < logits.length) logits[i]! += bias;
      }
    if (seq.counts)
      for (const [id, c] of seq.counts) logits[id]! -= (req.presencePenalty ?? 0) + (req.frequencyPenalty ?? 0) * c;
    const t = sampleToken(logits, req.sampling, seq.rng, seq.context);
    if (seq.generated === 0) seq.firstTokenAt = now;
    if ((!req.ignoreEos && this.tokenizer.isEos(t)) || seq.stopIds.has(t)) {
      this.delta(seq, seq.text.finish(), 0);
      this.done(seq, 'stop', now);
      return;
    }
    seq.generated++;
    this.counters.generatedTokens++;
    seq.context.push(t);
    seq.counts?.set(t, (seq.counts.get(t) ?? 0) + 1);
    const last = seq.generated >= req.maxTokens;
    this.delta(seq, seq.text.push(t, last), 1);
    if (seq.text.stopped) this.done(seq, 'stop', now);
    else if (last) this.done(seq, 'length', now);
    else {
      seq.pending = t;
      seq.state = 'decode';
    }
  }

  private delta(seq: Seq, text: string, tokens: number): void {
    if (text || tokens) this.emit({ type: 'delta', id: seq.req.id, text, tokens });
  }

  private done(seq: Seq, finishReason: FinishReason, now: number): void {
    this.emit({
      type: 'done',
      id: seq.req.id,
      finishReason,
      promptTokens: seq.promptLength,
      completionTokens: seq.generated,
      queueMs: seq.admittedAt - seq.arrival,
      ttftMs: (seq.firstTokenAt || now) - seq.arrival,
      totalMs: now - seq.arrival,
    });
    this.finishSeq(seq);
  }

  private finishSeq(seq: Seq): void {
    this.sched.remove(seq);
    seq.kv?.dispose();
    seq.kv = null;
    if (seq.lease) this.adapters?.release(seq.lease);
    seq.lease = null;
    this.byId.delete(seq.req.id);
  }

  private fail(id: string, e: unknown): void {
    if (e instanceof RequestError) {
      this.emit({ type: 'error', id, status: e.status, code: e.code, message: e.message });
    } else if (e instanceof LowrankError) {
      // a user error from below (a bad adapter file, a shape the model cannot take)
      this.emit({ type: 'error', id, status: 400, code: 'invalid_request_error', message: `${e.name}: ${e.message}` });
    } else {
      console.error(`engine: request ${id} failed:`, e);
      this.emit({ type: 'error', id, status: 500, code: 'internal_error', message: 'internal error in the engine' });
    }
  }

  private emit(ev: EngineEvent): void {
    this.events.push(ev);
  }
}
