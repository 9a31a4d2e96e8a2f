// The Tokenizer wrapper on small synthetic vocabularies: encode/decode, BOS/EOS, ids, streaming decode.
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { FormatError, IndexError } from '../../src/core/errors.ts';
import { BYTE_TO_CHAR, textToByteLevel } from '../../src/tokenize/byte-level.ts';
import { byteLevelBpeJson, tokenizerFromGguf } from '../../src/tokenize/gguf.ts';
import { GPT2_PATTERN, knownPreTokenizers } from '../../src/tokenize/pre-tokenizers.ts';
import { PieceType, spmMerges, spmTokenizerJson } from '../../src/tokenize/spm.ts';
import { tokenizerFromTiktoken } from '../../src/tokenize/tiktoken.ts';
import { Tokenizer } from '../../src/tokenize/tokenizer.ts';

/** Byte-level BPE: the 256 byte tokens, merges for "he", "ll", "hell", "hello", "Ġw", then specials. */
function byteLevelTokenizer(): Tokenizer {
  const tokens = [...BYTE_TO_CHAR, 'he', 'll', 'hell', 'hello', 'Ġw', '<|endoftext|>', '<|im_end|>', '<|user|>'];
  const types = tokens.map((_, i) => (i >= 261 && i <= 262 ? PieceType.CONTROL : i === 263 ? 4 : 1));
  const merges: [string, string][] = [
    ['h', 'e'],
    ['l', 'l'],
    ['he', 'll'],
    ['hell', 'o'],
    ['Ġ', 'w'],
  ];
  return new Tokenizer(byteLevelBpeJson(tokens, types, merges, [GPT2_PATTERN]), {
    source: 'test-bpe',
    bosId: 261,
    eosId: 261,
    extraEosIds: [262],
    addBos: false,
  });
}

/** SentencePiece BPE: <unk> <s> </s>, 256 byte pieces, then ▁ a b ▁a ab ▁ab with descending scores. */
function spmTokenizer(opts: { addBos?: boolean; addEos?: boolean } = {}): Tokenizer {
  const bytes = Array.from({ length: 256 }, (_, b) => `<0x${b.toString(16).toUpperCase().padStart(2, '0')}>`);
  const normal = ['▁', 'a', 'b', '▁a', 'ab', '▁ab'];
  const pieces = ['<unk>', '<s>', '</s>', ...bytes, ...normal];
  const types = [2, 3, 3, ...bytes.map(() => 6), ...normal.map(() => 1)];
  const scores = [0, 0, 0, ...bytes.map(() => 0), ...normal.map((_, i) => -i)];
  return new Tokenizer(spmTokenizerJson({ pieces, scores, types }), {
    source: 'test-spm',
    bosId: 1,
    eosId: 2,
    unkId: 0,
    addBos: opts.addBos ?? true,
    addEos: opts.addEos ?? false,
  });
}

test('byte-level spelling follows GPT-2', () => {
  assert.equal(BYTE_TO_CHAR[32], 'Ġ');
  assert.equal(BYTE_TO_CHAR[10], 'Ċ');
  assert.equal(BYTE_TO_CHAR[65], 'A');
  assert.equal(new Set(BYTE_TO_CHAR).size, 256);
  assert.equal(textToByteLevel('é w'), 'Ã©Ġw');
});

test('byte-level BPE encodes with merges, parses specials, decodes back', () => {
  const tok = byteLevelTokenizer();
  assert.equal(tok.vocabSize, 264);
  assert.deepEqual(tok.encode('hello w'), [259, 260]);
  assert.equal(tok.decode([259, 260]), 'hello w');
  assert.deepEqual(tok.encode('hello<|im_end|>'), [259, 262]);
  assert.equal(tok.decode([259, 262]), 'hello<|im_end|>');
  assert.equal(tok.decode([259, 262, 261], { skipSpecialTokens: true }), 'hello');
  // A user-defined token is matched whole but is ordinary text: not skipped.
  assert.deepEqual(tok.encode('<|user|>'), [263]);
  assert.equal(tok.decode([263], { skipSpecialTokens: true }), '<|user|>');
  assert.equal(tok.isSpecial(262), true);
  assert.equal(tok.isSpecial(263), false);
  assert.equal(tok.idToToken(259), 'hello');
  assert.equal(tok.tokenToId('hello'), 259);
  assert.equal(tok.tokenToId('nope'), undefined);
  assert.deepEqual([...tok.eosIds].sort(), [261, 262]);
  assert.equal(tok.isEos(262), true);
  assert.equal(tok.decode([]), '');
  assert.deepEqual(tok.encode(''), []);
  assert.throws(() => tok.decode([264]), IndexError);
  assert.throws(() => tok.decode([-1]), IndexError);
});

