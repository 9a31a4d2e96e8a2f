// The serving engine in-process: continuous batching and chunked prefill give exactly what generate() gives,
// batches mixing adapters equal each adapter alone, admission control, cancellation, stops, the scheduler.

import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import type { RequestError } from '../../src/core/errors.ts';
import { generate } from '../../src/models/generate.ts';
import { kvBytesPerToken } from '../../src/models/kv-cache.ts';
import { loadModel } from '../../src/models/load.ts';
import { DEFAULT_SAMPLING, type SamplingParams } from '../../src/models/sampling.ts';
import { loadAdapter } from '../../src/peft/lora/io.ts';
import { AdapterCache } from '../../src/serve/adapter-cache.ts';
import { Engine, type EngineEvent, type EngineOptions, type EngineRequest } from '../../src/serve/engine.ts';
import { Scheduler } from '../../src/serve/scheduler.ts';
import { loadTokenizer } from '../../src/tokenize/hf.ts';
import { continuation, STORIES, skipNoStories, writeAdapter } from './helpers.ts';

const GREEDY: SamplingParams = { ...DEFAULT_SAMPLING, temperature: 0 };
const OPTS: EngineOptions = {
  maxNumSeqs: 4,
  kvBudgetTokens: 10_000,
  prefillChunk: 8,
  starvationMs: 1000,
  maxModelLen: 512,
};
const tmp = mkdtempSync(join(tmpdir(), 'lowrank-engine-'));
after(() => rmSync(tmp, { recursive: true, force: true }));

interface Outcome {
  text: string;
  events: EngineEvent[];
}

/** Steps the engine until idle; `during(step)` may submit more. Returns every request's text and events. */
function drive(engine: Engine, during?: (step: number) => void, check?: () => void): Map<string, Outcome> {
  const out = new Map<string, Outcome>();
  let step = 0;
  while (engine.hasWork() || step === 0) {
    during?.(step);
    for (const ev of engine.step()) {
      const o = out.get(ev.id) ?? { text: '', events: [] };
      if (ev.type === 'delta') o.text += ev.text;
      o.events.push(ev);
      out.set(ev.id, o);
    }
    check?.();
    step++;
    assert.ok(step < 5000, 'the engine does not finish');
  }
  return out;
}

const req = (id: string, prompt: number[], maxTokens: number, more: Partial<EngineRequest> = {}): EngineRequest => ({
  id,
  prompt,
  maxTokens,
  sampling: GREEDY,
  ...more,
});

test('continuous batching with chunked prefill gives exactly the tokens of generate() (f32, and bf16 with its KV)', {
  skip: skipNoStories,
}, async () => {
  for (const dtype of ['f32', 'bf16'] as const) await batchingCase(dtype);
});

async function batchingCase(dtype: 'f32' | 'bf16'): Promise<void> {
  const { model, config } = await loadModel(STORIES, { dtype });
  const tok = loadTokenizer(STORIES);
  const prompts = [
    'Once upon a time',
    'Tom had a red ball and',
    'Lily',
    'The sun was shining and the birds were singing in the big green park near the old house',
    'A dog',
    'One day, a little boy named Tim went to the store with his mom. He saw',
  ];
  const engine = new Engine(model, tok, null, OPTS);
  assert.equal(engine.kvDtype, dtype, "'auto': the model's dtype");
  assert.equal(engine.stats().kvBytesPerToken, kvBytesPerToken(config, dtype));
  const lens = prompts.map((_, i) => 12 + 5 * i);
  // requests join at different steps while others decode; max 4 run at once, prompts longer than 8 are chunked
  const out = drive(engine, (step) => {
    prompts.forEach((p, i) => {
      if (step === i * 3) engine.submit(req(`r${i}`, tok.encode(p), lens[i]!));
    });
  });
  prompts.forEach((p, i) => {
    const ref = generate(model, tok, tok.encode(p), { maxTokens: lens[i], temperature: 0 });
    const o = out.get(`r${i}`)!;
    assert.equal(o.text, continuation(tok, tok.encode(p), ref.tokens), `${dtype} prompt ${i}`);
    const done = o.events.find((e) => e.type === 'done');
    assert.ok(done && done.type === 'done');
    assert.equal(done.finishReason, ref.finishReason);
    assert.equal(done.completionTokens, ref.completionTokens);
    assert.equal(done.promptTokens, tok.encode(p).length);
  });
  assert.equal(engine.stats().kvUsedTokens, 0);
  engine.dispose();
  model.dispose();
}

