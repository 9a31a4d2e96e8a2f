// A whole training job as `lowrank train` runs it: data check, setup, training, evaluation, report.

import { join } from 'node:path';
import { writeFileAtomic } from '../formats/atomic.ts';
import type { TrainConfig } from './config.ts';
import { setupTraining } from './setup.ts';
import { runTraining, type TrainOptions, type TrainSummary } from './trainer.ts';

export interface JobSummary extends TrainSummary {
  params: { total: number; trainable: number };
}

export async function runJob(cfg: TrainConfig, opts: TrainOptions = {}): Promise<JobSummary> {
  const log = opts.log ?? ((l: string) => process.stderr.write(`${l}\n`));
  for (const w of cfg.warnings) log(`warning: ${w}`);
  const setup = await setupTraining(cfg, (m) => log(`warning: ${m}`));
  log(setup.data.reportText);
  log(
    `model ${setup.modelPath}: ${(setup.params.total / 1e6).toFixed(2)}M parameters, training ${setup.params.trainable.toLocaleString('en-US')} (${((100 * setup.params.trainable) / setup.params.total).toFixed(3)}%) with ${cfg.adapter}`,
  );
  const summary = await runTraining(cfg, setup.target, setup.data, { ...opts, log });
  const result: JobSummary = { ...summary, params: setup.params };
  await writeFileAtomic(
    join(cfg.output_dir, 'train_results.json'),
    `${JSON.stringify({ ...result, history: undefined }, null, 2)}\n`,
  );
  setup.target.model.dispose();
  return result;
}
