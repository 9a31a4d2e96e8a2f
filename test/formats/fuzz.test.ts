// Seeded mutation fuzzing of the safetensors and GGUF readers: every mutated file must either parse (and then
// read back every tensor) or fail with a FormatError; never another exception, a crash or a hang.

import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { after, describe, test } from 'node:test';
import { DTypeError, FormatError } from '../../src/core/errors.ts';
import { type GgufFile, parseGguf, readGguf, serializeGguf } from '../../src/formats/gguf.ts';
import { quantizeQ4_0, quantizeQ8_0 } from '../../src/formats/gguf-quants.ts';
import {
  deserializeSafetensors,
  fromFloat32,
  fromInts,
  openSafetensors,
  serializeSafetensors,
  toFloat32,
} from '../../src/formats/safetensors.ts';

const SHARED = path.resolve(import.meta.dirname, '../../../shared');
const STORIES = path.join(SHARED, 'models/stories260K/stories260K.gguf');
const noStories = fs.existsSync(STORIES) ? false : `${STORIES} is absent (../shared reference data not checked out)`;
if (noStories) console.log(`skipping the stories260K GGUF fuzz: ${noStories}`);

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'lowrank-fuzz-'));
after(() => fs.rmSync(tmp, { recursive: true, force: true }));

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

class Rng {
  private readonly next: () => number;
  constructor(seed: number) {
    this.next = mulberry32(seed);
  }
  float(): number {
    return this.next();
  }
  int(n: number): number {
    return Math.floor(this.next() * n);
  }
  pick<T>(xs: readonly T[]): T {
    return xs[this.int(xs.length)]!;
  }
}

const INTERESTING_U64 = [
  0n,
  1n,
  2n,
  7n,
  8n,
  31n,
  32n,
  255n,
  256n,
  4095n,
  65536n,
  2n ** 31n - 1n,
  2n ** 32n - 1n,
  2n ** 32n,
  2n ** 53n + 1n,
  2n ** 63n,
  2n ** 64n - 1n,
];

interface Outcome {
  parsed: number;
  rejected: number;
}

/** Runs one mutated input; asserts the only failure is a FormatError (or DTypeError when using a parsed file). */
function check(label: string, outcome: Outcome, fn: () => void): void {
  const t0 = performance.now();
  try {
    fn();
    outcome.parsed++;
  } catch (e) {
    if (!(e instanceof FormatError)) {
      assert.fail(`${label}: expected FormatError or a parse, got ${(e as Error)?.stack ?? e}`);
    }
    outcome.rejected++;
  }
  const ms = performance.now() - t0;
  assert.ok(ms < 2000, `${label}: took ${ms.toFixed(0)} ms`);
}

// ---------------------------------------------------------------------------------------------------------

function baseSafetensors(): Uint8Array {
  return serializeSafetensors(
    {
      'model.w': fromFloat32([1, 2, 3, 4, 5, 6], [2, 3]),
      'model.b': fromFloat32([0.5, -1, 2, 8], [4], 'BF16'),
      ids: fromInts([3, -4], [2], 'I64'),
      mask: fromInts([1, 0, 1], [3], 'BOOL'),
      h: fromFloat32([1, 2], [1, 2], 'F16'),
    },
    { format: 'pt', note: 'fuzz' },
  );
}

function headerOf(b: Uint8Array): { n: number; json: Record<string, unknown> } {
  const n = Number(new DataView(b.buffer, b.byteOffset).getBigUint64(0, true));
  return { n, json: JSON.parse(Buffer.from(b.subarray(8, 8 + n)).toString('utf8')) };
}

function withHeader(text: string, data: Uint8Array, pad = 0): Uint8Array {
  const json = Buffer.from(text + ' '.repeat(pad), 'utf8');
  const out = new Uint8Array(8 + json.byteLength + data.byteLength);
  new DataView(out.buffer).setBigUint64(0, BigInt(json.byteLength), true);
  out.set(json, 8);
  out.set(data, 8 + json.byteLength);
  return out;
}

const WEIRD_VALUES: unknown[] = [
  null,
  true,
  'x',
  -1,
  1.5,
  2 ** 60,
  1e300,
  [],
  {},
  [1],
  [-1, 2],
  [0, 1, 2],
  ['0', '4'],
  { a: 1 },
];

