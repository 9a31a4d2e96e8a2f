import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, describe, test } from 'node:test';
import { DataError } from '../../src/core/errors.ts';
import { type DatasetConfig, datasetConfig, parseTrainConfig } from '../../src/train/config.ts';
import {
  alpacaPrompt,
  buildDataset,
  type ChatMessage,
  type ChatRenderer,
  collate,
  createLoaders,
  DataLoader,
  type Example,
  type FormatOptions,
  IGNORE_INDEX,
  lengthStats,
  packAssignments,
  packExamples,
  prepareData,
  readRecords,
  type SourceRecord,
  splitValidation,
  type TextTokenizer,
  type Tokenized,
  tokenizeRecord,
} from '../../src/train/data.ts';
import { dataAdvice } from '../../src/train/data-report.ts';

const dir = mkdtempSync(path.join(tmpdir(), 'lowrank-data-'));
after(() => rmSync(dir, { recursive: true, force: true }));
let fileNo = 0;
function writeData(name: string, text: string): string {
  const file = path.join(dir, `${fileNo++}-${name}`);
  writeFileSync(file, text);
  return file;
}

// --- a tiny deterministic tokenizer: special tokens by name, every other character is its code point ---

const SPECIAL: [string, number][] = [
  ['<|im_start|>', 3],
  ['<|im_end|>', 4],
  ['<s>', 1],
  ['</s>', 2],
];

class CharTokenizer implements TextTokenizer {
  bosId: number | undefined;
  eosId: number | undefined;
  applyChatTemplate?: ChatRenderer;
  constructor(opts: { bos?: boolean; eosId?: number; template?: ChatRenderer } = {}) {
    this.bosId = opts.bos === false ? undefined : 1;
    this.eosId = 'eosId' in opts ? opts.eosId : 2;
    if (opts.template) this.applyChatTemplate = opts.template;
  }
  encode(text: string, opts: { addSpecialTokens?: boolean } = {}): number[] {
    const ids: number[] = [];
    if ((opts.addSpecialTokens ?? true) && this.bosId !== undefined) ids.push(this.bosId);
    let i = 0;
    outer: while (i < text.length) {
      for (const [s, id] of SPECIAL) {
        if (text.startsWith(s, i)) {
          ids.push(id);
          i += s.length;
          continue outer;
        }
      }
      const cp = text.codePointAt(i)!;
      ids.push(cp);
      i += cp > 0xffff ? 2 : 1;
    }
    return ids;
  }
}

/** Code points of a plain string (what CharTokenizer gives without special tokens). */
const chars = (s: string): number[] => new CharTokenizer({ bos: false }).encode(s, { addSpecialTokens: false });
const masked = (ids: number[]): number[] => ids.map(() => IGNORE_INDEX);

/** A word-level tokenizer that, like BPE, glues a leading space to the word: "a: b" -> ["a", ":", " b"]. */
class WordTokenizer implements TextTokenizer {
  private vocab = new Map<string, number>();
  eosId = 2;
  bosId = 1;
  pieces(text: string): string[] {
    return text.match(/ ?[A-Za-z]+|./gs) ?? [];
  }
  encode(text: string, opts: { addSpecialTokens?: boolean } = {}): number[] {
    const ids = (opts.addSpecialTokens ?? true) ? [1] : [];
    for (const p of this.pieces(text)) {
      if (!this.vocab.has(p)) this.vocab.set(p, 10 + this.vocab.size);
      ids.push(this.vocab.get(p)!);
    }
    return ids;
  }
}

const chatml: ChatRenderer = (messages, { addGenerationPrompt }) =>
  messages.map((m) => `<|im_start|>${m.role}\n${m.content}<|im_end|>\n`).join('') +
  (addGenerationPrompt ? '<|im_start|>assistant\n' : '');

/** Like Qwen3: assistant turns after the last user message get an (empty) think block; earlier ones do not. */
const qwen3like: ChatRenderer = (messages, { addGenerationPrompt }) => {
  let lastUser = -1;
  messages.forEach((m, i) => {
    if (m.role === 'user') lastUser = i;
  });
  let out = '';
  messages.forEach((m, i) => {
    const think = m.role === 'assistant' && i > lastUser && i === messages.length - 1 ? '<think>\n\n</think>\n\n' : '';
    out += `<|im_start|>${m.role}\n${think}${m.content}<|im_end|>\n`;
  });
  return out + (addGenerationPrompt ? '<|im_start|>assistant\n' : '');
};

const OPTS: FormatOptions = { sequenceLen: 512, trainOnInputs: false, excessLength: 'truncate' };

