// report.html: one self-contained page per run (no scripts, fonts or images from elsewhere) with the
// training and evaluation loss curves as inline SVG, the run summary, the data report and the before/after
// table of task metrics and eval loss. `writeRunReport(dir)` builds it from what a run leaves in its output
// dir: metrics.jsonl, train_results.json, data_report.txt and eval_results.json (from `lowrank eval`).

import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { writeFileAtomic } from '../formats/atomic.ts';
import type { MetricRecord } from './checkpoint.ts';
import type { TrainConfig } from './config.ts';
import { type Comparison, formatValue, type TaskEvalResult, type TaskSample } from './task-eval.ts';

/** What train_results.json holds (runJob's summary without the history). */
export interface RunSummary {
  steps?: number;
  finalLoss?: number | null;
  evalLoss?: number | null;
  tokensPerSecond?: number;
  peakBytes?: number;
  wallSeconds?: number;
  stoppedEarly?: boolean;
  outputDir?: string;
  params?: { total: number; trainable: number };
  [key: string]: unknown;
}

/** What `lowrank eval` writes to eval_results.json (and the report shows as the before/after table). */
export interface EvalResults {
  /** Column names, e.g. ['base', 'adapter']. */
  columns: string[];
  comparison: Comparison;
  task: TaskEvalResult | null;
  losses: Record<string, { loss: number; tokens: number } | null>;
  /** Where the examples came from. */
  data: string;
  /** When it ran (ISO time). */
  time: string;
}

export interface ReportInput {
  title: string;
  /** Shown under the title: base model, adapter kind, ... */
  facts?: [string, string][];
  summary?: RunSummary | null;
  history?: readonly MetricRecord[];
  dataReport?: string | null;
  evaluation?: EvalResults | null;
  /** When the report was made (ISO time); default now. */
  time?: string;
}

// ---------------------------------------------------------------------------------------------------------
// SVG line charts
// ---------------------------------------------------------------------------------------------------------

export interface Series {
  name: string;
  points: readonly (readonly [number, number])[];
  color?: string;
  /** Dashed line (e.g. eval loss over training loss). */
  dashed?: boolean;
}

export interface ChartOptions {
  width?: number;
  height?: number;
  xLabel?: string;
  yLabel?: string;
  title?: string;
}

const PALETTE = ['#2563eb', '#dc2626', '#16a34a', '#9333ea', '#ea580c', '#0891b2'];

export function escapeHtml(s: string): string {
  return s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;');
}

/** About `count` round tick values covering [lo, hi] (1, 2, 5 x 10^k steps). */
export function niceTicks(lo: number, hi: number, count = 5): number[] {
  if (!Number.isFinite(lo) || !Number.isFinite(hi)) return [];
  if (hi < lo) [lo, hi] = [hi, lo];
  if (hi === lo) {
    const pad = Math.abs(lo) > 0 ? Math.abs(lo) * 0.1 : 1;
    lo -= pad;
    hi += pad;
  }
  const raw = (hi - lo) / Math.max(1, count);
  const mag = 10 ** Math.floor(Math.log10(raw));
  const norm = raw / mag;
  const step = (norm <= 1 ? 1 : norm <= 2 ? 2 : norm <= 5 ? 5 : 10) * mag;
  const first = Math.floor(lo / step) * step;
  const ticks: number[] = [];
  for (let v = first; v <= hi + step * 1e-9; v += step) ticks.push(Number(v.toPrecision(12)));
  if (ticks[ticks.length - 1]! < hi - step * 1e-9) ticks.push(Number((first + ticks.length * step).toPrecision(12)));
  return ticks;
}

/** Labels for one axis: fixed decimals from the step, or exponents for the whole axis when values are tiny or huge. */
export function tickLabels(ticks: readonly number[]): string[] {
  if (ticks.length === 0) return [];
  const step = ticks.length > 1 ? Math.abs(ticks[1]! - ticks[0]!) : Math.abs(ticks[0]!) || 1;
  const maxAbs = Math.max(...ticks.map(Math.abs));
  if (maxAbs >= 1e5 || (maxAbs > 0 && maxAbs < 1e-2)) {
    const digits = Math.max(0, Math.min(3, Math.floor(Math.log10(maxAbs)) - Math.floor(Math.log10(step))));
    return ticks.map((v) => (v === 0 ? '0' : v.toExponential(digits)));
  }
  const decimals = Math.max(0, Math.min(6, -Math.floor(Math.log10(step) + 1e-9)));
  return ticks.map((v) => v.toFixed(decimals));
}

