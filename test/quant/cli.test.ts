// The quantize and estimate commands, run in-process through commander (output captured).

import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { Command } from 'commander';
import { registerEstimate } from '../../src/cli/estimate.ts';
import { registerQuantize } from '../../src/cli/quantize.ts';
import { ConfigError } from '../../src/core/errors.ts';
import { openSafetensors } from '../../src/formats/safetensors.ts';
import { configFromHF } from '../../src/models/config.ts';
import { initModel, saveModelHF } from '../../src/models/save.ts';
import type { Linear4bit } from '../../src/quant/linear4bit.ts';
import { loadModelQuantized } from '../../src/quant/load.ts';

const root = mkdtempSync(join(tmpdir(), 'lowrank-quant-cli-'));
after(() => rmSync(root, { recursive: true, force: true }));

async function run(args: string[]): Promise<string> {
  const program = new Command();
  program.exitOverride();
  registerQuantize(program);
  registerEstimate(program);
  const lines: string[] = [];
  const log = console.log;
  console.log = (...a: unknown[]) => lines.push(a.join(' '));
  try {
    await program.parseAsync(['node', 'lowrank', ...args]);
  } finally {
    console.log = log;
  }
  return lines.join('\n');
}

// The public config.json fields of meta-llama/Llama-2-7b-hf.
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

test('lowrank estimate prints the breakdown table, and the formulas with --explain', async () => {
  const file = join(root, 'config.json');
  writeFileSync(file, JSON.stringify(LLAMA2_7B));
  const out = await run(['estimate', '--model', file, '--method', 'qlora', '--seq', '512', '--rank', '64']);
  assert.match(out, /^model: .*config\.json$/m);
  assert.match(out, /^method: qlora, rank 64, batch 1 × seq 512, gradient checkpointing off$/m);
  assert.match(out, /^parameters: 6,738,415,616, trainable: 159,907,840 \(2\.373%\)$/m);
  assert.match(out, /^\| component +\| +memory \|$/m);
  // NF4 + DQ linears: 6.476e9 weights at 4.127 bits = 3.34 GB (qlora.md section 6)
  assert.match(out, /^\| {3}4-bit linears +\| +3\.34 GB \|$/m);
  assert.match(out, /^\| {3}embedding, head, norms +\| +524\.8 MB \|$/m);
  assert.match(out, /^\| total +\| +\d+\.\d\d GB \|$/m);
  assert.doesNotMatch(out, /formulas:/);
  const explained = await run([
    'estimate',
    '--model',
    file,
    '--method',
    'full',
    '--explain',
    '--gradient-checkpointing',
  ]);
  assert.match(explained, /^\| {3}f32 master copy +\| +26\.95 GB \|$/m);
  assert.match(explained, /^formulas:$/m);
  assert.match(explained, /^ {2}master weights: 6,738,415,616 × 4 B/m);
  assert.match(explained, /^ {2}layers with checkpointing: 32 × 2 B/m);
  const json = JSON.parse(await run(['estimate', '--model', file, '--method', 'lora', '--json']));
  assert.equal(json.method, 'lora');
  assert.equal(json.trainableParams, 39_976_960);
  await assert.rejects(() => run(['estimate', '--model', file, '--method', 'dora']), ConfigError);
  await assert.rejects(() => run(['estimate', '--model', file, '--method', 'lora', '--seq', '0']), /--seq/);
  await assert.rejects(() => run(['estimate', '--model', join(root, 'nope.json'), '--method', 'lora']), ConfigError);
});

test('lowrank quantize --to nf4 --double-quant writes a dir that loads back pre-quantized; --to int8 too', async () => {
  const cfg = configFromHF({
    model_type: 'llama',
    vocab_size: 64,
    hidden_size: 64,
    intermediate_size: 128,
    num_hidden_layers: 1,
    num_attention_heads: 4,
    tie_word_embeddings: true,
  });
  const model = initModel(cfg, 1);
  const src = join(root, 'src');
  await saveModelHF(model.namedParameters(), cfg, src);
  model.dispose();
  const out = join(root, 'nf4');
  const msg = await run([
    'quantize',
    '--model',
    src,
    '--to',
    'nf4',
    '--double-quant',
    '--blocksize',
    '128',
    '--out',
    out,
  ]);
  assert.match(msg, /^wrote nf4 \+ double quant \(blocksize 128\): 7 linear layers in [\d.]+ kB, to /);
  const back = await loadModelQuantized(out);
  assert.equal(back.prequantized, true);
  assert.equal(back.quantizationConfig.bnb_4bit_use_double_quant, true);
  assert.equal(back.quantizationConfig.bnb_4bit_compute_dtype, 'bfloat16');
  const q = back.model.getModule('model.layers.0.mlp.up_proj') as Linear4bit;
  assert.equal(q.blocksize, 128);
  assert.equal(q.quantType, 'nf4');
  back.model.dispose();
  assert.match(readFileSync(join(out, 'config.json'), 'utf8'), /"bnb_4bit_quant_type": "nf4"/);

  const out8 = join(root, 'int8');
  assert.match(
    await run(['quantize', '--model', src, '--to', 'int8', '--out', out8]),
    /7 linear weights as int8 \+ SCB/,
  );
  const r = openSafetensors(join(out8, 'model.safetensors'));
  assert.equal(r.info('model.layers.0.mlp.up_proj.weight').dtype, 'I8');
  r.close();

  await assert.rejects(() => run(['quantize', '--model', src, '--to', 'int4', '--out', out]), /--to must be/);
  await assert.rejects(
    () => run(['quantize', '--model', src, '--to', 'nf4', '--blocksize', '48', '--out', out]),
    /blocksize/,
  );
  await assert.rejects(
    () => run(['quantize', '--model', src, '--to', 'int8', '--double-quant', '--out', out8]),
    /nf4\/fp4 only/,
  );
  await assert.rejects(() => run(['quantize', '--model', out, '--to', 'fp4', '--out', join(root, 'again')]), /already/);
  await assert.rejects(() => run(['quantize', '--model', src, '--to', 'fp4', '--out', src]), /--out must not be/);
});
