import assert from 'node:assert/strict';
import { test } from 'node:test';
import type { GemmArgs } from '../../src/backend/backend.ts';
import { getBackend, jsBackend, setBackend } from '../../src/backend/index.ts';
import { Rng } from '../../src/core/rng.ts';
import { tidy } from '../../src/core/scope.ts';
import type { Tensor } from '../../src/core/tensor.ts';
import { Embedding, Linear } from '../../src/nn/layers.ts';
import { intTensor, tensor } from '../../src/ops/create.ts';
import { dropout } from '../../src/ops/dropout.ts';
import { add, mul, scale } from '../../src/ops/elementwise.ts';
import { linear, matmul } from '../../src/ops/matmul.ts';
import { sum } from '../../src/ops/reduce.ts';
import { cast, slice, transpose } from '../../src/ops/shape.ts';
import { backward, noGrad } from '../../src/ops/tape.ts';
import { AdapterRuntime, LoraEmbedding, LoraLinear } from '../../src/peft/lora/layer.ts';
import { addRowsAt, doraLinear, doraWeightNorm, loraLinear, loraMixedRows } from '../../src/peft/lora/ops.ts';
import { gradcheck, randomTensor } from '../helpers/gradcheck.ts';

const rng = new Rng(11);
const R = (shape: number[], s = 1, req = true) => randomTensor(shape, rng, s, req);

function close(a: Float32Array, b: Float32Array, tol: number, what: string): void {
  assert.equal(a.length, b.length, `${what}: lengths`);
  for (let i = 0; i < a.length; i++)
    assert.ok(Math.abs(a[i]! - b[i]!) <= tol * (1 + Math.abs(b[i]!)), `${what}[${i}]: ${a[i]} vs ${b[i]}`);
}

test('loraLinear forward equals x W^T + b + s (x A^T) B^T', () => {
  const x = R([2, 3, 5], 1, false);
  const w = R([4, 5], 1, false);
  const b = R([4], 1, false);
  const A = R([2, 5], 1, false);
  const B = R([4, 2], 1, false);
  const lb = R([4], 1, false);
  const got = loraLinear(x, w, b, A, B, 0.7, { loraBias: lb }).toF32();
  const want = noGrad(() => add(add(linear(x, w, b), scale(linear(linear(x, A), B), 0.7)), scale(lb, 0.7)).toF32());
  close(got, want, 1e-5, 'loraLinear');
  // W in bf16 is read in place
  const wb = cast(w, 'bf16');
  const got16 = loraLinear(x, wb, null, A, B, 2).toF32();
  const want16 = noGrad(() => add(linear(x, wb), scale(linear(linear(x, A), B), 2)).toF32());
  close(got16, want16, 1e-5, 'loraLinear bf16');
});

test('loraLinear backward matches finite differences (x, A, B, biases; separate branch input; W trainable)', () => {
  gradcheck('lora x,A,B', (x, w, A, B) => loraLinear(x!, w!, null, A!, B!, 0.5), [
    R([3, 6]),
    R([5, 6], 1, false),
    R([3, 6]),
    R([5, 3]),
  ]);
  gradcheck('lora biases', (x, w, b, A, B, lb) => loraLinear(x!, w!, b!, A!, B!, 1.5, { loraBias: lb! }), [
    R([2, 2, 4]),
    R([3, 4], 1, false),
    R([3]),
    R([2, 4]),
    R([3, 2]),
    R([3]),
  ]);
  gradcheck('lora xl', (x, xl, w, A, B) => loraLinear(x!, w!, null, A!, B!, 0.8, { xl: xl! }), [
    R([4, 5]),
    R([4, 5]),
    R([3, 5], 1, false),
    R([2, 5]),
    R([3, 2]),
  ]);
  gradcheck('lora W trainable', (x, w, A, B) => loraLinear(x!, w!, null, A!, B!, 0.5), [
    R([3, 4]),
    R([2, 4]),
    R([1, 4]),
    R([2, 1]),
  ]);
  gradcheck('lora branch only', (x, A, B) => loraLinear(x!, null, null, A!, B!, 2), [R([3, 4]), R([2, 4]), R([5, 2])]);
});

