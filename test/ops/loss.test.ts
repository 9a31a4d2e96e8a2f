import assert from 'node:assert/strict';
import { test } from 'node:test';
import { ConfigError, DTypeError, IndexError, ShapeError } from '../../src/core/errors.ts';
import { Rng } from '../../src/core/rng.ts';
import { tidy } from '../../src/core/scope.ts';
import { memoryStats, resetPeakMemory } from '../../src/core/storage.ts';
import { intTensor, tensor } from '../../src/ops/create.ts';
import { crossEntropy } from '../../src/ops/loss.ts';
import { sum } from '../../src/ops/reduce.ts';
import { backward } from '../../src/ops/tape.ts';
import { gradcheck, randomTensor } from '../helpers/gradcheck.ts';

const rng = new Rng(5);
const R = (shape: number[], scale = 1, req = true) => randomTensor(shape, rng, scale, req);

/** Random targets in [0, V), about a quarter of them ignored (-100). */
function targets(shape: number[], vocab: number, ignoreShare = 0.25): number[] {
  const n = shape.reduce((a, b) => a * b, 1);
  return Array.from({ length: n }, () => (rng.uniform() < ignoreShare ? -100 : rng.int(vocab)));
}

/** Per-row losses in f64 (NaN marks an ignored row). */
function direct(x: Float32Array, t: number[], vocab: number): number[] {
  return t.map((target, r) => {
    if (target === -100) return Number.NaN;
    let m = Number.NEGATIVE_INFINITY;
    for (let j = 0; j < vocab; j++) m = Math.max(m, x[r * vocab + j]!);
    let s = 0;
    for (let j = 0; j < vocab; j++) s += Math.exp(x[r * vocab + j]! - m);
    return m + Math.log(s) - x[r * vocab + target]!;
  });
}

test('crossEntropy matches finite differences (mean, sum, none; ignored targets; odd shapes)', () => {
  for (const [shape, vocab] of [
    [[1], 1],
    [[1], 2],
    [[5], 7],
    [[2, 3], 11],
    [[13], 37],
  ] as [number[], number][]) {
    const t = intTensor(targets(shape, vocab), shape);
    for (const reduction of ['mean', 'sum', 'none'] as const)
      gradcheck(`crossEntropy ${shape}x${vocab} ${reduction}`, (x) => crossEntropy(x!, t, { reduction }), [
        R([...shape, vocab], 2),
      ]);
  }
  // a custom ignore index that is also a valid class
  const t = intTensor([0, 3, 3, 1]);
  gradcheck('crossEntropy ignoreIndex 3', (x) => crossEntropy(x!, t, { ignoreIndex: 3 }), [R([4, 5])]);
});

test('crossEntropy values match the direct formula; the mean is over counted targets only', () => {
  const shape = [3, 17];
  const vocab = 101;
  const x = R([...shape, vocab], 4, false);
  const tv = targets(shape, vocab);
  tv[0] = -100;
  const t = intTensor(tv, shape);
  const per = direct(x.toF32(), tv, vocab);
  const counted = per.filter((v) => !Number.isNaN(v));
  const total = counted.reduce((a, b) => a + b, 0);
  const mean = crossEntropy(x, t);
  assert.deepEqual(mean.shape, []);
  assert.ok(Math.abs(mean.item() - total / counted.length) < 1e-5 * total);
  assert.ok(Math.abs(crossEntropy(x, t, { reduction: 'sum' }).item() - total) < 1e-5 * total);
  const none = crossEntropy(x, t, { reduction: 'none' });
  assert.deepEqual(none.shape, shape);
  none.toArray().forEach((v, i) => {
    const e = Number.isNaN(per[i]!) ? 0 : per[i]!;
    assert.ok(Math.abs(v - e) <= 1e-5 * (1 + e), `row ${i}: ${v} vs ${e}`);
  });
  // huge logits stay finite (stable log-sum-exp)
  const big = tensor([1e4, 1e4 - 1, -1e4, 3e4, 3e4, 3e4], [2, 3]);
  const l = crossEntropy(big, intTensor([1, 2]), { reduction: 'none' }).toArray();
  assert.ok(Math.abs(l[0]! - (1 + Math.log(1 + Math.exp(-1)))) < 1e-5);
  assert.ok(Math.abs(l[1]! - Math.log(3)) < 1e-5);
  // bf16 logits are converted
  const b16 = tensor([1, 2, 3, 4], [2, 2], 'bf16');
  const l16 = crossEntropy(b16, intTensor([1, 0])).item();
  assert.ok(Math.abs(l16 - (Math.log(1 + Math.exp(-1)) + Math.log(1 + Math.exp(1))) / 2) < 1e-6);
});

