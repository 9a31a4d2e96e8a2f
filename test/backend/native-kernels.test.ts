// The native backend's kernels (native/ops_*.cc) against the TypeScript reference backend on random shapes,
// odd sizes included, under every kernel set this CPU has (LOWRANK_ISA narrows it further).
//
// Tolerances, and why:
//  - exact (bit-identical): copy/cast, fill, gather, scatter-add, binary ops, relu/abs/neg/square/recip/sqrt/
//    sign, the f64-computed unary ops (rsqrt, scale, addScalar; log/tanh/pow/gelu up to 1 ulp of libm vs V8),
//    dropout, reduce max/min, 4-bit dequantisation. The kernels do the reference's arithmetic.
//  - exp-based ops use a vectorised f32 exp (about 2 ulp): relative 2e-6, plus a few ulps of 1 where the
//    SiLU / SwiGLU derivative crosses zero (cancellation in 1 + x (1 - s)).
//  - sums the reference takes in f64 in another order, and products accumulated in f32 (GEMM, attention,
//    4-bit): bounded by (terms) * 2^-24 * sum|terms| as the GEMM test, here simplified to a relative error
//    against the largest magnitude of the result.
//  - row invariance of the GEMM and the 4-bit GEMM, and the padding invariance of attention: bit-identical.

import assert from 'node:assert/strict';
import { after, test } from 'node:test';
import type { Backend } from '../../src/backend/backend.ts';
import { jsBackend } from '../../src/backend/cpu/js.ts';
import { makeNativeBackend, type NativeWithOps, nativeOps } from '../../src/backend/cpu/native.ts';
import type { NativeIsa } from '../../src/backend/cpu/native-addon.ts';
import type { AttentionArgs } from '../../src/backend/kernels/attention.ts';
import type { Weight4bit } from '../../src/backend/kernels/quant.ts';
import { bf16ToF32, type DType, f32ToBf16, f32ToF16 } from '../../src/core/dtype.ts';
import { IndexError, LifetimeError } from '../../src/core/errors.ts';
import { Rng } from '../../src/core/rng.ts';
import { Tensor } from '../../src/core/tensor.ts';
import { positionsView } from '../../src/models/kv-cache.ts';
import { argmax, argmaxLoop } from '../../src/models/sampling.ts';
import { isDoubleQuant, type QuantState4bit, quantize4bit } from '../../src/quant/blockwise4.ts';
import { code4bit } from '../../src/quant/codebooks.ts';

const addon = nativeOps();
const skip = addon
  ? false
  : 'the native addon with its op kernels is not built (npm run build:native) or LOWRANK_BACKEND=js';
const ALL_ISAS: NativeIsa[] = ['avx512', 'avx2', 'generic'];
const js = jsBackend;

function isas(a: NativeWithOps): NativeIsa[] {
  return ALL_ISAS.slice(ALL_ISAS.indexOf(a.isa()));
}

/** Runs fn under every kernel set available (restoring the choice afterwards). */
function eachIsa(fn: (nb: Backend, isa: NativeIsa) => void): void {
  const a = addon!;
  const start = a.isa();
  const nb = makeNativeBackend(a);
  try {
    for (const isa of isas(a)) {
      a.setIsa(isa);
      fn(nb, isa);
    }
  } finally {
    a.setIsa(start);
  }
}

after(() => {
  if (addon) addon.setIsa('auto');
});

function randn(rng: Rng, n: number, scale = 1): Float32Array {
  const v = new Float32Array(n);
  for (let i = 0; i < n; i++) v[i] = rng.normal() * scale;
  return v;
}
function t32(data: Float32Array, shape: number[]): Tensor {
  return Tensor.fromTyped(data, shape, 'f32');
}
function zeros(shape: number[]): Tensor {
  return t32(new Float32Array(shape.reduce((a, b) => a * b, 1)), shape);
}
function encode(data: Float32Array, dtype: DType): Tensor {
  if (dtype === 'f32') return t32(Float32Array.from(data), [data.length]);
  const u = new Uint16Array(data.length);
  for (let i = 0; i < data.length; i++) u[i] = dtype === 'bf16' ? f32ToBf16(data[i]!) : f32ToF16(data[i]!);
  return Tensor.fromTyped(u, [data.length], dtype);
}
function i32(data: number[] | Int32Array, shape: number[]): Tensor {
  return Tensor.fromTyped(Int32Array.from(data), shape, 'i32');
}

/** Bit-identical (NaN equals NaN; +0 and -0 differ). */
function same(got: ArrayLike<number>, want: ArrayLike<number>, what: string): void {
  assert.equal(got.length, want.length, `${what}: length`);
  for (let i = 0; i < want.length; i++) {
    const g = got[i]!;
    const w = want[i]!;
    if (!(Object.is(g, w) || (Number.isNaN(g) && Number.isNaN(w)))) assert.fail(`${what}[${i}]: got ${g}, want ${w}`);
  }
}

/** |got - want| <= rel * |want| + abs per element (infinities and NaN must match). */
function close(got: ArrayLike<number>, want: ArrayLike<number>, rel: number, abs: number, what: string): void {
  assert.equal(got.length, want.length, `${what}: length`);
  for (let i = 0; i < want.length; i++) {
    const g = got[i]!;
    const w = want[i]!;
    if (Number.isNaN(w) || !Number.isFinite(w)) {
      if (!(Object.is(g, w) || (Number.isNaN(g) && Number.isNaN(w)))) assert.fail(`${what}[${i}]: got ${g}, want ${w}`);
      continue;
    }
    if (!(Math.abs(g - w) <= rel * Math.abs(w) + abs)) assert.fail(`${what}[${i}]: got ${g}, want ${w}`);
  }
}

/** |got - want| <= rel * max|want| (for sums whose terms cancel). */
function closeScaled(got: ArrayLike<number>, want: ArrayLike<number>, rel: number, what: string): void {
  let m = 0;
  for (let i = 0; i < want.length; i++) if (Number.isFinite(want[i]!)) m = Math.max(m, Math.abs(want[i]!));
  close(got, want, 0, rel * m + 1e-30, what);
}

const f = (t: Tensor) => t.data as Float32Array;

// ---- GEMM -------------------------------------------------------------------------------------------------

