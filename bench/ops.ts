// Benchmark of the native op kernels (native/ops_*.cc): fused attention, RMSNorm and cross-entropy forward +
// backward against the machine's limits measured in the same run (FMA peak for attention, memory bandwidth for
// the memory-bound kernels), the 4-bit GEMV against the f32 and bf16 ones, and a table of native vs
// TypeScript-reference speedups per kernel.
//
//   npm run bench:ops [-- --rounds 2 --threads 2 --quick --wait-idle 5]
//
// Attention FLOPs count the visible (causal) score pairs only: forward 4 D per pair (QK^T and PV), backward
// 10 D (five products: S recomputed, dP, dV, dK, dQ), so forward + backward is 14 D. Bytes for the
// memory-bound kernels are the compulsory traffic (each input read once, each output written once).

import type { Backend } from '../src/backend/backend.ts';
import { jsBackend } from '../src/backend/cpu/js.ts';
import { makeNativeBackend, nativeOps } from '../src/backend/cpu/native.ts';
import type { AttentionArgs } from '../src/backend/kernels/attention.ts';
import type { Weight4bit } from '../src/backend/kernels/quant.ts';
import { f32ToBf16 } from '../src/core/dtype.ts';
import { Rng } from '../src/core/rng.ts';
import { Tensor } from '../src/core/tensor.ts';
import { isDoubleQuant, quantize4bit } from '../src/quant/blockwise4.ts';
import { code4bit } from '../src/quant/codebooks.ts';
import {
  BestOf,
  fmt,
  type Limits,
  machineLine,
  measureLimits,
  printTable,
  ratio,
  timeBest,
  waitForIdle,
} from './common.ts';

function args() {
  const a = process.argv.slice(2);
  const val = (name: string) => {
    const i = a.indexOf(name);
    return i >= 0 ? Number(a[i + 1]) : undefined;
  };
  return {
    rounds: val('--rounds') ?? 2,
    threads: val('--threads'),
    quick: a.includes('--quick'),
    waitMs: 1000 * (val('--wait-idle') ?? 5),
  };
}

const rng = new Rng(1);
function randn(n: number, scale = 1): Float32Array {
  const v = new Float32Array(n);
  for (let i = 0; i < n; i++) v[i] = rng.normal() * scale;
  return v;
}
const t32 = (d: Float32Array, shape: number[]) => Tensor.fromTyped(d, shape, 'f32');
const zeros = (shape: number[]) => t32(new Float32Array(shape.reduce((x, y) => x * y, 1)), shape);
function bf16(d: Float32Array, shape: number[]): Tensor {
  const u = new Uint16Array(d.length);
  for (let i = 0; i < d.length; i++) u[i] = f32ToBf16(d[i]!);
  return Tensor.fromTyped(u, shape, 'bf16');
}

// ---- workloads ----------------------------------------------------------------------------------------------

interface Work {
  /** Runs the kernel(s) once on a backend. */
  run: (be: Backend) => void;
  flops?: number;
  bytes?: number;
}

function attention(B: number, Tq: number, Tk: number, Hq: number, Hkv: number, D: number, backward: boolean): Work {
  const a: AttentionArgs = {
    q: t32(randn(B * Tq * Hq * D), [B, Tq, Hq, D]),
    k: t32(randn(B * Tk * Hkv * D), [B, Tk, Hkv, D]),
    v: t32(randn(B * Tk * Hkv * D), [B, Tk, Hkv, D]),
    scale: 1 / Math.sqrt(D),
    keyMask: null,
    seqIds: null,
    window: 0,
  };
  const out = zeros([B, Tq, Hq, D]);
  const lse = zeros([B, Hq, Tq]);
  const g = t32(randn(out.size), [B, Tq, Hq, D]);
  const dq = zeros([B, Tq, Hq, D]);
  const dk = zeros([B, Tk, Hkv, D]);
  const dv = zeros([B, Tk, Hkv, D]);
  let pairs = 0;
  for (let i = 0; i < Tq; i++) pairs += Tk - Tq + i + 1;
  pairs *= B * Hq;
  jsBackend.attentionForward(a, out, lse);
  return {
    run: (be) => {
      be.attentionForward(a, out, lse);
      if (backward) be.attentionBackward(a, out, lse, g, dq, dk, dv);
    },
    flops: pairs * D * (backward ? 14 : 4),
    bytes: 4 * (a.q.size + 2 * a.k.size + out.size),
  };
}