test('crossEntropy gradient is (softmax - onehot) * g / count, and 0 (not NaN) when every target is ignored', () => {
  const x = tensor([0, 0, Math.log(2), 1, 2, 3], [2, 3]);
  x.requiresGrad = true;
  backward(crossEntropy(x, intTensor([2, -100])));
  const g = x.grad!.toArray();
  // row 0: softmax = [1/4, 1/4, 1/2], target 2, count 1; row 1 ignored
  for (const [i, e] of [0.25, 0.25, -0.5, 0, 0, 0].entries()) assert.ok(Math.abs(g[i]! - e) < 1e-6, `${g[i]} vs ${e}`);
  for (const reduction of ['mean', 'sum'] as const) {
    const y = R([4, 9]);
    const loss = crossEntropy(y, intTensor([-100, -100, -100, -100]), { reduction });
    assert.equal(loss.item(), 0);
    backward(loss);
    assert.ok(y.grad!.toArray().every((v) => v === 0));
  }
  // no rows at all
  const e = R([0, 5]);
  assert.equal(crossEntropy(e, intTensor([], [0])).item(), 0);
});

test('crossEntropy backward allocates one logits-sized buffer and frees what the forward saved', () => {
  const [n, v] = [16, 4099];
  const logitsBytes = n * v * 4;
  const before = memoryStats().liveStorages;
  tidy(() => {
    const x = R([n, v], 3);
    const loss = crossEntropy(x, intTensor(targets([n], v)));
    resetPeakMemory();
    const live = memoryStats().liveBytes;
    backward(loss);
    const peak = memoryStats().peakBytes - live;
    assert.ok(peak >= logitsBytes && peak < logitsBytes + 4096, `backward peaked at ${peak} extra bytes`);
    assert.deepEqual(x.grad!.shape, [n, v]);
    x.dispose();
  });
  assert.equal(memoryStats().liveStorages, before, 'crossEntropy leaked storage');
});

test('crossEntropy rejects out-of-range targets (naming the position), bad dtypes and shapes', () => {
  const x = R([2, 3, 5], 1, false);
  assert.throws(
    () => crossEntropy(x, intTensor([0, 1, 2, 3, 4, 5], [2, 3])),
    (e: unknown) =>
      e instanceof IndexError && /target 5 at position \[1, 2\]/.test(e.message) && /\[0, 5\)/.test(e.message),
  );
  assert.throws(() => crossEntropy(R([3, 4], 1, false), intTensor([0, -1, 2])), /target -1 at position 1 /);
  assert.throws(() => crossEntropy(R([3, 4], 1, false), intTensor([0, 1, 2], [1, 3])), ShapeError);
  assert.throws(() => crossEntropy(R([3, 4], 1, false), intTensor([0, 1])), /logits \[3, 4\] and targets \[2\]/);
  assert.throws(() => crossEntropy(R([3, 4], 1, false), tensor([0, 1, 2])), DTypeError);
  assert.throws(() => crossEntropy(intTensor([1, 2], [1, 2]), intTensor([0])), DTypeError);
  assert.throws(() => crossEntropy(R([1, 2], 1, false), intTensor([0]), { reduction: 'avg' as never }), ConfigError);
  // a failed call leaves no node and no leaked storage
  const before = memoryStats().liveStorages;
  const y = R([2, 4]);
  const bad = intTensor([9, 0]);
  assert.throws(() => crossEntropy(y, bad), IndexError);
  y.dispose();
  bad.dispose();
  assert.equal(memoryStats().liveStorages, before);
  // the sum over per-row losses is differentiable through other ops
  const z = R([3, 4]);
  backward(sum(crossEntropy(z, intTensor([1, 2, 3]), { reduction: 'none' })));
  assert.ok(z.grad);
});
