import assert from 'node:assert/strict';
import { test } from 'node:test';
import { allocCpu, CpuStorage, clearBufferPool } from '../../src/core/storage.ts';

const N = 1 << 15; // f32: 128 KiB, above the pool's minimum

test('freed host buffers are reused, zeroed, for the same size only', () => {
  clearBufferPool();
  const a = allocCpu('f32', N);
  (a.data as Float32Array).fill(7);
  const buf = a.data.buffer;
  a.release();
  const b = allocCpu('f32', N);
  assert.equal(b.data.buffer, buf, 'the freed buffer is taken again');
  assert.ok(
    (b.data as Float32Array).every((v) => v === 0),
    'a reused buffer reads as zeros',
  );
  const c = allocCpu('f32', N + 16);
  assert.notEqual(c.data.buffer, buf, 'another size gets another buffer');
  // other dtypes of the same byte size share the pool, with their own view
  b.release();
  const d = allocCpu('u8', 4 * N);
  assert.equal(d.data.buffer, buf, 'same byte length, another dtype');
  assert.ok(d.data instanceof Uint8Array, 'viewed as the dtype asked for');
  c.release();
  d.release();
  clearBufferPool();
});

test('arrays a caller handed over are never recycled, nor small or detached buffers', () => {
  clearBufferPool();
  const mine = new Float32Array(N).fill(3);
  new CpuStorage('f32', mine).release();
  const e = allocCpu('f32', N);
  assert.notEqual(e.data.buffer, mine.buffer, "a caller's array is not reused");
  assert.equal(mine[0], 3, "the caller's data is untouched");
  e.release();
  const small = allocCpu('f32', 16);
  const sbuf = small.data.buffer;
  small.release();
  assert.notEqual(allocCpu('f32', 16).data.buffer, sbuf, 'small buffers go to the garbage collector');
  // a pooled buffer transferred to another thread meanwhile is skipped
  const f = allocCpu('f32', N);
  const fbuf = f.data.buffer as ArrayBuffer;
  f.release();
  structuredClone(fbuf, { transfer: [fbuf] });
  const g = allocCpu('f32', N);
  assert.notEqual(g.data.buffer, fbuf, 'a detached buffer is not handed out');
  assert.equal(g.data.length, N, 'the new buffer has the size asked for');
  g.release();
  clearBufferPool();
});
