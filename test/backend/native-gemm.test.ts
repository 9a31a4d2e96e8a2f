// The native GEMM against a plain TypeScript reference (f64 accumulation), under every kernel set this CPU
// has (avx512, avx2, generic via setIsa).
//
// Tolerance: |C - ref| <= (K + 8) * 2^-24 * S per element, with S = |alpha| * sum_k |a_ik b_kj| + |beta c_ij|.
// That is the worst-case bound of f32 summation in any order (bf16/f16 operands convert to f32 exactly), so
// it cannot fail on a correct kernel; a wrong, missing or doubled term of the sum is about S / K, far above
// it for the K used here. Elements of C outside the M x N window(s) must come back bit-identical.

import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import {
  loadNativeAddon,
  type NativeAddon,
  type NativeArray,
  type NativeDTypeCode,
  type NativeIsa,
} from '../../src/backend/cpu/native-addon.ts';
import { bf16ToF32, f16ToF32, f32ToBf16, f32ToF16 } from '../../src/core/dtype.ts';
import { Rng } from '../../src/core/rng.ts';

const addon = loadNativeAddon();
const skip = addon ? false : 'the native addon is not built (npm run build:native) or LOWRANK_BACKEND=js';
const ISAS: NativeIsa[] = ['avx512', 'avx2', 'generic'];
const DTYPES: NativeDTypeCode[] = [0, 1, 2];
const DTYPE_NAME = ['f32', 'bf16', 'f16'];
const U = 2 ** -24;

function isasHere(n: NativeAddon): NativeIsa[] {
  return ISAS.slice(ISAS.indexOf(n.bestIsa()));
}

function decode(data: NativeArray, dtype: NativeDTypeCode): Float64Array {
  const out = new Float64Array(data.length);
  for (let i = 0; i < data.length; i++) {
    const v = data[i]!;
    out[i] = dtype === 0 ? v : dtype === 1 ? bf16ToF32(v) : f16ToF32(v);
  }
  return out;
}

function randomArray(rng: Rng, n: number, dtype: NativeDTypeCode): NativeArray {
  if (dtype === 0) {
    const a = new Float32Array(n);
    for (let i = 0; i < n; i++) a[i] = rng.uniform() * 2 - 1;
    return a;
  }
  const a = new Uint16Array(n);
  for (let i = 0; i < n; i++) {
    const x = rng.uniform() * 2 - 1;
    a[i] = dtype === 1 ? f32ToBf16(x) : f32ToF16(x);
  }
  return a;
}

interface Case {
  transA: boolean;
  transB: boolean;
  M: number;
  N: number;
  K: number;
  alpha: number;
  beta: number;
  aDtype: NativeDTypeCode;
  bDtype: NativeDTypeCode;
  batch?: number;
  /** Batched only: B is one matrix for every batch entry (strideB 0). */
  broadcastB?: boolean;
  /** Batched only: C matrices interleaved within rows, as an attention output [T, heads, dim]. */
  interleaveC?: boolean;
}

function label(c: Case): string {
  const t = `${c.transA ? 'T' : 'N'}${c.transB ? 'T' : 'N'}`;
  const b = c.batch ? ` batch=${c.batch}${c.broadcastB ? ' B-bcast' : ''}${c.interleaveC ? ' C-interleaved' : ''}` : '';
  return `${t} M=${c.M} N=${c.N} K=${c.K} alpha=${c.alpha} beta=${c.beta} A=${DTYPE_NAME[c.aDtype]} B=${DTYPE_NAME[c.bDtype]}${b}`;
}

