import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { after, describe, test } from 'node:test';
import { FormatError, ShapeError } from '../../src/core/errors.ts';
import {
  deserializeSafetensors,
  f8e4m3ToF32,
  f8e5m2ToF32,
  fromFloat32,
  fromInts,
  loadSafetensors,
  openSafetensors,
  openSafetensorsIndex,
  type RawTensor,
  SAFETENSORS_DTYPES,
  saveSafetensors,
  saveSafetensorsSync,
  serializeSafetensors,
  toBigInt64,
  toFloat32,
  toInt32,
} from '../../src/formats/safetensors.ts';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'lowrank-st-'));
after(() => fs.rmSync(tmp, { recursive: true, force: true }));

function f32bytes(values: number[]): Uint8Array {
  return new Uint8Array(new Float32Array(values).buffer);
}

/** A file from a header object and data bytes, with the header padded as the reference does. */
function rawFile(header: unknown, data: Uint8Array, headerText?: string): Uint8Array {
  const json = Buffer.from(headerText ?? JSON.stringify(header), 'utf8');
  const out = new Uint8Array(8 + json.byteLength + data.byteLength);
  new DataView(out.buffer).setBigUint64(0, BigInt(json.byteLength), true);
  out.set(json, 8);
  out.set(data, 8 + json.byteLength);
  return out;
}

function expectFormatError(bytes: Uint8Array, ...mustInclude: string[]): void {
  assert.throws(
    () => deserializeSafetensors(bytes, 'bad.safetensors'),
    (e: unknown) => {
      assert.ok(e instanceof FormatError, `expected FormatError, got ${e}`);
      assert.ok(e.message.includes('bad.safetensors'), e.message);
      for (const s of mustInclude) assert.ok(e.message.includes(s), `"${s}" not in: ${e.message}`);
      return true;
    },
  );
}

describe('safetensors golden vectors (huggingface/safetensors tensor.rs tests)', () => {
  test('empty file: length 8, {} and 6 spaces', () => {
    assert.deepEqual([...serializeSafetensors({})], [8, 0, 0, 0, 0, 0, 0, 0, 123, 125, 32, 32, 32, 32, 32, 32]);
  });

  test('empty file with metadata {framework: pt}', () => {
    const out = serializeSafetensors({}, { framework: 'pt' });
    // biome-ignore format: reference bytes
    const want = [40, 0, 0, 0, 0, 0, 0, 0, 123, 34, 95, 95, 109, 101, 116, 97, 100, 97, 116, 97, 95, 95, 34, 58, 123, 34,
      102, 114, 97, 109, 101, 119, 111, 114, 107, 34, 58, 34, 112, 116, 34, 125, 125, 32, 32, 32, 32, 32];
    assert.deepEqual([...out], want);
    assert.deepEqual(deserializeSafetensors(out).metadata, { framework: 'pt' });
  });

  test('attn.0 F32 [1,2,3]: header length 64, no padding', () => {
    const out = serializeSafetensors({
      'attn.0': { dtype: 'F32', shape: [1, 2, 3], data: f32bytes([0, 1, 2, 3, 4, 5]) },
    });
    // biome-ignore format: reference bytes
    const want = [64, 0, 0, 0, 0, 0, 0, 0, 123, 34, 97, 116, 116, 110, 46, 48, 34, 58, 123, 34, 100, 116, 121, 112, 101,
      34, 58, 34, 70, 51, 50, 34, 44, 34, 115, 104, 97, 112, 101, 34, 58, 91, 49, 44, 50, 44, 51, 93, 44, 34, 100, 97,
      116, 97, 95, 111, 102, 102, 115, 101, 116, 115, 34, 58, 91, 48, 44, 50, 52, 93, 125, 125, 0, 0, 0, 0, 0, 0, 128,
      63, 0, 0, 0, 64, 0, 0, 64, 64, 0, 0, 128, 64, 0, 0, 160, 64];
    assert.deepEqual([...out], want);
  });

  test('attn0 F32 [1,1,2,3]: header padded with 7 spaces to 72', () => {
    const out = serializeSafetensors({
      attn0: { dtype: 'F32', shape: [1, 1, 2, 3], data: f32bytes([0, 1, 2, 3, 4, 5]) },
    });
    // biome-ignore format: reference bytes
    const want = [72, 0, 0, 0, 0, 0, 0, 0, 123, 34, 97, 116, 116, 110, 48, 34, 58, 123, 34, 100, 116, 121, 112, 101, 34,
      58, 34, 70, 51, 50, 34, 44, 34, 115, 104, 97, 112, 101, 34, 58, 91, 49, 44, 49, 44, 50, 44, 51, 93, 44, 34, 100,
      97, 116, 97, 95, 111, 102, 102, 115, 101, 116, 115, 34, 58, 91, 48, 44, 50, 52, 93, 125, 125, 32, 32, 32, 32, 32,
      32, 32, 0, 0, 0, 0, 0, 0, 128, 63, 0, 0, 0, 64, 0, 0, 64, 64, 0, 0, 128, 64, 0, 0, 160, 64];
    assert.deepEqual([...out], want);
  });

  test('order: dtype descending in the reference enum order, then name by bytes', () => {
    const t = (dtype: RawTensor['dtype'], n: number): RawTensor => ({
      dtype,
      shape: [n],
      data: new Uint8Array(n * (dtype === 'F64' || dtype === 'I64' || dtype === 'U64' ? 8 : 4)),
    });
    const out = serializeSafetensors({
      b: t('F32', 1),
      a: t('F32', 2),
      z: t('I64', 1),
      m: t('U64', 1),
      c: t('I32', 3),
      é: t('F32', 1),
      Z: t('F32', 1),
      d: t('F64', 1),
    });
    const n = Number(new DataView(out.buffer).getBigUint64(0, true));
    const header = JSON.parse(Buffer.from(out.subarray(8, 8 + n)).toString());
    assert.deepEqual(Object.keys(header), ['m', 'z', 'd', 'Z', 'a', 'b', 'é', 'c']);
    assert.equal(n % 8, 0);
  });
});

