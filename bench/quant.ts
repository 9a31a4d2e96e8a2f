// 4-bit weights: the decoding GEMV (m = 1) with an NF4 + double-quantized weight against the f32 GEMV of the
// same shape, on the active backend, in the same run; and quantize / dequantize throughput.
// GEMV is memory-bound: GB/s counts the weight bytes a kernel must read (4-bit: packed codes + scales;
// f32: 4 B per weight), and, where the native addon is built, the ratio to the machine's streaming read
// bandwidth measured in the same run. `npm run bench:quant`.

import { loadNativeAddon } from '../src/backend/cpu/native-addon.ts';
import { getBackend } from '../src/backend/index.ts';
import { Rng } from '../src/core/rng.ts';
import { Tensor } from '../src/core/tensor.ts';
import { empty } from '../src/ops/create.ts';
import { dequantize4bit, quantize4bit, quantStateBytes } from '../src/quant/blockwise4.ts';
import { Linear4bit } from '../src/quant/linear4bit.ts';
import { BestOf, fmt, machineLine, printTable, ratio, timeBest } from './common.ts';

const SHAPES: [number, number][] = [
  [576, 1536], // SmolLM-135M down_proj [out, in]
  [2048, 8192], // a 1-2B model's MLP projection
];
const ROUNDS = Number(process.env.ROUNDS ?? 2);

const backend = getBackend();
const addon = loadNativeAddon();
console.log(`# 4-bit (NF4 + double quant, blocksize 64) vs f32 GEMV, backend: ${backend.name}`);
console.log(machineLine(addon));
console.log(
  addon
    ? 'native addon: loaded (f32 GEMV peer below; it has no 4-bit kernels yet)'
    : 'native addon: not built (no native peer, no bandwidth reference)',
);

const rng = new Rng(1);
const best = new BestOf();
let readBw: number | undefined;

interface Case {
  n: number;
  k: number;
  layer: Linear4bit;
  w: Tensor;
  x: Tensor;
  y: Tensor;
  w4Bytes: number;
}

const cases: Case[] = SHAPES.map(([n, k]) => {
  const v = new Float32Array(n * k);
  for (let i = 0; i < v.length; i++) v[i] = rng.normal() * 0.02;
  const state = quantize4bit(v, { quantType: 'nf4', doubleQuant: true, shape: [n, k] });
  const w4Bytes = quantStateBytes(state) - 16 * 4 - 256 * 4; // per-tensor maps live in cache
  const x = new Float32Array(k);
  for (let i = 0; i < k; i++) x[i] = rng.normal();
  return {
    n,
    k,
    layer: new Linear4bit(state),
    w: Tensor.fromTyped(v, [n, k], 'f32'),
    x: Tensor.fromTyped(x, [1, k], 'f32'),
    y: empty([1, n]),
    w4Bytes,
  };
});

for (let round = 0; round < ROUNDS; round++) {
  if (addon) {
    const bw = addon.memBandwidth(256 << 20, addon.getThreads()).read;
    readBw = readBw === undefined ? bw : Math.max(readBw, bw);
  }
  for (const c of cases) {
    const key = `${c.n}x${c.k}`;
    const w4 = c.layer.weight4bit();
    const t4 = timeBest(() => backend.gemm4bit(c.x, w4, null, c.y, 1), { minRuns: 3, minTotalMs: 300 });
    best.add(`${key}/4bit`, -t4.bestMs);
    const t32 = timeBest(
      () =>
        backend.gemm({
          transA: false,
          transB: true,
          m: 1,
          n: c.n,
          k: c.k,
          alpha: 1,
          beta: 0,
          a: c.x,
          aOff: 0,
          lda: c.k,
          b: c.w,
          bOff: 0,
          ldb: c.k,
          c: c.y,
          cOff: 0,
          ldc: c.n,
        }),
      { minRuns: 3, minTotalMs: 300 },
    );
    best.add(`${key}/f32`, -t32.bestMs);
    if (addon) {
      const xd = c.x.data as Float32Array;
      const wd = c.w.data as Float32Array;
      const yd = c.y.data as Float32Array;
      const tn = timeBest(() => addon.gemm(false, true, 1, c.n, c.k, 1, xd, 0, c.k, 0, wd, 0, c.k, 0, 0, yd, 0, c.n), {
        minRuns: 5,
        minTotalMs: 200,
      });
      best.add(`${key}/native`, -tn.bestMs);
    }
  }
}