function run(
  value: Record<string, unknown>,
  spec: Partial<DatasetConfig> & { type: DatasetConfig['type'] },
  tok: TextTokenizer = new CharTokenizer(),
  opts: Partial<FormatOptions> = {},
): Tokenized {
  const full = datasetConfig({ path: 'mem.jsonl', ...spec });
  const rec: SourceRecord = { value, line: 7 };
  const shape = full.field_prompt in value || full.field_completion in value ? 'prompt_completion' : 'text';
  return tokenizeRecord(rec, full, 0, tok, { ...OPTS, ...opts }, { shape });
}

function ok(t: Tokenized): { ids: number[]; labels: number[]; truncated: boolean; searched: number } {
  assert.ok(t.ok, `expected an example, got a drop: ${!t.ok ? t.reason : ''}`);
  return {
    ids: Array.from(t.example.inputIds),
    labels: Array.from(t.example.labels),
    truncated: t.truncated,
    searched: t.searchedTurns,
  };
}

/** The runs of consecutive trained labels. */
function trainedRuns(labels: number[]): number[][] {
  const runs: number[][] = [];
  let cur: number[] = [];
  for (const l of labels) {
    if (l === IGNORE_INDEX) {
      if (cur.length) runs.push(cur);
      cur = [];
    } else cur.push(l);
  }
  if (cur.length) runs.push(cur);
  return runs;
}

function throwsData(fn: () => unknown, ...parts: (string | RegExp)[]): void {
  assert.throws(fn, (e: unknown) => {
    assert.ok(e instanceof DataError, `expected DataError, got ${e}`);
    for (const p of parts) {
      if (typeof p === 'string') assert.ok(e.message.includes(p), `message lacks ${JSON.stringify(p)}:\n${e.message}`);
      else assert.match(e.message, p);
    }
    return true;
  });
}

// =========================================================================================================

describe('readers', () => {
  test('JSONL: one object per line, blank lines skipped, CRLF, line numbers kept', () => {
    const file = writeData('a.jsonl', '{"text":"a"}\r\n\n{"text":"b"}\n  \n{"text":"c"}');
    const recs = readRecords(file);
    assert.deepEqual(
      recs.map((r) => [r.value.text, r.line]),
      [
        ['a', 1],
        ['b', 3],
        ['c', 5],
      ],
    );
  });

  test('JSONL: a bad line names file:line and the parse error', () => {
    const file = writeData('bad.jsonl', '{"text":"a"}\n{"text":"b"}\n{"text": "c",}\n');
    throwsData(() => readRecords(file), `${file}:3: invalid JSON (`, 'must be one JSON object');
    const arr = writeData('arr.jsonl', '{"text":"a"}\n[1,2]\n');
    throwsData(() => readRecords(arr), `${arr}:2: expected a JSON object, found a list`);
  });

  test('JSON: an array, {data: [...]}, or an object of splits; records know their line', () => {
    const pretty = JSON.stringify(
      [
        { instruction: 'a', output: 'b' },
        { instruction: 'c', output: 'd' },
      ],
      null,
      2,
    );
    const file = writeData('a.json', pretty);
    assert.deepEqual(
      readRecords(file).map((r) => r.line),
      [2, 6],
    );
    const data = writeData('d.json', '{"version": 1, "data": [\n{"text": "x"},\n{"text": "y, ] }"}\n]}');
    assert.deepEqual(
      readRecords(data).map((r) => [r.value.text, r.line]),
      [
        ['x', 2],
        ['y, ] }', 3],
      ],
    );
    const splits = writeData('s.json', '{"train": [{"text": "t"}],\n "test": [\n{"text": "e1"}, {"text": "e2"}]}');
    assert.deepEqual(
      readRecords(splits, { split: 'test' }).map((r) => [r.value.text, r.line]),
      [
        ['e1', 3],
        ['e2', 3],
      ],
    );
    throwsData(
      () => readRecords(splits, { split: 'validation' }),
      "found an object with keys train, test (split 'validation')",
    );
  });

  test('JSON: a syntax error names file:line:col; a .json file holding JSON Lines is read as such', () => {
    const file = writeData('bad.json', '[\n  {"text": "a"},\n  {"text": "b"\n]');
    throwsData(() => readRecords(file), new RegExp(`${escapeRe(file)}:4:1: invalid JSON`));
    const jsonl = writeData('lines.json', '{"text": "a"}\n{"text": "b"}\n');
    assert.equal(readRecords(jsonl).length, 2);
    const scalar = writeData('n.json', '42');
    throwsData(() => readRecords(scalar), 'expected an array of records', 'found a number');
    const mixed = writeData('m.json', '[{"text": "a"},\n 3]');
    throwsData(() => readRecords(mixed), `${mixed}:2: expected a JSON object, found a number`);
  });

  test('CSV: RFC 4180 quoting, "" escapes, newlines inside quotes, CRLF, BOM; TSV', () => {
    const text =
      '\ufeffprompt,completion\r\n' +
      '"Hello, world","He said ""hi"""\r\n' +
      '"two\nlines",plain\r\n' +
      ',\r\n' +
      'last,row';
    const file = writeData('a.csv', text);
    const recs = readRecords(file);
    assert.deepEqual(
      recs.map((r) => [r.value.prompt, r.value.completion, r.line]),
      [
        ['Hello, world', 'He said "hi"', 2],
        ['two\nlines', 'plain', 3],
        ['', '', 5],
        ['last', 'row', 6],
      ],
    );
    const tsv = writeData('a.tsv', 'text\tother\nx, y\t"q\tq"\n');
    assert.deepEqual(
      readRecords(tsv).map((r) => [r.value.text, r.value.other]),
      [['x, y', 'q\tq']],
    );
  });

  test('CSV errors name file:line', () => {
    const count = writeData('c.csv', 'a,b\n1,2\n"x\ny",2,3\n');
    throwsData(() => readRecords(count), `${count}:3: 3 field(s) but the header has 2`);
    const open = writeData('o.csv', 'a,b\n1,2\n3,"never closed\n4,5\n');
    throwsData(() => readRecords(open), `${open}:3: unterminated quoted field`);
    const stray = writeData('s.csv', 'a,b\n"x"y,2\n');
    throwsData(() => readRecords(stray), `${stray}:2: unexpected character after a closing quote`);
    const header = writeData('h.csv', 'a,b\n');
    throwsData(() => readRecords(header), 'has a header row but no records');
    const dup = writeData('d.csv', 'a,a\n1,2\n');
    throwsData(() => readRecords(dup), `${dup}:1: column 'a' appears twice`);
  });

  test('empty and missing files', () => {
    for (const [name, text] of [
      ['e.jsonl', ''],
      ['w.jsonl', '\n  \n'],
      ['e.json', '[]'],
      ['e.csv', ''],
    ] as const) {
      const file = writeData(name, text);
      throwsData(() => readRecords(file), `${file} is empty: no records`);
    }
    throwsData(() => readRecords(path.join(dir, 'missing.jsonl')), 'cannot read dataset', 'no such file');
    throwsData(() => readRecords(writeData('x.parquet', 'PAR1')), "extension '.parquet'", 'ds_type');
    assert.equal(readRecords(writeData('x.txt', '{"text": "a"}\n'), { kind: 'jsonl' }).length, 1);
  });
});

