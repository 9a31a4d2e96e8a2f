// Continuous batching: which waiting requests join the running batch, and what each engine iteration
// computes. Requests join and leave between iterations; an iteration is one decode forward over every
// running sequence that has a token to feed, plus prompt chunks (chunked prefill) within a token budget, so
// a long prompt never stalls the sequences already decoding for more than one chunk.
//
// Admission control:
// - memory: a sequence reserves its whole KV cache (prompt + max_tokens positions) when admitted; a
//   request waits while that would exceed the budget. The queue is first come, first served for memory, so
//   a large request is not starved by smaller ones behind it.
// - adapter slots: at most `maxLoras` distinct adapters are resident (usable in a batch). A request whose
//   adapter cannot be made resident now is skipped and later requests for resident adapters go ahead,
//   until the skipped one has waited `starvationMs`; then admission stops until slots free up.
// - rows: at most `maxNumSeqs` sequences run at once.

export interface SchedulerLimits {
  /** Sequences in the running batch at most. */
  maxNumSeqs: number;
  /** KV cache budget in token positions (all running sequences together). */
  kvBudgetTokens: number;
  /** Prompt tokens computed per iteration at most (the chunk budget of chunked prefill). */
  prefillChunk: number;
  /** How long a request blocked on adapter slots may be overtaken by later requests (ms). */
  starvationMs: number;
}

/** What the scheduler needs to know about a sequence. */
export interface Schedulable {
  /** KV positions to reserve (prompt + max_tokens). */
  readonly reserve: number;
  readonly promptLength: number;
  /** Prompt positions already in the cache. */
  prefilled: number;
  /** performance.now() when it was queued. */
  readonly arrival: number;
  state: 'waiting' | 'prefill' | 'decode' | 'done';
}

export type AdmitResult = 'ok' | 'blocked' | 'failed';

/** One prefill forward: rows and the number of prompt tokens each feeds. */
export type PrefillGroup<S> = { seq: S; n: number }[];

export class Scheduler<S extends Schedulable> {
  readonly waiting: S[] = [];
  readonly running: S[] = [];
  usedTokens = 0;

  constructor(readonly limits: SchedulerLimits) {}

  enqueue(seq: S): void {
    seq.state = 'waiting';
    this.waiting.push(seq);
  }

  /** Removes a sequence wherever it is; returns whether it held a reservation. */
  remove(seq: S): boolean {
    const w = this.waiting.indexOf(seq);
    if (w >= 0) this.waiting.splice(w, 1);
    const r = this.running.indexOf(seq);
    if (r >= 0) {
      this.running.splice(r, 1);
      this.usedTokens -= seq.reserve;
    }
    seq.state = 'done';
    return r >= 0;
  }

  /**
   * Moves waiting sequences into the running batch while limits allow. `acquire` readies a sequence's
   * adapter: 'blocked' (no free slot now) or 'failed' (the caller reports the error; the sequence is
   * dropped). Returns the admitted sequences in order.
   */
  admit(now: number, acquire: (seq: S) => AdmitResult): S[] {
    const admitted: S[] = [];
    let i = 0;
    while (i < this.waiting.length && this.running.length < this.limits.maxNumSeqs) {
      const seq = this.waiting[i]!;
      if (this.usedTokens + seq.reserve > this.limits.kvBudgetTokens) break;
      const r = acquire(seq);
      if (r === 'failed') {
        this.waiting.splice(i, 1);
        seq.state = 'done';
        continue;
      }
      if (r === 'blocked') {
        if (now - seq.arrival >= this.limits.starvationMs) break;
        i++;
        continue;
      }
      this.waiting.splice(i, 1);
      this.running.push(seq);
      this.usedTokens += seq.reserve;
      seq.state = seq.prefilled < seq.promptLength ? 'prefill' : 'decode';
      admitted.push(seq);
    }
    return admitted;
  }

  /** Running sequences with a token to feed. */
  decodeRows(): S[] {
    return this.running.filter((s) => s.state === 'decode');
  }

  /**
   * Prompt chunks for this iteration, oldest first, within the chunk budget; grouped into forwards so that
   * padding (rows shorter than the longest in their group) stays under half of the group's work.
   */
  prefillGroups(): PrefillGroup<S>[] {
    let budget = this.limits.prefillChunk;
    const chunks: { seq: S; n: number }[] = [];
    for (const seq of this.running) {
      if (budget <= 0) break;
      if (seq.state !== 'prefill') continue;
      const n = Math.min(seq.promptLength - seq.prefilled, budget);
      chunks.push({ seq, n });
      budget -= n;
    }
    chunks.sort((a, b) => b.n - a.n);
    const groups: PrefillGroup<S>[] = [];
    let cur: PrefillGroup<S> = [];
    let real = 0;
    for (const c of chunks) {
      const T = cur[0]?.n ?? c.n;
      const rows = cur.length + 1;
      if (cur.length > 0 && rows * T - (real + c.n) > (real + c.n) / 2) {
        groups.push(cur);
        cur = [];
        real = 0;
      }
      cur.push(c);
      real += c.n;
    }
    if (cur.length > 0) groups.push(cur);
    return groups;
  }
}