test('seeded sampling gives the tokens of generate() with the same seed and parameters', {
  skip: skipNoStories,
}, async () => {
  const { model } = await loadModel(STORIES);
  const tok = loadTokenizer(STORIES);
  const engine = new Engine(model, tok, null, OPTS);
  const sampling: SamplingParams = { temperature: 0.9, topK: 40, topP: 0.95, minP: 0.01, repetitionPenalty: 1.1 };
  const ids = tok.encode('Once upon a time');
  engine.submit(req('a', ids, 30, { sampling, seed: 1234 }));
  engine.submit(req('b', tok.encode('The cat'), 30, { sampling, seed: 99 }));
  const out = drive(engine);
  const ref = generate(model, tok, ids, { maxTokens: 30, seed: 1234, ...sampling });
  assert.equal(out.get('a')!.text, continuation(tok, ids, ref.tokens));
  engine.dispose();
  model.dispose();
});

test('a batch mixing adapters and the base gives each row what it gives alone', { skip: skipNoStories }, async () => {
  const a = writeAdapter(join(tmp, 'a'), { seed: 11, r: 4, std: 0.15 });
  const b = writeAdapter(join(tmp, 'b'), {
    seed: 12,
    r: 8,
    std: 0.15,
    targets: ['k_proj', 'o_proj', 'gate_proj', 'up_proj'],
  });
  const tok = loadTokenizer(STORIES);
  const ids = tok.encode('Once upon a time');
  // references: PEFT-style loading into a plain model, one adapter at a time
  const ref = async (dir: string | null, weight = 1) => {
    const { model } = await loadModel(STORIES);
    if (dir) loadAdapter(model, dir, { adapterName: 'x' }).setAdapter('x', [weight]);
    const text = continuation(tok, ids, generate(model, tok, ids, { maxTokens: 20, temperature: 0 }).tokens);
    model.dispose();
    return text;
  };
  const [rBase, rA, rB, rAhalf] = [await ref(null), await ref(a), await ref(b), await ref(a, 0.5)];
  assert.notEqual(rA, rBase);
  assert.notEqual(rB, rBase);
  assert.notEqual(rA, rB);

  const { model } = await loadModel(STORIES);
  const cache = new AdapterCache(model, { maxLoras: 4, maxCpuLoras: 4, maxCpuLoraBytes: 1e9 });
  const engine = new Engine(model, tok, cache, { ...OPTS, maxNumSeqs: 8 });
  const A = { name: 'a', version: 1, path: a, weight: 1 };
  const B = { name: 'b', version: 1, path: b, weight: 1 };
  engine.submit(req('base', ids, 20));
  engine.submit(req('a', ids, 20, { adapters: [A] }));
  engine.submit(req('b', ids, 20, { adapters: [B] }));
  engine.submit(req('a2', ids, 20, { adapters: [A] }));
  engine.submit(req('ahalf', ids, 20, { adapters: [{ ...A, weight: 0.5 }] }));
  engine.submit(req('mixA', ids, 20, { adapters: [A, { ...B, weight: 0 }] }));
  const out = drive(engine);
  assert.equal(out.get('base')!.text, rBase);
  assert.equal(out.get('a')!.text, rA);
  assert.equal(out.get('a2')!.text, rA);
  assert.equal(out.get('b')!.text, rB);
  assert.equal(out.get('ahalf')!.text, rAhalf);
  // a mixture where b weighs 0 computes a alone (A and B stacked along the rank)
  assert.equal(out.get('mixA')!.text, rA);
  const s = cache.stats();
  assert.equal(s.loads, 2);
  assert.equal(s.resident, 4); // a, b, a*0.5, a+b*0
  engine.dispose();
  cache.dispose();
  model.dispose();
});

