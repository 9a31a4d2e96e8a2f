// Whole-model 4-bit checkpoints: quantize on load (HF dir, bf16 dir, GGUF), the transformers bnb-4bit layout
// key for key, bit-exact round trips of our own checkpoints, malformed quant states, and LLM.int8() dirs.

import assert from 'node:assert/strict';
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { f32ToBf16 } from '../../src/core/dtype.ts';
import { ConfigError, FormatError } from '../../src/core/errors.ts';
import { memoryStats, resetPeakMemory } from '../../src/core/storage.ts';
import { loadSafetensors, openSafetensors, saveSafetensorsSync } from '../../src/formats/safetensors.ts';
import { configFromHF } from '../../src/models/config.ts';
import { fullLogits } from '../../src/models/generate.ts';
import { loadModel } from '../../src/models/load.ts';
import { initModel, saveModelHF } from '../../src/models/save.ts';
import { Linear } from '../../src/nn/layers.ts';
import { tensor } from '../../src/ops/create.ts';
import { dequantize4bit, quantize4bit } from '../../src/quant/blockwise4.ts';
import { bnbQuantizationConfig } from '../../src/quant/bnb-serialize.ts';
import { dequantizeInt8Rowwise, quantizeInt8Rowwise } from '../../src/quant/int8.ts';
import type { Linear4bit } from '../../src/quant/linear4bit.ts';
import { loadModelQuantized, qloraConfig, readQuantizationConfig } from '../../src/quant/load.ts';
import { saveInt8Checkpoint, saveModelQuantized } from '../../src/quant/save.ts';
import { loadTokenizer } from '../../src/tokenize/hf.ts';

const STORIES = '../shared/models/stories260K/stories260K.gguf';
const haveStories = existsSync(STORIES);
if (!haveStories) console.log(`skipping the stories260K 4-bit test: ${STORIES} is absent`);

const TINY = {
  model_type: 'llama',
  vocab_size: 96,
  hidden_size: 64,
  intermediate_size: 96,
  num_hidden_layers: 2,
  num_attention_heads: 4,
  num_key_value_heads: 2,
  max_position_embeddings: 64,
  rms_norm_eps: 1e-5,
  rope_theta: 10000,
  tie_word_embeddings: false,
  bos_token_id: 1,
  eos_token_id: 2,
};
const IDS = [1, 5, 9, 33, 70, 2, 11, 64, 90];
const PROJ = [
  'self_attn.q_proj',
  'self_attn.k_proj',
  'self_attn.v_proj',
  'self_attn.o_proj',
  'mlp.gate_proj',
  'mlp.up_proj',
  'mlp.down_proj',
];

const root = mkdtempSync(join(tmpdir(), 'lowrank-quant-'));
after(() => rmSync(root, { recursive: true, force: true }));

function relErr(a: Float32Array, b: Float32Array): number {
  let num = 0;
  let den = 0;
  for (let i = 0; i < a.length; i++) {
    num += (a[i]! - b[i]!) ** 2;
    den += b[i]! ** 2;
  }
  return Math.sqrt(num / den);
}

function argmaxRows(l: Float32Array, V: number): number[] {
  const out: number[] = [];
  for (let r = 0; r < l.length / V; r++) {
    let best = 0;
    for (let j = 1; j < V; j++) if (l[r * V + j]! > l[r * V + best]!) best = j;
    out.push(best);
  }
  return out;
}

let n = 0;
const tmp = (name: string) => join(root, `${n++}-${name}`);

/** An f32 (or bf16) HF dir of the tiny model; returns its dir and f32 logits. */
async function tinyDir(dtype: 'f32' | 'bf16' = 'f32'): Promise<{ dir: string; logits: Float32Array }> {
  const cfg = configFromHF(TINY);
  const model = initModel(cfg, 11, dtype);
  const dir = tmp(`tiny-${dtype}`);
  await saveModelHF(model.namedParameters(), cfg, dir);
  const logits = fullLogits(model, IDS);
  model.dispose();
  return { dir, logits };
}