const f = (v: number) => Number(v.toFixed(2)).toString();

/**
 * A line chart as an <svg> element: axes with round ticks, a path per series (a dot for a single point),
 * and a legend. Non-finite points are left out.
 */
export function lineChartSvg(series: readonly Series[], opts: ChartOptions = {}): string {
  const W = opts.width ?? 720;
  const H = opts.height ?? 320;
  const m = { left: 80, right: 16, top: opts.title ? 32 : 16, bottom: 48 };
  const pw = W - m.left - m.right;
  const ph = H - m.top - m.bottom;
  const clean = series.map((s, i) => ({
    ...s,
    color: s.color ?? PALETTE[i % PALETTE.length]!,
    points: s.points.filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y)),
  }));
  const all = clean.flatMap((s) => s.points);
  const out: string[] = [
    `<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 ${W} ${H}" width="${W}" height="${H}" role="img" font-family="sans-serif" font-size="12">`,
  ];
  if (opts.title)
    out.push(
      `<text x="${W / 2}" y="20" text-anchor="middle" font-size="14" font-weight="bold">${escapeHtml(opts.title)}</text>`,
    );
  if (all.length === 0) {
    out.push(`<text x="${W / 2}" y="${H / 2}" text-anchor="middle" fill="#666">no data</text></svg>`);
    return out.join('');
  }
  const xTicks = niceTicks(Math.min(...all.map((p) => p[0])), Math.max(...all.map((p) => p[0])), 6);
  const yTicks = niceTicks(Math.min(...all.map((p) => p[1])), Math.max(...all.map((p) => p[1])), 5);
  const [x0, x1] = [xTicks[0]!, xTicks[xTicks.length - 1]!];
  const [y0, y1] = [yTicks[0]!, yTicks[yTicks.length - 1]!];
  const sx = (x: number) => m.left + ((x - x0) / (x1 - x0 || 1)) * pw;
  const sy = (y: number) => m.top + ph - ((y - y0) / (y1 - y0 || 1)) * ph;
  const xLabels = tickLabels(xTicks);
  const yLabels = tickLabels(yTicks);

  // grid, ticks and labels
  out.push('<g class="grid" stroke="#e5e7eb" stroke-width="1">');
  for (const t of yTicks) out.push(`<line x1="${m.left}" y1="${f(sy(t))}" x2="${m.left + pw}" y2="${f(sy(t))}"/>`);
  for (const t of xTicks) out.push(`<line x1="${f(sx(t))}" y1="${m.top}" x2="${f(sx(t))}" y2="${m.top + ph}"/>`);
  out.push('</g>');
  out.push(`<g class="axes" stroke="#374151" stroke-width="1">`);
  out.push(`<line x1="${m.left}" y1="${m.top + ph}" x2="${m.left + pw}" y2="${m.top + ph}"/>`);
  out.push(`<line x1="${m.left}" y1="${m.top}" x2="${m.left}" y2="${m.top + ph}"/>`);
  for (const t of xTicks)
    out.push(`<line x1="${f(sx(t))}" y1="${m.top + ph}" x2="${f(sx(t))}" y2="${m.top + ph + 5}"/>`);
  for (const t of yTicks) out.push(`<line x1="${m.left - 5}" y1="${f(sy(t))}" x2="${m.left}" y2="${f(sy(t))}"/>`);
  out.push('</g><g class="tick-labels" fill="#374151">');
  xTicks.forEach((t, i) => {
    out.push(`<text x="${f(sx(t))}" y="${m.top + ph + 18}" text-anchor="middle">${xLabels[i]}</text>`);
  });
  yTicks.forEach((t, i) => {
    out.push(`<text x="${m.left - 8}" y="${f(sy(t) + 4)}" text-anchor="end">${yLabels[i]}</text>`);
  });
  out.push('</g>');
  if (opts.xLabel)
    out.push(`<text x="${m.left + pw / 2}" y="${H - 10}" text-anchor="middle">${escapeHtml(opts.xLabel)}</text>`);
  if (opts.yLabel)
    out.push(
      `<text x="14" y="${m.top + ph / 2}" text-anchor="middle" transform="rotate(-90 14 ${m.top + ph / 2})">${escapeHtml(opts.yLabel)}</text>`,
    );

  // series
  for (const s of clean) {
    if (s.points.length === 0) continue;
    const dash = s.dashed ? ' stroke-dasharray="6 4"' : '';
    if (s.points.length > 1) {
      const d = s.points.map(([x, y], i) => `${i ? 'L' : 'M'}${f(sx(x))} ${f(sy(y))}`).join(' ');
      out.push(`<path d="${d}" fill="none" stroke="${s.color}" stroke-width="2"${dash}/>`);
    }
    if (s.points.length <= 30)
      for (const [x, y] of s.points) out.push(`<circle cx="${f(sx(x))}" cy="${f(sy(y))}" r="3" fill="${s.color}"/>`);
  }

  // legend (top right, inside the plot)
  const lw = Math.max(...clean.map((s) => s.name.length)) * 7 + 40;
  const lx = m.left + pw - lw - 8;
  out.push(
    `<g class="legend"><rect x="${lx}" y="${m.top + 6}" width="${lw}" height="${clean.length * 18 + 8}" fill="#ffffff" fill-opacity="0.85" stroke="#d1d5db"/>`,
  );
  clean.forEach((s, i) => {
    const y = m.top + 20 + i * 18;
    const dash = s.dashed ? ' stroke-dasharray="6 4"' : '';
    out.push(
      `<line x1="${lx + 8}" y1="${y - 4}" x2="${lx + 30}" y2="${y - 4}" stroke="${s.color}" stroke-width="2"${dash}/>`,
    );
    out.push(`<text x="${lx + 36}" y="${y}">${escapeHtml(s.name)}</text>`);
  });
  out.push('</g></svg>');
  return out.join('');
}