test('gemm: matches the reference, and a row of C does not depend on how many rows share the call', { skip }, () => {
  const rng = new Rng(1);
  eachIsa((nb, isa) => {
    const kc = addon!._blocking(0, 0, 0)[0];
    const shapes = [
      { n: 40, k: 33 },
      { n: 5, k: 70 },
      { n: 17, k: kc + 29 }, // two K blocks
      { n: 70, k: 2 * kc + 5 },
      { n: 3, k: kc + 1 },
      { n: 2100, k: 37 }, // wider than a strip of the few-row path (ops_gemm.h kGemvStrip)
      { n: 100, k: 4 * kc - 3 }, // four K blocks: the few-row path hands them to the threads (3 whole, 1 short)
      { n: 1030, k: 3 * kc + 7 }, // whole blocks as tasks, the short last one shared by columns; long rows
      { n: 40, k: 4 * kc + 5 }, // short rows: whole blocks, and a short block of 5 rows shared by columns
      { n: 24, k: 6 * kc }, // no short block
      // short rows, ten whole blocks and one short one, whose columns the threads share (144 and 156 of them)
      { n: 300, k: 10 * kc + 50 },
    ];
    for (const { n, k } of shapes)
      for (const [transA, transB] of [
        [false, true],
        [false, false],
        [true, false],
        [true, true],
      ] as const)
        for (const [alpha, beta, bdt] of [
          [1, 0, 'f32'],
          [0.37, 0, 'bf16'],
          [1, 1, 'f16'],
          [0.37, 1, 'f32'],
          [1.5, 0.5, 'f32'],
        ] as const) {
          const M = 37;
          const A = t32(randn(rng, M * k), [M * k]);
          const B = encode(randn(rng, k * n), bdt);
          const C0 = randn(rng, M * n);
          const lda = transA ? M : k;
          const ldb = transB ? k : n;
          const run = (be: Backend, m: number, i0: number) => {
            const C = t32(C0.slice(i0 * n, (i0 + m) * n), [m * n]);
            be.gemm({
              transA,
              transB,
              m,
              n,
              k,
              alpha,
              beta,
              a: A,
              aOff: transA ? i0 : i0 * k,
              lda,
              b: B,
              bOff: 0,
              ldb,
              c: C,
              cOff: 0,
              ldc: n,
            });
            return f(C);
          };
          const label = `${isa} ${transA ? 'T' : 'N'}${transB ? 'T' : 'N'} n=${n} k=${k} alpha=${alpha} beta=${beta} B=${bdt}`;
          const all = run(nb, M, 0);
          closeScaled(all, run(js, M, 0), (k + 8) * 2 ** -24 * 4, label);
          // Row invariance is promised for a plain A (activations: a row of C is a batch row). With A
          // transposed, K runs over the batch (weight gradients) and the fastest paths are taken instead.
          if (transA) continue;
          for (const [m, i0] of [
            [1, 0],
            [1, 20],
            [2, 5],
            [3, 30],
            [4, 9],
            [5, 2],
            [8, 11],
            [16, 1],
            [17, 20],
          ] as const)
            same(run(nb, m, i0), all.subarray(i0 * n, (i0 + m) * n), `${label}: rows ${i0}..${i0 + m} alone`);
        }
  });
});

/**
 * W [K, N] as the decoding layout keeps it (B not transposed), M rows of A ([M, N, K] = shape(the ISA's K
 * block)): for a bf16 and an f32 W, the rows [i0, i0 + m) of `subsets` computed alone equal the same rows of
 * all M computed together, bit for bit (at each thread count given; the current one when none).
 */
function decodeLayoutRowsAlone(
  rng: Rng,
  shape: (kc: number) => readonly [number, number, number],
  subsets: readonly (readonly [number, number])[],
  threads: readonly number[] = [],
): void {
  const saved = addon!.getThreads();
  try {
    eachIsa((nb, isa) => {
      const [M, n, k] = shape(addon!._blocking(0, 0, 0)[0]);
      const A = t32(randn(rng, M * k), [M * k]);
      for (const [alpha, beta, bdt] of [
        [1, 0, 'bf16'],
        [0.37, 1, 'f32'],
      ] as const) {
        const B = encode(randn(rng, k * n), bdt);
        const C0 = randn(rng, M * n);
        const run = (m: number, i0: number) => {
          const C = t32(C0.slice(i0 * n, (i0 + m) * n), [m * n]);
          nb.gemm({
            transA: false,
            transB: false,
            m,
            n,
            k,
            alpha,
            beta,
            a: A,
            aOff: i0 * k,
            lda: k,
            b: B,
            bOff: 0,
            ldb: n,
            c: C,
            cOff: 0,
            ldc: n,
          });
          return f(C);
        };
        for (const t of threads.length ? threads : [saved]) {
          addon!.setThreads(t);
          const all = run(M, 0);
          for (const [m, i0] of subsets)
            same(
              run(m, i0),
              all.subarray(i0 * n, (i0 + m) * n),
              `${isa} ${t} threads n=${n} k=${k} B=${bdt}: rows ${i0}..${i0 + m} alone`,
            );
        }
      }
    });
  } finally {
    addon!.setThreads(saved);
  }
}

test('gemm: few rows against rows wider than a strip, threads splitting K, equal the blocked rows bit for bit', {
  skip,
}, () => {
  // one and two rows: two whole K blocks, one a thread, go through in strips of 8192 columns (ops_gemm.h
  // kGemvWide); the short block left over is shared by columns, more than a strip each. Three rows or more, on
  // AVX-512: strips of 2048 columns (kGemvStrip) over every K block, the last one part of a vector.
  decodeLayoutRowsAlone(
    new Rng(11),
    (kc) => [17, 17000, 2 * kc + 50],
    [
      [1, 3],
      [2, 0],
      [4, 10],
      [8, 9],
    ],
    [1, 2, 3],
  );
});

test('gemm: a batch of rows whose K blocks the threads combine by columns equals the blocked rows bit for bit', {
  skip,
}, () => {
  // 8 and 16 rows (passes of 8) over four whole K blocks and a short one give enough block sums that the threads
  // share the combine by ranges of columns (ops_gemm.h kRgCombineMin); N ends in part of a vector. 37 rows take
  // the blocked GEMM, a path of its own.
  decodeLayoutRowsAlone(
    new Rng(12),
    (kc) => [37, 2056, 4 * kc + 3],
    [
      [8, 5],
      [16, 20],
    ],
    [1, 2, 3],
  );
});

test('gemm: batched with strides and interleaved C, bf16 operands', { skip }, () => {
  const rng = new Rng(2);
  eachIsa((nb, isa) => {
    const [batch, m, n, k] = [3, 20, 24, 18];
    const A = encode(randn(rng, batch * m * k), 'bf16');
    const B = t32(randn(rng, k * n), [k * n]);
    const args = (c: Tensor) => ({
      transA: false,
      transB: false,
      m,
      n,
      k,
      alpha: 1,
      beta: 0,
      a: A,
      aOff: 0,
      lda: k,
      b: B,
      bOff: 0,
      ldb: n,
      c,
      cOff: 0,
      ldc: batch * n,
      batch,
      strideA: m * k,
      strideB: 0,
      strideC: n,
    });
    const c1 = zeros([m * batch * n]);
    const c2 = zeros([m * batch * n]);
    nb.gemm(args(c1));
    js.gemm(args(c2));
    closeScaled(f(c1), f(c2), 1e-6, `${isa} batched`);
  });
});

// ---- core elementwise ---------------------------------------------------------------------------------------

const SPECIAL = [0, -0, 1, -1, Number.NaN, Number.POSITIVE_INFINITY, Number.NEGATIVE_INFINITY, 1e-40, -3.5, 88, -104];

function withSpecials(rng: Rng, n: number): Float32Array {
  const v = randn(rng, n, 3);
  for (let i = 0; i < SPECIAL.length && i < n; i++) v[(i * 7919) % n] = SPECIAL[i]!;
  return v;
}

test('binary ops: contiguous, broadcast rows and columns, strided views; bit-identical', { skip }, () => {
  const rng = new Rng(3);
  const ops = ['add', 'sub', 'mul', 'div', 'max', 'min', 'eq'] as const;
  eachIsa((nb, isa) => {
    const [R, C] = [37, 29];
    const a = t32(withSpecials(rng, R * C), [R, C]);
    const bFull = t32(withSpecials(rng, R * C), [R, C]);
    bFull.data[5] = a.data[5]!; // an equal pair for eq
    const row = t32(randn(rng, C), [C]);
    const col = t32(randn(rng, R), [R]);
    const big = t32(randn(rng, 3 * R * C), [3, R, C]);
    const views: [string, Tensor, Tensor][] = [
      ['contiguous', a, bFull],
      ['row broadcast', a, row.view([R, C], [0, 1], 0)],
      ['column broadcast', a, col.view([R, C], [1, 0], 0)],
      ['scalar broadcast', a, row.view([R, C], [0, 0], 3)],
      ['strided', big.view([R, C], [C, 1], R * C), big.view([R, C], [1, R], 5)], // a transposed view
      ['4-d broadcast', big.view([3, 1, R, C], [R * C, 0, C, 1], 0), row.view([3, 1, R, C], [0, 0, 0, 1], 0)],
    ];
    for (const op of ops)
      for (const [name, x, y] of views) {
        const o1 = zeros([...x.shape]);
        const o2 = zeros([...x.shape]);
        nb.binary(op, x, y, o1);
        js.binary(op, x, y, o2);
        same(f(o1), f(o2), `${isa} ${op} ${name}`);
      }
  });
});

