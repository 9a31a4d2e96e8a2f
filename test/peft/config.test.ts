import assert from 'node:assert/strict';
import { test } from 'node:test';
import { ConfigError } from '../../src/core/errors.ts';
import { adapterConfigToJson, loraConfig, parseAdapterConfig } from '../../src/peft/lora/config.ts';
import {
  checkTargetModuleExists,
  findMinimalTargetModules,
  getPatternKey,
  matchesModulesToSave,
  rankAndAlpha,
} from '../../src/peft/lora/target.ts';

test("LoraConfig defaults are PEFT's", () => {
  const c = loraConfig();
  assert.equal(c.r, 8);
  assert.equal(c.lora_alpha, 8);
  assert.equal(c.lora_dropout, 0);
  assert.equal(c.bias, 'none');
  assert.equal(c.init_lora_weights, true);
  assert.equal(c.use_rslora, false);
  assert.equal(c.use_dora, false);
  assert.equal(c.fan_in_fan_out, false);
  assert.equal(c.lora_bias, false);
  assert.equal(c.target_modules, null);
  assert.deepEqual(c.rank_pattern, {});
  assert.equal(c.peft_type, 'LORA');
  assert.equal(c.extra.megatron_core, 'megatron.core');
});

test('validation errors name the field', () => {
  const bad: [Record<string, unknown>, RegExp][] = [
    [{ r: 0 }, /\br must be a positive integer/],
    [{ r: 2.5 }, /\br must be/],
    [{ lora_alpha: 'x' }, /lora_alpha/],
    [{ lora_dropout: 1 }, /lora_dropout/],
    [{ bias: 'some' }, /bias/],
    [{ target_modules: 3 }, /target_modules/],
    [{ target_modules: '.*q', layers_to_transform: [0] }, /layers_to_transform.*str/],
    [{ target_modules: ['q'], layers_pattern: 'layers' }, /layers_pattern needs layers_to_transform/],
    [{ init_lora_weights: 'zzz' }, /init_lora_weights/],
    [{ init_lora_weights: 'pissa_niter_x' }, /init_lora_weights/],
    [{ lora_bias: true, use_dora: true }, /lora_bias/],
    [{ lora_bias: true, init_lora_weights: 'gaussian' }, /lora_bias/],
    [{ rank_pattern: { q: 0 } }, /rank_pattern\['q'\]/],
    [{ task_type: 'NOPE' }, /task_type/],
    [{ use_dora: 'yes' }, /use_dora/],
    [{ modules_to_save: 'lm_head' }, /modules_to_save/],
  ];
  for (const [input, re] of bad)
    assert.throws(
      () => loraConfig(input as never, 'cfg.json'),
      (e: unknown) =>
        e instanceof ConfigError && re.test((e as Error).message) && /^cfg\.json: /.test((e as Error).message),
      JSON.stringify(input),
    );
  assert.equal(loraConfig({ init_lora_weights: 'pissa_niter_16' }).init_lora_weights, 'pissa_niter_16');
});

test('adapter_config.json: unknown fields warn, every field written sorted, round trip', () => {
  const { config, warnings } = parseAdapterConfig({
    peft_type: 'LORA',
    r: 16,
    target_modules: ['q_proj', 'v_proj'],
    brand_new: 1,
    eva_config: null,
    peft_version: '0.18.0',
  });
  assert.equal(config.r, 16);
  assert.equal(warnings.length, 1);
  assert.match(warnings[0]!, /brand_new/);
  assert.throws(() => parseAdapterConfig({ r: 4 }), /peft_type/);
  const json = adapterConfigToJson(config);
  assert.deepEqual(Object.keys(json), Object.keys(json).sort());
  assert.equal(json.peft_version, '0.18.0');
  assert.equal(json.inference_mode, true);
  assert.deepEqual(json.target_modules, ['q_proj', 'v_proj']);
  const back = parseAdapterConfig(json).config;
  assert.deepEqual(adapterConfigToJson(back), json);
});