/** The training loss and eval loss series of a metrics history. */
export function lossSeries(history: readonly MetricRecord[], prefix = ''): Series[] {
  const num = (v: unknown) => (typeof v === 'number' ? v : Number.NaN);
  const train = history.filter((r) => r.loss !== undefined).map((r) => [r.step, num(r.loss)] as const);
  const evalPts = history.filter((r) => r.eval_loss !== undefined).map((r) => [r.step, num(r.eval_loss)] as const);
  const out: Series[] = [{ name: `${prefix}training loss`, points: train }];
  if (evalPts.length) out.push({ name: `${prefix}eval loss`, points: evalPts, dashed: true });
  return out;
}

// ---------------------------------------------------------------------------------------------------------
// The page
// ---------------------------------------------------------------------------------------------------------

const CSS = `
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2rem auto;max-width:960px;padding:0 1rem;color:#111827;line-height:1.45}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #e5e7eb;padding-bottom:.2rem}
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #e5e7eb;padding:.3rem .6rem;text-align:right}
th:first-child,td:first-child{text-align:left}th{background:#f9fafb}
.better{font-weight:bold;color:#15803d}.muted{color:#6b7280}pre{background:#f9fafb;border:1px solid #e5e7eb;padding:.8rem;overflow-x:auto;font-size:.85rem}
.sample td{text-align:left;vertical-align:top;white-space:pre-wrap;font-family:ui-monospace,monospace;font-size:.8rem;max-width:28rem}
svg{max-width:100%;height:auto}`;

function table(headers: readonly string[], rows: readonly (readonly string[])[], cls = ''): string {
  const head = `<tr>${headers.map((h) => `<th>${escapeHtml(h)}</th>`).join('')}</tr>`;
  const body = rows.map((r) => `<tr>${r.map((c) => `<td>${c}</td>`).join('')}</tr>`).join('');
  return `<table${cls ? ` class="${cls}"` : ''}>${head}${body}</table>`;
}

/** The comparison table as HTML; the best value of each row is marked. */
export function comparisonHtml(c: Comparison): string {
  const rows = c.rows.map((r) => {
    const vals = r.values.filter((v): v is number => v !== null && Number.isFinite(v));
    const best =
      r.better && vals.length > 1 && new Set(vals).size > 1
        ? r.better === 'higher'
          ? Math.max(...vals)
          : Math.min(...vals)
        : null;
    return [
      escapeHtml(r.name),
      ...r.values.map((v) => {
        const s = escapeHtml(formatValue(v, r.format));
        return v !== null && v === best ? `<span class="better">${s}</span>` : s;
      }),
    ];
  });
  return table(['metric', ...c.columns], rows);
}

function samplesHtml(samples: readonly TaskSample[], columns: readonly string[]): string {
  const clip = (s: string, n = 600) => escapeHtml(s.length > n ? `${s.slice(0, n)}…` : s);
  const rows = samples.map((s) => [
    `${clip(s.prompt.length > 300 ? `…${s.prompt.slice(-300)}` : s.prompt)}${s.source ? `<br><span class="muted">${escapeHtml(s.source)}</span>` : ''}`,
    clip(s.reference),
    ...columns.map((c) => clip(s.outputs[c] ?? '')),
  ]);
  return table(['prompt', 'reference', ...columns], rows, 'sample');
}

