// Linear4bit (forward = dequantize + linear, backward to the input by finite differences, frozen weight),
// quantizeModel (every decoder Linear, lm_head kept), and merging a delta into a 4-bit layer.

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { bf16ToF32, f32ToBf16 } from '../../src/core/dtype.ts';
import { ShapeError } from '../../src/core/errors.ts';
import { Rng } from '../../src/core/rng.ts';
import { tidy } from '../../src/core/scope.ts';
import { memoryStats } from '../../src/core/storage.ts';
import { Tensor } from '../../src/core/tensor.ts';
import { configFromHF } from '../../src/models/config.ts';
import { fullLogits } from '../../src/models/generate.ts';
import { initModel } from '../../src/models/save.ts';
import { Linear } from '../../src/nn/layers.ts';
import { tensor } from '../../src/ops/create.ts';
import { linear } from '../../src/ops/matmul.ts';
import { sum } from '../../src/ops/reduce.ts';
import { backward, noGrad } from '../../src/ops/tape.ts';
import { dequantize4bit, quantize4bit } from '../../src/quant/blockwise4.ts';
import { Linear4bit, linear4bit, quantizeModel } from '../../src/quant/linear4bit.ts';
import { denseLinearFrom4bit, mergeIntoQuantized } from '../../src/quant/merge.ts';
import { gradcheck, randomTensor } from '../helpers/gradcheck.ts';

function randn(n: number, rng: Rng, scale = 1): Float32Array {
  const v = new Float32Array(n);
  for (let i = 0; i < n; i++) v[i] = rng.normal() * scale;
  return v;
}

function relErr(a: Float32Array, b: Float32Array): number {
  let num = 0;
  let den = 0;
  for (let i = 0; i < a.length; i++) {
    num += (a[i]! - b[i]!) ** 2;
    den += b[i]! ** 2;
  }
  return Math.sqrt(num / den);
}

function maxAbsDiff(a: Float32Array, b: Float32Array): number {
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]! - b[i]!));
  return m;
}