test('unary ops (activations and their derivatives) match the reference', { skip }, () => {
  const rng = new Rng(4);
  const exact = ['neg', 'abs', 'square', 'recip', 'sqrt', 'relu', 'reluGrad', 'sign', 'rsqrt', 'scale', 'addScalar'];
  const libm = ['log', 'tanh', 'gelu', 'pow', 'tanhGrad'];
  const expBased = ['exp', 'sigmoid', 'silu', 'sigmoidGrad', 'siluGrad'];
  eachIsa((nb, isa) => {
    const n = 1031;
    const x = t32(withSpecials(rng, n), [n]);
    for (const op of [...exact, ...libm, ...expBased] as const) {
      const o1 = zeros([n]);
      const o2 = zeros([n]);
      const scalar = op === 'pow' ? 1.7 : op === 'scale' ? 1 / 3 : 0.1;
      nb.unary(op as never, x, o1, scalar);
      js.unary(op as never, x, o2, scalar);
      if (exact.includes(op)) same(f(o1), f(o2), `${isa} ${op}`);
      else if (libm.includes(op)) close(f(o1), f(o2), 2 ** -23, 1e-45, `${isa} ${op}`);
      else close(f(o1), f(o2), 2e-6, 4e-7, `${isa} ${op}`); // 4e-7: ulps of 1 where siluGrad crosses 0
    }
  });
});

test('reduce sum/max/min over every axis position', { skip }, () => {
  const rng = new Rng(5);
  eachIsa((nb, isa) => {
    for (const [outer, len, inner] of [
      [13, 517, 1],
      [3, 41, 77],
      [1, 3000, 1],
      [7, 5, 700],
    ] as const) {
      const x = t32(randn(rng, outer * len * inner), [outer * len * inner]);
      for (const op of ['sum', 'max', 'min'] as const) {
        const o1 = zeros([outer * inner]);
        const o2 = zeros([outer * inner]);
        nb.reduce(op, x, o1, outer, len, inner);
        js.reduce(op, x, o2, outer, len, inner);
        if (op === 'sum') close(f(o1), f(o2), 2 ** -23, 1e-30, `${isa} sum ${outer}x${len}x${inner}`);
        else same(f(o1), f(o2), `${isa} ${op}`);
      }
    }
  });
});

test('copy/cast between f32, bf16 and f16 (strided both sides), fill, integer copies: bit-identical', { skip }, () => {
  const rng = new Rng(6);
  const dts: DType[] = ['f32', 'bf16', 'f16'];
  eachIsa((nb, isa) => {
    // small, and larger than a 64 x 64 tile of the transposing copy (with partial tiles)
    for (const [R, C] of [
      [33, 47],
      [130, 150],
    ] as const) {
      const base = withSpecials(rng, 2 * R * C);
      base[11] = 70000; // overflows f16
      base[12] = 3e-6; // f16 subnormal
      for (const sdt of dts)
        for (const ddt of dts) {
          const src0 = encode(base, sdt);
          const src = src0.view([R, C], [1, R], 3); // transposed view
          const mk = () => {
            const t = encode(new Float32Array(2 * R * C), ddt);
            return t.view([R, C], [C + 1, 1], 1); // padded rows
          };
          const d1 = mk();
          const d2 = mk();
          nb.copy(src, d1);
          js.copy(src, d2);
          same(d1.data, d2.data, `${isa} copy ${sdt}->${ddt} ${R}x${C}`);
        }
    }
    const ints = i32(
      Array.from({ length: 600 }, (_, i) => i * 7 - 300),
      [20, 30],
    );
    const i1 = i32(new Int32Array(600), [30, 20]);
    const i2 = i32(new Int32Array(600), [30, 20]);
    nb.copy(ints.view([30, 20], [1, 30], 0), i1);
    js.copy(ints.view([30, 20], [1, 30], 0), i2);
    same(i1.data, i2.data, `${isa} i32 copy`);
    for (const dt of dts) {
      const a = encode(new Float32Array(70001), dt);
      const b = encode(new Float32Array(70001), dt);
      nb.fill(a, -2.7);
      js.fill(b, -2.7);
      same(a.data, b.data, `${isa} fill ${dt}`);
    }
  });
});

test('gatherRows / scatterAddRows and embedding forward/backward: bit-identical, ids checked', { skip }, () => {
  const rng = new Rng(7);
  eachIsa((nb, isa) => {
    const [V, D, N] = [50, 37, 300];
    const table = randn(rng, V * D);
    const idsArr = Array.from({ length: N }, () => rng.int(V));
    const ids = i32(idsArr, [3, N / 3]);
    for (const dt of ['f32', 'bf16', 'f16'] as DType[]) {
      const w = encode(table, dt).view([V, D], [D, 1], 0);
      const o1 = zeros([N, D]);
      const o2 = zeros([N, D]);
      nb.embeddingForward(w, ids, o1, V, D);
      js.embeddingForward(w, ids, o2, V, D);
      same(f(o1), f(o2), `${isa} embedding ${dt}`);
      const g1 = zeros([N, D]);
      const g2 = zeros([N, D]);
      nb.gatherRows(w, ids, g1, D);
      js.gatherRows(w, ids, g2, D);
      same(f(g1), f(g2), `${isa} gatherRows ${dt}`);
    }
    const g = t32(randn(rng, N * D), [N, D]);
    for (const pad of [-1, idsArr[0]!]) {
      const d1 = t32(randn(new Rng(9), V * D), [V, D]);
      const d2 = t32(Float32Array.from(d1.data as Float32Array), [V, D]);
      nb.embeddingBackward(g, ids, d1, V, D, pad);
      js.embeddingBackward(g, ids, d2, V, D, pad);
      same(f(d1), f(d2), `${isa} embedding backward pad=${pad}`);
    }
    const s1 = zeros([V, D]);
    const s2 = zeros([V, D]);
    nb.scatterAddRows(g, ids, s1, D);
    js.scatterAddRows(g, ids, s2, D);
    same(f(s1), f(s2), `${isa} scatterAddRows`);
    const bad = i32([1, 2, V], [3]);
    assert.throws(() => nb.embeddingForward(encode(table, 'f32'), bad, zeros([3, D]), V, D), IndexError);
    const msg = (be: Backend) => {
      try {
        be.gatherRows(encode(table, 'f32'), i32([...idsArr.slice(0, 20), -1], [21]), zeros([21, D]), D);
      } catch (e) {
        return (e as Error).message;
      }
      return '';
    };
    assert.equal(msg(nb), msg(js));
  });
});

test('dropout: the same counter-based mask bit for bit', { skip }, () => {
  const rng = new Rng(8);
  eachIsa((nb, isa) => {
    const n = 4099;
    const x = t32(randn(rng, n), [n]);
    for (const p of [0, 0.1, 0.5, 1]) {
      const o1 = zeros([n]);
      const o2 = zeros([n]);
      nb.dropout(x, o1, p, 0xdeadbeef, 12345);
      js.dropout(x, o2, p, 0xdeadbeef, 12345);
      same(f(o1), f(o2), `${isa} dropout p=${p}`);
    }
  });
});

