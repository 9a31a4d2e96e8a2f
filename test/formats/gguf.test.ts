import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { after, describe, test } from 'node:test';
import { DTypeError, FormatError, ShapeError } from '../../src/core/errors.ts';
import {
  type GgufFile,
  type GgufTypeSpec,
  type GgufValue,
  parseGguf,
  readGguf,
  serializeGguf,
  writeGguf,
  writeGgufSync,
} from '../../src/formats/gguf.ts';
import { dequantize, ggmlType, quantizeQ4_0, quantizeQ8_0 } from '../../src/formats/gguf-quants.ts';

const SHARED = path.resolve(import.meta.dirname, '../../../shared');
const STORIES = path.join(SHARED, 'models/stories260K/stories260K.gguf');
const VOCAB_DIR = path.join(SHARED, 'tokenizers/ggml-vocab');
const noStories = fs.existsSync(STORIES) ? false : `${STORIES} is absent (../shared reference data not checked out)`;
const noVocab = fs.existsSync(VOCAB_DIR) ? false : `${VOCAB_DIR} is absent (../shared reference data not checked out)`;
if (noStories) console.log(`skipping stories260K GGUF tests: ${noStories}`);
if (noVocab) console.log(`skipping vocab GGUF tests: ${noVocab}`);

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'lowrank-gguf-'));
after(() => fs.rmSync(tmp, { recursive: true, force: true }));

function bitsEqual(a: Float32Array, b: Float32Array): boolean {
  return (
    Buffer.compare(
      Buffer.from(a.buffer, a.byteOffset, a.byteLength),
      Buffer.from(b.buffer, b.byteOffset, b.byteLength),
    ) === 0
  );
}

function expectFormatError(bytes: Uint8Array, ...mustInclude: string[]): void {
  assert.throws(
    () => parseGguf(bytes, 'bad.gguf'),
    (e: unknown) => {
      assert.ok(e instanceof FormatError, `expected FormatError, got ${e}`);
      assert.ok(e.message.startsWith('bad.gguf: '), e.message);
      for (const s of mustInclude) assert.ok(e.message.includes(s), `"${s}" not in: ${e.message}`);
      return true;
    },
  );
}

