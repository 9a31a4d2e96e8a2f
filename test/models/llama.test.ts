import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { getBackend } from '../../src/backend/index.ts';
import { f32ToBf16 } from '../../src/core/dtype.ts';
import { ConfigError, FormatError, ShapeError } from '../../src/core/errors.ts';
import { Rng } from '../../src/core/rng.ts';
import { configFromHF, configToHF } from '../../src/models/config.ts';
import { DecodePlan } from '../../src/models/decode-plan.ts';
import { DecodeSession, fullLogits, generate, generateBatch } from '../../src/models/generate.ts';
import { resolveKvDtype } from '../../src/models/kv-cache.ts';
import { LlamaForCausalLM } from '../../src/models/llama.ts';
import { loadModel, permuteRope, unpermuteRope } from '../../src/models/load.ts';
import { saveModelHF } from '../../src/models/save.ts';
import { intTensor } from '../../src/ops/create.ts';
import { LoraModel } from '../../src/peft/lora/model.ts';
import { loadTokenizer } from '../../src/tokenize/hf.ts';

const STORIES = '../shared/models/stories260K/stories260K.gguf';
const haveStories = existsSync(STORIES);
if (!haveStories) console.log(`skipping stories260K tests: ${STORIES} is absent`);

function maxAbsDiff(a: Float32Array, b: Float32Array): number {
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]! - b[i]!));
  return m;
}

test('stories260K (GGUF) writes coherent TinyStories text with greedy decoding', { skip: !haveStories }, async () => {
  const { model } = await loadModel(STORIES);
  const tok = loadTokenizer(STORIES);
  const r = generate(model, tok, tok.encode('Once upon a time', { addSpecialTokens: true }), {
    maxTokens: 40,
    temperature: 0,
  });
  assert.match(r.text, /^, there was a little girl named Lily\. She loved to play/);
  assert.equal(r.completionTokens, 40);
  model.dispose();
});

test('KV-cache decoding gives the same logits and tokens as full forwards', { skip: !haveStories }, async () => {
  const { model } = await loadModel(STORIES);
  const tok = loadTokenizer(STORIES);
  const prompt = tok.encode('The cat sat on the mat. The dog', { addSpecialTokens: true });
  const r = generate(model, tok, prompt, { maxTokens: 12, temperature: 0 });
  const seq = [...prompt, ...r.tokens];
  const full = fullLogits(model, seq);
  const V = model.config.vocab_size;
  // greedy choice of each full-forward position equals the generated token
  for (let i = 0; i < r.tokens.length; i++) {
    const row = full.subarray((prompt.length - 1 + i) * V, (prompt.length + i) * V);
    let best = 0;
    for (let j = 1; j < V; j++) if (row[j]! > row[best]!) best = j;
    assert.equal(best, r.tokens[i], `position ${i}`);
  }
  // and the cached logits match the full forward's
  const s = new DecodeSession(model, 1, seq.length);
  let lg = s.step([prompt]);
  for (let i = 0; i < r.tokens.length; i++) {
    const row = full.subarray((prompt.length - 1 + i) * V, (prompt.length + i) * V);
    assert.ok(maxAbsDiff(lg[0]!, row) < 1e-4, `decode step ${i}`);
    lg = s.step([[r.tokens[i]!]]);
  }
  s.dispose();
  model.dispose();
});

test('stories260K in bf16 writes the same greedy text with a bf16 KV cache as with f32', {
  skip: !haveStories,
}, async () => {
  const { model } = await loadModel(STORIES, { dtype: 'bf16' });
  const tok = loadTokenizer(STORIES);
  const ids = tok.encode('Once upon a time', { addSpecialTokens: true });
  const text = (kvCacheDtype: 'f32' | 'bf16') =>
    generate(model, tok, ids, { maxTokens: 60, temperature: 0, kvCacheDtype }).text;
  const bf16 = text('bf16');
  assert.match(bf16, /^, there was a little girl named Lily\. She loved to play/);
  assert.equal(bf16, text('f32'));
  model.dispose();
  // the CLI flag, and a clear error for a dtype it does not take
  const { spawnSync } = await import('node:child_process');
  const cli = (kv: string) =>
    spawnSync(
      process.execPath,
      ['bin/lowrank.js', 'generate', '--model', STORIES, '--prompt', 'Once upon a time', '--dtype', 'bf16'].concat([
        '--kv-cache-dtype',
        kv,
        '--temperature',
        '0',
        '--max-tokens',
        '60',
      ]),
      { encoding: 'utf8' },
    );
  const r = cli('bf16');
  assert.equal(r.status, 0, r.stderr);
  assert.equal(r.stdout, `Once upon a time${bf16}\n`);
  const bad = cli('f16');
  assert.notEqual(bad.status, 0);
  assert.match(bad.stderr, /--kv-cache-dtype must be auto, f32, bf16, got 'f16'/);
});

