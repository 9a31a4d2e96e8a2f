import assert from 'node:assert/strict';
import { test } from 'node:test';
import {
  createDynamicMap,
  DYNAMIC_MAP_SIGNED,
  FP4_CODE,
  NF4_CODE,
  torchLinspaceF32,
} from '../../src/quant/codebooks.ts';

const f = Math.fround;

test('NF4 table: the 16 float32 values of bitsandbytes get_4bit_type("nf4")', () => {
  const expected = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635, -0.18477343022823334,
    -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
  ];
  assert.equal(NF4_CODE.length, 16);
  // Each literal is already a float32 value (its shortest double repr), so there is no rounding.
  for (let i = 0; i < 16; i++) {
    assert.equal(f(expected[i]!), expected[i]);
    assert.equal(NF4_CODE[i], expected[i]);
  }
  // Sorted: 7 negative, exact zero at code 7, 8 positive.
  for (let i = 1; i < 16; i++) assert.ok(NF4_CODE[i]! > NF4_CODE[i - 1]!);
  assert.equal(NF4_CODE.filter((v) => v < 0).length, 7);
  assert.equal(NF4_CODE.filter((v) => v > 0).length, 8);
});

test('FP4 table: raw E2M1 magnitudes / 12 in float32, -0 at code 8, equal to the CUDA LUT literals', () => {
  const raw = [0, 0.0625, 8, 12, 4, 6, 2, 3];
  for (let i = 0; i < 8; i++) {
    assert.equal(FP4_CODE[i], f(raw[i]! / 12));
    assert.equal(FP4_CODE[i + 8], -f(raw[i]! / 12));
  }
  assert.ok(Object.is(FP4_CODE[8], -0), 'code 8 is negative zero');
  assert.equal(new Uint32Array(FP4_CODE.buffer)[8], 0x80000000);
  // kernels.cu fp4_dequantization_lut literals, rounded to float32, are the same values.
  const lut = [0.0, 0.005208333333, 0.66666667, 1.0, 0.33333333, 0.5, 0.16666667, 0.25];
  for (let i = 0; i < 8; i++) assert.equal(FP4_CODE[i], f(lut[i]!), `lut ${i}`);
});

test('torch.linspace float32 emulation: halfway formula', () => {
  const l = torchLinspaceF32(0.1, 1, 5);
  // step = fround(fround(1 - fround(0.1)) / 4); first half from start, second half from end.
  const step = f(f(1 - f(0.1)) / 4);
  assert.deepEqual(Array.from(l), [f(0.1), f(f(0.1) + step), f(1 - 2 * step), f(1 - step), 1]);
});

test('dynamic map (create_dynamic_map(signed=True)): structure', () => {
  const m = DYNAMIC_MAP_SIGNED;
  assert.equal(m.length, 256);
  for (let i = 1; i < 256; i++) assert.ok(m[i]! > m[i - 1]!, `sorted and distinct at ${i}`);
  assert.equal(m[127], 0);
  assert.equal(m[255], 1);
  // Symmetric except the extra 1.0: m[i] = -m[254 - i].
  for (let i = 0; i < 127; i++) assert.equal(m[i], -m[254 - i]!);
  // 2^i means at scale 10^(i-6): 1, 2, 4, ..., 64 positive values per decade.
  const pos = Array.from(m.slice(128, 255));
  const decade = (k: number) => pos.filter((v) => v >= 0.1 * 10 ** (k - 6) && v < 10 ** (k - 6)).length;
  assert.deepEqual([0, 1, 2, 3, 4, 5, 6].map(decade), [1, 2, 4, 8, 16, 32, 64]);
});

test('dynamic map: known values (as torch 2.x on x86 produces them)', () => {
  // Values printed from bitsandbytes' create_dynamic_map() (float32 -> Python float). Several of them
  // depend on the last bit of torch's float32 linspace (halfway formula, fused multiply-add) and on the
  // multiplication by 10^k being done in float32, so they check the re-implementation bit for bit.
  const known: [number, number][] = [
    [0, -0.992968738079071],
    [1, -0.9789062738418579],
    [20, -0.7117187976837158],
    [25, -0.6414062976837158],
    [36, -0.48671871423721313],
    [41, -0.4164062440395355],
    [63, -0.10703125596046448],
    [65, -0.09578125923871994],
    [70, -0.08171875774860382],
    [92, -0.019843751564621925],
    [104, -0.0052187503315508366],
    [111, -0.001281249918974936],
    [112, -0.0009437500848434865],
    [123, -2.1249998098937795e-5],
    [124, -7.749999895168003e-6],
    [125, -3.250000190746505e-6],
    [126, -5.500000384017767e-7],
    [127, 0],
    [128, 5.500000384017767e-7],
    [135, 0.00015625001105945557],
    [191, 0.10703125596046448],
    [234, 0.7117187976837158],
    [254, 0.992968738079071],
    [255, 1],
  ];
  for (const [i, v] of known) assert.equal(DYNAMIC_MAP_SIGNED[i], f(v), `map[${i}]`);
});

test('dynamic map: unsigned variant has 256 values in [0, 1]', () => {
  const u = createDynamicMap({ signed: false });
  assert.equal(u.length, 256);
  assert.equal(u[0], 0);
  assert.equal(u[255], 1);
  for (let i = 1; i < 256; i++) assert.ok(u[i]! > u[i - 1]!);
});
