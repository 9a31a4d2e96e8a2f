// ggml tensor types: ids, block geometry, dequantizers and the two simple quantizers (Q8_0, Q4_0).
//
// Facts from llama.cpp (ggml-common.h block structs, ggml-quants.c reference code, gguf-py constants.py);
// the code here is our own. Every float step is rounded to f32 (Math.fround) in the order the C reference
// evaluates it, so results are bit-identical to ggml's scalar path (which does not fuse multiply-adds).
//
// Block layouts (little-endian; "half" is an f16 bit pattern):
//   Q8_0  32 values, 34 bytes: half d; int8 qs[32]                 x = qs * d
//   Q4_0  32 values, 18 bytes: half d; u8 qs[16]                   x[j] = ((qs[j] & 15) - 8) * d, x[j+16] from qs[j] >> 4
//   Q4_K 256 values, 144 bytes: half d; half dmin; u8 scales[12]; u8 qs[128]
//        8 sub-blocks of 32 with 6-bit scale and min packed in scales[12]; x = d*sc * q - dmin*m
//   Q6_K 256 values, 210 bytes: u8 ql[128]; u8 qh[64]; int8 scales[16]; half d
//        16 sub-blocks of 16 with an int8 scale; q = (4 low bits | 2 high bits << 4) - 32; x = d * sc * q

import { f32ToF16 } from '../core/dtype.ts';
import { DTypeError, ShapeError } from '../core/errors.ts';
import { bf16BytesToF32, copyBytes, f16BytesToF32, f16LookupTable } from './safetensors.ts';

export interface GgmlType {
  /** The ggml_type enum value stored in GGUF tensor infos. */
  id: number;
  name: string;
  /** Values per block (1 for plain types). */
  blockSize: number;
  /** Bytes per block. */
  typeSize: number;
}

const QK_K = 256;

// (id, name, block size, type size). Ids 4, 5, 31-33 and 36-38 were removed from ggml and are not valid in files.
const TYPE_TABLE: [number, string, number, number][] = [
  [0, 'F32', 1, 4],
  [1, 'F16', 1, 2],
  [2, 'Q4_0', 32, 18],
  [3, 'Q4_1', 32, 20],
  [6, 'Q5_0', 32, 22],
  [7, 'Q5_1', 32, 24],
  [8, 'Q8_0', 32, 34],
  [9, 'Q8_1', 32, 36],
  [10, 'Q2_K', QK_K, 84],
  [11, 'Q3_K', QK_K, 110],
  [12, 'Q4_K', QK_K, 144],
  [13, 'Q5_K', QK_K, 176],
  [14, 'Q6_K', QK_K, 210],
  [15, 'Q8_K', QK_K, 292],
  [16, 'IQ2_XXS', QK_K, 66],
  [17, 'IQ2_XS', QK_K, 74],
  [18, 'IQ3_XXS', QK_K, 98],
  [19, 'IQ1_S', QK_K, 50],
  [20, 'IQ4_NL', 32, 18],
  [21, 'IQ3_S', QK_K, 110],
  [22, 'IQ2_S', QK_K, 82],
  [23, 'IQ4_XS', QK_K, 136],
  [24, 'I8', 1, 1],
  [25, 'I16', 1, 2],
  [26, 'I32', 1, 4],
  [27, 'I64', 1, 8],
  [28, 'F64', 1, 8],
  [29, 'IQ1_M', QK_K, 56],
  [30, 'BF16', 1, 2],
  [34, 'TQ1_0', QK_K, 54],
  [35, 'TQ2_0', QK_K, 66],
  [39, 'MXFP4', 32, 17],
];

export const GGML_TYPES: readonly GgmlType[] = TYPE_TABLE.map(([id, name, blockSize, typeSize]) =>
  Object.freeze({ id, name, blockSize, typeSize }),
);
const BY_ID = new Map(GGML_TYPES.map((t) => [t.id, t]));
const BY_NAME = new Map(GGML_TYPES.map((t) => [t.name, t]));