describe('GGUF: stories260K (a real llama.cpp file)', { skip: noStories }, () => {
  test('header, metadata and tensors match PROVENANCE.md', () => {
    const f = readGguf(STORIES);
    try {
      assert.equal(f.version, 3);
      assert.equal(f.tensors.length, 48);
      assert.equal(Object.keys(f.metadata).length, 19);
      assert.equal(f.dataOffset, 14176);
      assert.equal(f.alignment, 32);
      const m = f.metadata;
      assert.equal(m['general.architecture'], 'llama');
      assert.equal(m['general.name'], 'llama');
      assert.equal(m['llama.embedding_length'], 64);
      assert.equal(m['llama.feed_forward_length'], 172);
      assert.equal(m['llama.block_count'], 5);
      assert.equal(m['llama.attention.head_count'], 8);
      assert.equal(m['llama.attention.head_count_kv'], 4);
      assert.equal(m['llama.rope.dimension_count'], 8);
      assert.equal(m['llama.context_length'], 2048);
      assert.equal(m['llama.attention.layer_norm_rms_epsilon'], Math.fround(1e-5));
      assert.equal(f.metadataTypes['llama.block_count'], 'u32');
      assert.equal(f.metadataTypes['llama.attention.layer_norm_rms_epsilon'], 'f32');
      assert.equal(m['llama.rope.freq_base'], undefined);
      assert.equal(m['tokenizer.ggml.model'], 'llama');
      const tokens = m['tokenizer.ggml.tokens'] as string[];
      const scores = m['tokenizer.ggml.scores'] as number[];
      assert.equal(tokens.length, 512);
      assert.equal((m['tokenizer.ggml.token_type'] as number[]).length, 512);
      assert.deepEqual(f.metadataTypes['tokenizer.ggml.tokens'], { array: 'string' });
      assert.deepEqual(tokens.slice(0, 4), ['<unk>', '<s>', '</s>', '<0x00>']);
      assert.equal(tokens[258], '<0xFF>');
      assert.deepEqual(tokens.slice(259, 262), ['▁t', 'he', '▁a']);
      assert.deepEqual([scores[259], scores[260], scores[511]], [-0, -1, -252]); // written as -0.0 by the converter
      assert.equal(m['tokenizer.ggml.unknown_token_id'], 0);
      assert.equal(m['tokenizer.ggml.bos_token_id'], 1);
      assert.equal(m['tokenizer.ggml.eos_token_id'], 2);

      const emb = f.tensor('token_embd.weight');
      assert.deepEqual(emb.shape, [512, 64]);
      assert.deepEqual(emb.ggmlDims, [64, 512]);
      assert.equal(emb.type.name, 'F32');
      assert.deepEqual(f.tensor('blk.0.attn_k.weight').shape, [32, 64]);
      assert.deepEqual(f.tensor('blk.4.ffn_down.weight').shape, [64, 172]);
      assert.deepEqual(f.tensor('blk.4.ffn_up.weight').shape, [172, 64]);
      assert.deepEqual(f.tensor('output_norm.weight').shape, [64]);
      assert.throws(() => f.tensor('nope'), FormatError);

      let total = 0;
      for (const t of f.tensors) {
        assert.equal(t.type.name, 'F32');
        assert.equal(t.offset % 32, 0);
        const v = f.readTensorF32(t);
        assert.equal(v.length, t.numel);
        assert.ok(v.every(Number.isFinite), t.name);
        total += v.length;
      }
      assert.equal(total, 292_800);
      // the tied classifier is stored twice, bit for bit
      assert.ok(bitsEqual(f.readTensorF32('token_embd.weight'), f.readTensorF32('output.weight')));
    } finally {
      f.close();
    }
  });

  test('round trip: write back with the read types, read again: bit-exact, and byte-identical to the original', async () => {
    const f = readGguf(STORIES);
    const out = path.join(tmp, 'stories-copy.gguf');
    await writeGguf(out, {
      metadata: f.metadata,
      types: f.metadataTypes,
      tensors: f.tensors.map((t) => ({ name: t.name, shape: t.shape, type: 'F32', data: () => f.readTensorF32(t) })),
    });
    const g = readGguf(out);
    try {
      assert.deepEqual(g.metadata, f.metadata);
      assert.deepEqual(g.metadataTypes, f.metadataTypes);
      assert.deepEqual(
        g.tensors.map((t) => [t.name, t.shape, t.offset]),
        f.tensors.map((t) => [t.name, t.shape, t.offset]),
      );
      for (const t of f.tensors) assert.ok(bitsEqual(f.readTensorF32(t), g.readTensorF32(t.name)), t.name);
      assert.ok(fs.readFileSync(out).equals(fs.readFileSync(STORIES)), 'the copy is byte-identical');
    } finally {
      f.close();
      g.close();
    }
  });
});

const VOCABS: [string, string, number, number | null][] = [
  ['ggml-vocab-llama-spm.gguf', 'llama', 32000, null],
  ['ggml-vocab-gpt-2.gguf', 'gpt2', 50257, 50000],
  ['ggml-vocab-mpt.gguf', 'gpt2', 50432, 50009],
  ['ggml-vocab-refact.gguf', 'gpt2', 49216, 48891],
  ['ggml-vocab-starcoder.gguf', 'gpt2', 49152, 48872],
];

describe('GGUF: llama.cpp vocab-only files', { skip: noVocab }, () => {
  for (const [file, model, nTokens, nMerges] of VOCABS) {
    test(`${file}: vocabulary metadata, and a byte-identical rewrite`, () => {
      const p = path.join(VOCAB_DIR, file);
      const f = readGguf(p);
      try {
        assert.equal(f.version, 3);
        assert.equal(f.tensors.length, 0);
        assert.equal(f.metadata['tokenizer.ggml.model'], model);
        assert.equal((f.metadata['tokenizer.ggml.tokens'] as string[]).length, nTokens);
        if (nMerges !== null) assert.equal((f.metadata['tokenizer.ggml.merges'] as string[]).length, nMerges);
        const copy = serializeGguf({ metadata: f.metadata, types: f.metadataTypes, tensors: [] });
        assert.ok(Buffer.from(copy).equals(fs.readFileSync(p)));
      } finally {
        f.close();
      }
    });
  }

  test('a token that is U+FEFF keeps it (no BOM stripping)', () => {
    const f = readGguf(path.join(VOCAB_DIR, 'ggml-vocab-llama-spm.gguf'));
    assert.ok((f.metadata['tokenizer.ggml.tokens'] as string[]).includes('\ufeff'));
    f.close();
  });
});

