// The data check: what the pipeline made of the files, and advice before a run starts.

import type { DatasetType } from './config.ts';
import { DROP_REASONS, type DropReason, type Example, IGNORE_INDEX } from './data-format.ts';
import { packingEfficiency, type Row } from './data-pack.ts';

export interface LengthStats {
  min: number;
  mean: number;
  p50: number;
  p95: number;
  max: number;
}

/** What one dataset file gave. */
export interface DatasetStats {
  /** Index in datasets (or test_datasets). */
  index: number;
  path: string;
  type: DatasetType;
  role: 'train' | 'eval';
  records: number;
  /** Examples kept. */
  examples: number;
  /** Kept examples cut at sequence_len. */
  truncated: number;
  dropped: Partial<Record<DropReason, number>>;
  /** Up to three `file:line` places per drop reason. */
  droppedAt: Partial<Record<DropReason, string[]>>;
  /** Tokens and trained tokens of the kept examples (after truncation). */
  tokens: number;
  trainableTokens: number;
  /** Token lengths of the tokenised records before truncation (what sequence_len must hold). */
  lengths: LengthStats;
  /** Chat turns located by content search because the template is not prefix-stable (see data-format.ts). */
  searchedTurns: number;
}

/** The training or evaluation split as the loader sees it. */
export interface SplitStats {
  examples: number;
  tokens: number;
  trainableTokens: number;
  trainableFraction: number;
  /** Token lengths of the examples (after truncation). */
  lengths: LengthStats;
  rows: number;
  /** Real tokens / (rows x sequence_len) when packed; null when not packed. */
  packingEfficiency: number | null;
}

export interface DataReport {
  sequenceLen: number;
  samplePacking: boolean;
  datasets: DatasetStats[];
  evalDatasets: DatasetStats[];
  evalSource: 'none' | 'val_set_size' | 'test_datasets';
  train: SplitStats;
  eval: SplitStats | null;
  advice: string[];
}

/** Nearest-rank statistics; all zero for no values. */
export function lengthStats(values: readonly number[]): LengthStats {
  if (values.length === 0) return { min: 0, mean: 0, p50: 0, p95: 0, max: 0 };
  const sorted = Float64Array.from(values).sort();
  const rank = (q: number) => sorted[Math.max(0, Math.ceil(q * sorted.length) - 1)]!;
  let sum = 0;
  for (const v of sorted) sum += v;
  return {
    min: sorted[0]!,
    mean: sum / sorted.length,
    p50: rank(0.5),
    p95: rank(0.95),
    max: sorted[sorted.length - 1]!,
  };
}

export function trainableCount(ex: Example): number {
  let n = 0;
  for (const l of ex.labels) if (l !== IGNORE_INDEX) n++;
  return n;
}

export function splitStats(
  examples: readonly Example[],
  rows: readonly Row[],
  sequenceLen: number,
  packed: boolean,
): SplitStats {
  let tokens = 0;
  let trainable = 0;
  for (const ex of examples) {
    tokens += ex.inputIds.length;
    trainable += trainableCount(ex);
  }
  return {
    examples: examples.length,
    tokens,
    trainableTokens: trainable,
    trainableFraction: tokens === 0 ? 0 : trainable / tokens,
    lengths: lengthStats(examples.map((e) => e.inputIds.length)),
    rows: rows.length,
    packingEfficiency: packed ? packingEfficiency(rows, sequenceLen) : null,
  };
}

export interface AdviceInput {
  sequenceLen: number;
  samplePacking: boolean;
  microBatchSize: number;
  padToSequenceLen: boolean;
  adapter: string;
}

