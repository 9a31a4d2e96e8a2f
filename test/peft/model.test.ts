import assert from 'node:assert/strict';
import { test } from 'node:test';
import { ConfigError } from '../../src/core/errors.ts';
import { Rng } from '../../src/core/rng.ts';
import { tidy } from '../../src/core/scope.ts';
import { memoryStats } from '../../src/core/storage.ts';
import { generateBatch } from '../../src/models/generate.ts';
import type { Linear } from '../../src/nn/layers.ts';
import { intTensor } from '../../src/ops/create.ts';
import { backward } from '../../src/ops/tape.ts';
import { LoraEmbedding, LoraLinear, MergeError, ModulesToSaveWrapper } from '../../src/peft/lora/layer.ts';
import { LoraModel } from '../../src/peft/lora/model.ts';
import { Linear4bit } from '../../src/quant/linear4bit.ts';
import { IDS, logitsOf, maxAbsDiff, maxRelDiff, randomizeAdapters, tinyModel } from './helpers.ts';

const quiet = { onWarning: () => {} };

test('at init (B = 0) the adapted model gives exactly the base logits; PEFT in-memory names', () => {
  const base = logitsOf(tinyModel());
  for (const cfg of [
    {},
    { target_modules: 'all-linear', use_rslora: true, r: 4, lora_alpha: 16 },
    { target_modules: ['q_proj', 'v_proj', 'embed_tokens'], lora_dropout: 0.1 },
    { target_modules: ['k_proj', 'down_proj'], init_lora_weights: 'gaussian' },
  ]) {
    const pm = new LoraModel(tinyModel(), cfg, 'default', { rng: new Rng(1), ...quiet });
    assert.deepEqual(logitsOf(pm.model), base, JSON.stringify(cfg));
  }
  const pm = new LoraModel(tinyModel(), {}, 'default', { rng: new Rng(1) });
  const names = [...pm.namedParameters()].map(([n]) => n);
  assert.ok(names.includes('base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight'));
  assert.ok(names.includes('base_model.model.model.layers.1.self_attn.v_proj.lora_B.default.weight'));
  assert.ok(names.includes('base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight'));
  assert.ok(!names.some((n) => n.includes('k_proj.lora_A')), 'default targets are q_proj and v_proj');
  const trainable = pm.trainableParameters().map(([n]) => n);
  assert.equal(trainable.length, 2 * 2 * 2);
  assert.ok(trainable.every((n) => /lora_[AB]\.default\.weight$/.test(n)));
  const a = pm.namedParameters();
  for (const [n, p] of a) if (n.endsWith('q_proj.lora_A.default.weight')) assert.deepEqual(p.shape, [8, 16]);
});

test('DoRA at init equals the base; magnitude = row norms of W', () => {
  const base = logitsOf(tinyModel());
  const pm = new LoraModel(
    tinyModel(),
    { use_dora: true, target_modules: ['q_proj', 'o_proj', 'embed_tokens'] },
    'default',
    {
      rng: new Rng(2),
    },
  );
  assert.ok(maxRelDiff(logitsOf(pm.model), base) < 1e-6);
  const q = pm.model.getModule('model.layers.0.self_attn.q_proj') as LoraLinear;
  const w = q.weight.toF32();
  const m = q.magnitude.get('default')!.weight.toF32();
  for (let o = 0; o < q.outFeatures; o++) {
    let s = 0;
    for (let i = 0; i < q.inFeatures; i++) s += w[o * q.inFeatures + i]! ** 2;
    assert.ok(Math.abs(m[o]! - Math.sqrt(s)) < 1e-5);
  }
  const e = pm.model.getModule('model.embed_tokens');
  assert.ok(e instanceof LoraEmbedding);
  assert.deepEqual(e.magnitude.get('default')!.weight.shape, [16]);
});