test('argmax: the first index of the largest element, NaN never largest, 0 when none exceeds -inf', { skip }, () => {
  const reference = argmaxLoop; // the loop src/models/sampling.ts runs where no kernel is
  const rng = new Rng(23);
  eachIsa((nb, isa) => {
    for (const n of [1, 3, 15, 16, 17, 33, 1000, 49155]) {
      const cases: Float32Array[] = [];
      const r = () => Float32Array.from({ length: n }, () => rng.normal());
      cases.push(r());
      // the largest value twice (a tie: the first wins), in the vector part and in the tail
      const tie = r();
      const top = 100;
      tie[Math.floor(n / 3)] = top;
      tie[n - 1] = top;
      tie[Math.floor((2 * n) / 3)] = top;
      cases.push(tie);
      // ... and in the same lane of every vector width (16 apart)
      if (n > 40) {
        const lane = r();
        for (const i of [3, 19, 35]) lane[i] = top;
        cases.push(lane);
      }
      // NaN everywhere but a few, -inf, +-0 as the largest (the first zero of either sign wins)
      const nan = r().map((v, i) => (i % 5 === 2 ? v : Number.NaN));
      cases.push(nan);
      cases.push(new Float32Array(n).fill(Number.NaN));
      cases.push(new Float32Array(n).fill(Number.NEGATIVE_INFINITY));
      const zeros = new Float32Array(n).fill(-1);
      zeros[n - 1] = 0;
      zeros[Math.floor(n / 2)] = -0;
      cases.push(zeros);
      const inf = r();
      inf[n - 1] = Number.POSITIVE_INFINITY;
      cases.push(inf);
      for (const [k, x] of cases.entries()) assert.equal(nb.argmax!(x), reference(x), `${isa} n=${n} case ${k}`);
      // a view into a larger array
      const big = r();
      const view = big.subarray(1, n);
      assert.equal(nb.argmax!(view), reference(view), `${isa} n=${n} subarray`);
    }
  });
  // sampling's argmax takes the kernel for a vocabulary of logits, with the same answers
  const x = Float32Array.from({ length: 5000 }, () => rng.normal());
  x[4321] = 50;
  x[4999] = 50;
  assert.equal(argmax(x), 4321);
});

test('AdamW step and sumSquares', { skip }, () => {
  const rng = new Rng(10);
  eachIsa((nb, isa) => {
    const n = 5003;
    const p0 = randn(rng, n);
    const g = t32(randn(rng, n), [n]);
    const m0 = randn(rng, n, 0.1);
    const v0 = Float32Array.from(randn(rng, n, 0.1), (x) => x * x);
    const args = { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0.01, step: 7, gradScale: 0.5 };
    const run = (be: Backend) => {
      const [p, m, v] = [p0, m0, v0].map((a) => t32(Float32Array.from(a), [n])) as [Tensor, Tensor, Tensor];
      be.adamwStep(p, g, m, v, args);
      return [f(p), f(m), f(v)];
    };
    const a = run(nb);
    const b = run(js);
    for (let i = 0; i < 3; i++) close(a[i]!, b[i]!, 2 ** -23, 1e-30, `${isa} adamw ${i}`);
    const s1 = nb.sumSquares(g);
    const s2 = js.sumSquares(g);
    assert.ok(Math.abs(s1 - s2) <= 1e-12 * s2, `${isa} sumSquares ${s1} vs ${s2}`);
  });
});

// ---- fused row kernels ----------------------------------------------------------------------------------------

test('RMSNorm forward and backward (f32 and bf16 weights, odd dims)', { skip }, () => {
  const rng = new Rng(11);
  eachIsa((nb, isa) => {
    for (const [rows, dim] of [
      [37, 29],
      [5, 576],
      [2, 1],
    ] as const)
      for (const wdt of ['f32', 'bf16'] as DType[]) {
        const x = t32(randn(rng, rows * dim, 2), [rows, dim]);
        const w = encode(randn(rng, dim), wdt);
        const y1 = zeros([rows, dim]);
        const y2 = zeros([rows, dim]);
        const r1 = zeros([rows]);
        const r2 = zeros([rows]);
        nb.rmsNormForward(x, w, y1, r1, rows, dim, 1e-5);
        js.rmsNormForward(x, w, y2, r2, rows, dim, 1e-5);
        const label = `${isa} rmsnorm ${rows}x${dim} ${wdt}`;
        close(f(r1), f(r2), 2 ** -23, 0, `${label} rstd`);
        close(f(y1), f(y2), 2 ** -22, 1e-30, `${label} y`);
        const g = t32(randn(rng, rows * dim), [rows, dim]);
        const [dx1, dx2] = [zeros([rows, dim]), zeros([rows, dim])];
        const [dw1, dw2] = [zeros([dim]), zeros([dim])];
        nb.rmsNormBackward(g, x, w, r2, dx1, dw1, rows, dim);
        js.rmsNormBackward(g, x, w, r2, dx2, dw2, rows, dim);
        closeScaled(f(dx1), f(dx2), 1e-6, `${label} dx`);
        closeScaled(f(dw1), f(dw2), 1e-6, `${label} dw`);
        const dw3 = zeros([dim]);
        nb.rmsNormBackward(g, x, w, r2, null, dw3, rows, dim);
        same(f(dw3), f(dw1), `${label} dw alone`);
      }
  });
});

test('RoPE forward and backward, partial rotary, in place, large positions', { skip }, () => {
  const rng = new Rng(12);
  eachIsa((nb, isa) => {
    // 18 positions take their angles directly; 160 go through the per-thread table, which a change of positions
    // or frequencies must refresh (the rounds below change one, then the other)
    for (const [B, T, shift, scale] of [
      [2, 9, 0, 1],
      [4, 40, 0, 1],
      [4, 40, 7, 1],
      [4, 40, 7, 0.5],
    ] as const) {
      const [H, D, half] = [3, 20, 8];
      const x = t32(randn(rng, B * T * H * D), [B, T, H, D]);
      const pos = i32(
        Array.from({ length: B * T }, (_, i) => (i === 3 ? 100000 : i + shift)),
        [B, T],
      );
      const inv = t32(
        Float32Array.from({ length: half }, (_, j) => scale * 10000 ** (-j / half)),
        [half],
      );
      for (const dir of ['ropeForward', 'ropeBackward'] as const) {
        const label = `${isa} ${dir} ${B}x${T} +${shift} x${scale}`;
        const o1 = zeros([B, T, H, D]);
        const o2 = zeros([B, T, H, D]);
        nb[dir](x, pos, inv, o1);
        js[dir](x, pos, inv, o2);
        close(f(o1), f(o2), 2 ** -22, 1e-37, label);
        const inplace = t32(Float32Array.from(f(x)), [B, T, H, D]);
        nb[dir](inplace, pos, inv, inplace);
        same(f(inplace), f(o1), `${label} in place`);
        // the last row alone (too few positions for the table) gives the same bits
        const n = T * H * D;
        const xr = t32(f(x).slice((B - 1) * n), [1, T, H, D]);
        const pr = i32([...(pos.data as Int32Array).slice((B - 1) * T)], [1, T]);
        const or = zeros([1, T, H, D]);
        nb[dir](xr, pr, inv, or);
        same(f(or), f(o1).slice((B - 1) * n), `${label} row alone`);
      }
    }
  });
});

