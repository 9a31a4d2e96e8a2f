// The dataset pipeline, independent of the model: files -> records -> token ids with loss masks ->
// (packed) rows -> seeded micro batches, plus a data check report.
//
//   readRecords      data-read.ts    JSONL / JSON / CSV / TSV, every record with its line
//   tokenizeRecord   data-format.ts  text, completion, alpaca, chat, input_output; masking, truncation
//   packExamples     data-pack.ts    first-fit-decreasing packing with position ids and sequence ids
//   DataLoader       data-pack.ts    [B, T] Int32Array batches, seeded order per epoch, resumable position
//   DataReport       data-report.ts  counts, length statistics, drops, advice
//
// prepareData(config, tokenizer) runs it all as the training config says.

import { DataError } from '../core/errors.ts';
import type { DatasetConfig, TrainConfig } from './config.ts';
import {
  type ChatRenderer,
  completionShape,
  type DatasetFormatState,
  type Example,
  type FormatOptions,
  type TextTokenizer,
  tokenizeRecord,
} from './data-format.ts';
import { DataLoader, exampleRows, packExamples, permutation, type Row, STREAM } from './data-pack.ts';
import { readRecords } from './data-read.ts';
import {
  type DataReport,
  type DatasetStats,
  dataAdvice,
  formatDataReport,
  lengthStats,
  splitStats,
  trainableCount,
} from './data-report.ts';

export {
  ALPACA_PROMPT_NO_INPUT,
  ALPACA_PROMPT_WITH_INPUT,
  alpacaPrompt,
  type ChatMessage,
  type ChatRenderer,
  DROP_REASONS,
  type DropReason,
  type Example,
  type FormatOptions,
  IGNORE_INDEX,
  type SourceRef,
  spanTokens,
  type TextTokenizer,
  type Tokenized,
  tokenizeRecord,
} from './data-format.ts';
export {
  type Batch,
  type CollateOptions,
  collate,
  DataLoader,
  type DataPosition,
  exampleRows,
  type LoaderOptions,
  packAssignments,
  packExamples,
  packingEfficiency,
  permutation,
  type Row,
  seededRandom,
} from './data-pack.ts';
export {
  kindFromExtension,
  parseCsv,
  parseCsvRows,
  parseJsonl,
  parseRecords,
  type ReaderKind,
  readRecords,
  type SourceRecord,
} from './data-read.ts';
export {
  type DataReport,
  type DatasetStats,
  formatDataReport,
  type LengthStats,
  lengthStats,
  type SplitStats,
} from './data-report.ts';

/** Reads and tokenises one dataset file. */
export function buildDataset(
  spec: DatasetConfig,
  index: number,
  tok: TextTokenizer,
  opts: FormatOptions,
  role: 'train' | 'eval' = 'train',
): { examples: Example[]; stats: DatasetStats } {
  const records = readRecords(spec.path, { kind: spec.ds_type, split: spec.split });
  const state: DatasetFormatState = { shape: completionShape(records[0]!.value, spec) };
  const examples: Example[] = [];
  const rawLengths: number[] = [];
  const stats: DatasetStats = {
    index,
    path: spec.path,
    type: spec.type,
    role,
    records: records.length,
    examples: 0,
    truncated: 0,
    dropped: {},
    droppedAt: {},
    tokens: 0,
    trainableTokens: 0,
    lengths: lengthStats([]),
    searchedTurns: 0,
  };
  for (const rec of records) {
    const r = tokenizeRecord(rec, spec, index, tok, opts, state);
    if (r.rawLength > 0) rawLengths.push(r.rawLength);
    if (!r.ok) {
      stats.dropped[r.reason] = (stats.dropped[r.reason] ?? 0) + 1;
      const at = (stats.droppedAt[r.reason] ??= []);
      if (at.length < 3) at.push(`${spec.path}:${rec.line}`);
      continue;
    }
    examples.push(r.example);
    if (r.truncated) stats.truncated++;
    stats.searchedTurns += r.searchedTurns;
    stats.tokens += r.example.inputIds.length;
    stats.trainableTokens += trainableCount(r.example);
  }
  stats.examples = examples.length;
  stats.lengths = lengthStats(rawLengths);
  return { examples, stats };
}

/**
 * Holds out an evaluation set: `size` is a fraction in (0, 1) (ceil(size * n) examples, as HF
 * train_test_split) or a whole count. The choice is a seeded permutation; both parts keep file order.
 */