function summaryRows(s: RunSummary, history: readonly MetricRecord[]): string[][] {
  const rows: string[][] = [];
  const add = (k: string, v: string) => rows.push([escapeHtml(k), escapeHtml(v)]);
  if (s.params) {
    add('parameters', formatValue(s.params.total, 'count'));
    add(
      'trainable parameters',
      `${formatValue(s.params.trainable, 'count')} (${((100 * s.params.trainable) / Math.max(1, s.params.total)).toFixed(3)}%)`,
    );
  }
  if (s.steps !== undefined) add('optimizer steps', String(s.steps) + (s.stoppedEarly ? ' (stopped early)' : ''));
  if (typeof s.finalLoss === 'number') add('final training loss', s.finalLoss.toFixed(4));
  if (typeof s.evalLoss === 'number')
    add('final eval loss (perplexity)', `${s.evalLoss.toFixed(4)} (${Math.exp(s.evalLoss).toFixed(3)})`);
  if (s.tokensPerSecond !== undefined) add('throughput', `${formatValue(s.tokensPerSecond, 'rate')} tokens/s`);
  const peak = s.peakBytes ?? Math.max(0, ...history.map((r) => (typeof r.peak_bytes === 'number' ? r.peak_bytes : 0)));
  if (peak) add('peak tensor memory', formatValue(peak, 'bytes'));
  if (s.wallSeconds !== undefined) add('wall time', formatValue(s.wallSeconds, 'seconds'));
  return rows;
}

/** The whole report page. */
export function renderReport(input: ReportInput): string {
  const history = input.history ?? [];
  const parts: string[] = [];
  parts.push(`<h1>${escapeHtml(input.title)}</h1>`);
  parts.push(`<p class="muted">lowrank report, ${escapeHtml(input.time ?? new Date().toISOString())}</p>`);
  if (input.facts?.length)
    parts.push(
      table(
        ['', ''],
        input.facts.map(([k, v]) => [escapeHtml(k), escapeHtml(v)]),
      ),
    );

  parts.push('<h2>Loss</h2>');
  parts.push(lineChartSvg(lossSeries(history), { xLabel: 'optimizer step', yLabel: 'loss (nats/token)' }));
  const lr = history.filter((r) => typeof r.lr === 'number').map((r) => [r.step, r.lr as number] as const);
  if (lr.length > 1)
    parts.push(
      lineChartSvg([{ name: 'learning rate', points: lr, color: '#6b7280' }], {
        height: 200,
        xLabel: 'optimizer step',
        yLabel: 'learning rate',
      }),
    );

  if (input.summary) {
    parts.push('<h2>Run summary</h2>');
    parts.push(table(['', ''], summaryRows(input.summary, history)));
  }

  const ev = input.evaluation;
  if (ev) {
    parts.push('<h2>Before and after</h2>');
    const how = ev.task
      ? `${ev.task.examples} example(s) from ${escapeHtml(ev.data)}, greedy decoding; metric ${escapeHtml(ev.task.metrics.join(', '))} (${escapeHtml(ev.task.reason)})${ev.task.markers.length ? `; markers ${ev.task.markers.map((mk) => `“${escapeHtml(mk)}”`).join(', ')}` : ''}`
      : `data ${escapeHtml(ev.data)}`;
    parts.push(`<p class="muted">${how}</p>`);
    parts.push(comparisonHtml(ev.comparison));
    if (ev.task?.referenceStyle !== null && ev.task?.referenceStyle !== undefined)
      parts.push(
        `<p class="muted">The references themselves show the markers in ${(100 * ev.task.referenceStyle).toFixed(1)}% of examples.</p>`,
      );
    if (ev.task?.samples.length) {
      parts.push('<h2>Samples</h2>');
      parts.push(samplesHtml(ev.task.samples, ev.task.columns));
    }
  }

  if (input.dataReport) {
    parts.push('<h2>Data report</h2>');
    parts.push(`<pre>${escapeHtml(input.dataReport)}</pre>`);
  }
  return `<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>${escapeHtml(input.title)}</title><style>${CSS}</style></head>
<body>
${parts.join('\n')}
</body></html>
`;
}

/** What `lowrank compare` shows: every method's curves on one chart, and the side-by-side table. */
export interface CompareReportInput {
  title: string;
  runs: { name: string; history: readonly MetricRecord[] }[];
  comparison: Comparison;
  task: TaskEvalResult | null;
  notes?: string[];
  time?: string;
}

