// Shared benchmark helpers: timing (best of several runs, because these machines are shared and noisy),
// table printing, and the physical limits measured in the same run (FMA peak, memory bandwidth) that every
// benchmark reports its ratio to.

import { spawnSync } from 'node:child_process';
import { cpus } from 'node:os';
import { fileURLToPath } from 'node:url';
import type { NativeAddon } from '../src/backend/cpu/native-addon.ts';

export interface Timing {
  /** Fastest run, milliseconds: the least disturbed by other processes. */
  bestMs: number;
  medianMs: number;
  runs: number;
}

/** Runs fn (after one warm-up) at least minRuns times and until minTotalMs has passed, at most maxRuns. */
export function timeBest(
  fn: () => void,
  opts: { minRuns?: number; maxRuns?: number; minTotalMs?: number } = {},
): Timing {
  const minRuns = opts.minRuns ?? 3;
  const maxRuns = opts.maxRuns ?? 50;
  const minTotalMs = opts.minTotalMs ?? 200;
  fn();
  const times: number[] = [];
  let total = 0;
  while (times.length < minRuns || (total < minTotalMs && times.length < maxRuns)) {
    const t0 = performance.now();
    fn();
    const dt = performance.now() - t0;
    times.push(dt);
    total += dt;
  }
  times.sort((a, b) => a - b);
  return { bestMs: times[0]!, medianMs: times[Math.floor(times.length / 2)]!, runs: times.length };
}

/** The q-quantile of xs (0.5: the median; of an even count, the upper middle value). */
export function quantile(xs: number[], q: number): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor(q * s.length))]!;
}

function cpuTimes(): { idle: number; total: number } {
  let idle = 0;
  let total = 0;
  for (const c of cpus()) {
    idle += c.times.idle;
    total += c.times.idle + c.times.user + c.times.nice + c.times.sys + c.times.irq;
  }
  return { idle, total };
}

function sleepMs(ms: number): void {
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);
}

/**
 * Waits until the machine's CPUs were at least `minIdlePercent` idle over a 300 ms window (other processes
 * quiet), for at most maxMs. Returns whether that happened. On a shared machine this puts the measurements
 * in the gaps between other jobs; ratios stay honest either way, as the limits are measured the same way.
 */
export function waitForIdle(minIdlePercent = 85, maxMs = 30_000): boolean {
  const start = performance.now();
  for (;;) {
    const a = cpuTimes();
    sleepMs(300);
    const b = cpuTimes();
    const idle = (100 * (b.idle - a.idle)) / Math.max(1, b.total - a.total);
    if (idle >= minIdlePercent) return true;
    if (performance.now() - start > maxMs) return false;
  }
}

/** Keeps, per key, the best (largest) value seen over several rounds. */
export class BestOf {
  private readonly values = new Map<string, number>();
  add(key: string, value: number): void {
    const old = this.values.get(key);
    if (old === undefined || value > old) this.values.set(key, value);
  }
  get(key: string): number | undefined {
    return this.values.get(key);
  }
}

export function fmt(x: number | undefined, digits = 1): string {
  if (x === undefined || !Number.isFinite(x)) return '-';
  return x.toFixed(digits);
}

export function ratio(x: number | undefined, ref: number | undefined): string {
  if (x === undefined || ref === undefined || !(ref > 0)) return '-';
  return `${((100 * x) / ref).toFixed(0)}%`;
}

/** Prints a Markdown table (readable in a terminal and pasteable into notes). */
export function printTable(title: string, headers: string[], rows: string[][]): void {
  const widths = headers.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  const line = (cells: string[]) => `| ${cells.map((c, i) => c.padEnd(widths[i]!)).join(' | ')} |`;
  console.log(`\n${title}\n`);
  console.log(line(headers));
  console.log(`| ${widths.map((w) => '-'.repeat(w)).join(' | ')} |`);
  for (const r of rows) console.log(line(r));
}

export function machineLine(addon: NativeAddon | null): string {
  const c = cpus();
  const isa = addon ? `, kernels ${addon.isa()} (best ${addon.bestIsa()}), ${addon.getThreads()} threads` : '';
  return `${c[0]?.model ?? 'unknown CPU'} x ${c.length} logical CPUs${isa}, Node ${process.version}`;
}

