// lowrank generate --model M [--adapter A]... --prompt P [--max-tokens --temperature --top-p --top-k --seed --stop
// --dtype --kv-cache-dtype]

import type { Command } from 'commander';
import { ConfigError } from '../core/errors.ts';
import { generateStream } from '../models/generate.ts';
import { applyAdapterOptions } from './adapters.ts';
import { collect, int, kvDtypeOption, loadModelAndTokenizer, num, parseDtype } from './common.ts';

interface GenerateCliOptions {
  model: string;
  adapter?: string[];
  weights?: string;
  prompt?: string;
  chat?: boolean;
  maxTokens?: string;
  temperature?: string;
  topP?: string;
  topK?: string;
  minP?: string;
  repetitionPenalty?: string;
  seed?: string;
  stop?: string[];
  dtype?: string;
  kvCacheDtype?: string;
}

export function registerGenerate(program: Command): void {
  program
    .command('generate')
    .description('generate text from a prompt, streaming to standard output')
    .requiredOption('--model <model>', 'model dir, .gguf file or hf://owner/repo')
    .option('--adapter <path>', 'a PEFT LoRA adapter dir (repeat to stack several)', collect, [])
    .option('--weights <list>', 'comma-separated weights for the adapters (default 1 each)')
    .requiredOption('--prompt <text>', 'the prompt')
    .option('--chat', 'wrap the prompt as a user message with the chat template')
    .option('--max-tokens <n>', 'tokens to generate (default 128)')
    .option('--temperature <t>', 'sampling temperature; 0 = greedy (default 0.8)')
    .option('--top-p <p>', 'nucleus sampling (default 1)')
    .option('--top-k <k>', 'top-k sampling, 0 = off (default 0)')
    .option('--min-p <p>', 'min-p sampling, 0 = off (default 0)')
    .option('--repetition-penalty <r>', '1 = off (default 1)')
    .option('--seed <n>', 'random seed (default 0)')
    .option('--stop <s>', 'stop string (repeatable)', collect, [])
    .option('--dtype <d>', 'weight dtype in memory: auto, f32, bf16, f16')
    .option('--kv-cache-dtype <d>', 'KV cache dtype: auto (bf16 for a bf16 model, else f32), f32, bf16')
    .action(async (o: GenerateCliOptions) => {
      const kvCacheDtype = kvDtypeOption(o.kvCacheDtype);
      const { model, tokenizer } = await loadModelAndTokenizer(o.model, parseDtype(o.dtype));
      applyAdapterOptions(model, o.adapter ?? [], o.weights);
      model.useDecodeLayout();
      if (!o.prompt) throw new ConfigError('--prompt is empty');
      const ids = o.chat
        ? tokenizer.encodeChat([{ role: 'user', content: o.prompt }], { addGenerationPrompt: true })
        : tokenizer.encode(o.prompt, { addSpecialTokens: true });
      process.stdout.write(o.chat ? '' : o.prompt);
      const it = generateStream(model, tokenizer, ids, {
        maxTokens: int('max-tokens', o.maxTokens, 128),
        temperature: num('temperature', o.temperature, 0.8),
        topP: num('top-p', o.topP, 1),
        topK: int('top-k', o.topK, 0),
        minP: num('min-p', o.minP, 0),
        repetitionPenalty: num('repetition-penalty', o.repetitionPenalty, 1),
        seed: int('seed', o.seed, 0),
        stop: o.stop ?? [],
        kvCacheDtype,
      });
      for await (const step of it) process.stdout.write(step.text);
      process.stdout.write('\n');
    });
}
