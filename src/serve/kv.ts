// The serving engine's KV cache. Each running sequence owns its own cache (per layer K and V of
// [1, capacity, Hkv, D], capacity = prompt + max_tokens, reserved when the sequence is admitted), so
// sequences join and leave a batch at any step and memory is accounted in exact tokens.
//
// A batched forward sees the sequences through a BatchKV: the model's attention calls append(layer, k, v)
// once per layer. append writes each row's new keys and values into that row's own cache and returns K/V
// for the attention op. One row gets a zero-copy view of its cache. Several rows are gathered into a
// scratch buffer, right-aligned (row r's keys occupy the last past_r + new_r of Tk positions, the rest is
// masked): queries are the last T positions of every row, so the attention op's causal offset (query i sits
// at Tk - T + i) holds for every row, prefill chunks included. The scratch is reused by every layer (layer l's
// attention is done before layer l + 1 appends) and across steps, so a step allocates no cache memory.

import { getBackend } from '../backend/index.ts';
import { itemSize } from '../core/dtype.ts';
import { ShapeError } from '../core/errors.ts';
import { keep } from '../core/scope.ts';
import type { Tensor } from '../core/tensor.ts';
import type { ModelConfig } from '../models/config.ts';
import { type KVCache, type KvDtype, kvBytesPerToken, positionsView } from '../models/kv-cache.ts';
import { empty, intTensor } from '../ops/create.ts';

/** One sequence's cache. */
export class SeqKV {
  readonly k: Tensor[] = [];
  readonly v: Tensor[] = [];
  /** Positions filled. */
  length = 0;

  constructor(
    private readonly cfg: ModelConfig,
    readonly capacity: number,
    readonly dtype: KvDtype = 'f32',
  ) {
    const shape = [1, cfg.num_key_value_heads, capacity, cfg.head_dim]; // head-major (positionsView)
    for (let l = 0; l < cfg.num_hidden_layers; l++) {
      this.k.push(keep(empty(shape, dtype)));
      this.v.push(keep(empty(shape, dtype)));
    }
  }

  get bytes(): number {
    return this.capacity * kvBytesPerToken(this.cfg, this.dtype);
  }

  dispose(): void {
    for (const t of [...this.k, ...this.v]) t.dispose();
    this.k.length = 0;
    this.v.length = 0;
  }
}

/** A row of a batched forward: its cache, and how many new positions this forward adds. */
export interface BatchRow {
  kv: SeqKV;
  add: number;
}

/** Reusable gather buffers (grown on demand), shared by every forward of an engine. */
export class KvScratch {
  private k: Tensor | null = null;
  private v: Tensor | null = null;

  constructor(
    private readonly cfg: ModelConfig,
    readonly dtype: KvDtype = 'f32',
  ) {}

  /** K and V stored [b >= B, Hkv, t >= Tk, D] (head-major, as the sequences' caches, in their dtype). */
  stores(B: number, Tk: number): { k: Tensor; v: Tensor } {
    const cur = this.k;
    if (!cur || cur.shape[0]! < B || cur.shape[2]! < Tk) {
      const b = Math.max(B, cur?.shape[0] ?? 0);
      // grow the time axis geometrically: decoding adds one position per step
      const t = Math.max(Tk, Math.ceil((cur?.shape[2] ?? 0) * 1.5), 64);
      this.dispose();
      const shape = [b, this.cfg.num_key_value_heads, t, this.cfg.head_dim];
      this.k = keep(empty(shape, this.dtype));
      this.v = keep(empty(shape, this.dtype));
    }
    return { k: this.k!, v: this.v! };
  }

  get bytes(): number {
    return this.k ? this.k.size * 2 * itemSize(this.dtype) : 0;
  }

  dispose(): void {
    this.k?.dispose();
    this.v?.dispose();
    this.k = null;
    this.v = null;
  }
}

/**
 * The cache seen by one batched forward of rows [B] with T query positions each (row r's add_r new tokens
 * are its last add_r positions; the first T - add_r are padding). Implements the KVCache surface the model
 * uses (append); lengths advance when the forward is done (commit).
 */