export interface Limits {
  /** FMA throughput, GFLOP/s, with 1 thread and with `threads` threads. */
  fma1: number;
  fmaT: number;
  /** Streaming read and copy bandwidth, GB/s, with 1 thread and with `threads` threads. */
  read1: number;
  readT: number;
  copyT: number;
}

/** Measures the machine's limits once; call it every round and keep the best (see BestOf). */
export function measureLimits(addon: NativeAddon, threads: number, bufferBytes = 512 << 20): Limits {
  // Several short bursts, keeping the best: a burst that shares a core with another process reads low.
  const burst = (t: number) => Math.max(...Array.from({ length: 8 }, () => addon.fmaPeak(t, 40)));
  const fma1 = burst(1);
  const fmaT = threads > 1 ? burst(threads) : fma1;
  const bw1 = addon.memBandwidth(bufferBytes, 1);
  const bwT = threads > 1 ? addon.memBandwidth(bufferBytes, threads) : bw1;
  return { fma1, fmaT, read1: bw1.read, readT: bwT.read, copyT: bwT.copy };
}

type PeerResult = { value: unknown; error: null } | { value: null; error: string };

function runPython(python: string, args: string[], env: Record<string, string>, timeoutMs: number): PeerResult {
  const r = spawnSync(python, args, {
    env: { ...process.env, ...env },
    encoding: 'utf8',
    timeout: timeoutMs,
    killSignal: 'SIGKILL',
    maxBuffer: 16 << 20,
  });
  if (r.error) return { value: null, error: r.error.message };
  if (r.signal) return { value: null, error: `killed by ${r.signal} (did not finish within ${timeoutMs / 1000} s)` };
  if (r.status !== 0) return { value: null, error: (r.stderr || `exit ${r.status}`).trim().split('\n').pop()! };
  const last = r.stdout.trim().split('\n').pop() ?? '';
  try {
    return { value: JSON.parse(last), error: null };
  } catch {
    return { value: null, error: `unexpected output: ${last.slice(0, 200)}` };
  }
}

/**
 * Runs a Python snippet that prints one JSON value on its last line (a peer such as numpy/OpenBLAS measured
 * in the same run). Returns null, with the reason, when python3 or the module is missing.
 */
export function runPythonPeer(code: string, env: Record<string, string>, timeoutMs = 600_000): PeerResult {
  return runPython('python3', ['-c', code], env, timeoutMs);
}

let torchPythonFound: { python: string; error: null } | { python: null; error: string } | undefined;

/**
 * A python3 that imports torch: $LOWRANK_PYTHON, else python3 on the PATH, else /usr/bin/python3 (where
 * Debian's python3-torch installs; a pyenv python3 may come first on the PATH without it).
 */
export function torchPython(): { python: string; error: null } | { python: null; error: string } {
  if (torchPythonFound) return torchPythonFound;
  const candidates = process.env.LOWRANK_PYTHON ? [process.env.LOWRANK_PYTHON] : ['python3', '/usr/bin/python3'];
  for (const python of candidates) {
    const r = spawnSync(python, ['-c', 'import torch'], { encoding: 'utf8', timeout: 60_000 });
    if (!r.error && r.status === 0) return (torchPythonFound = { python, error: null });
  }
  torchPythonFound = {
    python: null,
    error: `no python3 with torch (tried ${candidates.join(', ')}; on Debian: apt-get install python3-torch libopenblas0-openmp, or set LOWRANK_PYTHON)`,
  };
  return torchPythonFound;
}

/**
 * Runs bench/reference/torch_llama.py (eager PyTorch on the same workload, the same number of threads) in its
 * own process and returns its JSON figures, or why it could not run.
 */
export function runTorchReference(spec: Record<string, unknown>, threads: number, timeoutMs = 1_800_000): PeerResult {
  const found = torchPython();
  if (found.python === null) return { value: null, error: found.error };
  const script = fileURLToPath(new URL('./reference/torch_llama.py', import.meta.url));
  const n = String(threads);
  return runPython(
    found.python,
    [script, JSON.stringify({ ...spec, threads })],
    { OMP_NUM_THREADS: n, OPENBLAS_NUM_THREADS: n, MKL_NUM_THREADS: n },
    timeoutMs,
  );
}
