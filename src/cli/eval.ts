// lowrank eval <config.yaml> | --model M [--adapter A] --data D [--type ...] [--metric ...] [--marker S]...
//
// Eval loss / perplexity (the trainer's evaluateLoss, over the masked tokens) and task metrics by greedy
// generation (src/train/task-eval.ts), for the base model and, side by side, the fine-tuned one: an adapter
// dir, or a full model dir. With a config, the examples are its evaluation split (val_set_size or
// test_datasets; the first training examples when there is none), the fine-tuned model is what output_dir
// holds, and the results go to output_dir/eval_results.json and report.html.

import { existsSync, statSync } from 'node:fs';
import { join, resolve } from 'node:path';
import type { Command } from 'commander';
import { ConfigError } from '../core/errors.ts';
import { writeFileAtomic } from '../formats/atomic.ts';
import type { LlamaForCausalLM } from '../models/llama.ts';
import { loadModel, resolveModelPath } from '../models/load.ts';
import { loadAdapter } from '../peft/lora/io.ts';
import type { LoraModel } from '../peft/lora/model.ts';
import { loadModelQuantized } from '../quant/load.ts';
import { loadTokenizer } from '../tokenize/hf.ts';
import type { Tokenizer } from '../tokenize/tokenizer.ts';
import { type DatasetType, datasetConfig, loadTrainConfig, type TrainConfig } from '../train/config.ts';
import { buildDataset, createLoaders, DataLoader, type Example, exampleRows, prepareData } from '../train/data.ts';
import { type EvalResults, runFacts, writeRunReport } from '../train/report.ts';
import { textTokenizer } from '../train/setup.ts';
import {
  comparisonOf,
  evaluateTask,
  formatComparison,
  modelGenerator,
  TASK_METRIC_CHOICES,
  type TaskEvalResult,
  type TaskGenerator,
  type TaskMetricChoice,
  type TaskRequest,
  taskExamples,
} from '../train/task-eval.ts';
import { evaluateLoss } from '../train/trainer.ts';
import { collect, int } from './common.ts';

interface EvalCliOptions {
  set: string[];
  model?: string;
  adapter?: string;
  data?: string;
  type?: string;
  metric?: string;
  marker: string[];
  maxExamples?: string;
  maxNewTokens?: string;
  sequenceLen?: string;
  batchSize?: string;
  loss: boolean;
  task: boolean;
  out?: string;
}

export function registerEval(program: Command): void {
  program
    .command('eval')
    .description('eval loss, perplexity and task metrics of a model, base vs fine-tuned side by side')
    .argument('[config]', 'a training config: evaluates its output_dir against its base_model on its eval split')
    .option('--set <key=value>', 'override a config key (repeatable)', collect, [])
    .option('--model <model>', 'the base model: dir, .gguf or hf://owner/repo (instead of a config)')
    .option('--adapter <dir>', 'a PEFT adapter dir or a fine-tuned model dir to compare with the base')
    .option('--data <file>', 'evaluation data (.jsonl, .json, .csv, .tsv)')
    .option('--type <type>', 'the data format: completion, alpaca, chat, text, input_output (default completion)')
    .option('--metric <metric>', `task metric: ${TASK_METRIC_CHOICES.join(', ')} (default auto)`)
    .option('--marker <text>', 'a string every styled output contains (repeatable; adds the style metric)', collect, [])
    .option('--max-examples <n>', 'examples for the task metrics (default 50)')
    .option('--max-new-tokens <n>', 'cap on generated tokens per example (default 256)')
    .option('--sequence-len <n>', 'tokens per example without a config (default 512)')
    .option('--batch-size <n>', 'prompts generated together, rows per loss batch (default 8)')
    .option('--no-loss', 'skip eval loss and perplexity')
    .option('--no-task', 'skip the task metrics (no generation)')
    .option('--out <file>', 'also write the results as JSON to this file')
    .action(async (configPath: string | undefined, o: EvalCliOptions) => {
      const r = await runEval(configPath, o, (l) => process.stderr.write(`${l}\n`));
      console.log(formatComparison(r.comparison));
    });
}

