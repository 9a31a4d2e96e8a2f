import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { parseMethods, runCompare } from '../../src/cli/compare.ts';
import { runEval } from '../../src/cli/eval.ts';
import { ConfigError } from '../../src/core/errors.ts';
import { generate } from '../../src/models/generate.ts';
import { loadModel } from '../../src/models/load.ts';
import { loadTokenizer } from '../../src/tokenize/hf.ts';
import type { Example } from '../../src/train/data-format.ts';
import {
  chooseMetrics,
  comparisonOf,
  cutAtStop,
  evaluateTask,
  exactMatch,
  fieldValuesEqual,
  formatComparison,
  generationBudget,
  hasMarkers,
  jsonFieldScores,
  labelMatch,
  modelGenerator,
  normaliseLabel,
  normaliseWhitespace,
  parseJsonObject,
  scoreOutputs,
  type TaskExample,
  type TaskRequest,
  taskExamples,
} from '../../src/train/task-eval.ts';

const STORIES = fileURLToPath(new URL('../../../shared/models/stories260K/stories260K.gguf', import.meta.url));
const haveStories = existsSync(STORIES);
if (!haveStories) console.log(`skipping stories260K task-eval tests: ${STORIES} is absent`);

const close = (a: number, b: number, msg?: string) => assert.ok(Math.abs(a - b) < 1e-12, msg ?? `${a} != ${b}`);

describe('text metrics', () => {
  test('exact match normalises whitespace only', () => {
    assert.equal(normaliseWhitespace('  a \n\t b  '), 'a b');
    assert.ok(exactMatch(' The cat\n  sat. ', 'The cat sat.'));
    assert.ok(!exactMatch('the cat sat.', 'The cat sat.'));
    assert.ok(!exactMatch('The cat sat', 'The cat sat.'));
  });

  test('label accuracy compares the first line, case-insensitively, without quotes, emphasis or a full stop', () => {
    assert.equal(normaliseLabel('\n  **Billing**.\nbecause the card...'), 'billing');
    assert.ok(labelMatch('Billing', 'billing'));
    assert.ok(labelMatch('"technical"', 'technical\n'));
    assert.ok(labelMatch('refund.\nThe customer wants money back', 'refund'));
    assert.ok(!labelMatch('billing issue', 'billing'));
    assert.ok(!labelMatch('', 'billing'));
  });

  test('style needs every marker (case and spacing ignored)', () => {
    const m = ['And that is why we always share.'];
    assert.ok(hasMarkers('They played.\nAnd that is  why we always share.', m));
    assert.ok(hasMarkers('AND THAT IS WHY WE ALWAYS SHARE.', m));
    assert.ok(!hasMarkers('And that is why we share.', m));
    assert.ok(!hasMarkers('Once upon a time. The end.', ['Once upon', 'always share']));
    assert.ok(hasMarkers('Once upon a time. We always share.', ['Once upon', 'always share']));
  });

  test('cutAtStop cuts before the earliest stop string', () => {
    assert.equal(cutAtStop('billing\nmore', ['\n']), 'billing');
    assert.equal(cutAtStop('a STOP b END', ['END', 'STOP']), 'a ');
    assert.equal(cutAtStop('abc', []), 'abc');
  });
});

