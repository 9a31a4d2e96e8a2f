// lowrank merge --model M --adapter A [--adapter B --weights ...] --out DIR [--gguf] [--dtype]
// Loads the base in f32, merges the adapters (weighted; a merge that would write NaN/inf is refused), and writes
// an HF dir (config.json, model.safetensors, tokenizer files) or, with --gguf, a GGUF file for llama.cpp.
// A bitsandbytes 4-bit base (a QLoRA setup) is merged into dense weights, dequant(W4) + s B A, and written in
// 16 bits (bf16 unless --dtype says otherwise): re-quantizing would round the adapter away.

import { existsSync, mkdirSync, statSync } from 'node:fs';
import { join } from 'node:path';
import type { Command } from 'commander';
import type { DType } from '../core/dtype.ts';
import { ConfigError } from '../core/errors.ts';
import { openSafetensors, openSafetensorsIndex } from '../formats/safetensors.ts';
import type { LlamaForCausalLM } from '../models/llama.ts';
import { loadModel, resolveModelPath } from '../models/load.ts';
import { DTYPE_OF } from '../models/weights.ts';
import type { Module } from '../nn/module.ts';
import { type GgufFloatType, saveMergedGguf, saveMergedHF } from '../peft/lora/merge.ts';
import { Linear4bit } from '../quant/linear4bit.ts';
import { loadModelQuantized, readQuantizationConfig } from '../quant/load.ts';
import { denseLinearFrom4bit } from '../quant/merge.ts';
import { applyAdapterOptions } from './adapters.ts';
import { collect } from './common.ts';

interface MergeCliOptions {
  model: string;
  adapter: string[];
  weights?: string;
  out: string;
  gguf?: boolean;
  dtype?: string;
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
    .requiredOption('--out <dir>', 'output dir (with --gguf: a .gguf file path, or a dir that gets model.gguf)')
    .option('--gguf', 'write a GGUF file instead of an HF dir')
    .option('--dtype <d>', "output dtype: f32, bf16, f16 (default: the base model's)")
    .action(async (o: MergeCliOptions) => {
      if (o.adapter.length === 0) throw new ConfigError('merge needs at least one --adapter');
      if (o.dtype !== undefined && !['f32', 'bf16', 'f16'].includes(o.dtype))
        throw new ConfigError(`--dtype must be f32, bf16 or f16, got '${o.dtype}'`);
      const path = await resolveModelPath(o.model);
      const isDir = statSync(path).isDirectory();
      const quantized = isDir && readQuantizationConfig(path) !== null;
      const { model } = quantized ? await loadModelQuantized(path) : await loadModel(path, { dtype: 'f32' });
      const pm = applyAdapterOptions(model, o.adapter, o.weights)!;
      const names = pm.activeAdapters;
      const merged = pm.mergeAndUnload({
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
        let file = o.out;
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
        await saveMergedHF(merged, o.out, { dtype, tokenizerFrom: isDir ? path : null });
        console.log(`merged ${names.join(', ')} into ${path}; wrote ${o.out} (${dtype})`);
        if (!isDir)
          console.error(
            'note: the base is a GGUF file, so no tokenizer files were written (use --gguf to keep its tokenizer)',
          );
      }
    });
}