const rows: string[][] = [];
for (const c of cases) {
  const key = `${c.n}x${c.k}`;
  const ms4 = -best.get(`${key}/4bit`)!;
  const ms32 = -best.get(`${key}/f32`)!;
  const msN = best.get(`${key}/native`);
  const gb4 = c.w4Bytes / (ms4 * 1e6);
  const gb32 = (c.n * c.k * 4) / (ms32 * 1e6);
  rows.push([
    key,
    `4-bit (${backend.name})`,
    fmt(ms4, 3),
    fmt(c.w4Bytes / 1e6, 2),
    fmt(gb4, 2),
    ratio(gb4, readBw),
    `${fmt(ms32 / ms4, 2)}x`,
  ]);
  rows.push([
    key,
    `f32 (${backend.name})`,
    fmt(ms32, 3),
    fmt((c.n * c.k * 4) / 1e6, 2),
    fmt(gb32, 2),
    ratio(gb32, readBw),
    '1.00x',
  ]);
  if (msN !== undefined) {
    const gbN = (c.n * c.k * 4) / (-msN * 1e6);
    rows.push([
      key,
      'f32 (native addon)',
      fmt(-msN, 3),
      fmt((c.n * c.k * 4) / 1e6, 2),
      fmt(gbN, 2),
      ratio(gbN, readBw),
      `${fmt(ms32 / -msN, 2)}x`,
    ]);
  }
}
printTable(
  `GEMV y[1, N] = x[1, K] W[N, K]^T, best of ${ROUNDS} rounds${readBw ? `; streaming read bandwidth ${fmt(readBw, 1)} GB/s` : ''}`,
  ['N x K', 'kernel', 'ms', 'weight MB', 'GB/s', 'of read BW', 'speed vs f32 (same backend)'],
  rows,
);

// Quantize / dequantize throughput on the larger shape.
const [n, k] = SHAPES[1]!;
const big = cases[1]!.w.data as Float32Array;
const tq = timeBest(() => quantize4bit(big, { quantType: 'nf4', doubleQuant: true, shape: [n, k] }), {
  minRuns: 2,
  minTotalMs: 500,
});
const st = quantize4bit(big, { quantType: 'nf4', doubleQuant: true, shape: [n, k] });
const out = new Float32Array(n * k);
const td = timeBest(() => dequantize4bit(st, out), { minRuns: 2, minTotalMs: 500 });
const w4 = cases[1]!.layer.weight4bit();
const tile = empty([64 * k]);
const tr = timeBest(
  () => {
    for (let r0 = 0; r0 < n; r0 += 64) backend.dequantize4bitRows(w4, r0, 64, tile);
  },
  { minRuns: 2, minTotalMs: 500 },
);
const mp = (ms: number) => fmt((n * k) / (ms * 1e3), 1);
printTable(
  `quantize / dequantize, ${n} x ${k} (${((n * k) / 1e6).toFixed(1)}M weights), NF4 + double quant`,
  ['operation', 'ms', 'M weights/s', 'f32 GB/s'],
  [
    ['quantize4bit (f32 in)', fmt(tq.bestMs, 1), mp(tq.bestMs), fmt((n * k * 4) / (tq.bestMs * 1e6), 2)],
    ['dequantize4bit (f32 out)', fmt(td.bestMs, 1), mp(td.bestMs), fmt((n * k * 4) / (td.bestMs * 1e6), 2)],
    [
      `dequantize4bitRows, 64-row tiles (${backend.name})`,
      fmt(tr.bestMs, 1),
      mp(tr.bestMs),
      fmt((n * k * 4) / (tr.bestMs * 1e6), 2),
    ],
  ],
);
for (const c of cases) c.layer.dispose();