function rmsnorm(rows: number, dim: number, backward: boolean): Work {
  const x = t32(randn(rows * dim), [rows, dim]);
  const w = t32(randn(dim), [dim]);
  const y = zeros([rows, dim]);
  const rstd = zeros([rows]);
  const g = t32(randn(rows * dim), [rows, dim]);
  const dx = zeros([rows, dim]);
  const dw = zeros([dim]);
  return {
    run: (be) => {
      be.rmsNormForward(x, w, y, rstd, rows, dim, 1e-5);
      if (backward) be.rmsNormBackward(g, x, w, rstd, dx, dw, rows, dim);
    },
    // forward: read x, write y; backward: read g and x, write dx
    bytes: 4 * rows * dim * (backward ? 5 : 2),
  };
}

function crossEntropy(rows: number, vocab: number, backward: boolean): Work {
  const logits = t32(randn(rows * vocab, 2), [rows, vocab]);
  const targets = Tensor.fromTyped(
    Int32Array.from({ length: rows }, (_, i) => (i * 7919) % vocab),
    [rows],
    'i32',
  );
  const lse = zeros([rows]);
  const loss = zeros([1]);
  const go = t32(Float32Array.of(1), [1]);
  const dl = zeros([rows, vocab]);
  return {
    run: (be) => {
      be.crossEntropyForward(logits, targets, lse, loss, rows, vocab, -100, 'mean');
      if (backward) be.crossEntropyBackward(go, logits, targets, lse, dl, rows, vocab, -100, 'mean');
    },
    // forward: read the logits; backward: read them again and write the gradient
    bytes: 4 * rows * vocab * (backward ? 3 : 1),
  };
}

function weight4(rows: number, cols: number): Weight4bit {
  const s = quantize4bit(randn(rows * cols, 0.05), {
    quantType: 'nf4',
    blocksize: 64,
    doubleQuant: true,
    shape: [rows, cols],
  });
  const a = s.absmax;
  if (!isDoubleQuant(a)) throw new Error('expected double quantization');
  return {
    rows,
    cols,
    quantType: 'nf4',
    blocksize: 64,
    code: t32(Float32Array.from(code4bit('nf4')), [16]),
    packed: Tensor.fromTyped(s.packed, [s.packed.length], 'u8'),
    absmax: Tensor.fromTyped(a.quantizedAbsmax, [a.quantizedAbsmax.length], 'u8'),
    nestedAbsmax: t32(a.nestedAbsmax, [a.nestedAbsmax.length]),
    nestedCode: t32(a.nestedQuantMap, [256]),
    nestedBlocksize: a.nestedBlocksize,
    offset: a.offset,
  };
}

function gemv(N: number, K: number, kind: 'f32' | 'bf16' | 'nf4', m = 1): Work {
  const x = t32(randn(m * K), [m, K]);
  const y = zeros([m, N]);
  if (kind === 'nf4') {
    const w = weight4(N, K);
    const bytes = w.packed.size + w.absmax.size + 4 * w.nestedAbsmax!.size;
    return { run: (be) => be.gemm4bit(x, w, null, y, m), bytes, flops: 2 * m * N * K };
  }
  const w = kind === 'f32' ? t32(randn(N * K, 0.05), [N, K]) : bf16(randn(N * K, 0.05), [N, K]);
  return {
    run: (be) =>
      be.gemm({
        transA: false,
        transB: true,
        m,
        n: N,
        k: K,
        alpha: 1,
        beta: 0,
        a: x,
        aOff: 0,
        lda: K,
        b: w,
        bOff: 0,
        ldb: K,
        c: y,
        cOff: 0,
        ldc: N,
      }),
    bytes: N * K * (kind === 'f32' ? 4 : 2),
    flops: 2 * m * N * K,
  };
}

