import assert from 'node:assert/strict';
import { test } from 'node:test';
import { type Backend, getBackend, jsBackend, setBackend } from '../../src/backend/index.ts';
import { bf16ToF32, f16ToF32 } from '../../src/core/dtype.ts';
import { DTypeError, ShapeError } from '../../src/core/errors.ts';
import { Rng } from '../../src/core/rng.ts';
import { tidy } from '../../src/core/scope.ts';
import { memoryStats } from '../../src/core/storage.ts';
import type { Tensor } from '../../src/core/tensor.ts';
import { intTensor, tensor } from '../../src/ops/create.ts';
import { rmsnorm } from '../../src/ops/norm.ts';
import { sum } from '../../src/ops/reduce.ts';
import { transpose } from '../../src/ops/shape.ts';
import { backward } from '../../src/ops/tape.ts';
import { gradcheck, randomTensor } from '../helpers/gradcheck.ts';

const rng = new Rng(11);
const R = (shape: number[], scale = 1, req = true) => randomTensor(shape, rng, scale, req);

/** HF LlamaRMSNorm in f64: x * rsqrt(mean(x^2) + eps) * w over the last axis. */
function direct(x: Float32Array, w: ArrayLike<number>, dim: number, eps: number): Float64Array {
  const out = new Float64Array(x.length);
  for (let r = 0; r < x.length / dim; r++) {
    let ss = 0;
    for (let j = 0; j < dim; j++) ss += x[r * dim + j]! ** 2;
    const s = 1 / Math.sqrt(ss / dim + eps);
    for (let j = 0; j < dim; j++) out[r * dim + j] = x[r * dim + j]! * s * w[j]!;
  }
  return out;
}

function assertClose(actual: ArrayLike<number>, expected: ArrayLike<number>, tol: number, what: string): void {
  assert.equal(actual.length, expected.length, `${what}: length`);
  for (let i = 0; i < actual.length; i++) {
    const a = actual[i]!;
    const e = expected[i]!;
    assert.ok(Math.abs(a - e) <= tol * (1 + Math.abs(e)), `${what}[${i}]: ${a} vs ${e}`);
  }
}

test('rmsnorm matches finite differences for x and w on odd shapes, including [B, T, H, D]', () => {
  for (const shape of [[1, 1], [3, 7], [2, 3, 13], [2, 3, 2, 5], [1, 17], [5]]) {
    const d = shape[shape.length - 1]!;
    gradcheck(`rmsnorm ${shape}`, (x, w) => rmsnorm(x!, w!, 1e-5), [R(shape), R([d])]);
  }
  // a larger eps matters in the gradient too
  gradcheck('rmsnorm eps 0.5', (x, w) => rmsnorm(x!, w!, 0.5), [R([3, 11], 0.3), R([11])]);
  // a transposed (non-contiguous) input
  gradcheck('rmsnorm of a transposed view', (x, w) => rmsnorm(transpose(x!), w!), [R([3, 7]), R([3])]);
});

test('rmsnorm values match the direct formula; works on any leading shape', () => {
  for (const shape of [
    [4, 8],
    [2, 3, 4, 16],
    [1, 1, 1, 31],
  ]) {
    const d = shape[shape.length - 1]!;
    const x = R(shape, 3, false);
    const w = R([d], 1, false);
    const y = rmsnorm(x, w, 1e-6);
    assert.deepEqual(y.shape, shape);
    assert.equal(y.dtype, 'f32');
    assertClose(y.toF32(), direct(x.toF32(), w.toF32(), d, 1e-6), 1e-6, `rmsnorm ${shape}`);
  }
  // ones weight: every row has mean square 1 (up to eps)
  const x = tensor([3, 4, 0, 0, 1e-3, -1e-3], [3, 2]);
  const y = rmsnorm(x, tensor([1, 1]), 0).toArray();
  assertClose(y.slice(0, 2), [3 / Math.sqrt(12.5), 4 / Math.sqrt(12.5)], 1e-6, 'row 0');
  assert.deepEqual(y.slice(4), [1, -1].map(Math.fround));
  // an all-zero row with eps 0 is 0 * inf = NaN in PyTorch too; with eps it is 0
  assert.deepEqual(rmsnorm(tensor([0, 0], [1, 2]), tensor([1, 1]), 1e-6).toArray(), [0, 0]);
});

test('rmsnorm with a bf16 or f16 weight reads it in place and matches the f32 weight of the same values', () => {
  const x = R([3, 2, 9], 1, false);
  const wf = R([9], 1, false);
  for (const dt of ['bf16', 'f16'] as const) {
    const w16 = tensor(wf.toF32(), [9], dt);
    const decoded = Array.from(w16.data as Uint16Array, dt === 'bf16' ? bf16ToF32 : f16ToF32);
    const w32 = tensor(decoded, [9]);
    assert.deepEqual(rmsnorm(x, w16).toArray(), rmsnorm(x, w32).toArray());
    // gradients: dw comes back as f32 of the weight's shape and equals the f32 weight's
    const grads = (w: Tensor) => {
      const xi = tensor(x.toF32(), x.shape);
      xi.requiresGrad = true;
      w.requiresGrad = true;
      backward(sum(rmsnorm(xi, w)));
      const r = [xi.grad!.toArray(), w.grad!.toArray(), w.grad!.dtype];
      w.grad!.dispose();
      w.grad = null;
      return r;
    };
    assert.deepEqual(grads(w16), grads(w32));
  }
});

test('rmsnorm computes no weight gradient for a frozen weight and frees what it saved', () => {
  const calls: { dx: boolean; dw: boolean }[] = [];
  const spy: Backend = {
    ...jsBackend,
    rmsNormBackward(g, x, w, rstd, dx, dw, rows, dim) {
      calls.push({ dx: dx !== null, dw: dw !== null });
      jsBackend.rmsNormBackward(g, x, w, rstd, dx, dw, rows, dim);
    },
  };
  const prev = getBackend();
  setBackend(spy);
  try {
    const before = memoryStats().liveStorages;
    tidy(() => {
      const x = R([4, 6]);
      const w = R([6], 1, false);
      backward(sum(rmsnorm(x, w)));
      assert.ok(x.grad);
      assert.equal(w.grad, null);
      x.dispose();
    });
    assert.equal(memoryStats().liveStorages, before, 'rmsnorm leaked storage');
    // only the weight needs a gradient: dx is not computed
    const x = R([2, 5], 1, false);
    const w = R([5]);
    backward(sum(rmsnorm(x, w)));
    assert.ok(w.grad);
    assert.deepEqual(calls, [
      { dx: true, dw: false },
      { dx: false, dw: true },
    ]);
    // nothing requires a gradient: no node at all
    const y = rmsnorm(R([2, 5], 1, false), R([5], 1, false));
    assert.equal(y.gradFn, null);
  } finally {
    setBackend(prev);
  }
});

test('rmsnorm rejects a weight that does not fit the last axis and non-float inputs', () => {
  assert.throws(
    () => rmsnorm(R([2, 4], 1, false), R([5], 1, false)),
    (e: unknown) => {
      assert.ok(e instanceof ShapeError);
      assert.match(e.message, /rmsnorm: weight \[5\] .* x \[2, 4\]/);
      return true;
    },
  );
  assert.throws(() => rmsnorm(R([2, 4], 1, false), R([1, 4], 1, false)), ShapeError);
  assert.throws(() => rmsnorm(intTensor([1, 2, 3, 4], [2, 2]), R([2], 1, false)), DTypeError);
});
