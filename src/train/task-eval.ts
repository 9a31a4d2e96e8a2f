// Task metrics by greedy generation on a validation set, for several models side by side (the base model
// and the fine-tuned one; or base, LoRA, DoRA and full fine-tuning in `lowrank compare`).
//
// Each example's prompt is everything before its first trained token, and its reference is the trained
// completion: the first run of labelled tokens, decoded without special tokens (so without EOS or an
// end-of-turn marker). A generator continues the prompt greedily for about as many tokens as the reference
// has (with slack, capped), and the output is scored against the reference:
//
//   exact_match   the whitespace-normalised output equals the whitespace-normalised reference
//   accuracy      label accuracy: the first non-empty line equals the reference label, case-insensitively
//                 (surrounding quotes, markdown emphasis and a final full stop ignored)
//   json_f1       field-level precision / recall / F1 between the output and the reference parsed as JSON
//                 objects (nested objects flattened to dotted keys; numbers compare numerically, strings
//                 whitespace- and case-insensitively); unparsable output scores 0; also the valid-JSON rate
//   style         the fraction of outputs that contain every configured marker string
//
// 'auto' picks from the references: all JSON objects -> json_f1; all single-line with at most 4 words ->
// accuracy; otherwise exact_match, plus style when markers are given. Markers add the style metric to any
// choice.

import { ConfigError, DataError } from '../core/errors.ts';
import { decodeAfter, generateBatch } from '../models/generate.ts';
import type { LlamaForCausalLM } from '../models/llama.ts';
import { type Example, IGNORE_INDEX } from './data-format.ts';

export type TaskMetricName = 'exact_match' | 'accuracy' | 'json_f1' | 'style';
export type TaskMetricChoice = 'auto' | TaskMetricName;
export const TASK_METRIC_CHOICES: readonly TaskMetricChoice[] = ['auto', 'exact_match', 'accuracy', 'json_f1', 'style'];

/** What the metrics need from a tokenizer. */
export interface TaskTokenizer {
  decode(ids: readonly number[], opts?: { skipSpecialTokens?: boolean }): string;
  isEos(id: number): boolean;
}

/** One validation example as a generation task. */
export interface TaskExample {
  promptIds: number[];
  reference: string;
  /** Labelled tokens of the reference (including a trained EOS): sizes the generation budget. */
  referenceTokens: number;
  /** The decoded prompt (for samples in reports). */
  promptText: string;
  /** Where the example came from (`file:line`), when known. */
  source?: string;
}

/** A request to generate: greedy continuation of promptIds for at most maxTokens, cut at a stop string. */
export interface TaskRequest {
  promptIds: readonly number[];
  maxTokens: number;
  stop: readonly string[];
}

/**
 * Continues prompts greedily and returns the text of each continuation (in order). A model with its adapter
 * enabled or disabled, a model loaded from another dir, or a remote server all fit behind this.
 */
export type TaskGenerator = (requests: readonly TaskRequest[]) => string[] | Promise<string[]>;

export interface TaskEvalOptions {
  /** Default 'auto'. */
  metric?: TaskMetricChoice;
  /** Marker strings for the style metric (all must appear). Default none. */
  markers?: readonly string[];
  /** Examples evaluated (the first N). Default 50. */
  maxExamples?: number;
  /** Cap on generated tokens per example. Default 256. */
  maxNewTokens?: number;
  /** Sample outputs kept in the result (per generator). Default 5. */
  samples?: number;
  /** Called when a generator has produced all its outputs, with the seconds since the start. */
  onGenerated?: (generator: string, seconds: number) => void;
}

/** Scores of one generator, each in [0, 1] (means over the examples). */
export type TaskScores = Partial<Record<TaskScoreName, number>>;
export type TaskScoreName = TaskMetricName | 'json_precision' | 'json_recall' | 'json_valid';

export interface TaskSample {
  source?: string;
  prompt: string;
  reference: string;
  outputs: Record<string, string>;
}

export interface TaskEvalResult {
  /** The metrics computed (the first is the primary one). */
  metrics: TaskMetricName[];
  /** How 'auto' decided, or 'chosen' for an explicit metric. */
  reason: string;
  markers: string[];
  examples: number;
  /** The generators' names, in column order. */
  columns: string[];
  scores: Record<string, TaskScores>;
  /** The style metric of the references themselves (how often the data shows the markers). */
  referenceStyle: number | null;
  samples: TaskSample[];
  seconds: number;
}