test('admission control: requests wait while their KV reservation would not fit', { skip: skipNoStories }, async () => {
  const { model } = await loadModel(STORIES);
  const tok = loadTokenizer(STORIES);
  const engine = new Engine(model, tok, null, { ...OPTS, kvBudgetTokens: 60 });
  const ids = tok.encode('Once upon a time'); // 5 tokens: 5 + 30 = 35 reserved each, two do not fit
  for (let i = 0; i < 3; i++) engine.submit(req(`r${i}`, ids, 30));
  engine.submit(req('huge', ids, 100)); // can never fit
  let maxRunning = 0;
  const out = drive(engine, undefined, () => {
    const s = engine.stats();
    maxRunning = Math.max(maxRunning, s.running);
    assert.ok(s.kvUsedTokens <= 60, `reserved ${s.kvUsedTokens} > budget`);
  });
  assert.equal(maxRunning, 1);
  for (let i = 0; i < 3; i++) assert.ok(out.get(`r${i}`)!.events.some((e) => e.type === 'done'));
  const huge = out.get('huge')!.events[0]!;
  assert.equal(huge.type, 'error');
  assert.equal(huge.type === 'error' && huge.status, 400);
  engine.dispose();
  model.dispose();
});

test('cancel frees a running request at once; stop strings end the text before them', {
  skip: skipNoStories,
}, async () => {
  const { model } = await loadModel(STORIES);
  const tok = loadTokenizer(STORIES);
  const engine = new Engine(model, tok, null, OPTS);
  const ids = tok.encode('Once upon a time');
  engine.submit(req('long', ids, 200));
  for (let i = 0; i < 3; i++) engine.step();
  assert.equal(engine.stats().running, 1);
  engine.cancel('long');
  assert.equal(engine.stats().running, 0);
  assert.equal(engine.stats().kvUsedTokens, 0);
  assert.deepEqual(engine.step(), []);
  assert.equal(engine.hasWork(), false);

  engine.submit(req('stop', ids, 40, { stop: [' girl', 'zzz'] }));
  const o = drive(engine).get('stop')!;
  assert.equal(o.text, ', there was a little');
  const done = o.events.at(-1)!;
  assert.equal(done.type === 'done' && done.finishReason, 'stop');
  // a stop token id ends generation without text for it
  const first = generate(model, tok, ids, { maxTokens: 3, temperature: 0 }).tokens;
  engine.submit(req('tok', ids, 40, { stopTokenIds: [first[2]!] }));
  const t = drive(engine).get('tok')!;
  assert.equal(t.text, continuation(tok, ids, first.slice(0, 2)));
  // the completion continues the prompt's text: "Once" + " upon", not "upon"
  const once = tok.encode('Once');
  engine.submit(req('space', once, 3));
  const sp = drive(engine).get('space')!.text;
  assert.equal(sp, continuation(tok, once, generate(model, tok, once, { maxTokens: 3, temperature: 0 }).tokens));
  assert.ok(sp.startsWith(' '), JSON.stringify(sp));
  engine.dispose();
  model.dispose();
});