export class BatchKV implements KVCache {
  readonly k: Tensor[] = [];
  readonly v: Tensor[] = [];
  readonly dtype: KvDtype;
  readonly batch: number;
  readonly capacity: number;
  length = 0;
  /** Keys per row after this forward, and the attended length Tk = max over rows. */
  readonly totals: number[];
  readonly Tk: number;

  constructor(
    readonly rows: readonly BatchRow[],
    readonly T: number,
    private readonly scratch: KvScratch,
  ) {
    this.batch = rows.length;
    this.dtype = scratch.dtype;
    this.totals = rows.map((r) => {
      if (r.add < 1 || r.add > T) throw new ShapeError(`BatchKV: a row adds ${r.add} positions, T is ${T}`);
      const total = r.kv.length + r.add;
      if (total > r.kv.capacity)
        throw new ShapeError(`BatchKV: ${total} positions exceed the sequence's reserved ${r.kv.capacity}`);
      return total;
    });
    this.Tk = Math.max(...this.totals);
    this.capacity = this.Tk;
  }

  /** The key padding mask [B, Tk] (1 = attend), or null when every row fills Tk. */
  keyMask(): Tensor | null {
    if (this.totals.every((t) => t === this.Tk)) return null;
    const m = new Int32Array(this.batch * this.Tk);
    this.totals.forEach((t, r) => {
      m.fill(1, r * this.Tk + this.Tk - t, (r + 1) * this.Tk);
    });
    return intTensor(m, [this.batch, this.Tk]);
  }

  /** Absolute positions [B, T] of the queries (0 for padding). */
  positions(): Tensor {
    const p = new Int32Array(this.batch * this.T);
    this.rows.forEach((r, b) => {
      for (let j = 0; j < r.add; j++) p[b * this.T + this.T - r.add + j] = r.kv.length + j;
    });
    return intTensor(p, [this.batch, this.T]);
  }

  append(l: number, k: Tensor, v: Tensor): { k: Tensor; v: Tensor } {
    const be = getBackend();
    const [B, T, H, D] = k.shape as [number, number, number, number];
    if (B !== this.batch || T !== this.T)
      throw new ShapeError(`BatchKV: got k [${B}, ${T}], expected [${this.batch}, ${this.T}]`);
    this.rows.forEach((r, b) => {
      const past = r.kv.length;
      for (const [src, cache] of [
        [k, r.kv.k[l]!],
        [v, r.kv.v[l]!],
      ] as const) {
        const from = src.view(
          [1, r.add, H, D],
          src.strides,
          src.offset + b * src.strides[0]! + (T - r.add) * src.strides[1]!,
        );
        const to = positionsView(cache, past, r.add);
        be.copy(from, to);
        from.dispose();
        to.dispose();
      }
    });
    if (this.batch === 1) {
      const r = this.rows[0]!;
      const n = this.totals[0]!;
      return { k: positionsView(r.kv.k[l]!, 0, n), v: positionsView(r.kv.v[l]!, 0, n) };
    }
    // every row's keys right-aligned in the batch's buffers, a run of n * D values per head (both head-major)
    const st = this.scratch.stores(this.batch, this.Tk);
    this.rows.forEach((r, b) => {
      const n = this.totals[b]!;
      for (const [cache, dst] of [
        [r.kv.k[l]!, st.k],
        [r.kv.v[l]!, st.v],
      ] as const) {
        const from = cache.view([1, H, n, D], [cache.strides[0]!, cache.strides[1]!, D, 1], cache.offset);
        const to = dst.view(
          [1, H, n, D],
          [dst.strides[0]!, dst.strides[1]!, D, 1],
          dst.offset + b * dst.strides[0]! + (this.Tk - n) * D,
        );
        be.copy(from, to);
        from.dispose();
        to.dispose();
      }
    });
    const batchView = (X: Tensor) => {
      const rows = X.view([this.batch, H, X.shape[2]!, D], X.strides, X.offset);
      const v = positionsView(rows, 0, this.Tk);
      rows.dispose();
      return v;
    };
    return { k: batchView(st.k), v: batchView(st.v) };
  }

  /** Advances every row's length once the forward has run. */
  commit(): void {
    this.rows.forEach((r, b) => {
      r.kv.length = this.totals[b]!;
    });
  }

  get bytes(): number {
    return 0;
  }

  dispose(): void {}
}
