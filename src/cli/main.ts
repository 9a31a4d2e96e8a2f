// The lowrank command line: one file per command; this file wires them and prints user errors without a
// stack trace (--verbose shows it).

import { Command } from 'commander';
import { LowrankError } from '../core/errors.ts';
import { registerCompare } from './compare.ts';
import { registerEstimate } from './estimate.ts';
import { registerEval } from './eval.ts';
import { registerGenerate } from './generate.ts';
import { registerHubSeed } from './hub-seed.ts';
import { registerInfo } from './info.ts';
import { registerInitModel } from './init-model.ts';
import { registerMerge } from './merge.ts';
import { registerQuantize } from './quantize.ts';
import { registerServe } from './serve.ts';
import { registerTokenize } from './tokenize.ts';
import { registerTrain } from './train.ts';

export function buildProgram(): Command {
  const program = new Command();
  program
    .name('lowrank')
    .description('LoRA, DoRA and QLoRA fine-tuning and multi-adapter serving for open LLMs, on Node.js')
    .option('--verbose', 'show stack traces for errors')
    .showHelpAfterError();
  registerInfo(program);
  registerTokenize(program);
  registerGenerate(program);
  registerInitModel(program);
  registerMerge(program);
  registerQuantize(program);
  registerEstimate(program);
  registerTrain(program);
  registerHubSeed(program);
  registerEval(program);
  registerCompare(program);
  registerServe(program);
  return program;
}

export async function main(argv: string[]): Promise<void> {
  const program = buildProgram();
  try {
    await program.parseAsync(argv);
  } catch (e) {
    const verbose = argv.includes('--verbose');
    if (e instanceof LowrankError && !verbose) console.error(`${e.name}: ${e.message}`);
    else console.error(e);
    process.exitCode = 1;
  }
}

await main(process.argv);
