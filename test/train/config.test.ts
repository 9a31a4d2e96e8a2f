import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, describe, test } from 'node:test';
import { ConfigError } from '../../src/core/errors.ts';
import {
  datasetConfig,
  didYouMean,
  editDistance,
  loadTrainConfig,
  parseTrainConfig,
  parseTrainConfigText,
  planSteps,
  serializeTrainConfig,
} from '../../src/train/config.ts';

const dir = mkdtempSync(path.join(tmpdir(), 'lowrank-config-'));
after(() => rmSync(dir, { recursive: true, force: true }));

let n = 0;
function writeConfig(text: string): string {
  const sub = path.join(dir, `c${n++}`);
  mkdirSync(sub, { recursive: true });
  const file = path.join(sub, 'train.yaml');
  writeFileSync(file, text);
  return file;
}

const MINIMAL = `base_model: owner/model
adapter: lora
learning_rate: 0.0002
datasets:
  - path: data/train.jsonl
    type: alpaca
`;

function throwsConfig(fn: () => unknown, ...parts: (string | RegExp)[]): string {
  let message = '';
  assert.throws(fn, (e: unknown) => {
    assert.ok(e instanceof ConfigError, `expected ConfigError, got ${e}`);
    message = e.message;
    for (const p of parts) {
      if (typeof p === 'string') assert.ok(e.message.includes(p), `message lacks ${JSON.stringify(p)}:\n${e.message}`);
      else assert.match(e.message, p);
    }
    return true;
  });
  return message;
}