function mutateJson(r: Rng, json: Record<string, unknown>): void {
  const keys = Object.keys(json);
  const key = r.pick(keys);
  const entry = json[key];
  const op = r.int(10);
  if (op === 0) {
    json[key] = r.pick(WEIRD_VALUES);
  } else if (op === 1) {
    delete json[key];
  } else if (op === 2) {
    json[`extra.${r.int(100)}`] = {
      dtype: r.pick(['F32', 'U8', 'XX']),
      shape: [r.int(4)],
      data_offsets: [r.int(64), r.int(64)],
    };
  } else if (typeof entry === 'object' && entry !== null && !Array.isArray(entry)) {
    const e = entry as Record<string, unknown>;
    const field = r.pick(['dtype', 'shape', 'data_offsets', 'other']);
    if (op === 3) delete e[field];
    else if (op === 4) e[field] = r.pick(WEIRD_VALUES);
    else if (op === 5)
      e.dtype = r.pick(['F64', 'F32', 'F16', 'BF16', 'I64', 'I32', 'I16', 'I8', 'U8', 'BOOL', 'F8_E4M3', 'bf16', '']);
    else if (op === 6 && Array.isArray(e.shape)) {
      const s = [...e.shape];
      s[r.int(s.length + 1)] = r.pick([0, 1, 2, 3, -1, 1.5, 2 ** 31, 2 ** 53, '2']);
      e.shape = s;
    } else if (op === 7 && Array.isArray(e.data_offsets)) {
      const o = [...e.data_offsets] as number[];
      o[r.int(2)] = (o[r.int(2)] ?? 0) + r.pick([-8, -1, 1, 2, 8, 1000, 2 ** 40]);
      e.data_offsets = o;
    } else if (op === 8) {
      e[field] = { nested: [e[field]] };
    } else {
      json[`${key}.copy`] = { ...e };
    }
  }
}

describe('fuzz: safetensors', () => {
  test('400 seeded mutations give FormatError or a correct parse', () => {
    const base = baseSafetensors();
    const { n, json } = headerOf(base);
    const data = base.subarray(8 + n);
    const r = new Rng(20260101);
    const outcome: Outcome = { parsed: 0, rejected: 0 };
    let fileRuns = 0;
    for (let i = 0; i < 400; i++) {
      let m: Uint8Array;
      const kind = i % 5;
      if (kind === 0) {
        m = base.slice();
        for (let k = 1 + r.int(4); k > 0; k--) m[8 + r.int(n)] = r.int(256);
      } else if (kind === 1) {
        m = base.slice(0, r.int(base.byteLength));
      } else if (kind === 2) {
        m = base.slice();
        const dv = new DataView(m.buffer);
        const v = r.float() < 0.5 ? BigInt(n + r.pick([-9, -8, -1, 1, 7, 8, 16, 1000])) : r.pick(INTERESTING_U64);
        dv.setBigUint64(0, BigInt.asUintN(64, v), true);
      } else if (kind === 3) {
        const j = structuredClone(json);
        for (let k = 1 + r.int(3); k > 0; k--) mutateJson(r, j);
        m = withHeader(JSON.stringify(j), data, r.int(9));
      } else {
        const extra = r.int(3);
        m = extra === 0 ? base.slice(0, base.byteLength - 1 - r.int(8)) : concat(base, new Uint8Array(extra * 4));
      }
      check(`safetensors mutation #${i} (kind ${kind})`, outcome, () => {
        const { tensors } = deserializeSafetensors(m, `mut${i}.safetensors`);
        for (const t of Object.values(tensors)) {
          if (['F32', 'F16', 'BF16', 'F64', 'F8_E4M3', 'F8_E5M2'].includes(t.dtype)) {
            assert.equal(
              toFloat32(t).length * 1,
              t.shape.reduce((a, b) => a * b, 1),
            );
          }
        }
      });
      if (i % 20 === 0) {
        fileRuns++;
        const p = path.join(tmp, `mut${i}.safetensors`);
        fs.writeFileSync(p, m);
        check(`safetensors file mutation #${i}`, { parsed: 0, rejected: 0 }, () => {
          const f = openSafetensors(p);
          try {
            for (const name of f.names()) f.read(name);
          } finally {
            f.close();
          }
        });
      }
    }
    assert.ok(outcome.rejected > 100 && outcome.parsed > 5, JSON.stringify(outcome));
    assert.equal(fileRuns, 20);
  });
});

// ---------------------------------------------------------------------------------------------------------

