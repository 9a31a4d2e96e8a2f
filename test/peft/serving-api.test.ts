// The PEFT API a multi-adapter server needs: adding, deleting and reading one adapter cost what that adapter
// holds (not the others), the key layout of an adapter before it is injected, strict loading, a base-weights
// policy, adapters held in memory (read, check, add), and per-row scales in mixed batches.

import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { ConfigError, FormatError } from '../../src/core/errors.ts';
import { Rng } from '../../src/core/rng.ts';
import type { Tensor } from '../../src/core/tensor.ts';
import { loadSafetensors, saveSafetensorsSync } from '../../src/formats/safetensors.ts';
import type { LlamaForCausalLM } from '../../src/models/llama.ts';
import { Linear } from '../../src/nn/layers.ts';
import { Module } from '../../src/nn/module.ts';
import { type LoraConfigInput, loraConfig } from '../../src/peft/lora/config.ts';
import { ADAPTER_WEIGHTS_NAME, adapterStateDict, loadAdapter, saveAdapter } from '../../src/peft/lora/io.ts';
import {
  LoraEmbedding,
  LoraLinear,
  LoraWeight,
  ModuleDict,
  ModulesToSaveWrapper,
  ParameterDict,
} from '../../src/peft/lora/layer.ts';
import { adapterLayout, EMBEDDING_PATHS, removeAdapterName } from '../../src/peft/lora/layout.ts';
import { LoraModel } from '../../src/peft/lora/model.ts';
import { ALL_LINEAR, EMBEDDING_LAYER_NAMES, fullMatch, resolveTargetModules } from '../../src/peft/lora/target.ts';
import {
  adapterWeightsBytes,
  addAdapterFromWeights,
  checkAdapterWeights,
  disposeAdapterWeights,
  readAdapterWeights,
} from '../../src/peft/lora/weights.ts';
import { AdapterCache } from '../../src/serve/adapter-cache.ts';
import { IDS, logitsOf, randomizeAdapters, tinyModel } from './helpers.ts';

const tmp = mkdtempSync(join(tmpdir(), 'lowrank-peft-serving-'));
after(() => rmSync(tmp, { recursive: true, force: true }));
const quiet = { onWarning: () => {} };

/** adapterStateDict as it was written before the per-adapter index: a scan of every parameter (the reference). */
function referenceStateDict(pm: LoraModel, name: string): Map<string, Tensor> {
  const cfg = pm.configs.get(name)!;
  const unwanted = pm.adapterNames.filter((n) => n !== name);
  const all = new Map<string, Tensor>();
  for (const [k, p] of pm.model.namedParameters())
    if (!unwanted.some((u) => k.includes(`.${u}.`) || k.endsWith(`.${u}`))) all.set(k, p);
  const chosen = new Map<string, Tensor>();
  const layers: [string, unknown][] = [];
  for (const [n, m] of pm.model.namedModules())
    if (m instanceof LoraLinear || m instanceof LoraEmbedding) layers.push([n, m]);
  for (const [path] of layers)
    for (const [k, p] of all)
      if (k.startsWith(`${path}.`) && !k.startsWith(`${path}.base_layer.`)) {
        const key = k.endsWith(`lora_magnitude_vector.${name}.weight`) ? k.slice(0, -'.weight'.length) : k;
        chosen.set(key, p);
      }
  if (cfg.bias === 'all') {
    for (const [k, p] of all) if (k === 'bias' || k.endsWith('.bias')) chosen.set(k, p);
  } else if (cfg.bias === 'lora_only') {
    for (const [path] of layers) {
      const k = `${path}.base_layer.bias`;
      if (all.has(k)) chosen.set(k, all.get(k)!);
    }
  }
  for (const [path, w] of pm.savedModules())
    if (w.has(name))
      for (const [k, p] of w.copies.get(name)!.namedParameters()) chosen.set(`${path}.modules_to_save.${name}.${k}`, p);
  const t = cfg.target_modules;
  const embTargeted =
    typeof t === 'string'
      ? t !== ALL_LINEAR &&
        [...pm.model.namedModules()].some(
          ([k]) => EMBEDDING_LAYER_NAMES.some((e) => new RegExp(`^(.*\\.)?${e}$`).test(k)) && fullMatch(t, k),
        )
      : !!t && EMBEDDING_LAYER_NAMES.some((e) => t.includes(e));
  if (embTargeted)
    for (const path of EMBEDDING_PATHS) {
      const l = pm.model.getModule(path);
      if (l instanceof LoraEmbedding || l instanceof LoraLinear)
        for (const [k, p] of all) if (k.startsWith(`${path}.base_layer.`)) chosen.set(k, p);
    }
  const out = new Map<string, Tensor>();
  for (const [k, p] of chosen) {
    let key = k;
    const mts = /^(.*)\.modules_to_save\.([^.]+)\.(.+)$/.exec(k);
    if (mts && mts[2] === name) key = `${mts[1]}.${mts[3]}`;
    out.set(`base_model.model.${removeAdapterName(key, name)}`, p);
  }
  return out;
}