test('the frozen base weight gets no gradient product: no gemm produces a [out, in] result, W.grad stays null', () => {
  const calls: GemmArgs[] = [];
  const counting = {
    ...jsBackend,
    gemm: (p: GemmArgs) => {
      calls.push(p);
      jsBackend.gemm(p);
    },
  };
  const prev = getBackend();
  setBackend(counting);
  try {
    const outF = 7;
    const inF = 9;
    const x = R([2, 3, inF]);
    const w = R([outF, inF], 1, false);
    const A = R([4, inF]);
    const B = R([outF, 4]);
    tidy(() => {
      const y = loraLinear(x, w, null, A, B, 0.5);
      assert.equal(calls.length, 3, 'forward: shrink, base, expand');
      calls.length = 0;
      backward(sum(y));
    });
    // backward: du = s g B, dx = g W + du A (2), dA = du^T x, dB = s g^T u
    assert.equal(calls.length, 5);
    assert.ok(!calls.some((c) => c.m === outF && c.n === inF), 'a weight-shaped gradient product was computed');
    const flops = calls.reduce((f, c) => f + 2 * c.m * c.n * c.k * (c.batch ?? 1), 0);
    assert.equal(flops, 2 * 6 * (outF * 4 + outF * inF + 4 * inF + 4 * inF + outF * 4));
    assert.equal(w.grad, null);
    assert.ok(x.grad && A.grad && B.grad);
    // the plain linear (dense W trainable) would have added the [out, in] product
    calls.length = 0;
    const w2 = R([outF, inF]);
    tidy(() => backward(sum(loraLinear(x, w2, null, A, B, 0.5))));
    assert.ok(calls.some((c) => c.m === outF && c.n === inF));
    // DoRA: the same guarantee
    const m = R([outF], 1);
    calls.length = 0;
    w.grad = null;
    tidy(() => backward(sum(doraLinear(x, w, null, A, B, m, 0.5))));
    assert.ok(!calls.some((c) => c.m === outF && c.n === inF));
    assert.equal(w.grad, null);
    assert.ok(m.grad);
  } finally {
    setBackend(prev);
  }
});

/** DoRA reference: b + k (x W^T + s x A^T B^T) with k = m / ||W + s B A||_row (composed ops, norm constant). */
function doraRef(x: Tensor, w: Tensor, bias: Tensor | null, A: Tensor, B: Tensor, m: Tensor, s: number): Tensor {
  const norm = noGrad(() => {
    const wf = add(w, scale(matmul(B, A), s)).toF32();
    const [o, i] = w.shape as [number, number];
    const n = new Float32Array(o);
    for (let r = 0; r < o; r++) {
      let acc = 0;
      for (let c = 0; c < i; c++) acc += wf[r * i + c]! ** 2;
      n[r] = Math.sqrt(acc);
    }
    return tensor(n, [o]);
  });
  const k = mul(
    m,
    tensor(
      Array.from(norm.toF32(), (v) => 1 / v),
      [m.shape[0]!],
    ),
  );
  const p = add(linear(x, w), scale(linear(linear(x, A), B), s));
  const y = mul(p, k);
  return bias ? add(y, bias) : y;
}

test('doraLinear matches the composed DoRA formula and finite differences', () => {
  const x = R([2, 3, 6], 1, false);
  const w = R([5, 6], 1, false);
  const bias = R([5], 1, false);
  const A = R([2, 6], 1, false);
  const B = R([5, 2], 1, false);
  const m = R([5], 1, false);
  close(
    doraLinear(x, w, bias, A, B, m, 0.9).toF32(),
    noGrad(() => doraRef(x, w, bias, A, B, m, 0.9).toF32()),
    1e-5,
    'dora',
  );
  // the kernel's norm
  const n = doraWeightNorm(w, A, B, 0.9).toF32();
  const wf = noGrad(() => add(w, scale(matmul(B, A), 0.9)).toF32());
  for (let o = 0; o < 5; o++) {
    let acc = 0;
    for (let i = 0; i < 6; i++) acc += wf[o * 6 + i]! ** 2;
    assert.ok(Math.abs(n[o]! - Math.sqrt(acc)) < 1e-5);
  }
  // transposed layout (embedding tables)
  const wt = noGrad(() => transpose(w).toF32());
  const nT = doraWeightNorm(tensor(wt, [6, 5]), A, B, 0.9, true).toF32();
  close(nT, n, 1e-6, 'norm transposed');
  // gradients (the norm is a constant: pass it fixed so finite differences see the same function)
  const xs = R([3, 6]);
  const ws = R([4, 6], 1, false);
  const As = R([2, 6]);
  const Bs = R([4, 2]);
  const ms = R([4]);
  const bs = R([4]);
  const norm = doraWeightNorm(ws, As, Bs, 0.6);
  gradcheck('dora', (x, b, a, bb, mm) => doraLinear(x!, ws, b!, a!, bb!, mm!, 0.6, { weightNorm: norm }), [
    xs,
    bs,
    As,
    Bs,
    ms,
  ]);
  gradcheck(
    'dora xl',
    (x, xl, a, bb, mm) => doraLinear(x!, ws, null, a!, bb!, mm!, 0.6, { xl: xl!, weightNorm: norm }),
    [R([3, 6]), R([3, 6]), As, Bs, ms],
  );
});

