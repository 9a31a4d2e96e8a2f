// Kill training with SIGKILL mid-run, resume, and reach the same losses as an uninterrupted run.

import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { test } from 'node:test';

const STORIES = resolve('../shared/models/stories260K/stories260K.gguf');
const have = existsSync(STORIES);
if (!have) console.log(`skipping the resume test: ${STORIES} is absent`);
const BIN = resolve('bin/lowrank.js');

function setup(): string {
  const dir = mkdtempSync(join(tmpdir(), 'lowrank-resume-'));
  const lines: string[] = [];
  const names = ['Tom', 'Lily', 'Sam', 'Mia'];
  for (let i = 0; i < 48; i++)
    lines.push(JSON.stringify({ text: `${names[i % 4]} saw ${i % 7} birds in the park. The end.` }));
  writeFileSync(join(dir, 'data.jsonl'), `${lines.join('\n')}\n`);
  writeFileSync(
    join(dir, 'cfg.yaml'),
    [
      `base_model: ${STORIES}`,
      'adapter: lora',
      'lora_r: 4',
      'lora_alpha: 8',
      'lora_dropout: 0.1',
      'lora_target_linear: true',
      'gradient_checkpointing: true',
      'datasets:',
      '  - path: data.jsonl',
      '    type: completion',
      'sequence_len: 32',
      'micro_batch_size: 4',
      'gradient_accumulation_steps: 2',
      'max_steps: 12',
      'learning_rate: 0.01',
      'lr_scheduler: cosine',
      'warmup_steps: 2',
      'save_steps: 2',
      'logging_steps: 1',
      'seed: 11',
    ].join('\n'),
  );
  return dir;
}

function losses(outDir: string): number[] {
  return readFileSync(join(outDir, 'metrics.jsonl'), 'utf8')
    .trim()
    .split('\n')
    .map((l) => JSON.parse(l))
    .filter((r) => typeof r.loss === 'number')
    .map((r) => r.loss);
}

test('LoRA with dropout and gradient checkpointing: SIGKILL mid-run, then --resume, gives the same losses as an uninterrupted run', {
  skip: !have,
  timeout: 120_000,
}, async () => {
  const dir = setup();
  try {
    const run = (out: string, extra: string[] = []) =>
      spawnSync(process.execPath, [BIN, 'train', 'cfg.yaml', '--set', `output_dir=${out}`, ...extra], {
        cwd: dir,
        encoding: 'utf8',
      });
    const a = run('a');
    assert.equal(a.status, 0, a.stderr);
    const ref = losses(join(dir, 'a'));
    assert.equal(ref.length, 12);

    // start run b and kill it once a checkpoint exists (mid-run, possibly mid-save)
    const child = spawn(process.execPath, [BIN, 'train', 'cfg.yaml', '--set', 'output_dir=b'], {
      cwd: dir,
      stdio: 'ignore',
    });
    const outB = join(dir, 'b');
    await new Promise<void>((res, rej) => {
      const t0 = Date.now();
      const iv = setInterval(() => {
        const cks = existsSync(outB) ? readdirSync(outB).filter((n) => /^checkpoint-\d+$/.test(n)) : [];
        if (cks.length >= 2) {
          clearInterval(iv);
          child.kill('SIGKILL');
          res();
        } else if (Date.now() - t0 > 90_000) {
          clearInterval(iv);
          child.kill('SIGKILL');
          rej(new Error('no checkpoint appeared'));
        }
      }, 20);
    });
    await new Promise((r) => child.on('exit', r));
    const done = readdirSync(outB)
      .filter((n) => /^checkpoint-\d+$/.test(n))
      .map((n) => Number(n.split('-')[1]));
    assert.ok(Math.max(...done) < 12, 'the run was killed before the end');
    const b = run('b', ['--resume']);
    assert.equal(b.status, 0, b.stderr);
    assert.match(b.stderr, /resumed from .*checkpoint-\d+/);
    assert.deepEqual(losses(outB), ref);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