function escapeRe(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}

// =========================================================================================================

describe('formats and loss masking', () => {
  test('text: every token trained, BOS kept, EOS appended; the first label is always -100', () => {
    const r = ok(run({ text: 'hi' }, { type: 'text' }));
    assert.deepEqual(r.ids, [1, 104, 105, 2]);
    assert.deepEqual(r.labels, [-100, 104, 105, 2]);
    const custom = ok(run({ body: 'ok' }, { type: 'text', field: 'body' }, new CharTokenizer({ bos: false })));
    assert.deepEqual(custom.ids, [111, 107, 2]);
    assert.deepEqual(custom.labels, [-100, 107, 2]);
  });

  test('completion (TRL prompt/completion): the prompt is masked unless train_on_inputs', () => {
    const r = ok(run({ prompt: 'Q:', completion: 'A' }, { type: 'completion' }));
    assert.deepEqual(r.ids, [1, 81, 58, 65, 2]);
    assert.deepEqual(r.labels, [-100, -100, -100, 65, 2]);
    const all = ok(run({ prompt: 'Q:', completion: 'A' }, { type: 'completion' }, undefined, { trainOnInputs: true }));
    assert.deepEqual(all.labels, [-100, 81, 58, 65, 2]);
    // Axolotl's completion: a text field
    const axo = ok(run({ text: 'ab' }, { type: 'completion' }));
    assert.deepEqual(axo.labels, [-100, 97, 98, 2]);
  });

  test('completion: a token that straddles the prompt boundary counts as completion', () => {
    const tok = new WordTokenizer();
    const r = ok(run({ prompt: 'Answer: ', completion: 'Paris' }, { type: 'completion' }, tok));
    // "Answer: Paris" -> [BOS, "Answer", ":", " Paris", EOS]; the prompt "Answer: " ends inside " Paris".
    const [answer, colon, paris] = tok.encode('Answer: Paris', { addSpecialTokens: false });
    assert.deepEqual(r.ids, [1, answer, colon, paris, 2]);
    assert.deepEqual(r.labels, [-100, -100, -100, paris, 2]);
  });

  test('alpaca: the standard prompt, with and without input; output and EOS trained', () => {
    const withInput = ok(run({ instruction: 'Add', input: '1 1', output: '2' }, { type: 'alpaca' }));
    const prompt = alpacaPrompt('Add', '1 1');
    assert.ok(prompt.startsWith('Below is an instruction that describes a task, paired with an input'));
    assert.ok(prompt.endsWith('### Instruction:\nAdd\n\n### Input:\n1 1\n\n### Response:\n'));
    assert.deepEqual(withInput.ids, [1, ...chars(prompt), 50, 2]);
    assert.deepEqual(withInput.labels, [-100, ...masked(chars(prompt)), 50, 2]);
    const noInput = ok(run({ instruction: 'Hi', input: '', output: 'yo' }, { type: 'alpaca' }));
    const p2 = alpacaPrompt('Hi');
    assert.equal(
      p2,
      'Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\nHi\n\n### Response:\n',
    );
    assert.deepEqual(noInput.labels, [-100, ...masked(chars(p2)), 121, 111, 2]);
  });

  const chatTok = () => new CharTokenizer({ bos: false, eosId: 4, template: chatml });

  test('chat: loss on assistant turns only (content + end-of-turn), not system/user, not weight 0', () => {
    const messages = [
      { role: 'system', content: 'S' },
      { role: 'user', content: 'U1' },
      { role: 'assistant', content: 'A1' },
      { role: 'user', content: 'U2' },
      { role: 'assistant', content: 'A2', weight: 0 },
      { role: 'user', content: 'U3' },
      { role: 'assistant', content: 'A3' },
    ];
    const r = ok(run({ messages }, { type: 'chat' }, chatTok()));
    const turn = (role: string, content: string) => `<|im_start|>${role}\n${content}<|im_end|>\n`;
    const prompt = (ids: number[]) => ({ ids, labels: masked(ids) });
    const trained = (ids: number[]) => ({ ids, labels: ids });
    const gen = chars('<|im_start|>assistant\n'.replace('<|im_start|>', '')); // header after the special token
    const parts = [
      prompt(chatTok().encode(turn('system', 'S') + turn('user', 'U1'), { addSpecialTokens: false })),
      prompt([3, ...gen]),
      trained([...chars('A1'), 4, 10]),
      prompt(
        chatTok().encode(turn('user', 'U2') + turn('assistant', 'A2') + turn('user', 'U3'), {
          addSpecialTokens: false,
        }),
      ),
      prompt([3, ...gen]),
      trained([...chars('A3'), 4, 10]),
    ];
    assert.deepEqual(
      r.ids,
      parts.flatMap((p) => p.ids),
    );
    const expected = parts.flatMap((p) => p.labels);
    expected[0] = IGNORE_INDEX;
    assert.deepEqual(r.labels, expected);
    assert.equal(r.searched, 0);
  });

  test('chat: ShareGPT fields through field_messages, message_property_mappings and the default roles', () => {
    const conversations = [
      { from: 'human', value: 'hi' },
      { from: 'gpt', value: 'yo' },
    ];
    const r = ok(
      run(
        { conversations },
        {
          type: 'chat',
          field_messages: 'conversations',
          message_property_mappings: { role: 'from', content: 'value' },
        },
        chatTok(),
      ),
    );
    const full = chatml(
      [
        { role: 'user', content: 'hi' },
        { role: 'assistant', content: 'yo' },
      ],
      {},
    );
    assert.deepEqual(r.ids, chatTok().encode(full, { addSpecialTokens: false }));
    const trainedIds = r.labels.filter((l) => l !== IGNORE_INDEX);
    assert.deepEqual(trainedIds, [...chars('yo'), 4, 10]);
  });

  test('chat: message_field_training forces a turn in or out; train_on_inputs trains everything', () => {
    const messages = [
      { role: 'user', content: 'u', train: true },
      { role: 'assistant', content: 'a', train: false },
      { role: 'user', content: 'v' },
      { role: 'assistant', content: 'b' },
    ];
    const r = ok(run({ messages }, { type: 'chat', message_field_training: 'train' }, chatTok()));
    assert.deepEqual(trainedRuns(r.labels), [
      [...chars('u'), 4, 10],
      [...chars('b'), 4, 10],
    ]);
    const all = ok(run({ messages }, { type: 'chat' }, chatTok(), { trainOnInputs: true }));
    assert.equal(all.labels.filter((l) => l === IGNORE_INDEX).length, 1);
  });

  test('chat: train_on_eos turn / none / all / last', () => {
    const messages = [
      { role: 'user', content: 'u' },
      { role: 'assistant', content: 'a' },
      { role: 'user', content: 'v' },
      { role: 'assistant', content: 'b' },
    ];
    const eosLabels = (mode: DatasetConfig['train_on_eos']) => {
      const r = ok(run({ messages }, { type: 'chat', train_on_eos: mode }, chatTok()));
      return r.ids.flatMap((id, t) => (id === 4 ? [r.labels[t] === 4] : []));
    };
    assert.deepEqual(eosLabels('turn'), [false, true, false, true]);
    assert.deepEqual(eosLabels('none'), [false, false, false, false]);
    assert.deepEqual(eosLabels('all'), [true, true, true, true]);
    assert.deepEqual(eosLabels('last'), [false, false, false, true]);
  });

  test('chat: a template that is not prefix-stable (Qwen3-like) falls back to content search', () => {
    const tok = new CharTokenizer({ bos: false, eosId: 4, template: qwen3like });
    const messages: ChatMessage[] = [
      { role: 'user', content: 'Q1' },
      { role: 'assistant', content: 'A1' },
      { role: 'user', content: 'Q2' },
      { role: 'assistant', content: 'A2' },
    ];
    const r = ok(run({ messages }, { type: 'chat' }, tok));
    assert.equal(r.searched, 1); // A1 (rendered alone it gets a think block, in the whole conversation not)
    const full = qwen3like(messages, {});
    assert.ok(full.includes('A1<|im_end|>') && !full.includes('<think>\n\n</think>\n\nA1'));
    assert.deepEqual(trainedRuns(r.labels), [
      [...chars('A1'), 4, 10],
      tok.encode('<think>\n\n</think>\n\nA2<|im_end|>\n', { addSpecialTokens: false }),
    ]);
  });

  test('chat errors: no template, a failing template, malformed messages', () => {
    const noTemplate = new CharTokenizer({ bos: false });
    const messages = [
      { role: 'user', content: 'u' },
      { role: 'assistant', content: 'a' },
    ];
    throwsData(() => run({ messages }, { type: 'chat' }, noTemplate), 'mem.jsonl:7: chat data needs a chat template');
    const failing = new CharTokenizer({
      template: () => {
        throw new Error('Conversation roles must alternate user/assistant');
      },
    });
    throwsData(
      () => run({ messages }, { type: 'chat' }, failing),
      'mem.jsonl:7: the chat template failed',
      'must alternate',
    );
    throwsData(
      () => run({ messages: 'hello' }, { type: 'chat' }, chatTok()),
      'mem.jsonl:7: field \'messages\' should be a list, found "hello" (a string)',
      'a chat record looks like {"messages": [{"role": "user"',
    );
    throwsData(
      () => run({ messages: [{ role: 'user', content: 5 }] }, { type: 'chat' }, chatTok()),
      "field 'messages[0].content' should be a string, found 5 (a number)",
    );
    throwsData(
      () => run({ conversations: [] }, { type: 'chat' }, chatTok()),
      "missing field 'messages'; the record has fields conversations",
      'set field_messages: conversations',
    );
    // a JSON string in a CSV cell is accepted
    const fromCsv = ok(run({ messages: JSON.stringify(messages) }, { type: 'chat' }, chatTok()));
    assert.ok(fromCsv.labels.some((l) => l !== IGNORE_INDEX));
  });

  test('input_output: segments tokenised one by one without special tokens, label decides', () => {
    const segments = [
      { text: '<s>ab', label: false },
      { text: 'c', label: true },
      { text: 'd</s>', label: true },
    ];
    const r = ok(run({ segments }, { type: 'input_output' }));
    assert.deepEqual(r.ids, [1, 97, 98, 99, 100, 2]);
    assert.deepEqual(r.labels, [-100, -100, -100, 99, 100, 2]);
    throwsData(
      () => run({ segments: [{ text: 'a', label: 'yes' }] }, { type: 'input_output' }),
      "'segments[0].label' should be true or false",
    );
  });

  test('missing fields and wrong types name file:line, the field, what was found and the expected shape', () => {
    throwsData(
      () => run({ instruction: 'a', input: 'b' }, { type: 'alpaca' }),
      "mem.jsonl:7: missing field 'output'; the record has fields instruction, input",
      'a alpaca record looks like {"instruction": "...", "input": "..." (optional), "output": "..."}',
    );
    throwsData(
      () => run({ prompt: 'a', completion: 42 }, { type: 'completion' }),
      "mem.jsonl:7: field 'completion' should be a string, found 42 (a number)",
    );
    throwsData(() => run({ txt: 'a' }, { type: 'text' }), "missing field 'text'", '{"text": "..."}');
  });
});