function elementwise(kind: string, n: number): Work {
  const a = t32(randn(n), [n]);
  const b = t32(randn(n), [n]);
  const o = zeros([n]);
  const o2 = zeros([n]);
  switch (kind) {
    case 'swiglu':
      return { run: (be) => be.swigluForward(a, b, o), bytes: 12 * n };
    case 'swiglu bwd':
      return { run: (be) => be.swigluBackward(a, a, b, o, o2), bytes: 20 * n };
    case 'add (row broadcast)': {
      const row = t32(randn(576), [576]);
      const rows = n / 576;
      const bv = row.view([rows, 576], [0, 1], 0);
      const av = a.view([rows, 576], [576, 1], 0);
      return { run: (be) => be.binary('add', av, bv, o), bytes: 8 * n };
    }
    case 'silu':
      return { run: (be) => be.unary('silu', a, o), bytes: 8 * n };
    case 'softmax': {
      const cols = 1024;
      return { run: (be) => be.softmaxForward(a, o, n / cols, cols), bytes: 8 * n };
    }
    case 'copy f32->bf16': {
      const d = Tensor.fromTyped(new Uint16Array(n), [n], 'bf16');
      return { run: (be) => be.copy(a, d), bytes: 6 * n };
    }
    case 'adamw': {
      const m = zeros([n]);
      const v = zeros([n]);
      const args = { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0.01, step: 3, gradScale: 1 };
      return { run: (be) => be.adamwStep(a, b, m, v, args), bytes: 28 * n };
    }
    case 'rope': {
      const T = n / (9 * 64);
      const x = a.view([1, T, 9, 64], [n, 576, 64, 1], 0);
      const pos = Tensor.fromTyped(
        Int32Array.from({ length: T }, (_, i) => i),
        [1, T],
        'i32',
      );
      const inv = t32(
        Float32Array.from({ length: 32 }, (_, j) => 10000 ** (-j / 32)),
        [32],
      );
      const ov = o.view([1, T, 9, 64], [n, 576, 64, 1], 0);
      return { run: (be) => be.ropeForward(x, pos, inv, ov), bytes: 8 * n };
    }
    default: {
      // embedding gather of n / 576 rows from a 49152 x 576 table
      const rows = n / 576;
      const table = t32(randn(49152 * 576), [49152, 576]);
      const ids = Tensor.fromTyped(
        Int32Array.from({ length: rows }, (_, i) => (i * 7919) % 49152),
        [rows],
        'i32',
      );
      return { run: (be) => be.embeddingForward(table, ids, o, 49152, 576), bytes: 8 * n };
    }
  }
}

// ---- main ---------------------------------------------------------------------------------------------------

const opts = args();
const addon = nativeOps();
if (!addon) {
  console.log('bench:ops needs the native addon with its op kernels: npm run build:native');
  process.exit(0);
}
if (opts.threads) addon.setThreads(opts.threads);
const threads = addon.getThreads();
const nb = makeNativeBackend(addon);
console.log(`# bench:ops — ${machineLine(addon)}, op kernels ${addon.opsIsa()}`);

const time = (w: Work, be: Backend, maxRuns = 20) =>
  timeBest(() => w.run(be), { minRuns: 2, maxRuns, minTotalMs: 300 }).bestMs;

const limits = new BestOf();
function limitsRound(): Limits {
  const l = measureLimits(addon!, threads, 256 << 20);
  limits.add('fma', l.fmaT);
  limits.add('read', l.readT);
  limits.add('copy', l.copyT);
  return l;
}

// 1. Fused kernels against the machine's limits
interface Row {
  name: string;
  work: Work;
  bound: 'fma' | 'read' | 'copy';
}
const q = opts.quick;
const rows: Row[] = [
  { name: 'attention fwd, B4 T256 H9/3 D64 (135m)', work: attention(4, 256, 256, 9, 3, 64, false), bound: 'fma' },
  { name: 'attention fwd+bwd, B4 T256 H9/3 D64', work: attention(4, 256, 256, 9, 3, 64, true), bound: 'fma' },
  {
    name: 'attention fwd, B1 T1024 H32/8 D64',
    work: attention(1, q ? 512 : 1024, q ? 512 : 1024, 32, 8, 64, false),
    bound: 'fma',
  },
  { name: 'attention decode, Tq 1 Tk 2048 H9/3 D64', work: attention(4, 1, 2048, 9, 3, 64, false), bound: 'read' },
  { name: 'rmsnorm fwd, 4096 x 576', work: rmsnorm(4096, 576, false), bound: 'copy' },
  { name: 'rmsnorm fwd+bwd, 4096 x 576', work: rmsnorm(4096, 576, true), bound: 'copy' },
  { name: 'rmsnorm fwd+bwd, 2048 x 2048', work: rmsnorm(2048, 2048, true), bound: 'copy' },
  { name: 'cross-entropy fwd, 512 x 49152', work: crossEntropy(q ? 128 : 512, 49152, false), bound: 'read' },
  { name: 'cross-entropy fwd+bwd, 512 x 49152', work: crossEntropy(q ? 128 : 512, 49152, true), bound: 'copy' },
  { name: 'cross-entropy fwd+bwd, 256 x 128256', work: crossEntropy(q ? 32 : 256, 128256, true), bound: 'copy' },
];
const best = new BestOf();
for (let r = 0; r < opts.rounds; r++) {
  if (opts.waitMs > 0) waitForIdle(85, opts.waitMs);
  limitsRound();
  for (const row of rows) best.add(row.name, -time(row.work, nb));
}
const fma = limits.get('fma')!;
const read = limits.get('read')!;
const copy = limits.get('copy')!;
console.log(
  `\nlimits (best of ${opts.rounds}, ${threads} threads): FMA ${fmt(fma)} GFLOP/s, read ${fmt(read)} GB/s, copy ${fmt(copy)} GB/s`,
);
printTable(
  'Fused kernels vs the machine (native)',
  ['kernel', 'ms', 'GFLOP/s', 'GB/s', 'of limit'],
  rows.map(({ name, work, bound }) => {
    const ms = -best.get(name)!;
    const gflops = work.flops ? work.flops / ms / 1e6 : undefined;
    const gbs = work.bytes ? work.bytes / ms / 1e6 : undefined;
    const lim = bound === 'fma' ? fma : bound === 'read' ? read : copy;
    const v = bound === 'fma' ? gflops : gbs;
    return [name, fmt(ms, 2), fmt(gflops), fmt(gbs), `${ratio(v, lim)} of ${bound}`];
  }),
);

