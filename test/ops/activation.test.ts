import assert from 'node:assert/strict';
import { test } from 'node:test';
import { erf } from '../../src/backend/cpu/js-activation.ts';
import { ConfigError, DTypeError, ShapeError } from '../../src/core/errors.ts';
import { Rng } from '../../src/core/rng.ts';
import { activationByName, gelu, logSoftmax, softmax, swiglu } from '../../src/ops/activation.ts';
import { intTensor, tensor } from '../../src/ops/create.ts';
import { sum } from '../../src/ops/reduce.ts';
import { transpose } from '../../src/ops/shape.ts';
import { backward } from '../../src/ops/tape.ts';
import { gradcheck, randomTensor } from '../helpers/gradcheck.ts';

const rng = new Rng(23);
const R = (shape: number[], scale = 1, req = true) => randomTensor(shape, rng, scale, req);

function assertClose(actual: ArrayLike<number>, expected: ArrayLike<number>, tol: number, what: string): void {
  assert.equal(actual.length, expected.length, `${what}: length`);
  for (let i = 0; i < actual.length; i++) {
    const a = actual[i]!;
    const e = expected[i]!;
    assert.ok(Math.abs(a - e) <= tol * (1 + Math.abs(e)), `${what}[${i}]: ${a} vs ${e}`);
  }
}

const sig = (v: number) => 1 / (1 + Math.exp(-v));

test('swiglu = silu(gate) * up: values and finite differences for both inputs on odd shapes', () => {
  for (const shape of [[1], [7], [3, 13], [2, 5, 3], [1, 1, 17]]) {
    gradcheck(`swiglu ${shape}`, (a, b) => swiglu(a!, b!), [R(shape, 2), R(shape)]);
  }
  const a = R([4, 9], 3, false);
  const b = R([4, 9], 1, false);
  const av = a.toF32();
  const bv = b.toF32();
  assertClose(
    swiglu(a, b).toF32(),
    Array.from(av, (v, i) => v * sig(v) * bv[i]!),
    1e-6,
    'swiglu',
  );
  // a transposed view of each input
  gradcheck('swiglu of transposed views', (x, y) => swiglu(transpose(x!), transpose(y!)), [R([3, 5]), R([3, 5])]);
  // only up needs a gradient: the gate gets none
  const g = R([5], 1, false);
  const u = R([5]);
  backward(sum(swiglu(g, u)));
  assert.equal(g.grad, null);
  assertClose(
    u.grad!.toF32(),
    Array.from(g.toF32(), (v) => v * sig(v)),
    1e-6,
    'd up',
  );
  assert.throws(() => swiglu(R([2, 3]), R([3, 2])), /swiglu: gate \[2, 3\] and up \[3, 2\]/);
  assert.throws(() => swiglu(R([2, 3]), R([3, 2])), ShapeError);
  assert.throws(() => swiglu(intTensor([1]), intTensor([1])), DTypeError);
});

test('erf is accurate to double precision', () => {
  const known: [number, number][] = [
    [0, 0],
    [0.1, 0.1124629160182849],
    [0.5, 0.5204998778130465],
    [1, 0.8427007929497149],
    [2, 0.9953222650189527],
    [3, 0.9999779095030014],
    [4, 0.9999999845827421],
    [5.9, 0.9999999999999999],
    [10, 1],
  ];
  for (const [x, e] of known) {
    assert.ok(Math.abs(erf(x) - e) <= 4e-16, `erf(${x}) = ${erf(x)}, expected ${e}`);
    assert.ok(Math.abs(erf(-x) + e) <= 4e-16, `erf(${-x})`);
  }
  assert.ok(Number.isNaN(erf(Number.NaN)));
});

