// lowrank train <config.yaml> [--set key=value]... [--resume [DIR]]: runs the job in a worker thread.

import { Worker } from 'node:worker_threads';
import type { Command } from 'commander';
import { LowrankError } from '../core/errors.ts';
import { loadTrainConfig } from '../train/config.ts';
import { ProgressBar } from '../train/progress.ts';
import { runFacts, writeRunReport } from '../train/report.ts';
import { formatComparison } from '../train/task-eval.ts';
import { collect } from './common.ts';
import { runEval } from './eval.ts';

export function registerTrain(program: Command): void {
  program
    .command('train')
    .description('train a LoRA/DoRA/QLoRA adapter (or fine-tune fully) from a YAML config')
    .argument('<config>', 'the training config (YAML)')
    .option('--set <key=value>', 'override a config key (repeatable; dotted keys for nested values)', collect, [])
    .option('--resume [dir]', 'resume from a checkpoint dir, or the latest in output_dir')
    .option('--no-eval', 'skip the evaluation by generation after training (base vs fine-tuned)')
    .action(async (configPath: string, o: { set: string[]; resume?: string | boolean; eval: boolean }) => {
      await runTrainWorker(configPath, o.set, o.resume ?? false);
      // the before/after table: eval loss and task metrics of the base model and the trained one, side by
      // side, into eval_results.json and report.html
      const log = (l: string) => process.stderr.write(`${l}\n`);
      if (!o.eval) {
        const cfg = loadTrainConfig(configPath, o.set);
        await writeRunReport(cfg.output_dir, runFacts(cfg));
        return;
      }
      const r = await runEval(configPath, { set: o.set, marker: [], loss: true, task: true }, log);
      console.log(formatComparison(r.comparison));
    });
}

export function runTrainWorker(configPath: string, overrides: string[], resume: string | boolean): Promise<unknown> {
  const bar = new ProgressBar();
  const worker = new Worker(new URL('../train/worker-entry.mjs', import.meta.url), {
    workerData: { configPath, overrides, resume },
  });
  return new Promise((resolve, reject) => {
    worker.on('message', (m: { type: string; [k: string]: unknown }) => {
      if (m.type === 'log') bar.log(m.line as string);
      else if (m.type === 'progress') bar.update(m as never);
      else if (m.type === 'done') {
        bar.end();
        resolve(m.summary);
      } else if (m.type === 'error') {
        bar.end();
        const e = m.user ? new LowrankError(m.message as string) : new Error(m.message as string);
        e.name = m.name as string;
        if (m.stack && !m.user) e.stack = m.stack as string;
        reject(e);
      }
    });
    worker.on('error', reject);
    worker.on('exit', (code) => {
      if (code !== 0) reject(new Error(`the training worker exited with code ${code}`));
    });
  });
}
