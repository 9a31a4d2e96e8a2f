// Merging a weight delta (a LoRA adapter's scaling * B A) into a 4-bit base layer.
//
// The adapter was trained against dequant(W4), so the merge target is dequant(W4) + delta. By default the
// result is a dense 16-bit weight (bf16): exact up to the 16-bit rounding. Re-quantizing to 4 bits is
// opt-in, as in PEFT (tuners/lora/bnb.py): it rounds again, and a small delta can vanish entirely
// (peft #2586, transformers #31293), so it warns.

import { getBackend } from '../backend/index.ts';
import { type DType, f32ToBf16, f32ToF16 } from '../core/dtype.ts';
import { ConfigError, ShapeError } from '../core/errors.ts';
import type { Tensor } from '../core/tensor.ts';
import { Linear } from '../nn/layers.ts';
import { empty } from '../ops/create.ts';
import { isDoubleQuant, quantize4bit } from './blockwise4.ts';
import type { Linear4bit } from './linear4bit.ts';

export const REQUANTIZE_WARNING =
  'Merging into a 4-bit weight re-quantizes it: rounding errors may change generations, and a small delta ' +
  'can vanish. Merge into a 16-bit weight (the default) to keep the adapter exactly.';

/** Rows unpacked at a time while merging. */
const MERGE_TILE_ROWS = 64;

export interface MergeIntoQuantizedOptions {
  /** Re-quantize the merged weight in place (with a warning) instead of returning a dense weight. */
  requantize?: boolean;
  /** Dtype of the dense result: 'bf16' (default), 'f16' or 'f32'. */
  dtype?: DType;
  /** Silence the re-quantization warning. */
  quiet?: boolean;
}

function checkDelta(layer: Linear4bit, deltaW: Float32Array | null): void {
  const n = layer.outFeatures * layer.inFeatures;
  if (deltaW && deltaW.length !== n)
    throw new ShapeError(
      `mergeIntoQuantized: delta has ${deltaW.length} values, the weight [${layer.outFeatures}, ${layer.inFeatures}] has ${n}`,
    );
}

/**
 * dequant(W4) + deltaW (row-major [out, in], or nothing) as a dense tensor [out, in] of `dtype`, built tile
 * by tile: only MERGE_TILE_ROWS rows are ever held in f32.
 */
export function dequantizeMerged(layer: Linear4bit, deltaW: Float32Array | null, dtype: DType = 'bf16'): Tensor {
  if (dtype !== 'bf16' && dtype !== 'f16' && dtype !== 'f32')
    throw new ConfigError(`mergeIntoQuantized: dtype must be bf16, f16 or f32, got ${dtype}`);
  checkDelta(layer, deltaW);
  const rows = layer.outFeatures;
  const cols = layer.inFeatures;
  const w = layer.weight4bit();
  const out = empty([rows, cols], dtype);
  const od = out.data;
  const tile = empty([Math.min(MERGE_TILE_ROWS, Math.max(rows, 1)) * cols]);
  const td = tile.data as Float32Array;
  const enc = dtype === 'bf16' ? f32ToBf16 : dtype === 'f16' ? f32ToF16 : null;
  for (let r0 = 0; r0 < rows; r0 += MERGE_TILE_ROWS) {
    const count = Math.min(MERGE_TILE_ROWS, rows - r0);
    getBackend().dequantize4bitRows(w, r0, count, tile);
    const base = r0 * cols;
    const len = count * cols;
    for (let i = 0; i < len; i++) {
      const v = deltaW ? Math.fround(td[i]! + deltaW[base + i]!) : td[i]!;
      od[base + i] = enc ? enc(v) : v;
    }
  }
  tile.dispose();
  return out;
}

/**
 * Merges deltaW (row-major [out, in] f32, e.g. scaling * B A) into a 4-bit layer.
 * - default: returns the dense merged weight dequant(W4) + deltaW as a new tensor [out, in] (bf16 unless
 *   opts.dtype says otherwise); the layer is unchanged.
 * - requantize: true: rounds dequant(W4) + deltaW to the layer's original dtype (as PEFT does, in bf16 for a
 *   bf16 model), quantizes it again with the same quant type, blocksize and double quantization, replaces
 *   the layer's weight in place, warns about the rounding, and returns the layer.
 */
export function mergeIntoQuantized(
  layer: Linear4bit,
  deltaW: Float32Array,
  opts?: MergeIntoQuantizedOptions & { requantize?: false },
): Tensor;
export function mergeIntoQuantized(
  layer: Linear4bit,
  deltaW: Float32Array,
  opts: MergeIntoQuantizedOptions & { requantize: true },
): Linear4bit;
export function mergeIntoQuantized(
  layer: Linear4bit,
  deltaW: Float32Array,
  opts: MergeIntoQuantizedOptions = {},
): Tensor | Linear4bit {
  checkDelta(layer, deltaW);
  if (!opts.requantize) return dequantizeMerged(layer, deltaW, opts.dtype ?? 'bf16');
  if (!opts.quiet) console.warn(`lowrank: ${REQUANTIZE_WARNING}`);
  const old = layer.quantState();
  const dense = dequantizeMerged(
    layer,
    deltaW,
    old.dtype === 'bfloat16' ? 'bf16' : old.dtype === 'float16' ? 'f16' : 'f32',
  );
  const n = dense.size;
  const values = dense.data.subarray(0, n) as Float32Array | Uint16Array;
  const state = quantize4bit(values, {
    quantType: old.quantType,
    blocksize: old.blocksize,
    doubleQuant: isDoubleQuant(old.absmax),
    shape: old.shape,
    dtype: old.dtype,
  });
  dense.dispose();
  layer.setState(state);
  return layer;
}

/**
 * A dense Linear holding dequant(W4) (+ deltaW) in `dtype` (bf16 by default) and the layer's bias: what
 * merge_and_unload into a 16-bit model gives. The 4-bit layer is left as it is.
 */
export function denseLinearFrom4bit(
  layer: Linear4bit,
  opts: { dtype?: DType; deltaW?: Float32Array | null } = {},
): Linear {
  const weight = dequantizeMerged(layer, opts.deltaW ?? null, opts.dtype ?? 'bf16');
  const lin = new Linear(layer.inFeatures, layer.outFeatures, {
    bias: layer.bias !== null,
    dtype: weight.dtype,
    empty: true,
  });
  lin.setParam('weight', weight);
  const b = layer.bias;
  if (b) {
    const copy = empty(b.shape, b.dtype);
    getBackend().copy(b, copy);
    lin.setParam('bias', copy);
  }
  return lin;
}
