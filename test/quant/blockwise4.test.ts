import assert from 'node:assert/strict';
import { test } from 'node:test';
import { f32ToBf16 } from '../../src/core/dtype.ts';
import { ConfigError, ShapeError } from '../../src/core/errors.ts';
import {
  bitsPerParam4bit,
  type DoubleQuantAbsmax,
  dequantize4bit,
  dequantize4bitRange,
  dequantizeAbsmax,
  quantize4bit,
  quantizeFp4Value,
  quantizeNf4Value,
  quantStateBytes,
  storageBytes4bit,
} from '../../src/quant/blockwise4.ts';
import { DYNAMIC_MAP_SIGNED, FP4_CODE, NF4_CODE } from '../../src/quant/codebooks.ts';

const f = Math.fround;

/** Next float32 above x (x finite, x != 0 handled for both signs). */
function nextUpF32(x: number): number {
  const b = new Float32Array([x]);
  const u = new Int32Array(b.buffer);
  if (x === 0) return 1.401298464324817e-45;
  u[0] = x > 0 ? u[0]! + 1 : u[0]! - 1;
  return b[0]!;
}

/** Deterministic N(0, 1) samples (mulberry32 + Box-Muller). */
function gaussian(n: number, seed: number): Float32Array {
  let a = seed >>> 0;
  const rnd = () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  const out = new Float32Array(n);
  for (let i = 0; i < n; i += 2) {
    const u1 = rnd() || 1e-12;
    const u2 = rnd();
    const r = Math.sqrt(-2 * Math.log(u1));
    out[i] = r * Math.cos(2 * Math.PI * u2);
    if (i + 1 < n) out[i + 1] = r * Math.sin(2 * Math.PI * u2);
  }
  return out;
}

test('NF4 hand vector: codes, high-nibble-first packing, absmax', () => {
  // absmax = 1, so the scaled values are the inputs. By the dQuantizeNF4 tree:
  // 1 -> 15, -1 -> 0, 0.5 -> 12 (0.3893 < 0.5 <= 0.5017), 0 -> 7, -0.25 -> 4 (-0.3397 < x <= -0.2346),
  // 0.1 -> 8 (0.0398 < 0.1 <= 0.1203).
  const s = quantize4bit(new Float32Array([1, -1, 0.5, 0, -0.25, 0.1]), { quantType: 'nf4' });
  assert.deepEqual(Array.from(s.packed), [0xf0, 0xc7, 0x48]);
  assert.deepEqual(Array.from(s.absmax as Float32Array), [1]);
  assert.deepEqual(s.shape, [6]);
  assert.equal(s.blocksize, 64);
  assert.deepEqual(Array.from(dequantize4bit(s)), [1, -1, NF4_CODE[12], 0, NF4_CODE[4], NF4_CODE[8]]);
});

test('FP4 hand vector: sign bit, unsorted magnitudes', () => {
  // 1 -> 0b0011, -1 -> 0b1011, 0.5 -> 0b0101, 0 -> 0b0000, -0.25 -> 0b1111 (|x| in (0.2083, 0.2917]),
  // 0.1 -> 0b0110 (|x| in (0.0859, 0.2083]).
  const s = quantize4bit(new Float32Array([1, -1, 0.5, 0, -0.25, 0.1]), { quantType: 'fp4' });
  assert.deepEqual(Array.from(s.packed), [0x3b, 0x50, 0xf6]);
  assert.deepEqual(Array.from(dequantize4bit(s)), [1, -1, 0.5, 0, -0.25, FP4_CODE[6]]);
});

test('odd length: the pad nibble is the code of 0 (NF4 7, FP4 0)', () => {
  const w = new Float32Array([1, 0.5, -1]);
  assert.deepEqual(Array.from(quantize4bit(w, { quantType: 'nf4' }).packed), [0xfc, 0x07]);
  assert.deepEqual(Array.from(quantize4bit(w, { quantType: 'fp4' }).packed), [0x35, 0xb0]);
});

