import assert from 'node:assert/strict';
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { ConfigError, FormatError } from '../../src/core/errors.ts';
import { Rng } from '../../src/core/rng.ts';
import { openSafetensors } from '../../src/formats/safetensors.ts';
import { ADAPTER_CONFIG_KEYS } from '../../src/peft/lora/config.ts';
import { loadAdapter, removeAdapterName, saveAdapter } from '../../src/peft/lora/io.ts';
import { LoraModel } from '../../src/peft/lora/model.ts';
import { logitsOf, maxRelDiff, randomizeAdapters, tinyModel } from './helpers.ts';

const tmp = mkdtempSync(join(tmpdir(), 'lowrank-peft-io-'));
after(() => rmSync(tmp, { recursive: true, force: true }));
const quiet = { onWarning: () => {} };

test('adapter name removal follows PEFT', () => {
  assert.equal(
    removeAdapterName('base_model.model.q_proj.lora_A.default.weight', 'default'),
    'base_model.model.q_proj.lora_A.weight',
  );
  assert.equal(removeAdapterName('x.lora_embedding_A.default', 'default'), 'x.lora_embedding_A');
  assert.equal(removeAdapterName('x.lora_magnitude_vector.a', 'a'), 'x.lora_magnitude_vector');
  assert.equal(removeAdapterName('default.q.weight', 'default'), 'default.q.weight');
});