export function parseMetric(v: string | undefined): TaskMetricChoice {
  if (v === undefined) return 'auto';
  if (!(TASK_METRIC_CHOICES as readonly string[]).includes(v))
    throw new ConfigError(`--metric must be one of ${TASK_METRIC_CHOICES.join(', ')}, got '${v}'`);
  return v as TaskMetricChoice;
}

const DATA_TYPES = ['completion', 'alpaca', 'chat', 'chat_template', 'text', 'input_output'];

/** What a fine-tuned artefact dir holds. */
export function artefactKind(dir: string): 'adapter' | 'model' | null {
  if (dir.endsWith('.gguf') && existsSync(dir)) return 'model';
  if (!existsSync(dir) || !statSync(dir).isDirectory()) return null;
  if (existsSync(join(dir, 'adapter_config.json'))) return 'adapter';
  if (existsSync(join(dir, 'config.json'))) return 'model';
  return null;
}

/** Loads a PEFT adapter dir onto the model as its one active adapter ('default', as PEFT names it). */
export function attachAdapter(model: LlamaForCausalLM, dir: string): LoraModel {
  return loadAdapter(model, dir, {
    adapterName: 'default',
    activate: true,
    onWarning: (m) => process.stderr.write(`warning: ${m}\n`),
  });
}

/** The base model as a run trained on it: in 4 bits when the config loads it so (QLoRA), else as stored. */
export async function loadBase(basePath: string, cfg: TrainConfig | null = null): Promise<LlamaForCausalLM> {
  if (!cfg?.load_in_4bit) return (await loadModel(basePath)).model;
  const { model } = await loadModelQuantized(basePath, {
    quant_method: 'bitsandbytes',
    load_in_4bit: true,
    bnb_4bit_quant_type: cfg.bnb_4bit_quant_type,
    bnb_4bit_use_double_quant: cfg.bnb_4bit_use_double_quant,
    bnb_4bit_compute_dtype: cfg.bnb_4bit_compute_dtype === 'auto' ? 'float32' : cfg.bnb_4bit_compute_dtype,
  });
  return model;
}

/**
 * Loads the fine-tuned model of an artefact: a PEFT adapter applied to (another copy of) the base, loaded as
 * the run's config says, or a full model dir.
 */
export async function loadTuned(
  basePath: string,
  artefact: string,
  cfg: TrainConfig | null = null,
): Promise<LlamaForCausalLM> {
  const kind = artefactKind(artefact);
  if (kind === 'model') return (await loadModel(artefact)).model;
  if (kind === 'adapter') {
    const model = await loadBase(basePath, cfg);
    attachAdapter(model, artefact);
    return model;
  }
  throw new ConfigError(
    `${artefact}: neither an adapter (adapter_config.json) nor a model dir (config.json); train first, or pass --adapter`,
  );
}

/** The evaluation examples and a loss loader over them. */
interface EvalData {
  examples: Example[];
  loader: DataLoader;
  /** Describes where the examples came from. */
  source: string;
}

function loaderOver(examples: Example[], batch: number, padId: number): DataLoader {
  return new DataLoader(exampleRows(examples), { microBatchSize: batch, seed: 0, shuffle: false, padTo: null, padId });
}

function dataFromFile(
  file: string,
  type: DatasetType,
  tok: Tokenizer,
  sequenceLen: number,
  batch: number,
  chatTemplate: string | null,
): EvalData {
  const spec = datasetConfig({ path: resolve(file), type });
  const { examples } = buildDataset(
    spec,
    0,
    textTokenizer(tok, chatTemplate),
    { sequenceLen, trainOnInputs: false, excessLength: 'truncate' },
    'eval',
  );
  if (examples.length === 0) throw new ConfigError(`${file}: no usable example (every record was dropped)`);
  return { examples, loader: loaderOver(examples, batch, tok.padId ?? tok.eosId ?? 0), source: file };
}