describe('GGUF writer', () => {
  test('metadata types: inferred as gguf-py does, explicit, nested, 64-bit', () => {
    const metadata: Record<string, GgufValue | { type: GgufTypeSpec; value: GgufValue }> = {
      s: 'héllo',
      b: true,
      i: -7,
      big: 2 ** 40,
      f: 0.5,
      bi: 2n ** 63n + 5n,
      neg64: -(2n ** 62n),
      'arr.i': [1, 2, 3],
      'arr.f': [1, 2.5],
      'arr.s': ['a', '', 'ü'],
      'arr.b': [true, false],
      nested: [[1, 2], [3]],
      u8: { type: 'u8', value: 255 },
      i8: { type: 'i8', value: -128 },
      u16: { type: 'u16', value: 65535 },
      i16: { type: 'i16', value: -32768 },
      u32: { type: 'u32', value: 4294967295 },
      f64: { type: 'f64', value: Math.PI },
      u64: { type: 'u64', value: 2n ** 64n - 1n },
      i64small: { type: 'i64', value: -3 },
      empty: { type: { array: 'i32' }, value: [] },
      'arr.u16': { type: { array: 'u16' }, value: [1, 65535] },
      'arr.u64': { type: { array: 'u64' }, value: [1n, 2n ** 60n] },
      ['__proto__']: 'kept as a key',
    };
    const f = parseGguf(serializeGguf({ metadata, tensors: [] }));
    const m = f.metadata;
    const t = f.metadataTypes;
    assert.deepEqual(Object.keys(m), Object.keys(metadata));
    assert.deepEqual([m.s, t.s], ['héllo', 'string']);
    assert.deepEqual([m.b, t.b], [true, 'bool']);
    assert.deepEqual([m.i, t.i], [-7, 'i32']);
    assert.deepEqual([m.big, t.big], [2 ** 40, 'i64']);
    assert.deepEqual([m.f, t.f], [0.5, 'f32']);
    assert.deepEqual([m.bi, t.bi], [2n ** 63n + 5n, 'u64']);
    assert.deepEqual([m.neg64, t.neg64], [-(2n ** 62n), 'i64']);
    assert.deepEqual([m['arr.i'], t['arr.i']], [[1, 2, 3], { array: 'i32' }]);
    assert.deepEqual([m['arr.f'], t['arr.f']], [[1, 2.5], { array: 'f32' }]);
    assert.deepEqual([m['arr.s'], t['arr.s']], [['a', '', 'ü'], { array: 'string' }]);
    assert.deepEqual([m['arr.b'], t['arr.b']], [[true, false], { array: 'bool' }]);
    assert.deepEqual([m.nested, t.nested], [[[1, 2], [3]], { array: { array: 'i32' } }]);
    for (const k of ['u8', 'i8', 'u16', 'i16', 'u32', 'f64', 'u64']) {
      assert.equal(t[k], k);
      assert.equal(m[k], (metadata[k] as { value: GgufValue }).value);
    }
    assert.deepEqual([m.i64small, t.i64small], [-3, 'i64']);
    assert.deepEqual([m.empty, t.empty], [[], { array: 'i32' }]);
    assert.deepEqual(m['arr.u16'], [1, 65535]);
    assert.deepEqual(m['arr.u64'], [1, 2n ** 60n]);
    assert.equal(Object.getOwnPropertyDescriptor(m, '__proto__')?.value, 'kept as a key');
    assert.equal(Object.getPrototypeOf(m), Object.prototype);
  });

  test('bad metadata for the writer is a FormatError', () => {
    const bad = (metadata: Record<string, unknown>, re: RegExp) =>
      assert.throws(
        () => serializeGguf({ metadata: metadata as never, tensors: [] }),
        (e: unknown) => e instanceof FormatError && re.test(e.message),
      );
    bad({ e: [] }, /empty array/);
    bad({ mix: [1, 'a'] }, /one type/);
    bad({ x: { type: 'u8', value: 256 } }, /not a valid u8/);
    bad({ x: { type: 'u32', value: -1 } }, /not a valid u32/);
    bad({ x: { type: 'i32', value: 1.5 } }, /not a valid i32/);
    bad({ x: { type: 'string', value: 3 } }, /not a valid string/);
    bad({ x: { type: 'u64', value: -1n } }, /not a valid u64/);
    bad({ x: { type: 'nope', value: 1 } }, /unknown GGUF type/);
    bad({ x: { type: 'constructor', value: 1 } }, /unknown GGUF type/);
    bad({ x: { type: { array: 'u8' }, value: 3 } }, /array/);
    bad({ 'general.alignment': 64 }, /u32/);
  });

  test('tensors: F32/F16/BF16/Q8_0/Q4_0/raw bytes, custom alignment, streaming and atomic write', async () => {
    const n = 64;
    const x = Float32Array.from({ length: 2 * n }, (_, i) => Math.sin(i) * 3);
    const file = path.join(tmp, 'mixed.gguf');
    const q8 = quantizeQ8_0(x);
    await writeGguf(file, {
      metadata: { 'general.architecture': 'test' },
      alignment: 64,
      tensors: [
        { name: 'a.f32', shape: [2, n], type: 'F32', data: x },
        { name: 'a.f16', shape: [2, n], type: 'F16', data: x },
        { name: 'a.bf16', shape: [2, n], type: 'BF16', data: async () => x },
        { name: 'a.q8', shape: [2, n], type: 'Q8_0', data: x },
        { name: 'a.q4', shape: [2, n], type: 'Q4_0', data: x },
        { name: 'a.raw', shape: [2, n], type: ggmlType('Q8_0')!, data: q8 },
        { name: 'scalar', shape: [], type: 'F32', data: new Float32Array([5]) },
        { name: 'bits', shape: [3], type: 'F16', data: new Uint16Array([0x3c00, 0xc000, 0]) },
      ],
    });
    const f = readGguf(file);
    try {
      assert.equal(f.alignment, 64);
      assert.equal(f.metadata['general.alignment'], 64);
      assert.equal(f.metadataTypes['general.alignment'], 'u32');
      for (const t of f.tensors) assert.equal(t.offset % 64, 0, t.name);
      assert.ok(bitsEqual(f.readTensorF32('a.f32'), x));
      const maxErr = (name: string) => {
        const y = f.readTensorF32(name);
        return Math.max(...y.map((v, i) => Math.abs(v - x[i]!)));
      };
      assert.ok(maxErr('a.f16') < 2e-3);
      assert.ok(maxErr('a.bf16') < 2e-2);
      assert.ok(maxErr('a.q8') < 3 / 127);
      assert.ok(maxErr('a.q4') < 3 / 8 + 1e-6);
      assert.deepEqual(f.readTensorBytes('a.raw'), q8);
      assert.deepEqual(f.readTensorBytes('a.q8'), q8);
      assert.deepEqual(f.tensor('a.q4').type.name, 'Q4_0');
      assert.deepEqual(f.tensor('scalar').shape, []);
      assert.deepEqual([...f.readTensorF32('scalar')], [5]);
      assert.deepEqual([...f.readTensorF32('bits')], [1, -2, 0]);
    } finally {
      f.close();
    }

    const before = fs.readFileSync(file);
    const errs: [unknown, RegExp | (new (...a: never[]) => Error)][] = [
      [[{ name: 'x', shape: [2], type: 'F32', data: new Float32Array(3) }], ShapeError],
      [[{ name: 'x', shape: [30], type: 'Q8_0', data: new Float32Array(30) }], /block size 32/],
      [[{ name: 'x', shape: [32], type: 'Q4_K', data: new Float32Array(32) }], /block size 256/],
      [[{ name: 'x', shape: [256], type: 'Q4_K', data: new Float32Array(256) }], /f32 data can be written as/],
      [[{ name: 'x', shape: [2], type: 'F32', data: new Uint8Array(4) }], ShapeError],
      [[{ name: 'x'.repeat(64), shape: [1], type: 'F32', data: new Float32Array(1) }], /at most 63/],
      [[{ name: 'x', shape: [1, 1, 1, 1, 1], type: 'F32', data: new Float32Array(1) }], /at most 4/],
      [[{ name: 'x', shape: [1], type: 'NOPE', data: new Float32Array(1) }], /unknown ggml type/],
      [
        [
          { name: 'x', shape: [1], type: 'F32', data: new Float32Array(1) },
          { name: 'x', shape: [1], type: 'F32', data: new Float32Array(1) },
        ],
        /twice/,
      ],
    ];
    for (const [tensors, want] of errs) {
      await assert.rejects(writeGguf(file, { metadata: {}, tensors: tensors as never }), want as RegExp);
    }
    assert.ok(fs.readFileSync(file).equals(before), 'failed writes leave the old file');
    assert.deepEqual(
      fs.readdirSync(tmp).filter((p) => p.endsWith('.tmp')),
      [],
    );

    writeGgufSync(file, {
      metadata: {},
      tensors: [{ name: 'y', shape: [1], type: 'F32', data: new Float32Array([2]) }],
    });
    assert.deepEqual([...readGguf(file).readTensorF32('y')], [2]);
  });
});