test('save -> load is exact; keys and adapter_config.json follow PEFT for a Llama model', async () => {
  const m = tinyModel(2);
  const pm = new LoraModel(
    m,
    {
      target_modules: ['q_proj', 'v_proj', 'o_proj', 'embed_tokens'],
      r: 4,
      lora_alpha: 8,
      use_rslora: true,
      modules_to_save: ['lm_head'],
      task_type: 'CAUSAL_LM',
    },
    'default',
    { rng: new Rng(1), ...quiet },
  );
  pm.addAdapter('dora', {
    target_modules: ['k_proj', 'down_proj'],
    r: 2,
    use_dora: true,
    rank_pattern: { down_proj: 3 },
  });
  randomizeAdapters(pm.namedParameters(), 4);
  const lm = m.getModule('lm_head')!.getChild('modules_to_save')!.getChild('default')!.getParam('weight')!;
  (lm.data as Float32Array)[5] = 3.5;
  const want = logitsOf(m);
  pm.setAdapter('dora');
  const wantDora = logitsOf(m);
  const dir = join(tmp, 'two');
  const written = await saveAdapter(pm, dir, { baseModelNameOrPath: 'tiny' });
  assert.deepEqual(written, [dir, join(dir, 'dora')]);
  assert.deepEqual(readdirSync(dir).sort(), ['adapter_config.json', 'adapter_model.safetensors', 'dora']);

  const r = openSafetensors(join(dir, 'adapter_model.safetensors'));
  const keys = r.names().sort();
  assert.equal(r.metadata.format, 'pt');
  assert.ok(keys.includes('base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight'));
  assert.ok(keys.includes('base_model.model.model.layers.1.self_attn.o_proj.lora_B.weight'));
  assert.ok(keys.includes('base_model.model.model.embed_tokens.lora_embedding_A'));
  assert.ok(keys.includes('base_model.model.model.embed_tokens.lora_embedding_B'));
  assert.ok(keys.includes('base_model.model.model.embed_tokens.base_layer.weight'), 'targeted embedding saved');
  assert.ok(keys.includes('base_model.model.lm_head.weight'), 'modules_to_save as a plain key');
  assert.ok(!keys.some((k) => k.includes('default') || k.includes('dora') || k.includes('k_proj')));
  assert.equal(r.info('base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight').dtype, 'F32');
  assert.deepEqual(r.info('base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight').shape, [4, 16]);
  assert.deepEqual(r.info('base_model.model.model.embed_tokens.lora_embedding_A').shape, [4, 48]);
  assert.deepEqual(r.info('base_model.model.model.embed_tokens.lora_embedding_B').shape, [16, 4]);
  r.close();
  const rd = openSafetensors(join(dir, 'dora', 'adapter_model.safetensors'));
  assert.deepEqual(rd.names().sort(), [
    'base_model.model.model.layers.0.mlp.down_proj.lora_A.weight',
    'base_model.model.model.layers.0.mlp.down_proj.lora_B.weight',
    'base_model.model.model.layers.0.mlp.down_proj.lora_magnitude_vector',
    'base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight',
    'base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight',
    'base_model.model.model.layers.0.self_attn.k_proj.lora_magnitude_vector',
    'base_model.model.model.layers.1.mlp.down_proj.lora_A.weight',
    'base_model.model.model.layers.1.mlp.down_proj.lora_B.weight',
    'base_model.model.model.layers.1.mlp.down_proj.lora_magnitude_vector',
    'base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight',
    'base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight',
    'base_model.model.model.layers.1.self_attn.k_proj.lora_magnitude_vector',
  ]);
  assert.deepEqual(rd.info('base_model.model.model.layers.0.mlp.down_proj.lora_A.weight').shape, [3, 24]);
  assert.deepEqual(rd.info('base_model.model.model.layers.0.mlp.down_proj.lora_magnitude_vector').shape, [16]);
  rd.close();

  const text = readFileSync(join(dir, 'adapter_config.json'), 'utf8');
  const json = JSON.parse(text);
  assert.deepEqual(Object.keys(json), [...ADAPTER_CONFIG_KEYS]);
  assert.deepEqual(Object.keys(json), Object.keys(json).sort(), 'sorted keys, as json.dumps(sort_keys=True)');
  assert.equal(text.split('\n')[1], '  "alora_invocation_tokens": null,', 'indent 2');
  for (const k of [
    'r',
    'lora_alpha',
    'lora_dropout',
    'target_modules',
    'peft_type',
    'use_rslora',
    'use_dora',
    'bias',
    'init_lora_weights',
    'fan_in_fan_out',
    'modules_to_save',
    'rank_pattern',
    'alpha_pattern',
    'task_type',
    'layers_to_transform',
    'layers_pattern',
    'revision',
    'base_model_name_or_path',
    'inference_mode',
    'lora_bias',
    'megatron_core',
    'loftq_config',
    'exclude_modules',
  ])
    assert.ok(k in json, k);
  assert.equal(json.peft_type, 'LORA');
  assert.equal(json.inference_mode, true);
  assert.equal(json.r, 4);
  assert.equal(json.use_rslora, true);
  assert.deepEqual(json.target_modules, ['embed_tokens', 'o_proj', 'q_proj', 'v_proj']);
  assert.deepEqual(json.modules_to_save, ['lm_head']);
  assert.equal(json.base_model_name_or_path, 'tiny');
  assert.equal(json.megatron_core, 'megatron.core');
  assert.deepEqual(json.loftq_config, {});
  assert.equal(json.auto_mapping, null);
  const jd = JSON.parse(readFileSync(join(dir, 'dora', 'adapter_config.json'), 'utf8'));
  assert.equal(jd.use_dora, true);
  assert.deepEqual(jd.rank_pattern, { down_proj: 3 });
  assert.deepEqual(jd.auto_mapping, {
    base_model_class: 'LlamaForCausalLM',
    parent_library: 'transformers.models.llama.modeling_llama',
  });

  // load both onto a fresh copy of the base model: exact logits
  const m2 = tinyModel(2);
  const pm2 = loadAdapter(m2, dir, quiet);
  assert.deepEqual(logitsOf(m2), want);
  loadAdapter(pm2, join(dir, 'dora'), { adapterName: 'dora', ...quiet });
  assert.deepEqual(pm2.activeAdapters, ['default'], 'load_adapter adds an inactive adapter');
  pm2.setAdapter('dora');
  assert.deepEqual(logitsOf(m2), wantDora);
  assert.equal(pm2.trainableParameters().length, 0, 'loaded adapters are frozen (inference mode)');
  // and the parameters are bit-identical
  const a = new Map([...pm.namedParameters()].map(([n, p]) => [n, p.toF32()]));
  for (const [n, p] of pm2.namedParameters()) assert.deepEqual(p.toF32(), a.get(n), n);
});

