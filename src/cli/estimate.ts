// lowrank estimate --model M|config.json --method full|lora|qlora [--seq --batch --rank ...] [--explain]:
// the training memory breakdown of src/train/estimate.ts as a table (and its formulas with --explain).

import { existsSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import type { Command } from 'commander';
import { ConfigError } from '../core/errors.ts';
import { readGguf } from '../formats/gguf.ts';
import { configFromGguf, configToHF } from '../models/config.ts';
import { resolveModelPath } from '../models/load.ts';
import {
  type EstimateMethod,
  type EstimateOptions,
  estimateMemory,
  formatBytes,
  type MemoryEstimate,
} from '../train/estimate.ts';
import { int, num } from './common.ts';

interface EstimateCliOptions {
  model: string;
  method: string;
  seq?: string;
  batch?: string;
  rank?: string;
  targets?: string;
  gradientCheckpointing?: boolean;
  optimizer?: string;
  weightDtype?: string;
  attention?: string;
  quantType?: string;
  doubleQuant?: boolean;
  blocksize?: string;
  masterWeights?: boolean;
  overheadGb?: string;
  explain?: boolean;
  json?: boolean;
}

/** The config.json object of a model argument: a config.json file, an HF dir, a .gguf file or hf://. */
export async function readModelConfigJson(source: string): Promise<{ where: string; json: unknown }> {
  if (source.endsWith('.json') && existsSync(source) && statSync(source).isFile()) {
    try {
      return { where: source, json: JSON.parse(readFileSync(source, 'utf8')) };
    } catch (e) {
      throw new ConfigError(`${source}: invalid JSON: ${(e as Error).message}`);
    }
  }
  const path = await resolveModelPath(source);
  if (statSync(path).isDirectory()) {
    const file = join(path, 'config.json');
    if (!existsSync(file)) throw new ConfigError(`${path}: no config.json (is this a Hugging Face model dir?)`);
    try {
      return { where: file, json: JSON.parse(readFileSync(file, 'utf8')) };
    } catch (e) {
      throw new ConfigError(`${file}: invalid JSON: ${(e as Error).message}`);
    }
  }
  if (path.endsWith('.gguf')) {
    const g = readGguf(path);
    try {
      const cfg = configFromGguf(g.metadata as Record<string, unknown>, path);
      cfg.tie_word_embeddings = !g.tensors.some((t) => t.name === 'output.weight');
      return { where: path, json: configToHF(cfg) };
    } finally {
      g.close();
    }
  }
  throw new ConfigError(`--model '${source}': expected a config.json, a model dir, a .gguf file or hf://owner/repo`);
}

function oneOf<T extends string>(flag: string, v: string | undefined, allowed: readonly T[]): T | undefined {
  if (v === undefined) return undefined;
  if (!allowed.includes(v as T)) throw new ConfigError(`--${flag} must be one of ${allowed.join(', ')}, got '${v}'`);
  return v as T;
}

/** Builds the estimate options from the CLI flags (ConfigError names a bad flag). */
export function estimateOptionsFromCli(o: EstimateCliOptions): EstimateOptions {
  const method = oneOf<EstimateMethod>('method', o.method, ['full', 'lora', 'qlora'])!;
  const positive = (flag: string, v: string | undefined, def: number) => {
    const n = int(flag, v, def);
    if (n <= 0) throw new ConfigError(`--${flag} must be a positive integer, got '${v}'`);
    return n;
  };
  const overheadGb = num('overhead-gb', o.overheadGb, 0);
  if (overheadGb < 0) throw new ConfigError(`--overhead-gb must be >= 0, got '${o.overheadGb}'`);
  return {
    method,
    seqLen: positive('seq', o.seq, 512),
    batchSize: positive('batch', o.batch, 1),
    rank: positive('rank', o.rank, 16),
    targetModules:
      o.targets === undefined || o.targets === 'all-linear'
        ? 'all-linear'
        : o.targets
            .split(',')
            .map((s) => s.trim())
            .filter(Boolean),
    gradientCheckpointing: o.gradientCheckpointing ?? false,
    optimizer: oneOf('optimizer', o.optimizer, ['adamw', 'adamw8bit', 'sgd'] as const),
    weightDtype: oneOf('weight-dtype', o.weightDtype, ['bf16', 'f32'] as const),
    attention: oneOf('attention', o.attention, ['flash', 'eager'] as const),
    quantType: oneOf('quant-type', o.quantType, ['nf4', 'fp4'] as const),
    doubleQuant: o.doubleQuant ?? true,
    blocksize: o.blocksize === undefined ? undefined : positive('blocksize', o.blocksize, 64),
    masterWeights: o.masterWeights ?? true,
    overheadBytes: overheadGb * 1e9,
  };
}

/** The breakdown table (Markdown, readable in a terminal). */
export function formatEstimate(e: MemoryEstimate, o: EstimateOptions): string {
  const d = e.detail;
  const rows: [string, number | null][] = [['weights', e.weights]];
  if (e.method === 'qlora') {
    rows.push(
      ['  4-bit linears', d.quantizedLinears],
      ['  embedding, head, norms', d.baseWeights - d.quantizedLinears],
    );
  } else rows.push([e.method === 'full' ? '  model' : '  frozen base', d.baseWeights]);
  if (d.masterWeights) rows.push(['  f32 master copy', d.masterWeights]);
  if (e.method !== 'full') rows.push(['  adapters', d.adapterWeights]);
  rows.push(
    ['gradients', e.gradients],
    ['optimizer states', e.optimizerStates],
    ['activations', e.activations],
    [o.gradientCheckpointing ? '  decoder layers (checkpointed)' : '  decoder layers', d.layerActivations],
    ['  final norm / head inputs', d.headActivations],
    ['  logits + gradient (f32)', d.logits],
  );
  if (e.overhead) rows.push(['overhead', e.overhead]);
  rows.push(['total', e.total]);
  const cells = rows.map(([k, v]) => [k, v === null ? '' : formatBytes(v)] as const);
  const w0 = Math.max('component'.length, ...cells.map(([k]) => k.length));
  const w1 = Math.max('memory'.length, ...cells.map(([, v]) => v.length));
  const line = (a: string, b: string) => `| ${a.padEnd(w0)} | ${b.padStart(w1)} |`;
  const out = [
    line('component', 'memory'),
    `| ${'-'.repeat(w0)} | ${'-'.repeat(w1 - 1)}: |`,
    ...cells.map(([k, v]) => line(k, v)),
  ];
  const pct = ((100 * e.trainableParams) / e.params.total).toFixed(e.method === 'full' ? 0 : 3);
  return [
    `method: ${e.method}${e.method === 'full' ? '' : `, rank ${o.rank ?? 16}`}, batch ${o.batchSize} × seq ${o.seqLen}` +
      `, gradient checkpointing ${o.gradientCheckpointing ? 'on' : 'off'}`,
    `parameters: ${e.params.total.toLocaleString('en-US')}, trainable: ${e.trainableParams.toLocaleString('en-US')} (${pct}%)`,
    '',
    ...out,
  ].join('\n');
}

export function registerEstimate(program: Command): void {
  program
    .command('estimate')
    .description('estimate the memory needed to train a model with full fine-tuning, LoRA or QLoRA')
    .requiredOption('--model <model>', 'config.json, model dir, .gguf file or hf://owner/repo')
    .requiredOption('--method <m>', 'full, lora or qlora')
    .option('--seq <n>', 'sequence length (default 512)')
    .option('--batch <n>', 'micro-batch size (default 1)')
    .option('--rank <r>', 'LoRA rank (default 16)')
    .option('--targets <list>', 'adapted modules, comma-separated, or all-linear (default)')
    .option('--gradient-checkpointing', 'checkpoint every decoder layer')
    .option('--optimizer <o>', 'adamw (default), adamw8bit or sgd')
    .option('--weight-dtype <d>', 'bf16 (default) or f32 storage of the (non-quantized) weights')
    .option('--attention <a>', 'flash (default) or eager')
    .option('--quant-type <q>', 'QLoRA: nf4 (default) or fp4')
    .option('--no-double-quant', 'QLoRA: f32 absmax instead of double quantization')
    .option('--blocksize <n>', 'QLoRA: 4-bit block size (default 64)')
    .option('--no-master-weights', 'full fine-tuning in bf16 without an f32 master copy (12 B/param)')
    .option('--overhead-gb <gb>', 'add a fixed overhead (CUDA context, allocator), in GB')
    .option('--explain', 'print the formula behind every term')
    .option('--json', 'print the estimate as JSON')
    .action(async (o: EstimateCliOptions) => {
      const opts = estimateOptionsFromCli(o);
      const { where, json } = await readModelConfigJson(o.model);
      let e: MemoryEstimate;
      try {
        e = estimateMemory(json, opts);
      } catch (err) {
        if (err instanceof ConfigError)
          throw new ConfigError(`${where}: ${err.message.replace(/^config\.json: /, '')}`);
        throw err;
      }
      if (o.json) {
        console.log(JSON.stringify(e, null, 2));
        return;
      }
      console.log(`model: ${where}`);
      console.log(formatEstimate(e, opts));
      if (o.explain) {
        console.log('\nformulas:');
        for (const f of e.formulas) console.log(`  ${f}`);
      } else console.log('\n(--explain shows the formula behind every term)');
    });
}