test('SwiGLU, softmax and log-softmax forward and backward', { skip }, () => {
  const rng = new Rng(13);
  eachIsa((nb, isa) => {
    const n = 3001;
    const gate = t32(withSpecials(rng, n), [n]);
    const up = t32(randn(rng, n), [n]);
    const g = t32(randn(rng, n), [n]);
    const [o1, o2] = [zeros([n]), zeros([n])];
    nb.swigluForward(gate, up, o1);
    js.swigluForward(gate, up, o2);
    close(f(o1), f(o2), 4e-6, 1e-37, `${isa} swiglu`);
    const [a1, a2, b1, b2] = [zeros([n]), zeros([n]), zeros([n]), zeros([n])];
    nb.swigluBackward(g, gate, up, a1, b1);
    js.swigluBackward(g, gate, up, a2, b2);
    close(f(a1), f(a2), 4e-6, 4e-6, `${isa} swiglu dGate`); // absolute: it crosses 0 at gate = -1.28
    close(f(b1), f(b2), 4e-6, 1e-37, `${isa} swiglu dUp`);
    for (const [rows, cols] of [
      [7, 1000],
      [33, 17],
    ] as const) {
      const x = t32(randn(rng, rows * cols, 4), [rows, cols]);
      f(x).fill(Number.NEGATIVE_INFINITY, 0, cols); // a fully masked row
      f(x)[cols + 3] = Number.NEGATIVE_INFINITY;
      const gg = t32(randn(rng, rows * cols), [rows, cols]);
      for (const [fw, bw] of [
        ['softmaxForward', 'softmaxBackward'],
        ['logSoftmaxForward', 'logSoftmaxBackward'],
      ] as const) {
        const [y1, y2] = [zeros([rows, cols]), zeros([rows, cols])];
        nb[fw](x, y1, rows, cols);
        js[fw](x, y2, rows, cols);
        // log-softmax: x - lse cancels, so the error is a few ulps of lse (~10 here), absolute
        close(f(y1), f(y2), 4e-6, fw === 'logSoftmaxForward' ? 4e-6 : 1e-37, `${isa} ${fw}`);
        // the backward of a fully masked row is NaN in the reference (y = -inf for log-softmax): skip row 0
        const y = t32(f(y2).slice(cols), [rows - 1, cols]);
        const g2 = t32(f(gg).slice(cols), [rows - 1, cols]);
        const [d1, d2] = [zeros([rows - 1, cols]), zeros([rows - 1, cols])];
        nb[bw](g2, y, d1, rows - 1, cols);
        js[bw](g2, y, d2, rows - 1, cols);
        close(f(d1), f(d2), 4e-6, 4e-7, `${isa} ${bw}`);
      }
    }
  });
});

test('cross-entropy over a large vocabulary: every reduction, ignored rows, the reference errors', { skip }, () => {
  const rng = new Rng(14);
  eachIsa((nb, isa) => {
    for (const [rows, vocab] of [
      [9, 50257],
      [13, 7],
    ] as const) {
      const logits = t32(randn(rng, rows * vocab, 3), [rows, vocab]);
      const tg = Array.from({ length: rows }, (_, r) => (r % 4 === 1 ? -100 : rng.int(vocab)));
      const targets = i32(tg, [rows]);
      for (const red of ['mean', 'sum', 'none'] as const) {
        const ln = red === 'none' ? rows : 1;
        const [l1, l2, s1, s2] = [zeros([rows]), zeros([rows]), zeros([ln]), zeros([ln])];
        nb.crossEntropyForward(logits, targets, l1, s1, rows, vocab, -100, red);
        js.crossEntropyForward(logits, targets, l2, s2, rows, vocab, -100, red);
        close(f(l1), f(l2), 2 ** -22, 1e-30, `${isa} ce lse ${red}`);
        close(f(s1), f(s2), 1e-5, 1e-6, `${isa} ce loss ${red}`);
        const go = t32(red === 'none' ? randn(rng, rows) : Float32Array.of(1.5), [ln]);
        const [d1, d2] = [zeros([rows, vocab]), zeros([rows, vocab])];
        f(d1).fill(7);
        nb.crossEntropyBackward(go, logits, targets, l2, d1, rows, vocab, -100, red);
        js.crossEntropyBackward(go, logits, targets, l2, d2, rows, vocab, -100, red);
        close(f(d1), f(d2), 4e-6, 1e-37, `${isa} ce backward ${red}`);
      }
    }
    const bad = i32([0, 9, 1], [3]);
    const msg = (be: Backend) =>
      assert.throws(
        () =>
          be.crossEntropyForward(t32(new Float32Array(15), [3, 5]), bad, zeros([3]), zeros([1]), 3, 5, -100, 'mean'),
        IndexError,
      );
    msg(nb);
    msg(js);
  });
});

test('DoRA weight norm, both layouts, bf16 weight', { skip }, () => {
  const rng = new Rng(15);
  eachIsa((nb, isa) => {
    const [outF, inF, r] = [37, 45, 5];
    for (const dt of ['f32', 'bf16'] as DType[])
      for (const tr of [false, true]) {
        const w = encode(randn(rng, outF * inF), dt);
        const a = t32(randn(rng, r * inF), [r, inF]);
        const b = t32(randn(rng, outF * r), [outF, r]);
        const [o1, o2] = [zeros([outF]), zeros([outF])];
        nb.loraWeightNorm(w, a, b, 0.7, o1, outF, inF, r, tr);
        js.loraWeightNorm(w, a, b, 0.7, o2, outF, inF, r, tr);
        close(f(o1), f(o2), 2 ** -23, 0, `${isa} dora ${dt} transposed=${tr}`);
      }
  });
});

/**
 * loraRows' rows as the gemm path computes them on backend be: per group, u = x A^T (beta 0) then
 * out += s u B^T (beta 1), after out += s * lora bias (the unary scale, then an add).
 */
function loraRowsByGemm(
  be: Backend,
  x: Float32Array,
  out0: Float32Array,
  rowGroup: Int32Array,
  groups: { a: Tensor; b: Tensor; scale: number; loraBias: Tensor | null }[],
  inF: number,
  outF: number,
): Float32Array {
  const out = Float32Array.from(out0);
  groups.forEach((g, k) => {
    const rows = [...rowGroup.keys()].filter((i) => rowGroup[i] === k);
    if (!rows.length) return;
    const n = rows.length;
    const r = g.a.shape[0]!;
    const xg = t32(new Float32Array(n * inF), [n, inF]);
    const yg = t32(new Float32Array(n * outF), [n, outF]);
    rows.forEach((i, q) => {
      f(xg).set(x.subarray(i * inF, (i + 1) * inF), q * inF);
      f(yg).set(out.subarray(i * outF, (i + 1) * outF), q * outF);
    });
    if (g.loraBias) {
      const lb = zeros([outF]);
      be.unary('scale', g.loraBias, lb, g.scale);
      for (let q = 0; q < n; q++) for (let o = 0; o < outF; o++) f(yg)[q * outF + o] += f(lb)[o]!;
    }
    const u = zeros([n, r]);
    const mm = (a: Tensor, lda: number, b: Tensor, ldb: number, c: Tensor, m: number, nn: number, kk: number) => ({
      transA: false,
      transB: true,
      m,
      n: nn,
      k: kk,
      a,
      aOff: 0,
      lda,
      b,
      bOff: b.offset,
      ldb,
      c,
      cOff: 0,
      ldc: nn,
    });
    be.gemm({ ...mm(xg, inF, g.a, inF, u, n, r, inF), alpha: 1, beta: 0 });
    be.gemm({ ...mm(u, r, g.b, r, yg, n, outF, r), alpha: g.scale, beta: 1 });
    rows.forEach((i, q) => {
      out.set(f(yg).subarray(q * outF, (q + 1) * outF), i * outF);
    });
  });
  return out;
}

