// lowrank merge --model M --adapter A [--adapter B --weights ...] --out DIR [--gguf] [--dtype]
//   [--combine <method> [--density D] [--majority-sign total|frequency] [--rank R] [--svd-clamp Q] [--name N]
//    [--seed S] [--save-adapter DIR]]
// Loads the base in f32, merges the adapters (weighted; a merge that would write NaN/inf is refused), and writes
// an HF dir (config.json, model.safetensors, tokenizer files) or, with --gguf, a GGUF file for llama.cpp.
// With --combine the adapters are first combined into one new adapter (PEFT's add_weighted_adapter: cat, linear,
// svd, ties, dare_*, magnitude_prune*, see peft/lora/combine.ts), and that one is merged; --save-adapter writes it
// in PEFT's format to DIR as well (or instead, without --out).
// A bitsandbytes 4-bit base (a QLoRA setup) is merged into dense weights, dequant(W4) + s B A, and written in
// 16 bits (bf16 unless --dtype says otherwise): re-quantizing would round the adapter away.

import { existsSync, mkdirSync, mkdtempSync, renameSync, rmSync, statSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import type { Command } from 'commander';
import type { DType } from '../core/dtype.ts';
import { ConfigError } from '../core/errors.ts';
import { Rng } from '../core/rng.ts';
import { openSafetensors, openSafetensorsIndex } from '../formats/safetensors.ts';
import type { LlamaForCausalLM } from '../models/llama.ts';
import { loadModel, resolveModelPath } from '../models/load.ts';
import { DTYPE_OF } from '../models/weights.ts';
import type { Module } from '../nn/module.ts';
import {
  addWeightedAdapter,
  COMBINATION_TYPES,
  type CombinationType,
  type MajoritySignMethod,
} from '../peft/lora/combine.ts';
import { ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, saveAdapter } from '../peft/lora/io.ts';
import { type GgufFloatType, saveMergedGguf, saveMergedHF } from '../peft/lora/merge.ts';
import type { LoraModel } from '../peft/lora/model.ts';
import { Linear4bit } from '../quant/linear4bit.ts';
import { loadModelQuantized, readQuantizationConfig } from '../quant/load.ts';
import { denseLinearFrom4bit } from '../quant/merge.ts';
import { applyAdapterOptions, parseAdapterWeights } from './adapters.ts';
import { collect } from './common.ts';

interface MergeCliOptions {
  model: string;
  adapter: string[];
  weights?: string;
  out?: string;
  gguf?: boolean;
  dtype?: string;
  combine?: string;
  density?: string;
  majoritySign?: string;
  rank?: string;
  svdClamp?: string;
  name?: string;
  seed?: string;
  saveAdapter?: string;
}

const COMBINE_ONLY = [
  ['density', '--density'],
  ['majoritySign', '--majority-sign'],
  ['rank', '--rank'],
  ['svdClamp', '--svd-clamp'],
  ['name', '--name'],
  ['seed', '--seed'],
  ['saveAdapter', '--save-adapter'],
] as const;

function numberOption(flag: string, v: string | undefined, integer = false): number | undefined {
  if (v === undefined) return undefined;
  const x = Number(v);
  if (v.trim() === '' || !Number.isFinite(x) || (integer && !Number.isInteger(x)))
    throw new ConfigError(`${flag} must be ${integer ? 'an integer' : 'a number'}, got '${v}'`);
  return x;
}

interface CombineOptions {
  method: CombinationType;
  weights?: number[];
  name: string;
  density?: number;
  sign?: MajoritySignMethod;
  svdRank?: number;
  svdClamp?: number;
  seed: number;
}

/** The --combine options, checked before anything is loaded. */
function parseCombineOptions(o: MergeCliOptions): CombineOptions {
  const method = o.combine as CombinationType;
  if (!COMBINATION_TYPES.includes(method))
    throw new ConfigError(`--combine must be one of ${COMBINATION_TYPES.join(', ')}, got '${o.combine}'`);
  const sign = o.majoritySign;
  if (sign !== undefined && sign !== 'total' && sign !== 'frequency')
    throw new ConfigError(`--majority-sign must be 'total' or 'frequency', got '${sign}'`);
  const c: CombineOptions = {
    method,
    weights: parseAdapterWeights(o.weights, o.adapter.length),
    name: o.name ?? 'combined',
    density: numberOption('--density', o.density),
    sign,
    svdRank: numberOption('--rank', o.rank, true),
    svdClamp: numberOption('--svd-clamp', o.svdClamp),
    seed: numberOption('--seed', o.seed, true) ?? 0,
  };
  if (c.density !== undefined && !(c.density > 0 && c.density <= 1))
    throw new ConfigError(`--density must be in (0, 1], got ${o.density}`);
  if (c.svdRank !== undefined && c.svdRank <= 0) throw new ConfigError(`--rank must be positive, got ${o.rank}`);
  if (c.svdClamp !== undefined && !(c.svdClamp >= 0 && c.svdClamp <= 1))
    throw new ConfigError(`--svd-clamp must be a quantile in [0, 1], got ${o.svdClamp}`);
  const warn = (m: string) => console.error(`warning: ${m}`);
  if (c.density !== undefined && !/ties|dare|magnitude_prune/.test(method))
    warn(`--density is not used by --combine ${method}`);
  if (sign !== undefined && !method.includes('ties')) warn('--majority-sign is only used by the ties types');
  if ((c.svdRank !== undefined || c.svdClamp !== undefined) && !method.endsWith('svd'))
    warn('--rank and --svd-clamp are only used by the svd types');
  return c;
}

/**
 * Combines the loaded (active, weight 1) adapters into one new adapter and makes it the active one. Returns its
 * name.
 */
function combineAdapters(pm: LoraModel, c: CombineOptions): string {
  const sources = pm.activeAdapters;
  const weights = c.weights ?? sources.map(() => 1);
  if (pm.configs.has(c.name))
    throw new ConfigError(
      `--name '${c.name}' is also the name of a loaded adapter (from its folder name); choose another`,
    );
  const res = addWeightedAdapter(pm, sources, weights, c.name, {
    combinationType: c.method,
    density: c.density,
    majoritySignMethod: c.sign,
    svdRank: c.svdRank,
    svdClamp: c.svdClamp,
    rng: new Rng(c.seed),
    onWarning: (m) => console.error(`warning: ${m}`),
  });
  pm.setAdapter(c.name);
  console.log(
    `combined ${sources.join(', ')} (weights ${weights.join(', ')}) with ${res.combinationType} into '${c.name}': r=${res.r}, ${res.layers.length} layers`,
  );
  return c.name;
}

/** Writes one adapter of the model in PEFT's layout directly in dir (adapter_config.json, adapter_model.safetensors). */
async function saveAdapterTo(pm: LoraModel, name: string, dir: string, baseModel: string): Promise<void> {
  if (existsSync(dir) && !statSync(dir).isDirectory())
    throw new ConfigError(`--save-adapter ${dir} exists and is not a directory`);
  if (name === 'default') {
    await saveAdapter(pm, dir, { adapters: [name], baseModelNameOrPath: baseModel });
    return;
  }
  // saveAdapter puts a non-default adapter in <dir>/<name>/: write it beside dir, then move its files in
  const parent = dirname(resolve(dir));
  mkdirSync(parent, { recursive: true });
  const tmp = mkdtempSync(join(parent, '.lowrank-adapter-'));
  try {
    const [written] = await saveAdapter(pm, tmp, { adapters: [name], baseModelNameOrPath: baseModel });
    mkdirSync(dir, { recursive: true });
    for (const f of [ADAPTER_WEIGHTS_NAME, ADAPTER_CONFIG_NAME]) renameSync(join(written!, f), join(dir, f));
  } finally {
    rmSync(tmp, { recursive: true, force: true });
  }
}

/** The float dtype a HF dir stores its weights in (f32 for anything else). */
function sourceDtype(dir: string): DType {
  const r = existsSync(join(dir, 'model.safetensors.index.json'))
    ? openSafetensorsIndex(dir)
    : openSafetensors(join(dir, 'model.safetensors'));
  try {
    const first = r.names().find((n) => n.endsWith('.weight'));
    const dt = first ? DTYPE_OF[r.info(first).dtype] : undefined;
    return dt === 'bf16' || dt === 'f16' ? dt : 'f32';
  } finally {
    r.close();
  }
}

/** Replaces the 4-bit layers no adapter touched by dense ones (an exported model holds plain weights). */
function dequantizeRest(model: LlamaForCausalLM): void {
  const quant: [string, Linear4bit][] = [];
  for (const [n, m] of model.namedModules()) if (m instanceof Linear4bit) quant.push([n, m]);
  for (const [n, m] of quant) {
    model.setModule(n, denseLinearFrom4bit(m, { dtype: 'f32' }) as Module);
    m.dispose();
  }
}

export function registerMerge(program: Command): void {
  program
    .command('merge')
    .description('merge PEFT LoRA/DoRA adapters into the base model and write it as an HF dir or a GGUF file')
    .requiredOption('--model <model>', 'base model: HF dir, .gguf file or hf://owner/repo')
    .option('--adapter <path>', 'a PEFT adapter dir (repeat to merge several)', collect, [])
    .option('--weights <list>', 'comma-separated weights for the adapters (default 1 each)')
    .option('--out <dir>', 'output dir (with --gguf: a .gguf file path, or a dir that gets model.gguf)')
    .option('--gguf', 'write a GGUF file instead of an HF dir')
    .option('--dtype <d>', "output dtype: f32, bf16, f16 (default: the base model's)")
    .option(
      '--combine <method>',
      `combine the adapters into one first (PEFT's add_weighted_adapter): ${COMBINATION_TYPES.join(', ')}`,
    )
    .option('--density <d>', 'fraction of values kept, in (0, 1] (ties, dare_*, magnitude_prune*)')
    .option('--majority-sign <m>', 'TIES sign election: total (default) or frequency')
    .option('--rank <r>', 'rank of an svd combination (default: the largest adapter rank)')
    .option('--svd-clamp <q>', 'clamp the svd factors at this quantile in [0, 1]')
    .option('--name <n>', 'name of the combined adapter (default combined)')
    .option('--seed <s>', 'seed of the DARE random pruning (default 0)')
    .option(
      '--save-adapter <dir>',
      'also write the combined adapter in PEFT format to this dir (without --out: only that)',
    )
    .action(async (o: MergeCliOptions) => {
      if (o.adapter.length === 0) throw new ConfigError('merge needs at least one --adapter');
      if (o.dtype !== undefined && !['f32', 'bf16', 'f16'].includes(o.dtype))
        throw new ConfigError(`--dtype must be f32, bf16 or f16, got '${o.dtype}'`);
      if (o.combine === undefined)
        for (const [k, flag] of COMBINE_ONLY)
          if (o[k] !== undefined) throw new ConfigError(`${flag} needs --combine <method>`);
      if (o.out === undefined && o.saveAdapter === undefined)
        throw new ConfigError('merge needs --out (the merged model) or, with --combine, --save-adapter');
      const combine = o.combine !== undefined ? parseCombineOptions(o) : null;
      const path = await resolveModelPath(o.model);
      const isDir = statSync(path).isDirectory();
      const quantized = isDir && readQuantizationConfig(path) !== null;
      const { model } = quantized ? await loadModelQuantized(path) : await loadModel(path, { dtype: 'f32' });
      // with --combine the weights go into the combination, not into the loaded adapters' scalings
      const pm = applyAdapterOptions(model, o.adapter, combine ? undefined : o.weights)!;
      if (combine) {
        const name = combineAdapters(pm, combine);
        if (o.saveAdapter !== undefined) {
          await saveAdapterTo(pm, name, o.saveAdapter, o.model);
          console.log(`wrote adapter '${name}' to ${o.saveAdapter}`);
        }
        if (o.out === undefined) return;
      }
      const names = pm.activeAdapters;
      const out = o.out!;
      const merged = pm.mergeAndUnload({
        names,
        safe: true,
        replaceQuantized: (base, delta, at) => {
          if (!(base instanceof Linear4bit))
            throw new ConfigError(`${at}: cannot merge into a ${base.constructor.name}`);
          return denseLinearFrom4bit(base, { deltaW: delta, dtype: 'f32' });
        },
      });
      if (quantized) dequantizeRest(merged);
      const dtype: DType = (o.dtype as DType | undefined) ?? (quantized ? 'bf16' : isDir ? sourceDtype(path) : 'f32');
      if (o.gguf) {
        let file = out;
        if (!file.endsWith('.gguf')) {
          mkdirSync(file, { recursive: true });
          file = join(file, 'model.gguf');
        }
        const type: GgufFloatType = dtype === 'bf16' ? 'BF16' : dtype === 'f16' ? 'F16' : 'F32';
        await saveMergedGguf(merged, file, {
          type,
          metadataFrom: isDir ? null : path,
          tokenizerDir: isDir ? path : null,
        });
        console.log(`merged ${names.join(', ')} into ${path}; wrote ${file} (${type})`);
      } else {
        await saveMergedHF(merged, out, { dtype, tokenizerFrom: isDir ? path : null });
        console.log(`merged ${names.join(', ')} into ${path}; wrote ${out} (${dtype})`);
        if (!isDir)
          console.error(
            'note: the base is a GGUF file, so no tokenizer files were written (use --gguf to keep its tokenizer)',
          );
      }
    });
}
