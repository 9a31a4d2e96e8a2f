// Hugging Face reference token ids (llama.cpp's ggml-vocab .inp/.out pairs, made with AutoTokenizer and
// add_special_tokens=False, per ../shared/tokenizers/ggml-vocab/PROVENANCE.md) reproduced from GGUF
// vocabularies, a SentencePiece .model and a tiktoken ranks file; decoding gives the inputs back.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { readGguf } from '../../src/formats/gguf.ts';
import { tokenizerFromGguf } from '../../src/tokenize/gguf.ts';
import { LLAMA3_PATTERN } from '../../src/tokenize/pre-tokenizers.ts';
import { tokenizerFromSentencePieceModel } from '../../src/tokenize/spm.ts';
import {
  llama3SpecialTokens,
  llama3TiktokenOptions,
  readTiktokenRanks,
  tiktokenJson,
  tokenizerFromTiktoken,
} from '../../src/tokenize/tiktoken.ts';
import type { Tokenizer } from '../../src/tokenize/tokenizer.ts';
import { readVocabVectors, SHARED, skipUnless } from './shared-data.ts';

function checkVectors(name: string, tok: Tokenizer): void {
  const vectors = readVocabVectors(name);
  assert.equal(vectors.length, 46, `${name}: expected 46 test strings`);
  const wrong: string[] = [];
  let matched = 0;
  for (const { text, ids } of vectors) {
    const got = tok.encode(text, { addSpecialTokens: false });
    if (JSON.stringify(got) === JSON.stringify(ids)) matched++;
    else wrong.push(`${JSON.stringify(text)}\n  expected ${ids.join(' ')}\n  got      ${got.join(' ')}`);
    assert.equal(tok.decode(got), text, `${name}: decode(encode(${JSON.stringify(text)}))`);
  }
  console.log(`${name}: ${matched}/${vectors.length} reference vectors matched`);
  assert.deepEqual(wrong, [], `${name}: ${wrong.length} vectors differ`);
}

for (const name of ['gpt-2', 'llama-spm', 'mpt', 'refact', 'starcoder']) {
  const file = `tokenizers/ggml-vocab/ggml-vocab-${name}.gguf`;
  test(`GGUF vocab ${name} reproduces the HF reference ids`, {
    skip: skipUnless(file, `${file}.inp`, `${file}.out`),
  }, () => {
    const gguf = readGguf(SHARED + file);
    const tok = tokenizerFromGguf(gguf.metadata, { source: gguf.path });
    gguf.close();
    checkVectors(name, tok);
  });
}

test('Llama 3 tiktoken ranks reproduce the llama-bpe reference ids', {
  skip: skipUnless('tokenizers/llama3-tiktoken/tokenizer.model', 'tokenizers/ggml-vocab/ggml-vocab-llama-bpe.gguf.out'),
}, () => {
  const tok = tokenizerFromTiktoken(`${SHARED}tokenizers/llama3-tiktoken/tokenizer.model`, llama3TiktokenOptions());
  assert.equal(tok.vocabSize, 128256);
  assert.equal(tok.bosId, 128000);
  assert.deepEqual([...tok.eosIds].sort(), [128001, 128008, 128009]);
  checkVectors('llama-bpe', tok);
  // Specials written in text are parsed; BOS comes from add_bos.
  assert.deepEqual(tok.encode('<|start_header_id|>user<|end_header_id|>'), [128000, 128006, 882, 128007]);
});

test('Llama 2 SentencePiece .model reproduces the llama-spm reference ids', {
  skip: skipUnless('tokenizers/llama2-spm/tokenizer.model', 'tokenizers/ggml-vocab/ggml-vocab-llama-spm.gguf.out'),
}, () => {
  const tok = tokenizerFromSentencePieceModel(`${SHARED}tokenizers/llama2-spm/tokenizer.model`);
  assert.equal(tok.vocabSize, 32000);
  assert.equal(tok.bosId, 1);
  assert.equal(tok.eosId, 2);
  assert.equal(tok.addBos, true);
  checkVectors('llama-spm', tok);
  assert.deepEqual(tok.encode('Hello world'), [1, 15043, 3186]);
});

test('a GGUF-style llama-bpe vocabulary (tokens + merges + pre) reproduces the llama-bpe reference ids', {
  skip: skipUnless('tokenizers/llama3-tiktoken/tokenizer.model', 'tokenizers/ggml-vocab/ggml-vocab-llama-bpe.gguf.out'),
}, () => {
  // The llama-bpe GGUF is not in ../shared; rebuild its metadata from the same vocabulary, as llama.cpp's
  // converter writes it: tokens by id, merges as "left right", specials as control tokens, pre 'llama-bpe'.
  const ranks = readTiktokenRanks(`${SHARED}tokenizers/llama3-tiktoken/tokenizer.model`);
  const specials = llama3SpecialTokens().map((content, i) => ({ content, id: 128000 + i }));
  const json = tiktokenJson(ranks, LLAMA3_PATTERN, specials);
  const tokens = new Array<string>(128256);
  for (const [t, id] of Object.entries(json.model.vocab as Record<string, number>)) tokens[id] = t;
  for (const s of specials) tokens[s.id] = s.content;
  const tok = tokenizerFromGguf(
    {
      'tokenizer.ggml.model': 'gpt2',
      'tokenizer.ggml.pre': 'llama-bpe',
      'tokenizer.ggml.tokens': tokens,
      'tokenizer.ggml.token_type': tokens.map((_, i) => (i >= 128000 ? 3 : 1)),
      'tokenizer.ggml.merges': (json.model.merges as [string, string][]).map(([a, b]) => `${a} ${b}`),
      'tokenizer.ggml.bos_token_id': 128000,
      'tokenizer.ggml.eos_token_id': 128009,
    },
    { source: 'llama-bpe (rebuilt)' },
  );
  assert.equal(tok.addBos, true); // llama.cpp's default for the llama3 pre-tokenizers
  assert.ok(tok.eosIds.has(128009) && tok.eosIds.has(128008) && tok.eosIds.has(128001));
  checkVectors('llama-bpe', tok);
});
