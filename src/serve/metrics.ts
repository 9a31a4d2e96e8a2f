// Prometheus metrics in the text exposition format (version 0.0.4): counters, gauges and histograms kept on
// the HTTP thread, plus a snapshot of the engine worker's state (queue, KV cache, adapter cache) rendered
// at scrape time.

import type { WorkerStats } from './protocol.ts';

type Labels = Record<string, string>;

function esc(v: string): string {
  return v.replace(/\\/g, '\\\\').replace(/\n/g, '\\n').replace(/"/g, '\\"');
}

function labelText(l: Labels): string {
  const keys = Object.keys(l);
  return keys.length === 0 ? '' : `{${keys.map((k) => `${k}="${esc(l[k]!)}"`).join(',')}}`;
}

function fmt(v: number): string {
  return Number.isFinite(v) ? String(v) : v > 0 ? '+Inf' : v < 0 ? '-Inf' : 'NaN';
}

interface Metric {
  render(out: string[]): void;
}

export class Counter implements Metric {
  private readonly values = new Map<string, { labels: Labels; v: number }>();
  constructor(
    readonly name: string,
    readonly help: string,
  ) {}
  inc(labels: Labels = {}, by = 1): void {
    const k = labelText(labels);
    const e = this.values.get(k);
    if (e) e.v += by;
    else this.values.set(k, { labels, v: by });
  }
  get(labels: Labels = {}): number {
    return this.values.get(labelText(labels))?.v ?? 0;
  }
  render(out: string[]): void {
    out.push(`# HELP ${this.name} ${this.help}`, `# TYPE ${this.name} counter`);
    for (const { labels, v } of this.values.values()) out.push(`${this.name}${labelText(labels)} ${fmt(v)}`);
  }
}

export class Histogram implements Metric {
  private readonly series = new Map<string, { labels: Labels; counts: number[]; sum: number; n: number }>();
  constructor(
    readonly name: string,
    readonly help: string,
    readonly buckets: readonly number[],
  ) {}
  observe(v: number, labels: Labels = {}): void {
    const k = labelText(labels);
    let s = this.series.get(k);
    if (!s) {
      s = { labels, counts: new Array(this.buckets.length).fill(0), sum: 0, n: 0 };
      this.series.set(k, s);
    }
    for (let i = 0; i < this.buckets.length; i++) if (v <= this.buckets[i]!) s.counts[i]!++;
    s.sum += v;
    s.n++;
  }
  count(labels: Labels = {}): number {
    return this.series.get(labelText(labels))?.n ?? 0;
  }
  render(out: string[]): void {
    out.push(`# HELP ${this.name} ${this.help}`, `# TYPE ${this.name} histogram`);
    for (const s of this.series.values()) {
      this.buckets.forEach((b, i) => {
        out.push(`${this.name}_bucket${labelText({ ...s.labels, le: fmt(b) })} ${s.counts[i]}`);
      });
      out.push(`${this.name}_bucket${labelText({ ...s.labels, le: '+Inf' })} ${s.n}`);
      out.push(`${this.name}_sum${labelText(s.labels)} ${fmt(s.sum)}`);
      out.push(`${this.name}_count${labelText(s.labels)} ${s.n}`);
    }
  }
}

const LATENCY = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120];
const PER_TOKEN = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1];

function gauge(out: string[], name: string, help: string, v: number, labels: Labels = {}): void {
  out.push(`# HELP ${name} ${help}`, `# TYPE ${name} gauge`, `${name}${labelText(labels)} ${fmt(v)}`);
}

function counterLine(out: string[], name: string, help: string, rows: [Labels, number][]): void {
  out.push(`# HELP ${name} ${help}`, `# TYPE ${name} counter`);
  for (const [l, v] of rows) out.push(`${name}${labelText(l)} ${fmt(v)}`);
}

