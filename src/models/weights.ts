// Moving tensors between lowrank's Tensor and the file formats' raw tensors, without a second full copy.

import { type DType, encodeScalar, itemSize } from '../core/dtype.ts';
import { FormatError, fmtShape } from '../core/errors.ts';
import { numel, type Tensor } from '../core/tensor.ts';
import type { RawTensor, SafetensorsDType } from '../formats/safetensors.ts';
import { toFloat32 } from '../formats/safetensors.ts';

export const SAFETENSORS_OF: Record<DType, SafetensorsDType> = {
  f32: 'F32',
  bf16: 'BF16',
  f16: 'F16',
  i32: 'I32',
  u8: 'U8',
};
export const DTYPE_OF: Partial<Record<SafetensorsDType, DType>> = {
  F32: 'f32',
  BF16: 'bf16',
  F16: 'f16',
  I32: 'i32',
  U8: 'u8',
};

/** Copies a raw tensor into t's storage, converting dtype when they differ. `where` names file and tensor. */
export function fillFromRaw(t: Tensor, raw: RawTensor, where: string): void {
  if (numel(raw.shape) !== t.size || raw.shape.length !== t.shape.length || raw.shape.some((d, i) => d !== t.shape[i]))
    throw new FormatError(`${where}: shape ${fmtShape(raw.shape)} does not match the model's ${fmtShape(t.shape)}`);
  fillFromBytesOrF32(t, raw, where);
}

function fillFromBytesOrF32(t: Tensor, raw: RawTensor, where: string): void {
  const dst = t.data;
  if (DTYPE_OF[raw.dtype] === t.dtype) {
    const bytes = new Uint8Array(dst.buffer, dst.byteOffset + t.offset * itemSize(t.dtype), t.size * itemSize(t.dtype));
    bytes.set(raw.data);
    return;
  }
  let vals: Float32Array;
  try {
    vals = toFloat32(raw);
  } catch (e) {
    throw new FormatError(`${where}: cannot convert ${raw.dtype} to ${t.dtype}: ${(e as Error).message}`);
  }
  fillFromF32(t, vals);
}

/** Writes f32 values into t (encoding to its dtype). */
export function fillFromF32(t: Tensor, vals: Float32Array): void {
  const dst = t.data;
  if (t.dtype === 'f32') (dst as Float32Array).set(vals, t.offset);
  else for (let i = 0; i < vals.length; i++) dst[t.offset + i] = encodeScalar(t.dtype, vals[i]!);
}

/** The raw bytes of a contiguous CPU tensor (a view, no copy), for writers. */
export function tensorBytes(t: Tensor): Uint8Array {
  const d = t.data;
  const sz = itemSize(t.dtype);
  if (!t.isContiguous()) {
    const c = t.toTyped();
    return new Uint8Array(c.buffer, c.byteOffset, c.byteLength);
  }
  return new Uint8Array(d.buffer, d.byteOffset + t.offset * sz, t.size * sz);
}

export function toRaw(t: Tensor): RawTensor {
  return { dtype: SAFETENSORS_OF[t.dtype], shape: [...t.shape], data: tensorBytes(t) };
}