// =========================================================================================================

describe('truncation and drops', () => {
  test('truncate keeps the start and records it', () => {
    const r = run({ text: 'abcdefgh' }, { type: 'text' }, undefined, { sequenceLen: 4 });
    const e = ok(r);
    assert.equal(e.truncated, true);
    assert.deepEqual(e.ids, [1, 97, 98, 99]);
    assert.equal(r.ok && r.rawLength, 10);
  });

  test('drop and raise strategies', () => {
    const d = run({ text: 'abcdefgh' }, { type: 'text' }, undefined, { sequenceLen: 4, excessLength: 'drop' });
    assert.deepEqual(d, { ok: false, reason: 'too_long', rawLength: 10 });
    throwsData(
      () => run({ text: 'abcdefgh' }, { type: 'text' }, undefined, { sequenceLen: 4, excessLength: 'raise' }),
      'mem.jsonl:7: the example has 10 tokens, more than sequence_len 4',
    );
  });

  test('no trainable tokens: a prompt that fills sequence_len; a chat without an assistant turn; empty text', () => {
    const cut = run({ prompt: 'long prompt', completion: 'x' }, { type: 'completion' }, undefined, { sequenceLen: 5 });
    assert.deepEqual(cut, { ok: false, reason: 'no_trainable_tokens_after_truncation', rawLength: 14 });
    const chatTok = new CharTokenizer({ bos: false, eosId: 4, template: chatml });
    const noAssistant = run({ messages: [{ role: 'user', content: 'u' }] }, { type: 'chat' }, chatTok);
    assert.equal(!noAssistant.ok && noAssistant.reason, 'no_trainable_tokens');
    assert.deepEqual(run({ text: '' }, { type: 'text' }), { ok: false, reason: 'empty', rawLength: 0 });
  });
});

