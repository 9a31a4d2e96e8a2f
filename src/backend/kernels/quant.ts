// 4-bit weight kernels (QLoRA): products with a bitsandbytes NF4/FP4 weight that never materialise the
// full-precision matrix. A kernel unpacks a tile of rows (or, for a skinny input, one row at a time) into a
// small scratch and multiplies; a native or CUDA backend implements the same contract on the same tensors.
//
// Storage (bitsandbytes' layout, see src/quant/blockwise4.ts): the [rows, cols] weight is flattened row-major
// and cut into blocks of `blocksize` consecutive elements (a block may straddle two rows when cols is not a
// multiple of blocksize); element i is the nibble (i even: high, i odd: low) of packed[i >> 1], and its
// value is code[nibble] * absmax[i / blocksize] in f32, where code is the 16-value table (bitsandbytes'
// built-in NF4 or FP4 table, passed as a tensor so that kernels need no knowledge of the formats). With double quantization absmax[b] = nestedCode[absmax8[b]] * nestedAbsmax[b / nestedBlocksize]
// + offset (each product and sum rounded to f32).

import type { Tensor } from '../../core/tensor.ts';

/** A frozen 4-bit weight [rows, cols] as backend tensors (all contiguous, read in place). */
export interface Weight4bit {
  /** Output features: rows of the [rows, cols] weight. */
  readonly rows: number;
  /** Input features. */
  readonly cols: number;
  readonly quantType: 'nf4' | 'fp4';
  /** f32 [16]: the value of each 4-bit code (NF4_CODE or FP4_CODE). */
  readonly code: Tensor;
  /** Elements per absmax block (32..4096, a power of two). */
  readonly blocksize: number;
  /** u8, ceil(rows*cols/2) bytes (any shape; bitsandbytes uses [n/2, 1]). */
  readonly packed: Tensor;
  /** f32 [nblocks]; or u8 [nblocks] codes over nestedCode when double-quantized. */
  readonly absmax: Tensor;
  /** Double quantization: f32 [ceil(nblocks / nestedBlocksize)] block scales of the absmax codes. */
  readonly nestedAbsmax: Tensor | null;
  /** Double quantization: f32 [256], the code of the absmax values (the signed dynamic map). */
  readonly nestedCode: Tensor | null;
  readonly nestedBlocksize: number;
  /** Double quantization: the mean that was subtracted from absmax before it was quantized (f32). */
  readonly offset: number;
}

export interface QuantKernels {
  /**
   * y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]) for x contiguous f32 [m, cols] and y contiguous f32
   * [m, rows] (written). bias: [rows] f32, bf16 or f16, or null. W is unpacked tile by tile; skinny inputs
   * (m <= 16, decoding) take a GEMV path that unpacks one row at a time.
   */
  gemm4bit(x: Tensor, w: Weight4bit, bias: Tensor | null, y: Tensor, m: number): void;
  /**
   * The input gradient of gemm4bit: dx[m, k] = sum_n g[m, n] * W[n, k], g contiguous f32 [m, rows],
   * dx contiguous f32 [m, cols] (written, not accumulated). The weight is frozen: no weight gradient.
   */
  gemm4bitBackwardInput(g: Tensor, w: Weight4bit, dx: Tensor, m: number): void;
  /** Unpacks rows [row0, row0 + count) of W into out (contiguous f32, count*cols elements, written). */
  dequantize4bitRows(w: Weight4bit, row0: number, count: number, out: Tensor): void;
}