const sorted = <T>(m: Map<string, T>) => [...m].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));

/** Adds every config in turn; after each, the plan's layout and the new state dict match the reference scan. */
function checkLayoutsAndStateDicts(m: LlamaForCausalLM, configs: [string, LoraConfigInput][]): LoraModel {
  const pm = new LoraModel(m, null, 'default', { rng: new Rng(1), ...quiet });
  for (const [name, cfg] of configs) {
    const plan = pm.planAdapter(name, cfg);
    const layout = adapterLayout(pm, plan);
    pm.addAdapter(name, cfg, { plan });
    const sd = adapterStateDict(pm, name);
    assert.deepEqual(
      sorted(sd).map(([k, t]) => [k, [...t.shape]]),
      sorted(layout).map(([k, e]) => [k, [...e.shape]]),
      `layout of '${name}'`,
    );
  }
  // every adapter's state dict (after all were added) equals the full-scan reference, tensor for tensor
  for (const name of pm.adapterNames) {
    const got = sorted(adapterStateDict(pm, name));
    const want = sorted(referenceStateDict(pm, name));
    assert.deepEqual(
      got.map(([k]) => k),
      want.map(([k]) => k),
      `keys of '${name}'`,
    );
    got.forEach(([k, t], i) => {
      assert.equal(t, want[i]![1], `tensor ${k} of '${name}'`);
    });
  }
  return pm;
}

test('adapterStateDict and the pre-injection layout equal the full-scan reference (LoRA, DoRA, embeddings, modules_to_save, biases)', () => {
  checkLayoutsAndStateDicts(tinyModel(2), [
    ['default', { target_modules: ['q_proj', 'v_proj', 'embed_tokens'], r: 4, modules_to_save: ['model.norm'] }],
    ['dora', { target_modules: ['k_proj', 'down_proj'], r: 2, use_dora: true, rank_pattern: { down_proj: 3 } }],
    ['head', { target_modules: ['lm_head', 'q_proj'], r: 2 }],
    ['embdora', { target_modules: ['embed_tokens'], r: 2, use_dora: true }],
    ['regex', { target_modules: '.*\\.(o_proj|embed_tokens)', r: 3 }],
    ['alllin', { target_modules: 'all-linear', r: 2, exclude_modules: ['up_proj'] }],
  ]);
  checkLayoutsAndStateDicts(tinyModel(3, { attention_bias: true }), [
    ['x', { target_modules: ['q_proj'], r: 2 }],
    ['lo', { target_modules: ['q_proj', 'k_proj'], lora_bias: true, bias: 'lora_only' }],
    ['saves', { target_modules: ['v_proj'], modules_to_save: ['lm_head', 'norm'] }],
  ]);
  checkLayoutsAndStateDicts(tinyModel(3, { attention_bias: true }), [
    ['saves', { target_modules: ['k_proj'], modules_to_save: ['lm_head'] }],
    ['all', { target_modules: ['q_proj'], bias: 'all', modules_to_save: ['lm_head'] }],
  ]);
  // 'all-linear' on a model with >= 20 linear layers: condensed over every module name, as PEFT does
  const deep = checkLayoutsAndStateDicts(tinyModel(5, { num_hidden_layers: 3 }), [
    ['first', { target_modules: ['q_proj'], modules_to_save: ['lm_head'] }],
  ]);
  const all = [...deep.model.namedModules()];
  const byName = new Map(all);
  const holders = all.filter(([, m]) => m instanceof LoraLinear || m instanceof ModulesToSaveWrapper).map(([n]) => n);
  const oldWay = resolveTargetModules(
    loraConfig({ target_modules: 'all-linear' }),
    'llama',
    all.map(([n]) => n),
    (n) => byName.get(n) instanceof Linear || byName.get(n) instanceof LoraLinear,
    (n) => holders.some((h) => n.startsWith(`${h}.`)),
    'lm_head',
  );
  assert.ok(Array.isArray(oldWay) && oldWay.length < 21, JSON.stringify(oldWay));
  assert.deepEqual(deep.planAdapter('wide', { target_modules: 'all-linear' }).config.target_modules, oldWay);
  // bias 'all' that wraps new layers and new saved modules: their biases change names
  checkLayoutsAndStateDicts(tinyModel(4, { attention_bias: true }), [
    ['all', { target_modules: ['q_proj', 'v_proj'], bias: 'all', modules_to_save: ['lm_head'] }],
  ]);
});

