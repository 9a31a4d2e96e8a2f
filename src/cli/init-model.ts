// lowrank init-model --preset tiny|small|135m --out DIR: a random-init HF Llama dir for tests and benchmarks.

import type { Command } from 'commander';
import { PRESETS } from '../models/config.ts';
import { initModel, presetConfig, saveModelHF } from '../models/save.ts';
import { writeByteLevelTokenizer } from '../tokenize/synthetic.ts';
import { int, parseDtype } from './common.ts';

export function registerInitModel(program: Command): void {
  program
    .command('init-model')
    .description('write a random-init Hugging Face Llama model dir (config.json, model.safetensors, tokenizer.json)')
    .requiredOption('--preset <name>', `one of ${Object.keys(PRESETS).join(', ')}`)
    .requiredOption('--out <dir>', 'output dir')
    .option('--seed <n>', 'random seed (default 0)')
    .option('--dtype <d>', 'weight dtype: f32 (default), bf16, f16')
    .action(async (o: { preset: string; out: string; seed?: string; dtype?: string }) => {
      const cfg = presetConfig(o.preset);
      const dt = parseDtype(o.dtype);
      const model = initModel(cfg, int('seed', o.seed, 0), dt === 'auto' ? 'f32' : dt);
      await saveModelHF(model.namedParameters(), cfg, o.out);
      writeByteLevelTokenizer(o.out, cfg.vocab_size);
      const params = model.numParameters();
      model.dispose();
      console.log(`wrote ${o.preset} (${(params / 1e6).toFixed(1)}M parameters) to ${o.out}`);
    });
}
