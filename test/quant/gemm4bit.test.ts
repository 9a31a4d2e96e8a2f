// The 4-bit kernel family against dequantize4bit + a plain f64 matrix product, on odd shapes: blocks that
// straddle rows (cols not a multiple of the block size), an odd element count, skinny and tall inputs.

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { getBackend } from '../../src/backend/index.ts';
import type { Weight4bit } from '../../src/backend/kernels/quant.ts';
import { f32ToBf16 } from '../../src/core/dtype.ts';
import { DTypeError, ShapeError } from '../../src/core/errors.ts';
import { Rng } from '../../src/core/rng.ts';
import { Tensor } from '../../src/core/tensor.ts';
import { empty } from '../../src/ops/create.ts';
import { dequantize4bit, isDoubleQuant, type QuantState4bit, quantize4bit } from '../../src/quant/blockwise4.ts';
import { code4bit, type QuantType4 } from '../../src/quant/codebooks.ts';

function randn(n: number, rng: Rng, scale = 1): Float32Array {
  const v = new Float32Array(n);
  for (let i = 0; i < n; i++) v[i] = rng.normal() * scale;
  return v;
}

/** The kernel view of a quant state (the tensors wrap its arrays). */
function weightOf(s: QuantState4bit): Weight4bit {
  const a = s.absmax;
  const dq = isDoubleQuant(a);
  return {
    rows: s.shape[0]!,
    cols: s.shape[1]!,
    quantType: s.quantType,
    blocksize: s.blocksize,
    code: Tensor.fromTyped(Float32Array.from(code4bit(s.quantType)), [16], 'f32'),
    packed: Tensor.fromTyped(s.packed, [s.packed.length, 1], 'u8'),
    absmax: dq
      ? Tensor.fromTyped(a.quantizedAbsmax, [a.quantizedAbsmax.length], 'u8')
      : Tensor.fromTyped(a, [a.length], 'f32'),
    nestedAbsmax: dq ? Tensor.fromTyped(a.nestedAbsmax, [a.nestedAbsmax.length], 'f32') : null,
    nestedCode: dq ? Tensor.fromTyped(a.nestedQuantMap, [256], 'f32') : null,
    nestedBlocksize: dq ? a.nestedBlocksize : 256,
    offset: dq ? a.offset : 0,
  };
}

function refMatmul(x: Float32Array, w: Float32Array, m: number, n: number, k: number, bias?: Float32Array) {
  const y = new Float64Array(m * n);
  for (let i = 0; i < m; i++)
    for (let j = 0; j < n; j++) {
      let s = bias ? bias[j]! : 0;
      for (let l = 0; l < k; l++) s += x[i * k + l]! * w[j * k + l]!;
      y[i * n + j] = s;
    }
  return y;
}

function refBackward(g: Float32Array, w: Float32Array, m: number, n: number, k: number) {
  const dx = new Float64Array(m * k);
  for (let i = 0; i < m; i++)
    for (let j = 0; j < n; j++) {
      const gv = g[i * n + j]!;
      for (let l = 0; l < k; l++) dx[i * k + l] += gv * w[j * k + l]!;
    }
  return dx;
}

function assertClose(got: Float32Array, want: Float64Array, what: string, rel = 1e-5): void {
  assert.equal(got.length, want.length, `${what}: length`);
  let scale = 0;
  for (const v of want) scale = Math.max(scale, Math.abs(v));
  for (let i = 0; i < want.length; i++) {
    const err = Math.abs(got[i]! - want[i]!);
    assert.ok(
      err <= rel * (scale + 1e-30) + 1e-7,
      `${what}[${i}]: ${got[i]} vs ${want[i]} (err ${err.toExponential(2)})`,
    );
  }
}

const CASES: { n: number; k: number; bs: number; qt: QuantType4; dq: boolean }[] = [
  { n: 37, k: 96, bs: 64, qt: 'nf4', dq: true }, // blocks straddle rows
  { n: 5, k: 7, bs: 32, qt: 'fp4', dq: false }, // odd element count: rows start mid-byte
  { n: 70, k: 128, bs: 64, qt: 'nf4', dq: false }, // more rows than one tile
  { n: 33, k: 300, bs: 128, qt: 'fp4', dq: true },
];