describe('JSON field scores', () => {
  const ref = { vendor: 'Acme Ltd', date: '2024-01-02', total: 12.5, currency: 'EUR' };

  test('an identical object scores 1', () => {
    assert.deepEqual(jsonFieldScores(JSON.stringify(ref), ref), { precision: 1, recall: 1, f1: 1, valid: true });
  });

  test('numbers compare numerically, strings without case and spacing', () => {
    const out = '{"vendor": " acme  LTD", "date": "2024-01-02", "total": "12.50", "currency": "eur"}';
    assert.deepEqual(jsonFieldScores(out, ref), { precision: 1, recall: 1, f1: 1, valid: true });
    assert.ok(fieldValuesEqual(5716.61, '5716.610'));
    assert.ok(!fieldValuesEqual(5716.61, 5716.6));
    assert.ok(!fieldValuesEqual('12.5 EUR', 12.5));
    assert.ok(fieldValuesEqual([1, 'A'], [1, 'a']));
    assert.ok(!fieldValuesEqual(null, 0));
  });

  test('a missing and a wrong field: precision 2/3, recall 2/4, F1 4/7', () => {
    const s = jsonFieldScores('{"vendor": "Acme Ltd", "date": "2024-01-03", "total": 12.5}', ref);
    close(s.precision, 2 / 3);
    close(s.recall, 0.5);
    close(s.f1, 4 / 7);
    assert.equal(s.valid, true);
  });

  test('an extra field lowers precision only', () => {
    const s = jsonFieldScores(JSON.stringify({ ...ref, note: 'paid' }), ref);
    close(s.precision, 4 / 5);
    close(s.recall, 1);
    close(s.f1, 8 / 9);
  });

  test('unparsable output scores 0; JSON inside prose or a code fence is found', () => {
    assert.deepEqual(jsonFieldScores('vendor: Acme Ltd, total 12.5', ref), {
      precision: 0,
      recall: 0,
      f1: 0,
      valid: false,
    });
    assert.deepEqual(jsonFieldScores('{"vendor": "Acme Ltd", "total": 12.5', ref).valid, false);
    assert.deepEqual(jsonFieldScores('[1, 2]', ref).valid, false);
    const fenced = `Here you go:\n\`\`\`json\n${JSON.stringify(ref)}\n\`\`\`\nAnything else?`;
    assert.equal(jsonFieldScores(fenced, ref).f1, 1);
    assert.deepEqual(parseJsonObject('x {"a": "}{"} y'), { a: '}{' });
  });

  test('nested objects are compared field by field (dotted keys)', () => {
    const s = jsonFieldScores('{"a": {"b": 1}}', '{"a": {"b": 1, "c": 2}}');
    close(s.precision, 1);
    close(s.recall, 0.5);
    close(s.f1, 2 / 3);
  });

  test('means over outputs', () => {
    const refs = [JSON.stringify(ref), '{"x": 1, "y": 2}'];
    const s = scoreOutputs([JSON.stringify(ref), '{"x": 1, "y": 3}'], refs, ['json_f1']);
    close(s.json_f1!, (1 + 0.5) / 2);
    close(s.json_precision!, (1 + 0.5) / 2);
    close(s.json_recall!, (1 + 0.5) / 2);
    close(s.json_valid!, 1);
  });
});

describe('metric choice', () => {
  test('auto: JSON objects -> json_f1; short single-line labels -> accuracy; else exact_match (+ style)', () => {
    assert.deepEqual(chooseMetrics(['{"a": 1}', ' {"b": "x"}']).metrics, ['json_f1']);
    assert.deepEqual(chooseMetrics(['billing', 'technical support', 'one two three four']).metrics, ['accuracy']);
    assert.deepEqual(chooseMetrics(['billing', 'one two three four five']).metrics, ['exact_match']);
    assert.deepEqual(chooseMetrics(['billing', 'two\nlines']).metrics, ['exact_match']);
    assert.deepEqual(chooseMetrics(['A long story about a cat.'], 'auto', ['The end.']).metrics, [
      'exact_match',
      'style',
    ]);
    assert.deepEqual(chooseMetrics(['{"a": 1, "b": 2, "c": 3}', 'billing']).metrics, ['exact_match']);
  });

  test('explicit choices; style needs markers', () => {
    assert.deepEqual(chooseMetrics(['{"a": 1}'], 'exact_match'), { metrics: ['exact_match'], reason: 'chosen' });
    assert.deepEqual(chooseMetrics(['x'], 'style', ['m']).metrics, ['style']);
    assert.deepEqual(chooseMetrics(['x'], 'accuracy', ['m']).metrics, ['accuracy', 'style']);
    assert.throws(() => chooseMetrics(['x'], 'style'), ConfigError);
  });
});

