// Parity with Hugging Face PEFT on files made by test/reference/make_peft_reference.py (see its header for the
// layout of test/reference/data/). Without that folder every test here skips with the reason printed.

import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { Rng } from '../../src/core/rng.ts';
import { tidy } from '../../src/core/scope.ts';
import { openSafetensors, toFloat32 } from '../../src/formats/safetensors.ts';
import type { LlamaForCausalLM } from '../../src/models/llama.ts';
import { loadModel } from '../../src/models/load.ts';
import { intTensor } from '../../src/ops/create.ts';
import { noGrad } from '../../src/ops/tape.ts';
import { ADAPTER_CONFIG_KEYS } from '../../src/peft/lora/config.ts';
import { loadAdapter, saveAdapter } from '../../src/peft/lora/io.ts';
import { LoraLinear } from '../../src/peft/lora/layer.ts';
import { LoraModel } from '../../src/peft/lora/model.ts';
import { doraWeightNorm } from '../../src/peft/lora/ops.ts';
import { maxRelDiff } from '../peft/helpers.ts';

const DATA = fileURLToPath(new URL('./data/', import.meta.url));
const skip = existsSync(join(DATA, 'manifest.json'))
  ? false
  : `PEFT reference data absent (${DATA}); run test/reference/make_peft_reference.py where torch+transformers+peft exist`;
if (skip) console.log(`# skipping: ${skip}`);

const quiet = { onWarning: () => {} };
const tmp = mkdtempSync(join(tmpdir(), 'lowrank-peft-ref-'));
after(() => rmSync(tmp, { recursive: true, force: true }));

function readTensors(file: string): Map<string, { shape: number[]; data: Float32Array }> {
  const r = openSafetensors(file);
  try {
    return new Map(r.names().map((n) => [n, { shape: r.info(n).shape, data: toFloat32(r.read(n)) }]));
  } finally {
    r.close();
  }
}

// biome-ignore lint/suspicious/noExplicitAny: reference JSON files of known layout
function json(file: string): any {
  return JSON.parse(readFileSync(join(DATA, file), 'utf8'));
}

function logits(model: LlamaForCausalLM, ids: number[][], adapterRows?: unknown): Float32Array {
  return noGrad(() =>
    tidy(() => {
      const B = ids.length;
      const T = ids[0]!.length;
      const pos = intTensor(
        ids.flatMap(() => [...Array(T).keys()]),
        [B, T],
      );
      return model.forward(intTensor(ids.flat(), [B, T]), { positions: pos, adapterRows }).toF32();
    }),
  );
}

async function base(): Promise<LlamaForCausalLM> {
  return (await loadModel(join(DATA, 'base'), { dtype: 'f32' })).model;
}

const cases = skip ? [] : Object.keys(json('manifest.json').cases as Record<string, unknown>);
const inputs: number[][] = skip ? [] : json('inputs.json').input_ids;

test('the base model gives PEFT/transformers logits', { skip }, async () => {
  const want = readTensors(join(DATA, 'base_logits.safetensors')).get('logits')!.data;
  assert.ok(maxRelDiff(logits(await base(), inputs), want) < 1e-5);
});

test('adapters saved by PEFT load and give its logits; merging gives its merged weights', { skip }, async () => {
  for (const name of cases) {
    const m = await base();
    const pm = loadAdapter(m, join(DATA, 'adapters', name), quiet);
    const want = readTensors(join(DATA, 'logits', `${name}.safetensors`));
    assert.ok(maxRelDiff(logits(m, inputs), want.get('logits')!.data) < 1e-4, `${name}: unmerged logits`);
    const merged = pm.mergeAndUnload({ safe: true });
    assert.ok(maxRelDiff(logits(merged, inputs), want.get('merged_logits')!.data) < 1e-4, `${name}: merged logits`);
    const ref = readTensors(join(DATA, 'merged', `${name}.safetensors`));
    const ours = new Map(merged.namedParameters());
    for (const [k, t] of ref) {
      if (k.endsWith('rotary_emb.inv_freq')) continue;
      const p = ours.get(k);
      assert.ok(p, `${name}: merged tensor ${k} present`);
      assert.ok(maxRelDiff(p.toF32(), t.data) < 1e-5, `${name}: merged ${k}`);
    }
  }
});

test('DoRA magnitude is ||W + s B A|| per output row, as PEFT initialises it', { skip }, async () => {
  const m = await base();
  const pm = loadAdapter(m, join(DATA, 'adapters', 'dora'), quiet);
  let checked = 0;
  for (const [path, l] of pm.adapterLayers()) {
    if (!(l instanceof LoraLinear)) continue;
    const A = l.loraA.get('default')!.weight;
    const B = l.loraB.get('default')!.weight;
    const n = doraWeightNorm(l.weight, A, B, l.scalingOf('default')).toF32();
    assert.ok(maxRelDiff(n, l.magnitude.get('default')!.weight.toF32()) < 1e-5, path);
    checked++;
  }
  assert.ok(checked >= 6);
});