export type GgmlTypeName =
  | 'F32'
  | 'F16'
  | 'BF16'
  | 'F64'
  | 'I8'
  | 'I16'
  | 'I32'
  | 'I64'
  | 'Q4_0'
  | 'Q4_1'
  | 'Q5_0'
  | 'Q5_1'
  | 'Q8_0'
  | 'Q8_1'
  | 'Q2_K'
  | 'Q3_K'
  | 'Q4_K'
  | 'Q5_K'
  | 'Q6_K'
  | 'Q8_K'
  | 'IQ2_XXS'
  | 'IQ2_XS'
  | 'IQ3_XXS'
  | 'IQ1_S'
  | 'IQ4_NL'
  | 'IQ3_S'
  | 'IQ2_S'
  | 'IQ4_XS'
  | 'IQ1_M'
  | 'TQ1_0'
  | 'TQ2_0'
  | 'MXFP4';

/** Looks a ggml type up by id or name; undefined when unknown. */
export function ggmlType(idOrName: number | string): GgmlType | undefined {
  return typeof idOrName === 'number' ? BY_ID.get(idOrName) : BY_NAME.get(idOrName.toUpperCase());
}

/** Bytes of `numel` values of this type; throws ShapeError when numel is not a whole number of blocks. */
export function ggmlByteSize(type: GgmlType, numel: number): number {
  if (numel % type.blockSize !== 0) {
    throw new ShapeError(`${type.name} stores blocks of ${type.blockSize} values; ${numel} values is not a multiple`);
  }
  return (numel / type.blockSize) * type.typeSize;
}

/** Types that dequantize() supports. */
export const DEQUANTIZABLE: readonly GgmlTypeName[] = [
  'F32',
  'F16',
  'BF16',
  'F64',
  'I8',
  'I16',
  'I32',
  'Q8_0',
  'Q4_0',
  'Q4_K',
  'Q6_K',
];

export function canDequantize(type: GgmlType): boolean {
  return (DEQUANTIZABLE as readonly string[]).includes(type.name);
}

const fr = Math.fround;

function dequantQ8_0(b: Uint8Array, out: Float32Array, nblocks: number): void {
  const h = f16LookupTable();
  const s8 = new Int8Array(b.buffer, b.byteOffset, b.byteLength);
  for (let i = 0; i < nblocks; i++) {
    const o = i * 34;
    const d = h[b[o]! | (b[o + 1]! << 8)]!;
    const y = i * 32;
    for (let j = 0; j < 32; j++) out[y + j] = fr(s8[o + 2 + j]! * d);
  }
}

function dequantQ4_0(b: Uint8Array, out: Float32Array, nblocks: number): void {
  const h = f16LookupTable();
  for (let i = 0; i < nblocks; i++) {
    const o = i * 18;
    const d = h[b[o]! | (b[o + 1]! << 8)]!;
    const y = i * 32;
    for (let j = 0; j < 16; j++) {
      const q = b[o + 2 + j]!;
      out[y + j] = fr(((q & 0x0f) - 8) * d);
      out[y + j + 16] = fr(((q >> 4) - 8) * d);
    }
  }
}

/** The 6-bit scale and min of sub-block j (0..7) packed in 12 bytes at `s` (ggml get_scale_min_k4). */
function scaleMinK4(b: Uint8Array, s: number, j: number, sm: Uint8Array): void {
  if (j < 4) {
    sm[0] = b[s + j]! & 63;
    sm[1] = b[s + j + 4]! & 63;
  } else {
    sm[0] = (b[s + j + 4]! & 0x0f) | ((b[s + j - 4]! >> 6) << 4);
    sm[1] = (b[s + j + 4]! >> 4) | ((b[s + j]! >> 6) << 4);
  }
}