test('NF4 ties: a value exactly on a boundary takes the lower code', () => {
  const t = [
    -0.8480964004993439, -0.6106329262256622, -0.4599952697753906, -0.33967943489551544, -0.23460740596055984,
    -0.13791173323988914, -0.045525018125772476, 0.03979014977812767, 0.1202552504837513, 0.2035212516784668,
    0.2920137718319893, 0.3893125355243683, 0.5016634166240692, 0.6427869200706482, 0.8614784181118011,
  ];
  for (let k = 0; k < 15; k++) {
    const b = f(t[k]!);
    assert.equal(quantizeNf4Value(b), k, `boundary ${k}`);
    assert.equal(quantizeNf4Value(nextUpF32(b)), k + 1, `above boundary ${k}`);
    // Through quantize4bit: with 1.0 in the block the reciprocal is exactly 1.
    const s = quantize4bit(new Float32Array([1, b, nextUpF32(b), 0]), { quantType: 'nf4' });
    assert.equal(s.packed[0]! & 0x0f, k);
    assert.equal(s.packed[1]! >> 4, k + 1);
  }
  // Each boundary lies between its two codes.
  for (let k = 0; k < 15; k++) assert.ok(NF4_CODE[k]! < f(t[k]!) && f(t[k]!) < NF4_CODE[k + 1]!);
});

test('FP4 ties: |x| exactly on a kernel threshold takes the smaller magnitude', () => {
  // [threshold, code at threshold, code just above]
  const cases: [number, number, number][] = [
    [0.00260417, 0b0000, 0b0001],
    [0.0859375, 0b0001, 0b0110],
    [0.20833333, 0b0110, 0b0111],
    [0.29166667, 0b0111, 0b0100],
    [0.4166667, 0b0100, 0b0101],
    [0.583333, 0b0101, 0b0010],
    [0.8333333, 0b0010, 0b0011],
  ];
  for (const [t, at, above] of cases) {
    const b = f(t);
    assert.equal(quantizeFp4Value(b), at, `at ${t}`);
    assert.equal(quantizeFp4Value(nextUpF32(b)), above, `above ${t}`);
    assert.equal(quantizeFp4Value(-b), at | 0b1000, `at -${t}`);
  }
  // Negative zero has no sign bit (the kernel tests x < 0).
  assert.equal(quantizeFp4Value(-0), 0);
});

test('exact round trip of the code books (scaled by a power of two and by 3.5)', () => {
  for (const scale of [1, 4, 3.5]) {
    const w = Float32Array.from(NF4_CODE, (c) => f(c * scale));
    const s = quantize4bit(w, { quantType: 'nf4', blocksize: 32 });
    const codes = Array.from({ length: 16 }, (_, i) => (i & 1 ? s.packed[i >> 1]! & 15 : s.packed[i >> 1]! >> 4));
    assert.deepEqual(codes, [...Array(16).keys()]);
    assert.deepEqual(Array.from(dequantize4bit(s)), Array.from(w));
  }
  for (const scale of [1, 3.5]) {
    const w = Float32Array.from(FP4_CODE, (c) => f(c * scale));
    const s = quantize4bit(w, { quantType: 'fp4', blocksize: 32 });
    const codes = Array.from({ length: 16 }, (_, i) => (i & 1 ? s.packed[i >> 1]! & 15 : s.packed[i >> 1]! >> 4));
    assert.deepEqual(codes, [0, 1, 2, 3, 4, 5, 6, 7, 0, 9, 10, 11, 12, 13, 14, 15]); // -0 takes code 0
    const back = dequantize4bit(s);
    for (let i = 0; i < 16; i++) assert.ok(back[i] === w[i], `value ${i}`); // -0 decodes as +0
  }
});