/** Plain advice from the numbers. */
export function dataAdvice(r: Omit<DataReport, 'advice'>, cfg: AdviceInput): string[] {
  const advice: string[] = [];
  const n = r.train.examples;
  if (n < 1000) {
    advice.push(
      `Only ${n} training example(s): LoRA tends to overfit small datasets. Prefer few epochs (1-3), a lower rank (lora_r 8-16), some dropout (lora_dropout 0.05-0.1), and watch the eval loss.`,
    );
  } else if (n > 50_000 && cfg.adapter !== 'full') {
    advice.push(
      `${n} training examples: with this much data a higher rank or full fine-tuning (adapter: full) may pay off, if memory allows.`,
    );
  }
  const all = [...r.datasets];
  const truncated = all.reduce((s, d) => s + d.truncated, 0);
  const kept = all.reduce((s, d) => s + d.examples, 0);
  const p95 = Math.max(0, ...all.map((d) => d.lengths.p95));
  if (truncated > 0 && (truncated / Math.max(1, kept) > 0.01 || p95 > r.sequenceLen)) {
    advice.push(
      `${truncated} example(s) (${pct(truncated / Math.max(1, kept))}) were cut at sequence_len ${r.sequenceLen}; the 95th-percentile length is ${p95}. Raise sequence_len to keep them whole, or shorten the records.`,
    );
  }
  const dropped = all.reduce((s, d) => s + Object.values(d.dropped).reduce((a, b) => a + (b ?? 0), 0), 0);
  if (dropped > 0) advice.push(`${dropped} record(s) were dropped; see the reasons above.`);
  if (r.evalSource === 'none' && n >= 100) {
    advice.push(
      'No evaluation set: set val_set_size (e.g. 0.05) or test_datasets to see when training starts to overfit.',
    );
  }
  if (
    !cfg.samplePacking &&
    (cfg.microBatchSize > 1 || cfg.padToSequenceLen) &&
    r.train.lengths.mean > 0 &&
    r.train.lengths.mean < r.sequenceLen / 4
  ) {
    advice.push(
      `The mean example is ${Math.round(r.train.lengths.mean)} tokens, far below sequence_len ${r.sequenceLen}: sample_packing: true would spend much less compute on padding.`,
    );
  }
  if (all.some((d) => d.searchedTurns > 0)) {
    advice.push(
      'The chat template renders earlier turns differently from later ones (not prefix-stable); trained turns were located by their content. Check a few examples with the tokenizer.',
    );
  }
  return advice;
}

function pct(x: number): string {
  return `${(100 * x).toFixed(1)}%`;
}

function fmtLengths(l: LengthStats): string {
  return `min ${l.min}, mean ${l.mean.toFixed(1)}, p50 ${l.p50}, p95 ${l.p95}, max ${l.max}`;
}

/** The report as text for the terminal. */
export function formatDataReport(r: DataReport): string {
  const out: string[] = [];
  out.push(`Data check (sequence_len ${r.sequenceLen}, sample packing ${r.samplePacking ? 'on' : 'off'})`);
  const table = (sets: DatasetStats[]) => {
    const head = ['dataset', 'type', 'records', 'kept', 'truncated', 'dropped', 'tokens', 'trained'];
    const body = sets.map((d) => [
      d.path,
      d.type,
      String(d.records),
      String(d.examples),
      String(d.truncated),
      String(Object.values(d.dropped).reduce((a, b) => a + (b ?? 0), 0)),
      String(d.tokens),
      d.tokens === 0 ? '-' : pct(d.trainableTokens / d.tokens),
    ]);
    const widths = head.map((h, j) => Math.max(h.length, ...body.map((b) => b[j]!.length)));
    const line = (cells: string[]) =>
      `  ${cells.map((c, j) => (j < 2 ? c.padEnd(widths[j]!) : c.padStart(widths[j]!))).join('  ')}`;
    out.push(line(head));
    for (const b of body) out.push(line(b));
    for (const d of sets) {
      out.push(`  ${d.path}: record lengths ${fmtLengths(d.lengths)}`);
      for (const [reason, count] of Object.entries(d.dropped)) {
        const at = d.droppedAt[reason as DropReason] ?? [];
        out.push(
          `    dropped ${count}: ${DROP_REASONS[reason as DropReason]}${at.length ? ` (e.g. ${at.join(', ')})` : ''}`,
        );
      }
      if (d.searchedTurns > 0) out.push(`    ${d.searchedTurns} chat turn(s) located by content search`);
    }
  };
  table(r.datasets);
  if (r.evalDatasets.length > 0) {
    out.push('Evaluation files');
    table(r.evalDatasets);
  }
  const split = (name: string, s: SplitStats) => {
    out.push(
      `${name}: ${s.examples} examples, ${s.tokens} tokens, ${pct(s.trainableFraction)} trained; lengths ${fmtLengths(s.lengths)}`,
    );
    out.push(`  ${s.rows} row(s)${s.packingEfficiency === null ? '' : `, packed ${pct(s.packingEfficiency)} full`}`);
  };
  split('train', r.train);
  if (r.eval) split(`eval (${r.evalSource})`, r.eval);
  else out.push('eval: none');
  if (r.advice.length > 0) {
    out.push('Advice');
    for (const a of r.advice) out.push(`  - ${a}`);
  }
  return out.join('\n');
}