test('quantize on load: every decoder Linear in NF4+DQ, lm_head dense; logits equal the dequantized model', async () => {
  const { dir, logits } = await tinyDir();
  const q = await loadModelQuantized(dir, qloraConfig());
  assert.equal(q.prequantized, false);
  assert.equal(q.quantizedModules.length, 14);
  assert.ok(q.model.getModule('lm_head') instanceof Linear);
  const l4 = fullLogits(q.model, IDS);
  // reference: the f32 model with each Linear weight replaced by dequant(quant(W))
  const { model: ref } = await loadModel(dir);
  for (const name of q.quantizedModules) {
    const m = ref.getModule(name) as Linear;
    const st = quantize4bit(m.weight.toF32(), { quantType: 'nf4', doubleQuant: true, shape: [...m.weight.shape] });
    m.setParam('weight', tensor(dequantize4bit(st), m.weight.shape));
  }
  assert.ok(relErr(l4, fullLogits(ref, IDS)) < 1e-5);
  // a random model's logits move by ~20% under NF4 (a trained model: see the stories260K test)
  assert.ok(relErr(l4, logits) < 0.3, `${relErr(l4, logits)}`);
  ref.dispose();
  q.model.dispose();
});

test('an explicit dtype casts before quantizing, as transformers does with torch_dtype', async () => {
  const { dir } = await tinyDir('f32');
  const q = await loadModelQuantized(dir, qloraConfig(), { dtype: 'bf16' });
  const { model: ref } = await loadModel(dir);
  const name = 'model.layers.1.self_attn.o_proj';
  const w = (ref.getModule(name) as Linear).weight.toF32();
  const st = (q.model.getModule(name) as Linear4bit).quantState();
  assert.equal(st.dtype, 'bfloat16');
  const bits = Uint16Array.from(w, (v) => f32ToBf16(v));
  assert.deepEqual(st, quantize4bit(bits, { quantType: 'nf4', doubleQuant: true, shape: [64, 64], dtype: 'bfloat16' }));
  assert.equal((q.model.getModule('lm_head') as Linear).weight.dtype, 'bf16');
  ref.dispose();
  q.model.dispose();
});

test('loading quantizes layer by layer: peak memory stays far below the f32 model', async () => {
  const cfg = { ...TINY, hidden_size: 128, intermediate_size: 384, num_hidden_layers: 6, num_attention_heads: 8 };
  const model = initModel(configFromHF(cfg), 3);
  const dir = tmp('mem');
  await saveModelHF(model.namedParameters(), configFromHF(cfg), dir);
  const f32Bytes = model.numParameters() * 4;
  model.dispose();
  const base = memoryStats().liveBytes;
  resetPeakMemory();
  const q = await loadModelQuantized(dir, qloraConfig());
  const peak = memoryStats().peakBytes - base;
  const held = memoryStats().liveBytes - base;
  // The linears (98% of the weights) end at 4.13 bits, embedding and head stay f32: 0.16 of the f32 bytes
  // are held; the peak adds one layer's u8 placeholders (measured 0.18; tensor storages only: the raw bytes
  // read from the file are one tensor's at a time).
  assert.ok(held < 0.2 * f32Bytes, `held ${held} of f32 ${f32Bytes}`);
  assert.ok(peak < 0.25 * f32Bytes, `peak ${peak} of f32 ${f32Bytes}`);
  q.model.dispose();
});

