import assert from 'node:assert/strict';
import { test } from 'node:test';
import { ShapeError } from '../../src/core/errors.ts';
import { dequantizeInt8Rowwise, quantizeInt8Rowwise } from '../../src/quant/int8.ts';

test('row-wise int8: SCB = row absmax, round half to even of x * 127 / SCB', () => {
  // Row 0: 127 * [1, -0.5, 0.25, 0] = [127, -63.5, 31.75, 0] -> [127, -64 (half to even), 32, 0].
  // Row 1: absmax 2: 127/2 * [2, 1, -0.1, 0.5] -> [127, 63.5 -> 64, -6.35 -> -6, 31.75 -> 32].
  // Row 2: zeros -> SCB 0, codes 0.
  const w = new Float32Array([1, -0.5, 0.25, 0, 2, 1, -0.1, 0.5, 0, 0, 0, 0]);
  const q = quantizeInt8Rowwise(w, 3, 4);
  assert.deepEqual(Array.from(q.scale), [1, 2, 0]);
  assert.deepEqual(Array.from(q.int8), [127, -64, 32, 0, 127, 64, -6, 32, 0, 0, 0, 0]);
  const back = dequantizeInt8Rowwise(q, 3, 4);
  for (let i = 0; i < 12; i++) {
    const scale = q.scale[Math.floor(i / 4)]!;
    assert.ok(Math.abs(back[i]! - w[i]!) <= (0.5 / 127) * scale + 1e-7, `elem ${i}`);
  }
  assert.equal(back[0], Math.fround(127 * Math.fround(1 / 127)));
  for (let i = 8; i < 12; i++) assert.equal(back[i], 0);
});

test('row-wise int8: shape errors', () => {
  assert.throws(() => quantizeInt8Rowwise(new Float32Array(10), 3, 4), ShapeError);
  const q = quantizeInt8Rowwise(new Float32Array(12), 3, 4);
  assert.throws(() => dequantizeInt8Rowwise({ int8: q.int8, scale: q.scale.subarray(0, 2) }, 3, 4), ShapeError);
});