function dequantQ4_K(b: Uint8Array, out: Float32Array, nblocks: number): void {
  const h = f16LookupTable();
  const sm = new Uint8Array(2);
  for (let i = 0; i < nblocks; i++) {
    const o = i * 144;
    const d = h[b[o]! | (b[o + 1]! << 8)]!;
    const dmin = h[b[o + 2]! | (b[o + 3]! << 8)]!;
    const sc = o + 4;
    let q = o + 16;
    let y = i * QK_K;
    for (let j = 0, is = 0; j < QK_K; j += 64, is += 2, q += 32) {
      scaleMinK4(b, sc, is, sm);
      const d1 = fr(d * sm[0]!);
      const m1 = fr(dmin * sm[1]!);
      scaleMinK4(b, sc, is + 1, sm);
      const d2 = fr(d * sm[0]!);
      const m2 = fr(dmin * sm[1]!);
      for (let l = 0; l < 32; l++) out[y++] = fr(fr(d1 * (b[q + l]! & 0x0f)) - m1);
      for (let l = 0; l < 32; l++) out[y++] = fr(fr(d2 * (b[q + l]! >> 4)) - m2);
    }
  }
}

function dequantQ6_K(b: Uint8Array, out: Float32Array, nblocks: number): void {
  const h = f16LookupTable();
  const s8 = new Int8Array(b.buffer, b.byteOffset, b.byteLength);
  for (let i = 0; i < nblocks; i++) {
    const o = i * 210;
    const d = h[b[o + 208]! | (b[o + 209]! << 8)]!;
    let ql = o;
    let qh = o + 128;
    let sc = o + 192;
    let y = i * QK_K;
    for (let n = 0; n < QK_K; n += 128) {
      for (let l = 0; l < 32; l++) {
        const is = l >> 4;
        const hb = b[qh + l]!;
        const q1 = ((b[ql + l]! & 0x0f) | ((hb & 3) << 4)) - 32;
        const q2 = ((b[ql + l + 32]! & 0x0f) | (((hb >> 2) & 3) << 4)) - 32;
        const q3 = ((b[ql + l]! >> 4) | (((hb >> 4) & 3) << 4)) - 32;
        const q4 = ((b[ql + l + 32]! >> 4) | (((hb >> 6) & 3) << 4)) - 32;
        out[y + l] = fr(fr(d * s8[sc + is]!) * q1);
        out[y + l + 32] = fr(fr(d * s8[sc + is + 2]!) * q2);
        out[y + l + 64] = fr(fr(d * s8[sc + is + 4]!) * q3);
        out[y + l + 96] = fr(fr(d * s8[sc + is + 6]!) * q4);
      }
      y += 128;
      ql += 64;
      qh += 32;
      sc += 8;
    }
  }
}

function view<T>(b: Uint8Array, size: number, make: (buf: ArrayBufferLike, off: number, n: number) => T): T {
  if (b.byteOffset % size === 0) return make(b.buffer, b.byteOffset, b.byteLength / size);
  return make(copyBytes(b).buffer, 0, b.byteLength / size);
}

/**
 * Decodes `numel` values of `type` from `bytes` into f32 (into `out` when given). Throws DTypeError for types
 * without a dequantizer here (see DEQUANTIZABLE) and ShapeError when the byte count does not match.
 */