// 2. 4-bit GEMV vs f32 and bf16 GEMV (decoding: the weight streams from memory once per token)
const gemvRows: [string, Work][] = [];
for (const [N, K] of q
  ? [[2048, 2048]]
  : [
      [1536, 576],
      [4096, 4096],
      [8192, 2048],
    ])
  for (const kind of ['f32', 'bf16', 'nf4'] as const) gemvRows.push([`${kind} ${N}x${K} m=1`, gemv(N, K, kind)]);
gemvRows.push([`nf4 2048x2048 m=16`, gemv(2048, 2048, 'nf4', 16)]);
gemvRows.push([`nf4 2048x2048 m=256`, gemv(2048, 2048, 'nf4', 256)]);
gemvRows.push([`f32 2048x2048 m=256`, gemv(2048, 2048, 'f32', 256)]);
const gb = new BestOf();
for (let r = 0; r < opts.rounds; r++) {
  if (opts.waitMs > 0) waitForIdle(85, opts.waitMs);
  for (const [name, w] of gemvRows) gb.add(name, -time(w, nb, 50));
}
printTable(
  'Weight products: 4-bit (NF4, double quant) vs f32 / bf16 weights',
  ['product', 'ms', 'weight GB/s', 'of read', 'GFLOP/s', 'vs f32'],
  gemvRows.map(([name, w]) => {
    const ms = -gb.get(name)!;
    const f32Name = name.replace(/^(nf4|bf16)/, 'f32');
    const f32ms = gb.get(f32Name) ? -gb.get(f32Name)! : undefined;
    const gbs = w.bytes! / ms / 1e6;
    return [
      name,
      fmt(ms, 3),
      fmt(gbs),
      ratio(gbs, read),
      fmt(w.flops! / ms / 1e6),
      f32ms ? `${fmt(f32ms / ms, 2)}x` : '-',
    ];
  }),
);

// 3. Native vs the TypeScript reference, per kernel (smaller shapes: the reference is slow)
const cmp: [string, Work][] = [
  ['gemm 256x576x576 (NT)', gemv(576, 576, 'f32', 256)],
  ['gemm4bit m=1 1536x576', gemv(1536, 576, 'nf4', 1)],
  ['gemm4bit m=64 1536x576', gemv(1536, 576, 'nf4', 64)],
  ['attention fwd B1 T128 H9/3 D64', attention(1, 128, 128, 9, 3, 64, false)],
  ['attention fwd+bwd B1 T128 H9/3 D64', attention(1, 128, 128, 9, 3, 64, true)],
  ['rmsnorm fwd+bwd 512x576', rmsnorm(512, 576, true)],
  ['cross-entropy fwd+bwd 32x49152', crossEntropy(32, 49152, true)],
  ['softmax 256x1024', elementwise('softmax', 256 * 1024)],
  ['swiglu fwd 512x1536', elementwise('swiglu', 512 * 1536)],
  ['swiglu bwd 512x1536', elementwise('swiglu bwd', 512 * 1536)],
  ['silu 512x1536', elementwise('silu', 512 * 1536)],
  ['add row-broadcast 512x576', elementwise('add (row broadcast)', 512 * 576)],
  ['rope fwd T512 H9 D64', elementwise('rope', 512 * 576)],
  ['embedding 512 rows x 576', elementwise('embedding', 512 * 576)],
  ['copy f32->bf16 1M', elementwise('copy f32->bf16', 1 << 20)],
  ['adamw 1M', elementwise('adamw', 1 << 20)],
];
const sp = new BestOf();
if (opts.waitMs > 0) waitForIdle(85, opts.waitMs);
for (const [name, w] of cmp) {
  sp.add(`n ${name}`, -time(w, nb, 20));
  sp.add(`j ${name}`, -time(w, jsBackend, q ? 2 : 4));
}
printTable(
  'Native vs TypeScript reference',
  ['kernel', 'native ms', 'js ms', 'speedup'],
  cmp.map(([name]) => {
    const a = -sp.get(`n ${name}`)!;
    const b = -sp.get(`j ${name}`)!;
    return [name, fmt(a, 3), fmt(b, 2), `${fmt(b / a, 0)}x`];
  }),
);