test('saved 4-bit dirs follow transformers: keys, dtypes, shapes, quant_state JSON, config.json text', async () => {
  const { dir } = await tinyDir();
  const q = await loadModelQuantized(dir, qloraConfig());
  const out = tmp('bnb');
  await saveModelQuantized(q.model, q.config, out, { quantizationConfig: q.quantizationConfig });
  const r = openSafetensors(join(out, 'model.safetensors'));
  assert.deepEqual(r.metadata, { format: 'pt' });
  const names = new Set(r.names());
  const P = 'model.layers.1.mlp.down_proj'; // [64, 96]: 6144 weights, 96 blocks of 64
  const info = (k: string) => ({ dtype: r.info(k).dtype, shape: r.info(k).shape });
  assert.deepEqual(info(`${P}.weight`), { dtype: 'U8', shape: [3072, 1] });
  assert.deepEqual(info(`${P}.weight.absmax`), { dtype: 'U8', shape: [96] });
  assert.deepEqual(info(`${P}.weight.quant_map`), { dtype: 'F32', shape: [16] });
  assert.deepEqual(info(`${P}.weight.nested_absmax`), { dtype: 'F32', shape: [1] });
  assert.deepEqual(info(`${P}.weight.nested_quant_map`), { dtype: 'F32', shape: [256] });
  const blob = new TextDecoder().decode(r.read(`${P}.weight.quant_state.bitsandbytes__nf4`).data);
  assert.match(
    blob,
    /^\{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": \[64, 96\], "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": [0-9.e-]+\}$/,
  );
  // every quantized linear has exactly these six keys; the rest are the dense tensors in their dtype
  const expected = new Set<string>(['model.embed_tokens.weight', 'model.norm.weight', 'lm_head.weight']);
  for (let i = 0; i < 2; i++) {
    expected.add(`model.layers.${i}.input_layernorm.weight`).add(`model.layers.${i}.post_attention_layernorm.weight`);
    for (const p of PROJ) {
      const k = `model.layers.${i}.${p}.weight`;
      for (const s of [
        '',
        '.absmax',
        '.quant_map',
        '.nested_absmax',
        '.nested_quant_map',
        '.quant_state.bitsandbytes__nf4',
      ])
        expected.add(k + s);
    }
  }
  assert.deepEqual([...names].sort(), [...expected].sort());
  assert.deepEqual(info('lm_head.weight'), { dtype: 'F32', shape: [96, 64] });
  r.close();
  const cfgText = readFileSync(join(out, 'config.json'), 'utf8');
  assert.match(
    cfgText,
    /\n {2}"quantization_config": \{\n {4}"_load_in_4bit": true,\n {4}"_load_in_8bit": false,\n {4}"bnb_4bit_compute_dtype": "bfloat16",\n {4}"bnb_4bit_quant_storage": "uint8",\n {4}"bnb_4bit_quant_type": "nf4",\n {4}"bnb_4bit_use_double_quant": true,\n {4}"llm_int8_enable_fp32_cpu_offload": false,\n {4}"llm_int8_has_fp16_weight": false,\n {4}"llm_int8_skip_modules": null,\n {4}"llm_int8_threshold": 6\.0,\n {4}"load_in_4bit": true,\n {4}"load_in_8bit": false,\n {4}"quant_method": "bitsandbytes"\n {2}\},/,
  );
  assert.match(cfgText, /"rms_norm_eps": 1e-05,/);
  assert.match(cfgText, /"rope_theta": 10000\.0,/);
  assert.ok(cfgText.endsWith('}\n'));
  const keys = [...cfgText.matchAll(/^ {2}"(\w+)":/gm)].map((m) => m[1]!);
  assert.deepEqual(keys, [...keys].sort(), 'sort_keys=True');
  assert.equal(readQuantizationConfig(out)?.bnb_4bit_quant_type, 'nf4');
  q.model.dispose();
});

test('our 4-bit checkpoints round-trip bit for bit (tensors, quant states, config.json) and load to the same logits', async () => {
  for (const [dtype, cfg] of [
    ['f32', qloraConfig()],
    ['bf16', bnbQuantizationConfig({ loadIn4bit: true, quantType: 'fp4', computeDtype: 'float16' })],
    // FSDP-QLoRA: packed bytes stored as bf16 [n/4, 1]
    [
      'bf16',
      bnbQuantizationConfig({ loadIn4bit: true, quantType: 'nf4', doubleQuant: true, quantStorage: 'bfloat16' }),
    ],
  ] as const) {
    const { dir } = await tinyDir(dtype);
    const q = await loadModelQuantized(dir, cfg);
    const a = tmp('rt-a');
    await saveModelQuantized(q.model, q.config, a, { quantizationConfig: q.quantizationConfig });
    const back = await loadModelQuantized(a);
    assert.equal(back.prequantized, true);
    assert.deepEqual(back.quantizationConfig, q.quantizationConfig);
    const l0 = (q.model.getModule('model.layers.0.self_attn.q_proj') as Linear4bit).quantState();
    const l1 = (back.model.getModule('model.layers.0.self_attn.q_proj') as Linear4bit).quantState();
    assert.deepEqual(l1, l0);
    assert.equal(l1.dtype, dtype === 'bf16' ? 'bfloat16' : 'float32');
    assert.equal(back.model.getModule('lm_head') instanceof Linear, true);
    assert.equal((back.model.getModule('lm_head') as Linear).weight.dtype, dtype);
    assert.deepEqual(fullLogits(back.model, IDS), fullLogits(q.model, IDS));
    if (cfg.bnb_4bit_quant_storage === 'bfloat16') {
      const r = openSafetensors(join(a, 'model.safetensors'));
      const k = 'model.layers.0.self_attn.q_proj.weight';
      assert.deepEqual([r.info(k).dtype, r.info(k).shape], ['BF16', [(64 * 64) / 4, 1]]);
      r.close();
    }
    const b = tmp('rt-b');
    await saveModelQuantized(back.model, back.config, b, { quantizationConfig: back.quantizationConfig });
    for (const f of readdirSync(a))
      assert.ok(readFileSync(join(a, f)).equals(readFileSync(join(b, f))), `${dtype}: ${f} differs`);
    q.model.dispose();
    back.model.dispose();
  }
});

test('malformed or missing quant state parts raise FormatError naming the file and the tensor', async () => {
  const { dir } = await tinyDir();
  const q = await loadModelQuantized(dir, qloraConfig());
  const good = tmp('good');
  await saveModelQuantized(q.model, q.config, good, { quantizationConfig: q.quantizationConfig });
  q.model.dispose();
  const { tensors } = loadSafetensors(join(good, 'model.safetensors'));
  const P = 'model.layers.0.mlp.up_proj.weight';
  const bad = (mutate: (t: typeof tensors) => void) => {
    const d = tmp('bad');
    mkdirSync(d);
    const copy = { ...tensors };
    mutate(copy);
    saveSafetensorsSync(join(d, 'model.safetensors'), copy, { format: 'pt' });
    copyFileSync(join(good, 'config.json'), join(d, 'config.json'));
    return d;
  };
  const blobKey = `${P}.quant_state.bitsandbytes__nf4`;
  const cases: [string, (t: typeof tensors) => void, RegExp][] = [
    [
      'bad blocksize',
      (t) => {
        const s = new TextDecoder().decode(t[blobKey]!.data).replace('"blocksize": 64', '"blocksize": 63');
        const b = new TextEncoder().encode(s);
        t[blobKey] = { dtype: 'U8', shape: [b.length], data: b };
      },
      new RegExp(`${blobKey.replaceAll('.', '\\.')}: blocksize 63`),
    ],
    ['missing absmax', (t) => delete t[`${P}.absmax`], new RegExp(`${P.replaceAll('.', '\\.')}\\.absmax: missing`)],
    [
      'truncated nested_absmax',
      (t) => {
        t[`${P}.nested_absmax`] = { dtype: 'F32', shape: [2], data: new Uint8Array(8) };
      },
      /nested_absmax: shape \[2\], expected \[1\]/,
    ],
  ];
  for (const [what, mutate, re] of cases) {
    const d = bad(mutate);
    await assert.rejects(
      () => loadModelQuantized(d),
      (e: Error) => {
        assert.ok(e instanceof FormatError, `${what}: ${e}`);
        assert.ok(e.message.includes(join(d, 'model.safetensors')), `${what}: no file name in ${e.message}`);
        assert.match(e.message, re, what);
        return true;
      },
    );
  }
  // an unquantized dir without a config to quantize with, and an 8-bit request on load
  await assert.rejects(() => loadModelQuantized(dir), ConfigError);
  await assert.rejects(
    () => loadModelQuantized(dir, bnbQuantizationConfig({ loadIn8bit: true })),
    /quantize --to int8/,
  );
});

test('LLM.int8() checkpoints: int8 weight + SCB + weight_format per decoder Linear, loaded back dequantized', async () => {
  const { dir, logits } = await tinyDir('bf16');
  const out = tmp('int8');
  assert.equal(await saveInt8Checkpoint(dir, out), 14);
  const r = openSafetensors(join(out, 'model.safetensors'));
  const P = 'model.layers.0.self_attn.k_proj';
  assert.deepEqual([r.info(`${P}.weight`).dtype, r.info(`${P}.weight`).shape], ['I8', [32, 64]]);
  assert.deepEqual([r.info(`${P}.SCB`).dtype, r.info(`${P}.SCB`).shape], ['F32', [32]]);
  assert.deepEqual([r.info(`${P}.weight_format`).dtype, r.info(`${P}.weight_format`).shape], ['U8', []]);
  assert.deepEqual(Array.from(r.read(`${P}.weight_format`).data), [0]);
  assert.equal(r.info('lm_head.weight').dtype, 'BF16');
  assert.equal(r.names().length, 2 * 7 * 3 + 2 * 2 + 3);
  // the stored values are bitsandbytes' int8_vectorwise_quant of the bf16 weight
  const { model: src } = await loadModel(dir);
  const w = (src.getModule(P) as Linear).weight.toF32();
  const q = quantizeInt8Rowwise(w, 32, 64);
  assert.deepEqual(new Int8Array(r.read(`${P}.weight`).data.buffer), q.int8);
  assert.deepEqual(new Float32Array(r.read(`${P}.SCB`).data.buffer), q.scale);
  r.close();
  const cfg = readQuantizationConfig(out)!;
  assert.equal(cfg.load_in_8bit, true);
  assert.equal(cfg.load_in_4bit, false);
  const back = await loadModelQuantized(out);
  assert.equal(back.quantizedModules.length, 0);
  const kw = (back.model.getModule(P) as Linear).weight.toF32();
  const deq = dequantizeInt8Rowwise(q, 32, 64);
  for (let i = 0; i < kw.length; i++) assert.ok(Math.abs(kw[i]! - deq[i]!) <= Math.abs(deq[i]!) * 2 ** -8, `${i}`);
  assert.ok(relErr(fullLogits(back.model, IDS), logits) < 0.05);
  src.dispose();
  back.model.dispose();
});

test('stories260K (GGUF) quantized on load to NF4: logits within 15%, greedy tokens agree', {
  skip: !haveStories,
}, async () => {
  const tok = loadTokenizer(STORIES);
  const ids = tok.encode('Once upon a time, there was a little girl named Lily. She loved to play outside', {
    addSpecialTokens: true,
  });
  const { model } = await loadModel(STORIES);
  const ref = fullLogits(model, ids);
  model.dispose();
  const q = await loadModelQuantized(STORIES, qloraConfig());
  assert.equal(q.kind, 'gguf');
  assert.equal(q.quantizedModules.length, 5 * 7);
  const got = fullLogits(q.model, ids);
  // Tolerance: relative RMS error of all logits < 0.15 (measured 0.125 for NF4 + DQ at blocksize 64; the
  // weights themselves err by 9%, a 64-wide model has little averaging), greedy agreement >= 90% (measured
  // 25 of 26 positions).
  const e = relErr(got, ref);
  assert.ok(e < 0.15, `NF4 relative logits error ${e}`);
  const a = argmaxRows(got, 512);
  const b = argmaxRows(ref, 512);
  const agree = a.filter((t, i) => t === b[i]).length / a.length;
  assert.ok(agree >= 0.9, `greedy agreement ${agree}`);
  q.model.dispose();
});