export const METRIC_LABELS: Record<TaskScoreName, string> = {
  exact_match: 'exact match',
  accuracy: 'label accuracy',
  json_f1: 'JSON field F1',
  json_precision: 'JSON field precision',
  json_recall: 'JSON field recall',
  json_valid: 'valid JSON',
  style: 'style (markers present)',
};

// ---------------------------------------------------------------------------------------------------------
// Examples -> tasks
// ---------------------------------------------------------------------------------------------------------

/**
 * Turns tokenised examples into generation tasks: prompt = tokens before the first labelled token,
 * reference = the first run of labelled tokens, decoded without special tokens. Examples with no labelled
 * token or no prompt token are skipped. Takes the first maxExamples (default 50).
 */
export function taskExamples(examples: readonly Example[], tok: TaskTokenizer, maxExamples = 50): TaskExample[] {
  const out: TaskExample[] = [];
  for (const ex of examples) {
    if (out.length >= maxExamples) break;
    let first = -1;
    for (let t = 0; t < ex.labels.length; t++)
      if (ex.labels[t] !== IGNORE_INDEX) {
        first = t;
        break;
      }
    if (first <= 0) continue;
    let end = first;
    while (end < ex.labels.length && ex.labels[end] !== IGNORE_INDEX) end++;
    const refIds = Array.from(ex.inputIds.subarray(first, end)).filter((id) => !tok.isEos(id));
    const promptIds = Array.from(ex.inputIds.subarray(0, first));
    out.push({
      promptIds,
      reference: decodeAfter(tok, promptIds, refIds),
      referenceTokens: end - first,
      promptText: tok.decode(promptIds, { skipSpecialTokens: true }),
      source: ex.source ? `${ex.source.file}:${ex.source.line}` : undefined,
    });
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------------
// Metrics on one output
// ---------------------------------------------------------------------------------------------------------

export function normaliseWhitespace(s: string): string {
  return s.replace(/\s+/g, ' ').trim();
}

export function exactMatch(output: string, reference: string): boolean {
  return normaliseWhitespace(output) === normaliseWhitespace(reference);
}

/** The first non-empty line, lower-cased, without surrounding quotes, emphasis or a final full stop. */
export function normaliseLabel(s: string): string {
  const line = s.split(/\r?\n/).find((l) => l.trim() !== '') ?? '';
  let v = normaliseWhitespace(line).toLowerCase();
  for (let prev = ''; prev !== v; ) {
    prev = v;
    v = v
      .replace(/^[*_`"'“”‘’]+|[*_`"'“”‘’]+$/g, '')
      .replace(/[.!]+$/, '')
      .trim();
  }
  return v;
}

export function labelMatch(output: string, reference: string): boolean {
  return normaliseLabel(output) === normaliseLabel(reference);
}

/** Every marker appears in the output (whitespace-normalised, case-insensitive). */
export function hasMarkers(output: string, markers: readonly string[]): boolean {
  const o = normaliseWhitespace(output).toLowerCase();
  return markers.every((m) => o.includes(normaliseWhitespace(m).toLowerCase()));
}

/** The first balanced {...} in s (respecting JSON strings), or null. */
function firstObjectText(s: string): string | null {
  const start = s.indexOf('{');
  if (start < 0) return null;
  let depth = 0;
  let inString = false;
  for (let i = start; i < s.length; i++) {
    const c = s[i];
    if (inString) {
      if (c === '\\') i++;
      else if (c === '"') inString = false;
    } else if (c === '"') inString = true;
    else if (c === '{') depth++;
    else if (c === '}' && --depth === 0) return s.slice(start, i + 1);
  }
  return null;
}

const isObject = (v: unknown): v is Record<string, unknown> => v !== null && typeof v === 'object' && !Array.isArray(v);

/** The output as a JSON object: the whole text, else the first balanced {...} in it (e.g. inside a code fence). */
export function parseJsonObject(text: string): Record<string, unknown> | null {
  const tryParse = (t: string): Record<string, unknown> | null => {
    try {
      const v: unknown = JSON.parse(t);
      return isObject(v) ? v : null;
    } catch {
      return null;
    }
  };
  const whole = tryParse(text.trim());
  if (whole) return whole;
  const inner = firstObjectText(text);
  return inner ? tryParse(inner) : null;
}

/** Nested objects flattened to dotted keys; arrays and scalars are leaves. */
export function flattenFields(obj: Record<string, unknown>, prefix = ''): Map<string, unknown> {
  const out = new Map<string, unknown>();
  for (const [k, v] of Object.entries(obj)) {
    const key = prefix ? `${prefix}.${k}` : k;
    if (isObject(v) && Object.keys(v).length > 0) for (const [kk, vv] of flattenFields(v, key)) out.set(kk, vv);
    else out.set(key, v);
  }
  return out;
}

function asNumber(v: unknown): number | null {
  if (typeof v === 'number') return Number.isFinite(v) ? v : null;
  if (typeof v === 'string' && /^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$/.test(v)) return Number(v);
  return null;
}

function canonical(v: unknown): string {
  if (Array.isArray(v)) return `[${v.map(canonical).join(',')}]`;
  if (isObject(v))
    return `{${Object.keys(v)
      .sort()
      .map((k) => `${JSON.stringify(k)}:${canonical(v[k])}`)
      .join(',')}}`;
  if (typeof v === 'string') return JSON.stringify(normaliseWhitespace(v).toLowerCase());
  return JSON.stringify(v) ?? 'null';
}

/** Field values are equal: numbers (or numeric strings) numerically, strings ignoring case and spacing. */
export function fieldValuesEqual(a: unknown, b: unknown): boolean {
  const na = asNumber(a);
  const nb = asNumber(b);
  if (na !== null && nb !== null) return Math.abs(na - nb) <= 1e-9 * Math.max(1, Math.abs(na), Math.abs(nb));
  return canonical(a) === canonical(b);
}

export interface JsonFieldScores {
  precision: number;
  recall: number;
  f1: number;
  /** The output parsed as a JSON object. */
  valid: boolean;
}

/**
 * Field-level scores of one output against a reference object: a field is right when the output has the
 * key with an equal value. precision = right / output fields, recall = right / reference fields.
 */
export function jsonFieldScores(output: string, reference: Record<string, unknown> | string): JsonFieldScores {
  const ref = typeof reference === 'string' ? parseJsonObject(reference) : reference;
  if (!ref) throw new DataError(`json_f1: the reference is not a JSON object: ${String(reference).slice(0, 80)}`);
  const pred = parseJsonObject(output);
  if (!pred) return { precision: 0, recall: 0, f1: 0, valid: false };
  const gold = flattenFields(ref);
  const got = flattenFields(pred);
  let right = 0;
  for (const [k, v] of got) if (gold.has(k) && fieldValuesEqual(v, gold.get(k))) right++;
  const precision = got.size ? right / got.size : gold.size ? 0 : 1;
  const recall = gold.size ? right / gold.size : 1;
  const f1 = got.size + gold.size ? (2 * right) / (got.size + gold.size) : 1;
  return { precision, recall, f1, valid: true };
}

// ---------------------------------------------------------------------------------------------------------
// Choosing the metric
// ---------------------------------------------------------------------------------------------------------

export function isShortLabel(ref: string): boolean {
  const t = ref.trim();
  if (t === '' || /[\r\n]/.test(t)) return false;
  return t.split(/\s+/).length <= 4;
}

/** The metrics to compute, and why. */
export function chooseMetrics(
  references: readonly string[],
  metric: TaskMetricChoice = 'auto',
  markers: readonly string[] = [],
): { metrics: TaskMetricName[]; reason: string } {
  const withStyle = (m: TaskMetricName[]): TaskMetricName[] =>
    markers.length > 0 && !m.includes('style') ? [...m, 'style'] : m;
  if (metric === 'style' && markers.length === 0)
    throw new ConfigError('the style metric needs marker strings (--marker "...", repeatable)');
  if (metric !== 'auto') return { metrics: withStyle([metric]), reason: 'chosen' };
  if (references.length > 0 && references.every((r) => parseJsonObject(r) !== null && r.trim().startsWith('{')))
    return { metrics: withStyle(['json_f1']), reason: 'auto: every reference is a JSON object' };
  if (references.length > 0 && references.every(isShortLabel))
    return { metrics: withStyle(['accuracy']), reason: 'auto: every reference is one line of at most 4 words' };
  return {
    metrics: withStyle(['exact_match']),
    reason: `auto: free-text references${markers.length ? ', markers given' : ''}`,
  };
}

/** The scores that a list of metrics reports (json_f1 brings precision, recall and the valid-JSON rate). */
export function scoreNames(metrics: readonly TaskMetricName[]): TaskScoreName[] {
  return metrics.flatMap((m): TaskScoreName[] =>
    m === 'json_f1' ? ['json_f1', 'json_precision', 'json_recall', 'json_valid'] : [m],
  );
}

/**
 * The score that sums up a result: the style rate when markers were given on free text (exact match of
 * free text stays near 0 by design), else the first metric's score.
 */
export function primaryScore(metrics: readonly TaskMetricName[]): TaskScoreName {
  if (metrics[0] === 'exact_match' && metrics.includes('style')) return 'style';
  return scoreNames(metrics)[0]!;
}

/** Scores of one output for the chosen metrics. */
export function scoreOutput(
  output: string,
  reference: string,
  metrics: readonly TaskMetricName[],
  markers: readonly string[] = [],
): TaskScores {
  const s: TaskScores = {};
  for (const m of metrics) {
    if (m === 'exact_match') s.exact_match = exactMatch(output, reference) ? 1 : 0;
    else if (m === 'accuracy') s.accuracy = labelMatch(output, reference) ? 1 : 0;
    else if (m === 'style') s.style = hasMarkers(output, markers) ? 1 : 0;
    else {
      const j = jsonFieldScores(output, reference);
      s.json_f1 = j.f1;
      s.json_precision = j.precision;
      s.json_recall = j.recall;
      s.json_valid = j.valid ? 1 : 0;
    }
  }
  return s;
}

/** Mean scores over outputs. */
export function scoreOutputs(
  outputs: readonly string[],
  references: readonly string[],
  metrics: readonly TaskMetricName[],
  markers: readonly string[] = [],
): TaskScores {
  const names = scoreNames(metrics);
  const sum: Record<string, number> = Object.fromEntries(names.map((n) => [n, 0]));
  outputs.forEach((o, i) => {
    const s = scoreOutput(o, references[i]!, metrics, markers);
    for (const n of names) sum[n]! += s[n] ?? 0;
  });
  const n = Math.max(outputs.length, 1);
  return Object.fromEntries(names.map((k) => [k, sum[k]! / n])) as TaskScores;
}

// ---------------------------------------------------------------------------------------------------------
// Evaluation
// ---------------------------------------------------------------------------------------------------------

/** Generated tokens for an example: the reference's length with 25% + 16 tokens of slack, capped. */
export function generationBudget(referenceTokens: number, cap: number): number {
  return Math.max(1, Math.min(cap, Math.ceil(referenceTokens * 1.25) + 16));
}

/**
 * Generates with every generator (e.g. {base, tuned}) on the tasks and scores the outputs side by side.
 * The generators run one after the other, each on all examples.
 */
export async function evaluateTask(
  examples: readonly TaskExample[],
  generators: Record<string, TaskGenerator>,
  opts: TaskEvalOptions = {},
): Promise<TaskEvalResult> {
  const columns = Object.keys(generators);
  if (columns.length === 0) throw new ConfigError('evaluateTask: no generator given');
  const start = performance.now();
  const markers = [...(opts.markers ?? [])].filter((m) => m.trim() !== '');
  const tasks = examples.slice(0, opts.maxExamples ?? 50);
  if (tasks.length === 0)
    throw new DataError('task evaluation: no example has both a prompt and a trained completion to compare with');
  const references = tasks.map((t) => t.reference);
  const { metrics, reason } = chooseMetrics(references, opts.metric ?? 'auto', markers);
  if (metrics.includes('json_f1')) {
    const bad = tasks.findIndex((t) => parseJsonObject(t.reference) === null);
    if (bad >= 0)
      throw new DataError(
        `json_f1: the reference of ${tasks[bad]!.source ?? `example ${bad + 1}`} is not a JSON object (${tasks[bad]!.reference.slice(0, 60)}); choose another --metric`,
      );
  }
  const cap = opts.maxNewTokens ?? 256;
  // a label is one line: stop there (unless markers may come later in the output)
  const stop = metrics[0] === 'accuracy' && !metrics.includes('style') ? ['\n'] : [];
  const requests: TaskRequest[] = tasks.map((t) => ({
    promptIds: t.promptIds,
    maxTokens: generationBudget(t.referenceTokens, cap),
    stop,
  }));
  const outputs: Record<string, string[]> = {};
  const scores: Record<string, TaskScores> = {};
  for (const name of columns) {
    const out = await generators[name]!(requests);
    if (out.length !== requests.length)
      throw new Error(`generator '${name}' returned ${out.length} outputs for ${requests.length} prompts`);
    outputs[name] = out;
    scores[name] = scoreOutputs(out, references, metrics, markers);
    opts.onGenerated?.(name, (performance.now() - start) / 1000);
  }
  const nSamples = Math.min(opts.samples ?? 5, tasks.length);
  const samples: TaskSample[] = tasks.slice(0, nSamples).map((t, i) => ({
    source: t.source,
    prompt: t.promptText,
    reference: t.reference,
    outputs: Object.fromEntries(columns.map((c) => [c, outputs[c]![i]!])),
  }));
  return {
    metrics,
    reason,
    markers,
    examples: tasks.length,
    columns,
    scores,
    referenceStyle: markers.length ? references.filter((r) => hasMarkers(r, markers)).length / references.length : null,
    samples,
    seconds: (performance.now() - start) / 1000,
  };
}

// ---------------------------------------------------------------------------------------------------------
// A generator over a loaded model
// ---------------------------------------------------------------------------------------------------------

export interface ModelGeneratorOptions {
  /** Prompts decoded together (left-padded). Default 8. */
  batchSize?: number;
  /** Token ids that end a continuation besides the tokenizer's EOS ids. */
  stopTokenIds?: readonly number[];
  /** Called per batch, e.g. to show progress. */
  onBatch?: (done: number, total: number) => void;
}

/** Cuts text before the first stop string. */
export function cutAtStop(text: string, stops: readonly string[]): string {
  let cut = text.length;
  for (const s of stops) {
    if (!s) continue;
    const i = text.indexOf(s);
    if (i >= 0 && i < cut) cut = i;
  }
  return text.slice(0, cut);
}

/**
 * Greedy generation with a model: prompts of similar length are batched (left padding, KV cache), each
 * continuation stops at EOS, its own token budget, or a stop string.
 */
export function modelGenerator(
  model: LlamaForCausalLM,
  tok: TaskTokenizer & { eosIds?: ReadonlySet<number> | readonly number[]; eosId?: number | null },
  opts: ModelGeneratorOptions = {},
): (requests: readonly TaskRequest[]) => string[] {
  const eosIds = [
    ...new Set([
      ...(tok.eosIds ? [...tok.eosIds] : []),
      ...(tok.eosId !== undefined && tok.eosId !== null ? [tok.eosId] : []),
      ...(opts.stopTokenIds ?? []),
    ]),
  ];
  const batchSize = Math.max(1, opts.batchSize ?? 8);
  return (requests: readonly TaskRequest[]): string[] => {
    const order = requests
      .map((_, i) => i)
      .sort((a, b) => requests[a]!.promptIds.length - requests[b]!.promptIds.length);
    const out = new Array<string>(requests.length);
    const wasTraining = model.training;
    model.eval();
    try {
      for (let k = 0; k < order.length; k += batchSize) {
        const idx = order.slice(k, k + batchSize);
        const maxTokens = Math.max(...idx.map((i) => requests[i]!.maxTokens));
        const toks = generateBatch(
          model,
          idx.map((i) => [...requests[i]!.promptIds]),
          { temperature: 0, maxTokens, eosIds },
        );
        idx.forEach((i, j) => {
          const r = requests[i]!;
          let ids = toks[j]!.slice(0, r.maxTokens);
          const eos = ids.findIndex((t) => tok.isEos(t));
          if (eos >= 0) ids = ids.slice(0, eos);
          out[i] = cutAtStop(decodeAfter(tok, r.promptIds, ids), r.stop);
        });
        opts.onBatch?.(Math.min(k + batchSize, order.length), order.length);
      }
    } finally {
      model.train(wasTraining);
    }
    return out;
  };
}

// ---------------------------------------------------------------------------------------------------------
// Tables
// ---------------------------------------------------------------------------------------------------------

/** One row of a side-by-side table: a value per column (null = not measured). */
export interface ComparisonRow {
  name: string;
  values: (number | null)[];
  /** How values print: a share as a percentage, a loss-like number, a count, bytes, seconds. */
  format: 'percent' | 'number' | 'count' | 'bytes' | 'seconds' | 'rate';
  /** Which direction is better (for the delta column and highlighting); null = neither. */
  better: 'higher' | 'lower' | null;
}

export interface Comparison {
  columns: string[];
  rows: ComparisonRow[];
}

/** Task scores (and eval loss / perplexity per column, when measured) as comparison rows. */
export function comparisonOf(
  columns: readonly string[],
  task: TaskEvalResult | null,
  losses: Record<string, { loss: number; tokens?: number } | null> = {},
): Comparison {
  const rows: ComparisonRow[] = [];
  if (task) {
    for (const n of scoreNames(task.metrics))
      rows.push({
        name: METRIC_LABELS[n],
        values: columns.map((c) => task.scores[c]?.[n] ?? null),
        format: 'percent',
        better: 'higher',
      });
  }
  if (columns.some((c) => losses[c])) {
    rows.push({
      name: 'eval loss',
      values: columns.map((c) => losses[c]?.loss ?? null),
      format: 'number',
      better: 'lower',
    });
    rows.push({
      name: 'eval perplexity',
      values: columns.map((c) => (losses[c] ? Math.exp(losses[c]!.loss) : null)),
      format: 'number',
      better: 'lower',
    });
  }
  return { columns: [...columns], rows };
}

export function formatBytes(b: number): string {
  const units = ['B', 'KB', 'MB', 'GB', 'TB'];
  let v = b;
  let u = 0;
  while (v >= 1000 && u < units.length - 1) {
    v /= 1000;
    u++;
  }
  return `${v >= 100 || u === 0 ? v.toFixed(0) : v.toFixed(v >= 10 ? 1 : 2)} ${units[u]}`;
}

export function formatValue(v: number | null | undefined, format: ComparisonRow['format']): string {
  if (v === null || v === undefined || Number.isNaN(v)) return '-';
  switch (format) {
    case 'percent':
      return `${(100 * v).toFixed(1)}%`;
    case 'number':
      return Math.abs(v) >= 1000 ? v.toExponential(3) : v.toFixed(4);
    case 'count':
      return Math.round(v).toLocaleString('en-US');
    case 'bytes':
      return formatBytes(v);
    case 'seconds':
      return v >= 120 ? `${(v / 60).toFixed(1)} min` : `${v.toFixed(1)} s`;
    case 'rate':
      return v >= 100 ? v.toFixed(0) : v.toFixed(1);
  }
}

/** The delta of the last column against the first, when there are exactly two. */
function delta(row: ComparisonRow): string {
  if (row.values.length !== 2) return '';
  const [a, b] = row.values;
  if (a === null || b === null || a === undefined || b === undefined) return '-';
  const d = b - a;
  if (row.format === 'percent') return `${d >= 0 ? '+' : ''}${(100 * d).toFixed(1)} pt`;
  if (row.format === 'number') return `${d >= 0 ? '+' : ''}${d.toFixed(4)}`;
  return a ? `${((100 * b) / a).toFixed(0)}%` : '-';
}

/** The comparison as a plain-text (Markdown) table; with two columns, a delta column is added. */
export function formatComparison(c: Comparison): string {
  const withDelta = c.columns.length === 2;
  const headers = ['metric', ...c.columns, ...(withDelta ? ['change'] : [])];
  const rows = c.rows.map((r) => [
    r.name,
    ...r.values.map((v) => formatValue(v, r.format)),
    ...(withDelta ? [delta(r)] : []),
  ]);
  return markdownTable(headers, rows);
}

export function markdownTable(headers: readonly string[], rows: readonly (readonly string[])[]): string {
  const widths = headers.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  const line = (cells: readonly string[]) =>
    `| ${cells.map((c, i) => (i === 0 ? c.padEnd(widths[i]!) : c.padStart(widths[i]!))).join(' | ')} |`;
  return [
    line(headers),
    `| ${widths.map((w, i) => (i === 0 ? '-'.repeat(w) : `${'-'.repeat(w - 1)}:`)).join(' | ')} |`,
    ...rows.map(line),
  ].join('\n');
}