test('batched (left-padded) and unbatched generation agree', { skip: !haveStories }, async () => {
  const { model } = await loadModel(STORIES);
  const tok = loadTokenizer(STORIES);
  const prompts = ['Once upon a time', 'Tom had a red ball and', 'Lily'].map((p) =>
    tok.encode(p, { addSpecialTokens: true }),
  );
  const batched = generateBatch(model, prompts, { maxTokens: 10, temperature: 0 });
  for (let b = 0; b < prompts.length; b++) {
    const single = generateBatch(model, [prompts[b]!], { maxTokens: 10, temperature: 0 });
    assert.deepEqual(batched[b], single[0], `row ${b}`);
  }
  // logits too: the padded row's last-position logits equal the unpadded run's
  const s1 = new DecodeSession(model, 2, 16);
  const L = prompts[1]!.length;
  const p0 = prompts[0]!;
  const padded = [[...new Array(L - p0.length).fill(0), ...p0], prompts[1]!];
  const valid = [[...new Array(L - p0.length).fill(0), ...p0.map(() => 1)], prompts[1]!.map(() => 1)];
  const both = s1.step(padded, valid);
  s1.dispose();
  const s2 = new DecodeSession(model, 1, 16);
  const alone = s2.step([p0]);
  s2.dispose();
  assert.ok(maxAbsDiff(both[0]!, alone[0]!) < 1e-4);
  model.dispose();
});

test('sampling is reproducible with a seed and honours stop strings and max tokens', {
  skip: !haveStories,
}, async () => {
  const { model } = await loadModel(STORIES);
  const tok = loadTokenizer(STORIES);
  const ids = tok.encode('Once upon a time', { addSpecialTokens: true });
  const o = { maxTokens: 30, temperature: 0.9, topP: 0.9, topK: 40, seed: 7 };
  const a = generate(model, tok, ids, o);
  const b = generate(model, tok, ids, o);
  assert.deepEqual(a.tokens, b.tokens);
  const c = generate(model, tok, ids, { ...o, seed: 8 });
  assert.notDeepEqual(a.tokens, c.tokens);
  const stopped = generate(model, tok, ids, { maxTokens: 40, temperature: 0, stop: ['Lily'] });
  assert.equal(stopped.finishReason, 'stop');
  assert.equal(stopped.text, ', there was a little girl named ');
  assert.equal(generate(model, tok, ids, { maxTokens: 3, temperature: 0 }).finishReason, 'length');
  model.dispose();
});