describe('safetensors reading', () => {
  test('all dtypes round trip through a file; lazy info and read', async () => {
    const tensors: Record<string, RawTensor> = {};
    const sizes: Record<string, number> = { F64: 8, I64: 8, U64: 8, F32: 4, I32: 4, U32: 4 };
    for (const dt of SAFETENSORS_DTYPES) {
      const isz = sizes[dt] ?? (['F16', 'BF16', 'I16', 'U16'].includes(dt) ? 2 : 1);
      const shape = [2, 3];
      const data = new Uint8Array(6 * isz).map((_, i) => (i * 37 + dt.length) & 0xff);
      if (dt === 'BOOL') for (let i = 0; i < data.length; i++) data[i] = i & 1;
      tensors[`t.${dt}`] = { dtype: dt, shape, data };
    }
    tensors.scalar = { dtype: 'F32', shape: [], data: f32bytes([7]) };
    tensors.empty = { dtype: 'F16', shape: [0, 5], data: new Uint8Array(0) };
    const file = path.join(tmp, 'all.safetensors');
    await saveSafetensors(file, tensors, { format: 'pt', note: 'ünïcode "q"' });
    assert.deepEqual(
      fs.readFileSync(file),
      Buffer.from(serializeSafetensors(tensors, { format: 'pt', note: 'ünïcode "q"' })),
    );
    const r = openSafetensors(file);
    try {
      assert.deepEqual({ ...r.metadata }, { format: 'pt', note: 'ünïcode "q"' });
      assert.equal(r.names().length, Object.keys(tensors).length);
      for (const [name, t] of Object.entries(tensors)) {
        const info = r.info(name);
        assert.equal(info.dtype, t.dtype);
        assert.deepEqual(info.shape, t.shape);
        assert.equal(info.byteLength, t.data.byteLength);
        assert.equal(info.file, file);
        const got = r.read(name);
        assert.deepEqual(got, { dtype: t.dtype, shape: t.shape, data: t.data });
        assert.equal(got.data.byteOffset, 0);
      }
      // Offsets are absolute and 8-aligned for the first (largest-alignment) tensor.
      assert.equal(r.info(r.names()[0]!).byteOffset % 8, 0);
      assert.throws(
        () => r.read('nope'),
        (e: unknown) => e instanceof FormatError && /no tensor named "nope"/.test(e.message),
      );
    } finally {
      r.close();
    }
    // reading after close reopens the file
    assert.equal(r.read('scalar').data.byteLength, 4);
    r.close();
    assert.deepEqual(loadSafetensors(file).tensors.scalar, tensors.scalar);
  });

  test('streaming save calls data producers (sync and async) and checks their size', async () => {
    const file = path.join(tmp, 'lazy.safetensors');
    let calls = 0;
    await saveSafetensors(file, {
      a: {
        dtype: 'F32',
        shape: [2],
        data: () => {
          calls++;
          return f32bytes([1, 2]);
        },
      },
      b: {
        dtype: 'BF16',
        shape: [3],
        data: async () => {
          calls++;
          return new Uint8Array(6);
        },
      },
    });
    assert.equal(calls, 2);
    assert.deepEqual([...toFloat32(loadSafetensors(file).tensors.a!)], [1, 2]);
    await assert.rejects(
      saveSafetensors(file, { a: { dtype: 'F32', shape: [2], data: () => new Uint8Array(4) } }),
      ShapeError,
    );
    // the failed write left the previous file intact
    assert.deepEqual([...toFloat32(loadSafetensors(file).tensors.a!)], [1, 2]);
    assert.deepEqual(
      fs.readdirSync(tmp).filter((f) => f.endsWith('.tmp')),
      [],
    );
    assert.throws(() => serializeSafetensors({ x: { dtype: 'F32', shape: [3], data: new Uint8Array(8) } }), ShapeError);
    assert.throws(
      () => serializeSafetensors({ __metadata__: { dtype: 'U8', shape: [], data: new Uint8Array(1) } }),
      FormatError,
    );
    saveSafetensorsSync(file, { s: { dtype: 'U8', shape: [1], data: () => new Uint8Array([9]) } });
    assert.deepEqual([...loadSafetensors(file).tensors.s!.data], [9]);
  });

  test('validation errors are FormatErrors naming the file and tensor', () => {
    const d24 = new Uint8Array(24);
    const ok = { a: { dtype: 'F32', shape: [2, 3], data_offsets: [0, 24] } };
    assert.doesNotThrow(() => deserializeSafetensors(rawFile(ok, d24)));
    expectFormatError(new Uint8Array(5), 'too small');
    const huge = new Uint8Array(16);
    new DataView(huge.buffer).setBigUint64(0, 100_000_001n, true);
    expectFormatError(huge, 'over the 100000000-byte limit');
    const past = rawFile(ok, d24);
    new DataView(past.buffer).setBigUint64(0, 1000n, true);
    expectFormatError(past, 'runs past the end');
    expectFormatError(rawFile(null, d24, '{"a": '), 'not valid JSON');
    expectFormatError(rawFile(null, d24, '[1,2]'), 'not a JSON object');
    expectFormatError(rawFile(null, new Uint8Array(0), '\xff\xfe'.padEnd(4)), 'not valid JSON');
    const bad = Buffer.from('{}  ');
    bad[2] = 0xff;
    expectFormatError(rawFile(null, new Uint8Array(0), bad.toString('latin1')), 'not valid');
    expectFormatError(
      rawFile({ a: { dtype: 'F33', shape: [2, 3], data_offsets: [0, 24] } }, d24),
      '"a"',
      'unknown dtype',
    );
    expectFormatError(rawFile({ a: { dtype: 'F32', shape: [-2, -3], data_offsets: [0, 24] } }, d24), '"a"', 'shape');
    expectFormatError(rawFile({ a: { dtype: 'F32', shape: [2.5, 3], data_offsets: [0, 24] } }, d24), '"a"', 'shape');
    expectFormatError(rawFile({ a: { dtype: 'F32', shape: [2, 3], data_offsets: [0] } }, d24), '"a"', 'data_offsets');
    expectFormatError(rawFile({ a: { dtype: 'F32', shape: [2, 3] } }, d24), '"a"', 'missing field data_offsets');
    expectFormatError(
      rawFile({ a: { dtype: 'F32', shape: [2, 3], data_offsets: [0, 20] } }, d24.subarray(0, 20)),
      '"a"',
      'needs 24 bytes',
    );
    expectFormatError(
      rawFile({ a: { dtype: 'F32', shape: [2, 3], data_offsets: [0, 24] } }, new Uint8Array(28)),
      'extra bytes',
    );
    expectFormatError(rawFile(ok, d24.subarray(0, 16)), 'truncated');
    // a hole, and an overlap
    expectFormatError(
      rawFile(
        { a: { dtype: 'U8', shape: [4], data_offsets: [0, 4] }, b: { dtype: 'U8', shape: [4], data_offsets: [8, 12] } },
        new Uint8Array(12),
      ),
      '"b"',
      'contiguous',
    );
    expectFormatError(
      rawFile(
        { a: { dtype: 'U8', shape: [4], data_offsets: [0, 4] }, b: { dtype: 'U8', shape: [4], data_offsets: [2, 6] } },
        new Uint8Array(6),
      ),
      '"b"',
    );
    expectFormatError(rawFile({ __metadata__: { a: 1 } }, new Uint8Array(0)), '__metadata__');
    expectFormatError(
      rawFile({ a: { dtype: 'U8', shape: [2 ** 40, 2 ** 40], data_offsets: [0, 0] } }, new Uint8Array(0)),
      'overflows',
    );
    // out-of-order keys are fine: sorted by offsets, as the reference does
    const swapped = rawFile(
      { b: { dtype: 'U8', shape: [2], data_offsets: [2, 4] }, a: { dtype: 'U8', shape: [2], data_offsets: [0, 2] } },
      new Uint8Array([1, 2, 3, 4]),
    );
    assert.deepEqual([...deserializeSafetensors(swapped).tensors.b!.data], [3, 4]);
  });

  test('a bad file on disk is a FormatError from openSafetensors', () => {
    const file = path.join(tmp, 'trunc.safetensors');
    fs.writeFileSync(file, serializeSafetensors({ a: fromFloat32([1, 2, 3], [3]) }).subarray(0, 30));
    assert.throws(
      () => openSafetensors(file),
      (e: unknown) => e instanceof FormatError && e.message.startsWith(file),
    );
  });
});

