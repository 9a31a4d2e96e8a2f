// The bundled examples: their generators are deterministic and match the committed data, their configs parse,
// and their data passes the data check (nothing dropped, nothing cut, the task metric 'auto' picks is the one
// the example is about).

import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { makeInvoiceData } from '../examples/invoice-extraction/make-data.ts';
import { MORAL, makeStoriesData } from '../examples/stories-style/make-data.ts';
import { CATEGORIES, makeTicketsData } from '../examples/support-tickets/make-data.ts';
import { CHATML_TEMPLATE } from '../src/tokenize/chat.ts';
import { loadTokenizer } from '../src/tokenize/hf.ts';
import { writeByteLevelTokenizer } from '../src/tokenize/synthetic.ts';
import type { Tokenizer } from '../src/tokenize/tokenizer.ts';
import { loadTrainConfig } from '../src/train/config.ts';
import { prepareData } from '../src/train/data.ts';
import { textTokenizer } from '../src/train/setup.ts';
import { chooseMetrics, taskExamples } from '../src/train/task-eval.ts';

const EXAMPLES = fileURLToPath(new URL('../examples/', import.meta.url));
const SHARED = fileURLToPath(new URL('../../shared/', import.meta.url));
const STORIES = `${SHARED}models/stories260K/stories260K.gguf`;
const GPT2 = `${SHARED}tokenizers/ggml-vocab/ggml-vocab-gpt-2.gguf`;
for (const f of [STORIES, GPT2]) if (!existsSync(f)) console.log(`skipping example checks with ${f}: absent`);

const tmp = mkdtempSync(path.join(tmpdir(), 'lowrank-examples-'));
after(() => rmSync(tmp, { recursive: true, force: true }));
writeByteLevelTokenizer(tmp, 512);
const byteTok = loadTokenizer(tmp);

interface ExampleSpec {
  name: string;
  make: () => { train: string; eval: string };
  /** The metrics 'auto' should pick (with the markers). */
  metrics: string[];
  markers: string[];
  /** A real tokenizer of the kind the example is meant for, to check lengths against sequence_len. */
  tokenizer: string;
  chatTemplate?: string;
  overrides?: string[];
}

const SPECS: ExampleSpec[] = [
  {
    name: 'stories-style',
    make: makeStoriesData,
    metrics: ['exact_match', 'style'],
    markers: [MORAL],
    tokenizer: STORIES,
    overrides: [`base_model=${STORIES}`],
  },
  {
    name: 'support-tickets',
    make: makeTicketsData,
    metrics: ['accuracy'],
    markers: [],
    tokenizer: GPT2,
    chatTemplate: CHATML_TEMPLATE,
  },
  { name: 'invoice-extraction', make: makeInvoiceData, metrics: ['json_f1'], markers: [], tokenizer: GPT2 },
];

function check(spec: ExampleSpec, tok: Tokenizer, overrides: string[], template?: string) {
  const cfg = loadTrainConfig(path.join(EXAMPLES, spec.name, 'config.yaml'), overrides);
  const data = prepareData(cfg, textTokenizer(tok, template ?? cfg.chat_template_jinja));
  const all = [...data.report.datasets, ...data.report.evalDatasets];
  for (const d of all) {
    assert.deepEqual(d.dropped, {}, `${d.path}: dropped ${JSON.stringify(d.dropped)}`);
    assert.equal(d.truncated, 0, `${d.path}: ${d.truncated} example(s) cut at sequence_len ${cfg.sequence_len}`);
    assert.equal(d.examples, d.records);
  }
  assert.equal(data.report.evalSource, 'test_datasets');
  assert.equal(data.eval.length, 100);
  const tasks = taskExamples(data.eval, tok, 100);
  assert.equal(tasks.length, 100);
  assert.deepEqual(
    chooseMetrics(
      tasks.map((t) => t.reference),
      'auto',
      spec.markers,
    ).metrics,
    spec.metrics,
  );
  return { cfg, tasks };
}

for (const spec of SPECS) {
  describe(`examples/${spec.name}`, () => {
    const dir = path.join(EXAMPLES, spec.name);

    test('the generator is deterministic and the committed data is what it makes', () => {
      const a = spec.make();
      const b = spec.make();
      assert.equal(a.train, b.train);
      assert.equal(a.eval, b.eval);
      assert.equal(
        readFileSync(path.join(dir, 'train.jsonl'), 'utf8'),
        a.train,
        'train.jsonl is stale: run make-data.ts',
      );
      assert.equal(readFileSync(path.join(dir, 'eval.jsonl'), 'utf8'), a.eval, 'eval.jsonl is stale: run make-data.ts');
      const lines = a.train.trimEnd().split('\n');
      assert.ok(lines.length >= 1000 && lines.length <= 3000, `${lines.length} lines`);
      const evalSet = new Set(a.eval.trimEnd().split('\n'));
      assert.equal(lines.filter((l) => evalSet.has(l)).length, 0, 'eval records repeat training records');
    });

    test('the config parses with no warnings, and its README documents it', () => {
      const cfg = loadTrainConfig(path.join(dir, 'config.yaml'));
      assert.deepEqual(cfg.warnings, []);
      assert.equal(cfg.adapter, 'lora');
      assert.equal(cfg.datasets[0]!.path, path.join(dir, 'train.jsonl'));
      assert.equal(cfg.output_dir, path.join(dir, 'out'));
      assert.ok(cfg.base_model.startsWith('hf://'));
      const readme = readFileSync(path.join(dir, 'README.md'), 'utf8');
      assert.ok(readme.includes('lowrank train') && readme.includes('lowrank eval'));
    });

    test('the data passes the data check (byte-level tokenizer, long sequences)', () => {
      const { tasks } = check(spec, byteTok, [...(spec.overrides ?? []), 'sequence_len=2048'], spec.chatTemplate);
      if (spec.name === 'stories-style') assert.ok(tasks.every((t) => t.reference.trimEnd().endsWith(MORAL)));
      if (spec.name === 'support-tickets')
        assert.ok(tasks.every((t) => (CATEGORIES as readonly string[]).includes(t.reference.trim())));
      if (spec.name === 'invoice-extraction')
        assert.ok(tasks.every((t) => Object.keys(JSON.parse(t.reference)).join() === 'vendor,date,total,currency'));
    });

    test('every example fits the configured sequence_len with a real tokenizer', {
      skip: existsSync(spec.tokenizer) ? false : `${spec.tokenizer} is absent`,
    }, () => {
      check(spec, loadTokenizer(spec.tokenizer), spec.overrides ?? [], spec.chatTemplate);
    });
  });
}