test('partial last block gets its own absmax; blocks are consecutive elements', () => {
  const w = new Float32Array(70);
  for (let i = 0; i < 64; i++) w[i] = (i % 7) - 3; // absmax 3
  for (let i = 64; i < 70; i++) w[i] = (i - 64) * 0.1; // absmax 0.5
  const s = quantize4bit(w, { quantType: 'nf4', shape: [7, 10] });
  assert.deepEqual(Array.from(s.absmax as Float32Array), [3, f(0.5)]);
  assert.equal(s.packed.length, 35);
  const back = dequantize4bit(s);
  assert.equal(back.length, 70);
  for (let i = 64; i < 70; i++) assert.ok(Math.abs(back[i]! - w[i]!) <= 0.5 * 0.1, `elem ${i}`);
  assert.equal(back[69], f(0.5));
});

test('an all-zero block decodes to zeros (kernel: NaN scaled values -> code 0)', () => {
  const w = new Float32Array(128);
  w[64] = 2;
  const s = quantize4bit(w, { quantType: 'nf4' });
  assert.deepEqual(Array.from((s.absmax as Float32Array).values()), [0, 2]);
  for (let i = 0; i < 32; i++) assert.equal(s.packed[i], 0);
  const back = dequantize4bit(s);
  for (let i = 0; i < 64; i++) assert.ok(back[i] === 0); // -1 * 0 = -0
  assert.equal(back[64], 2);
});

test('bf16 input (raw bits) quantizes as its float32 values', () => {
  const w = gaussian(256, 3).map((v) => f(v));
  const bits = Uint16Array.from(w, (v) => f32ToBf16(v));
  const asF32 = Float32Array.from(bits, (b) => new Float32Array(new Uint32Array([b << 16]).buffer)[0]!);
  const a = quantize4bit(bits, { quantType: 'nf4', dtype: 'bfloat16' });
  const b = quantize4bit(asF32, { quantType: 'nf4', dtype: 'bfloat16' });
  assert.deepEqual(a.packed, b.packed);
  assert.deepEqual(a.absmax, b.absmax);
  assert.equal(a.dtype, 'bfloat16');
  assert.throws(() => quantize4bit(bits, { quantType: 'nf4' }), ConfigError);
});

test('double quantization: offset = mean(absmax), 8-bit codes over the dynamic map in blocks of 256', () => {
  const n = 64 * 600; // 600 blocks -> 3 nested blocks (256 + 256 + 88)
  const w = gaussian(n, 7);
  const plain = quantize4bit(w, { quantType: 'nf4' });
  const dq = quantize4bit(w, { quantType: 'nf4', doubleQuant: true });
  assert.deepEqual(dq.packed, plain.packed, 'the 4-bit codes do not depend on double quantization');
  const absmax = plain.absmax as Float32Array;
  const d = dq.absmax as DoubleQuantAbsmax;
  let sum = 0;
  for (const v of absmax) sum += v;
  assert.equal(d.offset, f(sum / absmax.length));
  assert.equal(d.quantizedAbsmax.length, 600);
  assert.equal(d.nestedAbsmax.length, 3);
  assert.equal(d.nestedBlocksize, 256);
  assert.deepEqual(d.nestedQuantMap, DYNAMIC_MAP_SIGNED);
  for (let b = 0; b < 3; b++) {
    let m = 0;
    for (let i = b * 256; i < Math.min(600, (b + 1) * 256); i++) m = Math.max(m, Math.abs(f(absmax[i]! - d.offset)));
    assert.equal(d.nestedAbsmax[b], m);
  }
  // Each code is the nearest dynamic-map value to (absmax - offset) / nestedAbsmax.
  for (let i = 0; i < 600; i++) {
    const x = f(f(absmax[i]! - d.offset) * f(1 / d.nestedAbsmax[Math.floor(i / 256)]!));
    let best = 0;
    for (let k = 1; k < 256; k++) {
      if (Math.abs(DYNAMIC_MAP_SIGNED[k]! - x) < Math.abs(DYNAMIC_MAP_SIGNED[best]! - x)) best = k;
    }
    assert.equal(d.quantizedAbsmax[i], best, `absmax ${i}`);
  }
  // Reconstructed absmax is close (8-bit dynamic map: relative step <= ~1.5% near the top of the range).
  const rec = dequantizeAbsmax(dq);
  for (let i = 0; i < 600; i++)
    assert.ok(Math.abs(rec[i]! - absmax[i]!) <= 0.01 * d.nestedAbsmax[Math.floor(i / 256)]!);
  const back = dequantize4bit(dq);
  for (let i = 0; i < n; i += 97) {
    const blk = Math.floor(i / 64);
    const nib = i & 1 ? dq.packed[i >> 1]! & 15 : dq.packed[i >> 1]! >> 4;
    assert.equal(back[i], f(NF4_CODE[nib]! * rec[blk]!));
  }
});

