import assert from 'node:assert/strict';
import { test } from 'node:test';
import { bf16ToF32, f16ToF32 } from '../../src/core/dtype.ts';
import { DTypeError, IndexError, ShapeError } from '../../src/core/errors.ts';
import { Rng } from '../../src/core/rng.ts';
import { tidy } from '../../src/core/scope.ts';
import { memoryStats } from '../../src/core/storage.ts';
import { intTensor, tensor } from '../../src/ops/create.ts';
import { embedding } from '../../src/ops/embedding.ts';
import { sum } from '../../src/ops/reduce.ts';
import { transpose } from '../../src/ops/shape.ts';
import { backward } from '../../src/ops/tape.ts';
import { gradcheck, randomTensor } from '../helpers/gradcheck.ts';

const rng = new Rng(3);
const R = (shape: number[], scale = 1, req = true) => randomTensor(shape, rng, scale, req);

test('embedding matches finite differences for the table, with repeated ids and any ids shape', () => {
  gradcheck('embedding [1] of [1, 1]', (w) => embedding(intTensor([0]), w!), [R([1, 1])]);
  gradcheck('embedding [2, 3] of [7, 5]', (w) => embedding(intTensor([6, 0, 6, 2, 2, 6], [2, 3]), w!), [R([7, 5])]);
  gradcheck(
    'embedding [13] of [11, 3]',
    (w) => embedding(intTensor([...Array(13).keys()].map((i) => (i * 5) % 11)), w!),
    [R([11, 3])],
  );
  // padding_idx: that row gets no gradient, but its lookups still return it
  const w = R([4, 3]);
  const out = embedding(intTensor([1, 3, 1, 0]), w, { paddingIdx: -1 });
  assert.deepEqual(out.toArray().slice(3, 6), w.toArray().slice(9, 12));
  backward(sum(out));
  assert.deepEqual(w.grad!.toArray(), [1, 1, 1, 2, 2, 2, 0, 0, 0, 0, 0, 0]);
});

test('embedding values: rows of the table as f32, bf16 and f16 tables decoded exactly', () => {
  const w = R([5, 4], 1, false);
  const wv = w.toArray();
  const ids = [4, 0, 4, 2];
  const out = embedding(intTensor(ids, [2, 2]), w);
  assert.deepEqual(out.shape, [2, 2, 4]);
  assert.equal(out.dtype, 'f32');
  assert.deepEqual(
    out.toArray(),
    ids.flatMap((i) => wv.slice(i * 4, i * 4 + 4)),
  );
  for (const dt of ['bf16', 'f16'] as const) {
    const w16 = tensor(wv, [5, 4], dt);
    const dec = Array.from(w16.data as Uint16Array, dt === 'bf16' ? bf16ToF32 : f16ToF32);
    assert.deepEqual(
      embedding(intTensor(ids), w16).toArray(),
      ids.flatMap((i) => dec.slice(i * 4, i * 4 + 4)),
    );
  }
  // a scalar id gives one row [D]; a transposed (non-contiguous) table is read in row-major order
  assert.deepEqual(embedding(intTensor([3], []), w).toArray(), wv.slice(12, 16));
  const wt = transpose(w);
  assert.deepEqual(embedding(intTensor([1]), wt).toArray(), [wv[1], wv[5], wv[9], wv[13], wv[17]]);
});

test('a frozen table records nothing; the backward frees what the forward saved', () => {
  const frozen = R([6, 2], 1, false);
  assert.equal(embedding(intTensor([1, 2]), frozen).gradFn, null);
  const before = memoryStats().liveStorages;
  tidy(() => {
    const w = R([6, 2]);
    backward(sum(embedding(intTensor([5, 5, 1]), w)));
    assert.deepEqual(w.grad!.toArray(), [0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 2, 2]);
    w.dispose();
  });
  assert.equal(memoryStats().liveStorages, before, 'embedding leaked storage');
});

test('embedding rejects out-of-range ids (naming the id and position), bad dtypes and shapes', () => {
  const w = R([10, 3], 1, false);
  assert.throws(
    () => embedding(intTensor([1, 2, 3, 10], [2, 2]), w),
    (e: unknown) =>
      e instanceof IndexError && /id 10 at position \[1, 1\]/.test(e.message) && /\[0, 10\)/.test(e.message),
  );
  assert.throws(() => embedding(intTensor([0, -1]), w), /embedding: id -1 at position 1 /);
  assert.throws(() => embedding(tensor([1, 2]), w), DTypeError);
  assert.throws(() => embedding(intTensor([1]), intTensor([1, 2], [1, 2])), DTypeError);
  assert.throws(() => embedding(intTensor([1]), R([10], 1, false)), ShapeError);
  assert.throws(() => embedding(intTensor([1]), w, { paddingIdx: 10 }), IndexError);
});