test('re-saving a PEFT adapter gives the same keys, shapes and config fields', { skip }, async () => {
  for (const name of cases) {
    const dir = join(DATA, 'adapters', name);
    const pm = loadAdapter(await base(), dir, quiet);
    const out = join(tmp, name);
    await saveAdapter(pm, out);
    const a = openSafetensors(join(dir, 'adapter_model.safetensors'));
    const b = openSafetensors(join(out, 'adapter_model.safetensors'));
    assert.deepEqual(b.names().sort(), a.names().sort(), `${name}: keys`);
    for (const k of a.names()) {
      assert.deepEqual(b.info(k).shape, a.info(k).shape, `${name}: ${k}`);
      assert.deepEqual(toFloat32(b.read(k)), toFloat32(a.read(k)), `${name}: ${k} values`);
    }
    a.close();
    b.close();
    const ja = JSON.parse(readFileSync(join(dir, 'adapter_config.json'), 'utf8'));
    const jb = JSON.parse(readFileSync(join(out, 'adapter_config.json'), 'utf8'));
    // fields of the LoraConfig this library knows (a newer PEFT may write more; they are dropped as PEFT drops them)
    for (const k of Object.keys(ja).filter((f) => ADAPTER_CONFIG_KEYS.includes(f))) {
      assert.ok(k in jb, `${name}: config field ${k}`);
      if (k === 'peft_version' || k === 'base_model_name_or_path') continue;
      const norm = (v: unknown) => (Array.isArray(v) ? [...v].sort() : v);
      assert.deepEqual(norm(jb[k]), norm(ja[k]), `${name}: config field ${k}`);
    }
  }
});

test('two adapters saved together load; mixed-batch logits match PEFT adapter_names', { skip }, async () => {
  const m = await base();
  const pm = loadAdapter(m, join(DATA, 'multi'), quiet);
  loadAdapter(pm, join(DATA, 'multi', 'other'), { adapterName: 'other', ...quiet });
  const want = readTensors(join(DATA, 'multi_logits.safetensors'));
  assert.ok(maxRelDiff(logits(m, inputs), want.get('default')!.data) < 1e-4);
  pm.setAdapter('other');
  assert.ok(maxRelDiff(logits(m, inputs), want.get('other')!.data) < 1e-4);
  const mj = json('multi.json');
  assert.ok(maxRelDiff(logits(m, mj.input_ids, mj.adapter_names), want.get('mixed')!.data) < 1e-4);
});

test('target matching picks the same modules as PEFT', { skip }, async () => {
  for (const t of json('targets.json') as {
    config: Record<string, unknown>;
    targeted?: string[];
    target_modules_after?: unknown;
    error?: string;
  }[]) {
    const m = await base();
    if (t.error) {
      assert.throws(() => new LoraModel(m, t.config, 'default', quiet), JSON.stringify(t.config));
      continue;
    }
    const pm = new LoraModel(m, t.config, 'default', { rng: new Rng(1), ...quiet });
    const got = pm
      .adapterLayers()
      .map(([p]) => p)
      .sort();
    assert.deepEqual(got, t.targeted, JSON.stringify(t.config));
    const after = pm.configs.get('default')!.target_modules;
    assert.deepEqual(
      Array.isArray(after) ? [...after].sort() : after,
      t.target_modules_after,
      `${JSON.stringify(t.config)}: resolved target_modules`,
    );
  }
});

test('PiSSA and OLoRA rewrite the base weight as PEFT does', { skip }, async () => {
  for (const init of ['pissa', 'olora']) {
    const want = readTensors(join(DATA, 'inits', `${init}.safetensors`));
    const m = await base();
    const pm = new LoraModel(
      m,
      { r: 4, lora_alpha: 8, target_modules: ['q_proj'], init_lora_weights: init },
      'default',
      { rng: new Rng(1) },
    );
    const l = pm.model.getModule('model.layers.0.self_attn.q_proj') as LoraLinear;
    assert.ok(maxRelDiff(l.weight.toF32(), want.get('base_weight')!.data) < 1e-4, `${init}: residual base weight`);
    const ba = (A: Float32Array, B: Float32Array, out: number, r: number, inF: number) => {
      const y = new Float32Array(out * inF);
      for (let o = 0; o < out; o++)
        for (let j = 0; j < r; j++) for (let i = 0; i < inF; i++) y[o * inF + i] += B[o * r + j]! * A[j * inF + i]!;
      return y;
    };
    const A = l.loraA.get('default')!.weight.toF32();
    const B = l.loraB.get('default')!.weight.toF32();
    assert.ok(
      maxRelDiff(ba(A, B, 16, 4, 16), ba(want.get('lora_A')!.data, want.get('lora_B')!.data, 16, 4, 16)) < 1e-4,
      `${init}: B A`,
    );
    if (init === 'olora') {
      // Householder QR with LAPACK's signs: A and B themselves match
      assert.ok(maxRelDiff(A, want.get('lora_A')!.data) < 1e-4);
      assert.ok(maxRelDiff(B, want.get('lora_B')!.data) < 1e-4);
    }
  }
});