/** Calls of the methods that walk adapter internals (ModuleDict / ParameterDict / LoraWeight children and parameters). */
function countInternalWalks<T>(fn: () => T): number {
  let calls = 0;
  const patched: [object, string, unknown][] = [];
  for (const proto of [ModuleDict.prototype, ParameterDict.prototype, Module.prototype])
    for (const m of ['namedParameters', 'namedModules', 'namedChildren', 'parameters'] as const) {
      const own = Object.getOwnPropertyDescriptor(proto, m);
      if (!own) continue;
      const orig = own.value as (...a: unknown[]) => unknown;
      patched.push([proto, m, orig]);
      Object.defineProperty(proto, m, {
        ...own,
        value: function (this: Module, ...a: unknown[]) {
          if (this instanceof ModuleDict || this instanceof ParameterDict || this instanceof LoraWeight) calls++;
          return orig.apply(this, a);
        },
      });
    }
  try {
    fn();
  } finally {
    for (const [proto, m, orig] of patched)
      Object.defineProperty(proto, m, { ...Object.getOwnPropertyDescriptor(proto, m)!, value: orig });
  }
  return calls;
}

test('adding, reading and deleting one adapter never walks the other adapters', () => {
  const cfg = { target_modules: ['q_proj', 'v_proj', 'down_proj'], r: 4, inference_mode: true };
  const walks = (existing: number) => {
    const pm = new LoraModel(tinyModel(1), null, 'default', quiet);
    for (let i = 0; i < existing; i++) pm.addAdapter(`a${i}`, cfg, { forLoading: true, activate: false });
    // the probe sees a whole-model walk, and it grows with the adapters
    const full = countInternalWalks(() => [...pm.namedParameters()]);
    const one = countInternalWalks(() => {
      pm.addAdapter('x', cfg, { forLoading: true, activate: false });
      adapterStateDict(pm, 'x');
      pm.deleteAdapter('x');
    });
    return { full, one };
  };
  const few = walks(1);
  const many = walks(24);
  assert.ok(few.full > 0 && many.full > few.full, JSON.stringify({ few, many }));
  assert.equal(many.one, few.one, 'the same walks with 1 and with 24 other adapters');
  // 2 layers x 3 targets x (A, B): a few visits per matrix of the new adapter
  assert.ok(few.one <= 8 * 12, `only the new adapter's own matrices are visited (${few.one})`);
});

