// Dtypes and conversions. bf16 and f16 are stored as raw 16-bit patterns in Uint16Array;
// kernels convert them while they read (never as a full f32 copy of a weight).

export type DType = 'f32' | 'bf16' | 'f16' | 'i32' | 'u8';
export const DTYPES: readonly DType[] = ['f32', 'bf16', 'f16', 'i32', 'u8'];

export type TypedArrayFor<D extends DType> = D extends 'f32'
  ? Float32Array
  : D extends 'bf16' | 'f16'
    ? Uint16Array
    : D extends 'i32'
      ? Int32Array
      : Uint8Array;
export type AnyTypedArray = Float32Array | Uint16Array | Int32Array | Uint8Array;

export function itemSize(dtype: DType): number {
  switch (dtype) {
    case 'f32':
    case 'i32':
      return 4;
    case 'bf16':
    case 'f16':
      return 2;
    case 'u8':
      return 1;
  }
}

export function isFloat(dtype: DType): boolean {
  return dtype === 'f32' || dtype === 'bf16' || dtype === 'f16';
}

/** A zeroed typed array of n elements of dtype. */
export function allocTyped(dtype: DType, n: number): AnyTypedArray {
  return typedOver(dtype, new ArrayBuffer(n * itemSize(dtype)));
}

/** A typed array of dtype over a whole buffer. */
export function typedOver(dtype: DType, buf: ArrayBuffer): AnyTypedArray {
  switch (dtype) {
    case 'f32':
      return new Float32Array(buf);
    case 'bf16':
    case 'f16':
      return new Uint16Array(buf);
    case 'i32':
      return new Int32Array(buf);
    case 'u8':
      return new Uint8Array(buf);
  }
}

const f32buf = new Float32Array(1);
const u32buf = new Uint32Array(f32buf.buffer);

/** bf16 bits -> f32 value. */
export function bf16ToF32(bits: number): number {
  u32buf[0] = bits << 16;
  return f32buf[0]!;
}

/** f32 value -> bf16 bits, round to nearest even (as PyTorch); NaN stays a quiet NaN. */
export function f32ToBf16(x: number): number {
  f32buf[0] = x;
  const u = u32buf[0]!;
  if ((u & 0x7f800000) === 0x7f800000 && (u & 0x7fffff) !== 0) return ((u >>> 16) | 0x40) & 0xffff;
  const rounded = u + 0x7fff + ((u >>> 16) & 1);
  return (rounded >>> 16) & 0xffff;
}

/** f16 bits -> f32 value. */
export function f16ToF32(h: number): number {
  const s = h & 0x8000 ? -1 : 1;
  const e = (h >>> 10) & 0x1f;
  const m = h & 0x3ff;
  if (e === 0) return s * m * 2 ** -24;
  if (e === 31) return m ? Number.NaN : s * Number.POSITIVE_INFINITY;
  return s * (1 + m / 1024) * 2 ** (e - 15);
}

/** f32 value -> f16 bits, round to nearest even, overflow to infinity. */
export function f32ToF16(x: number): number {
  f32buf[0] = x;
  const u = u32buf[0]!;
  const sign = (u >>> 16) & 0x8000;
  const exp = (u >>> 23) & 0xff;
  let mant = u & 0x7fffff;
  if (exp === 0xff) return sign | 0x7c00 | (mant ? 0x200 : 0);
  let e = exp - 127 + 15;
  if (e >= 31) return sign | 0x7c00;
  if (e <= 0) {
    if (e < -10) return sign;
    mant |= 0x800000;
    const shift = 14 - e;
    const half = 1 << (shift - 1);
    let r = mant >>> shift;
    const rem = mant & ((1 << shift) - 1);
    if (rem > half || (rem === half && r & 1)) r++;
    return sign | r;
  }
  let r = mant >>> 13;
  const rem = mant & 0x1fff;
  if (rem > 0x1000 || (rem === 0x1000 && r & 1)) {
    r++;
    if (r === 0x400) {
      r = 0;
      e++;
      if (e >= 31) return sign | 0x7c00;
    }
  }
  return sign | (e << 10) | r;
}

/** Reads element i of a typed array of the given dtype as a number (floats decoded). */
export function readScalar(dtype: DType, data: AnyTypedArray, i: number): number {
  const v = data[i]!;
  if (dtype === 'bf16') return bf16ToF32(v);
  if (dtype === 'f16') return f16ToF32(v);
  return v;
}

/** Encodes a number for storage in a typed array of the given dtype. */
export function encodeScalar(dtype: DType, x: number): number {
  if (dtype === 'bf16') return f32ToBf16(x);
  if (dtype === 'f16') return f32ToF16(x);
  return x;
}

/** Converts a whole array to f32 values. */
export function toF32(dtype: DType, data: AnyTypedArray): Float32Array {
  if (dtype === 'f32') return Float32Array.from(data as Float32Array);
  const out = new Float32Array(data.length);
  if (dtype === 'bf16') {
    const o32 = new Uint32Array(out.buffer);
    for (let i = 0; i < data.length; i++) o32[i] = data[i]! << 16;
  } else if (dtype === 'f16') {
    for (let i = 0; i < data.length; i++) out[i] = f16ToF32(data[i]!);
  } else {
    for (let i = 0; i < data.length; i++) out[i] = data[i]!;
  }
  return out;
}

/** Converts f32 values into a new array of the target dtype. */
export function fromF32(dtype: DType, src: ArrayLike<number>): AnyTypedArray {
  const out = allocTyped(dtype, src.length);
  if (dtype === 'bf16') for (let i = 0; i < src.length; i++) out[i] = f32ToBf16(src[i]!);
  else if (dtype === 'f16') for (let i = 0; i < src.length; i++) out[i] = f32ToF16(src[i]!);
  else for (let i = 0; i < src.length; i++) out[i] = src[i]!;
  return out;
}