// A tokenizer over single characters: id = code point; 1 = BOS, 2 = EOS.
const charTok = {
  decode: (ids: readonly number[], o: { skipSpecialTokens?: boolean } = {}) =>
    ids
      .filter((i) => !(o.skipSpecialTokens && i < 3))
      .map((i) => (i < 3 ? `<${i}>` : String.fromCodePoint(i)))
      .join(''),
  isEos: (id: number) => id === 2,
};
const enc = (s: string) => [...s].map((c) => c.codePointAt(0)!);

function example(prompt: string, completion: string, opts: { eos?: boolean; tail?: string } = {}): Example {
  const ids = [1, ...enc(prompt), ...enc(completion), ...(opts.eos === false ? [] : [2]), ...enc(opts.tail ?? '')];
  const labels = ids.map((id, t) =>
    t > prompt.length && t <= prompt.length + completion.length + (opts.eos === false ? 0 : 1) ? id : -100,
  );
  return {
    inputIds: Int32Array.from(ids),
    labels: Int32Array.from(labels),
    source: { dataset: 0, file: 'data.jsonl', line: 7 },
  };
}

describe('examples to tasks', () => {
  test('prompt = tokens before the first trained one; reference = the first trained run without EOS', () => {
    const [t] = taskExamples([example('Q: 2+2?\nA:', ' 4', { tail: 'next turn' })], charTok);
    assert.deepEqual(t!.promptIds, [1, ...enc('Q: 2+2?\nA:')]);
    assert.equal(t!.reference, ' 4');
    assert.equal(t!.referenceTokens, 3);
    assert.equal(t!.promptText, 'Q: 2+2?\nA:');
    assert.equal(t!.source, 'data.jsonl:7');
  });

  test('examples without a trained token or without a prompt are skipped; the count is capped', () => {
    const none: Example = {
      inputIds: Int32Array.from([1, 65, 66]),
      labels: Int32Array.from([-100, -100, -100]),
      source: { dataset: 0, file: 'f', line: 1 },
    };
    const text: Example = {
      inputIds: Int32Array.from([65, 66]),
      labels: Int32Array.from([65, 66]),
      source: { dataset: 0, file: 'f', line: 2 },
    };
    assert.equal(taskExamples([none, text], charTok).length, 0);
    const many = Array.from({ length: 10 }, (_, i) => example(`p${i}`, 'c'));
    assert.equal(taskExamples(many, charTok, 4).length, 4);
    assert.equal(taskExamples(many, charTok).length, 10);
  });

  test('the generation budget follows the reference length, capped', () => {
    assert.equal(generationBudget(4, 256), 21);
    assert.equal(generationBudget(100, 256), 141);
    assert.equal(generationBudget(1000, 256), 256);
  });
});