/** Minimal GGUF bytes with one F32 tensor [1, 8] and no metadata; returns the bytes and field offsets. */
function oneTensorFile(): { bytes: Uint8Array; at: Record<string, number> } {
  const bytes = serializeGguf({
    metadata: {},
    tensors: [{ name: 'w', shape: [1, 8], type: 'F32', data: new Float32Array(8) }],
  });
  // 24-byte header, then name (8 + 1), n_dims (4), dims (16), type (4), offset (8)
  return {
    bytes,
    at: { version: 4, nTensors: 8, nKv: 16, nameLen: 24, nDims: 33, dim0: 37, dim1: 45, type: 53, offset: 57 },
  };
}

describe('GGUF reader validation', () => {
  const patch = (b: Uint8Array, fn: (dv: DataView) => void) => {
    const c = b.slice();
    fn(new DataView(c.buffer));
    return c;
  };

  test('the minimal file parses', () => {
    const { bytes, at } = oneTensorFile();
    const f = parseGguf(bytes);
    assert.equal(f.dataOffset, 96);
    assert.equal(f.tensors[0]!.offset, 96);
    assert.equal(new DataView(bytes.buffer).getUint32(at.nDims, true), 2);
  });

  test('bad magic, versions, counts and lengths', () => {
    const { bytes, at } = oneTensorFile();
    expectFormatError(new Uint8Array(4), 'too small');
    expectFormatError(Buffer.from('GGML\x03\x00\x00\x00'.padEnd(40, '\0')), 'not a GGUF file', 'GGML');
    expectFormatError(
      patch(bytes, (d) => d.setUint32(at.version!, 1, true)),
      'version 1',
    );
    expectFormatError(
      patch(bytes, (d) => d.setUint32(at.version!, 4, true)),
      'unsupported GGUF version 4',
    );
    expectFormatError(
      patch(bytes, (d) => d.setUint32(at.version!, 3, false)),
      'big-endian',
    );
    assert.equal(parseGguf(patch(bytes, (d) => d.setUint32(at.version!, 2, true))).version, 2);
    expectFormatError(
      patch(bytes, (d) => d.setBigUint64(at.nTensors!, 2n ** 62n, true)),
      'tensor_count',
    );
    expectFormatError(
      patch(bytes, (d) => d.setBigUint64(at.nKv!, 2n ** 64n - 1n, true)),
      'kv_count',
    );
    expectFormatError(
      patch(bytes, (d) => d.setBigUint64(at.nameLen!, 2n ** 40n, true)),
      'the length of the name of tensor #0',
    );
    expectFormatError(bytes.subarray(0, 50), 'unexpected end of file', 'tensor "w"');
    expectFormatError(bytes.subarray(0, 100), 'runs past the end', 'truncated');
  });

  test('bad tensor infos', () => {
    const { bytes, at } = oneTensorFile();
    expectFormatError(
      patch(bytes, (d) => d.setUint32(at.nDims!, 5, true)),
      'tensor "w"',
      '5 dimensions',
    );
    expectFormatError(
      patch(bytes, (d) => d.setUint32(at.type!, 4, true)),
      'tensor "w"',
      'unknown ggml type 4',
    );
    expectFormatError(
      patch(bytes, (d) => d.setUint32(at.type!, 1000, true)),
      'unknown ggml type 1000',
    );
    expectFormatError(
      patch(bytes, (d) => d.setUint32(at.type!, 8, true)),
      'not a multiple of the Q8_0 block size 32',
    );
    expectFormatError(
      patch(bytes, (d) => d.setBigUint64(at.offset!, 8n, true)),
      'not a multiple of the alignment 32',
    );
    expectFormatError(
      patch(bytes, (d) => d.setBigUint64(at.offset!, 2n ** 63n, true)),
      'beyond the file',
    );
    expectFormatError(
      patch(bytes, (d) => d.setBigUint64(at.offset!, 64n, true)),
      'runs past the end',
    );
    expectFormatError(
      patch(bytes, (d) => d.setBigUint64(at.dim1!, 2n ** 60n, true)),
      'too large',
    );
    expectFormatError(
      patch(bytes, (d) => d.setBigUint64(at.dim1!, 2n ** 50n, true)),
      'too many elements',
    );
    // two tensors at the same offset overlap
    const two = serializeGguf({
      metadata: {},
      tensors: [
        { name: 'a', shape: [8], type: 'F32', data: new Float32Array(8) },
        { name: 'b', shape: [8], type: 'F32', data: new Float32Array(8) },
      ],
    });
    const bOffset = 24 + 9 + 4 + 8 + 4 + 8 + 9 + 4 + 8 + 4;
    expectFormatError(
      patch(two, (d) => d.setBigUint64(bOffset, 0n, true)),
      'overlaps',
    );
    const dup = serializeGguf({
      metadata: {},
      tensors: [
        { name: 'a', shape: [8], type: 'F32', data: new Float32Array(8) },
        { name: 'c', shape: [8], type: 'F32', data: new Float32Array(8) },
      ],
    });
    expectFormatError(
      patch(dup, (d) => d.setUint8(24 + 8 + 1 + 4 + 8 + 4 + 8 + 8, 'a'.charCodeAt(0))),
      'tensor "a" appears twice',
    );
  });

  test('bad metadata', () => {
    const one = (metadata: Record<string, unknown>) => serializeGguf({ metadata: metadata as never, tensors: [] });
    const typeAt = 24 + 8 + 1; // key "k"
    expectFormatError(
      patch(one({ k: 1 }), (d) => d.setUint32(typeAt, 13, true)),
      'unknown value type 13',
    );
    expectFormatError(
      patch(one({ k: [1, 2] }), (d) => d.setUint32(typeAt + 4, 99, true)),
      'unknown value type 99',
    );
    expectFormatError(
      patch(one({ k: [1, 2] }), (d) => d.setBigUint64(typeAt + 8, 2n ** 40n, true)),
      'the length of metadata "k"',
    );
    expectFormatError(
      patch(one({ k: 'abc' }), (d) => d.setBigUint64(typeAt + 4, 1000n, true)),
      'metadata "k"',
    );
    const dupKey = one({ k: 1, j: 2 });
    expectFormatError(
      patch(dupKey, (d) => d.setUint8(24 + 8 + 1 + 4 + 4 + 8, 'k'.charCodeAt(0))),
      '"k" appears twice',
    );
    // the writer refuses bad alignments, so make them by patching a valid file
    const keyEnd = 24 + 8 + 'general.alignment'.length;
    expectFormatError(
      patch(one({ 'general.alignment': { type: 'u32', value: 64 } }), (d) => d.setUint32(keyEnd + 4, 48, true)),
      'power of two',
    );
    expectFormatError(
      patch(one({ 'general.alignment': { type: 'u32', value: 64 } }), (d) => d.setUint32(keyEnd + 4, 0, true)),
      'power of two',
    );
    const u64Align = one({ 'general.alignmenX': { type: 'u64', value: 64 } });
    expectFormatError(
      patch(u64Align, (d) => d.setUint8(keyEnd - 1, 't'.charCodeAt(0))),
      'general.alignment must be a u32',
    );
    // arrays nested deeper than the limit
    let deep: GgufValue = [1];
    for (let i = 0; i < 9; i++) deep = [deep];
    expectFormatError(one({ k: deep }), 'deeper');
  });

  test('readTensorF32 on a type without a dequantizer is a DTypeError naming the type', () => {
    const f: GgufFile = parseGguf(
      serializeGguf({ metadata: {}, tensors: [{ name: 'q', shape: [256], type: 'Q5_K', data: new Uint8Array(176) }] }),
    );
    assert.throws(
      () => f.readTensorF32('q'),
      (e: unknown) => e instanceof DTypeError && /Q5_K/.test(e.message),
    );
    assert.equal(f.readTensorBytes('q').byteLength, 176);
  });
});