/** The compare page: training (solid) and eval (dashed) loss of every method, then the table and samples. */
export function renderCompareReport(input: CompareReportInput): string {
  const series: Series[] = [];
  input.runs.forEach((r, i) => {
    const color = PALETTE[i % PALETTE.length]!;
    for (const s of lossSeries(r.history, `${r.name} `)) series.push({ ...s, color });
  });
  const parts = [
    `<h1>${escapeHtml(input.title)}</h1>`,
    `<p class="muted">lowrank compare, ${escapeHtml(input.time ?? new Date().toISOString())}</p>`,
    '<h2>Loss</h2>',
    lineChartSvg(series, { xLabel: 'optimizer step', yLabel: 'loss (nats/token)', height: 360 }),
    '<h2>Side by side</h2>',
    comparisonHtml(input.comparison),
    ...(input.notes ?? []).map((n) => `<p class="muted">${escapeHtml(n)}</p>`),
  ];
  if (input.task?.samples.length) parts.push('<h2>Samples</h2>', samplesHtml(input.task.samples, input.task.columns));
  return `<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>${escapeHtml(input.title)}</title><style>${CSS}</style></head>
<body>
${parts.join('\n')}
</body></html>
`;
}

export async function writeReport(file: string, input: ReportInput): Promise<void> {
  await writeFileAtomic(file, renderReport(input));
}

// ---------------------------------------------------------------------------------------------------------
// From an output dir
// ---------------------------------------------------------------------------------------------------------

/** The lines under a run report's title. */
export function runFacts(cfg: TrainConfig): [string, string][] {
  const facts: [string, string][] = [
    ['base model', cfg.base_model],
    ['method', cfg.adapter],
  ];
  if (cfg.adapter !== 'full') {
    const targets = cfg.lora_target_modules === 'all-linear' ? 'all linear layers' : cfg.lora_target_modules.join(', ');
    facts.push([
      'adapter',
      `r ${cfg.lora_r}, alpha ${cfg.lora_alpha}${cfg.use_rslora ? ' (rsLoRA)' : ''}, dropout ${cfg.lora_dropout}, on ${targets}${cfg.load_in_4bit ? `; base in 4 bits (${cfg.bnb_4bit_quant_type}${cfg.bnb_4bit_use_double_quant ? ', double quant' : ''})` : ''}`,
    ]);
  }
  facts.push(
    ['data', cfg.datasets.map((d) => `${d.path} (${d.type})`).join(', ')],
    [
      'optimisation',
      `lr ${cfg.learning_rate} ${cfg.lr_scheduler}, batch ${cfg.micro_batch_size} x ${cfg.gradient_accumulation_steps}, sequence_len ${cfg.sequence_len}, seed ${cfg.seed}`,
    ],
  );
  if (cfg.config_path) facts.push(['config', cfg.config_path]);
  return facts;
}

/** Reads metrics.jsonl; lines that do not parse are skipped (a report never fails on a damaged log). */
export function readMetrics(file: string): MetricRecord[] {
  if (!existsSync(file)) return [];
  const out: MetricRecord[] = [];
  for (const line of readFileSync(file, 'utf8').split('\n')) {
    if (!line.trim()) continue;
    try {
      const r = JSON.parse(line) as MetricRecord;
      if (r && typeof r.step === 'number') out.push(r);
    } catch {
      // skipped
    }
  }
  return out;
}

function readJson<T>(file: string): T | null {
  if (!existsSync(file)) return null;
  try {
    return JSON.parse(readFileSync(file, 'utf8')) as T;
  } catch {
    return null;
  }
}

/** Everything a run's output dir holds for its report. */
export function readRunReportInput(dir: string, facts: [string, string][] = []): ReportInput {
  const summary = readJson<RunSummary>(join(dir, 'train_results.json'));
  const dataReportFile = join(dir, 'data_report.txt');
  return {
    title: `Training run: ${dir}`,
    facts,
    summary,
    history: readMetrics(join(dir, 'metrics.jsonl')),
    dataReport: existsSync(dataReportFile) ? readFileSync(dataReportFile, 'utf8') : null,
    evaluation: readJson<EvalResults>(join(dir, 'eval_results.json')),
  };
}

/** Writes (or refreshes) dir/report.html from the run's files; returns its path. */
export async function writeRunReport(dir: string, facts: [string, string][] = []): Promise<string> {
  const file = join(dir, 'report.html');
  await writeReport(file, readRunReportInput(dir, facts));
  return file;
}