describe('evaluateTask', () => {
  const refs = ['billing', 'technical', 'shipping', 'billing'];
  const tasks: TaskExample[] = refs.map((r, i) => ({
    promptIds: [1, 60 + i],
    reference: r,
    referenceTokens: r.length + 1,
    promptText: `ticket ${i}`,
    source: `eval.jsonl:${i + 1}`,
  }));

  test('base and tuned side by side, with exact scores and a two-column table', async () => {
    const seen: TaskRequest[][] = [];
    const base = (reqs: readonly TaskRequest[]) => {
      seen.push([...reqs]);
      return reqs.map(() => 'hello there');
    };
    const tuned = async (reqs: readonly TaskRequest[]) =>
      ['Billing', 'technical.', 'refund', 'billing'].slice(0, reqs.length);
    const r = await evaluateTask(tasks, { base, tuned }, { samples: 2 });
    assert.deepEqual(r.metrics, ['accuracy']);
    assert.equal(r.reason, 'auto: every reference is one line of at most 4 words');
    assert.deepEqual(r.columns, ['base', 'tuned']);
    assert.equal(r.examples, 4);
    assert.deepEqual(r.scores, { base: { accuracy: 0 }, tuned: { accuracy: 0.75 } });
    // one call per generator with every prompt; labels stop at the end of the line
    assert.equal(seen.length, 1);
    assert.deepEqual(
      seen[0]!.map((q) => q.stop),
      [['\n'], ['\n'], ['\n'], ['\n']],
    );
    assert.deepEqual(
      seen[0]!.map((q) => q.maxTokens),
      refs.map((x) => generationBudget(x.length + 1, 256)),
    );
    assert.equal(r.samples.length, 2);
    assert.deepEqual(r.samples[0], {
      source: 'eval.jsonl:1',
      prompt: 'ticket 0',
      reference: 'billing',
      outputs: { base: 'hello there', tuned: 'Billing' },
    });
    assert.equal(r.referenceStyle, null);

    const table = formatComparison(comparisonOf(r.columns, r, { base: { loss: 2 }, tuned: { loss: 1 } }));
    const lines = table.split('\n');
    assert.match(lines[0]!, /^\| metric +\| +base \| +tuned \| +change \|$/);
    assert.match(table, /\| label accuracy +\| +0\.0% \| +75\.0% \| \+75\.0 pt \|/);
    assert.match(table, /\| eval loss +\| 2\.0000 \| 1\.0000 \| +-1\.0000 \|/);
    assert.match(table, /\| eval perplexity +\| 7\.3891 \| 2\.7183 \|/);
  });

  test('exact match with the style metric, the reference style rate and the example cap', async () => {
    const stories: TaskExample[] = [
      'A story about a cat. The end.',
      'Another one about a dog. The end.',
      'No moral here, none at all.',
    ].map((r) => ({
      promptIds: [1],
      reference: r,
      referenceTokens: 10,
      promptText: '',
    }));
    const r = await evaluateTask(
      stories,
      {
        base: (q) => q.map(() => 'Something else.'),
        tuned: (q) => ['A story about  a cat. The end.', 'Other. The end.', 'x'].slice(0, q.length),
      },
      { markers: ['The end.'], maxExamples: 3 },
    );
    assert.deepEqual(r.metrics, ['exact_match', 'style']);
    assert.deepEqual(r.scores.base, { exact_match: 0, style: 0 });
    close(r.scores.tuned!.exact_match!, 1 / 3);
    close(r.scores.tuned!.style!, 2 / 3);
    close(r.referenceStyle!, 2 / 3);
    const capped = await evaluateTask(stories, { only: (q) => q.map(() => '') }, { maxExamples: 2 });
    assert.equal(capped.examples, 2);
  });

  test('errors: no generator, no examples, a wrong output count, JSON metric on non-JSON references', async () => {
    await assert.rejects(evaluateTask(tasks, {}), /no generator/);
    await assert.rejects(evaluateTask([], { a: () => [] }), /no example/);
    await assert.rejects(evaluateTask(tasks, { a: () => ['x'] }), /returned 1 outputs for 4 prompts/);
    await assert.rejects(
      evaluateTask(tasks, { a: (q) => q.map(() => '') }, { metric: 'json_f1' }),
      /not a JSON object/,
    );
  });
});