test('activate: false leaves even the first adapter inactive; trainable flags follow the active adapters', () => {
  const m = tinyModel(1);
  const pm = new LoraModel(m, null, 'default', quiet);
  pm.addAdapter('a', { target_modules: ['q_proj'] }, { activate: false });
  assert.deepEqual(pm.activeAdapters, []);
  assert.equal(pm.trainableSummary().trainable, 0);
  pm.addAdapter('b', { target_modules: ['q_proj', 'v_proj'], modules_to_save: ['lm_head'] });
  assert.equal(pm.trainableSummary().trainable, 0, 'an added inactive adapter is frozen, its saved copy too');
  pm.setAdapter('b');
  const names = pm.trainableParameters().map(([n]) => n);
  assert.ok(names.length > 0 && names.every((n) => n.includes('.b.')), names.join());
  pm.setAdapter('a');
  assert.ok(pm.trainableParameters().every(([n]) => n.includes('.a.')));
  pm.deleteAdapter('a');
  assert.deepEqual(pm.activeAdapters, ['b']);
  assert.ok(pm.trainableParameters().every(([n]) => n.includes('.b.')));
});

async function savedAdapter(dir: string, cfg: LoraConfigInput, seed = 3): Promise<Float32Array> {
  const m = tinyModel(2);
  const pm = new LoraModel(m, cfg, 'default', { rng: new Rng(seed), ...quiet });
  randomizeAdapters(pm.namedParameters(), seed);
  await saveAdapter(pm, dir);
  return logitsOf(m);
}

test('strict loading throws a FormatError naming the file and the keys; non-strict warns as PEFT', async () => {
  const dir = join(tmp, 'strict');
  await savedAdapter(dir, { target_modules: ['q_proj', 'v_proj'], r: 2 });
  const file = join(dir, ADAPTER_WEIGHTS_NAME);
  const { tensors, metadata } = loadSafetensors(file);
  const dropKey = 'base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight';
  const { [dropKey]: dropped, ...rest } = tensors;
  assert.ok(dropped);
  const extraKey = 'base_model.model.model.layers.0.mlp.up_proj.lora_A.weight';
  saveSafetensorsSync(
    file,
    { ...rest, [extraKey]: rest['base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight']! },
    metadata,
  );
  const m = tinyModel(2);
  const before = [...m.namedParameters()].length;
  assert.throws(
    () => loadAdapter(m, dir, { strict: true, ...quiet }),
    (e: unknown) =>
      e instanceof FormatError &&
      e.message.includes(file) &&
      e.message.includes(`missing adapter keys: ${dropKey}`) &&
      e.message.includes(`unexpected keys: ${extraKey}`),
  );
  assert.equal([...m.namedParameters()].length, before, 'the model is unchanged');
  assert.ok(!(m.getModule('model.layers.0.self_attn.q_proj') instanceof LoraLinear));
  const warnings: string[] = [];
  loadAdapter(m, dir, { onWarning: (w) => warnings.push(w) });
  assert.equal(warnings.length, 2);
  assert.match(warnings[0]!, /missing adapter keys \(left at their initial values\): .*v_proj\.lora_B\.weight/);
  assert.match(warnings[1]!, /unexpected keys ignored: .*up_proj\.lora_A\.weight/);
});