/** Runs one case through the addon and checks every element of the C array. */
function runCase(n: NativeAddon, rng: Rng, c: Case, ctx: string): void {
  const batch = c.batch ?? 1;
  const [aRows, aCols] = c.transA ? [c.K, c.M] : [c.M, c.K];
  const [bRows, bCols] = c.transB ? [c.N, c.K] : [c.K, c.N];
  const lda = Math.max(1, aCols + rng.int(3));
  const ldb = Math.max(1, bCols + rng.int(3));
  const aOff = rng.int(5);
  const bOff = rng.int(5);
  const cOff = rng.int(5);
  const aSize = aRows > 0 ? (aRows - 1) * lda + aCols : 0;
  const bSize = bRows > 0 ? (bRows - 1) * ldb + bCols : 0;
  const strideA = aSize + rng.int(4);
  const strideB = c.broadcastB ? 0 : bSize + rng.int(4);
  let ldc: number;
  let strideC: number;
  if (c.interleaveC) {
    strideC = c.N + rng.int(3);
    ldc = (batch - 1) * strideC + c.N + rng.int(3);
  } else {
    ldc = Math.max(1, c.N + rng.int(3));
    strideC = (c.M > 0 ? (c.M - 1) * ldc + c.N : 0) + rng.int(4);
  }
  const A = randomArray(rng, aOff + (batch - 1) * strideA + aSize + rng.int(3), c.aDtype);
  const B = randomArray(rng, bOff + (batch - 1) * strideB + bSize + rng.int(3), c.bDtype);
  const cLen = cOff + (c.M > 0 ? (batch - 1) * strideC + (c.M - 1) * ldc + c.N : 0) + rng.int(3);
  const C = new Float32Array(cLen);
  for (let i = 0; i < cLen; i++) C[i] = rng.uniform() * 2 - 1;
  if (c.beta === 0) {
    // beta = 0: C must not be read, so NaN in the window must not leak into the result.
    for (let b = 0; b < batch; b++)
      for (let i = 0; i < c.M; i++) for (let j = 0; j < c.N; j++) C[cOff + b * strideC + i * ldc + j] = Number.NaN;
  }
  const C0 = Float32Array.from(C);
  const Ad = decode(A, c.aDtype);
  const Bd = decode(B, c.bDtype);

  if (c.batch === undefined) {
    n.gemm(
      c.transA,
      c.transB,
      c.M,
      c.N,
      c.K,
      c.alpha,
      A,
      aOff,
      lda,
      c.aDtype,
      B,
      bOff,
      ldb,
      c.bDtype,
      c.beta,
      C,
      cOff,
      ldc,
    );
  } else {
    n.gemmBatched(
      batch,
      c.transA,
      c.transB,
      c.M,
      c.N,
      c.K,
      c.alpha,
      A,
      aOff,
      lda,
      strideA,
      c.aDtype,
      B,
      bOff,
      ldb,
      strideB,
      c.bDtype,
      c.beta,
      C,
      cOff,
      ldc,
      strideC,
    );
  }

  const inWindow = new Uint8Array(cLen);
  for (let b = 0; b < batch; b++) {
    const a0 = aOff + b * strideA;
    const b0 = bOff + b * strideB;
    for (let i = 0; i < c.M; i++) {
      for (let j = 0; j < c.N; j++) {
        let s = 0;
        let mag = 0;
        for (let k = 0; k < c.K; k++) {
          const av = c.transA ? Ad[a0 + k * lda + i]! : Ad[a0 + i * lda + k]!;
          const bv = c.transB ? Bd[b0 + j * ldb + k]! : Bd[b0 + k * ldb + j]!;
          s += av * bv;
          mag += Math.abs(av * bv);
        }
        const idx = cOff + b * strideC + i * ldc + j;
        inWindow[idx] = 1;
        const c0 = c.beta === 0 ? 0 : C0[idx]!;
        const want = c.alpha * s + c.beta * c0;
        const tol = (c.K + 8) * U * (Math.abs(c.alpha) * mag + Math.abs(c.beta * c0)) + 1e-30;
        const got = C[idx]!;
        if (!(Math.abs(got - want) <= tol)) {
          assert.fail(`${ctx} ${label(c)}: C[${b}][${i},${j}] = ${got}, want ${want} (tolerance ${tol})`);
        }
      }
    }
  }
  for (let i = 0; i < cLen; i++) {
    if (!inWindow[i] && !Object.is(C[i], C0[i])) assert.fail(`${ctx} ${label(c)}: C[${i}] outside the window changed`);
  }
}

const ODD = [1, 3, 7, 13, 17, 31, 65, 127, 257];

function pick<T>(rng: Rng, xs: readonly T[]): T {
  return xs[rng.int(xs.length)]!;
}