test('gelu (exact and tanh) matches PyTorch values and finite differences', () => {
  // torch.nn.functional.gelu(x) and gelu(x, approximate='tanh') in f64
  const xs = [-3, -1, -0.5, 0, 0.5, 1, 3];
  const exact = [
    -0.004049694094676, -0.158655253931457, -0.154268917207801, 0, 0.345731082792199, 0.841344746068543,
    2.995950305905324,
  ];
  const approx = [-0.003637392044, -0.158808009397, -0.154285988576, 0, 0.345714011424, 0.841191990603, 2.996362607956];
  const x = tensor(xs);
  assertClose(gelu(x).toF32(), exact, 2e-7, 'gelu exact');
  assertClose(gelu(x, 'tanh').toF32(), approx, 2e-7, 'gelu tanh');
  assert.deepEqual(gelu(x, true).toArray(), gelu(x, 'tanh').toArray());
  assert.deepEqual(gelu(x, false).toArray(), gelu(x).toArray());
  for (const shape of [[1], [13], [3, 7], [2, 3, 5]]) {
    gradcheck(`gelu exact ${shape}`, (v) => gelu(v!), [R(shape, 2)]);
    gradcheck(`gelu tanh ${shape}`, (v) => gelu(v!, 'tanh'), [R(shape, 2)]);
  }
  assert.throws(() => gelu(x, 'fast' as never), ConfigError);
});

test('softmax and logSoftmax: stable, match the direct formula and finite differences', () => {
  for (const shape of [[1], [1, 1], [5], [3, 7], [2, 3, 11], [4, 1]]) {
    gradcheck(`softmax ${shape}`, (v) => softmax(v!), [R(shape, 2)]);
    gradcheck(`logSoftmax ${shape}`, (v) => logSoftmax(v!), [R(shape, 2)]);
  }
  gradcheck('softmax of a transposed view', (v) => softmax(transpose(v!)), [R([5, 3])]);
  // direct formula on huge logits (a naive exp overflows)
  const vals = [1000, 1001, 1002, -1000, 0, 5e4, 5e4 - 1, 5e4 - 2];
  const x = tensor(vals, [2, 4]);
  const ref = (row: number[]) => {
    const m = Math.max(...row);
    const lse = m + Math.log(row.reduce((s, v) => s + Math.exp(v - m), 0));
    return row.map((v) => v - lse);
  };
  const ls = [...ref(vals.slice(0, 4)), ...ref(vals.slice(4))];
  assertClose(logSoftmax(x).toF32(), ls, 1e-6, 'logSoftmax');
  assertClose(softmax(x).toF32(), ls.map(Math.exp), 1e-6, 'softmax');
  const p = softmax(R([6, 37], 5, false)).toF32();
  for (let r = 0; r < 6; r++) {
    let s = 0;
    for (let j = 0; j < 37; j++) s += p[r * 37 + j]!;
    assert.ok(Math.abs(s - 1) < 1e-5, `row ${r} sums to ${s}`);
  }
  // masked entries: -inf gets probability 0; a fully masked row gives zeros rather than NaN
  const inf = Number.NEGATIVE_INFINITY;
  const m = softmax(tensor([0, inf, 0, inf, inf, inf], [2, 3])).toArray();
  assert.deepEqual(m, [0.5, 0, 0.5, 0, 0, 0]);
  assert.deepEqual(logSoftmax(tensor([0, inf], [1, 2])).toArray(), [0, inf]);
  assert.throws(() => softmax(tensor([1], [])), ShapeError);
});

test('activationByName maps Hugging Face hidden_act names', () => {
  const x = R([9], 2, false);
  assert.deepEqual(activationByName('gelu')(x).toArray(), gelu(x).toArray());
  assert.deepEqual(activationByName('gelu_pytorch_tanh')(x).toArray(), gelu(x, 'tanh').toArray());
  assert.deepEqual(activationByName('gelu_new')(x).toArray(), gelu(x, 'tanh').toArray());
  const s = activationByName('silu')(x).toF32();
  assertClose(
    s,
    Array.from(x.toF32(), (v) => v * sig(v)),
    1e-6,
    'silu',
  );
  assert.throws(() => activationByName('mish'), /hidden_act 'mish' is not supported/);
});