test('loraRows (mixed-adapter rows in one call): bit-identical to the gemm path on every ISA, KC blocks', {
  skip,
}, () => {
  const rng = new Rng(17);
  eachIsa((nb, isa) => {
    const kc0 = addon!._blocking(0, 0, 0)[0];
    // the ISA's own KC, and a small one so that the rank spans several blocks of the expand too
    for (const kc of [0, 16]) {
      if (kc) addon!._blocking(kc, 0, 0);
      try {
        const KC = addon!._blocking(0, 0, 0)[0];
        for (const [inF, outF] of [
          [2 * KC + 37, 70],
          [45, 12],
          [64, 64],
        ] as const) {
          const rows = 48;
          const ranks = [4, 8, 16, 24, 3, 33];
          const scales = [0.5, 2, 1, 0.3, 0, -1.7];
          const groups = ranks.map((r, k) => ({
            a: t32(randn(rng, r * inF, 0.2), [r, inF]),
            b: t32(randn(rng, outF * r, 0.2), [outF, r]),
            scale: scales[k]!,
            loraBias: k % 2 ? t32(randn(rng, outF), [outF]) : null,
          }));
          // group 3 takes 20 rows (the blocked GEMM on the gemm path), the last rows have none
          const rg = Int32Array.from({ length: rows }, (_, i) =>
            i >= 8 && i < 28 ? 3 : i >= 42 ? -1 : [0, 1, 2, 4, 5][i % 5]!,
          );
          const x = randn(rng, rows * inF);
          const out0 = randn(rng, rows * outF);
          const label = `${isa} KC=${KC} ${inF} -> ${outF}`;
          const run = (be: Backend) => {
            const out = t32(Float32Array.from(out0), [rows, outF]);
            be.loraRows(t32(x, [rows, inF]), out, i32(rg, [rows]), groups, rows, inF, outF);
            return f(out);
          };
          const got = run(nb);
          same(got, loraRowsByGemm(nb, x, out0, rg, groups, inF, outF), `${label}: native vs its gemms`);
          // frozen adapters go to the kernel packed once (kept with the tensors); trainable ones are packed per
          // call, with the scale folded into B instead of applied as B is read: the same bits
          for (const g of groups) g.a.requiresGrad = g.b.requiresGrad = true;
          same(run(nb), got, `${label}: weights packed per call vs kept packed`);
          for (const g of groups) g.a.requiresGrad = g.b.requiresGrad = false;
          same(run(nb), got, `${label}: kept packed, second call`);
          closeScaled(got, run(js), (inF + 40) * 2 ** -24 * 8, `${label}: native vs reference`);
          if (kc === 0)
            same(run(js), loraRowsByGemm(js, x, out0, rg, groups, inF, outF), `${label}: reference vs its gemms`);
        }
      } finally {
        addon!._blocking(kc0, 0, 0);
      }
    }
    // many rows of few groups: a group's rows split over several chunks (each packs it again), threads
    {
      const [rows, inF, outF] = [300, 70, 40];
      const groups = [16, 5].map((r, k) => ({
        a: t32(randn(rng, r * inF, 0.2), [r, inF]),
        b: t32(randn(rng, outF * r, 0.2), [outF, r]),
        scale: 0.7 + k,
        loraBias: null,
      }));
      const rg = Int32Array.from({ length: rows }, (_, i) => (i % 7 === 0 ? -1 : i % 3 === 0 ? 1 : 0));
      const x = randn(rng, rows * inF);
      const out0 = randn(rng, rows * outF);
      const out = t32(Float32Array.from(out0), [rows, outF]);
      nb.loraRows(t32(x, [rows, inF]), out, i32(rg, [rows]), groups, rows, inF, outF);
      same(f(out), loraRowsByGemm(nb, x, out0, rg, groups, inF, outF), `${isa} ${rows} rows of 2 groups`);
    }
    // errors as the reference's
    const g = [{ a: zeros([2, 4]), b: zeros([3, 2]), scale: 1, loraBias: null }];
    const call = (be: Backend, rg: number[], gs = g) =>
      be.loraRows(zeros([2, 4]), zeros([2, 3]), i32(rg, [2]), gs, 2, 4, 3);
    for (const be of [nb, js]) {
      assert.throws(() => call(be, [0, 1]), IndexError);
      assert.throws(() => call(be, [0, -2]), IndexError);
      assert.throws(() => call(be, [0, -1], [{ ...g[0]!, b: zeros([4, 2]) }]), /do not fit/);
      assert.throws(() => call(be, [0, -1], [{ ...g[0]!, b: zeros([6, 1]).view([3, 2], [1, 3], 0) }]), TypeError);
      // weights checked at one call are checked again when they change, and a disposed one fails as on a read
      const gb = [{ a: zeros([2, 4]), b: zeros([3, 2]), scale: 1, loraBias: null }];
      call(be, [0, -1], gb);
      assert.throws(() => call(be, [0, -1], [{ ...gb[0]!, b: zeros([3, 3]) }]), /do not fit/);
      gb[0]!.b.dispose();
      assert.throws(() => call(be, [0, -1], gb), LifetimeError);
    }
  });
});

// ---- attention ----------------------------------------------------------------------------------------------

interface AttnCase {
  B: number;
  Tq: number;
  Tk: number;
  Hq: number;
  Hkv: number;
  D: number;
  kvDtype?: DType;
  mask?: 'u8' | 'i32';
  seq?: boolean;
  window?: number;
  /** k, v as the first Tk positions of a larger cache (strided). */
  cache?: number;
}

function attnInputs(rng: Rng, c: AttnCase): AttentionArgs {
  const q = t32(randn(rng, c.B * c.Tq * c.Hq * c.D), [c.B, c.Tq, c.Hq, c.D]);
  const cap = c.cache ?? c.Tk;
  const kv = () => {
    const full = encode(randn(rng, c.B * cap * c.Hkv * c.D), c.kvDtype ?? 'f32');
    return full.view([c.B, c.Tk, c.Hkv, c.D], [cap * c.Hkv * c.D, c.Hkv * c.D, c.D, 1], 0);
  };
  const k = kv();
  const v = kv();
  let keyMask: Tensor | null = null;
  if (c.mask) {
    const m = Array.from({ length: c.B * c.Tk }, (_, i) =>
      i % c.Tk < 2 && i >= c.Tk ? 0 : rng.uniform() < 0.15 ? 0 : 1,
    );
    keyMask = c.mask === 'u8' ? Tensor.fromTyped(Uint8Array.from(m), [c.B, c.Tk], 'u8') : i32(m, [c.B, c.Tk]);
  }
  let seqIds: Tensor | null = null;
  if (c.seq) {
    const s: number[] = [];
    for (let b = 0; b < c.B; b++) for (let j = 0; j < c.Tk; j++) s.push(Math.floor((j * 3) / c.Tk) + b);
    seqIds = i32(s, [c.B, c.Tk]);
  }
  return { q, k, v, scale: 1 / Math.sqrt(c.D), keyMask, seqIds, window: c.window ?? 0 };
}

/** Zeroed out [B, Tq, Hq, D] and lse [B, Hq, Tq] for a case. */
function attnOutputs(c: AttnCase): readonly [Tensor, Tensor] {
  return [zeros([c.B, c.Tq, c.Hq, c.D]), zeros([c.B, c.Hq, c.Tq])];
}

