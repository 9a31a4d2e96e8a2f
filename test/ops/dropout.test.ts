import assert from 'node:assert/strict';
import { test } from 'node:test';
import { dropoutBits } from '../../src/backend/cpu/js-dropout.ts';
import { ConfigError, DTypeError } from '../../src/core/errors.ts';
import { Rng } from '../../src/core/rng.ts';
import { intTensor, ones, tensor } from '../../src/ops/create.ts';
import { dropout } from '../../src/ops/dropout.ts';
import { sum } from '../../src/ops/reduce.ts';
import { backward } from '../../src/ops/tape.ts';
import { gradcheck, randomTensor } from '../helpers/gradcheck.ts';

test('dropout: the same seed gives the same mask, the next call a different one', () => {
  const x = ones([64, 33]);
  const a = dropout(x, 0.3, new Rng(42)).toArray();
  const b = dropout(x, 0.3, new Rng(42)).toArray();
  assert.deepEqual(a, b);
  const r = new Rng(42);
  dropout(x, 0.3, r);
  const c = dropout(x, 0.3, r).toArray();
  assert.notDeepEqual(a, c);
  assert.notDeepEqual(a, dropout(x, 0.3, new Rng(43)).toArray());
  // the rng advances by exactly two draws
  const r1 = new Rng(7);
  const r2 = new Rng(7);
  dropout(x, 0.5, r1);
  r2.nextU32();
  r2.nextU32();
  assert.equal(r1.nextU32(), r2.nextU32());
});

test('dropout keeps about 1 - p of the elements, scaled by 1 / (1 - p)', () => {
  const n = 40000;
  for (const p of [0.1, 0.5, 0.9]) {
    const out = dropout(ones([n]), p, new Rng(1)).toF32();
    let kept = 0;
    const scale = Math.fround(1 / (1 - p));
    for (const v of out) {
      if (v !== 0) {
        assert.equal(v, scale);
        kept++;
      }
    }
    const sd = Math.sqrt(n * p * (1 - p));
    assert.ok(Math.abs(kept - n * (1 - p)) < 5 * sd, `p=${p}: kept ${kept} of ${n}`);
  }
  // the draws are uniform: a chi-square over 16 buckets stays small
  const buckets = new Array<number>(16).fill(0);
  for (let i = 0; i < 65536; i++) buckets[dropoutBits(i, 0x1234, 0xbeef) >>> 28]!++;
  const chi = buckets.reduce((s, c) => s + (c - 4096) ** 2 / 4096, 0);
  assert.ok(chi < 45, `chi-square ${chi} over 16 buckets`);
});

test('dropout backward uses the forward mask; matches finite differences', () => {
  const x = randomTensor([7, 13], new Rng(2));
  const y = dropout(x, 0.4, new Rng(9));
  const yv = y.toArray();
  const xv = x.toArray();
  backward(sum(y));
  const g = x.grad!.toArray();
  const scale = Math.fround(1 / 0.6);
  for (let i = 0; i < g.length; i++) {
    if (yv[i] === 0) assert.equal(g[i], 0);
    else {
      assert.equal(g[i], scale);
      assert.equal(yv[i], Math.fround(xv[i]! * (1 / 0.6)));
    }
  }
  // a fresh Rng of the same seed each call gives the same mask, so finite differences see one function
  for (const shape of [[1], [17], [3, 5, 2]])
    gradcheck(`dropout ${shape}`, (v) => dropout(v!, 0.3, new Rng(5)), [randomTensor(shape, new Rng(4))]);
});

test('dropout with p = 0 or not training is the identity (no node, no copy); p = 1 gives zeros', () => {
  const x = randomTensor([3, 4], new Rng(1));
  assert.equal(dropout(x, 0, new Rng(1)), x);
  assert.equal(dropout(x, 0.5, new Rng(1), false), x);
  const z = dropout(x, 1, new Rng(1));
  assert.ok(z.toArray().every((v) => v === 0));
  backward(sum(z));
  assert.ok(x.grad!.toArray().every((v) => v === 0));
  assert.throws(() => dropout(x, 1.5, new Rng(1)), ConfigError);
  assert.throws(() => dropout(x, -0.1, new Rng(1)), ConfigError);
  assert.throws(() => dropout(x, Number.NaN, new Rng(1)), ConfigError);
  assert.throws(() => dropout(intTensor([1, 2]), 0.5, new Rng(1)), DTypeError);
  // bf16 input: converted, same mask as its f32 values
  const h = tensor([1, 2, 3, 4, 5, 6, 7, 8], [8], 'bf16');
  assert.deepEqual(
    dropout(h, 0.5, new Rng(3)).toArray(),
    dropout(tensor([1, 2, 3, 4, 5, 6, 7, 8]), 0.5, new Rng(3)).toArray(),
  );
});

test('the dropout mask follows the documented counter-based formula', () => {
  // fmix32(1) from MurmurHash3 is 0x514e28b7: with key0 = 1 ^ i and key1 = 0 the inner hash is fmix32(1)
  const fmix = (h: number) => {
    h ^= h >>> 16;
    h = Math.imul(h, 0x85ebca6b);
    h ^= h >>> 13;
    h = Math.imul(h, 0xc2b2ae35);
    h ^= h >>> 16;
    return h >>> 0;
  };
  assert.equal(fmix(1), 0x514e28b7);
  assert.equal(dropoutBits(0, 1, 0), fmix(0x514e28b7));
  // pinned values: a change here breaks reproducibility of saved runs and the native/CUDA kernels
  const idx = [0, 1, 2, 3, 1000000];
  assert.deepEqual(
    idx.map((i) => dropoutBits(i, 0xdeadbeef, 0x12345678)),
    [0x1c4edb50, 0xe07c910e, 0xb80d76b1, 0xf911658b, 0x24dcb343],
  );
  assert.deepEqual(
    idx.map((i) => dropoutBits(i, 0xdeadbeef, 0x12345678)),
    idx.map((i) => fmix((fmix((i ^ 0xdeadbeef) >>> 0) ^ 0x12345678) >>> 0)),
  );
});