test('target matching follows check_target_module_exists', () => {
  const cfg = (o: Record<string, unknown>) => loraConfig(o as never);
  const k = 'model.layers.3.self_attn.q_proj';
  assert.equal(checkTargetModuleExists(cfg({ target_modules: ['q_proj'] }), k), 'match');
  assert.equal(checkTargetModuleExists(cfg({ target_modules: ['self_attn.q_proj'] }), k), 'match');
  assert.equal(
    checkTargetModuleExists(cfg({ target_modules: ['_proj'] }), k),
    'unmatched',
    "a suffix must follow a '.'",
  );
  assert.equal(checkTargetModuleExists(cfg({ target_modules: [k] }), k), 'match');
  assert.equal(checkTargetModuleExists(cfg({ target_modules: 'q_proj' }), k), 'unmatched', 'a string is a full match');
  assert.equal(checkTargetModuleExists(cfg({ target_modules: '.*\\.q_proj' }), k), 'match');
  assert.equal(checkTargetModuleExists(cfg({ target_modules: '.*(?P<x>q)_proj' }), k), 'match', 'Python named groups');
  assert.equal(
    checkTargetModuleExists(cfg({ target_modules: ['q_proj'], exclude_modules: ['self_attn.q_proj'] }), k),
    'excluded',
  );
  assert.equal(
    checkTargetModuleExists(cfg({ target_modules: ['q_proj'], exclude_modules: '.*layers\\.3.*' }), k),
    'excluded',
  );
  assert.equal(
    checkTargetModuleExists(cfg({ target_modules: ['q_proj'], modules_to_save: ['self_attn'] }), k),
    'excluded',
  );
  assert.equal(checkTargetModuleExists(cfg({ target_modules: ['q_proj'], layers_to_transform: 3 }), k), 'match');
  assert.equal(
    checkTargetModuleExists(cfg({ target_modules: ['q_proj'], layers_to_transform: [1, 2] }), k),
    'unmatched',
  );
  assert.equal(
    checkTargetModuleExists(cfg({ target_modules: ['q_proj'], layers_to_transform: [3], layers_pattern: 'layers' }), k),
    'match',
  );
  assert.equal(
    checkTargetModuleExists(
      cfg({ target_modules: ['q_proj'], layers_to_transform: [3], layers_pattern: ['h', 'blocks'] }),
      k,
    ),
    'unmatched',
  );
  // the first numbered segment is the layer index (lazy .*?), not a nested index
  assert.equal(
    checkTargetModuleExists(
      cfg({ target_modules: ['up_proj'], layers_to_transform: [1] }),
      'model.layers.1.experts.0.up_proj',
    ),
    'match',
  );
  // modules_to_save names match as plain suffixes (PEFT's key.endswith(name))
  assert.ok(matchesModulesToSave(['norm'], 'model.layers.0.input_layernorm'));
  assert.ok(!matchesModulesToSave(['lm_head'], 'model.norm'));
});

test('rank_pattern / alpha_pattern keys match the end of the name; minimal target modules', () => {
  assert.equal(getPatternKey(['q_proj', 'v_proj'], 'model.layers.0.self_attn.v_proj'), 'v_proj');
  assert.equal(
    getPatternKey(['layers.1.self_attn.q_proj'], 'model.layers.1.self_attn.q_proj'),
    'layers.1.self_attn.q_proj',
  );
  assert.equal(
    getPatternKey(['proj'], 'model.layers.1.self_attn.q_proj'),
    'model.layers.1.self_attn.q_proj',
    'no partial component',
  );
  assert.equal(getPatternKey(['.*_proj'], 'model.layers.1.self_attn.q_proj'), '.*_proj');
  const c = loraConfig({
    r: 8,
    lora_alpha: 16,
    rank_pattern: { 'layers\\.0\\..*q_proj': 2 },
    alpha_pattern: { v_proj: 4 },
  });
  assert.deepEqual(rankAndAlpha(c, 'model.layers.0.self_attn.q_proj'), { r: 2, alpha: 16 });
  assert.deepEqual(rankAndAlpha(c, 'model.layers.1.self_attn.q_proj'), { r: 8, alpha: 16 });
  assert.deepEqual(rankAndAlpha(c, 'model.layers.1.self_attn.v_proj'), { r: 8, alpha: 4 });
  const targets = [...Array(30).keys()].flatMap((i) => [
    `model.decoder.layers.${i}.q_proj`,
    `model.decoder.layers.${i}.v_proj`,
  ]);
  const others = [...Array(30).keys()].map((i) => `model.encoder.layers.${i}.k_proj`);
  assert.deepEqual(findMinimalTargetModules(targets, others).sort(), ['q_proj', 'v_proj']);
  const enc = [...Array(30).keys()].map((i) => `model.encoder.layers.${i}.q_proj`);
  assert.deepEqual(findMinimalTargetModules(targets, enc).sort(), [
    'decoder.layers.0.q_proj',
    'decoder.layers.1.q_proj',
    'decoder.layers.10.q_proj',
    'decoder.layers.11.q_proj',
    'decoder.layers.12.q_proj',
    'decoder.layers.13.q_proj',
    'decoder.layers.14.q_proj',
    'decoder.layers.15.q_proj',
    'decoder.layers.16.q_proj',
    'decoder.layers.17.q_proj',
    'decoder.layers.18.q_proj',
    'decoder.layers.19.q_proj',
    'decoder.layers.2.q_proj',
    'decoder.layers.20.q_proj',
    'decoder.layers.21.q_proj',
    'decoder.layers.22.q_proj',
    'decoder.layers.23.q_proj',
    'decoder.layers.24.q_proj',
    'decoder.layers.25.q_proj',
    'decoder.layers.26.q_proj',
    'decoder.layers.27.q_proj',
    'decoder.layers.28.q_proj',
    'decoder.layers.29.q_proj',
    'decoder.layers.3.q_proj',
    'decoder.layers.4.q_proj',
    'decoder.layers.5.q_proj',
    'decoder.layers.6.q_proj',
    'decoder.layers.7.q_proj',
    'decoder.layers.8.q_proj',
    'decoder.layers.9.q_proj',
    'v_proj',
  ]);
});