test('attention forward and backward: GQA, offsets, masks, packed sequences, windows, strided bf16 KV', {
  skip,
}, () => {
  const rng = new Rng(16);
  const cases: AttnCase[] = [
    { B: 2, Tq: 37, Tk: 37, Hq: 4, Hkv: 2, D: 16 },
    { B: 1, Tq: 5, Tk: 70, Hq: 3, Hkv: 1, D: 33, mask: 'u8' },
    { B: 2, Tq: 1, Tk: 100, Hq: 2, Hkv: 2, D: 64, kvDtype: 'bf16', cache: 130 },
    { B: 2, Tq: 50, Tk: 50, Hq: 2, Hkv: 1, D: 8, seq: true, mask: 'i32' },
    { B: 1, Tq: 80, Tk: 90, Hq: 2, Hkv: 2, D: 24, window: 17, kvDtype: 'f16' },
    // the score kernels: f32 keys read in place (few rows) at D 64, 128 and 40 (whole vectors and a part), and
    // packed (many rows) at D 128
    { B: 1, Tq: 1, Tk: 150, Hq: 6, Hkv: 2, D: 64, cache: 200 },
    { B: 1, Tq: 2, Tk: 77, Hq: 4, Hkv: 2, D: 128 },
    { B: 1, Tq: 1, Tk: 70, Hq: 3, Hkv: 3, D: 40, mask: 'u8' },
    { B: 2, Tq: 20, Tk: 40, Hq: 4, Hkv: 1, D: 128, mask: 'u8' },
  ];
  eachIsa((nb, isa) => {
    for (const c of cases) {
      const a = attnInputs(rng, c);
      const label = `${isa} ${JSON.stringify(c)}`;
      const [o1, l1] = attnOutputs(c);
      const [o2, l2] = attnOutputs(c);
      nb.attentionForward(a, o1, l1);
      js.attentionForward(a, o2, l2);
      close(f(o1), f(o2), 0, 2e-6, `${label} out`);
      close(f(l1), f(l2), 1e-6, 1e-6, `${label} lse`);
      const g = t32(randn(rng, o2.size), [...o2.shape]);
      const grads = () => [zeros([...a.q.shape]), zeros([...a.k.shape]), zeros([...a.v.shape])] as const;
      const [dq1, dk1, dv1] = grads();
      const [dq2, dk2, dv2] = grads();
      nb.attentionBackward(a, o2, l2, g, dq1, dk1, dv1);
      js.attentionBackward(a, o2, l2, g, dq2, dk2, dv2);
      closeScaled(f(dq1), f(dq2), 2e-5, `${label} dq`);
      closeScaled(f(dk1), f(dk2), 2e-5, `${label} dk`);
      closeScaled(f(dv1), f(dv2), 2e-5, `${label} dv`);
      const dk3 = zeros([...a.k.shape]);
      nb.attentionBackward(a, o2, l2, g, null, dk3, null);
      same(f(dk3), f(dk1), `${label} dk alone`);
    }
  });
});

test('attention: a sequence alone equals the same sequence right-aligned in a padded batch, bit for bit', {
  skip,
}, () => {
  const rng = new Rng(17);
  eachIsa((nb, isa) => {
    const [H, D] = [2, 16];
    for (const [len, T, pad] of [
      [40, 40, 90],
      [3, 1, 150],
      [100, 7, 3],
    ] as const) {
      // alone: Tk = len keys, the last T of them queried
      const k0 = randn(rng, len * H * D);
      const v0 = randn(rng, len * H * D);
      const q0 = randn(rng, T * H * D);
      const alone: AttentionArgs = {
        q: t32(q0, [1, T, H, D]),
        k: t32(k0, [1, len, H, D]),
        v: t32(v0, [1, len, H, D]),
        scale: 0.25,
        keyMask: null,
        seqIds: null,
        window: 0,
      };
      // batched: row 1 holds the sequence right-aligned after `pad` masked (garbage) positions, with T + 2
      // queries of which the first 2 are padding; row 0 is another sequence
      const Tk = len + pad;
      const Tq = T + 2;
      const kb = randn(rng, 2 * Tk * H * D, 1e3);
      const vb = randn(rng, 2 * Tk * H * D, 1e3);
      kb.set(k0, (Tk + pad) * H * D);
      vb.set(v0, (Tk + pad) * H * D);
      const qb = randn(rng, 2 * Tq * H * D);
      qb.set(q0, (Tq + 2) * H * D);
      const mask = new Uint8Array(2 * Tk).fill(1);
      mask.fill(0, Tk, Tk + pad);
      const batched: AttentionArgs = {
        q: t32(qb, [2, Tq, H, D]),
        k: t32(kb, [2, Tk, H, D]),
        v: t32(vb, [2, Tk, H, D]),
        scale: 0.25,
        keyMask: Tensor.fromTyped(mask, [2, Tk], 'u8'),
        seqIds: null,
        window: 0,
      };
      const [oa, la] = [zeros([1, T, H, D]), zeros([1, H, T])];
      const [ob, lb] = [zeros([2, Tq, H, D]), zeros([2, H, Tq])];
      nb.attentionForward(alone, oa, la);
      nb.attentionForward(batched, ob, lb);
      same(f(ob).subarray((Tq + 2) * H * D), f(oa), `${isa} len=${len} T=${T} pad=${pad}: out`);
      for (let h = 0; h < H; h++)
        same(f(lb).subarray((H + h) * Tq + 2, (H + h + 1) * Tq), f(la).subarray(h * T, (h + 1) * T), `${isa} lse`);
    }
  });
});

test('attention over the KV cache layout (head-major K and V) equals the plain layout bit for bit', {
  skip,
}, () => {
  const rng = new Rng(18);
  const cases: AttnCase[] = [
    { B: 1, Tq: 1, Tk: 100, Hq: 9, Hkv: 3, D: 64 }, // decoding: whole blocks' V rows read in place
    { B: 2, Tq: 1, Tk: 70, Hq: 4, Hkv: 2, D: 16, mask: 'u8' }, // masked keys: those blocks packed
    { B: 1, Tq: 5, Tk: 90, Hq: 6, Hkv: 2, D: 24 }, // D not a multiple of the vector: V packed
    { B: 1, Tq: 3, Tk: 40, Hq: 2, Hkv: 1, D: 32, kvDtype: 'bf16' }, // bf16: packed
  ];
  eachIsa((nb, isa) => {
    for (const c of cases) {
      const a = attnInputs(rng, c);
      const { B, Tk, Hkv, D } = c;
      const cap = Tk + 9;
      // K and V stored [B, Hkv, cap, D] (models/kv-cache.ts), holding the same values, seen as [B, Tk, Hkv, D]
      const store = () =>
        encode(new Float32Array(B * Hkv * cap * D), c.kvDtype ?? 'f32').view(
          [B, Hkv, cap, D],
          [Hkv * cap * D, cap * D, D, 1],
          0,
        );
      const kView = positionsView(store(), 0, Tk);
      const vView = positionsView(store(), 0, Tk);
      js.copy(a.k, kView);
      js.copy(a.v, vView);
      const cached = { ...a, k: kView, v: vView };
      const label = `${isa} ${JSON.stringify(c)}`;
      const [o1, l1] = attnOutputs(c);
      const [o2, l2] = attnOutputs(c);
      const [o3, l3] = attnOutputs(c);
      nb.attentionForward(a, o1, l1);
      nb.attentionForward(cached, o2, l2);
      same(f(o2), f(o1), `${label} out`);
      same(f(l2), f(l1), `${label} lse`);
      js.attentionForward(cached, o3, l3);
      close(f(o3), f(o1), 0, 2e-6, `${label} reference out`);
      const g = t32(randn(rng, o1.size), [...o1.shape]);
      const grads = () => [zeros([...a.q.shape]), zeros([...a.k.shape]), zeros([...a.v.shape])] as const;
      const [dq1, dk1, dv1] = grads();
      const [dq2, dk2, dv2] = grads();
      nb.attentionBackward(a, o1, l1, g, dq1, dk1, dv1);
      nb.attentionBackward(cached, o1, l1, g, dq2, dk2, dv2);
      same(f(dq2), f(dq1), `${label} dq`);
      same(f(dk2), f(dk1), `${label} dk`);
      same(f(dv2), f(dv1), `${label} dv`);
    }
  });
});