test('merge equals the unmerged adapter (1e-5 rel), unmerge restores the base (1e-6); LoRA, rsLoRA, DoRA, embeddings', () => {
  for (const cfg of [
    { target_modules: 'all-linear', r: 4, lora_alpha: 8 },
    { target_modules: ['q_proj', 'v_proj', 'embed_tokens', 'lm_head'], use_rslora: true, r: 4, lora_alpha: 16 },
    { target_modules: ['q_proj', 'down_proj', 'embed_tokens'], use_dora: true, r: 2, lora_alpha: 4 },
  ]) {
    const pm = new LoraModel(tinyModel(3), cfg, 'default', { rng: new Rng(4), ...quiet });
    const before = new Map([...pm.model.namedParameters()].map(([n, p]) => [n, p.toF32()]));
    randomizeAdapters(pm.namedParameters());
    const unmerged = logitsOf(pm.model);
    assert.ok(maxRelDiff(unmerged, logitsOf(tinyModel(3))) > 1e-3, 'the adapter changes the output');
    pm.merge();
    const merged = logitsOf(pm.model);
    assert.ok(maxRelDiff(merged, unmerged) < 1e-5, `${JSON.stringify(cfg)}: merged ${maxRelDiff(merged, unmerged)}`);
    pm.unmerge();
    for (const [n, p] of pm.model.namedParameters())
      if (n.includes('base_layer') || !/lora_|magnitude/.test(n))
        assert.ok(maxAbsDiff(p.toF32(), before.get(n)!) <= 1e-6, `${n} restored`);
    assert.ok(maxRelDiff(logitsOf(pm.model), unmerged) < 1e-6);
  }
});

test('safe merge refuses non-finite weights and leaves the model unchanged', () => {
  const pm = new LoraModel(tinyModel(), { target_modules: ['q_proj'] }, 'default', { rng: new Rng(1) });
  randomizeAdapters(pm.namedParameters());
  const q0 = pm.model.getModule('model.layers.0.self_attn.q_proj') as LoraLinear;
  const q = pm.model.getModule('model.layers.1.self_attn.q_proj') as LoraLinear;
  (q.loraB.get('default')!.weight.data as Float32Array)[3] = Number.NaN;
  const w00 = q0.weight.toF32();
  const w0 = q.weight.toF32();
  assert.throws(
    () => pm.merge(undefined, { safe: true }),
    (e: unknown) => e instanceof MergeError && /layers\.1\.self_attn\.q_proj.*non-finite/.test((e as Error).message),
  );
  assert.deepEqual(q.weight.toF32(), w0);
  // layer 0 was merged before layer 1 failed: it is rolled back
  assert.ok(pm.adapterLayers().every(([, l]) => l.merged.length === 0));
  assert.ok(maxAbsDiff(q0.weight.toF32(), w00) < 1e-6);
});

test('several adapters: add (inactive), stack with weights, disable, delete', () => {
  const m = tinyModel();
  const base = logitsOf(m);
  const pm = new LoraModel(m, { target_modules: ['q_proj', 'v_proj'], r: 4 }, 'a', { rng: new Rng(1), ...quiet });
  pm.addAdapter('b', { target_modules: ['v_proj', 'up_proj'], r: 2, lora_alpha: 4 });
  randomizeAdapters(pm.namedParameters(), 9);
  assert.deepEqual(pm.activeAdapters, ['a']);
  const onlyA = logitsOf(m);
  assert.ok(
    pm.trainableParameters().every(([n]) => n.includes('.a.')),
    'only the active adapter trains',
  );
  pm.setAdapter('b');
  const onlyB = logitsOf(m);
  pm.setAdapter(['a', 'b']);
  const both = logitsOf(m);
  // outputs are nonlinear in the adapters, so compare with merging both: stacked == merged stack
  pm.merge();
  assert.ok(maxRelDiff(logitsOf(m), both) < 1e-5);
  pm.unmerge();
  assert.ok(maxRelDiff(onlyA, onlyB) > 1e-3 && maxRelDiff(both, onlyA) > 1e-3);
  // weights scale each adapter's scaling: weight 0 on b gives a alone
  pm.setAdapter(['a', 'b'], [1, 0]);
  assert.ok(maxRelDiff(logitsOf(m), onlyA) < 1e-6);
  pm.setAdapter(['a', 'b'], [1, 1]);
  // (the merge/unmerge above leaves the base weights within float rounding of the original)
  pm.disableAdapters();
  assert.ok(maxRelDiff(logitsOf(m), base) < 1e-6);
  pm.enableAdapters();
  assert.ok(maxRelDiff(logitsOf(m), both) < 1e-6);
  assert.ok(
    maxRelDiff(
      pm.withAdaptersDisabled(() => logitsOf(m)),
      base,
    ) < 1e-6,
  );
  pm.deleteAdapter('a');
  assert.deepEqual(pm.activeAdapters, ['b']);
  assert.ok(maxRelDiff(logitsOf(m), onlyB) < 1e-6);
  assert.ok(!(m.getModule('model.layers.0.self_attn.q_proj') instanceof LoraLinear), 'q_proj (only in a) is unwrapped');
  assert.throws(() => pm.setAdapter('a'), ConfigError);
  pm.deleteAdapter('b');
  assert.deepEqual(pm.activeAdapters, []);
  assert.ok(maxRelDiff(logitsOf(m), base) < 1e-6);
});