/** The server's metrics. Labels stay low-cardinality: route and status, and the model name. */
export class ServerMetrics {
  readonly requests = new Counter('lowrank_requests_total', 'HTTP requests by route and status code.');
  readonly rejected = new Counter(
    'lowrank_requests_rejected_total',
    'Requests turned away before the engine, by reason.',
  );
  readonly promptTokens = new Counter('lowrank_prompt_tokens_total', 'Prompt tokens of finished requests, by model.');
  readonly generationTokens = new Counter('lowrank_generation_tokens_total', 'Generated tokens, by model.');
  readonly cancelled = new Counter('lowrank_requests_cancelled_total', 'Requests cancelled (client gone or timeout).');
  readonly requestLatency = new Histogram(
    'lowrank_request_duration_seconds',
    'Time from arrival to the last byte.',
    LATENCY,
  );
  readonly ttft = new Histogram(
    'lowrank_time_to_first_token_seconds',
    'Time from arrival to the first token.',
    LATENCY,
  );
  readonly tpot = new Histogram(
    'lowrank_time_per_output_token_seconds',
    'Decode time per token after the first.',
    PER_TOKEN,
  );
  readonly queueTime = new Histogram(
    'lowrank_queue_time_seconds',
    'Time waiting for admission into the batch.',
    LATENCY,
  );

  render(stats: WorkerStats | null, http: { inflight: number; waiting: number }): string {
    const out: string[] = [];
    for (const m of [this.requests, this.rejected, this.promptTokens, this.generationTokens, this.cancelled])
      m.render(out);
    for (const h of [this.requestLatency, this.ttft, this.tpot, this.queueTime]) h.render(out);
    gauge(out, 'lowrank_requests_inflight', 'Requests submitted to the engine and not finished.', http.inflight);
    gauge(out, 'lowrank_queue_depth', 'Requests waiting for admission into the running batch.', http.waiting);
    if (stats) {
      const e = stats.engine;
      const a = stats.adapters;
      gauge(out, 'lowrank_running_sequences', 'Sequences in the running batch.', e.running);
      gauge(out, 'lowrank_kv_cache_used_tokens', 'KV cache positions reserved by running sequences.', e.kvUsedTokens);
      gauge(out, 'lowrank_kv_cache_budget_tokens', 'KV cache positions the budget holds.', e.kvBudgetTokens);
      gauge(
        out,
        'lowrank_kv_cache_usage_ratio',
        'Reserved share of the KV cache budget.',
        e.kvUsedTokens / e.kvBudgetTokens,
      );
      counterLine(out, 'lowrank_engine_steps_total', 'Engine iterations (decode and prefill forwards).', [
        [{}, e.steps],
      ]);
      gauge(out, 'lowrank_adapters_resident', 'Adapter sets resident in batch slots.', a.resident);
      gauge(out, 'lowrank_adapters_resident_max', 'Resident adapter slots (--max-loras).', a.maxResident);
      gauge(out, 'lowrank_adapters_host', 'Adapters held in host memory.', a.host);
      gauge(out, 'lowrank_adapters_host_bytes', 'Bytes of adapters held in host memory.', a.hostBytes);
      counterLine(out, 'lowrank_adapter_cache_hits_total', 'Adapter lookups served from a cache tier.', [
        [{ tier: 'resident' }, a.hitsResident],
        [{ tier: 'host' }, a.hitsHost],
      ]);
      counterLine(out, 'lowrank_adapter_loads_total', 'Adapters read from disk.', [[{}, a.loads]]);
      counterLine(out, 'lowrank_adapter_evictions_total', 'Adapters evicted, by tier.', [
        [{ tier: 'resident' }, a.evictionsResident],
        [{ tier: 'host' }, a.evictionsHost],
      ]);
      gauge(
        out,
        'lowrank_engine_memory_bytes',
        'Tensor memory held by the engine (weights, caches, adapters).',
        stats.memoryBytes,
      );
    }
    return `${out.join('\n')}\n`;
  }
}
