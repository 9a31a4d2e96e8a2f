// Runs a training job in a worker thread, so the main thread (CLI progress, a server) keeps answering.
// Messages to the parent: {type: 'log', line}, {type: 'progress', ...}, {type: 'done', summary}, {type: 'error', ...}.

import { parentPort, workerData } from 'node:worker_threads';
import { LowrankError } from '../core/errors.ts';
import { loadTrainConfig } from './config.ts';
import { runJob } from './job.ts';

const { configPath, overrides, resume } = workerData as {
  configPath: string;
  overrides: string[];
  resume: string | boolean;
};
const post = (m: unknown) => parentPort!.postMessage(m);
try {
  const cfg = loadTrainConfig(configPath, overrides);
  const summary = await runJob(cfg, {
    resume,
    log: (line) => post({ type: 'log', line }),
    onProgress: (p) => post({ type: 'progress', ...p }),
  });
  post({ type: 'done', summary });
} catch (e) {
  const err = e as Error;
  post({ type: 'error', name: err.name, message: err.message, stack: err.stack, user: e instanceof LowrankError });
}