function randomScalars(rng: Rng): { alpha: number; beta: number } {
  const alpha = pick(rng, [1, -1, 0.5, 1.75]);
  const beta = pick(rng, [0, 0, 1, -0.5, 2]);
  return { alpha, beta };
}

// The whole check for the ISA and thread count currently set.
function checkAll(n: NativeAddon, seed: number, ctx: string): void {
  const rng = new Rng(seed);
  // Odd sizes, every transpose case, dtypes cycling; products kept small enough for the f64 reference.
  let d = 0;
  for (let t = 0; t < 4; t++) {
    for (let r = 0; r < 12; r++) {
      let M = pick(rng, ODD);
      let N = pick(rng, ODD);
      let K = pick(rng, ODD);
      while (M * N * K > 3e6) {
        if (M >= N && M >= K) M = pick(rng, ODD.slice(0, 6));
        else if (N >= K) N = pick(rng, ODD.slice(0, 6));
        else K = pick(rng, ODD.slice(0, 6));
      }
      const aDtype = DTYPES[d % 3]!;
      const bDtype = DTYPES[Math.floor(d / 3) % 3]!;
      d++;
      runCase(
        n,
        rng,
        { transA: (t & 1) === 1, transB: (t & 2) === 2, M, N, K, aDtype, bDtype, ...randomScalars(rng) },
        ctx,
      );
    }
  }
  // Blocked path across cache-block boundaries: several K blocks (beta then 1), row and column blocks, edges.
  for (let t = 0; t < 4; t++) {
    for (const [M, N, K] of [
      [67, 97, 300],
      [45, 70, 33],
    ]) {
      for (const aDtype of DTYPES) {
        runCase(
          n,
          rng,
          {
            transA: (t & 1) === 1,
            transB: (t & 2) === 2,
            M: M!,
            N: N!,
            K: K!,
            aDtype,
            bDtype: pick(rng, DTYPES),
            ...randomScalars(rng),
          },
          ctx,
        );
      }
    }
  }
  // Skinny products: M = 1..16 (decoding x W^T, and W not transposed), and N = 1..16 (the mirror).
  for (let M = 1; M <= 16; M++) {
    for (const transB of [true, false]) {
      const bDtype = DTYPES[M % 3]!;
      const N = pick(rng, [1, 5, 64, 100, 257]);
      const K = pick(rng, [1, 15, 16, 17, 129, 300]);
      runCase(n, rng, { transA: M % 2 === 0, transB, M, N, K, aDtype: 0, bDtype, ...randomScalars(rng) }, ctx);
      runCase(
        n,
        rng,
        { transA: !transB, transB: M % 3 === 0, M: 131, N: M, K, aDtype: bDtype, bDtype: 0, ...randomScalars(rng) },
        ctx,
      );
    }
  }
  // Few rows over a long K with A transposed (LoRA's weight gradients du^T x, K = the batch's tokens): f32 takes
  // AVX2's in-place 6 x 16 tiles (skinny_tn), other dtypes and ISAs the blocked path; partial column tiles and
  // every row remainder.
  for (const M of [1, 5, 6, 7, 12, 16])
    for (const [N, K] of [
      [16, 512],
      [40, 700],
      [257, 520],
    ])
      runCase(
        n,
        rng,
        { transA: true, transB: false, M, N: N!, K: K!, aDtype: 0, bDtype: M === 7 ? 1 : 0, ...randomScalars(rng) },
        ctx,
      );
  // Batched: per-entry strides, B shared by every entry, C interleaved within rows, few and many entries.
  for (const [batch, M, N, K] of [
    [3, 17, 31, 13],
    [8, 33, 40, 24],
    [5, 1, 70, 31],
    [2, 70, 65, 257],
  ]) {
    for (let t = 0; t < 4; t++) {
      runCase(
        n,
        rng,
        {
          transA: (t & 1) === 1,
          transB: (t & 2) === 2,
          M: M!,
          N: N!,
          K: K!,
          aDtype: pick(rng, DTYPES),
          bDtype: pick(rng, DTYPES),
          ...randomScalars(rng),
          batch: batch!,
          broadcastB: t === 1,
          interleaveC: t >= 2,
        },
        ctx,
      );
    }
  }
  // Degenerate shapes: K = 0 and alpha = 0 give beta * C; empty M or N touch nothing.
  runCase(n, rng, { transA: false, transB: true, M: 5, N: 7, K: 0, alpha: 1, beta: 0.5, aDtype: 0, bDtype: 1 }, ctx);
  runCase(n, rng, { transA: false, transB: false, M: 40, N: 50, K: 9, alpha: 0, beta: 0, aDtype: 2, bDtype: 0 }, ctx);
  runCase(n, rng, { transA: true, transB: false, M: 0, N: 7, K: 3, alpha: 1, beta: 1, aDtype: 0, bDtype: 0 }, ctx);
  runCase(n, rng, { transA: false, transB: false, M: 4, N: 0, K: 3, alpha: 1, beta: 1, aDtype: 0, bDtype: 0 }, ctx);
}