test('attention reads bf16 K and V as f32 keys holding the same values, bit for bit', { skip }, () => {
  const rng = new Rng(19);
  const cases: AttnCase[] = [
    { B: 1, Tq: 1, Tk: 290, Hq: 9, Hkv: 3, D: 64, cache: 300 }, // decoding: chunks, K and V rows in place
    { B: 2, Tq: 1, Tk: 70, Hq: 4, Hkv: 2, D: 16, mask: 'u8' }, // masked keys: zero rows, those V blocks packed
    { B: 1, Tq: 2, Tk: 77, Hq: 4, Hkv: 2, D: 128 }, // four rows, D 128
    { B: 1, Tq: 1, Tk: 70, Hq: 3, Hkv: 3, D: 40 }, // K in place with a part vector, V packed
    { B: 1, Tq: 5, Tk: 90, Hq: 6, Hkv: 2, D: 64, window: 30 }, // many rows: both packed
  ];
  // the bf16 values widened into an f32 buffer of the same layout
  const widen = (t: Tensor) =>
    Tensor.fromTyped(Float32Array.from(t.data as Uint16Array, bf16ToF32), [t.data.length], 'f32').view(
      [...t.shape],
      [...t.strides],
      t.offset,
    );
  eachIsa((nb, isa) => {
    for (const c of cases) {
      const h = attnInputs(rng, { ...c, kvDtype: 'bf16' });
      const w = { ...h, k: widen(h.k), v: widen(h.v) };
      const label = `${isa} ${JSON.stringify(c)}`;
      const [o1, l1] = attnOutputs(c);
      const [o2, l2] = attnOutputs(c);
      nb.attentionForward(h, o1, l1);
      nb.attentionForward(w, o2, l2);
      same(f(o1), f(o2), `${label} out`);
      same(f(l1), f(l2), `${label} lse`);
    }
  });
});

// ---- 4-bit --------------------------------------------------------------------------------------------------

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

test('4-bit: gemm4bit (decode and tiled paths), input gradient and dequantisation; rows invariant to m', {
  skip,
}, () => {
  const rng = new Rng(18);
  const cases = [
    { n: 70, k: 128, bs: 64, dq: false }, // the fused decode path (k % 8 == 0, k % bs == 0)
    { n: 37, k: 96, bs: 64, dq: true }, // blocks straddle rows
    { n: 5, k: 7, bs: 32, dq: false }, // rows start mid-byte
    { n: 33, k: 576, bs: 64, dq: true },
  ];
  eachIsa((nb, isa) => {
    for (const c of cases) {
      const s = quantize4bit(randn(rng, c.n * c.k), {
        quantType: c.dq ? 'nf4' : 'fp4',
        blocksize: c.bs,
        doubleQuant: c.dq,
        shape: [c.n, c.k],
      });
      const w = weightOf(s);
      const label = `${isa} ${JSON.stringify(c)}`;
      const [d1, d2] = [zeros([c.n, c.k]), zeros([c.n, c.k])];
      nb.dequantize4bitRows(w, 0, c.n, d1);
      js.dequantize4bitRows(w, 0, c.n, d2);
      same(f(d1), f(d2), `${label} dequantize`);
      const M = 40;
      const x = randn(rng, M * c.k);
      const bias = encode(randn(rng, c.n), 'bf16');
      const run = (be: Backend, m: number, i0: number) => {
        const y = zeros([m, c.n]);
        be.gemm4bit(t32(x.slice(i0 * c.k, (i0 + m) * c.k), [m, c.k]), w, bias, y, m);
        return f(y);
      };
      const all = run(nb, M, 0);
      closeScaled(all, run(js, M, 0), (c.k + 8) * 2 ** -24 * 4, `${label} gemm4bit`);
      for (const [m, i0] of [
        [1, 0],
        [1, 33],
        [3, 2],
        [16, 10],
        [17, 1],
      ] as const) {
        same(run(nb, m, i0), all.subarray(i0 * c.n, (i0 + m) * c.n), `${label} rows ${i0}..${i0 + m} alone`);
        if (m === 1) closeScaled(run(nb, 1, i0), run(js, 1, i0), (c.k + 8) * 2 ** -24 * 4, `${label} m=1`);
      }
      const g = t32(randn(rng, M * c.n), [M, c.n]);
      const [x1, x2] = [zeros([M, c.k]), zeros([M, c.k])];
      nb.gemm4bitBackwardInput(g, w, x1, M);
      js.gemm4bitBackwardInput(g, w, x2, M);
      closeScaled(f(x1), f(x2), (c.n + 8) * 2 ** -24 * 4, `${label} backward`);
    }
  });
});

test('the native backend falls back to the reference for what it does not take', { skip }, () => {
  const nb = makeNativeBackend(addon!);
  assert.equal(nb.name, 'native');
  // the erf GELU stays on the reference: identical results
  const x = t32(randn(new Rng(19), 500), [500]);
  const [o1, o2] = [zeros([500]), zeros([500])];
  nb.geluForward(x, o1, 'none');
  js.geluForward(x, o2, 'none');
  same(f(o1), f(o2), 'gelu erf');
  // a non-f32 binary input goes to the reference, which raises its TypeError
  assert.throws(() => nb.binary('add', encode(f(x), 'bf16'), x, zeros([500])), TypeError);
});

// ---- memory hints -----------------------------------------------------------------------------------------

test('allocStreamed: zeroed memory that stays valid while its buffer lives; emptyStreamed tensors', {
  skip,
}, async () => {
  const nb = makeNativeBackend(addon!);
  const bufs = [1, 3 << 20, 5000].map((n) => nb.allocStreamed!(n));
  assert.deepEqual(
    bufs.map((b) => b.byteLength),
    [1, 3 << 20, 5000],
  );
  for (const b of bufs) assert.ok(new Uint8Array(b).every((v) => v === 0));
  assert.throws(() => nb.allocStreamed!(-1), RangeError);
  // a decode-sized product over streamed weights, then read-ahead past it, gives the same bits as plain memory
  const [K, N] = [300, 200];
  const w = randn(new Rng(3), K * N);
  const ws = new Float32Array(nb.allocStreamed!(K * N * 4 + 4096), 0, K * N);
  ws.set(w);
  const x = t32(randn(new Rng(4), K), [1, K]);
  const run = (b: Float32Array) => {
    const c = zeros([1, N]);
    nb.gemm({
      transA: false,
      transB: false,
      m: 1,
      n: N,
      k: K,
      alpha: 1,
      beta: 0,
      a: x,
      aOff: 0,
      lda: K,
      b: t32(b, [K * N]),
      bOff: 0,
      ldb: N,
      c,
      cOff: 0,
      ldc: N,
    });
    return f(c);
  };
  same(run(ws), run(w), 'product over streamed memory');
  const { emptyStreamed } = await import('../../src/ops/create.ts');
  const t = emptyStreamed([3, 1 << 20], 'bf16');
  assert.deepEqual(t.shape, [3, 1 << 20]);
  assert.equal(t.dtype, 'bf16');
  assert.ok((t.data as Uint16Array).every((v) => v === 0));
  t.dispose();
});