test('an HF dir written from a model loads back bit-exactly (f32 and bf16)', async () => {
  const cfg = configFromHF({
    model_type: 'qwen2',
    vocab_size: 50,
    hidden_size: 16,
    intermediate_size: 24,
    num_hidden_layers: 2,
    num_attention_heads: 4,
    num_key_value_heads: 2,
  });
  const model = new LlamaForCausalLM(cfg, { rng: new Rng(1) });
  const dir = mkdtempSync(join(tmpdir(), 'lowrank-hf-'));
  try {
    for (const dtype of ['f32', 'bf16'] as const) {
      await saveModelHF(model.namedParameters(), cfg, dir, { dtype });
      const { model: back, config } = await loadModel(dir);
      assert.deepEqual(
        configToHF(config),
        configToHF({ ...cfg, torch_dtype: dtype === 'f32' ? 'float32' : 'bfloat16' }),
      );
      for (const [name, p] of back.namedParameters()) {
        const orig = model.getModule(name.split('.').slice(0, -1).join('.'))!.getParam(name.split('.').pop()!)!;
        if (name.endsWith('.weight')) assert.equal(p.dtype, dtype, name);
        if (dtype === 'f32') assert.deepEqual(p.toF32(), orig.toF32(), name);
      }
      const ids = intTensor([1, 2, 3], [1, 3]);
      const positions = intTensor([0, 1, 2], [1, 3]);
      if (dtype === 'f32')
        assert.deepEqual(back.forward(ids, { positions }).toF32(), model.forward(ids, { positions }).toF32());
      back.dispose();
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('GGUF rope permutation round-trips; bad configs and inputs give typed errors', () => {
  const w = Float32Array.from({ length: 8 * 3 }, (_, i) => i);
  assert.deepEqual(unpermuteRope(permuteRope(w, 8, 3, 2), 8, 3, 2), w);
  assert.throws(() => configFromHF({ model_type: 'gpt2' }), ConfigError);
  assert.throws(
    () =>
      configFromHF({
        model_type: 'llama',
        vocab_size: 10,
        hidden_size: 8,
        intermediate_size: 8,
        num_hidden_layers: 1,
        num_attention_heads: 3,
        num_key_value_heads: 2,
      }),
    /multiple of num_key_value_heads/,
  );
  const model = new LlamaForCausalLM(
    configFromHF({
      model_type: 'llama',
      vocab_size: 10,
      hidden_size: 8,
      intermediate_size: 8,
      num_hidden_layers: 1,
      num_attention_heads: 2,
    }),
  );
  assert.throws(() => model.forward(intTensor([1, 2]), { positions: intTensor([0, 1]) }), ShapeError);
  assert.throws(
    () => model.forward(intTensor([1, 12], [1, 2]), { positions: intTensor([0, 1], [1, 2]) }),
    /out of range|12/,
  );
  model.dispose();
  assert.rejects(loadModel('/nonexistent/model'), ConfigError);
  void FormatError;
});

test('qwen3 (q/k norm) and qwen2 (q/k/v bias) models run, and KV-cache decoding matches full forwards', () => {
  for (const model_type of ['qwen3', 'qwen2', 'mistral']) {
    const cfg = configFromHF({
      model_type,
      vocab_size: 40,
      hidden_size: 24,
      intermediate_size: 32,
      num_hidden_layers: 2,
      num_attention_heads: 4,
      num_key_value_heads: 2,
      head_dim: 8,
      rope_scaling: model_type === 'mistral' ? { rope_type: 'linear', factor: 2 } : null,
    });
    const model = new LlamaForCausalLM(cfg, { rng: new Rng(4) });
    if (model_type === 'qwen3') assert.ok(model.getModule('model.layers.0.self_attn.q_norm'));
    if (model_type === 'qwen2') assert.ok(model.getModule('model.layers.0.self_attn.q_proj')!.getParam('bias'));
    const seq = [3, 9, 4, 17, 21, 5];
    const full = fullLogits(model, seq);
    const s = new DecodeSession(model, 1, seq.length);
    let lg = s.step([seq.slice(0, 3)]);
    for (let i = 3; i <= seq.length; i++) {
      const row = full.subarray((i - 1) * 40, i * 40);
      assert.ok(maxAbsDiff(lg[0]!, row) < 1e-5, `${model_type} position ${i - 1}`);
      if (i < seq.length) lg = s.step([[seq[i]!]]);
    }
    s.dispose();
    model.dispose();
  }
});

test('lowrank init-model writes an HF dir that loads and tokenizes', async () => {
  const { spawnSync } = await import('node:child_process');
  const dir = mkdtempSync(join(tmpdir(), 'lowrank-init-'));
  try {
    const r = spawnSync(process.execPath, ['bin/lowrank.js', 'init-model', '--preset', 'tiny', '--out', dir], {
      encoding: 'utf8',
    });
    assert.equal(r.status, 0, r.stderr);
    const { model, config } = await loadModel(dir);
    assert.equal(config.hidden_size, 256);
    assert.equal(model.numParameters(), 8192 * 256 + 8 * (256 * 256 * 2 + 256 * 128 * 2 + 3 * 256 * 688 + 512) + 256);
    const tok = loadTokenizer(dir);
    const ids = tok.encode('héllo wörld', { addSpecialTokens: true });
    assert.equal(tok.decode(ids, { skipSpecialTokens: true }), 'héllo wörld');
    assert.ok(ids.every((i) => i < config.vocab_size));
    const info = spawnSync(process.execPath, ['bin/lowrank.js', 'info', dir], { encoding: 'utf8' });
    assert.match(info.stdout, /architecture: llama/);
    model.dispose();
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

/** A two-layer model of the given architecture (GQA) for the decoding tests. */
function smallConfig(model_type: string, tied: boolean, head_dim = 12) {
  return configFromHF({
    model_type,
    vocab_size: 300,
    hidden_size: 48,
    intermediate_size: 80,
    num_hidden_layers: 2,
    num_attention_heads: 4,
    num_key_value_heads: 2,
    head_dim,
    tie_word_embeddings: tied,
  });
}

test('a bf16 KV cache: auto for a bf16 model, rounded keys and values, logits within bf16 rounding of f32', () => {
  const cfg = smallConfig('llama', true, 16);
  const m = new LlamaForCausalLM(cfg, { rng: new Rng(9), dtype: 'bf16' });
  m.useDecodeLayout();
  const f32Model = new LlamaForCausalLM(cfg, { rng: new Rng(9), dtype: 'f32' });
  assert.equal(resolveKvDtype(m), 'bf16');
  assert.equal(resolveKvDtype(m, 'f32'), 'f32');
  assert.equal(resolveKvDtype(f32Model), 'f32');
  assert.equal(resolveKvDtype(f32Model, 'bf16'), 'bf16');
  f32Model.dispose();
  // an adapter on the embedding wraps embed_tokens; the cache still follows the model
  const wrapped = new LlamaForCausalLM(cfg, { rng: new Rng(9), dtype: 'bf16' });
  new LoraModel(wrapped, { target_modules: ['embed_tokens', 'q_proj'], r: 2 }, 'default', { rng: new Rng(1) });
  assert.equal(wrapped.inner.getChild('embed_tokens')?.getParam('weight'), null, 'embed_tokens is wrapped');
  assert.equal(resolveKvDtype(wrapped), 'bf16');
  wrapped.dispose();
  const prompt = [3, 17, 40, 5, 9, 11, 200, 150];
  const run = (kv: 'f32' | 'bf16') => {
    const s = new DecodeSession(m, 1, 40, undefined, undefined, kv);
    const out = [...s.step([prompt])];
    // layer 0's keys and values of the prompt depend on nothing the cache dtype changes
    const layer0 = [s.cache.k[0]!, s.cache.v[0]!].map((t) => t.data.slice());
    for (let i = 0; i < 10; i++) out.push(...s.step([[(i * 31) % 300]]));
    assert.equal(s.cache.k[0]!.dtype, kv);
    const bytes = s.cache.bytes;
    s.dispose();
    return { out, layer0, bytes };
  };
  const a = run('f32');
  const b = run('bf16');
  assert.equal(b.bytes * 2, a.bytes, 'half the bytes');
  const n = cfg.num_key_value_heads * 40 * cfg.head_dim;
  for (let i = 0; i < 2; i++) {
    const want = a.layer0[i] as Float32Array;
    const got = b.layer0[i] as Uint16Array;
    for (let h = 0; h < cfg.num_key_value_heads; h++)
      for (let j = 0; j < prompt.length * cfg.head_dim; j++) {
        const at = (h * n) / cfg.num_key_value_heads + j;
        if (got[at] !== f32ToBf16(want[at]!))
          assert.fail(`layer 0 ${i ? 'v' : 'k'}[${at}] is not the rounded f32 value`);
      }
  }
  // each value rounded with relative error <= 2^-9: the logits stay within 2^-7 of their scale
  for (let i = 0; i < a.out.length; i++) {
    let scale = 0;
    for (const x of a.out[i]!) scale = Math.max(scale, Math.abs(x));
    const d = maxAbsDiff(a.out[i]!, b.out[i]!);
    assert.ok(d > 0 && d < scale / 128, `step ${i}: logits differ by ${d} (scale ${scale})`);
  }
  m.dispose();
});

test('the decoding layout gives bit-identical logits (tied and untied heads, f32 and bf16, batch 1 to 6)', () => {
  for (const tied of [true, false])
    for (const dtype of ['f32', 'bf16'] as const) {
      const cfg = smallConfig('qwen2', tied);
      const make = () => new LlamaForCausalLM(cfg, { rng: new Rng(7), dtype });
      const plain = make();
      const laid = make();
      laid.useDecodeLayout();
      const q = laid.inner.layers.items[0]!.getChild('self_attn')!.getChild('q_proj')!.getParam('weight')!;
      assert.equal(q.isContiguous(), false, 'q_proj is stored transposed');
      assert.deepEqual(q.shape, [48, 48], 'q_proj keeps its logical shape');
      for (const batch of [1, 3, 6]) {
        const prompts = Array.from({ length: batch }, (_, b) =>
          Array.from({ length: 5 + b }, (_, i) => (i * 7 + b) % 300),
        );
        const run = (m: LlamaForCausalLM) => {
          const s = new DecodeSession(m, batch, 16);
          const out: Float32Array[] = [];
          let lg = s.step(prompts);
          for (let i = 0; i < 4; i++) {
            out.push(...lg);
            lg = s.step(lg.map((_, b) => [(i * 13 + b) % 300]));
          }
          s.dispose();
          return out;
        };
        const a = run(plain);
        const b = run(laid);
        for (let i = 0; i < a.length; i++)
          assert.deepEqual(b[i], a[i], `tied ${tied} ${dtype} batch ${batch}: logits ${i} differ`);
      }
      plain.dispose();
      laid.dispose();
    }
});

test('the decoding plan gives the module forward bit for bit (llama, qwen2 bias, qwen3 q/k norm, padding)', () => {
  const built: (DecodePlan | null)[] = [];
  const orig = DecodePlan.build;
  DecodePlan.build = (m, b) => {
    const p = orig.call(DecodePlan, m, b);
    built.push(p);
    return p;
  };
  try {
    for (const model_type of ['llama', 'qwen2', 'qwen3'])
      for (const dtype of ['f32', 'bf16'] as const) {
        const cfg = smallConfig(model_type, model_type !== 'llama', 16); // 16: attention reads V in place
        const m = new LlamaForCausalLM(cfg, { rng: new Rng(9), dtype });
        m.useDecodeLayout();
        for (const batch of [1, 3]) {
          const run = (usePlan: boolean) => {
            const s = new DecodeSession(m, batch, 16, undefined, usePlan);
            const out = [...s.step(Array.from({ length: batch }, (_, b) => [3 + b, 17, 40 + b]))];
            for (let i = 0; i < 5; i++)
              out.push(...s.step(Array.from({ length: batch }, (_, b) => [(i * 31 + b) % 300])));
            s.dispose();
            return out;
          };
          built.length = 0;
          const want = run(false);
          assert.equal(built.length, 0, 'usePlan false never builds a plan');
          const got = run(true);
          assert.deepEqual(
            built.map((p) => p !== null),
            [true],
            `${model_type} ${dtype}: one plan, built once`,
          );
          // where the backend records plans, the steps above replayed the recording; compare the plan's own
          // calls too
          assert.equal(built[0]!.replayed, !!getBackend().recordPlan, 'replayed where the backend records');
          DecodePlan.record = false;
          let calls: Float32Array[];
          try {
            calls = run(true);
          } finally {
            DecodePlan.record = true;
          }
          for (let i = 0; i < want.length; i++) {
            assert.deepEqual(got[i], want[i], `${model_type} ${dtype} batch ${batch}: logits ${i} differ`);
            assert.deepEqual(calls[i], want[i], `${model_type} ${dtype} batch ${batch}: logits ${i} differ (calls)`);
          }
        }
        // left-padded rows: the plan passes the key mask to attention as the module forward does
        const padded = (usePlan: boolean) => {
          const s = new DecodeSession(m, 2, 16, undefined, usePlan);
          const out = [
            ...s.step(
              [
                [0, 5, 6],
                [7, 8, 9],
              ],
              [
                [0, 1, 1],
                [1, 1, 1],
              ],
            ),
          ];
          for (let i = 0; i < 3; i++) out.push(...s.step([[1 + i], [2 + i]]));
          s.dispose();
          return out;
        };
        built.length = 0;
        const pw = padded(false);
        const pg = padded(true);
        assert.equal(built.filter((p) => p).length, 1, 'padding: one plan');
        assert.equal(built.find((p) => p)!.replayed, !!getBackend().recordPlan, 'padding: replayed');
        for (let i = 0; i < pw.length; i++)
          assert.deepEqual(pg[i], pw[i], `${model_type} ${dtype} padded: logits ${i} differ`);
        // a full cache is the same error either way
        for (const usePlan of [false, true]) {
          const s = new DecodeSession(m, 1, 4, undefined, usePlan);
          s.step([[1, 2, 3]]);
          s.step([[4]]);
          assert.throws(() => s.step([[5]]), /5 positions exceed its capacity 4/);
          s.dispose();
        }
        // without the decoding layout there is nothing fused: no plan
        const plain = new LlamaForCausalLM(cfg, { rng: new Rng(9), dtype });
        assert.equal(DecodePlan.build(plain, 1), null);
        plain.dispose();
        m.dispose();
      }
  } finally {
    DecodePlan.build = orig;
  }
});