test('mixed batch: each row gets exactly the logits it gets alone with its adapter', () => {
  const m = tinyModel(7);
  const pm = new LoraModel(m, { target_modules: ['q_proj', 'v_proj', 'embed_tokens'], r: 4 }, 'a', {
    rng: new Rng(3),
    ...quiet,
  });
  pm.addAdapter('b', { target_modules: ['k_proj', 'down_proj', 'lm_head'], r: 2, lora_alpha: 32 });
  randomizeAdapters(pm.namedParameters(), 2);
  const rows = [IDS[0]!, IDS[1]!, IDS[1]!, IDS[0]!];
  const names = ['b', null, 'a', 'a'];
  const mixed = logitsOf(m, rows, names);
  const V = 48 * 6;
  names.forEach((n, i) => {
    let alone: Float32Array;
    if (n === null) alone = pm.withAdaptersDisabled(() => logitsOf(m, [rows[i]!]));
    else {
      pm.setAdapter(n);
      alone = logitsOf(m, [rows[i]!]);
    }
    assert.deepEqual(mixed.subarray(i * V, (i + 1) * V), alone, `row ${i} (${n})`);
  });
  assert.throws(() => logitsOf(m, rows, ['a', 'zzz', 'a', 'a']), /zzz/);
  assert.throws(() => logitsOf(m, rows, ['a']), /4 rows/);
});

test('modules_to_save: a trained copy per adapter, original kept', () => {
  const m = tinyModel();
  const base = logitsOf(m);
  const pm = new LoraModel(m, { target_modules: ['q_proj'], modules_to_save: ['lm_head'] }, 'default', {
    rng: new Rng(1),
  });
  const w = m.getModule('lm_head');
  assert.ok(w instanceof ModulesToSaveWrapper);
  const names = pm.trainableParameters().map(([n]) => n);
  assert.ok(names.includes('base_model.model.lm_head.modules_to_save.default.weight'));
  const copy = w.copies.get('default')!.getParam('weight')!;
  (copy.data as Float32Array)[0]! += 1;
  assert.ok(maxAbsDiff(logitsOf(m), base) > 0.1);
  assert.deepEqual(
    pm.withAdaptersDisabled(() => logitsOf(m)),
    base,
  );
});

test('training: gradients reach only the adapters; dropout is used in training', () => {
  const m = tinyModel();
  const pm = new LoraModel(m, { target_modules: ['q_proj', 'v_proj'], lora_dropout: 0.5, use_dora: false }, 'default', {
    rng: new Rng(1),
  });
  randomizeAdapters(pm.namedParameters());
  pm.train();
  const ids = intTensor(IDS.flat(), [2, 6]);
  const pos = intTensor([0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5], [2, 6]);
  const l1 = tidy(() => pm.loss(ids, ids, { positions: pos }).item());
  const l2 = tidy(() => pm.loss(ids, ids, { positions: pos }).item());
  assert.notEqual(l1, l2, 'dropout draws a new mask each forward');
  tidy(() => backward(pm.loss(ids, ids, { positions: pos })));
  for (const [n, p] of pm.namedParameters()) {
    if (/lora_[AB]/.test(n)) assert.ok(p.grad, `${n} has a gradient`);
    else assert.equal(p.grad, null, `${n} has no gradient`);
  }
  assert.throws(() => logitsOf(m, IDS, ['default', 'default']), /training/);
  pm.eval();
});

test('target matching errors name the problem', () => {
  assert.throws(() => new LoraModel(tinyModel(), { target_modules: ['nope'] }), /matched no module/);
  assert.throws(() => new LoraModel(tinyModel(), { target_modules: ['input_layernorm'] }), /RMSNorm/);
  assert.throws(() => new LoraModel(tinyModel(), { r: 0 }), /\br must be a positive integer/);
  assert.throws(() => new LoraModel(tinyModel(), { init_lora_weights: 'loftq' }), /init_lora_weights/);
});

