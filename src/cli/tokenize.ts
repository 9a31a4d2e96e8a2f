// lowrank tokenize --model M [--chat] [--decode] <text|->

import { readFileSync } from 'node:fs';
import type { Command } from 'commander';
import { ConfigError } from '../core/errors.ts';
import { resolveModelPath } from '../models/load.ts';
import { loadTokenizer } from '../tokenize/hf.ts';

function readInput(arg: string | undefined): string {
  if (arg === undefined || arg === '-') return readFileSync(0, 'utf8');
  return arg;
}

export function registerTokenize(program: Command): void {
  program
    .command('tokenize')
    .description('token ids of a text as JSON (or, with --decode, ids back to text)')
    .requiredOption('--model <model>', 'model dir, .gguf file, tokenizer file or hf://owner/repo')
    .option('--chat', 'treat the input as a JSON list of chat messages and apply the chat template')
    .option('--decode', 'the input is a JSON array of ids: print the text')
    .option('--no-special', 'do not add special tokens (BOS/EOS)')
    .argument('[text]', "text, or '-' for standard input")
    .action(
      async (text: string | undefined, o: { model: string; chat?: boolean; decode?: boolean; special: boolean }) => {
        const tok = loadTokenizer(await resolveModelPath(o.model));
        const input = readInput(text);
        if (o.decode) {
          let ids: unknown;
          try {
            ids = JSON.parse(input);
          } catch {
            throw new ConfigError('--decode expects a JSON array of token ids, e.g. [1, 2, 3]');
          }
          if (!Array.isArray(ids) || !ids.every((x) => Number.isInteger(x)))
            throw new ConfigError('--decode expects a JSON array of integer token ids');
          process.stdout.write(`${tok.decode(ids as number[])}\n`);
          return;
        }
        if (o.chat) {
          let messages: unknown;
          try {
            messages = JSON.parse(input);
          } catch {
            throw new ConfigError('--chat expects a JSON array of {"role", "content"} messages');
          }
          const ids = tok.encodeChat(messages as { role: string; content: string }[], { addGenerationPrompt: true });
          process.stdout.write(`${JSON.stringify(ids)}\n`);
          return;
        }
        process.stdout.write(`${JSON.stringify(tok.encode(input, { addSpecialTokens: o.special }))}\n`);
      },
    );
}