describe('safetensors sharded index', () => {
  test('index across shards: names, info, read; errors for missing shards and tensors', async () => {
    const dir = path.join(tmp, 'sharded');
    fs.mkdirSync(dir);
    await saveSafetensors(
      path.join(dir, 'model-00001-of-00002.safetensors'),
      {
        'w.a': fromFloat32([1, 2], [2]),
        'w.b': fromFloat32([3], [1], 'BF16'),
      },
      { format: 'pt' },
    );
    await saveSafetensors(path.join(dir, 'model-00002-of-00002.safetensors'), {
      'w.c': fromFloat32([4, 5, 6], [3], 'F16'),
    });
    const index = {
      metadata: { total_size: 16 },
      weight_map: {
        'w.a': 'model-00001-of-00002.safetensors',
        'w.b': 'model-00001-of-00002.safetensors',
        'w.c': 'model-00002-of-00002.safetensors',
      },
    };
    fs.writeFileSync(path.join(dir, 'model.safetensors.index.json'), JSON.stringify(index));
    for (const target of [dir, path.join(dir, 'model.safetensors.index.json')]) {
      const r = openSafetensorsIndex(target);
      assert.deepEqual(r.names(), ['w.a', 'w.b', 'w.c']);
      assert.deepEqual({ ...r.metadata }, { format: 'pt' });
      assert.equal(r.indexMetadata.total_size, 16);
      assert.deepEqual([...toFloat32(r.read('w.c'))], [4, 5, 6]);
      assert.deepEqual([...toFloat32(r.read('w.b'))], [3]);
      assert.ok(r.info('w.c').file.endsWith('model-00002-of-00002.safetensors'));
      assert.throws(() => r.read('w.z'), FormatError);
      r.close();
    }
    const write = (wm: unknown) =>
      fs.writeFileSync(path.join(dir, 'model.safetensors.index.json'), JSON.stringify({ weight_map: wm }));
    write({ 'w.a': 'model-00002-of-00002.safetensors' });
    assert.throws(
      () => openSafetensorsIndex(dir),
      (e: unknown) => e instanceof FormatError && /no such tensor/.test(e.message),
    );
    write({ 'w.a': 'missing.safetensors' });
    assert.throws(
      () => openSafetensorsIndex(dir),
      (e: unknown) => e instanceof FormatError && /missing/.test(e.message),
    );
    write({ 'w.a': '../escape.safetensors' });
    assert.throws(() => openSafetensorsIndex(dir), FormatError);
    write(['nope']);
    assert.throws(() => openSafetensorsIndex(dir), FormatError);
  });
});

