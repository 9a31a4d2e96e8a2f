import assert from 'node:assert/strict';
import { test } from 'node:test';
import { ConfigError } from '../../src/core/errors.ts';
import { countParams, estimateMemory, llamaShapeFromConfig, loraParamCount } from '../../src/train/estimate.ts';

// The public config.json fields of meta-llama/Llama-2-7b-hf and Llama-2-70b-hf.
const LLAMA2_7B = {
  architectures: ['LlamaForCausalLM'],
  model_type: 'llama',
  hidden_size: 4096,
  intermediate_size: 11008,
  num_hidden_layers: 32,
  num_attention_heads: 32,
  num_key_value_heads: 32,
  vocab_size: 32000,
  max_position_embeddings: 4096,
  rms_norm_eps: 1e-5,
  tie_word_embeddings: false,
  torch_dtype: 'float16',
};
const LLAMA2_70B = {
  ...LLAMA2_7B,
  hidden_size: 8192,
  intermediate_size: 28672,
  num_hidden_layers: 80,
  num_attention_heads: 64,
  num_key_value_heads: 8,
};

const GBn = 1e9;

test('parameter counts of Llama-2 7B and 70B, and LoRA parameter counts', () => {
  const p7 = countParams(llamaShapeFromConfig(LLAMA2_7B));
  assert.equal(p7.total, 6_738_415_616);
  assert.equal(p7.linear, 6_476_005_376);
  const p70 = countParams(llamaShapeFromConfig(LLAMA2_70B));
  assert.equal(p70.total, 68_976_648_192);
  assert.equal(p70.linear, 68_451_041_280);
  const all = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'] as const;
  assert.equal(loraParamCount(llamaShapeFromConfig(LLAMA2_7B), 16, all), 39_976_960);
  assert.equal(loraParamCount(llamaShapeFromConfig(LLAMA2_7B), 64, all), 159_907_840);
  assert.equal(loraParamCount(llamaShapeFromConfig(LLAMA2_70B), 16, all), 207_093_760);
  // Tied embeddings drop the lm_head.
  assert.equal(countParams(llamaShapeFromConfig({ ...LLAMA2_7B, tie_word_embeddings: true })).lmHead, 0);
});

test('full fine-tuning of Llama-2-7B, AdamW mixed precision, batch 1 x 512: ~110 GB (100-120)', () => {
  // bf16 weights + bf16 grads + f32 master + f32 Adam m, v = 16 B/param = 107.8 GB, plus ~2.4 GB activations.
  const e = estimateMemory(LLAMA2_7B, { method: 'full', seqLen: 512, batchSize: 1 });
  assert.equal(e.trainableParams, 6_738_415_616);
  assert.equal(e.weights + e.gradients + e.optimizerStates, 16 * 6_738_415_616);
  assert.ok(e.total > 100 * GBn && e.total < 120 * GBn, `${e.total / GBn} GB`);
  assert.ok(e.activations > 1 * GBn && e.activations < 4 * GBn, `activations ${e.activations / GBn} GB`);
  // Without the master copy: 12 B/param (the QLoRA paper's 780 GB for 65B works out to this).
  const pure = estimateMemory(LLAMA2_7B, { method: 'full', seqLen: 512, batchSize: 1, masterWeights: false });
  assert.equal(pure.weights + pure.gradients + pure.optimizerStates, 12 * 6_738_415_616);
  assert.ok(e.formulas.some((l) => l.startsWith('master weights:')));
  assert.ok(e.formulas.at(-1)!.startsWith('total:'));
});

test('LoRA r=16 on all linears of Llama-2-7B, bf16 base, batch 1 x 512: 10-20 GB', () => {
  const e = estimateMemory(LLAMA2_7B, { method: 'lora', seqLen: 512, batchSize: 1, rank: 16 });
  assert.equal(e.trainableParams, 39_976_960);
  assert.equal(e.detail.baseWeights, 2 * 6_738_415_616);
  assert.equal(e.gradients, 4 * 39_976_960);
  assert.equal(e.optimizerStates, 8 * 39_976_960);
  assert.ok(e.total > 10 * GBn && e.total < 20 * GBn, `${e.total / GBn} GB`);
});

test('QLoRA of Llama-2-70B (NF4 + double quant, r=16 all linears, bf16 compute, checkpointing, 1 x 512) < 80 GB', () => {
  const e = estimateMemory(LLAMA2_70B, {
    method: 'qlora',
    seqLen: 512,
    batchSize: 1,
    rank: 16,
    gradientCheckpointing: true,
  });
  // 4-bit linears at ~4.127 bits: ~35.3 GB; embedding + lm_head + norms in bf16: ~1.05 GB.
  const bits = (e.detail.quantizedLinears * 8) / 68_451_041_280;
  assert.ok(bits > 4.1269 && bits < 4.128, `bits ${bits}`);
  assert.ok(e.detail.baseWeights > 36 * GBn && e.detail.baseWeights < 37 * GBn, `${e.detail.baseWeights / GBn}`);
  assert.ok(e.total < 80 * GBn, `${e.total / GBn} GB`);
  assert.ok(e.total < 48 * GBn, `fits a 48 GB GPU as in the paper: ${e.total / GBn} GB`);
  // r = 64 (the paper's Guanaco setting) still fits in 80 GB.
  const r64 = estimateMemory(LLAMA2_70B, {
    method: 'qlora',
    seqLen: 512,
    batchSize: 1,
    rank: 64,
    gradientCheckpointing: true,
  });
  assert.ok(r64.total < 80 * GBn, `${r64.total / GBn} GB`);
  // Without double quantization the constants cost 0.5 instead of 0.127 bits/param.
  const noDq = estimateMemory(LLAMA2_70B, {
    method: 'qlora',
    seqLen: 512,
    batchSize: 1,
    doubleQuant: false,
    gradientCheckpointing: true,
  });
  const saved = noDq.detail.quantizedLinears - e.detail.quantizedLinears;
  assert.ok(Math.abs(saved - (68_451_041_280 * 0.373) / 8) < 0.01 * GBn, `saved ${saved / GBn} GB`);
});

