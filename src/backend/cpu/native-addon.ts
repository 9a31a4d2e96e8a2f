// Loads the native CPU addon (native/build/Release/lowrank_native.node, built by `npm run build:native`)
// and types its functions. When it is missing or fails to load, lowrank runs on the TypeScript kernels and
// says why once; LOWRANK_BACKEND=js asks for that silently.

import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';

/** Operand dtype codes of the addon: 0 = f32 (Float32Array), 1 = bf16 and 2 = f16 (raw bits in a Uint16Array). */
export const NATIVE_DTYPE = { f32: 0, bf16: 1, f16: 2 } as const;
export type NativeDTypeCode = 0 | 1 | 2;
export type NativeIsa = 'avx512' | 'avx2' | 'generic';
/** An operand: Float32Array for f32, Uint16Array for bf16/f16 bit patterns. */
export type NativeArray = Float32Array | Uint16Array;

export interface NativeAddon {
  /**
   * Row-major C[M,N] = alpha * op(A)[M,K] * op(B)[K,N] + beta * C, accumulated in f32.
   * op(A) = A stored [M, K] (transA false) or A stored [K, M] read transposed (transA true); likewise B:
   * [K, N] or, transposed, [N, K] (the Linear weight layout, so x W^T is transB = true).
   * Offsets and leading dimensions are in elements. beta = 0 means C is not read.
   * Throws RangeError when a size, offset or leading dimension would touch an element outside an array, or
   * when C overlaps A or B; TypeError for an array of the wrong type for its dtype code.
   */
  gemm(
    transA: boolean,
    transB: boolean,
    M: number,
    N: number,
    K: number,
    alpha: number,
    A: NativeArray,
    aOff: number,
    lda: number,
    aDtype: NativeDTypeCode,
    B: NativeArray,
    bOff: number,
    ldb: number,
    bDtype: NativeDTypeCode,
    beta: number,
    C: Float32Array,
    cOff: number,
    ldc: number,
  ): void;
  /**
   * `batch` GEMMs as in gemm; matrix i of an operand starts at off + i * stride (stride 0 repeats one matrix
   * for A or B). The C matrices must not share elements: one after another, or interleaved within rows
   * (stride >= N and (batch - 1) * stride + N <= ldc, e.g. an attention output [T, heads, dim]).
   */
  gemmBatched(
    batch: number,
    transA: boolean,
    transB: boolean,
    M: number,
    N: number,
    K: number,
    alpha: number,
    A: NativeArray,
    aOff: number,
    lda: number,
    strideA: number,
    aDtype: NativeDTypeCode,
    B: NativeArray,
    bOff: number,
    ldb: number,
    strideB: number,
    bDtype: NativeDTypeCode,
    beta: number,
    C: Float32Array,
    cOff: number,
    ldc: number,
    strideC: number,
  ): void;
  /** Threads the kernels use (default: OMP_NUM_THREADS, else the number of cores). */
  setThreads(n: number): void;
  getThreads(): number;
  /** The kernel set in use. */
  isa(): NativeIsa;
  /** The widest kernel set this CPU supports. */
  bestIsa(): NativeIsa;
  /** Forces a kernel set no wider than bestIsa() ('auto' = bestIsa()); RangeError if the CPU lacks it. */
  setIsa(name: NativeIsa | 'auto'): void;
  /** FMA throughput of independent chains with the CPU's widest vectors, GFLOP/s over `ms` milliseconds. */
  fmaPeak(threads: number, ms: number): number;
  /** Streaming bandwidth over a `bytes` buffer, GB/s: read (sum) and copy (bytes read + written, as STREAM). */
  memBandwidth(bytes: number, threads: number): { read: number; copy: number };
  /** Tuning hook: cache blocks of the current ISA's GEMM (0 keeps a value); returns [kc, mb, nb] in use. */
  _blocking(kc: number, mb: number, nb: number): [number, number, number];
}

const ADDON_PATH = fileURLToPath(new URL('../../../native/build/Release/lowrank_native.node', import.meta.url));

let cached: NativeAddon | null | undefined;
let warned = false;

/**
 * The native addon, or null (with a one-time console.warn saying why) when it is not built or does not load.
 * LOWRANK_BACKEND=js returns null without a warning.
 */
export function loadNativeAddon(): NativeAddon | null {
  if (process.env.LOWRANK_BACKEND === 'js') return null;
  if (cached !== undefined) return cached;
  try {
    const require = createRequire(import.meta.url);
    cached = require(ADDON_PATH) as NativeAddon;
  } catch (e) {
    cached = null;
    if (!warned) {
      warned = true;
      const err = e as NodeJS.ErrnoException;
      const reason =
        err.code === 'MODULE_NOT_FOUND'
          ? `${ADDON_PATH} is not built (run \`npm run build:native\`)`
          : `${ADDON_PATH} failed to load: ${err.message}`;
      console.warn(`lowrank: native CPU kernels unavailable, using the TypeScript kernels: ${reason}`);
    }
  }
  return cached;
}