test('doraLinear with dropout input: y = x W^T + (k-1) xl W^T + k s xl A^T B^T', () => {
  const x = R([4, 6], 1, false);
  const w = R([3, 6], 1, false);
  const A = R([2, 6], 1, false);
  const B = R([3, 2], 1, false);
  const m = R([3], 1, false);
  const xl = dropout(x, 0.5, new Rng(3));
  const got = doraLinear(x, w, null, A, B, m, 0.5, { xl }).toF32();
  const n = doraWeightNorm(w, A, B, 0.5).toF32();
  const mv = m.toF32();
  const want = noGrad(() => {
    const base = linear(x, w).toF32();
    const q = linear(xl, w).toF32();
    const l = scale(linear(linear(xl, A), B), 0.5).toF32();
    return base.map((v, i) => {
      const k = mv[i % 3]! / n[i % 3]!;
      return v + (k - 1) * q[i]! + k * l[i]!;
    });
  });
  close(got, want, 1e-5, 'dora dropout');
});

test('addRowsAt adds rows and routes gradients', () => {
  const base = R([4, 2, 3]);
  const d = R([2, 2, 3]);
  const idx = intTensor([3, 1]);
  const y = addRowsAt(base, idx, d).toF32();
  const bv = base.toF32();
  const dv = d.toF32();
  for (let i = 0; i < 24; i++) {
    const row = Math.floor(i / 6);
    const extra = row === 3 ? dv[i % 6]! : row === 1 ? dv[6 + (i % 6)]! : 0;
    assert.ok(Math.abs(y[i]! - (bv[i]! + extra)) < 1e-6);
  }
  gradcheck('addRowsAt', (b, dd) => addRowsAt(b!, idx, dd!), [base, d]);
});

test('loraMixedRows: per-row adapters in one call, exact rows, gradients', () => {
  const x = R([5, 2, 6]);
  const w = R([4, 6], 1, false);
  const A1 = R([2, 6]);
  const B1 = R([4, 2]);
  const A2 = R([3, 6]);
  const B2 = R([4, 3]);
  const g1 = { idx: intTensor([0, 3]), a: A1, b: B1, scale: 0.5 };
  const g2 = { idx: intTensor([4]), a: A2, b: B2, scale: 2 };
  const calls: string[] = [];
  const prev = getBackend();
  // counts on top of the active backend: the rows below are computed by it too, and must match exactly
  const counting = {
    ...prev,
    gemm: (p: GemmArgs) => {
      calls.push('gemm');
      prev.gemm(p);
    },
    loraRows: (...args: Parameters<typeof prev.loraRows>) => {
      calls.push('loraRows');
      prev.loraRows(...args);
    },
  };
  const y = noGrad(() => {
    const base = linear(x, w);
    setBackend(counting);
    try {
      return loraMixedRows(base, x, [g1, g2]).toF32();
    } finally {
      setBackend(prev);
    }
  });
  assert.deepEqual(calls, ['loraRows'], 'without gradients: every group in one call');
  const rowOf = (i: number, a: Tensor | null, b: Tensor | null, s: number) =>
    noGrad(() => {
      const xi = slice(x, 0, i, i + 1);
      return (a ? loraLinear(xi, w, null, a, b!, s) : linear(xi, w)).toF32();
    });
  const want = [
    rowOf(0, A1, B1, 0.5),
    rowOf(1, null, null, 0),
    rowOf(2, null, null, 0),
    rowOf(3, A1, B1, 0.5),
    rowOf(4, A2, B2, 2),
  ];
  want.forEach((r, i) => {
    assert.deepEqual(y.subarray(i * 8, (i + 1) * 8), r, `row ${i}`);
  });
  gradcheck(
    'loraMixedRows',
    (b, xx, a1, b1, a2, b2) =>
      loraMixedRows(b!, xx!, [
        { idx: g1.idx, a: a1!, b: b1!, scale: 0.5 },
        { idx: g2.idx, a: a2!, b: b2!, scale: 2 },
      ]),
    [R([5, 2, 4]), x, A1, B1, A2, B2],
  );
});