test('training steps (LoRA, DoRA, dropout) and mixed-batch forwards do not grow memory', () => {
  const m = tinyModel(8);
  const pm = new LoraModel(m, { target_modules: ['q_proj', 'up_proj', 'embed_tokens'], lora_dropout: 0.2 }, 'a', {
    rng: new Rng(2),
  });
  pm.addAdapter('d', { target_modules: ['v_proj', 'down_proj'], use_dora: true, lora_dropout: 0.1 });
  randomizeAdapters(pm.namedParameters(), 3);
  const ids = intTensor(IDS.flat(), [2, 6]);
  const pos = intTensor([0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5], [2, 6]);
  const step = () => {
    tidy(() => backward(pm.loss(ids, ids, { positions: pos })));
    pm.zeroGrad();
  };
  pm.train();
  pm.setAdapter(['a', 'd']);
  step();
  const before = memoryStats().liveStorages;
  step();
  step();
  assert.equal(memoryStats().liveStorages, before, 'a training step leaked storage');
  pm.eval();
  pm.setAdapter('a');
  logitsOf(m, IDS, ['a', null]);
  const b2 = memoryStats().liveStorages;
  logitsOf(m, IDS, ['a', null]);
  logitsOf(m, IDS, [null, 'a']);
  assert.equal(memoryStats().liveStorages, b2, 'a mixed-batch forward leaked storage');
});

test("batched generation with per-row adapters gives each row its adapter's tokens", () => {
  const m = tinyModel(9);
  const pm = new LoraModel(m, { target_modules: ['q_proj', 'v_proj', 'o_proj'], r: 4 }, 'a', {
    rng: new Rng(3),
    ...quiet,
  });
  pm.addAdapter('b', { target_modules: ['gate_proj', 'down_proj'], r: 4, lora_alpha: 64 });
  randomizeAdapters(pm.namedParameters(), 11, 0.5);
  const prompts = [
    [3, 9, 4],
    [7, 1, 2, 5, 6],
    [3, 9, 4],
  ];
  const rows = ['a', 'b', null];
  const batch = generateBatch(m, prompts, { maxTokens: 6, temperature: 0, adapterRows: rows });
  rows.forEach((r, i) => {
    const alone = () => generateBatch(m, [prompts[i]!], { maxTokens: 6, temperature: 0 })[0];
    let want: number[] | undefined;
    if (r === null) want = pm.withAdaptersDisabled(alone);
    else {
      pm.setAdapter(r);
      want = alone();
    }
    assert.deepEqual(batch[i], want, `row ${i} (${r})`);
  });
  assert.notDeepEqual(batch[0], batch[2], 'the adapter changes the tokens');
});

test('QLoRA: LoRA on a 4-bit base layer (all-linear finds it), base output at init, gradients to A and B only', () => {
  const m = tinyModel(10);
  for (const path of ['model.layers.0.self_attn.q_proj', 'model.layers.1.mlp.up_proj'])
    m.setModule(path, Linear4bit.fromLinear(m.getModule(path) as Linear));
  const base = logitsOf(m);
  const pm = new LoraModel(m, { target_modules: 'all-linear', r: 2 }, 'default', { rng: new Rng(1), ...quiet });
  const q = m.getModule('model.layers.0.self_attn.q_proj');
  assert.ok(q instanceof LoraLinear && q.base instanceof Linear4bit);
  assert.deepEqual(logitsOf(m), base);
  randomizeAdapters(pm.namedParameters(), 4);
  const ids = intTensor(IDS.flat(), [2, 6]);
  const pos = intTensor([0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5], [2, 6]);
  pm.train();
  tidy(() => backward(pm.loss(ids, ids, { positions: pos })));
  assert.ok(q.loraA.get('default')!.weight.grad && q.loraB.get('default')!.weight.grad);
  assert.ok(pm.trainableParameters().every(([n]) => /lora_[AB]/.test(n)));
  pm.eval();
  assert.throws(() => pm.merge(), /Linear4bit/);
  assert.throws(() => pm.addAdapter('d', { target_modules: ['q_proj'], use_dora: true }), /DoRA/);
});