test('SentencePiece BPE: dummy prefix, byte fallback, BOS/EOS switches', () => {
  const tok = spmTokenizer();
  const a = tok.tokenToId('▁ab')!;
  assert.deepEqual(tok.encode('ab'), [1, a]);
  assert.deepEqual(tok.encode('ab', { addSpecialTokens: false }), [a]);
  assert.equal(tok.decode([a]), 'ab');
  // 'é' is not a piece: two byte tokens, decoded back to one character.
  const e = tok.encode('é', { addSpecialTokens: false });
  assert.deepEqual(e, [tok.tokenToId('▁')!, 3 + 0xc3, 3 + 0xa9]);
  assert.equal(tok.decode(e), 'é');
  const both = spmTokenizer({ addBos: true, addEos: true });
  assert.deepEqual(both.encode('ab'), [1, a, 2]);
  const none = spmTokenizer({ addBos: false });
  assert.deepEqual(none.encode('ab'), [a]);
  assert.equal(none.addBos, false);
});

test('SentencePiece merges are ordered by score, then by part lengths, as transformers orders them', () => {
  const pieces = ['a', 'b', 'c', 'ab', 'bc', 'abc'];
  const scores = [0, 0, 0, -1, -2, -0.5];
  assert.deepEqual(spmMerges(pieces, scores), [
    ['ab', 'c'],
    ['a', 'bc'],
    ['a', 'b'],
    ['b', 'c'],
  ]);
});

test('stream decoder returns only whole characters and equals a full decode', () => {
  const tok = byteLevelTokenizer();
  const text = 'hello wé€😀 hello';
  const ids = tok.encode(text);
  const dec = tok.streamDecoder();
  const pieces = ids.map((id) => dec.push(id));
  pieces.push(dec.flush());
  for (const p of pieces) assert.ok(!p.includes('\uFFFD'), `no broken character in ${JSON.stringify(pieces)}`);
  assert.equal(pieces.join(''), text);
  assert.equal(dec.text, text);
  // '😀' is 4 byte tokens: the first three give nothing, the fourth the whole character.
  const emoji = tok.encode('😀');
  const d2 = tok.streamDecoder();
  assert.deepEqual(
    emoji.map((id) => d2.push(id)),
    ['', '', '', '😀'],
  );
  // An incomplete character left at the end comes out on flush, as U+FFFD.
  const d3 = tok.streamDecoder();
  assert.equal(d3.push(emoji.slice(0, 2)), '');
  assert.equal(d3.flush(), '\uFFFD');
});

test('stream decoder keeps SentencePiece spaces and can skip specials', () => {
  const tok = spmTokenizer();
  const text = 'ab a b é ab';
  const ids = tok.encode(text);
  const dec = tok.streamDecoder({ skipSpecialTokens: true });
  let out = '';
  for (const id of ids) out += dec.push(id);
  out += dec.push(2); // EOS is skipped
  out += dec.flush();
  assert.equal(out, text);
  assert.equal(tok.decode([...ids, 2], { skipSpecialTokens: true }), text);
});

