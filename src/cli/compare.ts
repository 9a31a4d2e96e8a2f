// lowrank compare <config.yaml> --methods lora,dora,full[,qlora]
//
// Trains each method from one config (into output_dir/<method>, each in its own worker thread so its
// memory figures are its own), then evaluates them all on the config's eval split against the base model and
// prints one table: task quality, eval loss and perplexity, trainable parameters, the artefact's size on
// disk, peak memory, throughput and wall time, and each method's primary task score as a share of full
// fine-tuning's (the "LoRA reaches 95-99% of full fine-tuning" check). Written to output_dir/compare.json and
// compare.md as well.

import { existsSync, readdirSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import type { Command } from 'commander';
import { ConfigError, LowrankError } from '../core/errors.ts';
import { Rng } from '../core/rng.ts';
import { writeFileAtomic } from '../formats/atomic.ts';
import { configFromHF } from '../models/config.ts';
import type { LlamaForCausalLM } from '../models/llama.ts';
import { resolveModelPath } from '../models/load.ts';
import { initModel } from '../models/save.ts';
import { loadTokenizer } from '../tokenize/hf.ts';
import { setupAdapterTraining } from '../train/adapter-training.ts';
import { type AdapterKind, loadTrainConfig, type TrainConfig } from '../train/config.ts';
import { type RunSummary, readMetrics, renderCompareReport } from '../train/report.ts';
import {
  type Comparison,
  comparisonOf,
  evaluateTask,
  formatComparison,
  METRIC_LABELS,
  modelGenerator,
  primaryScore,
  type TaskEvalResult,
  type TaskGenerator,
  taskExamples,
} from '../train/task-eval.ts';
import { evaluateLoss } from '../train/trainer.ts';
import { collect, int } from './common.ts';
import { dataFromConfig, loadBase, loadTuned, parseMetric } from './eval.ts';
import { runTrainWorker } from './train.ts';

export const COMPARE_METHODS: readonly AdapterKind[] = ['lora', 'dora', 'qlora', 'full'];

interface CompareCliOptions {
  methods: string;
  set: string[];
  methodSet: string[];
  metric?: string;
  marker: string[];
  maxExamples?: string;
  maxNewTokens?: string;
  reuse?: boolean;
}

export function registerCompare(program: Command): void {
  program
    .command('compare')
    .description('train several methods from one config and compare quality and cost side by side')
    .argument('<config>', 'the training config (YAML)')
    .option('--methods <list>', `comma-separated methods: ${COMPARE_METHODS.join(', ')}`, 'lora,full')
    .option('--set <key=value>', 'override a config key for every method (repeatable)', collect, [])
    .option(
      '--method-set <method:key=value>',
      'override a key for one method, e.g. full:learning_rate=2e-5 (repeatable)',
      collect,
      [],
    )
    .option('--metric <metric>', 'task metric: auto, exact_match, accuracy, json_f1, style (default auto)')
    .option('--marker <text>', 'a string every styled output contains (repeatable; adds the style metric)', collect, [])
    .option('--max-examples <n>', 'examples for the task metrics (default 50)')
    .option('--max-new-tokens <n>', 'cap on generated tokens per example (default 256)')
    .option('--reuse', 'do not train a method whose output_dir/<method> already holds a finished run')
    .action(async (configPath: string, o: CompareCliOptions) => {
      const r = await runCompare(configPath, o, (l) => process.stderr.write(`${l}\n`));
      console.log(`\n${formatComparison(r.comparison)}`);
      for (const n of r.notes) console.log(`\n${n}`);
    });
}

export function parseMethods(list: string): AdapterKind[] {
  const methods = list
    .split(',')
    .map((m) => m.trim())
    .filter(Boolean);
  if (methods.length === 0) throw new ConfigError('--methods is empty; give e.g. --methods lora,full');
  for (const m of methods)
    if (!(COMPARE_METHODS as readonly string[]).includes(m))
      throw new ConfigError(`--methods: unknown method '${m}'; choose from ${COMPARE_METHODS.join(', ')}`);
  if (new Set(methods).size !== methods.length) throw new ConfigError(`--methods lists a method twice: ${list}`);
  return methods as AdapterKind[];
}

/** The --set overrides of one method: the shared ones, then `method:key=value` ones for it. */
function methodOverrides(method: AdapterKind, o: CompareCliOptions, outDir: string): string[] {
  const own: string[] = [];
  for (const s of o.methodSet) {
    const i = s.indexOf(':');
    if (i <= 0) throw new ConfigError(`--method-set ${s}: expected method:key=value, e.g. full:learning_rate=2e-5`);
    const m = s.slice(0, i);
    if (!(COMPARE_METHODS as readonly string[]).includes(m))
      throw new ConfigError(`--method-set ${s}: unknown method '${m}'`);
    if (m === method) own.push(s.slice(i + 1));
  }
  return [...o.set, `adapter=${method}`, `output_dir=${outDir}`, ...own];
}

/**
 * Checks that a method can be set up in this build, on a tiny random model (no data, no base model), so a
 * missing method fails before anything trains.
 */
export async function probeMethod(cfg: TrainConfig): Promise<void> {
  if (cfg.adapter === 'full') return;
  const config = configFromHF(
    {
      model_type: 'llama',
      vocab_size: 128,
      hidden_size: 64,
      intermediate_size: 128,
      num_hidden_layers: 1,
      num_attention_heads: 2,
      num_key_value_heads: 1,
      max_position_embeddings: 64,
      tie_word_embeddings: false,
    },
    'compare probe',
  );
  const model = initModel(config, 0);
  try {
    await setupAdapterTraining(model, cfg, '<probe>', new Rng(0));
  } catch (e) {
    const why = e instanceof Error ? e.message : String(e);
    throw new ConfigError(`compare: method '${cfg.adapter}' is not available in this build (${why})`);
  } finally {
    model.dispose();
  }
}

/** Bytes of the trained artefact in dir: its safetensors files and configs (not checkpoints or logs). */
export function artefactBytes(dir: string): number | null {
  if (!existsSync(dir)) return null;
  let total = 0;
  let any = false;
  for (const n of readdirSync(dir)) {
    if (!/\.safetensors$|^adapter_config\.json$|^config\.json$|\.safetensors\.index\.json$/.test(n)) continue;
    const p = join(dir, n);
    if (!statSync(p).isFile()) continue;
    total += statSync(p).size;
    if (n.endsWith('.safetensors')) any = true;
  }
  return any ? total : null;
}

interface MethodRun {
  method: AdapterKind;
  cfg: TrainConfig;
  summary: RunSummary;
  bytes: number | null;
}

export interface CompareResult {
  methods: AdapterKind[];
  comparison: Comparison;
  task: TaskEvalResult | null;
  runs: { method: AdapterKind; outputDir: string; summary: RunSummary; bytes: number | null }[];
  notes: string[];
}

export async function runCompare(
  configPath: string,
  o: CompareCliOptions,
  log: (l: string) => void,
): Promise<CompareResult> {
  const methods = parseMethods(o.methods);
  const metric = parseMetric(o.metric);
  const maxExamples = int('max-examples', o.maxExamples, 50);
  const maxNewTokens = int('max-new-tokens', o.maxNewTokens, 256);
  const root = loadTrainConfig(configPath, o.set).output_dir;

  // every method's config first: a bad override or a missing method fails before any training
  const cfgs = new Map<AdapterKind, { cfg: TrainConfig; overrides: string[] }>();
  for (const m of methods) {
    const overrides = methodOverrides(m, o, join(root, m));
    const cfg = loadTrainConfig(configPath, overrides);
    await probeMethod(cfg);
    cfgs.set(m, { cfg, overrides });
  }

  const runs: MethodRun[] = [];
  for (const m of methods) {
    const { cfg, overrides } = cfgs.get(m)!;
    const done = join(cfg.output_dir, 'train_results.json');
    let summary: RunSummary;
    if (o.reuse && existsSync(done)) {
      log(`${m}: reusing the finished run in ${cfg.output_dir}`);
      summary = JSON.parse(readFileSync(done, 'utf8')) as RunSummary;
    } else {
      log(`${m}: training into ${cfg.output_dir}`);
      try {
        summary = (await runTrainWorker(configPath, overrides, false)) as RunSummary;
      } catch (e) {
        if (e instanceof LowrankError) throw new LowrankError(`compare: training with ${m} failed: ${e.message}`);
        throw e;
      }
    }
    runs.push({ method: m, cfg, summary, bytes: artefactBytes(cfg.output_dir) });
  }

  // evaluation: one base model, then each method's model in turn
  const first = runs[0]!.cfg;
  const basePath = await resolveModelPath(first.base_model);
  const tok = loadTokenizer(basePath);
  const data = dataFromConfig(first, tok, maxExamples);
  log(`evaluating on ${data.examples.length} example(s) from ${data.source}`);
  const tasks = taskExamples(data.examples, tok, maxExamples);
  const columns = ['base', ...methods];
  const losses: Record<string, { loss: number; tokens: number }> = {};
  const generators: Record<string, TaskGenerator> = {};
  const withModel =
    (name: string, load: () => Promise<LlamaForCausalLM>): TaskGenerator =>
    async (requests) => {
      const model = await load();
      try {
        losses[name] = evaluateLoss(model, data.loader);
        log(`${name}: eval loss ${losses[name]!.loss.toFixed(4)}; generating ${requests.length} completion(s)`);
        return requests.length ? modelGenerator(model, tok)(requests) : [];
      } finally {
        model.dispose();
      }
    };
  generators.base = withModel('base', () => loadBase(basePath));
  for (const r of runs) generators[r.method] = withModel(r.method, () => loadTuned(basePath, r.cfg.output_dir, r.cfg));
  let task: TaskEvalResult | null = null;
  if (tasks.length > 0)
    task = await evaluateTask(tasks, generators, { metric, markers: o.marker, maxExamples, maxNewTokens });
  else for (const c of columns) await generators[c]!([]);

  const comparison = comparisonOf(columns, task, losses);
  const notes: string[] = [];
  const pick = <T>(f: (r: MethodRun) => T | null | undefined): (T | null)[] => [
    null,
    ...methods.map((m) => f(runs.find((r) => r.method === m)!) ?? null),
  ];
  comparison.rows.push(
    { name: 'trainable parameters', values: pick((r) => r.summary.params?.trainable), format: 'count', better: null },
    {
      name: 'trainable share',
      values: pick((r) => (r.summary.params ? r.summary.params.trainable / r.summary.params.total : null)),
      format: 'percent',
      better: null,
    },
    { name: 'artefact on disk', values: pick((r) => r.bytes), format: 'bytes', better: 'lower' },
    { name: 'peak tensor memory', values: pick((r) => r.summary.peakBytes), format: 'bytes', better: 'lower' },
    { name: 'tokens/s', values: pick((r) => r.summary.tokensPerSecond), format: 'rate', better: 'higher' },
    { name: 'wall time', values: pick((r) => r.summary.wallSeconds), format: 'seconds', better: 'lower' },
  );
  if (task && methods.includes('full')) {
    const primary = primaryScore(task.metrics);
    const full = task.scores.full?.[primary];
    comparison.rows.push({
      name: `${METRIC_LABELS[primary]}: share of full`,
      values: columns.map((c) =>
        c === 'base' || full === undefined || !(full > 0) ? null : (task.scores[c]?.[primary] ?? 0) / full,
      ),
      format: 'percent',
      better: 'higher',
    });
    if (!(full !== undefined && full > 0))
      notes.push(`full fine-tuning scored 0 on ${METRIC_LABELS[primary]}: no share of it to show`);
  }
  if (losses.full) {
    comparison.rows.push({
      name: 'eval loss gap to full',
      values: columns.map((c) => (losses[c] && c !== 'base' ? losses[c]!.loss - losses.full!.loss : null)),
      format: 'number',
      better: 'lower',
    });
  }
  notes.push(
    `Runs: ${runs.map((r) => `${r.method} -> ${r.cfg.output_dir}`).join('; ')}. Peak tensor memory counts the tensors the trainer holds (weights, adapters, gradients, optimizer state, activations).`,
  );

  const result: CompareResult = {
    methods,
    comparison,
    task,
    runs: runs.map((r) => ({
      method: r.method,
      outputDir: r.cfg.output_dir,
      summary: { ...r.summary, history: undefined },
      bytes: r.bytes,
    })),
    notes,
  };
  await writeFileAtomic(join(root, 'compare.json'), `${JSON.stringify(result, null, 2)}\n`);
  await writeFileAtomic(join(root, 'compare.md'), `${formatComparison(comparison)}\n\n${notes.join('\n\n')}\n`);
  await writeFileAtomic(
    join(root, 'compare.html'),
    renderCompareReport({
      title: `lowrank compare: ${methods.join(', ')}`,
      runs: runs.map((r) => ({ name: r.method, history: readMetrics(join(r.cfg.output_dir, 'metrics.jsonl')) })),
      comparison,
      task,
      notes,
    }),
  );
  log(`wrote ${join(root, 'compare.json')}, compare.md and compare.html`);
  return result;
}