test("baseWeights: 'load' writes a targeted embedding's base weights, 'skip' leaves them, 'refuse' throws", async () => {
  const dir = join(tmp, 'emb');
  await savedAdapter(dir, { target_modules: ['q_proj', 'embed_tokens', 'lm_head'], r: 2 });
  const embOf = (m: LlamaForCausalLM) =>
    (m.getModule('model.embed_tokens') as unknown as { weight: Tensor }).weight.toF32();
  const headOf = (m: LlamaForCausalLM) => (m.getModule('lm_head') as unknown as { weight: Tensor }).weight.toF32();
  const saved = tinyModel(2);
  // a model with other base weights of the same shapes
  const fresh = () => tinyModel(9);
  const own = fresh();
  const [ownEmb, ownHead] = [embOf(own), headOf(own)];
  assert.notDeepEqual(ownEmb, embOf(saved));

  const loaded = fresh();
  const pmLoaded = loadAdapter(loaded, dir, quiet);
  assert.deepEqual(embOf(loaded), embOf(saved), "'load' (the default, PEFT's behaviour) writes the saved copies");

  const skipped = fresh();
  const warnings: string[] = [];
  const pmSkipped = loadAdapter(skipped, dir, {
    baseWeights: 'skip',
    strict: true,
    onWarning: (w) => warnings.push(w),
  });
  assert.deepEqual(embOf(skipped), ownEmb);
  assert.deepEqual(headOf(skipped), ownHead);
  assert.deepEqual(warnings, []);
  // the adapter's own tensors are loaded all the same
  const sdSkipped = adapterStateDict(pmSkipped, 'default');
  const adapterKeys = [...adapterStateDict(pmLoaded, 'default')].filter(([k]) => !k.includes('base_layer'));
  assert.equal(adapterKeys.length, 2 * 2 + 2 + 2);
  for (const [k, t] of adapterKeys) assert.deepEqual(sdSkipped.get(k)!.toF32(), t.toF32(), k);

  const refused = fresh();
  assert.throws(
    () => loadAdapter(refused, dir, { baseWeights: 'refuse', ...quiet }),
    (e: unknown) =>
      e instanceof FormatError &&
      /holds base-model weights \(.*embed_tokens\.base_layer\.weight/.test((e as Error).message) &&
      (e as Error).message.includes(dir),
  );
  assert.deepEqual(embOf(refused), ownEmb);
  assert.ok(!(refused.getModule('model.embed_tokens') instanceof LoraEmbedding), 'nothing was injected');
  // an adapter without base weights loads under 'refuse'
  const plain = join(tmp, 'plain');
  await savedAdapter(plain, { target_modules: ['q_proj'], r: 2 });
  loadAdapter(fresh(), plain, { baseWeights: 'refuse', strict: true, ...quiet });
  // PiSSA rewrites the base when loaded: refused under 'skip' and 'refuse'
  const pissa = join(tmp, 'pissa');
  await savedAdapter(pissa, { target_modules: ['q_proj'], r: 2, init_lora_weights: 'pissa' });
  const pm = fresh();
  const q = (pm.getModule('model.layers.0.self_attn.q_proj') as unknown as { weight: Tensor }).weight.toF32();
  assert.throws(() => loadAdapter(pm, pissa, { baseWeights: 'skip', ...quiet }), ConfigError);
  assert.deepEqual(
    (pm.getModule('model.layers.0.self_attn.q_proj') as unknown as { weight: Tensor }).weight.toF32(),
    q,
  );
});

test('adapters held in memory: read without a model, check without injecting, add equals loadAdapter', async () => {
  const dir = join(tmp, 'mem');
  const want = await savedAdapter(dir, {
    target_modules: ['q_proj', 'v_proj', 'down_proj'],
    r: 4,
    lora_alpha: 8,
    rank_pattern: { down_proj: 2 },
    use_rslora: true,
  });
  const w = readAdapterWeights(dir, quiet);
  assert.equal(w.config.r, 4);
  assert.equal(w.tensors.size, 2 * 3 * 2);
  assert.equal(
    adapterWeightsBytes(w),
    [...w.tensors.values()].reduce((s, t) => s + 4 * t.size, 0),
  );
  const m = tinyModel(2);
  const pm = new LoraModel(m, null, 'default', quiet);
  const check = checkAdapterWeights(pm, w, { strict: true, baseWeights: 'refuse' });
  assert.equal(check.layers.length, 6);
  assert.deepEqual(check.missing, []);
  assert.equal(check.load.length, 12);
  assert.deepEqual(pm.adapterNames, []);
  assert.ok(!(m.getModule('model.layers.0.self_attn.q_proj') instanceof LoraLinear), 'checking injects nothing');
  addAdapterFromWeights(pm, 'one', w, { strict: true });
  addAdapterFromWeights(pm, 'two', w, { strict: true, activate: false });
  assert.deepEqual(pm.activeAdapters, ['one']);
  assert.deepEqual(logitsOf(m), want);
  pm.setAdapter('two');
  assert.deepEqual(logitsOf(m), want, 'the same weights, usable again');
  // the in-memory path gives what loadAdapter gives, tensor for tensor
  const viaDir = loadAdapter(tinyModel(2), dir, quiet);
  const a = adapterStateDict(pm, 'one');
  for (const [k, t] of adapterStateDict(viaDir, 'default')) assert.deepEqual(a.get(k)!.toF32(), t.toF32(), k);
  // a plain model is wrapped, as loadAdapter does
  const m3 = tinyModel(2);
  addAdapterFromWeights(m3, 'x', w);
  assert.deepEqual(logitsOf(m3), want);
  // a tensor of the wrong shape is refused before the model changes
  const bad = readAdapterWeights(dir, quiet);
  const key = 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight';
  bad.tensors.get(key)!.dispose();
  bad.tensors.set(key, w.tensors.get('base_model.model.model.layers.0.mlp.down_proj.lora_A.weight')!);
  assert.throws(() => checkAdapterWeights(pm, bad), /q_proj\.lora_A\.weight' has shape \[2, 24\]/);
  assert.throws(() => addAdapterFromWeights(pm, 'bad', bad), FormatError);
  assert.ok(!pm.configs.has('bad'));
  bad.tensors.delete(key);
  disposeAdapterWeights(bad);
  disposeAdapterWeights(w);
  assert.equal(w.tensors.size, 0);
  assert.deepEqual(logitsOf(m), want, 'the model holds its own copies');
});

test('mixed batches with per-row scales: each row equals its adapter alone at that scale', () => {
  const m = tinyModel(7);
  const pm = new LoraModel(m, { target_modules: ['q_proj', 'v_proj', 'embed_tokens'], r: 4 }, 'a', {
    rng: new Rng(3),
    ...quiet,
  });
  pm.addAdapter('b', { target_modules: ['k_proj', 'down_proj', 'lm_head'], r: 2, lora_alpha: 32, lora_bias: true });
  randomizeAdapters(pm.namedParameters(), 2);
  for (const [n, p] of pm.namedParameters())
    if (n.endsWith('lora_B.b.bias')) (p.data as Float32Array).fill(0.05, p.offset, p.offset + p.size);
  const rows = [IDS[0]!, IDS[1]!, IDS[1]!, IDS[0]!, IDS[0]!, IDS[1]!];
  const sel = [
    { name: 'a', scale: 0.5 },
    'a',
    null,
    { name: 'b', scale: -1.5 },
    { name: 'a', scale: 0.5 },
    { name: 'b' },
  ];
  const mixed = logitsOf(m, rows, sel);
  const V = 48 * 6;
  sel.forEach((s, i) => {
    let alone: Float32Array;
    if (s === null) alone = pm.withAdaptersDisabled(() => logitsOf(m, [rows[i]!]));
    else {
      const { name, scale = 1 } = typeof s === 'string' ? { name: s } : s;
      pm.setAdapter(name, [scale]);
      alone = logitsOf(m, [rows[i]!]);
      pm.setAdapterWeight(name, 1);
    }
    assert.deepEqual(mixed.subarray(i * V, (i + 1) * V), alone, `row ${i} (${JSON.stringify(s)})`);
  });
  // scale 1 is the plain name; 0 is the base model
  assert.deepEqual(
    logitsOf(
      m,
      rows,
      sel.map((s) => (s && typeof s === 'object' ? s.name : s)),
    ),
    logitsOf(
      m,
      rows,
      sel.map((s) => (s && typeof s === 'object' ? { name: s.name, scale: 1 } : s)),
    ),
  );
  const zero = logitsOf(m, [IDS[0]!], [{ name: 'a', scale: 0 }]);
  assert.deepEqual(
    zero,
    pm.withAdaptersDisabled(() => logitsOf(m, [IDS[0]!])),
  );
  for (const badRow of [{ name: 'a', scale: Number.NaN }, { name: 'a', scale: '2' }, { scale: 2 }, ['a']])
    assert.throws(() => logitsOf(m, [IDS[0]!], [badRow]), ConfigError, JSON.stringify(badRow));
  assert.throws(() => logitsOf(m, [IDS[0]!], [{ name: 'zzz', scale: 2 }]), /zzz/);
});

test("the server's adapter cache on this API: scaled requests share one slot, mixtures stack exactly the adapted layers", async () => {
  const dirA = join(tmp, 'cache-a');
  const dirP = join(tmp, 'cache-p');
  await savedAdapter(dirA, { target_modules: ['q_proj', 'v_proj'], r: 4, inference_mode: true }, 11);
  // only layer 0's k_proj: a mixture with it must not reach layer 1's k_proj
  await savedAdapter(dirP, { target_modules: ['k_proj'], layers_to_transform: [0], r: 2, lora_alpha: 8 }, 12);
  const m = tinyModel(2);
  const cache = new AdapterCache(m, { maxLoras: 2, maxCpuLoras: 4, maxCpuLoraBytes: 1e9 });
  const A = { name: 'a', version: 1, path: dirA, weight: 1 };
  const P = { name: 'p', version: 1, path: dirP, weight: 1 };
  const la = cache.acquire([A])!;
  const lh = cache.acquire([{ ...A, weight: 0.5 }])!;
  let s = cache.stats();
  assert.deepEqual([s.resident, s.residentSlots, s.loads], [2, 1, 1], 'one slot for a and a*0.5');
  const mix = cache.acquire([
    { ...A, weight: 0.7 },
    { ...P, weight: 0.3 },
  ])!;
  s = cache.stats();
  assert.deepEqual([s.resident, s.residentSlots, s.loads], [3, 2, 2]);
  assert.equal(cache.acquire([P]), null, 'both slots held');
  const rows = cache.rows([la, lh, null, mix]);
  assert.deepEqual((rows as unknown[]).slice(0, 3), ['s1', { name: 's1', scale: 0.5 }, null]);
  const batch = [IDS[0]!, IDS[1]!, IDS[0]!, IDS[1]!];
  const got = logitsOf(m, batch, rows);
  // references: the same adapters loaded the PEFT way into a fresh copy of the base
  const ref = tinyModel(2);
  const pm = loadAdapter(ref, dirA, { adapterName: 'a', ...quiet });
  loadAdapter(pm, dirP, { adapterName: 'p', ...quiet });
  const V = 48 * 6;
  const row = (i: number) => got.subarray(i * V, (i + 1) * V);
  pm.setAdapter('a');
  assert.deepEqual(row(0), logitsOf(ref, [batch[0]!]));
  pm.setAdapter('a', [0.5]);
  assert.deepEqual(row(1), logitsOf(ref, [batch[1]!]), 'a scaled row equals the adapter alone at that scale');
  assert.deepEqual(
    row(2),
    pm.withAdaptersDisabled(() => logitsOf(ref, [batch[2]!])),
  );
  pm.setAdapter(['a', 'p'], [0.7, 0.3]);
  const want = logitsOf(ref, [batch[3]!]);
  let err = 0;
  for (let i = 0; i < V; i++) err = Math.max(err, Math.abs(row(3)[i]! - want[i]!));
  assert.ok(err < 1e-5, `mixture = 0.7 a + 0.3 p (max abs diff ${err})`);
  const k1 = m.getModule('model.layers.1.self_attn.k_proj');
  assert.ok(!(k1 instanceof LoraLinear), "the mixture leaves layer 1's k_proj alone");
  // releasing frees the slots for eviction; the base weights never changed
  for (const l of [la, lh, mix]) cache.release(l);
  assert.ok(cache.acquire([P]));
  cache.dispose();
  const base = tinyModel(2);
  assert.deepEqual(logitsOf(m), logitsOf(base), 'the base model is untouched');
});
