// A 2-layer toy transformer built from lowrank's ops learns a synthetic sequence task, and a training loop
// over a model-shaped graph does not grow memory.

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { Rng } from '../../src/core/rng.ts';
import { tidy } from '../../src/core/scope.ts';
import { memoryStats } from '../../src/core/storage.ts';
import { configFromHF } from '../../src/models/config.ts';
import { LlamaForCausalLM } from '../../src/models/llama.ts';
import { intTensor } from '../../src/ops/create.ts';
import { backward } from '../../src/ops/tape.ts';
import { AdamW } from '../../src/train/optim.ts';

const V = 16;
function toyConfig() {
  return configFromHF({
    model_type: 'llama',
    vocab_size: V,
    hidden_size: 32,
    intermediate_size: 64,
    num_hidden_layers: 2,
    num_attention_heads: 4,
    num_key_value_heads: 2,
    max_position_embeddings: 64,
    rms_norm_eps: 1e-5,
  });
}

/** Sequences x[t+1] = x[t] + s (mod V) with a random stride s in 1..3 per sequence: predicting the next
 * token needs the two previous tokens (attention), not just the current one. */
function batch(rng: Rng, B: number, T: number) {
  const ids: number[] = [];
  const labels: number[] = [];
  for (let b = 0; b < B; b++) {
    const s = 1 + rng.int(3);
    const seq = [rng.int(V)];
    for (let t = 1; t <= T; t++) seq.push((seq[t - 1]! + s) % V);
    for (let t = 0; t < T; t++) {
      ids.push(seq[t]!);
      labels.push(t >= 1 ? seq[t + 1]! : -100); // the stride is knowable from position 1 on
    }
  }
  const pos = Array.from({ length: B * T }, (_, i) => i % T);
  return { ids: intTensor(ids, [B, T]), labels: intTensor(labels, [B, T]), positions: intTensor(pos, [B, T]) };
}

test('a 2-layer toy transformer learns a sequence task (loss from ~2.8 to below 0.3)', () => {
  const rng = new Rng(3);
  const model = new LlamaForCausalLM(toyConfig(), { rng });
  model.requiresGrad(true);
  const opt = new AdamW(model.trainableParameters(), { lr: 1e-2 });
  let first = 0;
  let last = 0;
  for (let step = 0; step < 250; step++) {
    const loss = tidy(() => {
      const b = batch(rng, 16, 10);
      const l = model.loss(b.ids, b.labels, { positions: b.positions });
      const v = l.item();
      backward(l);
      return v;
    });
    opt.step();
    opt.zeroGrad();
    if (step === 0) first = loss;
    last = step >= 240 ? last + loss / 10 : 0;
  }
  assert.ok(first > 2, `initial loss ${first} should be near ln(16) = 2.77`);
  assert.ok(last < 0.3, `the loss should fall below 0.3 after 250 steps, got ${last}`);
  opt.dispose();
  model.dispose();
});

test('100 forward+backward+update steps do not grow memory', () => {
  const rng = new Rng(5);
  const model = new LlamaForCausalLM(toyConfig(), { rng });
  model.requiresGrad(true);
  const opt = new AdamW(model.trainableParameters(), { lr: 1e-3 });
  const step = () => {
    tidy(() => {
      const b = batch(rng, 4, 8);
      backward(model.loss(b.ids, b.labels, { positions: b.positions }));
    });
    opt.step();
    opt.zeroGrad();
  };
  for (let i = 0; i < 3; i++) step(); // warm up (optimizer state exists from the start)
  const base = memoryStats();
  const rss0 = process.memoryUsage().rss;
  for (let i = 0; i < 100; i++) {
    step();
    const now = memoryStats();
    assert.equal(
      now.liveBytes,
      base.liveBytes,
      `step ${i}: live tensor bytes grew from ${base.liveBytes} to ${now.liveBytes}`,
    );
    assert.equal(now.liveStorages, base.liveStorages, `step ${i}: live storages grew`);
  }
  // the process itself: allow GC slack, but no per-step leak of tensor data (about 70 KB of grads per step)
  const grown = process.memoryUsage().rss - rss0;
  assert.ok(grown < 64 * 1024 * 1024, `RSS grew by ${(grown / 1e6).toFixed(1)} MB over 100 steps`);
  opt.dispose();
  model.dispose();
});