const TINY = {
  model_type: 'llama',
  vocab_size: 96,
  hidden_size: 64,
  intermediate_size: 96, // down_proj has 96 inputs: 4-bit blocks of 64 straddle its rows
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

test('Linear4bit forward equals linear() with the dequantized weight, for nf4/fp4 with and without DQ', () => {
  const rng = new Rng(1);
  for (const [qt, dq] of [
    ['nf4', true],
    ['fp4', false],
  ] as const) {
    const lin = new Linear(96, 40, { bias: true, rng });
    const ref = dequantize4bit(quantize4bit(lin.weight.toF32(), { quantType: qt, doubleQuant: dq, shape: [40, 96] }));
    const q = Linear4bit.fromLinear(lin, { quantType: qt, doubleQuant: dq });
    assert.equal(q.inFeatures, 96);
    assert.equal(q.outFeatures, 40);
    assert.equal(q.doubleQuant, dq);
    assert.deepEqual(q.weight.shape, [(40 * 96) / 2, 1]);
    assert.equal(q.weight.dtype, 'u8');
    for (const shape of [
      [1, 96],
      [3, 5, 96],
      [20, 96],
    ]) {
      const x = randomTensor(shape, rng, 1, false);
      const got = noGrad(() => q.forward(x).toF32());
      const want = noGrad(() => linear(x, tensor(ref, [40, 96]), q.bias).toF32());
      assert.ok(maxAbsDiff(got, want) < 1e-5, `${qt} ${shape}: ${maxAbsDiff(got, want)}`);
    }
    lin.dispose();
    q.dispose();
  }
});

test('Linear4bit backward: dx by finite differences, db when asked, never a weight gradient', () => {
  const rng = new Rng(2);
  const lin = new Linear(70, 30, { bias: true, rng }); // 2100 elements: blocks straddle rows
  const q = Linear4bit.fromLinear(lin, { quantType: 'nf4', doubleQuant: true, blocksize: 64 });
  lin.dispose();
  const x = randomTensor([2, 3, 70], rng);
  gradcheck('linear4bit dx', (xx) => q.forward(xx), [x], { eps: 1e-2, maxChecks: 40 });
  q.bias!.requiresGrad = true;
  gradcheck('linear4bit db', (b) => linear4bit(x, q.weight4bit(), b), [q.bias!], { maxChecks: 30 });
  q.bias!.requiresGrad = false;
  // frozen weight: the tape never gives its parameters a gradient
  x.requiresGrad = true;
  tidy(() => backward(sum(q.forward(x))));
  for (const [n, p] of q.namedParameters()) {
    assert.equal(p.requiresGrad, false, n);
    assert.equal(p.grad, null, n);
  }
  assert.ok(x.grad);
  assert.deepEqual(x.grad.shape, [2, 3, 70]);
  q.dispose();
});

test('the 4-bit layer stores about 4.13 bits per weight and no f32 copy of it', () => {
  const rng = new Rng(3);
  const lin = new Linear(512, 256, { rng });
  const before = memoryStats().liveBytes;
  const q = Linear4bit.fromLinear(lin, { quantType: 'nf4', doubleQuant: true });
  lin.dispose();
  const bits = (q.quantizedBytes() * 8) / (512 * 256);
  assert.ok(bits > 4.12 && bits < 4.14 + ((16 * 4 + 256 * 4) * 8) / (512 * 256), `bits/param ${bits}`);
  // the quantized layer is what remains of the f32 weight's 512 KiB
  assert.ok(memoryStats().liveBytes - before < -400_000, `live bytes changed by ${memoryStats().liveBytes - before}`);
  const x = randomTensor([4, 512], rng, 1, false);
  const peak0 = memoryStats().liveBytes;
  const y = noGrad(() => q.forward(x));
  assert.equal(memoryStats().liveBytes - peak0, 4 * 256 * 4, 'forward allocates only its output');
  y.dispose();
  q.dispose();
});

test('quantState round-trips the arrays of the state it was built from', () => {
  const rng = new Rng(4);
  const s = quantize4bit(randn(24 * 40, rng), {
    quantType: 'fp4',
    doubleQuant: true,
    shape: [24, 40],
    dtype: 'float32',
  });
  const copy = structuredClone(s);
  const q = new Linear4bit(s);
  const back = q.quantState();
  assert.deepEqual(back, copy);
  assert.throws(() => new Linear4bit({ ...copy, shape: [960] }), ShapeError);
  q.dispose();
});

test('quantizeModel replaces every decoder Linear, keeps lm_head, and stays close to the f32 logits', () => {
  const cfg = configFromHF(TINY);
  const model = initModel(cfg, 5);
  const ids = [1, 5, 9, 33, 70, 2, 11, 64];
  const ref = fullLogits(model, ids);
  const names = quantizeModel(model, { quantType: 'nf4', doubleQuant: true });
  assert.equal(names.length, 2 * 7);
  assert.ok(names.every((n) => n.startsWith('model.layers.')));
  assert.ok(model.getModule('lm_head') instanceof Linear);
  assert.ok(model.getModule('model.layers.1.mlp.down_proj') instanceof Linear4bit);
  const got = fullLogits(model, ids);
  // Exactly (up to summation order) the model whose Linear weights are dequant(quant(W)) in f32.
  const dq = initModel(cfg, 5);
  for (const [name, m] of [...dq.namedModules()]) {
    if (!(m instanceof Linear) || !names.includes(name)) continue;
    const st = quantize4bit(m.weight.toF32(), { quantType: 'nf4', doubleQuant: true, shape: [...m.weight.shape] });
    m.setParam('weight', tensor(dequantize4bit(st), m.weight.shape));
  }
  const want = fullLogits(dq, ids);
  assert.ok(relErr(got, want) < 1e-5, `vs dequantized dense model: ${relErr(got, want)}`);
  // Against the f32 model: NF4 of random N(0, 0.02) weights errs by ~10% per weight, and a random model's
  // logits move by ~20% (relative RMS); a pretrained model does far better (see load.test.ts).
  const e = relErr(got, ref);
  assert.ok(e < 0.3, `relative logits error ${e}`);
  dq.dispose();
  // skipModules by name component
  const m2 = initModel(cfg, 5);
  const n2 = quantizeModel(m2, { skipModules: ['lm_head', 'down_proj'] });
  assert.equal(n2.length, 2 * 6);
  assert.ok(m2.getModule('model.layers.0.mlp.down_proj') instanceof Linear);
  // trainable Linears (adapters) stay as they are
  const m3 = initModel(cfg, 5);
  (m3.getModule('model.layers.0.self_attn.q_proj') as Linear).weight.requiresGrad = true;
  assert.equal(quantizeModel(m3).length, 2 * 7 - 1);
  m3.dispose();
  model.dispose();
  m2.dispose();
});

test('mergeIntoQuantized: dense bf16 dequant(W) + delta by default; re-quantization warns', () => {
  const rng = new Rng(6);
  const lin = new Linear(64, 48, { bias: true, rng, dtype: 'bf16' });
  const q = Linear4bit.fromLinear(lin, { quantType: 'nf4', doubleQuant: true });
  lin.dispose();
  assert.equal(q.dtype, 'bfloat16');
  const base = dequantize4bit(q.quantState());
  const delta = randn(48 * 64, rng, 0.01);
  const merged = mergeIntoQuantized(q, delta);
  assert.equal(merged.dtype, 'bf16');
  assert.deepEqual(merged.shape, [48, 64]);
  const bits = merged.toTyped() as Uint16Array;
  for (let i = 0; i < bits.length; i++)
    assert.equal(bits[i], f32ToBf16(Math.fround(base[i]! + delta[i]!)), `element ${i}`);
  const f32 = mergeIntoQuantized(q, delta, { dtype: 'f32' }).toF32();
  for (let i = 0; i < f32.length; i++) assert.equal(f32[i], Math.fround(base[i]! + delta[i]!));
  // dense Linear for merge-and-unload: forward equals linear() with the merged weight
  const dense = denseLinearFrom4bit(q, { deltaW: delta, dtype: 'f32' });
  const x = randomTensor([3, 64], rng, 1, false);
  const y1 = noGrad(() => dense.forward(x).toF32());
  const y2 = noGrad(() => linear(x, tensor(f32, [48, 64]), q.bias).toF32());
  assert.ok(maxAbsDiff(y1, y2) < 1e-6);

  // requantize: the layer now holds quantize4bit(bf16(dequant(W) + delta)) with the same settings
  const warnings: string[] = [];
  const warn = console.warn;
  console.warn = (m: string) => warnings.push(m);
  try {
    const same = mergeIntoQuantized(q, delta, { requantize: true });
    assert.equal(same, q);
  } finally {
    console.warn = warn;
  }
  assert.equal(warnings.length, 1);
  assert.match(warnings[0]!, /rounding/);
  const expected = quantize4bit(Uint16Array.from(bits), {
    quantType: 'nf4',
    doubleQuant: true,
    blocksize: 64,
    shape: [48, 64],
    dtype: 'bfloat16',
  });
  assert.deepEqual(q.quantState(), expected);
  // the merged 4-bit weight is close to the dense merge (one more 4-bit rounding)
  const re = relErr(dequantize4bit(q.quantState()), Float32Array.from(bits, bf16ToF32));
  assert.ok(re < 0.12, `requantized relative error ${re}`);
  assert.throws(() => mergeIntoQuantized(q, new Float32Array(5)), ShapeError);
  merged.dispose();
  dense.dispose();
  q.dispose();
});

test('Linear4bit rejects inputs of the wrong width', () => {
  const q = new Linear4bit(quantize4bit(new Float32Array(8 * 64), { quantType: 'nf4', shape: [8, 64] }));
  assert.throws(() => q.forward(Tensor.fromTyped(new Float32Array(63), [1, 63], 'f32')), ShapeError);
  q.dispose();
});