// =========================================================================================================

function example(len: number, tag: number): Example {
  const inputIds = Int32Array.from({ length: len }, (_, t) => tag * 1000 + t);
  const labels = Int32Array.from(inputIds, (id, t) => (t === 0 ? IGNORE_INDEX : id));
  return { inputIds, labels, source: { dataset: 0, file: 'x', line: tag } };
}

describe('sample packing', () => {
  test('first-fit-decreasing assignment', () => {
    const bins = packAssignments([5, 3, 4, 2, 6], 8, 0).map((b) => b.slice().sort());
    assert.deepEqual(bins, [[3, 4], [0, 1], [2]]);
  });

  test('rows: no example split, position ids restart, sequence ids count up, boundaries masked', () => {
    const rand = mulberry(7);
    for (const seqLen of [8, 16, 64]) {
      const examples = Array.from({ length: 120 }, (_, i) => example(1 + Math.floor(rand() * seqLen), i));
      const rows = packExamples(examples, seqLen, 3);
      const seen = new Set<number>();
      const total = examples.reduce((s, e) => s + e.inputIds.length, 0);
      assert.ok(rows.length >= Math.ceil(total / seqLen));
      for (const row of rows) {
        assert.ok(row.inputIds.length <= seqLen);
        let k = 0;
        let t = 0;
        while (t < row.inputIds.length) {
          k++;
          const tag = Math.floor(row.inputIds[t]! / 1000);
          const ex = examples[tag]!;
          assert.ok(!seen.has(tag), 'an example appears twice');
          seen.add(tag);
          for (let j = 0; j < ex.inputIds.length; j++) {
            assert.equal(row.inputIds[t + j], ex.inputIds[j]);
            assert.equal(row.positionIds[t + j], j);
            assert.equal(row.seqIds[t + j], k);
            assert.equal(row.labels[t + j], j === 0 ? IGNORE_INDEX : ex.inputIds[j]);
          }
          t += ex.inputIds.length;
        }
        assert.equal(row.examples, k);
      }
      assert.equal(seen.size, examples.length);
    }
  });

  test('an example of exactly sequence_len fills a row alone; packing is deterministic for a seed', () => {
    const rows = packExamples([example(8, 0), example(3, 1), example(5, 2)], 8, 0);
    assert.equal(rows.length, 2);
    assert.equal(rows[0]!.examples, 1);
    const examples = Array.from({ length: 50 }, (_, i) => example(1 + (i % 7), i));
    const a = packExamples(examples, 16, 11);
    const b = packExamples(examples, 16, 11);
    assert.deepEqual(a, b);
  });
});