describe('defaults', () => {
  test('a minimal config gets Axolotl / HF Trainer / PEFT defaults', () => {
    const file = writeConfig(MINIMAL);
    const c = loadTrainConfig(file);
    assert.equal(c.base_model, 'owner/model'); // a hub id stays as it is
    assert.equal(c.adapter, 'lora');
    assert.equal(c.lora_r, 8);
    assert.equal(c.lora_alpha, 8);
    assert.equal(c.lora_dropout, 0);
    assert.deepEqual(c.lora_target_modules, ['q_proj', 'v_proj']);
    assert.equal(c.use_rslora, false);
    assert.equal(c.load_in_4bit, false);
    assert.equal(c.sequence_len, 512);
    assert.equal(c.sample_packing, false);
    assert.equal(c.pad_to_sequence_len, false);
    assert.equal(c.train_on_inputs, false);
    assert.equal(c.excess_length_strategy, 'truncate');
    assert.equal(c.val_set_size, 0);
    assert.equal(c.micro_batch_size, 1);
    assert.equal(c.eval_batch_size, 1);
    assert.equal(c.gradient_accumulation_steps, 1);
    assert.equal(c.num_epochs, 1);
    assert.equal(c.max_steps, null);
    assert.equal(c.learning_rate, 2e-4);
    assert.equal(c.lr_scheduler, 'cosine');
    assert.equal(c.optimizer, 'adamw');
    assert.equal(c.adam_beta1, 0.9);
    assert.equal(c.adam_beta2, 0.999);
    assert.equal(c.adam_epsilon, 1e-8);
    assert.equal(c.weight_decay, 0);
    assert.equal(c.max_grad_norm, 1);
    assert.equal(c.gradient_checkpointing, false);
    assert.equal(c.seed, 42);
    assert.equal(c.warmup_steps, null);
    assert.equal(c.warmup_ratio, null);
    assert.equal(c.output_dir, path.join(path.dirname(file), 'model-out'));
    assert.equal(c.config_path, file);
    assert.deepEqual(c.warnings, []);
    const d = c.datasets[0]!;
    assert.equal(d.path, path.join(path.dirname(file), 'data/train.jsonl'));
    assert.equal(d.type, 'alpaca');
    assert.equal(d.split, 'train');
    assert.deepEqual(d.message_property_mappings, { role: 'role', content: 'content' });
    assert.deepEqual(d.roles_to_train, ['assistant']);
    assert.equal(d.train_on_eos, 'turn');
  });

  test('the realistic Axolotl QLoRA example loads, ignored keys become warnings', () => {
    const file = writeConfig(`base_model: NousResearch/Llama-3.2-1B
load_in_4bit: true
adapter: qlora
lora_r: 32
lora_alpha: 16
lora_dropout: 0.05
lora_target_linear: true
datasets:
  - path: teknium/GPT4-LLM-Cleaned.jsonl
    type: alpaca
val_set_size: 0.1
output_dir: ./outputs/qlora-out
sequence_len: 2048
sample_packing: true
micro_batch_size: 2
gradient_accumulation_steps: 4
num_epochs: 1
optimizer: adamw_bnb_8bit
lr_scheduler: cosine
learning_rate: 0.0002
warmup_ratio: 0.1
bf16: auto
gradient_checkpointing: true
attn_implementation: flash_attention_2
logging_steps: 1
evals_per_epoch: 4
saves_per_epoch: 1
special_tokens:
  pad_token: "<|end_of_text|>"
`);
    const c = loadTrainConfig(file);
    assert.equal(c.adapter, 'qlora');
    assert.equal(c.load_in_4bit, true);
    assert.equal(c.bnb_4bit_quant_type, 'nf4');
    assert.equal(c.bnb_4bit_use_double_quant, true);
    assert.equal(c.lora_target_modules, 'all-linear');
    assert.equal(c.pad_to_sequence_len, true);
    assert.equal(c.eval_sample_packing, true);
    assert.equal(c.optimizer, 'adamw');
    assert.equal(c.special_tokens.pad_token, '<|end_of_text|>');
    assert.equal(c.evals_per_epoch, 4);
    assert.equal(c.output_dir, path.join(path.dirname(file), 'outputs/qlora-out'));
    const w = c.warnings.join('\n');
    assert.match(w, /train\.yaml:22:1: 'bf16' has no effect/);
    assert.match(w, /'attn_implementation' has no effect/);
    assert.match(w, /adamw_bnb_8bit: 8-bit optimizer states are not available in lowrank; using 32-bit AdamW/);
  });

  test('a missing adapter means full fine-tuning, with a warning', () => {
    const c = parseTrainConfig({ base_model: 'm', learning_rate: 1e-5, datasets: [{ path: 'a.jsonl', type: 'text' }] });
    assert.equal(c.adapter, 'full');
    assert.match(c.warnings.join('\n'), /\(full fine-tuning\), as Axolotl does/);
    assert.equal(parseTrainConfig({ ...baseObj(), adapter: 'none' }).adapter, 'full');
    assert.equal(parseTrainConfig({ ...baseObj(), adapter: 'full' }).adapter, 'full');
  });

  test('numbers written as strings are accepted, as Axolotl does for learning_rate', () => {
    const c = parseTrainConfig({ ...baseObj(), learning_rate: '2e-4', weight_decay: '0.01' });
    assert.equal(c.learning_rate, 2e-4);
    assert.equal(c.weight_decay, 0.01);
  });

  test('dataset type names: chat_template is chat; field mappings', () => {
    const c = parseTrainConfig({
      ...baseObj(),
      datasets: [
        {
          path: 'sharegpt.jsonl',
          type: 'chat_template',
          field_messages: 'conversations',
          message_property_mappings: { role: 'from', content: 'value' },
          roles_to_train: ['assistant', 'tool'],
          train_on_eos: 'last',
        },
      ],
    });
    const d = c.datasets[0]!;
    assert.equal(d.type, 'chat');
    assert.equal(d.field_messages, 'conversations');
    assert.deepEqual(d.message_property_mappings, { role: 'from', content: 'value' });
    assert.deepEqual(d.roles_to_train, ['assistant', 'tool']);
    assert.deepEqual(d.roles.assistant, ['gpt', 'assistant']);
    assert.equal(d.train_on_eos, 'last');
  });

  test('datasetConfig fills defaults for programmatic use', () => {
    const d = datasetConfig({ path: 'x.csv', type: 'completion', field_prompt: 'q' });
    assert.equal(d.path, 'x.csv');
    assert.equal(d.field_prompt, 'q');
    assert.equal(d.field_completion, 'completion');
    assert.equal(d.field, 'text');
  });
});

function baseObj(): Record<string, unknown> {
  return {
    base_model: 'owner/model',
    adapter: 'lora',
    learning_rate: 1e-4,
    datasets: [{ path: 'd.jsonl', type: 'text' }],
  };
}

