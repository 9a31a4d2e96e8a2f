import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { Rng } from '../../src/core/rng.ts';
import { generate } from '../../src/models/generate.ts';
import { loadModel } from '../../src/models/load.ts';
import { saveModelHF } from '../../src/models/save.ts';
import { loadAdapter, saveAdapter } from '../../src/peft/lora/io.ts';
import { saveMergedGguf } from '../../src/peft/lora/merge.ts';
import { LoraModel } from '../../src/peft/lora/model.ts';
import { loadModelQuantized, qloraConfig } from '../../src/quant/load.ts';
import { saveModelQuantized } from '../../src/quant/save.ts';
import { loadTokenizer } from '../../src/tokenize/hf.ts';
import { writeByteLevelTokenizer } from '../../src/tokenize/synthetic.ts';
import { logitsOf, maxRelDiff, randomizeAdapters, STORIES, skipUnlessExists, tinyModel } from './helpers.ts';

const ROOT = fileURLToPath(new URL('../../', import.meta.url));
const tmp = mkdtempSync(join(tmpdir(), 'lowrank-peft-cli-'));
after(() => rmSync(tmp, { recursive: true, force: true }));

function lowrank(...args: string[]): string {
  return execFileSync(process.execPath, [join(ROOT, 'bin/lowrank.js'), ...args], { encoding: 'utf8', cwd: ROOT });
}

const PROMPT = 'Once upon a time';

test('lowrank generate --adapter and lowrank merge (HF dir and GGUF) on stories260K', {
  skip: skipUnlessExists(STORIES, 'stories260K'),
}, async () => {
  const { model } = await loadModel(STORIES);
  const tok = loadTokenizer(STORIES);
  const ids = tok.encode(PROMPT);
  const plain = generate(model, tok, ids, { maxTokens: 12, temperature: 0 }).text;
  const pm = new LoraModel(model, { target_modules: 'all-linear', r: 4, lora_alpha: 8 }, 'default', {
    rng: new Rng(3),
    onWarning: () => {},
  });
  randomizeAdapters(pm.namedParameters(), 7, 0.3);
  const adapted = generate(model, tok, ids, { maxTokens: 12, temperature: 0 }).text;
  assert.notEqual(adapted, plain, 'the adapter changes the greedy continuation');
  const adapterLogits = logitsOf(model, [ids]);
  const dir = join(tmp, 'stories-adapter');
  await saveAdapter(pm, dir);

  const out = lowrank(
    'generate',
    '--model',
    STORIES,
    '--adapter',
    dir,
    '--prompt',
    PROMPT,
    '--max-tokens',
    '12',
    '--temperature',
    '0',
  );
  assert.equal(out, `${PROMPT}${adapted}\n`);
  const w0 = lowrank(
    'generate',
    '--model',
    STORIES,
    '--adapter',
    dir,
    '--weights',
    '0',
    '--prompt',
    PROMPT,
    '--max-tokens',
    '12',
    '--temperature',
    '0',
  );
  assert.equal(w0, `${PROMPT}${plain}\n`, 'weight 0 gives the base model');

  const gg = join(tmp, 'merged.gguf');
  lowrank('merge', '--model', STORIES, '--adapter', dir, '--out', gg, '--gguf');
  const merged = await loadModel(gg);
  // 1e-4: a backend that accumulates in f32 (the native GEMM) differs from the unmerged adapter by ~3e-5 on
  // this strongly perturbed model (the f64 reference: ~3e-6)
  assert.ok(maxRelDiff(logitsOf(merged.model, [ids]), adapterLogits) < 1e-4);
  assert.equal(generate(merged.model, loadTokenizer(gg), ids, { maxTokens: 12, temperature: 0 }).text, adapted);

  const hf = join(tmp, 'merged-hf');
  lowrank('merge', '--model', STORIES, '--adapter', dir, '--out', hf);
  assert.ok(existsSync(join(hf, 'config.json')) && existsSync(join(hf, 'model.safetensors')));
  const mhf = await loadModel(hf);
  assert.ok(maxRelDiff(logitsOf(mhf.model, [ids]), adapterLogits) < 1e-4);

  let err = '';
  try {
    lowrank('merge', '--model', STORIES, '--adapter', join(tmp, 'missing'), '--out', join(tmp, 'x'));
  } catch (e) {
    err = String((e as { stderr?: string }).stderr);
  }
  assert.match(err, /^ConfigError: .*missing.* is not a directory/m);
});

test('merged export of an HF model as GGUF carries hyperparameters and the byte-level tokenizer', async () => {
  const src = join(tmp, 'tiny-hf');
  const m = tinyModel(4, { vocab_size: 300, bos_token_id: 1, eos_token_id: 4 });
  await saveModelHF(m.namedParameters(), m.config, src);
  writeByteLevelTokenizer(src, 300);
  const { model } = await loadModel(src);
  const pm = new LoraModel(model, { target_modules: ['q_proj', 'k_proj', 'up_proj'], r: 2 }, 'default', {
    rng: new Rng(1),
  });
  randomizeAdapters(pm.namedParameters(), 3);
  const want = logitsOf(model);
  const adir = join(tmp, 'tiny-adapter');
  await saveAdapter(pm, adir);
  const fresh = (await loadModel(src)).model;
  const merged = loadAdapter(fresh, adir, { onWarning: () => {} }).mergeAndUnload({ safe: true });
  const file = join(tmp, 'tiny.gguf');
  await saveMergedGguf(merged, file, { tokenizerDir: src });
  const back = await loadModel(file);
  assert.equal(back.config.num_key_value_heads, 2);
  assert.ok(maxRelDiff(logitsOf(back.model), want) < 1e-5);
  const t1 = loadTokenizer(src);
  const t2 = loadTokenizer(file);
  const text = 'Hello, wörld! <|im_end|>';
  assert.deepEqual(t2.encode(text), t1.encode(text));
  assert.equal(t2.eosId, t1.eosId);
});

test('lowrank merge of a QLoRA adapter into its bnb-4bit base writes dense weights equal to the adapted model', async () => {
  const src = join(tmp, 'tiny-for-4bit');
  const m = tinyModel(11, { hidden_size: 32, intermediate_size: 64, vocab_size: 300 });
  await saveModelHF(m.namedParameters(), m.config, src);
  writeByteLevelTokenizer(src, 300);
  const q4 = join(tmp, 'tiny-4bit');
  const { model: qm } = await loadModelQuantized(src, qloraConfig());
  await saveModelQuantized(qm, qm.config, q4, { tokenizerFrom: src });
  const { model } = await loadModelQuantized(q4);
  const pm = new LoraModel(model, { target_modules: 'all-linear', r: 4 }, 'default', {
    rng: new Rng(2),
    onWarning: () => {},
  });
  randomizeAdapters(pm.namedParameters(), 5);
  const want = logitsOf(model);
  const adir = join(tmp, 'qlora-adapter');
  await saveAdapter(pm, adir);
  const out = join(tmp, 'qlora-merged');
  lowrank('merge', '--model', q4, '--adapter', adir, '--out', out, '--dtype', 'f32');
  const merged = await loadModel(out);
  assert.ok(maxRelDiff(logitsOf(merged.model), want) < 1e-5);
  assert.ok(existsSync(join(out, 'tokenizer.json')));
});
