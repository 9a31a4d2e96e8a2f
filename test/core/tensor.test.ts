import assert from 'node:assert/strict';
import { test } from 'node:test';
import { jsBackend } from '../../src/backend/cpu/js.ts';
import { bf16ToF32, f16ToF32, f32ToBf16, f32ToF16 } from '../../src/core/dtype.ts';
import { LifetimeError, ShapeError } from '../../src/core/errors.ts';
import { Rng } from '../../src/core/rng.ts';
import { keep, tidy } from '../../src/core/scope.ts';
import { memoryStats } from '../../src/core/storage.ts';
import { Tensor } from '../../src/core/tensor.ts';
import { empty, tensor } from '../../src/ops/create.ts';
import { contiguous, permute, reshape, slice, transpose } from '../../src/ops/shape.ts';

test('bf16 and f16 conversions round to nearest even and survive round trips', () => {
  assert.equal(f32ToBf16(1), 0x3f80);
  assert.equal(bf16ToF32(0x3f80), 1);
  // 1 + 2^-8 is exactly halfway between two bf16 values: ties to even (down)
  assert.equal(bf16ToF32(f32ToBf16(1 + 2 ** -8)), 1);
  assert.equal(bf16ToF32(f32ToBf16(1 + 3 * 2 ** -8)), 1 + 2 ** -6);
  assert.equal(f32ToF16(1), 0x3c00);
  assert.equal(f16ToF32(0x3c00), 1);
  assert.equal(f16ToF32(f32ToF16(65504)), 65504);
  assert.equal(f16ToF32(f32ToF16(1e6)), Number.POSITIVE_INFINITY);
  assert.equal(f16ToF32(f32ToF16(2 ** -24)), 2 ** -24); // smallest subnormal
  for (let h = 0; h < 0x7c00; h += 7) assert.equal(f32ToF16(f16ToF32(h)), h);
  assert.ok(Number.isNaN(f16ToF32(f32ToF16(Number.NaN))));
});

test('views share storage and contiguous() copies in row-major order', () => {
  const t = tensor([1, 2, 3, 4, 5, 6], [2, 3]);
  const tt = transpose(t);
  assert.deepEqual(tt.shape, [3, 2]);
  assert.equal(tt.isContiguous(), false);
  assert.deepEqual(tt.toArray(), [1, 4, 2, 5, 3, 6]);
  const c = contiguous(tt);
  assert.equal(c.isContiguous(), true);
  assert.deepEqual(c.toArray(), [1, 4, 2, 5, 3, 6]);
  const s = slice(t, 1, 1, 3);
  assert.deepEqual(s.toArray(), [2, 3, 5, 6]);
  assert.equal(s.storage, t.storage);
  const r = reshape(t, [3, -1]);
  assert.deepEqual(r.shape, [3, 2]);
  const p = permute(reshape(t, [1, 2, 3]), [2, 0, 1]);
  assert.deepEqual(p.shape, [3, 1, 2]);
  assert.deepEqual(p.toArray(), [1, 4, 2, 5, 3, 6]);
  assert.throws(() => reshape(t, [4, 2]), ShapeError);
});

test('dispose frees storage once every view lets go; use after dispose is a LifetimeError', () => {
  const before = memoryStats().liveBytes;
  const t = empty([1000]);
  const v = slice(t, 0, 10, 20);
  assert.equal(memoryStats().liveBytes, before + 4000);
  t.dispose();
  assert.equal(memoryStats().liveBytes, before + 4000);
  v.dispose();
  assert.equal(memoryStats().liveBytes, before);
  assert.throws(() => t.toF32(), LifetimeError);
  t.dispose(); // idempotent
});

test('tidy frees what was created inside except the result and kept tensors', () => {
  const before = memoryStats().liveBytes;
  let kept: Tensor | null = null;
  const out = tidy(() => {
    empty([100]);
    kept = keep(empty([10]));
    const inner = tidy(() => {
      empty([5]);
      return empty([7]);
    });
    return { inner };
  });
  assert.equal(memoryStats().liveBytes, before + 4 * (10 + 7));
  out.inner.dispose();
  kept!.dispose();
  assert.equal(memoryStats().liveBytes, before);
  // an exception inside a scope frees its tensors too
  assert.throws(() =>
    tidy(() => {
      empty([50]);
      throw new Error('boom');
    }),
  );
  assert.equal(memoryStats().liveBytes, before);
});

test('fromTyped checks sizes; rng is reproducible and serialisable', () => {
  assert.throws(() => Tensor.fromTyped(new Float32Array(5), [2, 3]), ShapeError);
  const a = new Rng(42);
  const b = new Rng(42);
  const xs = [a.uniform(), a.normal(), a.nextU32()];
  assert.deepEqual(xs, [b.uniform(), b.normal(), b.nextU32()]);
  const st = a.state();
  const n1 = [a.normal(), a.normal(), a.uniform()];
  a.setState(st);
  assert.deepEqual([a.normal(), a.normal(), a.uniform()], n1);
  assert.notDeepEqual(new Rng(1).nextU32(), new Rng(2).nextU32());
});

test('the reference copy between views whose rows are contiguous but not each other (a KV-cache write)', () => {
  const src = Tensor.fromTyped(
    Float32Array.from({ length: 2 * 3 * 7 }, (_, i) => i),
    [2, 3, 7],
  ).view([2, 3, 4], [21, 7, 1], 2); // rows of 4 out of 7, from element 2
  const dst = empty([2, 5, 3, 4]).view([2, 3, 4], [60, 4, 1], 8); // position 0 of a [2, ., 3, 4] buffer, row 2
  jsBackend.copy(src, dst);
  for (let b = 0; b < 2; b++)
    for (let r = 0; r < 3; r++)
      for (let c = 0; c < 4; c++)
        assert.equal((dst.data as Float32Array)[8 + b * 60 + r * 4 + c], 2 + b * 21 + r * 7 + c, `${b} ${r} ${c}`);
  // nothing else written (every copied value is >= 2)
  const all = dst.data as Float32Array;
  let written = 0;
  for (let i = 0; i < all.length; i++) if (all[i] !== 0) written++;
  assert.equal(written, 2 * 3 * 4);
});