function mulberry(seed: number): () => number {
  let a = seed;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

// =========================================================================================================

describe('batches', () => {
  test('collate pads to the longest row (or padTo) with masked padding', () => {
    const rows = packExamples([example(3, 0), example(2, 1), example(4, 2)], 5, 0);
    const b = collate(rows, { padId: 9 });
    assert.equal(b.batchSize, rows.length);
    assert.equal(b.seqLen, 5);
    const row1 = rows[1]!;
    const o = 5;
    for (let t = row1.inputIds.length; t < 5; t++) {
      assert.equal(b.inputIds[o + t], 9);
      assert.equal(b.labels[o + t], IGNORE_INDEX);
      assert.equal(b.attentionMask[o + t], 0);
      assert.equal(b.seqIds[o + t], 0);
      assert.equal(b.positionIds[o + t], 0);
    }
    assert.equal(b.numTokens, 9);
    assert.equal(b.numTrainableTokens, 6);
    assert.equal(collate(rows, { padTo: 12 }).seqLen, 12);
  });

  test('each epoch visits every row once, in a seeded order of its own', () => {
    const rows = packExamples(
      Array.from({ length: 10 }, (_, i) => example(2, i)),
      2,
      0,
    );
    const loader = new DataLoader(rows, { microBatchSize: 3, seed: 5 });
    assert.equal(loader.batchesPerEpoch, 4);
    const epochTags = (epoch: number) => {
      const tags: number[] = [];
      for (let i = 0; i < loader.batchesPerEpoch; i++) {
        const b = loader.batchAt(epoch, i);
        for (let r = 0; r < b.batchSize; r++) tags.push(Math.floor(b.inputIds[r * b.seqLen]! / 1000));
      }
      return tags;
    };
    const e0 = epochTags(0);
    const e1 = epochTags(1);
    assert.deepEqual(
      [...e0].sort((a, b) => a - b),
      [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
    );
    assert.deepEqual(
      [...e1].sort((a, b) => a - b),
      [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
    );
    assert.notDeepEqual(e0, e1);
    const again = new DataLoader(rows, { microBatchSize: 3, seed: 5 });
    assert.deepEqual(again.batchAt(1, 2), loader.batchAt(1, 2));
    assert.equal(loader.batchAt(0, 3).batchSize, 1); // the last batch of an epoch is smaller
  });

  test('resume from a saved position gives exactly the same batches', () => {
    const rows = packExamples(
      Array.from({ length: 23 }, (_, i) => example(1 + (i % 5), i)),
      8,
      1,
    );
    const a = new DataLoader(rows, { microBatchSize: 2, seed: 9 });
    for (let i = 0; i < 7; i++) a.next();
    const saved = JSON.parse(JSON.stringify(a.position));
    const expected = Array.from({ length: 12 }, () => a.next()); // crosses an epoch boundary
    const b = new DataLoader(rows, { microBatchSize: 2, seed: 9 });
    b.seek(saved);
    const got = Array.from({ length: 12 }, () => b.next());
    assert.deepEqual(got, expected);
    assert.ok(expected.some((x) => x.epoch === 1));
    const other = new DataLoader(rows.slice(1), { microBatchSize: 2, seed: 9 });
    throwsData(() => other.seek(saved), 'the training rows changed since the checkpoint');
    const otherSeed = new DataLoader(rows, { microBatchSize: 2, seed: 10 });
    throwsData(() => otherSeed.seek(saved), 'changed since the checkpoint');
  });
});

// =========================================================================================================

describe('validation split', () => {
  const examples = Array.from({ length: 20 }, (_, i) => example(2, i));
  test('a fraction (ceil) or a count, seeded, disjoint, file order kept', () => {
    const a = splitValidation(examples, 0.12, 3);
    assert.equal(a.eval.length, 3);
    assert.equal(a.train.length, 17);
    const tags = (xs: Example[]) => xs.map((x) => x.source.line);
    assert.deepEqual(
      [...tags(a.train), ...tags(a.eval)].sort((x, y) => x - y),
      tags(examples),
    );
    assert.deepEqual(
      tags(a.train),
      [...tags(a.train)].sort((x, y) => x - y),
    );
    assert.deepEqual(splitValidation(examples, 0.12, 3), a);
    assert.notDeepEqual(tags(splitValidation(examples, 0.12, 4).eval), tags(a.eval));
    assert.equal(splitValidation(examples, 5, 3).eval.length, 5);
    throwsData(() => splitValidation(examples, 20, 3), 'leaving none to train on');
  });
});

// =========================================================================================================

describe('prepareData and the data check report', () => {
  test('end to end from a config: datasets, split, packing, loaders, report', () => {
    const alpaca = writeData(
      'alpaca.jsonl',
      Array.from({ length: 30 }, (_, i) => JSON.stringify({ instruction: `n${i}`, output: 'x'.repeat(i % 7) })).join(
        '\n',
      ),
    );
    const chat = writeData(
      'chat.csv',
      `messages\n${Array.from({ length: 10 }, (_, i) =>
        csvCell(
          JSON.stringify([
            { role: 'user', content: `q${i}` },
            { role: i === 3 ? 'user' : 'assistant', content: `a${i}` },
          ]),
        ),
      ).join('\n')}\n`,
    );
    const cfg = parseTrainConfig({
      base_model: 'm',
      adapter: 'lora',
      learning_rate: 1e-4,
      sequence_len: 148,
      sample_packing: true,
      val_set_size: 0.1,
      micro_batch_size: 2,
      datasets: [
        { path: alpaca, type: 'alpaca' },
        { path: chat, type: 'chat_template' },
      ],
    });
    const tok = new CharTokenizer({ eosId: 2, template: chatml });
    const data = prepareData(cfg, tok);
    const r = data.report;
    assert.equal(r.datasets[0]!.records, 30);
    assert.equal(r.datasets[1]!.records, 10);
    assert.equal(r.datasets[1]!.dropped.no_trainable_tokens, 1);
    assert.deepEqual(r.datasets[1]!.droppedAt.no_trainable_tokens, [`${chat}:5`]);
    assert.ok(r.datasets[0]!.truncated > 0); // the alpaca prompt alone is 142-143 characters
    assert.equal(r.train.examples + (r.eval?.examples ?? 0), r.datasets[0]!.examples + r.datasets[1]!.examples);
    assert.equal(r.eval?.examples, Math.ceil(0.1 * (r.datasets[0]!.examples + r.datasets[1]!.examples)));
    assert.equal(r.evalSource, 'val_set_size');
    assert.ok(r.train.packingEfficiency! > 0 && r.train.packingEfficiency! <= 1);
    assert.ok(r.train.trainableFraction > 0 && r.train.trainableFraction < 1);
    assert.ok(
      r.advice.some((a) => a.startsWith(`Only ${r.train.examples} training example(s): LoRA tends to overfit`)),
    );
    assert.ok(r.advice.some((a) => a.includes('were cut at sequence_len 148')));
    const text = data.reportText;
    assert.match(text, /Data check \(sequence_len 148, sample packing on\)/);
    assert.match(text, /dropped 1: no token carries loss/);
    assert.match(text, /Advice\n {2}- Only/);
    const { train, eval: evalLoader } = createLoaders(data, cfg, tok);
    const b = train.next();
    assert.equal(b.seqLen, 148); // pad_to_sequence_len follows sample_packing
    assert.ok(b.batchSize <= 2);
    assert.ok(evalLoader);
    assert.deepEqual(prepareData(cfg, tok).trainRows, data.trainRows); // deterministic
  });

  test('every record dropped is a DataError', () => {
    const file = writeData('empty-text.jsonl', '{"text": ""}\n{"text": ""}\n');
    const cfg = parseTrainConfig({
      base_model: 'm',
      adapter: 'lora',
      learning_rate: 1e-4,
      datasets: [{ path: file, type: 'text' }],
    });
    throwsData(() => prepareData(cfg, new CharTokenizer()), 'no training examples');
  });

  test('buildDataset reports raw length statistics', () => {
    const file = writeData(
      'lens.jsonl',
      [1, 2, 3, 4, 5].map((n) => JSON.stringify({ text: 'a'.repeat(n) })).join('\n'),
    );
    const { stats } = buildDataset(datasetConfig({ path: file, type: 'text' }), 0, new CharTokenizer(), {
      ...OPTS,
      sequenceLen: 5,
    });
    // lengths with BOS and EOS: 3..7; sequence_len 5 truncates 6 and 7
    assert.deepEqual(stats.lengths, { min: 3, mean: 5, p50: 5, p95: 7, max: 7 });
    assert.equal(stats.truncated, 2);
  });

  test('length statistics and advice thresholds', () => {
    const s = lengthStats(Array.from({ length: 20 }, (_, i) => i + 1));
    assert.deepEqual(s, { min: 1, mean: 10.5, p50: 10, p95: 19, max: 20 });
    assert.deepEqual(lengthStats([]), { min: 0, mean: 0, p50: 0, p95: 0, max: 0 });
    const split = {
      examples: 60_000,
      tokens: 1,
      trainableTokens: 1,
      trainableFraction: 1,
      lengths: s,
      rows: 1,
      packingEfficiency: null,
    };
    const advice = dataAdvice(
      {
        sequenceLen: 512,
        samplePacking: false,
        datasets: [],
        evalDatasets: [],
        evalSource: 'none',
        train: split,
        eval: null,
      },
      { sequenceLen: 512, samplePacking: false, microBatchSize: 4, padToSequenceLen: false, adapter: 'lora' },
    );
    assert.ok(advice.some((a) => a.includes('60000 training examples') && a.includes('full fine-tuning')));
    assert.ok(advice.some((a) => a.includes('sample_packing: true')));
    assert.ok(advice.some((a) => a.includes('No evaluation set')));
  });
});

function csvCell(s: string): string {
  return `"${s.replace(/"/g, '""')}"`;
}
