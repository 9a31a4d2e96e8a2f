import assert from 'node:assert/strict';
import { test } from 'node:test';
import { Rng } from '../../src/core/rng.ts';
import { initLinear } from '../../src/peft/lora/init.ts';
import type { LoraLinear } from '../../src/peft/lora/layer.ts';
import { type Mat, mat, matmulMat, qr, svd, svdLowrank, transposeMat } from '../../src/peft/lora/linalg.ts';
import { LoraModel } from '../../src/peft/lora/model.ts';
import { logitsOf, maxRelDiff, tinyModel } from './helpers.ts';

function randMat(rows: number, cols: number, rng: Rng): Mat {
  const m = mat(rows, cols);
  for (let i = 0; i < m.data.length; i++) m.data[i] = rng.normal();
  return m;
}

function maxDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let d = 0;
  for (let i = 0; i < a.length; i++) d = Math.max(d, Math.abs(a[i]! - b[i]!));
  return d;
}

function eye(n: number): Float64Array {
  const e = new Float64Array(n * n);
  for (let i = 0; i < n; i++) e[i * n + i] = 1;
  return e;
}

test('Householder QR: A = Q R, Q orthonormal, R upper triangular, LAPACK signs', () => {
  const rng = new Rng(1);
  for (const [m, n] of [
    [7, 4],
    [4, 7],
    [5, 5],
  ] as const) {
    const a = randMat(m, n, rng);
    const { q, r } = qr(a);
    const k = Math.min(m, n);
    assert.deepEqual([q.rows, q.cols, r.rows, r.cols], [m, k, k, n]);
    assert.ok(maxDiff(matmulMat(q, r).data, a.data) < 1e-12);
    assert.ok(maxDiff(matmulMat(transposeMat(q), q).data, eye(k)) < 1e-12);
    for (let i = 0; i < k; i++) for (let j = 0; j < i; j++) assert.equal(r.data[i * n + j], 0);
  }
  // dlarfg: beta = -sign(alpha) * norm, so a positive leading entry gives a negative R[0,0]
  const { r } = qr(mat(2, 2, [3, 1, 4, 1]));
  assert.ok(Math.abs(r.data[0]! + 5) < 1e-12);
});

test('Jacobi SVD: A = U S V^T, descending, orthonormal factors; randomized SVD finds a low-rank matrix', () => {
  const rng = new Rng(2);
  for (const [m, n] of [
    [9, 5],
    [5, 9],
    [6, 6],
  ] as const) {
    const a = randMat(m, n, rng);
    const { u, s, vt } = svd(a);
    const k = Math.min(m, n);
    const us = mat(m, k);
    for (let i = 0; i < m; i++) for (let j = 0; j < k; j++) us.data[i * k + j] = u.data[i * k + j]! * s[j]!;
    assert.ok(maxDiff(matmulMat(us, vt).data, a.data) < 1e-10);
    for (let j = 1; j < k; j++) assert.ok(s[j - 1]! >= s[j]!);
    assert.ok(maxDiff(matmulMat(transposeMat(u), u).data, eye(k)) < 1e-10);
    assert.ok(maxDiff(matmulMat(vt, transposeMat(vt)).data, eye(k)) < 1e-10);
  }
  const low = matmulMat(randMat(12, 3, rng), randMat(3, 10, rng));
  const exact = svd(low);
  const approx = svdLowrank(low, 3, 2, new Rng(3));
  assert.ok(maxDiff(approx.s, exact.s.slice(0, 3)) < 1e-9);
});

test('PiSSA and OLoRA: residual + s B A reproduces W; the adapted model equals the base at init', () => {
  const rng = new Rng(4);
  const w = Float32Array.from({ length: 12 * 8 }, () => rng.normal());
  for (const init of ['pissa', 'pissa_niter_4', 'olora']) {
    const s = 2;
    const r = 3;
    const { a, b, base } = initLinear(init, 12, 8, r, s, new Rng(5), () => w, 'test');
    const back = new Float32Array(12 * 8);
    for (let o = 0; o < 12; o++)
      for (let i = 0; i < 8; i++) {
        let acc = 0;
        for (let j = 0; j < r; j++) acc += b[o * r + j]! * a[j * 8 + i]!;
        back[o * 8 + i] = base![o * 8 + i]! + s * acc;
      }
    assert.ok(maxDiff(back, w) < 1e-5, init);
  }
  // PiSSA puts the top singular directions in the adapter: s B A is the best rank-r approximation
  const { a, b } = initLinear('pissa', 12, 8, 2, 1, new Rng(5), () => w, 'test');
  const d = svd(mat(12, 8, w));
  const ba = matmulMat(mat(12, 2, b), mat(2, 8, a));
  const best = mat(12, 8);
  for (let o = 0; o < 12; o++)
    for (let i = 0; i < 8; i++)
      for (let j = 0; j < 2; j++) best.data[o * 8 + i] += d.u.data[o * 8 + j]! * d.s[j]! * d.vt.data[j * 8 + i]!;
  assert.ok(maxDiff(ba.data, best.data) < 1e-4);

  const baseLogits = logitsOf(tinyModel(6));
  for (const init of ['pissa', 'olora', 'pissa_niter_2']) {
    const pm = new LoraModel(
      tinyModel(6),
      { target_modules: ['q_proj', 'down_proj'], r: 4, init_lora_weights: init },
      'default',
      { rng: new Rng(1) },
    );
    assert.ok(maxRelDiff(logitsOf(pm.model), baseLogits) < 1e-5, init);
    const q = pm.model.getModule('model.layers.0.self_attn.q_proj') as LoraLinear;
    assert.ok(
      maxRelDiff(
        q.weight.toF32(),
        tinyModel(6).getModule('model.layers.0.self_attn.q_proj')!.getParam('weight')!.toF32(),
      ) > 1e-2,
      `${init} rewrote the base`,
    );
  }
});

test('orthogonal and gaussian inits', () => {
  const { a, b } = initLinear('orthogonal', 6, 10, 4, 1, new Rng(2), null, 't');
  assert.equal(a.length, 40);
  assert.equal(b.length, 24);
  assert.ok(b.some((v) => v !== 0));
  assert.throws(() => initLinear('orthogonal', 6, 10, 3, 1, new Rng(2), null, 't'), /even r/);
  const g = initLinear('gaussian', 6, 1000, 4, 1, new Rng(2), null, 't');
  const std = Math.sqrt(g.a.reduce((s, v) => s + v * v, 0) / g.a.length);
  assert.ok(Math.abs(std - 0.25) < 0.01, `std 1/r, got ${std}`);
  assert.ok(g.b.every((v) => v === 0));
  const k = initLinear(true, 6, 100, 4, 1, new Rng(2), null, 't');
  assert.ok(k.a.every((v) => Math.abs(v) <= 0.1) && k.a.some((v) => Math.abs(v) > 0.09), 'U(-1/sqrt(in), 1/sqrt(in))');
  assert.throws(
    () => initLinear('pissa', 6, 4, 5, 1, new Rng(2), () => new Float32Array(24), 'layer x'),
    /layer x.*r <= min/,
  );
});