test('scheduler: a request blocked on adapter slots is overtaken until it has waited starvationMs', () => {
  type S = {
    reserve: number;
    promptLength: number;
    prefilled: number;
    arrival: number;
    state: 'waiting' | 'prefill' | 'decode' | 'done';
    id: string;
  };
  const mk = (id: string, arrival: number): S => ({
    id,
    reserve: 10,
    promptLength: 4,
    prefilled: 0,
    arrival,
    state: 'waiting',
  });
  const sched = new Scheduler<S>({ maxNumSeqs: 8, kvBudgetTokens: 1000, prefillChunk: 16, starvationMs: 100 });
  const blocked = mk('blocked', 0);
  sched.enqueue(blocked);
  sched.enqueue(mk('x', 1));
  const acquire = (s: S) => (s.id === 'blocked' ? 'blocked' : 'ok');
  assert.deepEqual(
    sched.admit(50, acquire).map((s) => s.id),
    ['x'],
  );
  sched.enqueue(mk('y', 60));
  // after 100 ms the head stops being overtaken
  assert.deepEqual(sched.admit(150, acquire), []);
  assert.equal(sched.waiting.length, 2);
  // memory is first come, first served: a big head blocks smaller ones behind it
  const s2 = new Scheduler<S>({ maxNumSeqs: 8, kvBudgetTokens: 15, prefillChunk: 16, starvationMs: 100 });
  s2.enqueue({ ...mk('big', 0), reserve: 20 });
  s2.enqueue(mk('small', 1));
  assert.deepEqual(
    s2.admit(0, () => 'ok'),
    [],
  );
  // prefill groups stay within the chunk budget
  const s3 = new Scheduler<S>({ maxNumSeqs: 8, kvBudgetTokens: 1000, prefillChunk: 10, starvationMs: 100 });
  for (const [id, n] of [
    ['a', 8],
    ['b', 7],
  ] as const)
    s3.enqueue({ ...mk(id, 0), promptLength: n });
  s3.admit(0, () => 'ok');
  const groups = s3.prefillGroups();
  assert.equal(
    groups.flat().reduce((s, g) => s + g.n, 0),
    10,
  );
});

test('adapter cache: LRU in both tiers, held sets are never evicted, replaced ones go on their last release', {
  skip: skipNoStories,
}, async () => {
  const { model } = await loadModel(STORIES);
  const dirs = ['a', 'b', 'c'].map((n, i) => writeAdapter(join(tmp, `lru-${n}`), { seed: 20 + i, r: 2 + 2 * i }));
  const ref = (i: number, version = 1) => ({ name: 'abc'[i]!, version, path: dirs[i]!, weight: 1 });
  const cache = new AdapterCache(model, { maxLoras: 2, maxCpuLoras: 2, maxCpuLoraBytes: 1e9 });
  const la = cache.acquire([ref(0)])!;
  const lb = cache.acquire([ref(1)])!;
  // both slots held: a third set must wait
  assert.equal(cache.acquire([ref(2)]), null);
  cache.release(la);
  const lc = cache.acquire([ref(2)])!; // evicts a (resident) and, with 3 in host memory, a's host copy
  let s = cache.stats();
  assert.deepEqual([s.loads, s.evictionsResident, s.evictionsHost, s.resident, s.host], [3, 1, 1, 2, 2]);
  assert.deepEqual(s.residentNames, ['b', 'c']);
  cache.release(lc);
  assert.equal(cache.acquire([ref(1)]), lb, 'a resident hit is the same set');
  assert.equal(cache.stats().hitsResident, 1);
  // b is replaced while two leases hold it: it leaves the cache but stays in the model until released
  cache.drop('b', 2);
  s = cache.stats();
  assert.equal(s.resident, 2);
  assert.deepEqual(s.residentNames, ['c']);
  cache.release(lb);
  cache.release(lb);
  assert.equal(cache.stats().resident, 1);
  // a broken adapter: a 400 that names the adapter, not the server path
  const bad = join(tmp, 'lru-bad');
  writeAdapter(bad, { seed: 1 });
  writeFileSync(join(bad, 'adapter_model.safetensors'), 'not safetensors');
  assert.throws(
    () => cache.preload({ name: 'bad', version: 1, path: bad }),
    (e: RequestError) => e.status === 400 && e.message.includes("adapter 'bad'") && !e.message.includes(tmp),
  );
  // refused kinds
  const dora = writeAdapter(join(tmp, 'lru-dora'), { extraConfig: { use_dora: true } });
  assert.throws(() => cache.preload({ name: 'dora', version: 1, path: dora }), /DoRA/);
  cache.dispose();
  model.dispose();
});