test('double quantization of a single block: offset = absmax, decodes exactly', () => {
  const s = quantize4bit(new Float32Array([0.5, -2, 1, 0]), { quantType: 'nf4', doubleQuant: true });
  const d = s.absmax as DoubleQuantAbsmax;
  assert.equal(d.offset, 2);
  assert.deepEqual(Array.from(d.nestedAbsmax), [0]);
  assert.deepEqual(Array.from(dequantizeAbsmax(s)), [2]);
});

test('error on N(0,1) weights, blocksize 64: NF4 < int4-uniform and < FP4', () => {
  // QLoRA section 3: NF4 puts equal probability mass of N(0,1) in each code's bin, so it is the
  // best 4-bit code for normally distributed weights. Reference numbers for blocksize 64 (independent
  // float64 simulation with 1.3M samples): mean |error| / std ~ NF4 0.0728, int4 (k/7) 0.0914,
  // FP4 0.0966; RMSE / std ~ NF4 0.0920, int4 0.1077, FP4 0.1220.
  const n = 64 * 4096;
  const w = gaussian(n, 42);
  let mean = 0;
  for (const v of w) mean += v;
  mean /= n;
  let varSum = 0;
  for (const v of w) varSum += (v - mean) ** 2;
  const std = Math.sqrt(varSum / n);
  const stats = (back: Float32Array) => {
    let mae = 0;
    let mse = 0;
    for (let i = 0; i < n; i++) {
      const e = back[i]! - w[i]!;
      mae += Math.abs(e);
      mse += e * e;
    }
    return { mae: mae / n / std, rmse: Math.sqrt(mse / n) / std };
  };
  const nf4 = stats(dequantize4bit(quantize4bit(w, { quantType: 'nf4' })));
  const fp4 = stats(dequantize4bit(quantize4bit(w, { quantType: 'fp4' })));
  const nf4dq = stats(dequantize4bit(quantize4bit(w, { quantType: 'nf4', doubleQuant: true })));
  // Symmetric absmax int4 with levels k/7, k = -7..7, same blocks.
  const int4 = new Float32Array(n);
  for (let b = 0; b < n; b += 64) {
    let m = 0;
    for (let i = b; i < b + 64; i++) m = Math.max(m, Math.abs(w[i]!));
    for (let i = b; i < b + 64; i++) int4[i] = (Math.round((w[i]! / m) * 7) / 7) * m;
  }
  const i4 = stats(int4);
  const near = (v: number, ref: number, tol: number, what: string) =>
    assert.ok(Math.abs(v - ref) <= tol, `${what}: ${v.toFixed(4)} not within ${tol} of ${ref}`);
  near(nf4.mae, 0.0728, 0.002, 'NF4 MAE');
  near(nf4.rmse, 0.092, 0.002, 'NF4 RMSE');
  near(fp4.mae, 0.0966, 0.002, 'FP4 MAE');
  near(fp4.rmse, 0.122, 0.002, 'FP4 RMSE');
  near(i4.mae, 0.0914, 0.002, 'int4 MAE');
  near(i4.rmse, 0.1077, 0.002, 'int4 RMSE');
  assert.ok(nf4.mae < i4.mae && nf4.mae < fp4.mae);
  assert.ok(nf4.rmse < i4.rmse && nf4.rmse < fp4.rmse);
  // Double quantization costs almost nothing (paper: no degradation).
  assert.ok(nf4dq.rmse < nf4.rmse * 1.01, `DQ RMSE ${nf4dq.rmse}`);
});