test('adapter layer forwards have the right gradients: embedding LoRA, DoRA after LoRA (stacked), DoRA embedding', () => {
  const rt = new AdapterRuntime(new Rng(1));
  const ad = (r: number, useDora: boolean) => ({ r, alpha: 2 * r, scaling: 2, useDora, dropout: 0, loraBias: false });
  // a LoRA adapter then a DoRA adapter on one linear layer
  const lin = new LoraLinear(new Linear(5, 4, { rng: new Rng(2), bias: true }), rt, 'lin');
  lin.addAdapter('a', ad(2, false), R([2, 5]), R([4, 2]), null);
  lin.addAdapter('d', ad(2, true), R([2, 5], 1, false), R([4, 2], 1, false), null);
  rt.active = ['a', 'd'];
  const m = lin.magnitude.get('d')!.weight;
  m.requiresGrad = true;
  const A = lin.loraA.get('a')!.weight;
  const B = lin.loraB.get('a')!.weight;
  A.requiresGrad = true;
  B.requiresGrad = true;
  gradcheck('stacked LoRA + DoRA', (x) => lin.forward(x!), [R([3, 5]), A, B, m]);
  // embedding LoRA and DoRA
  const emb = new LoraEmbedding(new Embedding(7, 3, { rng: new Rng(3) }), rt, 'emb');
  emb.addAdapter('e', ad(2, false), R([2, 7]), R([3, 2]));
  emb.addAdapter('f', ad(2, true), R([2, 7], 1, false), R([3, 2], 1, false));
  const ids = intTensor([1, 6, 0, 6], [2, 2]);
  rt.active = ['e'];
  const eA = emb.embA.get('e')!;
  const eB = emb.embB.get('e')!;
  eA.requiresGrad = true;
  eB.requiresGrad = true;
  gradcheck('embedding LoRA', () => emb.forward(ids), [eA, eB]);
  rt.active = ['e', 'f'];
  const fm = emb.magnitude.get('f')!.weight;
  fm.requiresGrad = true;
  gradcheck('embedding LoRA + DoRA', () => emb.forward(ids), [eA, eB, fm]);
});

test('loraMixedRows without gradients (one loraRows call) equals the gemm path bit for bit: ranks, KC blocks, biases', () => {
  const r = new Rng(5);
  const T = (shape: number[], s = 1) => randomTensor(shape, r, s, false);
  // in > KC (several blocks of the shrink); outF both side of the skinny threshold and not a vector multiple
  for (const [inF, outF, perRow] of [
    [1000, 70, 1],
    [37, 12, 3],
    [64, 64, 1],
  ] as const) {
    const B = 40;
    const x = T([B, perRow, inF]);
    const w = T([outF, inF], 0.1);
    const base = noGrad(() => linear(x, w));
    const ranks = [4, 8, 16, 24, 8, 1];
    const scales = [0.5, 2, 1, 0.3, 0, -1.7];
    // group 3 has 20 rows (the blocked GEMM's shapes on the gemm path), the others a few; rows 30.. have none
    const rowsOf = [[0, 7], [1], [2, 5, 6], [...Array(20).keys()].map((i) => 8 + i), [3], [28, 4]];
    const groups = ranks.map((rk, k) => ({
      idx: intTensor(rowsOf[k]!),
      a: T([rk, inF], 0.2),
      b: T([outF, rk], 0.2),
      scale: scales[k]!,
      loraBias: k % 2 === 1 ? T([outF]) : null,
    }));
    const what = `${inF} -> ${outF} x ${perRow}`;
    const fast = noGrad(() => loraMixedRows(base, x, groups).toF32());
    // the general (gemm) path: an input that needs a gradient
    const xg = tensor(x.toF32(), x.shape);
    xg.requiresGrad = true;
    const slow = tidy(() => loraMixedRows(base, xg, groups).toF32());
    assert.deepEqual(fast, slow, what);
    // rows alone through loraLinear (the single-adapter path of generate --adapter)
    const n = perRow * outF;
    for (const [row, k] of [
      [0, 0],
      [1, 1],
      [8, 3],
      [27, 3],
      [3, 4],
      [28, 5],
    ] as const) {
      const g = groups[k]!;
      const alone = noGrad(() =>
        loraLinear(slice(x, 0, row, row + 1), w, null, g.a, g.b, g.scale, { loraBias: g.loraBias }).toF32(),
      );
      assert.deepEqual(fast.subarray(row * n, (row + 1) * n), alone, `${what}: row ${row} alone`);
    }
    const plain = noGrad(() => linear(slice(x, 0, 35, 36), w).toF32());
    assert.deepEqual(fast.subarray(35 * n, 36 * n), plain, `${what}: a base row`);
  }
});