describe('errors name the file, line and key', () => {
  test('unknown top-level key: did-you-mean and file:line:col', () => {
    const file = writeConfig(`${MINIMAL}lora_rr: 16\n`);
    throwsConfig(() => loadTrainConfig(file), `${file}:7:1: unknown key 'lora_rr' (did you mean 'lora_r'?)`);
  });

  test('unknown key inside a dataset entry', () => {
    const file = writeConfig(`base_model: m
adapter: lora
learning_rate: 1e-4
datasets:
  - path: a.jsonl
    type: text
    feild: body
`);
    throwsConfig(() => loadTrainConfig(file), `${file}:7:5: unknown key 'feild' in datasets.0 (did you mean 'field'?)`);
  });

  test('a key with no close match gets no suggestion', () => {
    const file = writeConfig(`${MINIMAL}completely_unrelated_thing: 1\n`);
    const msg = throwsConfig(() => loadTrainConfig(file), "unknown key 'completely_unrelated_thing'");
    assert.ok(!msg.includes('did you mean'));
  });

  test('type error names the key, the value and the expected type', () => {
    const file = writeConfig(`${MINIMAL}lora_r: eight\n`);
    throwsConfig(() => loadTrainConfig(file), `${file}:7:9: lora_r: expected an integer, got "eight" (a string)`);
    const f2 = writeConfig(`${MINIMAL}sample_packing: 3\n`);
    throwsConfig(() => loadTrainConfig(f2), 'sample_packing: expected true or false, got 3 (a number)');
    const f3 = writeConfig(`${MINIMAL}lora_r: 2.5\n`);
    throwsConfig(() => loadTrainConfig(f3), 'lora_r: expected an integer, got 2.5 (a number)');
  });

  test('range and enum errors', () => {
    throwsConfig(() => parseTrainConfig({ ...baseObj(), lora_dropout: 1.5 }), 'lora_dropout: must be < 1, got 1.5');
    throwsConfig(
      () => parseTrainConfig({ ...baseObj(), micro_batch_size: 0 }),
      'micro_batch_size: must be >= 1, got 0',
    );
    throwsConfig(
      () => parseTrainConfig({ ...baseObj(), lr_scheduler: 'cosin' }),
      'lr_scheduler: expected one of constant, constant_with_warmup, linear, cosine, got "cosin" (a string) (did you mean \'cosine\'?)',
    );
    throwsConfig(
      () => parseTrainConfig({ ...baseObj(), datasets: [{ path: 'a', type: 'alpacca' }] }),
      'datasets.0.type: expected one of text, completion, alpaca, chat, chat_template, input_output, got "alpacca" (a string) (did you mean \'alpaca\'?)',
    );
    throwsConfig(() => parseTrainConfig({ ...baseObj(), datasets: [] }), 'datasets: needs at least 1 item(s)');
    throwsConfig(
      () => parseTrainConfig({ ...baseObj(), lora_target_modules: 3 }),
      'lora_target_modules: expected a module name or a list of module names, got 3',
    );
  });

  test('required keys', () => {
    const { learning_rate: _lr, ...rest } = baseObj();
    throwsConfig(() => parseTrainConfig(rest), "'learning_rate' is required (Axolotl has no default");
    throwsConfig(
      () => parseTrainConfig({ ...baseObj(), datasets: [{ path: 'a.jsonl' }] }),
      "'datasets.0.type' is required (one of text,",
    );
  });

  test('several problems are reported together', () => {
    const msg = throwsConfig(
      () => parseTrainConfig({ ...baseObj(), lora_r: 'x', seeed: 1 }, { file: 'cfg.yaml' }),
      'cfg.yaml: 2 problems in the training config:',
    );
    assert.match(msg, /lora_r: expected an integer/);
    assert.match(msg, /unknown key 'seeed' \(did you mean 'seed'\?\)/);
  });

  test('YAML syntax errors name file:line:col', () => {
    const file = writeConfig('base_model: m\ndatasets:\n  - path: "a.jsonl\n    type: text\n');
    throwsConfig(() => loadTrainConfig(file), new RegExp(`${escapeRe(file)}:\\d+:\\d+: YAML syntax error: `));
    const dup = writeConfig('base_model: m\nbase_model: n\n');
    throwsConfig(() => loadTrainConfig(dup), `${dup}:2:1: YAML syntax error:`);
  });

  test('empty file, a list instead of a mapping, a missing file', () => {
    throwsConfig(() => loadTrainConfig(writeConfig('')), 'the training config is empty');
    throwsConfig(() => loadTrainConfig(writeConfig('- a\n- b\n')), 'must be a mapping of keys');
    throwsConfig(() => loadTrainConfig(path.join(dir, 'nope.yaml')), 'cannot read training config', 'ENOENT');
  });
});

