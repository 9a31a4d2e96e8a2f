// The Backend interface: every kernel lowrank runs. Kernels take tensors (their storage is the backend's own
// memory) and write into preallocated outputs; they never allocate tensors themselves. The TypeScript
// reference backend (cpu/js*.ts) is the oracle; the native backend overrides kernels one by one and falls
// back to the reference for the rest; a CUDA backend implements the same interface.

import type { DType } from '../core/dtype.ts';
import type { Device, Storage } from '../core/storage.ts';
import type { Tensor } from '../core/tensor.ts';
import type { ActivationKernels } from './kernels/activation.ts';
import type { AttentionKernels } from './kernels/attention.ts';
import type { DropoutKernels } from './kernels/dropout.ts';
import type { EmbeddingKernels } from './kernels/embedding.ts';
import type { LoraKernels } from './kernels/lora.ts';
import type { LossKernels } from './kernels/loss.ts';
import type { NormKernels } from './kernels/norm.ts';
import type { OptimKernels } from './kernels/optim.ts';
import type { QuantKernels } from './kernels/quant.ts';
import type { RopeKernels } from './kernels/rope.ts';

/** Row-major C[m,n] = alpha * op(A)[m,k] * op(B)[k,n] + beta * C, repeated `batch` times with the given strides. */
export interface GemmArgs {
  transA: boolean;
  transB: boolean;
  m: number;
  n: number;
  k: number;
  alpha: number;
  beta: number;
  /** A (f32, bf16 or f16), element offset, leading dimension. */
  a: Tensor;
  aOff: number;
  lda: number;
  b: Tensor;
  bOff: number;
  ldb: number;
  /** C is f32. */
  c: Tensor;
  cOff: number;
  ldc: number;
  batch?: number;
  strideA?: number;
  strideB?: number;
  strideC?: number;
}

export type BinaryOp = 'add' | 'sub' | 'mul' | 'div' | 'max' | 'min' | 'eq';
export type UnaryOp =
  | 'neg'
  | 'exp'
  | 'log'
  | 'sqrt'
  | 'rsqrt'
  | 'abs'
  | 'square'
  | 'recip'
  | 'sigmoid'
  | 'tanh'
  | 'relu'
  | 'silu'
  | 'gelu'
  | 'pow' // x ** scalar
  | 'scale' // x * scalar
  | 'addScalar' // x + scalar
  | 'sign'
  // derivatives of activations, evaluated at the input
  | 'sigmoidGrad'
  | 'tanhGrad'
  | 'reluGrad'
  | 'siluGrad';
export type ReduceOp = 'sum' | 'max' | 'min';

/** A recorded sequence of kernel calls (CoreKernels.recordPlan). */
export interface RecordedPlan {
  /** Runs the calls for L (see recordPlan); keyMask: i32 [B, Tk] for a dynamic attention, or null. */
  run(L: number, keyMask: Tensor | null): void;
  dispose(): void;
}

export interface CoreKernels {
  readonly name: string;
  readonly device: Device;
  /**
   * A zero-filled storage of n elements; with uninit, its contents are unspecified (for an output the caller
   * writes whole before reading it: a recycled buffer then skips its zeroing).
   */
  alloc(dtype: DType, n: number, uninit?: boolean): Storage;
  /**
   * Optional: zeroed host memory for weights streamed whole on every decoding step, in huge pages where the
   * system allows, which the backend reads ahead of the products that use it.
   */
  allocStreamed?(bytes: number): ArrayBuffer;
  /**
   * Optional: the first index of the largest element of x (NaN never largest), 0 when none exceeds -inf, as
   * src/models/sampling.ts argmax (a greedy pick over a vocabulary of logits).
   */
  argmax?(x: Float32Array): number;
  /**
   * Optional: records the kernel calls `body` makes (which do not run) as a plan that one call replays, for
   * a fixed sequence of calls made over and over (a decoding step: src/models/decode-plan.ts). Returns null
   * when one of the calls has no recordable kernel. After `dynamic(step)` the next call depends on run's L:
   * a copy writes L * step elements further on, an attention sees L more keys and run's key mask.
   */
  recordPlan?(body: (dynamic: (step: number) => void) => void): RecordedPlan | null;
  gemm(args: GemmArgs): void;
  /** dst = src, both any strides (same shape), converting dtype. */
  copy(src: Tensor, dst: Tensor): void;
  fill(dst: Tensor, value: number): void;
  /** out (contiguous f32, shape S) = a op b, where a and b are strided views of shape S (stride 0 = broadcast). */
  binary(op: BinaryOp, a: Tensor, b: Tensor, out: Tensor): void;
  /** out (contiguous f32) = op(x) elementwise, x contiguous f32. */
  unary(op: UnaryOp, x: Tensor, out: Tensor, scalar?: number): void;
  /** Reduces the middle axis of x viewed as [outer, n, inner] into out [outer, inner]. x contiguous f32. */
  reduce(op: ReduceOp, x: Tensor, out: Tensor, outer: number, n: number, inner: number): void;
  /** out[i, :] = x[idx[i], :] for x viewed as [rows, cols]; idx i32. Checks bounds. */
  gatherRows(x: Tensor, idx: Tensor, out: Tensor, cols: number): void;
  /** out[idx[i], :] += g[i, :] (scatter-add, the backward of gatherRows). */
  scatterAddRows(g: Tensor, idx: Tensor, out: Tensor, cols: number): void;
}

/**
 * All kernels. Each fused family declares its kernels in src/backend/kernels/<family>.ts (an interface with
 * the TypeScript reference implementation beside it in src/backend/cpu/) and is listed here.
 */
export interface Backend
  extends CoreKernels,
    RopeKernels,
    AttentionKernels,
    NormKernels,
    ActivationKernels,
    LossKernels,
    EmbeddingKernels,
    DropoutKernels,
    OptimKernels,
    LoraKernels,
    QuantKernels {}