test('bits per parameter: 4.5 plain, 4.127 with double quantization (blocksize 64)', () => {
  const n = 64 * 256 * 4;
  const w = gaussian(n, 1);
  const dq = quantize4bit(w, { quantType: 'nf4', doubleQuant: true });
  const d = dq.absmax as DoubleQuantAbsmax;
  const dataBytes = dq.packed.length + d.quantizedAbsmax.length + d.nestedAbsmax.length * 4;
  assert.equal((dataBytes * 8) / n, 4 + 8 / 64 + 32 / (64 * 256));
  assert.equal((dataBytes * 8) / n, 4.126953125);
  assert.equal(bitsPerParam4bit(n, { doubleQuant: true }), 4.126953125);
  const plain = quantize4bit(w, { quantType: 'nf4' });
  assert.equal(((plain.packed.length + (plain.absmax as Float32Array).length * 4) * 8) / n, 4.5);
  // With the per-tensor maps, the state's bytes match the accounting helper.
  assert.equal(quantStateBytes(dq), storageBytes4bit(n, { doubleQuant: true, perTensorConstants: true }));
  assert.equal(quantStateBytes(plain), storageBytes4bit(n, { perTensorConstants: true }));
  // A 4096 x 4096 projection: the 1 KB nested map barely shows.
  const big = bitsPerParam4bit(4096 * 4096, { doubleQuant: true, perTensorConstants: true });
  assert.ok(big > 4.1269 && big < 4.1275, String(big));
});

test('invalid options and shapes are typed errors', () => {
  const w = new Float32Array(64);
  assert.throws(() => quantize4bit(w, { quantType: 'nf4', blocksize: 48 }), ConfigError);
  assert.throws(() => quantize4bit(w, { quantType: 'nf4', blocksize: 16 }), ConfigError);
  assert.throws(() => quantize4bit(w, { quantType: 'int4' as 'nf4' }), ConfigError);
  assert.throws(() => quantize4bit(w, { quantType: 'nf4', shape: [3, 21] }), ShapeError);
  const s = quantize4bit(w, { quantType: 'nf4', shape: [8, 8] });
  assert.throws(() => dequantize4bit({ ...s, shape: [8, 9] }), ShapeError);
  for (const bs of [32, 64, 128, 256, 512, 1024, 2048, 4096]) {
    const q = quantize4bit(gaussian(5000, bs), { quantType: 'fp4', blocksize: bs });
    assert.equal((q.absmax as Float32Array).length, Math.ceil(5000 / bs));
  }
});

test('range dequantization equals the full one on any window', () => {
  const s = quantize4bit(gaussian(1000, 11), { quantType: 'nf4', doubleQuant: true, blocksize: 32, shape: [10, 100] });
  const full = dequantize4bit(s);
  const absmax = dequantizeAbsmax(s);
  for (const [start, count] of [
    [0, 1000],
    [1, 31],
    [33, 64],
    [300, 100],
    [999, 1],
    [500, 0],
  ] as const) {
    const out = new Float32Array(count + 3);
    dequantize4bitRange(s, absmax, start, count, out, 3);
    assert.deepEqual(out.subarray(3), full.subarray(start, start + count), `[${start}, +${count})`);
  }
  assert.throws(() => dequantize4bitRange(s, absmax, 990, 20, new Float32Array(20)), ShapeError);
  assert.throws(() => dequantize4bitRange(s, absmax, 0, 20, new Float32Array(10)), ShapeError);
});
