// Non-finite losses or gradients: each such step is skipped, and training stops with a clear message after
// max consecutive ones; nothing already written is damaged.

import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { test } from 'node:test';
import { DataError } from '../../src/core/errors.ts';
import { loadTrainConfig } from '../../src/train/config.ts';
import { setupTraining } from '../../src/train/setup.ts';
import { runTraining } from '../../src/train/trainer.ts';

const STORIES = resolve('../shared/models/stories260K/stories260K.gguf');

test('a NaN in the weights makes every step non-finite: skipped, then a clear stop', {
  skip: !existsSync(STORIES) && 'needs ../shared',
}, async () => {
  const dir = mkdtempSync(join(tmpdir(), 'lowrank-nan-'));
  try {
    writeFileSync(
      join(dir, 'd.jsonl'),
      Array.from({ length: 16 }, (_, i) => JSON.stringify({ text: `Tom saw ${i} cats.` })).join('\n'),
    );
    writeFileSync(
      join(dir, 'c.yaml'),
      `base_model: ${STORIES}\nadapter: lora\ndatasets:\n  - path: d.jsonl\n    type: completion\nsequence_len: 32\nmicro_batch_size: 4\nmax_steps: 20\nlearning_rate: 0.001\nsave_steps: 100\noutput_dir: out\n`,
    );
    const cfg = loadTrainConfig(join(dir, 'c.yaml'));
    const setup = await setupTraining(cfg, () => {});
    const [, b] = setup.target.trainable.find(([n]) => n.includes('lora_B'))!;
    (b.data as Float32Array)[0] = Number.NaN;
    const lines: string[] = [];
    await assert.rejects(
      runTraining(cfg, setup.target, setup.data, { log: (l) => lines.push(l), maxNonFinite: 3 }),
      (e: Error) => e instanceof DataError && /3 steps in a row had a non-finite loss or gradient/.test(e.message),
    );
    assert.equal(lines.filter((l) => /non-finite .*skipped/.test(l)).length, 3);
    assert.deepEqual(
      readdirSync(join(dir, 'out')).filter((n) => n.startsWith('checkpoint-')),
      [],
    );
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