describe('with stories260K', { skip: !haveStories }, () => {
  const dir = mkdtempSync(path.join(tmpdir(), 'lowrank-taskeval-'));
  after(() => rmSync(dir, { recursive: true, force: true }));

  test('modelGenerator (batched, greedy) continues each prompt as generate() does', async () => {
    const { model } = await loadModel(STORIES);
    const tok = loadTokenizer(STORIES);
    const prompts = ['Once upon a time, there was a little girl named Lily.', 'Tom had a red ball.', 'One day,'];
    const requests: TaskRequest[] = prompts.map((p, i) => ({
      promptIds: tok.encode(p, { addSpecialTokens: true }),
      maxTokens: 12 + 4 * i,
      stop: i === 2 ? ['.'] : [],
    }));
    const out = modelGenerator(model, tok, { batchSize: 2 })(requests);
    requests.forEach((r, i) => {
      const want = generate(model, tok, r.promptIds, { temperature: 0, maxTokens: r.maxTokens, stop: r.stop }).text;
      assert.equal(out[i], want, `prompt ${i}`);
    });
    model.dispose();
  });

  test('lowrank eval --model --data: base-only eval loss and style on two examples', async () => {
    const lines = readFileSync(
      fileURLToPath(new URL('../../examples/stories-style/eval.jsonl', import.meta.url)),
      'utf8',
    );
    const data = path.join(dir, 'three.jsonl');
    writeFileSync(data, `${lines.split('\n').slice(0, 3).join('\n')}\n`);
    const outFile = path.join(dir, 'eval.json');
    const logs: string[] = [];
    const r = await runEval(
      undefined,
      {
        set: [],
        model: STORIES,
        data,
        marker: ['And that is why we always share.'],
        maxExamples: '2',
        maxNewTokens: '8',
        loss: true,
        task: true,
        out: outFile,
      },
      (l) => logs.push(l),
    );
    assert.deepEqual(r.columns, ['base']);
    assert.deepEqual(r.task!.metrics, ['exact_match', 'style']);
    assert.equal(r.task!.examples, 2);
    assert.equal(r.task!.scores.base!.style, 0);
    assert.equal(r.task!.referenceStyle, 1);
    assert.ok(r.losses.base!.loss > 0.5 && r.losses.base!.loss < 5, `eval loss ${r.losses.base!.loss}`);
    const saved = JSON.parse(readFileSync(outFile, 'utf8'));
    assert.deepEqual(saved.columns, ['base']);
    assert.ok(logs.some((l) => l.includes('eval loss')));
  });
  test('lowrank compare: trains lora and full from one config, then one table with quality and cost', async () => {
    const lines = readFileSync(
      fileURLToPath(new URL('../../examples/stories-style/train.jsonl', import.meta.url)),
      'utf8',
    ).split('\n');
    const cdir = path.join(dir, 'compare');
    const { mkdirSync } = await import('node:fs');
    mkdirSync(cdir);
    writeFileSync(path.join(cdir, 'train.jsonl'), `${lines.slice(0, 4).join('\n')}\n`);
    writeFileSync(path.join(cdir, 'eval.jsonl'), `${lines.slice(4, 6).join('\n')}\n`);
    writeFileSync(
      path.join(cdir, 'cfg.yaml'),
      [
        `base_model: ${STORIES}`,
        'adapter: lora',
        'lora_r: 4',
        'lora_alpha: 8',
        'datasets: [{path: train.jsonl, type: completion}]',
        'test_datasets: [{path: eval.jsonl, type: completion}]',
        'sequence_len: 256',
        'micro_batch_size: 2',
        'max_steps: 1',
        'learning_rate: 0.001',
        'output_dir: out',
      ].join('\n'),
    );
    const r = await runCompare(
      path.join(cdir, 'cfg.yaml'),
      {
        methods: 'lora,full',
        set: [],
        methodSet: ['full:learning_rate=0.0005'],
        marker: ['And that is why we always share.'],
        maxExamples: '1',
        maxNewTokens: '2',
      },
      () => {},
    );
    assert.deepEqual(r.comparison.columns, ['base', 'lora', 'full']);
    const row = (name: string) => r.comparison.rows.find((x) => x.name === name)!.values;
    const [, loraParams, fullParams] = row('trainable parameters') as number[];
    assert.equal(fullParams, 292_800);
    assert.ok(loraParams! > 0 && loraParams! < 10_000);
    const [baseBytes, loraBytes, fullBytes] = row('artefact on disk');
    assert.equal(baseBytes, null);
    assert.ok(loraBytes! > 0 && loraBytes! < fullBytes! / 10);
    assert.equal(row('eval loss').length, 3);
    assert.ok(row('eval loss').every((v) => v !== null && v > 0));
    assert.ok(r.comparison.rows.some((x) => x.name === 'style (markers present): share of full'));
    assert.ok(r.comparison.rows.some((x) => x.name === 'eval loss gap to full'));
    for (const f of ['compare.json', 'compare.md', 'compare.html']) assert.ok(existsSync(path.join(cdir, 'out', f)), f);
    assert.ok(existsSync(path.join(cdir, 'out', 'lora', 'adapter_model.safetensors')));
    assert.ok(existsSync(path.join(cdir, 'out', 'full', 'model.safetensors')));
    assert.throws(() => parseMethods('lora,bogus'), /unknown method 'bogus'/);
    assert.throws(() => parseMethods('lora,lora'), /twice/);
  });
});
