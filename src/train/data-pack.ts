// Rows, sample packing and micro batches.
//
// A row is what one batch line holds: one example, or several packed end to end. Packing never splits an
// example (examples are already cut to sequence_len) and never lets examples see each other: every token
// carries its example's position id (restarting at 0) and a sequence id (1, 2, ... within the row; 0 is
// padding), so attention can be block-diagonal and RoPE sees each example as if alone. Labels need nothing
// more: each example's first label is already -100 (see data-format.ts), so no loss crosses a boundary.
//
// Packing is first-fit-decreasing (as Axolotl's multipack and TRL's BFD, best-fit there): examples sorted
// by length, longest first, each placed in the first row with room, found in O(log rows) with a max segment
// tree. Ties are ordered by a seeded shuffle, so a seed gives one packing.
//
// Micro batches: each epoch visits the rows in a seeded permutation of its own (seed, epoch), so the data
// position {epoch, index} is enough to resume exactly, with no RNG state to save.

import { DataError } from '../core/errors.ts';
import { type Example, IGNORE_INDEX } from './data-format.ts';

export interface Row {
  inputIds: Int32Array;
  labels: Int32Array;
  /** Position within each example, restarting at 0. */
  positionIds: Int32Array;
  /** 1-based example number within the row (0 is reserved for padding). */
  seqIds: Int32Array;
  /** How many examples the row holds. */
  examples: number;
}