function escapeRe(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}

describe('cross-field checks', () => {
  test('qlora implies load_in_4bit; contradictions are errors', () => {
    assert.equal(parseTrainConfig({ ...baseObj(), adapter: 'qlora' }).load_in_4bit, true);
    throwsConfig(
      () => parseTrainConfig({ ...baseObj(), adapter: 'qlora', load_in_4bit: false }),
      'adapter: qlora needs load_in_4bit: true',
    );
    throwsConfig(
      () => parseTrainConfig({ ...baseObj(), adapter: 'full', load_in_4bit: true }),
      'load_in_4bit needs an adapter',
    );
    throwsConfig(() => parseTrainConfig({ ...baseObj(), load_in_8bit: true }), '8-bit base is not supported');
    const c = parseTrainConfig({ ...baseObj(), adapter: 'lora', load_in_4bit: true });
    assert.equal(c.adapter, 'qlora');
  });

  test('DoRA: adapter dora, or peft_use_dora; QDoRA keeps load_in_4bit', () => {
    assert.equal(parseTrainConfig({ ...baseObj(), adapter: 'dora' }).adapter, 'dora');
    assert.equal(parseTrainConfig({ ...baseObj(), peft_use_dora: true }).adapter, 'dora');
    const q = parseTrainConfig({ ...baseObj(), adapter: 'qlora', peft_use_dora: true });
    assert.equal(q.adapter, 'dora');
    assert.equal(q.load_in_4bit, true);
    throwsConfig(
      () => parseTrainConfig({ ...baseObj(), adapter: 'full', peft_use_dora: true }),
      'peft_use_dora needs adapter',
    );
  });

  test('rsLoRA spellings', () => {
    assert.equal(parseTrainConfig({ ...baseObj(), peft_use_rslora: true }).use_rslora, true);
    assert.equal(parseTrainConfig({ ...baseObj(), use_rslora: true }).use_rslora, true);
    throwsConfig(() => parseTrainConfig({ ...baseObj(), use_rslora: true, peft_use_rslora: false }), 'disagree');
  });

  test('target modules: a list, a single name, all-linear', () => {
    assert.deepEqual(parseTrainConfig({ ...baseObj(), lora_target_modules: 'q_proj' }).lora_target_modules, ['q_proj']);
    assert.equal(
      parseTrainConfig({ ...baseObj(), lora_target_modules: 'all-linear' }).lora_target_modules,
      'all-linear',
    );
    const both = parseTrainConfig({ ...baseObj(), lora_target_linear: true, lora_target_modules: ['q_proj'] });
    assert.equal(both.lora_target_modules, 'all-linear');
    assert.match(both.warnings.join('\n'), /already targets every linear layer/);
  });

  test('num_epochs vs max_steps; warmup exclusivity and range', () => {
    const c = parseTrainConfig({ ...baseObj(), num_epochs: 3, max_steps: 100 });
    assert.equal(c.max_steps, 100);
    assert.match(c.warnings.join('\n'), /max_steps \(100\) overrides num_epochs \(3\)/);
    throwsConfig(() => parseTrainConfig({ ...baseObj(), warmup_steps: 10, warmup_ratio: 0.1 }), 'exclusive');
    throwsConfig(() => parseTrainConfig({ ...baseObj(), warmup_ratio: 1 }), 'warmup_ratio: must be < 1, got 1');
  });

  test('evaluation: val_set_size forms, test_datasets, early stopping', () => {
    assert.equal(parseTrainConfig({ ...baseObj(), val_set_size: 0.05 }).val_set_size, 0.05);
    assert.equal(parseTrainConfig({ ...baseObj(), val_set_size: 200 }).val_set_size, 200);
    throwsConfig(() => parseTrainConfig({ ...baseObj(), val_set_size: 1.5 }), 'fraction in [0, 1) or a whole count');
    throwsConfig(
      () => parseTrainConfig({ ...baseObj(), val_set_size: 0.1, test_datasets: [{ path: 't.jsonl', type: 'text' }] }),
      'val_set_size and test_datasets both',
    );
    throwsConfig(() => parseTrainConfig({ ...baseObj(), early_stopping_patience: 3 }), 'needs evaluation data');
    const ok = parseTrainConfig({ ...baseObj(), early_stopping_patience: 3, val_set_size: 0.1 });
    assert.equal(ok.early_stopping_patience, 3);
    throwsConfig(
      () => parseTrainConfig({ ...baseObj(), eval_steps: 10, evals_per_epoch: 2, val_set_size: 0.1 }),
      'exclusive',
    );
    const w = parseTrainConfig({ ...baseObj(), eval_steps: 10 }).warnings.join('\n');
    assert.match(w, /eval_steps has no effect without val_set_size/);
  });

  test('batch_size derives gradient_accumulation_steps', () => {
    assert.equal(parseTrainConfig({ ...baseObj(), micro_batch_size: 2, batch_size: 8 }).gradient_accumulation_steps, 4);
    throwsConfig(() => parseTrainConfig({ ...baseObj(), micro_batch_size: 3, batch_size: 8 }), 'not a multiple');
    throwsConfig(
      () => parseTrainConfig({ ...baseObj(), micro_batch_size: 2, gradient_accumulation_steps: 2, batch_size: 8 }),
      'set two of the three',
    );
  });

  test('optimizers: HF names map, unknown names fail with a suggestion', () => {
    assert.equal(parseTrainConfig({ ...baseObj(), optimizer: 'adamw_torch' }).optimizer, 'adamw');
    assert.equal(parseTrainConfig({ ...baseObj(), optimizer: 'sgd' }).optimizer, 'sgd');
    throwsConfig(() => parseTrainConfig({ ...baseObj(), optimizer: 'adamw_trch' }), "(did you mean 'adamw_torch'?)");
  });

  test('keys that do not apply warn', () => {
    const c = parseTrainConfig({
      ...baseObj(),
      adapter: 'full',
      lora_r: 16,
      datasets: [{ path: 'a.jsonl', type: 'alpaca', field_messages: 'm' }],
    });
    const w = c.warnings.join('\n');
    assert.match(w, /lora_r ignored for full fine-tuning/);
    assert.match(w, /field_messages has no effect for type alpaca/);
  });

  test('chat_template_jinja: inline text or a file next to the config', () => {
    const file = writeConfig(`${MINIMAL}chat_template_jinja: tmpl.jinja\n`);
    writeFileSync(path.join(path.dirname(file), 'tmpl.jinja'), '{% for m in messages %}{{ m.content }}{% endfor %}');
    assert.equal(loadTrainConfig(file).chat_template_jinja, '{% for m in messages %}{{ m.content }}{% endfor %}');
    const inline = parseTrainConfig({ ...baseObj(), chat_template_jinja: '{{ messages }}' });
    assert.equal(inline.chat_template_jinja, '{{ messages }}');
    throwsConfig(
      () => parseTrainConfig({ ...baseObj(), chat_template_jinja: 'missing.jinja' }),
      'neither a Jinja template',
    );
  });
});