export function splitValidation(
  examples: readonly Example[],
  size: number,
  seed: number,
): { train: Example[]; eval: Example[] } {
  const n = examples.length;
  const count = size < 1 ? Math.ceil(size * n) : Math.floor(size);
  if (count <= 0) return { train: [...examples], eval: [] };
  if (count >= n) {
    throw new DataError(
      `val_set_size ${size} takes ${count} of ${n} example(s), leaving none to train on; lower val_set_size or add data`,
    );
  }
  const held = new Uint8Array(n);
  const perm = permutation(n, seed, STREAM.split);
  for (let k = 0; k < count; k++) held[perm[k]!] = 1;
  const train: Example[] = [];
  const evalSet: Example[] = [];
  examples.forEach((ex, i) => {
    (held[i] ? evalSet : train).push(ex);
  });
  return { train, eval: evalSet };
}

export interface PrepareOptions {
  /** Renders chats instead of tokenizer.applyChatTemplate (e.g. the config's chat_template_jinja). */
  applyChatTemplate?: ChatRenderer;
}

export interface PreparedData {
  train: Example[];
  eval: Example[];
  trainRows: Row[];
  evalRows: Row[];
  report: DataReport;
  /** formatDataReport(report). */
  reportText: string;
}

/** Runs the pipeline as the training config says: read, tokenise, mask, truncate, split, pack, report. */
export function prepareData(cfg: TrainConfig, tok: TextTokenizer, opts: PrepareOptions = {}): PreparedData {
  const fo: FormatOptions = {
    sequenceLen: cfg.sequence_len,
    trainOnInputs: cfg.train_on_inputs,
    excessLength: cfg.excess_length_strategy,
    applyChatTemplate: opts.applyChatTemplate,
  };
  const trainSets = cfg.datasets.map((d, i) => buildDataset(d, i, tok, fo, 'train'));
  const evalSets = cfg.test_datasets.map((d, i) => buildDataset(d, i, tok, fo, 'eval'));
  let train = trainSets.flatMap((s) => s.examples);
  let evalExamples = evalSets.flatMap((s) => s.examples);
  let evalSource: DataReport['evalSource'] = evalSets.length > 0 ? 'test_datasets' : 'none';
  if (cfg.val_set_size > 0) {
    ({ train, eval: evalExamples } = splitValidation(train, cfg.val_set_size, cfg.seed));
    evalSource = 'val_set_size';
  }
  if (train.length === 0) {
    throw new DataError(
      `no training examples: every record of ${cfg.datasets.map((d) => d.path).join(', ')} was dropped (see the data report's reasons)`,
    );
  }
  const trainRows = cfg.sample_packing ? packExamples(train, cfg.sequence_len, cfg.seed) : exampleRows(train);
  const evalRows = cfg.eval_sample_packing
    ? packExamples(evalExamples, cfg.sequence_len, cfg.seed)
    : exampleRows(evalExamples);
  const partial = {
    sequenceLen: cfg.sequence_len,
    samplePacking: cfg.sample_packing,
    datasets: trainSets.map((s) => s.stats),
    evalDatasets: evalSets.map((s) => s.stats),
    evalSource,
    train: splitStats(train, trainRows, cfg.sequence_len, cfg.sample_packing),
    eval: evalSource === 'none' ? null : splitStats(evalExamples, evalRows, cfg.sequence_len, cfg.eval_sample_packing),
  };
  const report: DataReport = {
    ...partial,
    advice: dataAdvice(partial, {
      sequenceLen: cfg.sequence_len,
      samplePacking: cfg.sample_packing,
      microBatchSize: cfg.micro_batch_size,
      padToSequenceLen: cfg.pad_to_sequence_len,
      adapter: cfg.adapter,
    }),
  };
  return { train, eval: evalExamples, trainRows, evalRows, report, reportText: formatDataReport(report) };
}

/** The training loader (seeded order per epoch) and the evaluation loader (file order), as the config says. */
export function createLoaders(
  data: PreparedData,
  cfg: TrainConfig,
  tok: Pick<TextTokenizer, 'padId' | 'eosId'> = {},
): { train: DataLoader; eval: DataLoader | null } {
  const padId = tok.padId ?? tok.eosId ?? 0;
  const train = new DataLoader(data.trainRows, {
    microBatchSize: cfg.micro_batch_size,
    seed: cfg.seed,
    shuffle: true,
    padTo: cfg.pad_to_sequence_len ? cfg.sequence_len : null,
    padId,
  });
  const evalLoader =
    data.evalRows.length === 0
      ? null
      : new DataLoader(data.evalRows, {
          microBatchSize: cfg.eval_batch_size,
          seed: cfg.seed,
          shuffle: false,
          padTo: cfg.pad_to_sequence_len ? cfg.sequence_len : null,
          padId,
        });
  return { train, eval: evalLoader };
}