test('activations: per-layer formula, checkpointing, eager attention, targets', () => {
  const base = { seqLen: 1024, batchSize: 2 } as const;
  const full = estimateMemory(LLAMA2_7B, { method: 'full', ...base });
  const T = 2048;
  // 2 B × T × (6h + 2h_kv + 3I) + T × (4 B × 32 heads + 8 B rstd) for Llama-2-7B.
  assert.equal(full.detail.activationsPerLayer, 2 * T * (6 * 4096 + 2 * 4096 + 3 * 11008) + T * (4 * 32 + 8));
  assert.equal(full.detail.layerActivations, 32 * full.detail.activationsPerLayer);
  assert.equal(full.detail.logits, 8 * T * 32000);
  const ck = estimateMemory(LLAMA2_7B, { method: 'full', ...base, gradientCheckpointing: true });
  assert.equal(ck.detail.layerActivations, 32 * 2 * T * 4096 + ck.detail.activationsPerLayer);
  assert.ok(ck.activations < full.activations / 3);
  const eager = estimateMemory(LLAMA2_7B, { method: 'full', ...base, attention: 'eager' });
  assert.equal(
    eager.detail.activationsPerLayer - full.detail.activationsPerLayer,
    2 * 2 * 32 * 1024 * 1024 - T * 4 * 32,
  );
  // LoRA on q, v only: frozen gate/up/down need no saved inputs.
  const qv = estimateMemory(LLAMA2_7B, { method: 'lora', ...base, targetModules: ['q_proj', 'v_proj'] });
  const all = estimateMemory(LLAMA2_7B, { method: 'lora', ...base });
  assert.ok(qv.detail.activationsPerLayer < all.detail.activationsPerLayer);
  assert.equal(qv.trainableParams, 32 * 16 * (2 * 8192));
  // Activations grow with the batch.
  const b4 = estimateMemory(LLAMA2_7B, { method: 'lora', seqLen: 1024, batchSize: 4 });
  assert.ok(b4.activations > 1.9 * all.activations);
  // f32 everywhere doubles the activations and the base.
  const f32 = estimateMemory(LLAMA2_7B, { method: 'lora', ...base, weightDtype: 'f32' });
  assert.equal(f32.detail.baseWeights, 4 * 6_738_415_616);
  assert.ok(f32.detail.activationsPerLayer > 1.9 * all.detail.activationsPerLayer);
});

test('8-bit AdamW and SGD optimizer states', () => {
  const a8 = estimateMemory(LLAMA2_7B, { method: 'full', seqLen: 128, batchSize: 1, optimizer: 'adamw8bit' });
  assert.ok(Math.abs(a8.optimizerStates / 6_738_415_616 - 2.03) < 0.01);
  const sgd = estimateMemory(LLAMA2_7B, { method: 'lora', seqLen: 128, batchSize: 1, optimizer: 'sgd' });
  assert.equal(sgd.optimizerStates, 0);
});

test('qwen2-style biases and qwen3 q/k norms are counted; GQA shapes', () => {
  const qwen = {
    model_type: 'qwen2',
    hidden_size: 896,
    intermediate_size: 4864,
    num_hidden_layers: 24,
    num_attention_heads: 14,
    num_key_value_heads: 2,
    vocab_size: 151936,
    tie_word_embeddings: true,
  };
  // Qwen2.5-0.5B: 494,032,768 parameters.
  assert.equal(countParams(llamaShapeFromConfig(qwen)).total, 494_032_768);
});

test('bad configs and options: ConfigError naming the field', () => {
  const cases: [unknown, object, string][] = [
    [{ ...LLAMA2_7B, hidden_size: undefined }, {}, 'hidden_size'],
    [{ ...LLAMA2_7B, num_key_value_heads: 5 }, {}, 'num_key_value_heads'],
    [{ ...LLAMA2_7B, vocab_size: '32000' }, {}, 'vocab_size'],
    [{ ...LLAMA2_7B, hidden_size: 4001 }, {}, 'hidden_size'],
    [LLAMA2_7B, { seqLen: 0 }, 'seqLen'],
    [LLAMA2_7B, { batchSize: 1.5 }, 'batchSize'],
    [LLAMA2_7B, { method: 'prefix' }, 'method'],
    [LLAMA2_7B, { targetModules: ['qkv_proj'] }, 'targetModules'],
    [LLAMA2_7B, { optimizer: 'adafactor' }, 'optimizer'],
    [LLAMA2_7B, { blocksize: 100 }, 'blocksize'],
    ['not a config', {}, 'config.json'],
  ];
  for (const [cfg, opts, field] of cases) {
    assert.throws(
      () => estimateMemory(cfg, { method: 'lora', seqLen: 16, batchSize: 1, ...opts } as never),
      (e: unknown) => e instanceof ConfigError && e.message.includes(field),
      field,
    );
  }
});