describe('ggml quantization', () => {
  test('type table', () => {
    assert.deepEqual(ggmlType('Q4_K'), { id: 12, name: 'Q4_K', blockSize: 256, typeSize: 144 });
    assert.deepEqual(ggmlType(14), { id: 14, name: 'Q6_K', blockSize: 256, typeSize: 210 });
    assert.equal(ggmlType('bf16')!.id, 30);
    assert.equal(ggmlType(4), undefined);
  });

  test('Q8_0: exact when max|x| is 127 and x are integers; error bound otherwise', () => {
    const x = Float32Array.from({ length: 32 }, (_, i) => i * 4 - 61);
    x[5] = 127;
    const q = quantizeQ8_0(x);
    assert.equal(q.byteLength, 34);
    assert.deepEqual([q[0], q[1]], [0x00, 0x3c]); // d = 1.0 as f16
    assert.ok(bitsEqual(dequantize(ggmlType('Q8_0')!, q, 32), x));
    // rounding is half away from zero, as roundf: d = 1, so 2.5 -> 3 and -2.5 -> -3
    const h = new Float32Array(32);
    h[0] = 127;
    h[1] = 2.5;
    h[2] = -2.5;
    const qh = new Int8Array(quantizeQ8_0(h).buffer);
    assert.deepEqual([qh[3], qh[4]], [3, -3]);
    const r = Float32Array.from({ length: 96 }, (_, i) => Math.cos(i * 0.37) * (i % 7));
    const y = dequantize(ggmlType('Q8_0')!, quantizeQ8_0(r), 96);
    for (let b = 0; b < 3; b++) {
      const amax = Math.max(...r.subarray(b * 32, b * 32 + 32).map(Math.abs));
      for (let i = b * 32; i < b * 32 + 32; i++) assert.ok(Math.abs(y[i]! - r[i]!) <= (amax / 127) * 0.5 + 1e-3);
    }
    assert.throws(() => quantizeQ8_0(new Float32Array(33)), ShapeError);
  });

  test('Q4_0: exact for integers in [-8, 7] with -8 present; zero block', () => {
    const x = Float32Array.from({ length: 32 }, (_, i) => (i % 16) - 8);
    const q = quantizeQ4_0(x);
    assert.equal(q.byteLength, 18);
    assert.deepEqual([q[0], q[1]], [0x00, 0x3c]); // d = -8 / -8 = 1
    assert.equal(q[2], 0x00); // x[0] = -8 -> 0, x[16] = -8 -> 0
    assert.equal(q[3], 0x11);
    assert.ok(bitsEqual(dequantize(ggmlType('Q4_0')!, q, 32), x));
    const z = dequantize(ggmlType('Q4_0')!, quantizeQ4_0(new Float32Array(32)), 32);
    assert.ok(z.every((v) => v === 0));
  });

  test('Q4_K: blocks packed as quantize_row_q4_K_ref packs them decode to d*sc*q - dmin*m', () => {
    const rnd = mulberry32(7);
    const nb = 2;
    const bytes = new Uint8Array(nb * 144);
    const want = new Float32Array(nb * 256);
    for (let b = 0; b < nb; b++) {
      const o = b * 144;
      const [d, dmin] = b === 0 ? [0.5, 0.25] : [0.125, 2];
      bytes.set(f16pair(d), o);
      bytes.set(f16pair(dmin), o + 2);
      const ls = Array.from({ length: 8 }, () => Math.floor(rnd() * 64));
      const lm = Array.from({ length: 8 }, () => Math.floor(rnd() * 64));
      ls[7] = 63;
      lm[4] = 63;
      const sc = bytes.subarray(o + 4, o + 16);
      for (let j = 0; j < 8; j++) {
        if (j < 4) {
          sc[j] = ls[j]!;
          sc[j + 4] = lm[j]!;
        } else {
          sc[j + 4] = (ls[j]! & 0xf) | ((lm[j]! & 0xf) << 4);
          sc[j - 4]! |= (ls[j]! >> 4) << 6;
          sc[j]! |= (lm[j]! >> 4) << 6;
        }
      }
      const L = Array.from({ length: 256 }, () => Math.floor(rnd() * 16));
      const qs = bytes.subarray(o + 16, o + 144);
      for (let j = 0, q = 0; j < 256; j += 64, q += 32) {
        for (let l = 0; l < 32; l++) qs[q + l] = L[j + l]! | (L[j + l + 32]! << 4);
      }
      for (let i = 0; i < 256; i++) {
        const s = i >> 5;
        want[b * 256 + i] = d * ls[s]! * L[i]! - dmin * lm[s]!;
      }
    }
    assert.ok(bitsEqual(dequantize(ggmlType('Q4_K')!, bytes, nb * 256), want));
  });

  test('Q6_K: blocks packed as quantize_row_q6_K_ref packs them decode to d*scale*(q-32)', () => {
    const rnd = mulberry32(11);
    const nb = 2;
    const bytes = new Uint8Array(nb * 210);
    const want = new Float32Array(nb * 256);
    for (let b = 0; b < nb; b++) {
      const o = b * 210;
      const d = b === 0 ? 0.25 : -0.0625;
      const scales = Int8Array.from({ length: 16 }, () => Math.floor(rnd() * 256) - 128);
      const L = Array.from({ length: 256 }, () => Math.floor(rnd() * 64));
      L[0] = 63;
      L[1] = 0;
      let ql = o;
      let qh = o + 128;
      for (let j = 0; j < 256; j += 128) {
        for (let l = 0; l < 32; l++) {
          const q1 = L[j + l]! & 0xf;
          const q2 = L[j + l + 32]! & 0xf;
          const q3 = L[j + l + 64]! & 0xf;
          const q4 = L[j + l + 96]! & 0xf;
          bytes[ql + l] = q1 | (q3 << 4);
          bytes[ql + l + 32] = q2 | (q4 << 4);
          bytes[qh + l] =
            (L[j + l]! >> 4) |
            ((L[j + l + 32]! >> 4) << 2) |
            ((L[j + l + 64]! >> 4) << 4) |
            ((L[j + l + 96]! >> 4) << 6);
        }
        ql += 64;
        qh += 32;
      }
      bytes.set(new Uint8Array(scales.buffer), o + 192);
      bytes.set(f16pair(d), o + 208);
      for (let i = 0; i < 256; i++) want[b * 256 + i] = d * scales[i >> 4]! * (L[i]! - 32);
    }
    assert.ok(bitsEqual(dequantize(ggmlType('Q6_K')!, bytes, nb * 256), want));
  });

  test('dequantize checks sizes', () => {
    assert.throws(() => dequantize(ggmlType('Q8_0')!, new Uint8Array(33), 32), ShapeError);
    assert.throws(() => dequantize(ggmlType('Q8_0')!, new Uint8Array(34), 31), ShapeError);
  });
});

/** f16 bit pattern bytes of an exactly representable value (powers of two only, enough for these tests). */
function f16pair(v: number): Uint8Array {
  const sign = v < 0 ? 0x8000 : 0;
  const e = Math.log2(Math.abs(v));
  assert.ok(Number.isInteger(e));
  const h = sign | ((e + 15) << 10);
  return new Uint8Array([h & 0xff, h >> 8]);
}

function mulberry32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