test('tokenizerFromGguf: metadata checks and special-token ids', () => {
  const bytes = Array.from({ length: 256 }, (_, b) => `<0x${b.toString(16).toUpperCase().padStart(2, '0')}>`);
  const pieces = ['<unk>', '<s>', '</s>', ...bytes, '▁', 'a', '▁a', '<|im_end|>'];
  const meta: Record<string, unknown> = {
    'tokenizer.ggml.model': 'llama',
    'tokenizer.ggml.tokens': pieces,
    'tokenizer.ggml.scores': pieces.map((_, i) => -i),
    'tokenizer.ggml.token_type': pieces.map((p, i) =>
      i === 0 ? 2 : i < 3 || p === '<|im_end|>' ? 3 : i < 259 ? 6 : 1,
    ),
    'tokenizer.ggml.bos_token_id': 1n, // u64 values may come as bigint
    'tokenizer.ggml.eos_token_id': 2,
    'tokenizer.ggml.padding_token_id': 0xffffffff,
    'tokenizer.ggml.add_eos_token': true,
    'tokenizer.chat_template': '{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}',
  };
  const tok = tokenizerFromGguf(meta, { source: 'synthetic.gguf' });
  assert.equal(tok.bosId, 1);
  assert.equal(tok.padId, null);
  assert.deepEqual(
    [...tok.eosIds].sort((x, y) => x - y),
    [2, pieces.indexOf('<|im_end|>')],
  );
  assert.deepEqual(tok.encode('a'), [1, pieces.indexOf('▁a'), 2]);
  assert.equal(tok.applyChatTemplate([{ role: 'user', content: 'hi' }]), '<s>hi');

  assert.throws(
    () => tokenizerFromGguf({}, { source: 'x.gguf' }),
    /x\.gguf: GGUF metadata has no tokenizer\.ggml\.model/,
  );
  assert.throws(
    () => tokenizerFromGguf({ 'tokenizer.ggml.model': 'rwkv', 'tokenizer.ggml.tokens': ['a'] }),
    (e: Error) => e instanceof FormatError && /'rwkv' is not supported/.test(e.message),
  );
  const gpt2 = {
    'tokenizer.ggml.model': 'gpt2',
    'tokenizer.ggml.tokens': [...BYTE_TO_CHAR],
    'tokenizer.ggml.merges': [],
    'tokenizer.ggml.pre': 'no-such-pre',
  };
  assert.throws(() => tokenizerFromGguf(gpt2), /tokenizer\.ggml\.pre 'no-such-pre' is not a supported pre-tokenizer/);
  assert.throws(
    () => tokenizerFromGguf({ ...gpt2, 'tokenizer.ggml.pre': 'gpt-2', 'tokenizer.ggml.merges': ['nospace'] }),
    /tokenizer\.ggml\.merges\[0\]/,
  );
  assert.throws(() => tokenizerFromGguf({ ...gpt2, 'tokenizer.ggml.tokens': ['a', 'a'] }), /has 'a' twice/);
  assert.throws(
    () => tokenizerFromGguf({ ...meta, 'tokenizer.ggml.scores': [0] }),
    /tokenizer\.ggml\.scores has 1 entries/,
  );
});

test('tiktoken ranks file: merges from ranks, specials after the ranks, bad lines are FormatErrors', () => {
  const dir = mkdtempSync(join(tmpdir(), 'lowrank-tiktoken-'));
  try {
    const line = (s: string, rank: number) => `${Buffer.from(s, 'latin1').toString('base64')} ${rank}`;
    const ranks: string[] = [];
    for (let b = 0; b < 256; b++) ranks.push(line(String.fromCharCode(b), b));
    ranks.push(line('he', 256), line('ll', 257), line('hell', 258), line('hello', 259), line(' w', 260));
    const path = join(dir, 'tokenizer.model');
    writeFileSync(path, `${ranks.join('\n')}\n`);
    const tok = tokenizerFromTiktoken(path, {
      specialTokens: ['<|bos|>', '<|eos|>'],
      bosToken: '<|bos|>',
      eosToken: '<|eos|>',
      addBos: true,
    });
    assert.equal(tok.vocabSize, 263);
    assert.deepEqual(tok.encode('hello world'), [261, 259, 260, ...[...'orld'].map((c) => c.charCodeAt(0))]);
    assert.equal(tok.decode(tok.encode('hello world<|eos|>')), '<|bos|>hello world<|eos|>');
    assert.deepEqual([...tok.eosIds], [262]);
    writeFileSync(path, 'aGVsbG8= notanumber\n');
    assert.throws(
      () => tokenizerFromTiktoken(path),
      (e: Error) => e instanceof FormatError && /tokenizer\.model:1:/.test(e.message),
    );
    assert.throws(() => tokenizerFromTiktoken(join(dir, 'absent.model')), FormatError);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('every known GGUF pre-tokenizer compiles and round-trips mixed text', () => {
  const text = "Hello, y'all! 3333 日本語 Cửa Việt\n\n  \tx = 42; // ok ½ 🙂 'RE ''\r\n";
  for (const pre of knownPreTokenizers()) {
    const tok = tokenizerFromGguf(
      {
        'tokenizer.ggml.model': 'gpt2',
        'tokenizer.ggml.pre': pre,
        'tokenizer.ggml.tokens': [...BYTE_TO_CHAR],
        'tokenizer.ggml.merges': ['Ġ t', 'h e'],
      },
      { source: pre },
    );
    const ids = tok.encode(text, { addSpecialTokens: false });
    assert.equal(tok.decode(ids), text, pre);
  }
});