let savedThreads = 1;
before(() => {
  if (addon) savedThreads = addon.getThreads();
});
after(() => {
  if (addon) {
    addon.setIsa('auto');
    addon.setThreads(savedThreads);
  }
});

test('native gemm matches the f64 reference under every ISA and thread count', { skip }, () => {
  const n = addon!;
  for (const isa of isasHere(n)) {
    n.setIsa(isa);
    assert.equal(n.isa(), isa);
    for (const threads of [1, 2, 3]) {
      n.setThreads(threads);
      checkAll(n, 1000 + threads, `[${isa}, ${threads} threads]`);
    }
  }
});

test('native gemm is correct with tiny cache blocks (every block edge taken)', { skip }, () => {
  const n = addon!;
  for (const isa of isasHere(n)) {
    n.setIsa(isa);
    const saved = n._blocking(0, 0, 0);
    try {
      n._blocking(32, 1, 1); // rounded up to one micro-tile of rows and columns
      n.setThreads(2);
      const rng = new Rng(7);
      for (let t = 0; t < 4; t++) {
        for (const dt of DTYPES) {
          runCase(
            n,
            rng,
            {
              transA: (t & 1) === 1,
              transB: (t & 2) === 2,
              M: 57,
              N: 83,
              K: 101,
              alpha: 1.5,
              beta: 0.5,
              aDtype: dt,
              bDtype: dt,
            },
            `[${isa}, small blocks]`,
          );
        }
      }
    } finally {
      n._blocking(...saved);
    }
  }
});

test('f16 and bf16 operands convert exactly (subnormals, infinities, NaN)', { skip }, () => {
  const n = addon!;
  for (const isa of isasHere(n)) {
    n.setIsa(isa);
    for (const dtype of [1, 2] as const) {
      // Every 16-bit pattern as a column of A; C = A * ones[1, N] must reproduce each decoded value exactly.
      const M = 65536;
      const A = new Uint16Array(M);
      for (let i = 0; i < M; i++) A[i] = i;
      const want = decode(A, dtype);
      for (const N of [1, 40]) {
        for (const transA of [false, true]) {
          const B = new Float32Array(N).fill(1);
          const C = new Float32Array(M * N);
          n.gemm(transA, false, M, N, 1, 1, A, 0, transA ? M : 1, dtype, B, 0, N, 0, 0, C, 0, N);
          for (let i = 0; i < M; i++) {
            for (let j = 0; j < N; j++) {
              const got = C[i * N + j]!;
              const w = want[i]!;
              if (!(Object.is(got, w) || (Number.isNaN(got) && Number.isNaN(w)) || (got === 0 && w === 0))) {
                assert.fail(
                  `[${isa}] ${DTYPE_NAME[dtype]} 0x${i.toString(16)}: got ${got}, want ${w} (N=${N}, transA=${transA})`,
                );
              }
            }
          }
        }
      }
    }
  }
});