test('loading tolerates unknown config fields with a warning and refuses bad ones naming the field', async () => {
  const m = tinyModel();
  const pm = new LoraModel(m, {}, 'default', { rng: new Rng(1) });
  const dir = join(tmp, 'tolerant');
  await saveAdapter(pm, dir);
  const cfgFile = join(dir, 'adapter_config.json');
  const json = JSON.parse(readFileSync(cfgFile, 'utf8'));
  writeFileSync(cfgFile, JSON.stringify({ ...json, some_future_field: 1 }));
  const warnings: string[] = [];
  loadAdapter(tinyModel(), dir, { onWarning: (w) => warnings.push(w) });
  assert.ok(warnings.some((w) => w.includes("'some_future_field'")));
  writeFileSync(cfgFile, JSON.stringify({ ...json, r: -1 }));
  assert.throws(
    () => loadAdapter(tinyModel(), dir, quiet),
    (e: unknown) => e instanceof ConfigError && /\br must be/.test((e as Error).message),
  );
  writeFileSync(cfgFile, JSON.stringify({ ...json, peft_type: 'IA3' }));
  assert.throws(() => loadAdapter(tinyModel(), dir, quiet), /peft_type/);
  writeFileSync(cfgFile, JSON.stringify({ ...json, layer_replication: [[0, 1]] }));
  assert.throws(() => loadAdapter(tinyModel(), dir, quiet), /layer_replication/);
  writeFileSync(cfgFile, '{not json');
  assert.throws(() => loadAdapter(tinyModel(), dir, quiet), FormatError);
  assert.throws(() => loadAdapter(tinyModel(), join(tmp, 'nope'), quiet), ConfigError);
  // a shape that does not fit names the tensor, and the model is left as it was
  writeFileSync(cfgFile, JSON.stringify({ ...json, r: 4 }));
  const m3 = tinyModel();
  const before = logitsOf(m3);
  assert.throws(() => loadAdapter(m3, dir, quiet), /q_proj\.lora_A\.weight.*shape/);
  assert.deepEqual(logitsOf(m3), before);
  assert.equal(
    [...m3.namedParameters()].some(([n]) => n.includes('lora')),
    false,
  );
});

test('lora_bias and bias="all"/"lora_only": merged like PEFT, saved under PEFT keys', async () => {
  const m = tinyModel(5, { attention_bias: true });
  const pm = new LoraModel(m, { target_modules: ['q_proj', 'k_proj'], lora_bias: true, bias: 'lora_only' }, 'default', {
    rng: new Rng(2),
  });
  randomizeAdapters(pm.namedParameters(), 6);
  const trainable = pm.trainableParameters().map(([n]) => n);
  assert.ok(trainable.includes('base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.bias'));
  assert.ok(
    trainable.includes('base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias'),
    'lora_only bias trains',
  );
  assert.ok(!trainable.some((n) => n.includes('v_proj')), 'v_proj (not adapted) bias stays frozen');
  const want = logitsOf(m);
  const dir = join(tmp, 'bias');
  await saveAdapter(pm, dir);
  const r = openSafetensors(join(dir, 'adapter_model.safetensors'));
  const keys = r.names();
  r.close();
  assert.ok(keys.includes('base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias'));
  assert.ok(keys.includes('base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias'));
  assert.ok(!keys.some((k) => k.includes('v_proj')));
  pm.merge();
  assert.ok(maxRelDiff(logitsOf(m), want) < 1e-5);
  pm.unmerge();
  const m2 = tinyModel(5, { attention_bias: true });
  loadAdapter(m2, dir, quiet);
  assert.deepEqual(logitsOf(m2), want);
  // bias = 'all' saves every bias
  const pa = new LoraModel(
    tinyModel(5, { attention_bias: true }),
    { target_modules: ['q_proj'], bias: 'all' },
    'default',
    {
      rng: new Rng(2),
    },
  );
  const d2 = join(tmp, 'bias-all');
  await saveAdapter(pa, d2);
  const r2 = openSafetensors(join(d2, 'adapter_model.safetensors'));
  assert.ok(r2.names().includes('base_model.model.model.layers.1.self_attn.v_proj.bias'));
  assert.ok(r2.names().includes('base_model.model.model.layers.1.self_attn.q_proj.base_layer.bias'));
  r2.close();
});