export function dequantize(type: GgmlType, bytes: Uint8Array, numel: number, out?: Float32Array): Float32Array {
  const need = ggmlByteSize(type, numel);
  if (bytes.byteLength !== need) {
    throw new ShapeError(`${type.name}: ${numel} values take ${need} bytes, got ${bytes.byteLength}`);
  }
  const y = out ?? new Float32Array(numel);
  if (y.length < numel) throw new ShapeError(`dequantize: output holds ${y.length} values, needs ${numel}`);
  const nblocks = numel / type.blockSize;
  switch (type.name) {
    case 'F32':
      y.set(view(bytes, 4, (b, o, n) => new Float32Array(b, o, n)));
      break;
    case 'F16':
      f16BytesToF32(bytes, y);
      break;
    case 'BF16':
      bf16BytesToF32(bytes, y);
      break;
    case 'F64':
      y.set(view(bytes, 8, (b, o, n) => new Float64Array(b, o, n)));
      break;
    case 'I8':
      y.set(new Int8Array(bytes.buffer, bytes.byteOffset, bytes.byteLength));
      break;
    case 'I16':
      y.set(view(bytes, 2, (b, o, n) => new Int16Array(b, o, n)));
      break;
    case 'I32':
      y.set(view(bytes, 4, (b, o, n) => new Int32Array(b, o, n)));
      break;
    case 'Q8_0':
      dequantQ8_0(bytes, y, nblocks);
      break;
    case 'Q4_0':
      dequantQ4_0(bytes, y, nblocks);
      break;
    case 'Q4_K':
      dequantQ4_K(bytes, y, nblocks);
      break;
    case 'Q6_K':
      dequantQ6_K(bytes, y, nblocks);
      break;
    default:
      throw new DTypeError(
        `cannot dequantize ggml type ${type.name}: supported are ${DEQUANTIZABLE.join(', ')}; ` +
          'requantize the file with llama-quantize (for example to Q8_0) or use an F16 / Q4_K_M model',
      );
  }
  return y;
}

function checkBlocks(name: string, n: number): number {
  if (n % 32 !== 0) throw new ShapeError(`${name} quantizes blocks of 32 values; ${n} is not a multiple of 32`);
  return n / 32;
}

/** Q8_0 as ggml's quantize_row_q8_0_ref: d = max|x| / 127, q = round(x / d) (half away from zero). */
export function quantizeQ8_0(x: ArrayLike<number>): Uint8Array {
  const nb = checkBlocks('Q8_0', x.length);
  const out = new Uint8Array(nb * 34);
  const s8 = new Int8Array(out.buffer);
  for (let i = 0; i < nb; i++) {
    let amax = 0;
    for (let j = 0; j < 32; j++) amax = Math.max(amax, Math.abs(fr(x[i * 32 + j]!)));
    const d = fr(amax / 127);
    const id = d ? fr(1 / d) : 0;
    const h = f32ToF16(d);
    const o = i * 34;
    out[o] = h & 0xff;
    out[o + 1] = h >> 8;
    for (let j = 0; j < 32; j++) {
      const v = fr(fr(x[i * 32 + j]!) * id);
      s8[o + 2 + j] = Math.sign(v) * Math.floor(Math.abs(v) + 0.5);
    }
  }
  return out;
}

/** Q4_0 as ggml's quantize_row_q4_0_ref: d = (value of largest magnitude) / -8, q = min(15, trunc(x/d + 8.5)). */
export function quantizeQ4_0(x: ArrayLike<number>): Uint8Array {
  const nb = checkBlocks('Q4_0', x.length);
  const out = new Uint8Array(nb * 18);
  for (let i = 0; i < nb; i++) {
    let amax = 0;
    let max = 0;
    for (let j = 0; j < 32; j++) {
      const v = fr(x[i * 32 + j]!);
      if (amax < Math.abs(v)) {
        amax = Math.abs(v);
        max = v;
      }
    }
    const d = fr(max / -8);
    const id = d ? fr(1 / d) : 0;
    const h = f32ToF16(d);
    const o = i * 18;
    out[o] = h & 0xff;
    out[o + 1] = h >> 8;
    for (let j = 0; j < 16; j++) {
      const x0 = fr(fr(x[i * 32 + j]!) * id);
      const x1 = fr(fr(x[i * 32 + 16 + j]!) * id);
      const q0 = Math.min(15, Math.trunc(fr(x0 + 8.5)));
      const q1 = Math.min(15, Math.trunc(fr(x1 + 8.5)));
      out[o + 2 + j] = q0 | (q1 << 4);
    }
  }
  return out;
}

/** Quantizes f32 values to Q8_0 or Q4_0 bytes. */
export function quantize(type: 'Q8_0' | 'Q4_0', x: ArrayLike<number>): Uint8Array {
  return type === 'Q8_0' ? quantizeQ8_0(x) : quantizeQ4_0(x);
}
