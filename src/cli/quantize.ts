// lowrank quantize --model M --to nf4|fp4|int8 [--double-quant] [--blocksize N] --out DIR: writes a
// bitsandbytes checkpoint that transformers loads (4-bit: load_in_4bit layout; int8: LLM.int8() layout).

import { existsSync, realpathSync, statSync } from 'node:fs';
import { resolve } from 'node:path';
import type { Command } from 'commander';
import { ConfigError } from '../core/errors.ts';
import { resolveModelPath } from '../models/load.ts';
import { bnbQuantizationConfig } from '../quant/bnb-serialize.ts';
import { loadModelQuantized } from '../quant/load.ts';
import { quantizedSummary, saveInt8Checkpoint, saveModelQuantized } from '../quant/save.ts';
import { formatBytes } from '../train/estimate.ts';
import { int, parseDtype } from './common.ts';

interface QuantizeCliOptions {
  model: string;
  to: string;
  out: string;
  doubleQuant?: boolean;
  blocksize?: string;
  computeDtype?: string;
  skipModules?: string;
  dtype?: string;
}

const COMPUTE: Record<string, 'bfloat16' | 'float16' | 'float32'> = {
  bf16: 'bfloat16',
  bfloat16: 'bfloat16',
  f16: 'float16',
  float16: 'float16',
  f32: 'float32',
  float32: 'float32',
};

function samePath(a: string, b: string): boolean {
  const real = (p: string) => (existsSync(p) ? realpathSync(p) : resolve(p));
  return real(a) === real(b);
}

export function registerQuantize(program: Command): void {
  program
    .command('quantize')
    .description('quantize a model to a bitsandbytes 4-bit (nf4/fp4) or LLM.int8() checkpoint that transformers loads')
    .requiredOption('--model <model>', 'model dir, .gguf file or hf://owner/repo')
    .requiredOption('--to <type>', 'nf4, fp4 or int8')
    .requiredOption('--out <dir>', 'output dir')
    .option('--double-quant', '4-bit: quantize the absmax values again (QLoRA double quantization)')
    .option('--blocksize <n>', '4-bit: elements per absmax block, 32..4096 (default 64, as transformers)')
    .option('--compute-dtype <d>', '4-bit: bnb_4bit_compute_dtype recorded in the config: bf16 (default), f16, f32')
    .option('--skip-modules <list>', 'modules kept unquantized, comma-separated (default lm_head)')
    .option('--dtype <d>', 'dtype of the unquantized weights: auto (default: as in the checkpoint), f32, bf16, f16')
    .action(async (o: QuantizeCliOptions) => {
      const to = o.to;
      if (to !== 'nf4' && to !== 'fp4' && to !== 'int8')
        throw new ConfigError(`--to must be nf4, fp4 or int8, got '${to}'`);
      const path = await resolveModelPath(o.model);
      if (samePath(path, o.out)) throw new ConfigError('--out must not be the model dir itself');
      if (existsSync(o.out) && !statSync(o.out).isDirectory())
        throw new ConfigError(`--out ${o.out} exists and is not a directory`);
      const skip = o.skipModules
        ?.split(',')
        .map((s) => s.trim())
        .filter(Boolean);
      if (to === 'int8') {
        if (o.doubleQuant || o.blocksize || o.computeDtype)
          throw new ConfigError('--double-quant, --blocksize and --compute-dtype apply to nf4/fp4 only');
        const t0 = performance.now();
        const n = await saveInt8Checkpoint(path, o.out, { skipModules: skip });
        console.log(
          `wrote an LLM.int8() checkpoint (${n} linear weights as int8 + SCB) to ${o.out} in ${((performance.now() - t0) / 1000).toFixed(1)} s`,
        );
        return;
      }
      const blocksize = int('blocksize', o.blocksize, 64);
      const cd = o.computeDtype === undefined ? 'bfloat16' : COMPUTE[o.computeDtype];
      if (!cd) throw new ConfigError(`--compute-dtype must be bf16, f16 or f32, got '${o.computeDtype}'`);
      const cfg = bnbQuantizationConfig({
        loadIn4bit: true,
        quantType: to,
        doubleQuant: o.doubleQuant ?? false,
        computeDtype: cd,
        skipModules: skip ?? null,
      });
      const dtype = parseDtype(o.dtype);
      const t0 = performance.now();
      const loaded = await loadModelQuantized(path, cfg, { blocksize, dtype });
      try {
        if (loaded.prequantized)
          throw new ConfigError(`${path} is already a bitsandbytes checkpoint; quantize a 16- or 32-bit model`);
        await saveModelQuantized(loaded.model, loaded.config, o.out, {
          quantizationConfig: loaded.quantizationConfig,
          tokenizerFrom: loaded.kind === 'hf' ? path : undefined,
        });
        const s = quantizedSummary(loaded.model);
        console.log(
          `wrote ${to}${s.doubleQuant ? ' + double quant' : ''} (blocksize ${blocksize}): ${s.layers} linear layers in ` +
            `${formatBytes(s.quantizedBytes)}, to ${o.out} in ${((performance.now() - t0) / 1000).toFixed(1)} s`,
        );
        if (loaded.kind === 'gguf')
          console.log('note: the tokenizer stays in the .gguf file; no tokenizer.json was written');
      } finally {
        loaded.model.dispose();
      }
    });
}
