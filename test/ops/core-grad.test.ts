import assert from 'node:assert/strict';
import { test } from 'node:test';
import { ShapeError } from '../../src/core/errors.ts';
import { Rng } from '../../src/core/rng.ts';
import { intTensor, tensor } from '../../src/ops/create.ts';
import * as E from '../../src/ops/elementwise.ts';
import { linear, matmul } from '../../src/ops/matmul.ts';
import { max, mean, sum } from '../../src/ops/reduce.ts';
import { concat, indexSelect, permute, reshape, slice, transpose } from '../../src/ops/shape.ts';
import { backward } from '../../src/ops/tape.ts';
import { gradcheck, randomTensor } from '../helpers/gradcheck.ts';

const rng = new Rng(7);
const R = (shape: number[], scale = 1, req = true) => randomTensor(shape, rng, scale, req);

test('add/sub/mul/div with broadcasting match finite differences', () => {
  for (const [sa, sb] of [
    [
      [3, 5],
      [3, 5],
    ],
    [[2, 3, 7], [7]],
    [
      [4, 1],
      [1, 5],
    ],
    [[1], [2, 3]],
  ] as number[][][]) {
    gradcheck(`add ${sa} ${sb}`, (a, b) => E.add(a!, b!), [R(sa!), R(sb!)]);
    gradcheck(`sub ${sa} ${sb}`, (a, b) => E.sub(a!, b!), [R(sa!), R(sb!)]);
    gradcheck(`mul ${sa} ${sb}`, (a, b) => E.mul(a!, b!), [R(sa!), R(sb!)]);
    const b = R(sb!);
    const bd = b.data as Float32Array;
    for (let i = 0; i < bd.length; i++) bd[i] = 1.5 + Math.abs(bd[i]!);
    gradcheck(`div ${sa} ${sb}`, (x, y) => E.div(x!, y!), [R(sa!), b]);
  }
});

test('unary math and activations match finite differences', () => {
  const pos = R([3, 7]);
  const pd = pos.data as Float32Array;
  for (let i = 0; i < pd.length; i++) pd[i] = 0.5 + Math.abs(pd[i]!);
  gradcheck('exp', (x) => E.exp(x!), [R([3, 7], 0.5)]);
  gradcheck('log', (x) => E.log(x!), [pos]);
  gradcheck('sqrt', (x) => E.sqrt(x!), [pos]);
  gradcheck('pow 3', (x) => E.pow(x!, 3), [R([2, 5])]);
  gradcheck('pow -0.5', (x) => E.pow(x!, -0.5), [pos]);
  gradcheck('scale', (x) => E.scale(x!, -2.5), [R([13])]);
  gradcheck('addScalar', (x) => E.addScalar(x!, 3), [R([13])]);
  gradcheck('sigmoid', (x) => E.sigmoid(x!), [R([17])]);
  gradcheck('tanh', (x) => E.tanh(x!), [R([17])]);
  gradcheck('silu', (x) => E.silu(x!), [R([17])]);
});

test('sum, mean and max over axes match finite differences', () => {
  gradcheck('sum all', (x) => sum(x!), [R([3, 4, 5])]);
  gradcheck('sum axis 1', (x) => sum(x!, 1), [R([3, 4, 5])]);
  gradcheck('sum axes 0,2 keepdim', (x) => sum(x!, [0, 2], true), [R([3, 4, 5])]);
  gradcheck('mean -1', (x) => mean(x!, -1), [R([2, 7])]);
  // well-separated values, so a finite-difference step never changes the argmax
  const perm = rng.shuffle([...Array(55).keys()]).map((v) => v * 0.1);
  const mx = tensor(perm, [5, 11]);
  mx.requiresGrad = true;
  gradcheck('max -1', (x) => max(x!, -1), [mx]);
  // ties share the gradient
  const t = tensor([1, 3, 3, 2], [4]);
  t.requiresGrad = true;
  backward(max(t));
  assert.deepEqual(t.grad!.toArray(), [0, 0.5, 0.5, 0]);
});

test('reshape, permute, transpose, slice, concat, indexSelect match finite differences', () => {
  gradcheck('reshape', (x) => reshape(x!, [6, -1]), [R([2, 3, 5])]);
  gradcheck('permute', (x) => permute(x!, [2, 0, 1]), [R([2, 3, 5])]);
  gradcheck('transpose', (x) => E.mul(transpose(x!), transpose(x!)), [R([3, 4])]);
  gradcheck('slice', (x) => slice(x!, 1, 1, 4), [R([2, 5, 3])]);
  gradcheck('concat', (a, b) => concat([a!, b!], 1), [R([2, 3]), R([2, 5])]);
  const idx = intTensor([2, 0, 2, 1]);
  gradcheck('indexSelect 0', (x) => indexSelect(x!, 0, idx), [R([3, 4])]);
  gradcheck('indexSelect 1', (x) => indexSelect(x!, 1, idx), [R([2, 3, 2])]);
  assert.throws(() => indexSelect(R([3, 4]), 0, intTensor([3])), /indexSelect|gatherRows/);
});

test('matmul (batched, transposed views, odd sizes) matches finite differences', () => {
  for (const [m, k, n] of [
    [1, 1, 1],
    [3, 7, 5],
    [13, 1, 2],
    [2, 17, 3],
  ] as number[][]) {
    gradcheck(`matmul ${m}x${k}x${n}`, (a, b) => matmul(a!, b!), [R([m!, k!]), R([k!, n!])]);
  }
  gradcheck('batched matmul', (a, b) => matmul(a!, b!), [R([2, 3, 4]), R([2, 4, 5])]);
  gradcheck('matmul with broadcast b', (a, b) => matmul(a!, b!), [R([2, 3, 4]), R([4, 5])]);
  gradcheck('matmul transposed operands', (a, b) => matmul(transpose(a!), transpose(b!)), [R([4, 3]), R([5, 4])]);
  assert.throws(() => matmul(R([2, 3]), R([4, 5])), ShapeError);
  // values: a permuted view is read in place
  const a = tensor([1, 2, 3, 4, 5, 6], [2, 3]);
  const b = tensor([1, 0, 0, 1, 1, 1], [3, 2]);
  assert.deepEqual(matmul(a, b).toArray(), [4, 5, 10, 11]);
  assert.deepEqual(matmul(transpose(b), transpose(a)).toArray(), [4, 10, 5, 11]);
});

test('linear: gradients for x, W and bias; a frozen W gets no gradient computed', () => {
  gradcheck('linear', (x, w, b) => linear(x!, w!, b!), [R([2, 3, 5]), R([7, 5]), R([7])]);
  gradcheck('linear 1x1', (x, w) => linear(x!, w!), [R([1, 1]), R([1, 1])]);
  const x = R([4, 6]);
  const w = R([3, 6], 1, false);
  const y = linear(x, w);
  backward(sum(y));
  assert.ok(x.grad);
  assert.equal(w.grad, null);
  assert.throws(() => linear(R([2, 4]), R([3, 5])), /linear: input \[2, 4\] does not fit weight \[3, 5\]/);
});

test('bf16 and f16 weights in linear are converted inside the kernel', () => {
  const x = tensor([1, 2, 3, 4], [1, 4]);
  for (const dt of ['bf16', 'f16'] as const) {
    const w = tensor([0.5, -1, 2, 0.25, 1, 1, 1, 1], [2, 4], dt);
    assert.deepEqual(linear(x, w).toArray(), [0.5 - 2 + 6 + 1, 10]);
  }
});