export function dataFromConfig(cfg: TrainConfig, tok: Tokenizer, maxExamples: number): EvalData {
  const data = prepareData(cfg, textTokenizer(tok, cfg.chat_template_jinja));
  const padId = tok.padId ?? tok.eosId ?? 0;
  if (data.eval.length > 0) {
    const loader = createLoaders(data, cfg, { padId }).eval!;
    const source =
      cfg.test_datasets.length > 0
        ? cfg.test_datasets.map((d) => d.path).join(', ')
        : `val_set_size ${cfg.val_set_size} of ${cfg.datasets.map((d) => d.path).join(', ')}`;
    return { examples: data.eval, loader, source };
  }
  const examples = data.train.slice(0, maxExamples);
  return {
    examples,
    loader: loaderOver(examples, cfg.eval_batch_size, padId),
    source: `the first ${examples.length} training examples (the config has no eval split: set val_set_size or test_datasets)`,
  };
}

/** Work on one model: its eval loss and its outputs for the requests. */
export type ModelWork = (name: string, model: LlamaForCausalLM, requests: readonly TaskRequest[]) => string[];

/**
 * Generators for the base model and the fine-tuned one. An adapter is loaded onto one copy of the base, which
 * serves the base column with its adapters disabled; a full model dir is loaded after the base is released,
 * so two models never need to fit at once.
 */
export function contenders(
  basePath: string,
  artefact: string | null,
  tunedName: string | null,
  work: ModelWork,
  cfg: TrainConfig | null = null,
): Record<string, TaskGenerator> {
  const gens: Record<string, TaskGenerator> = {};
  if (artefact && tunedName && artefactKind(artefact) === 'adapter') {
    let shared: Promise<{ model: LlamaForCausalLM; pm: LoraModel }> | null = null;
    const load = () =>
      (shared ??= loadBase(basePath, cfg).then((model) => ({ model, pm: attachAdapter(model, artefact) })));
    gens.base = async (requests) => {
      const { model, pm } = await load();
      return pm.withAdaptersDisabled(() => work('base', model, requests));
    };
    gens[tunedName] = async (requests) => {
      const { model } = await load();
      try {
        return work(tunedName, model, requests);
      } finally {
        model.dispose();
      }
    };
    return gens;
  }
  const once = (name: string, loadFn: () => Promise<LlamaForCausalLM>): TaskGenerator => {
    return async (requests) => {
      const model = await loadFn();
      try {
        return work(name, model, requests);
      } finally {
        model.dispose();
      }
    };
  };
  gens.base = once('base', () => loadBase(basePath, cfg));
  if (artefact && tunedName) gens[tunedName] = once(tunedName, () => loadTuned(basePath, artefact, cfg));
  return gens;
}

export interface EvalRun extends EvalResults {
  outputDir: string | null;
}