function syntheticGguf(): Uint8Array {
  const x = Float32Array.from({ length: 64 }, (_, i) => Math.sin(i));
  return serializeGguf({
    metadata: {
      'general.architecture': 'llama',
      'general.alignment': { type: 'u32', value: 32 },
      'tok.list': ['a', 'bb', 'ccc'],
      'f.list': [0.5, 1.5],
      u64: { type: 'u64', value: 5n },
      nested: [[1], [2, 3]],
      flag: true,
    },
    tensors: [
      { name: 'a', shape: [2, 32], type: 'F32', data: x },
      { name: 'b', shape: [64], type: 'F16', data: x },
      { name: 'c', shape: [2, 32], type: 'Q8_0', data: quantizeQ8_0(x) },
      { name: 'd', shape: [64], type: 'Q4_0', data: quantizeQ4_0(x) },
      { name: 'e', shape: [256], type: 'Q4_K', data: new Uint8Array(144).fill(17) },
      { name: 'f', shape: [256], type: 'Q6_K', data: new Uint8Array(210).fill(200) },
    ],
  });
}

function concat(a: Uint8Array, b: Uint8Array): Uint8Array {
  const out = new Uint8Array(a.byteLength + b.byteLength);
  out.set(a);
  out.set(b, a.byteLength);
  return out;
}

function useParsed(f: GgufFile): void {
  for (const t of f.tensors) {
    try {
      assert.equal(f.readTensorF32(t).length, t.numel);
    } catch (e) {
      // a mutation may turn a tensor into a type without a dequantizer: that is a typed refusal, not a crash
      if (!(e instanceof DTypeError)) throw e;
    }
  }
  JSON.stringify(f.metadata, (_k, v) => (typeof v === 'bigint' ? v.toString() : v));
}

function fuzzGguf(base: Uint8Array, headerEnd: number, seed: number, count: number, name: string): Outcome {
  const r = new Rng(seed);
  const outcome: Outcome = { parsed: 0, rejected: 0 };
  for (let i = 0; i < count; i++) {
    let m: Uint8Array;
    const kind = i % 4;
    if (kind === 0) {
      m = base.slice();
      for (let k = 1 + r.int(3); k > 0; k--) {
        const at = r.float() < 0.3 ? r.int(Math.min(64, headerEnd)) : r.int(headerEnd);
        m[at] = r.float() < 0.5 ? r.int(256) : m[at]! ^ (1 << r.int(8));
      }
    } else if (kind === 1) {
      m = base.slice(0, r.float() < 0.7 ? r.int(headerEnd + 64) : r.int(base.byteLength));
    } else if (kind === 2) {
      m = base.slice();
      const at = r.int(headerEnd - 8);
      const dv = new DataView(m.buffer);
      if (r.float() < 0.5) dv.setBigUint64(at, r.pick(INTERESTING_U64), true);
      else dv.setUint32(at, Number(r.pick(INTERESTING_U64) & 0xffffffffn), true);
    } else {
      // splice: drop or duplicate a run of header bytes
      const at = r.int(headerEnd);
      const len = 1 + r.int(16);
      m =
        r.float() < 0.5
          ? concat(base.subarray(0, at), base.subarray(at + len))
          : concat(base.subarray(0, at + len), base.subarray(at));
    }
    check(`${name} mutation #${i} (kind ${kind})`, outcome, () => useParsed(parseGguf(m, `${name}#${i}`)));
    if (i % 25 === 0) {
      const p = path.join(tmp, `${name}-${i}.gguf`);
      fs.writeFileSync(p, m);
      check(`${name} file mutation #${i}`, { parsed: 0, rejected: 0 }, () => {
        const f = readGguf(p);
        try {
          useParsed(f);
        } finally {
          f.close();
        }
      });
    }
  }
  return outcome;
}

describe('fuzz: GGUF', () => {
  test('300 seeded mutations of a synthetic file (all value kinds, quantized tensors)', () => {
    const base = syntheticGguf();
    const headerEnd = parseGguf(base).dataOffset;
    const o = fuzzGguf(base, headerEnd, 424242, 300, 'synthetic');
    assert.ok(o.rejected > 100 && o.parsed > 10, JSON.stringify(o));
  });

  test('300 seeded mutations of the stories260K header', { skip: noStories }, () => {
    const base = new Uint8Array(fs.readFileSync(STORIES));
    const headerEnd = parseGguf(base).dataOffset;
    const o = fuzzGguf(base, headerEnd, 777, 300, 'stories260K');
    assert.ok(o.rejected > 100 && o.parsed > 10, JSON.stringify(o));
  });
});