describe('--set overrides', () => {
  test('scalars are parsed as YAML; nested keys and list indices', () => {
    const file = writeConfig(MINIMAL);
    const c = loadTrainConfig(file, [
      'lora_r=16',
      'sample_packing=true',
      'learning_rate=1e-4',
      'lora_target_modules=[q_proj, k_proj]',
      'datasets.0.type=chat_template',
      'special_tokens.eos_token=<|im_end|>',
    ]);
    assert.equal(c.lora_r, 16);
    assert.equal(c.sample_packing, true);
    assert.equal(c.learning_rate, 1e-4);
    assert.deepEqual(c.lora_target_modules, ['q_proj', 'k_proj']);
    assert.equal(c.datasets[0]!.type, 'chat');
    assert.equal(c.special_tokens.eos_token, '<|im_end|>');
  });

  test('append a dataset; an empty value removes a key', () => {
    const file = writeConfig(`${MINIMAL}lora_r: 64\n`);
    const c = loadTrainConfig(file, ['datasets.1.path=extra.jsonl', 'datasets.1.type=text', 'lora_r=']);
    assert.equal(c.datasets.length, 2);
    assert.equal(c.datasets[1]!.path, path.resolve(process.cwd(), 'extra.jsonl')); // from the command line: cwd
    assert.equal(c.datasets[0]!.path, path.join(path.dirname(file), 'data/train.jsonl')); // from the file: its folder
    assert.equal(c.lora_r, 8);
  });

  test('override errors name --set', () => {
    const file = writeConfig(MINIMAL);
    throwsConfig(
      () => loadTrainConfig(file, ['lora_rr=3']),
      "--set lora_rr: unknown key 'lora_rr' (did you mean 'lora_r'?)",
    );
    throwsConfig(() => loadTrainConfig(file, ['lora_r=abc']), '--set lora_r: lora_r: expected an integer, got "abc"');
    throwsConfig(() => loadTrainConfig(file, ['lora_r']), '--set expects key=value');
    throwsConfig(
      () => loadTrainConfig(file, ['datasets.5.path=x']),
      'index 5 is out of range (the list has 1 item(s))',
    );
    throwsConfig(() => loadTrainConfig(file, ['datasets.x.path=x']), "'datasets.x' indexes a list");
    throwsConfig(() => loadTrainConfig(file, ['learning_rate.x=1']), "'learning_rate' is 0.0002 (a number)");
  });
});