/** A deterministic PRNG (mulberry32) seeded from (seed, stream). */
export function seededRandom(seed: number, stream = 0): () => number {
  let a = mix32((seed >>> 0) ^ mix32(stream + 0x9e3779b9));
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function mix32(x: number): number {
  x = Math.imul(x ^ (x >>> 16), 0x85ebca6b);
  x = Math.imul(x ^ (x >>> 13), 0xc2b2ae35);
  return (x ^ (x >>> 16)) >>> 0;
}

/** A seeded Fisher-Yates permutation of 0..n-1. */
export function permutation(n: number, seed: number, stream = 0): Uint32Array {
  const p = new Uint32Array(n);
  for (let i = 0; i < n; i++) p[i] = i;
  const rand = seededRandom(seed, stream);
  for (let i = n - 1; i > 0; i--) {
    const j = Math.floor(rand() * (i + 1));
    const t = p[i]!;
    p[i] = p[j]!;
    p[j] = t;
  }
  return p;
}

/** Stream ids, so that the split, the packing and the epoch orders draw independent numbers from one seed. */
export const STREAM = { split: 1, pack: 2, epoch: 1000 } as const;

/** One example per row. */
export function exampleRows(examples: readonly Example[]): Row[] {
  return examples.map((ex) => {
    const n = ex.inputIds.length;
    const positionIds = new Int32Array(n);
    for (let t = 0; t < n; t++) positionIds[t] = t;
    return {
      inputIds: ex.inputIds,
      labels: ex.labels,
      positionIds,
      seqIds: new Int32Array(n).fill(1),
      examples: 1,
    };
  });
}

/** Which examples go in which row: first-fit-decreasing into rows of `capacity` tokens. */
export function packAssignments(lengths: readonly number[], capacity: number, seed: number): number[][] {
  const n = lengths.length;
  for (let i = 0; i < n; i++) {
    if (lengths[i]! > capacity) throw new RangeError(`example ${i} has ${lengths[i]} tokens > capacity ${capacity}`);
  }
  const shuffled = permutation(n, seed, STREAM.pack);
  const order = Array.from(shuffled).sort((a, b) => lengths[b]! - lengths[a]!); // stable: ties keep the shuffle
  // Max segment tree over the rows' free space; unopened rows have full capacity, so the leftmost fit
  // opens rows in order.
  let size = 1;
  while (size < Math.max(1, n)) size *= 2;
  const tree = new Int32Array(2 * size).fill(capacity);
  const bins: number[][] = [];
  for (const ex of order) {
    const len = lengths[ex]!;
    let node = 1;
    while (node < size) node = tree[2 * node]! >= len ? 2 * node : 2 * node + 1;
    const bin = node - size;
    (bins[bin] ??= []).push(ex);
    tree[node] = tree[node]! - len;
    for (node >>= 1; node >= 1; node >>= 1) tree[node] = Math.max(tree[2 * node]!, tree[2 * node + 1]!);
  }
  return bins;
}

/** Packs examples into rows of at most `sequenceLen` tokens (first-fit-decreasing, seeded ties). */
export function packExamples(examples: readonly Example[], sequenceLen: number, seed: number): Row[] {
  const bins = packAssignments(
    examples.map((e) => e.inputIds.length),
    sequenceLen,
    seed,
  );
  return bins.map((bin) => {
    const total = bin.reduce((s, i) => s + examples[i]!.inputIds.length, 0);
    const row: Row = {
      inputIds: new Int32Array(total),
      labels: new Int32Array(total),
      positionIds: new Int32Array(total),
      seqIds: new Int32Array(total),
      examples: bin.length,
    };
    let at = 0;
    bin.forEach((i, k) => {
      const ex = examples[i]!;
      const n = ex.inputIds.length;
      row.inputIds.set(ex.inputIds, at);
      row.labels.set(ex.labels, at);
      row.labels[at] = IGNORE_INDEX; // already so; kept explicit because it is what makes packing safe
      for (let t = 0; t < n; t++) {
        row.positionIds[at + t] = t;
        row.seqIds[at + t] = k + 1;
      }
      at += n;
    });
    return row;
  });
}

/** Share of row slots holding real tokens when every row is sequenceLen long. */
export function packingEfficiency(rows: readonly Row[], sequenceLen: number): number {
  if (rows.length === 0) return 0;
  const tokens = rows.reduce((s, r) => s + r.inputIds.length, 0);
  return tokens / (rows.length * sequenceLen);
}

// ---------------------------------------------------------------------------------------------------------
// Micro batches
// ---------------------------------------------------------------------------------------------------------

/** A [batchSize, seqLen] micro batch, row-major. Padding: seqIds 0, attentionMask 0, labels -100, positionIds 0. */
export interface Batch {
  batchSize: number;
  seqLen: number;
  inputIds: Int32Array;
  labels: Int32Array;
  positionIds: Int32Array;
  seqIds: Int32Array;
  attentionMask: Int32Array;
  /** Non-padding tokens. */
  numTokens: number;
  /** Tokens with a label (the loss's denominator; sum it over accumulation steps to normalise as Unsloth/HF do). */
  numTrainableTokens: number;
  /** Where this batch sits: epoch and micro-batch index within it. */
  epoch: number;
  index: number;
}

export interface CollateOptions {
  /** Pad every row to this length (pad_to_sequence_len); otherwise to the longest row of the batch. */
  padTo?: number | null;
  /** The id written into padding (it is masked out; default 0). */
  padId?: number;
}

export function collate(rows: readonly Row[], opts: CollateOptions = {}): Omit<Batch, 'epoch' | 'index'> {
  const longest = rows.reduce((m, r) => Math.max(m, r.inputIds.length), 0);
  const T = opts.padTo ?? longest;
  if (longest > T) throw new RangeError(`a row has ${longest} tokens, more than the padded length ${T}`);
  const B = rows.length;
  const inputIds = new Int32Array(B * T).fill(opts.padId ?? 0);
  const labels = new Int32Array(B * T).fill(IGNORE_INDEX);
  const positionIds = new Int32Array(B * T);
  const seqIds = new Int32Array(B * T);
  const attentionMask = new Int32Array(B * T);
  let numTokens = 0;
  let numTrainableTokens = 0;
  rows.forEach((r, b) => {
    const o = b * T;
    inputIds.set(r.inputIds, o);
    labels.set(r.labels, o);
    positionIds.set(r.positionIds, o);
    seqIds.set(r.seqIds, o);
    attentionMask.fill(1, o, o + r.inputIds.length);
    numTokens += r.inputIds.length;
    for (let t = 0; t < r.labels.length; t++) if (r.labels[t] !== IGNORE_INDEX) numTrainableTokens++;
  });
  return {
    batchSize: B,
    seqLen: T,
    inputIds,
    labels,
    positionIds,
    seqIds,
    attentionMask,
    numTokens,
    numTrainableTokens,
  };
}

/** Where the loader stands; saved in checkpoints for an exact resume. */
export interface DataPosition {
  epoch: number;
  /** The next micro batch within the epoch. */
  index: number;
  /** Row count and a hash of the rows and batching, to notice that they changed between save and resume. */
  rows: number;
  fingerprint: string;
}

export interface LoaderOptions extends CollateOptions {
  microBatchSize: number;
  seed: number;
  /** Visit rows in a seeded order per epoch (training); false keeps file order (evaluation). Default true. */
  shuffle?: boolean;
}

export class DataLoader {
  readonly rows: readonly Row[];
  readonly batchesPerEpoch: number;
  private readonly opts: LoaderOptions;
  private epoch = 0;
  private index = 0;
  private orderCache: { epoch: number; order: Uint32Array } | null = null;
  private fingerprintCache: string | null = null;

  constructor(rows: readonly Row[], opts: LoaderOptions) {
    if (!Number.isInteger(opts.microBatchSize) || opts.microBatchSize < 1) {
      throw new RangeError(`microBatchSize must be a positive integer, got ${opts.microBatchSize}`);
    }
    if (rows.length === 0) throw new DataError('no training rows: every example was dropped (see the data report)');
    this.rows = rows;
    this.opts = opts;
    this.batchesPerEpoch = Math.ceil(rows.length / opts.microBatchSize);
  }

  /** The row order of an epoch. */
  order(epoch: number): Uint32Array {
    if (this.orderCache?.epoch !== epoch) {
      const order =
        this.opts.shuffle === false
          ? Uint32Array.from(this.rows, (_, i) => i)
          : permutation(this.rows.length, this.opts.seed, STREAM.epoch + epoch);
      this.orderCache = { epoch, order };
    }
    return this.orderCache.order;
  }

  /** The micro batch at (epoch, index); the last batch of an epoch may be smaller. */
  batchAt(epoch: number, index: number): Batch {
    if (index < 0 || index >= this.batchesPerEpoch) {
      throw new RangeError(`batch index ${index} out of range 0..${this.batchesPerEpoch - 1}`);
    }
    const order = this.order(epoch);
    const from = index * this.opts.microBatchSize;
    const to = Math.min(from + this.opts.microBatchSize, this.rows.length);
    const rows: Row[] = [];
    for (let k = from; k < to; k++) rows.push(this.rows[order[k]!]!);
    return { ...collate(rows, this.opts), epoch, index };
  }

  /** Returns the batch at the current position and moves on (into the next epoch after the last batch). */
  next(): Batch {
    const batch = this.batchAt(this.epoch, this.index);
    this.index++;
    if (this.index >= this.batchesPerEpoch) {
      this.epoch++;
      this.index = 0;
    }
    return batch;
  }

  /** Iterates one epoch from the current position. */
  *epochBatches(): Generator<Batch> {
    const epoch = this.epoch;
    while (this.epoch === epoch) yield this.next();
  }

  get position(): DataPosition {
    return { epoch: this.epoch, index: this.index, rows: this.rows.length, fingerprint: this.fingerprint() };
  }

  /** Moves to a saved position; refuses if the rows differ from those it was saved with. */
  seek(pos: DataPosition): void {
    if (pos.rows !== this.rows.length || pos.fingerprint !== this.fingerprint()) {
      throw new DataError(
        `cannot resume the data position: the training rows changed since the checkpoint (${pos.rows} rows, fingerprint ${pos.fingerprint}; now ${this.rows.length} rows, ${this.fingerprint()}); an exact resume needs the same data, tokenizer, sequence_len, packing and seed`,
      );
    }
    if (!Number.isInteger(pos.epoch) || pos.epoch < 0 || !Number.isInteger(pos.index) || pos.index < 0) {
      throw new DataError(`invalid data position epoch ${pos.epoch}, index ${pos.index}`);
    }
    this.epoch = pos.epoch + Math.floor(pos.index / this.batchesPerEpoch);
    this.index = pos.index % this.batchesPerEpoch;
  }

  /** FNV-1a over the seed, the batch size and every row's ids, labels and sequence ids. */
  fingerprint(): string {
    if (this.fingerprintCache === null) {
      let h = 0x811c9dc5;
      const add = (x: number) => {
        h = Math.imul(h ^ (x & 0xffff), 0x01000193);
        h = Math.imul(h ^ (x >>> 16), 0x01000193);
      };
      add(this.opts.seed);
      add(this.opts.microBatchSize);
      add(this.opts.shuffle === false ? 0 : 1);
      for (const r of this.rows) {
        add(r.inputIds.length);
        for (const x of r.inputIds) add(x);
        for (const x of r.labels) add(x);
        for (const x of r.seqIds) add(x);
      }
      this.fingerprintCache = (h >>> 0).toString(16).padStart(8, '0');
    }
    return this.fingerprintCache;
  }
}