test('gemm4bit equals dequantize4bit + matmul (GEMV, skinny and tiled paths, with and without bias)', () => {
  const rng = new Rng(7);
  const be = getBackend();
  for (const c of CASES) {
    const wv = randn(c.n * c.k, rng, 0.05);
    const s = quantize4bit(wv, { quantType: c.qt, blocksize: c.bs, doubleQuant: c.dq, shape: [c.n, c.k] });
    const dense = dequantize4bit(s);
    const w = weightOf(s);
    for (const m of [1, 3, 16, 17, 40]) {
      for (const withBias of [false, true]) {
        const x = randn(m * c.k, rng);
        const bias = withBias ? randn(c.n, rng) : undefined;
        const y = empty([m, c.n]);
        const bt = bias ? Tensor.fromTyped(bias.slice(), [c.n], 'f32') : null;
        be.gemm4bit(Tensor.fromTyped(x, [m, c.k], 'f32'), w, bt, y, m);
        assertClose(y.toF32(), refMatmul(x, dense, m, c.n, c.k, bias), `${JSON.stringify(c)} m=${m} bias=${withBias}`);
      }
    }
  }
});

test('gemm4bit reads a bf16 bias and writes into an offset view', () => {
  const rng = new Rng(8);
  const s = quantize4bit(randn(24 * 64, rng), { quantType: 'nf4', shape: [24, 64] });
  const dense = dequantize4bit(s);
  const x = randn(2 * 64, rng);
  const b = randn(24, rng);
  const bBits = Uint16Array.from(b, (v) => f32ToBf16(v));
  const bRounded = Float32Array.from(bBits, (h) => new Float32Array(new Uint32Array([h << 16]).buffer)[0]!);
  const big = empty([10 + 2 * 24]);
  const y = big.view([2, 24], [24, 1], 10);
  getBackend().gemm4bit(Tensor.fromTyped(x, [2, 64], 'f32'), weightOf(s), Tensor.fromTyped(bBits, [24], 'bf16'), y, 2);
  assertClose(y.toF32(), refMatmul(x, dense, 2, 24, 64, bRounded), 'bf16 bias');
  assert.deepEqual(Array.from(big.toF32().subarray(0, 10)), new Array(10).fill(0));
});

test('gemm4bitBackwardInput equals g · dequant(W)', () => {
  const rng = new Rng(9);
  const be = getBackend();
  for (const c of CASES) {
    const s = quantize4bit(randn(c.n * c.k, rng, 0.05), {
      quantType: c.qt,
      blocksize: c.bs,
      doubleQuant: c.dq,
      shape: [c.n, c.k],
    });
    const dense = dequantize4bit(s);
    for (const m of [1, 5, 33]) {
      const g = randn(m * c.n, rng);
      const dx = empty([m, c.k]);
      be.gemm4bitBackwardInput(Tensor.fromTyped(g, [m, c.n], 'f32'), weightOf(s), dx, m);
      assertClose(dx.toF32(), refBackward(g, dense, m, c.n, c.k), `${JSON.stringify(c)} m=${m}`);
    }
  }
});

test('dequantize4bitRows is bit-identical to dequantize4bit on every row range', () => {
  const rng = new Rng(10);
  for (const c of CASES) {
    const s = quantize4bit(randn(c.n * c.k, rng), {
      quantType: c.qt,
      blocksize: c.bs,
      doubleQuant: c.dq,
      shape: [c.n, c.k],
    });
    const dense = dequantize4bit(s);
    const w = weightOf(s);
    for (const [r0, cnt] of [
      [0, c.n],
      [1, 2],
      [c.n - 1, 1],
      [Math.floor(c.n / 2), Math.ceil(c.n / 2)],
    ] as [number, number][]) {
      const out = empty([cnt * c.k]);
      getBackend().dequantize4bitRows(w, r0, cnt, out);
      assert.deepEqual(
        out.toF32(),
        dense.subarray(r0 * c.k, (r0 + cnt) * c.k),
        `${JSON.stringify(c)} rows ${r0}+${cnt}`,
      );
    }
  }
});

test('the kernels reject inconsistent weights and outputs', () => {
  const rng = new Rng(11);
  const s = quantize4bit(randn(8 * 64, rng), { quantType: 'nf4', doubleQuant: true, shape: [8, 64] });
  const w = weightOf(s);
  const be = getBackend();
  const x = Tensor.fromTyped(randn(64, rng), [1, 64], 'f32');
  assert.throws(() => be.gemm4bit(x, { ...w, rows: 9 }, null, empty([1, 9]), 1), ShapeError);
  assert.throws(() => be.gemm4bit(x, { ...w, nestedAbsmax: null }, null, empty([1, 8]), 1), ShapeError);
  assert.throws(() => be.gemm4bit(x, w, null, empty([1, 7]), 1), ShapeError);
  assert.throws(() => be.gemm4bit(x, { ...w, packed: empty([256]) }, null, empty([1, 8]), 1), DTypeError);
  assert.throws(() => be.dequantize4bitRows(w, 7, 2, empty([128])), ShapeError);
});
