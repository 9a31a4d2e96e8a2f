// The TinyStories tok512 tokenizer two ways: inside stories260K.gguf and as the SentencePiece tok512.model.
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';
import { FormatError } from '../../src/core/errors.ts';
import { readGguf } from '../../src/formats/gguf.ts';
import { loadTokenizer } from '../../src/tokenize/hf.ts';
import { parseSentencePieceModel, tokenizerFromSentencePieceModel } from '../../src/tokenize/spm.ts';
import { SHARED, skipUnless } from './shared-data.ts';

const GGUF = 'models/stories260K/stories260K.gguf';
const TOK512 = 'tokenizers/tok512/tok512.model';

// The first 40 ids stories260K generates greedily from BOS (../shared/models/stories260K/PROVENANCE.md).
const GENERATED = [
  403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338, 401, 396, 267, 337, 410, 408, 419,
  292, 411, 322, 265, 282, 295, 433, 426, 385, 328, 432, 358, 394, 261, 370, 432, 352,
];

test('stories260K.gguf tokenizer encodes and decodes TinyStories text', { skip: skipUnless(GGUF) }, () => {
  const tok = loadTokenizer(SHARED + GGUF);
  assert.equal(tok.vocabSize, 512);
  assert.equal(tok.bosId, 1);
  assert.deepEqual([...tok.eosIds], [2]);
  assert.equal(tok.padId, null); // stored as 0xFFFFFFFF: no pad token
  assert.equal(tok.addBos, true);
  assert.deepEqual(tok.encode('Once upon a time'), [1, 403, 407, 261, 378]);
  const text = tok.decode(GENERATED);
  assert.ok(
    text.startsWith('Once upon a time, there was a little girl named Lily. She loved to play outside in the park.'),
    text,
  );
  assert.deepEqual(tok.encode(text, { addSpecialTokens: false }), GENERATED);
  // Characters outside the 512 pieces go through byte fallback and come back whole.
  const odd = 'Tom said “hi” — 日本 🙂\n\tbye';
  const ids = tok.encode(odd, { addSpecialTokens: false });
  assert.ok(
    ids.some((id) => id >= 3 && id <= 258),
    'byte-fallback tokens',
  );
  assert.equal(tok.decode(ids), odd);
  assert.equal(tok.decode([1, ...ids, 2], { skipSpecialTokens: true }), odd);
});

test('tok512.model has the same pieces as stories260K.gguf and tokenizes the same', {
  skip: skipUnless(GGUF, TOK512),
}, () => {
  const proto = parseSentencePieceModel(readFileSync(SHARED + TOK512), TOK512);
  const gguf = readGguf(SHARED + GGUF);
  const meta = gguf.metadata;
  gguf.close();
  assert.equal(proto.modelType, 2);
  assert.equal(proto.byteFallback, true);
  assert.deepEqual(proto.pieces, meta['tokenizer.ggml.tokens']);
  assert.deepEqual([...proto.types], meta['tokenizer.ggml.token_type']);
  assert.deepEqual([...proto.scores], meta['tokenizer.ggml.scores']);
  const fromModel = tokenizerFromSentencePieceModel(SHARED + TOK512);
  const fromGguf = loadTokenizer(SHARED + GGUF);
  const text = fromGguf.decode(GENERATED);
  assert.deepEqual(fromModel.encode(text), fromGguf.encode(text));
  assert.deepEqual(fromModel.encode('Once upon a time', { addSpecialTokens: false }), [403, 407, 261, 378]);
  // The .model keeps SentencePiece's remove_extra_whitespaces (on by default, not overridden in tok512).
  assert.deepEqual(fromModel.encode('  Once  upon a time ', { addSpecialTokens: false }), [403, 407, 261, 378]);
});

test('a file that is not a SentencePiece model is a FormatError', () => {
  assert.throws(() => parseSentencePieceModel(new Uint8Array([0x0a, 0x50, 0x01]), 'bad.model'), FormatError);
  assert.throws(() => parseSentencePieceModel(new Uint8Array([]), 'empty.model'), /no pieces/);
  assert.throws(() => parseSentencePieceModel(new TextEncoder().encode('hello world\n'), 'text.model'), FormatError);
});