test('native gemm rejects out-of-bounds and malformed arguments without touching C', { skip }, () => {
  const n = addon!;
  n.setIsa('auto');
  const A = new Float32Array(12); // 3 x 4
  const B = new Float32Array(20); // 4 x 5
  const C = new Float32Array(15).fill(7); // 3 x 5
  const ok = () => n.gemm(false, false, 3, 5, 4, 1, A, 0, 4, 0, B, 0, 5, 0, 0, C, 0, 5);
  ok();
  C.fill(7);
  assert.throws(() => n.gemm(false, false, 3, 5, 4, 1, A, 1, 4, 0, B, 0, 5, 0, 0, C, 0, 5), RangeError); // A offset
  assert.throws(() => n.gemm(false, false, 3, 5, 4, 1, A, 0, 4, 0, B, 0, 6, 0, 0, C, 0, 5), RangeError); // ldb
  assert.throws(() => n.gemm(false, false, 3, 5, 4, 1, A, 0, 4, 0, B, 0, 5, 0, 0, C, 1, 5), RangeError); // C offset
  assert.throws(() => n.gemm(false, false, 3, 5, 4, 1, A, 0, 3, 0, B, 0, 5, 0, 0, C, 0, 5), RangeError); // lda < K
  assert.throws(() => n.gemm(true, false, 3, 5, 4, 1, A, 0, 4, 0, B, 0, 5, 0, 0, C, 0, 5), RangeError); // A^T [4, 3] with lda 4: 15 elements
  assert.throws(() => n.gemm(false, false, 3.5, 5, 4, 1, A, 0, 4, 0, B, 0, 5, 0, 0, C, 0, 5), RangeError); // non-integer
  assert.throws(() => n.gemm(false, false, -1, 5, 4, 1, A, 0, 4, 0, B, 0, 5, 0, 0, C, 0, 5), RangeError);
  assert.throws(() => n.gemm(false, false, 1e300, 5, 4, 1, A, 0, 4, 0, B, 0, 5, 0, 0, C, 0, 5), RangeError);
  assert.throws(() => n.gemm(false, false, 3, 5, 4, 1, A, Number.NaN, 4, 0, B, 0, 5, 0, 0, C, 0, 5), RangeError);
  assert.throws(() => n.gemm(false, false, 3, 5, 2 ** 40, 1, A, 0, 2 ** 40, 0, B, 0, 5, 0, 0, C, 0, 5), RangeError);
  assert.throws(() => n.gemm(false, false, 3, 5, 4, 1, A, 0, 4, 1, B, 0, 5, 0, 0, C, 0, 5), TypeError); // bf16 code, f32 array
  assert.throws(
    () => n.gemm(false, false, 3, 5, 4, 1, A, 0, 4, 3 as NativeDTypeCode, B, 0, 5, 0, 0, C, 0, 5),
    RangeError,
  ); // dtype code
  assert.throws(
    () =>
      n.gemm(false, false, 3, 5, 4, 1, A, 0, 4, 0, B, 0, 5, 0, 0, new Uint16Array(15) as unknown as Float32Array, 0, 5),
    TypeError,
  );
  // C sharing memory with A.
  const shared = new Float32Array(100);
  assert.throws(
    () =>
      n.gemm(false, false, 3, 5, 4, 1, shared.subarray(0, 12), 0, 4, 0, B, 0, 5, 0, 0, shared.subarray(10, 25), 0, 5),
    RangeError,
  );
  // Batched: out of bounds on the last entry, and C entries that would overlap.
  assert.throws(
    () => n.gemmBatched(2, false, false, 3, 5, 4, 1, A, 0, 4, 12, 0, B, 0, 5, 0, 0, 0, new Float32Array(30), 0, 5, 15),
    RangeError,
  );
  assert.throws(
    () => n.gemmBatched(2, false, false, 3, 5, 4, 1, A, 0, 4, 0, 0, B, 0, 5, 0, 0, 0, new Float32Array(30), 0, 5, 10),
    RangeError,
  );
  assert.throws(() => n.setIsa('sse9' as NativeIsa), RangeError);
  assert.deepEqual([...C], new Array(15).fill(7));
});

test('setThreads/getThreads, fmaPeak and memBandwidth', { skip }, () => {
  const n = addon!;
  const t = n.getThreads();
  n.setThreads(1);
  assert.equal(n.getThreads(), 1);
  assert.throws(() => n.setThreads(0), RangeError);
  n.setThreads(t);
  const peak = n.fmaPeak(1, 20);
  assert.ok(peak > 0.5 && peak < 1e5, `fmaPeak ${peak}`);
  const bw = n.memBandwidth(8 << 20, 1);
  assert.ok(bw.read > 0.1 && bw.copy > 0.1, `memBandwidth ${JSON.stringify(bw)}`);
});