describe('paths', () => {
  test('base_model: local paths resolve against the config, hub ids and hf:// stay', () => {
    const file = writeConfig(MINIMAL);
    const folder = path.dirname(file);
    mkdirSync(path.join(folder, 'models', 'tiny'), { recursive: true });
    assert.equal(loadTrainConfig(file, ['base_model=./models/tiny']).base_model, path.resolve('models/tiny')); // --set: cwd
    assert.equal(loadTrainConfig(file, ['base_model=models/tiny']).base_model, 'models/tiny'); // not in cwd: a hub id
    const f2 = writeConfig(MINIMAL.replace('owner/model', 'models/tiny'));
    mkdirSync(path.join(path.dirname(f2), 'models', 'tiny'), { recursive: true });
    assert.equal(loadTrainConfig(f2).base_model, path.join(path.dirname(f2), 'models/tiny'));
    const f3 = writeConfig(MINIMAL.replace('owner/model', './m.gguf'));
    assert.equal(loadTrainConfig(f3).base_model, path.join(path.dirname(f3), 'm.gguf'));
    const f4 = writeConfig(MINIMAL.replace('owner/model', 'hf://owner/repo/file.gguf'));
    assert.equal(loadTrainConfig(f4).base_model, 'hf://owner/repo/file.gguf');
  });
});

describe('derived values', () => {
  test('planSteps follows HF/Axolotl rules', () => {
    const c = parseTrainConfig({ ...baseObj(), gradient_accumulation_steps: 4, num_epochs: 2, val_set_size: 0.1 });
    const p = planSteps(c, 1000, true);
    assert.equal(p.stepsPerEpoch, 250);
    assert.equal(p.totalSteps, 500);
    assert.equal(p.warmupSteps, 15); // min(floor(0.03 * 500), 100)
    assert.equal(p.loggingSteps, 2); // max(1, min(10, floor(0.005 * 500)))
    assert.equal(p.evalSteps, 250); // once per epoch
    assert.equal(p.saveSteps, 250);
    const q = planSteps(
      parseTrainConfig({ ...baseObj(), max_steps: 40, warmup_ratio: 0.1, eval_steps: 0.25, saves_per_epoch: 2 }),
      30,
      true,
    );
    assert.equal(q.totalSteps, 40);
    assert.equal(q.warmupSteps, 4);
    assert.equal(q.evalSteps, 10);
    assert.equal(q.saveSteps, 15);
    assert.equal(planSteps(c, 1000, false).evalSteps, null);
  });

  test('serializeTrainConfig round-trips', () => {
    const c = parseTrainConfig({
      ...baseObj(),
      adapter: 'qlora',
      lora_target_linear: true,
      val_set_size: 0.1,
      datasets: [{ path: '/abs/a.jsonl', type: 'chat_template', roles_to_train: ['assistant'] }],
      output_dir: '/abs/out',
    });
    const again = parseTrainConfigText(serializeTrainConfig(c), '/abs/cfg.yaml');
    const strip = ({ config_path: _a, warnings: _b, ...rest }: typeof c) => rest;
    assert.deepEqual(strip(again), strip(c));
  });

  test('edit distance and did-you-mean', () => {
    assert.equal(editDistance('kitten', 'sitting'), 3);
    assert.equal(editDistance('', 'abc'), 3);
    assert.equal(didYouMean('learning_rat', ['learning_rate', 'lora_r']), 'learning_rate');
    assert.equal(didYouMean('zzz', ['learning_rate']), undefined);
  });
});