/** The command's work, callable from tests and other commands. */
export async function runEval(
  configPath: string | undefined,
  o: EvalCliOptions,
  log: (l: string) => void,
): Promise<EvalRun> {
  // a config's eval_* keys are the defaults for the flags
  const fromCfg = configPath ? loadTrainConfig(configPath, o.set) : null;
  if (fromCfg && o.metric === undefined) {
    if (fromCfg.eval_metric === 'none') o.task = false;
    else o.metric = fromCfg.eval_metric;
  }
  if (fromCfg && o.marker.length === 0) o.marker = [...fromCfg.eval_markers];
  const metric = parseMetric(o.metric);
  const maxExamples = int('max-examples', o.maxExamples, fromCfg?.eval_max_examples ?? 50);
  const maxNewTokens = int('max-new-tokens', o.maxNewTokens, 256);
  const batch = int('batch-size', o.batchSize, 8);
  if (maxExamples < 1 || maxNewTokens < 1 || batch < 1)
    throw new ConfigError('--max-examples, --max-new-tokens and --batch-size must be at least 1');
  if (o.type !== undefined && !DATA_TYPES.includes(o.type))
    throw new ConfigError(`--type must be one of ${DATA_TYPES.join(', ')}, got '${o.type}'`);
  if (!o.loss && !o.task) throw new ConfigError('--no-loss and --no-task leave nothing to evaluate');

  let cfg: TrainConfig | null = null;
  let baseSource: string;
  if (configPath) {
    cfg = fromCfg!;
    baseSource = o.model ?? cfg.base_model;
  } else {
    if (!o.model) throw new ConfigError('give a training config, or --model M --data D');
    if (!o.data) throw new ConfigError('--data is required without a config (the evaluation examples)');
    if (o.set.length) throw new ConfigError('--set needs a config');
    baseSource = o.model;
  }
  const basePath = await resolveModelPath(baseSource);
  const tok = loadTokenizer(basePath);

  // what to compare with the base
  let artefact: string | null = o.adapter ? resolve(o.adapter) : null;
  if (!artefact && cfg && artefactKind(cfg.output_dir)) artefact = cfg.output_dir;
  if (cfg && !artefact)
    log(`note: ${cfg.output_dir} holds no trained adapter or model yet; evaluating the base model only`);
  const tunedName = artefact ? (artefactKind(artefact) === 'adapter' ? 'adapter' : 'fine-tuned') : null;
  if (artefact && !artefactKind(artefact))
    throw new ConfigError(
      `--adapter ${o.adapter}: neither an adapter dir (adapter_config.json) nor a model dir (config.json)`,
    );

  const data = o.data
    ? dataFromFile(
        o.data,
        (o.type === 'chat_template' ? 'chat' : (o.type ?? 'completion')) as DatasetType,
        tok,
        cfg?.sequence_len ?? int('sequence-len', o.sequenceLen, 512),
        batch,
        cfg?.chat_template_jinja ?? null,
      )
    : dataFromConfig(cfg!, tok, maxExamples);
  log(`evaluating on ${data.examples.length} example(s) from ${data.source}`);
  const tasks = o.task ? taskExamples(data.examples, tok, maxExamples) : [];

  const columns = ['base', ...(tunedName ? [tunedName] : [])];
  const losses: EvalResults['losses'] = {};
  const generators = contenders(
    basePath,
    artefact,
    tunedName,
    (name, model, requests) => {
      if (o.loss) {
        const l = evaluateLoss(model, data.loader);
        losses[name] = { loss: l.loss, tokens: l.tokens };
        log(
          `${name}: eval loss ${l.loss.toFixed(4)} (perplexity ${Math.exp(l.loss).toFixed(3)}) over ${l.tokens} tokens`,
        );
      }
      if (requests.length === 0) return [];
      log(`${name}: generating ${requests.length} completion(s)`);
      return modelGenerator(model, tok, { batchSize: batch })(requests);
    },
    cfg,
  );

  let task: TaskEvalResult | null = null;
  if (o.task && tasks.length > 0) {
    task = await evaluateTask(tasks, generators, { metric, markers: o.marker, maxExamples, maxNewTokens });
    log(
      `task metrics: ${task.metrics.join(', ')} (${task.reason}) on ${task.examples} example(s), ${task.seconds.toFixed(1)} s`,
    );
  } else {
    if (o.task) log('note: no example has a prompt before its trained tokens; task metrics skipped');
    for (const c of columns) await generators[c]!([]);
  }
  const results: EvalRun = {
    columns,
    comparison: comparisonOf(columns, task, losses),
    task,
    losses,
    data: data.source,
    time: new Date().toISOString(),
    outputDir: cfg?.output_dir ?? null,
  };
  const json = `${JSON.stringify({ ...results, outputDir: undefined }, null, 2)}\n`;
  if (o.out) await writeFileAtomic(resolve(o.out), json);
  // the run's own results (not those of another --adapter) go beside it, into its report
  if (cfg && existsSync(cfg.output_dir) && (artefact === null || artefact === cfg.output_dir)) {
    await writeFileAtomic(join(cfg.output_dir, 'eval_results.json'), json);
    const report = await writeRunReport(cfg.output_dir, runFacts(cfg));
    log(`wrote ${join(cfg.output_dir, 'eval_results.json')} and ${report}`);
  }
  return results;
}
