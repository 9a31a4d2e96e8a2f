import assert from 'node:assert/strict';
import { test } from 'node:test';
import { ConfigError } from '../../src/core/errors.ts';
import { dequantizeBlockwise8, quantizeBlockwise8, quantizeToCode8 } from '../../src/quant/blockwise8.ts';
import { DYNAMIC_MAP_SIGNED as MAP } from '../../src/quant/codebooks.ts';

const f = Math.fround;

function nearest(x: number): number {
  let best = 0;
  for (let k = 1; k < 256; k++) if (Math.abs(MAP[k]! - x) < Math.abs(MAP[best]! - x)) best = k;
  return best;
}

test('dQuantize binary search: every code value maps to itself', () => {
  for (let k = 0; k < 256; k++) assert.equal(quantizeToCode8(MAP, MAP[k]!), k, `code ${k}`);
});

test('dQuantize binary search: nearest code on a dense sweep and past both ends', () => {
  for (let i = -1100; i <= 1100; i++) {
    const x = f(i / 1000 + 1e-7 * Math.sin(i)); // avoid exact midpoints
    assert.equal(quantizeToCode8(MAP, x), nearest(x), `x = ${x}`);
  }
  // Tiny values near zero, where the map is densest.
  for (let e = -9; e <= -2; e++) {
    for (const m of [1.3, -1.3, 3.7, -3.7, 7.1, -7.1]) {
      const x = f(m * 10 ** e);
      assert.equal(quantizeToCode8(MAP, x), nearest(x), `x = ${x}`);
    }
  }
  assert.equal(quantizeToCode8(MAP, 2), 255);
  assert.equal(quantizeToCode8(MAP, -2), 0);
  assert.equal(quantizeToCode8(MAP, Number.NaN), 0);
});

test('dQuantize on an exact float32 midpoint picks one of the two neighbours', () => {
  for (let k = 0; k < 255; k++) {
    const mid = f(f(MAP[k]! + MAP[k + 1]!) * 0.5);
    const q = quantizeToCode8(MAP, mid);
    assert.ok(q === k || q === k + 1, `midpoint ${k}: got ${q}`);
  }
});

test('blockwise 8-bit: absmax per block, codes and dequantization', () => {
  const x = new Float32Array([0.5, -1, 0.25, 0, 3, -1.5]);
  const { q, absmax } = quantizeBlockwise8(x, MAP, 4);
  assert.deepEqual(Array.from(absmax), [1, 3]);
  assert.equal(q[1], 0); // -1 -> the map's most negative value
  assert.equal(q[3], 127); // 0
  assert.equal(q[4], 255); // 3 / 3 = 1
  const back = dequantizeBlockwise8(q, absmax, MAP, 4);
  for (let i = 0; i < x.length; i++) assert.ok(Math.abs(back[i]! - x[i]!) <= 0.01 * absmax[Math.floor(i / 4)]!);
  assert.throws(() => quantizeBlockwise8(x, MAP.subarray(0, 16), 4), ConfigError);
  assert.throws(() => dequantizeBlockwise8(q, absmax.subarray(0, 1), MAP, 4), ConfigError);
});