describe('safetensors value codecs', () => {
  test('f32 <-> f16 / bf16 / f32 and f64', () => {
    const vals = [0, -0, 1, -2.5, 65504, 1e-7, 3.140625, Number.POSITIVE_INFINITY];
    assert.deepEqual([...toFloat32(fromFloat32(vals, [8]))], [...new Float32Array(vals)]);
    const h = toFloat32(fromFloat32(vals, [2, 4], 'F16'));
    assert.deepEqual([...h.slice(0, 5)], [0, -0, 1, -2.5, 65504]);
    assert.equal(h[6], 3.140625);
    const b = toFloat32(fromFloat32(vals, [8], 'BF16'));
    assert.equal(b[2], 1);
    assert.equal(b[6], 3.140625);
    const f64 = { dtype: 'F64' as const, shape: [2], data: new Uint8Array(new Float64Array([1.5, -3]).buffer) };
    assert.deepEqual([...toFloat32(f64)], [1.5, -3]);
    // unaligned input bytes are handled
    const buf = new Uint8Array(9);
    buf.set(new Uint8Array(new Float32Array([1, 2]).buffer), 1);
    assert.deepEqual([...toFloat32({ dtype: 'F32', shape: [2], data: buf.subarray(1) })], [1, 2]);
    assert.throws(() => fromFloat32([1, 2], [3]), ShapeError);
  });

  test('float8 e4m3fn and e5m2', () => {
    assert.equal(f8e4m3ToF32(0x7e), 448); // max normal
    assert.ok(Number.isNaN(f8e4m3ToF32(0x7f)));
    assert.equal(f8e4m3ToF32(0x38), 1);
    assert.equal(f8e4m3ToF32(0x01), 2 ** -9); // smallest subnormal
    assert.equal(f8e4m3ToF32(0xb8), -1);
    assert.equal(f8e5m2ToF32(0x3c), 1);
    assert.equal(f8e5m2ToF32(0x7b), 57344);
    assert.equal(f8e5m2ToF32(0x7c), Number.POSITIVE_INFINITY);
    assert.equal(f8e5m2ToF32(0x01), 2 ** -16);
    const t = { dtype: 'F8_E4M3' as const, shape: [2], data: new Uint8Array([0x38, 0xc0]) };
    assert.deepEqual([...toFloat32(t)], [1, -2]);
  });

  test('integer decoders', () => {
    assert.deepEqual([...toInt32(fromInts([-1, 2, 300], [3], 'I32'))], [-1, 2, 300]);
    assert.deepEqual([...toInt32(fromInts([-1, 2], [2], 'I8'))], [-1, 2]);
    assert.deepEqual([...toInt32(fromInts([1, 0, 5], [3], 'BOOL'))], [1, 0, 1]);
    assert.deepEqual([...toInt32(fromInts([-300, 7], [2], 'I16'))], [-300, 7]);
    assert.deepEqual([...toBigInt64(fromInts([-5, 2 ** 40], [2], 'I64'))], [-5n, 2n ** 40n]);
    assert.deepEqual([...toInt32(fromInts([-5, 40], [2], 'I64'))], [-5, 40]);
    assert.deepEqual([...toFloat32(fromInts([-5, 40], [2], 'I64'))], [-5, 40]);
    assert.throws(() => toInt32(fromInts([2 ** 40], [1], 'I64')), /does not fit/);
    const u64 = { dtype: 'U64' as const, shape: [1], data: new Uint8Array(8).fill(0xff) };
    assert.equal(BigInt.asUintN(64, toBigInt64(u64)[0]!), 2n ** 64n - 1n);
    assert.throws(() => toInt32(fromFloat32([1], [1])), /float dtype/);
  });
});
