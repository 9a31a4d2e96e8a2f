// GGUF (llama.cpp's model file): read lazily and validated, write durably.
//
// Layout (v2 and v3, little-endian): magic "GGUF", u32 version, u64 tensor_count, u64 kv_count; kv_count pairs
// of (string key, u32 value type, value); tensor_count infos of (string name, u32 n_dims, u64 dims[n_dims]
// innermost first, u32 ggml type, u64 offset relative to the data section); padding to `general.alignment`
// (u32, default 32); the data section, each tensor at an aligned offset and padded to the alignment.
// A string is a u64 byte length plus UTF-8 bytes; an array is u32 item type, u64 count, items.
//
// The reader reads the header through a window of positional reads and tensor data only when asked. It checks
// every count and length against the bytes that are left before allocating, so a corrupt file gives a
// FormatError naming the file and field, never a hang or a huge allocation. It accepts what llama.cpp's gguf.cpp
// accepts, and is a little more lenient in one place: tensor data must be aligned, inside the file and not
// overlapping, but need not be packed in info order.
//
// Writer typing of plain JS metadata values (llama.cpp's gguf-py GGUFWriter maps Python int -> INT32,
// float -> FLOAT32, bool -> BOOL, str -> STRING, list -> ARRAY of its first item's type; JS has one number type,
// so): string -> string; boolean -> bool; integer number -> i32 (i64 when outside the i32 range); other number
// -> f32; bigint -> i64 (u64 above the i64 range); array -> array of the common item type (all integers -> i32
// or i64, any fraction -> f32). Empty arrays need an explicit type, as in gguf-py. Pass {type, value} (or the
// `types` map) for anything else: llama.cpp reads many keys as u32 (block_count, context_length, ...).

import * as fs from 'node:fs';
import { FormatError, fmtShape, ShapeError } from '../core/errors.ts';
import { AtomicFileSync, withAtomicFile } from './atomic.ts';
import {
  DEQUANTIZABLE,
  dequantize,
  type GgmlType,
  type GgmlTypeName,
  ggmlByteSize,
  ggmlType,
  quantizeQ4_0,
  quantizeQ8_0,
} from './gguf-quants.ts';
import { copyBytes, fromFloat32, readExactly, setOwn } from './safetensors.ts';

export const GGUF_MAGIC = 0x46554747; // "GGUF" read as a little-endian u32
export const GGUF_DEFAULT_ALIGNMENT = 32;
/** ggml's GGML_MAX_DIMS. */
export const GGUF_MAX_DIMS = 4;
/** ggml's GGML_MAX_NAME (including the terminating NUL): longer tensor names do not load in llama.cpp. */
export const GGML_MAX_NAME = 64;
const MAX_ARRAY_DEPTH = 8;

export type GgufScalarType =
  | 'u8'
  | 'i8'
  | 'u16'
  | 'i16'
  | 'u32'
  | 'i32'
  | 'f32'
  | 'bool'
  | 'string'
  | 'u64'
  | 'i64'
  | 'f64';
/** A value's GGUF type: a scalar type, or an array of a (possibly array) item type. */
export type GgufTypeSpec = GgufScalarType | { array: GgufTypeSpec };
/** A metadata value as read: numbers (u64/i64 beyond 2^53 as bigint), booleans, strings, arrays of those. */
export type GgufValue = number | bigint | boolean | string | GgufValue[];
/** A metadata value with an explicit type, for the writer. */
export interface GgufTypedValue {
  type: GgufTypeSpec;
  value: GgufValue;
}

// GGUF value type ids (gguf_type).
const VT_ID: Record<GgufScalarType | 'array', number> = {
  u8: 0,
  i8: 1,
  u16: 2,
  i16: 3,
  u32: 4,
  i32: 5,
  f32: 6,
  bool: 7,
  string: 8,
  array: 9,
  u64: 10,
  i64: 11,
  f64: 12,
};
const VT_NAME: (GgufScalarType | 'array')[] = [];
for (const [k, v] of Object.entries(VT_ID)) VT_NAME[v] = k as GgufScalarType | 'array';
const VT_SIZE: Record<GgufScalarType, number> = {
  u8: 1,
  i8: 1,
  bool: 1,
  u16: 2,
  i16: 2,
  u32: 4,
  i32: 4,
  f32: 4,
  u64: 8,
  i64: 8,
  f64: 8,
  string: 8, // the length prefix: the least a string item can take
};

export interface GgufTensorInfo {
  name: string;
  /** PyTorch order (outermost first): the reverse of ggmlDims. */
  shape: number[];
  /** As stored: ne[0] (innermost, contiguous) first. */
  ggmlDims: number[];
  type: GgmlType;
  /** Absolute byte offset of the data in the file. */
  offset: number;
  /** Offset relative to the data section, as stored in the file. */
  relativeOffset: number;
  byteLength: number;
  numel: number;
}

export interface GgufFile {
  readonly path: string;
  readonly version: number;
  readonly alignment: number;
  /** Absolute offset of the data section. */
  readonly dataOffset: number;
  readonly fileSize: number;
  /** Key -> value, in file order. */
  readonly metadata: Record<string, GgufValue>;
  /** Key -> stored GGUF type (pass it back to writeGguf for a same-typed copy). */
  readonly metadataTypes: Record<string, GgufTypeSpec>;
  readonly tensors: GgufTensorInfo[];
  /** The tensor with this name (FormatError when absent). */
  tensor(name: string): GgufTensorInfo;
  readTensorBytes(info: GgufTensorInfo | string): Uint8Array;
  /** Reads and dequantizes to f32 (F32, F16, BF16, F64, I8/I16/I32, Q8_0, Q4_0, Q4_K, Q6_K). */
  readTensorF32(info: GgufTensorInfo | string): Float32Array;
  close(): void;
}

// ---------------------------------------------------------------------------------------------------------
// Reading

interface ByteSource {
  readonly name: string;
  readonly size: number;
  read(position: number, length: number, what: string): Uint8Array;
}

const WINDOW = 1 << 20;

/** Sequential reader over a ByteSource through a window, with every length checked against the file size. */
class Cursor {
  pos = 0;
  private buf: Uint8Array = new Uint8Array(0);
  private dv: DataView = new DataView(this.buf.buffer);
  private bufStart = 0;
  // ignoreBOM: a string that starts with U+FEFF (a real token in some vocabularies) must keep it.
  private readonly decoder = new TextDecoder('utf-8', { ignoreBOM: true });

  constructor(private readonly src: ByteSource) {}

  get remaining(): number {
    return this.src.size - this.pos;
  }

  fail(msg: string): never {
    throw new FormatError(`${this.src.name}: ${msg}`);
  }

  /**
   * Makes n bytes at pos available; returns their index in buf and advances pos. It may replace buf and dv, so
   * callers read `this.dv` only after calling it (`this.dv.getX(this.take(..))` would use the old window).
   */
  private take(n: number, what: string): number {
    if (n > this.remaining) {
      this.fail(
        `unexpected end of file at offset ${this.pos} while reading ${what} (needs ${n} bytes, ${this.remaining} left); ` +
          'the file is truncated or corrupt',
      );
    }
    if (this.pos < this.bufStart || this.pos + n > this.bufStart + this.buf.byteLength) {
      const len = Math.min(Math.max(n, WINDOW), this.remaining);
      this.buf = this.src.read(this.pos, len, what);
      this.dv = new DataView(this.buf.buffer, this.buf.byteOffset, this.buf.byteLength);
      this.bufStart = this.pos;
    }
    const i = this.pos - this.bufStart;
    this.pos += n;
    return i;
  }

  u8(what: string): number {
    const i = this.take(1, what);
    return this.buf[i]!;
  }
  i8(what: string): number {
    const i = this.take(1, what);
    return this.dv.getInt8(i);
  }
  u16(what: string): number {
    const i = this.take(2, what);
    return this.dv.getUint16(i, true);
  }
  i16(what: string): number {
    const i = this.take(2, what);
    return this.dv.getInt16(i, true);
  }
  u32(what: string): number {
    const i = this.take(4, what);
    return this.dv.getUint32(i, true);
  }
  i32(what: string): number {
    const i = this.take(4, what);
    return this.dv.getInt32(i, true);
  }
  f32(what: string): number {
    const i = this.take(4, what);
    return this.dv.getFloat32(i, true);
  }
  f64(what: string): number {
    const i = this.take(8, what);
    return this.dv.getFloat64(i, true);
  }
  u64(what: string): bigint {
    const i = this.take(8, what);
    return this.dv.getBigUint64(i, true);
  }
  i64(what: string): bigint {
    const i = this.take(8, what);
    return this.dv.getBigInt64(i, true);
  }

  /** A u64 that must be a count/size no larger than `limit`. */
  size(what: string, limit: number, why: string): number {
    const v = this.u64(what);
    if (v > BigInt(limit)) this.fail(`${what} is ${v}, more than ${why} (${limit}); the file is corrupt`);
    return Number(v);
  }

  str(what: string): string {
    const n = this.size(`the length of ${what}`, this.remaining - 8, 'the bytes left in the file');
    const i = this.take(n, what);
    return this.decoder.decode(this.buf.subarray(i, i + n));
  }

  /** n raw bytes copied out (for bulk numeric arrays). */
  bytes(n: number, what: string): Uint8Array {
    const i = this.take(n, what);
    return copyBytes(this.buf, i, i + n);
  }
}

function bigToValue(v: bigint): number | bigint {
  return v >= BigInt(Number.MIN_SAFE_INTEGER) && v <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(v) : v;
}

function readScalar(c: Cursor, t: GgufScalarType, what: string): GgufValue {
  switch (t) {
    case 'u8':
      return c.u8(what);
    case 'i8':
      return c.i8(what);
    case 'u16':
      return c.u16(what);
    case 'i16':
      return c.i16(what);
    case 'u32':
      return c.u32(what);
    case 'i32':
      return c.i32(what);
    case 'f32':
      return c.f32(what);
    case 'f64':
      return c.f64(what);
    case 'bool':
      return c.u8(what) !== 0;
    case 'string':
      return c.str(what);
    case 'u64':
      return bigToValue(c.u64(what));
    case 'i64':
      return bigToValue(c.i64(what));
  }
}

function valueTypeFromId(c: Cursor, id: number, what: string): GgufScalarType | 'array' {
  const t = VT_NAME[id];
  if (t === undefined) c.fail(`${what} has unknown value type ${id} (known: 0..12); the file is corrupt`);
  return t;
}

/** Reads a value of type id `typeId`; returns it with its type spec. */
function readValue(c: Cursor, typeId: number, what: string, depth: number): { value: GgufValue; spec: GgufTypeSpec } {
  const t = valueTypeFromId(c, typeId, what);
  if (t !== 'array') return { value: readScalar(c, t, what), spec: t };
  if (depth >= MAX_ARRAY_DEPTH) c.fail(`${what} nests arrays deeper than ${MAX_ARRAY_DEPTH}; the file is corrupt`);
  const itemId = c.u32(`the item type of ${what}`);
  const it = valueTypeFromId(c, itemId, `the items of ${what}`);
  const minItem = it === 'array' ? 12 : VT_SIZE[it];
  const n = c.size(`the length of ${what}`, Math.floor(c.remaining / minItem), 'its items could fill');
  if (it === 'array') {
    const out: GgufValue[] = new Array(n);
    let inner: GgufTypeSpec = 'u8';
    for (let i = 0; i < n; i++) {
      const r = readValue(c, itemId, `${what}[${i}]`, depth + 1);
      out[i] = r.value;
      if (i === 0) inner = r.spec;
    }
    return { value: out, spec: { array: inner } };
  }
  if (it === 'string' || it === 'bool') {
    const out: GgufValue[] = new Array(n);
    for (let i = 0; i < n; i++) out[i] = readScalar(c, it, `${what}[${i}]`);
    return { value: out, spec: { array: it } };
  }
  // Numeric arrays: one bulk read, then a typed view (the copy is aligned).
  const raw = c.bytes(n * VT_SIZE[it], what);
  const b = raw.buffer;
  let arr: ArrayLike<number> | ArrayLike<bigint>;
  switch (it) {
    case 'u8':
      arr = raw;
      break;
    case 'i8':
      arr = new Int8Array(b, 0, n);
      break;
    case 'u16':
      arr = new Uint16Array(b, 0, n);
      break;
    case 'i16':
      arr = new Int16Array(b, 0, n);
      break;
    case 'u32':
      arr = new Uint32Array(b, 0, n);
      break;
    case 'i32':
      arr = new Int32Array(b, 0, n);
      break;
    case 'f32':
      arr = new Float32Array(b, 0, n);
      break;
    case 'f64':
      arr = new Float64Array(b, 0, n);
      break;
    case 'u64':
      arr = new BigUint64Array(b, 0, n);
      break;
    case 'i64':
      arr = new BigInt64Array(b, 0, n);
      break;
  }
  const out: GgufValue[] = new Array(n);
  if (it === 'u64' || it === 'i64') for (let i = 0; i < n; i++) out[i] = bigToValue((arr as ArrayLike<bigint>)[i]!);
  else for (let i = 0; i < n; i++) out[i] = (arr as ArrayLike<number>)[i]!;
  return { value: out, spec: { array: it } };
}

interface ParsedHeader {
  version: number;
  alignment: number;
  dataOffset: number;
  metadata: Record<string, GgufValue>;
  metadataTypes: Record<string, GgufTypeSpec>;
  tensors: GgufTensorInfo[];
}

function parseHeader(src: ByteSource): ParsedHeader {
  const c: Cursor = new Cursor(src);
  if (src.size < 8) c.fail(`only ${src.size} bytes: too small for a GGUF file`);
  const magic = c.u32('the magic');
  if (magic !== GGUF_MAGIC) {
    const m = new Uint8Array(new Uint32Array([magic]).buffer);
    const shown = [...m].map((x) => (x >= 32 && x < 127 ? String.fromCharCode(x) : `\\x${x.toString(16)}`)).join('');
    c.fail(`not a GGUF file: starts with "${shown}" instead of "GGUF"`);
  }
  const version = c.u32('the version');
  if (version === 1) c.fail('GGUF version 1 is not supported: convert the model again with a current llama.cpp');
  if (version !== 2 && version !== 3) {
    if ((version & 0xffff) === 0 && ((version >>> 16) & 0xffff) !== 0) {
      c.fail(`this GGUF file is big-endian (version reads as ${version}); only little-endian files are supported`);
    }
    c.fail(`unsupported GGUF version ${version} (supported: 2, 3)`);
  }
  const nTensors = c.size('tensor_count', Math.floor(c.remaining / 24), 'the tensor infos left in the file could hold');
  const nKv = c.size('kv_count', Math.floor(c.remaining / 13), 'the key-value pairs left in the file could hold');

  const metadata: Record<string, GgufValue> = {};
  const metadataTypes: Record<string, GgufTypeSpec> = {};
  for (let k = 0; k < nKv; k++) {
    const key = c.str(`key #${k}`);
    if (Object.hasOwn(metadata, key)) c.fail(`metadata key "${key}" appears twice; the file is corrupt`);
    const typeId = c.u32(`the type of "${key}"`);
    const { value, spec } = readValue(c, typeId, `metadata "${key}"`, 0);
    setOwn(metadata, key, value);
    setOwn(metadataTypes, key, spec);
  }

  let alignment = GGUF_DEFAULT_ALIGNMENT;
  if (Object.hasOwn(metadata, 'general.alignment')) {
    const a = metadata['general.alignment'];
    if (metadataTypes['general.alignment'] !== 'u32' || typeof a !== 'number' || a === 0 || (a & (a - 1)) !== 0) {
      c.fail(
        `general.alignment must be a u32 power of two, got ${String(a)} (${JSON.stringify(metadataTypes['general.alignment'])})`,
      );
    }
    alignment = a;
  }

  const infos: { name: string; dims: number[]; type: GgmlType; rel: number; numel: number; bytes: number }[] = [];
  const seen = new Set<string>();
  for (let t = 0; t < nTensors; t++) {
    const name = c.str(`the name of tensor #${t}`);
    const where = `tensor "${name}"`;
    if (seen.has(name)) c.fail(`${where} appears twice; the file is corrupt`);
    seen.add(name);
    const nDims = c.u32(`the n_dims of ${where}`);
    if (nDims > GGUF_MAX_DIMS) c.fail(`${where} has ${nDims} dimensions, more than ggml's ${GGUF_MAX_DIMS}`);
    const dims: number[] = [];
    let numel = 1;
    for (let d = 0; d < nDims; d++) {
      const v = c.u64(`dimension ${d} of ${where}`);
      if (v > BigInt(Number.MAX_SAFE_INTEGER))
        c.fail(`${where} dimension ${d} is ${v}: too large; the file is corrupt`);
      dims.push(Number(v));
      numel *= Number(v);
      if (!Number.isSafeInteger(numel)) c.fail(`${where} has too many elements (${dims.join(' x ')}...)`);
    }
    const typeId = c.u32(`the type of ${where}`);
    const type = ggmlType(typeId);
    if (!type) c.fail(`${where} has unknown ggml type ${typeId}; the file may need a newer reader, or is corrupt`);
    const ne0 = dims[0] ?? 1;
    if (ne0 % type.blockSize !== 0) {
      c.fail(`${where}: row length ${ne0} is not a multiple of the ${type.name} block size ${type.blockSize}`);
    }
    const relBig = c.u64(`the offset of ${where}`);
    if (relBig > BigInt(Number.MAX_SAFE_INTEGER)) c.fail(`${where} has offset ${relBig}, beyond the file`);
    const rel = Number(relBig);
    if (rel % alignment !== 0) c.fail(`${where} has offset ${rel}, not a multiple of the alignment ${alignment}`);
    infos.push({ name, dims, type, rel, numel, bytes: (numel / type.blockSize) * type.typeSize });
  }

  const dataOffset = nTensors > 0 ? Math.ceil(c.pos / alignment) * alignment : c.pos;
  const tensors: GgufTensorInfo[] = infos.map((i) => ({
    name: i.name,
    shape: [...i.dims].reverse(),
    ggmlDims: i.dims,
    type: i.type,
    offset: dataOffset + i.rel,
    relativeOffset: i.rel,
    byteLength: i.bytes,
    numel: i.numel,
  }));
  const byOffset = [...tensors].sort((a, b) => a.offset - b.offset);
  let end = dataOffset;
  let prev = '';
  for (const t of byOffset) {
    if (t.offset < end) c.fail(`tensor "${t.name}" data at offset ${t.relativeOffset} overlaps tensor "${prev}"`);
    end = t.offset + t.byteLength;
    prev = t.name;
    if (end > src.size) {
      c.fail(
        `tensor "${t.name}" (${t.type.name} ${fmtShape(t.shape)}, ${t.byteLength} bytes at ${t.offset}) runs past the end ` +
          `of the ${src.size}-byte file; the file is truncated: download it again`,
      );
    }
  }
  return { version, alignment, dataOffset, metadata, metadataTypes, tensors };
}

class GgufFileImpl implements GgufFile {
  readonly path: string;
  readonly version: number;
  readonly alignment: number;
  readonly dataOffset: number;
  readonly fileSize: number;
  readonly metadata: Record<string, GgufValue>;
  readonly metadataTypes: Record<string, GgufTypeSpec>;
  readonly tensors: GgufTensorInfo[];
  private readonly byName: Map<string, GgufTensorInfo>;
  private readonly readAt: (pos: number, len: number, what: string) => Uint8Array;
  private readonly release: () => void;

  constructor(
    src: ByteSource,
    h: ParsedHeader,
    readAt: (pos: number, len: number, what: string) => Uint8Array,
    release: () => void,
  ) {
    this.path = src.name;
    this.fileSize = src.size;
    this.version = h.version;
    this.alignment = h.alignment;
    this.dataOffset = h.dataOffset;
    this.metadata = h.metadata;
    this.metadataTypes = h.metadataTypes;
    this.tensors = h.tensors;
    this.byName = new Map(h.tensors.map((t) => [t.name, t]));
    this.readAt = readAt;
    this.release = release;
  }

  tensor(name: string): GgufTensorInfo {
    const t = this.byName.get(name);
    if (!t) throw new FormatError(`${this.path}: no tensor named "${name}" (the file has ${this.tensors.length})`);
    return t;
  }

  readTensorBytes(info: GgufTensorInfo | string): Uint8Array {
    const t = typeof info === 'string' ? this.tensor(info) : info;
    return this.readAt(t.offset, t.byteLength, `tensor "${t.name}"`);
  }

  readTensorF32(info: GgufTensorInfo | string): Float32Array {
    const t = typeof info === 'string' ? this.tensor(info) : info;
    return dequantize(t.type, this.readTensorBytes(t), t.numel);
  }

  close(): void {
    this.release();
  }
}

/**
 * Opens a GGUF file: reads and validates the whole header now; tensor data is read on demand by positional
 * reads. The file descriptor is reopened on demand after close().
 */
export function readGguf(path: string): GgufFile {
  let fd: number | null = fs.openSync(path, 'r');
  const size = fs.fstatSync(fd).size;
  const getFd = (): number => {
    if (fd === null) fd = fs.openSync(path, 'r');
    return fd;
  };
  const readAt = (pos: number, len: number, what: string) => readExactly(getFd(), path, pos, len, what);
  const src: ByteSource = { name: path, size, read: readAt };
  let header: ParsedHeader;
  try {
    header = parseHeader(src);
  } catch (e) {
    fs.closeSync(fd);
    fd = null;
    throw e;
  }
  return new GgufFileImpl(src, header, readAt, () => {
    if (fd !== null) fs.closeSync(fd);
    fd = null;
  });
}

/** Parses a whole GGUF file held in memory (same validation as readGguf). */
export function parseGguf(bytes: Uint8Array, name = '<buffer>'): GgufFile {
  const readAt = (pos: number, len: number) => bytes.subarray(pos, pos + len);
  const src: ByteSource = { name, size: bytes.byteLength, read: readAt };
  return new GgufFileImpl(
    src,
    parseHeader(src),
    (p, l) => copyBytes(bytes, p, p + l),
    () => {},
  );
}

// ---------------------------------------------------------------------------------------------------------
// Writing

export interface GgufWriteTensor {
  name: string;
  /** PyTorch order (outermost first); stored reversed. */
  shape: number[];
  type: GgmlTypeName | GgmlType;
  /**
   * Raw bytes of `type`; or f32 values (converted to F32/F16/BF16, quantized to Q8_0/Q4_0); or Uint16Array bit
   * patterns for F16/BF16. A function is called when the tensor is written (streaming large models).
   */
  data: GgufTensorData | (() => GgufTensorData | Promise<GgufTensorData>);
}
export type GgufTensorData = Uint8Array | Float32Array | Uint16Array;

export interface GgufWriteOptions {
  metadata: Record<string, GgufValue | GgufTypedValue>;
  /** Explicit types for keys of `metadata` (e.g. a read file's metadataTypes). */
  types?: Record<string, GgufTypeSpec>;
  tensors: GgufWriteTensor[];
  /** Data alignment; when not 32 it is also written as general.alignment (u32). */
  alignment?: number;
}

function werr(msg: string): never {
  throw new FormatError(`cannot write GGUF: ${msg}`);
}

function isTyped(v: unknown): v is GgufTypedValue {
  return typeof v === 'object' && v !== null && !Array.isArray(v) && 'type' in v && 'value' in v;
}

function inferType(v: GgufValue, key: string): GgufTypeSpec {
  if (typeof v === 'string') return 'string';
  if (typeof v === 'boolean') return 'bool';
  if (typeof v === 'bigint') return v > 0x7fffffffffffffffn ? 'u64' : 'i64';
  if (typeof v === 'number') {
    if (!Number.isInteger(v)) return 'f32';
    return v >= -0x80000000 && v <= 0x7fffffff ? 'i32' : 'i64';
  }
  if (Array.isArray(v)) {
    if (v.length === 0) werr(`"${key}" is an empty array: give its item type, e.g. {type: {array: 'i32'}, value: []}`);
    const kinds = new Set(v.map((x) => (Array.isArray(x) ? 'array' : typeof x)));
    if (kinds.size !== 1) werr(`"${key}": all items of a GGUF array must have one type, got ${[...kinds].join(', ')}`);
    const kind = [...kinds][0];
    if (kind === 'number') {
      const nums = v as number[];
      if (!nums.every(Number.isInteger)) return { array: 'f32' };
      return { array: nums.every((x) => x >= -0x80000000 && x <= 0x7fffffff) ? 'i32' : 'i64' };
    }
    if (kind === 'bigint') return { array: (v as bigint[]).some((x) => x > 0x7fffffffffffffffn) ? 'u64' : 'i64' };
    return { array: inferType(v[0]!, key) };
  }
  werr(`"${key}": unsupported value ${String(v)}`);
}

const INT_RANGE: Partial<Record<GgufScalarType, [number, number]>> = {
  u8: [0, 0xff],
  i8: [-0x80, 0x7f],
  u16: [0, 0xffff],
  i16: [-0x8000, 0x7fff],
  u32: [0, 0xffffffff],
  i32: [-0x80000000, 0x7fffffff],
};

/** Growable byte buffer for the header. */
class Bytes {
  buf = new Uint8Array(1 << 16);
  dv = new DataView(this.buf.buffer);
  len = 0;

  /** Reserves n bytes and returns where they start; may replace buf and dv (read them after calling). */
  private room(n: number): number {
    if (this.len + n > this.buf.byteLength) {
      let cap = this.buf.byteLength * 2;
      while (cap < this.len + n) cap *= 2;
      const nb = new Uint8Array(cap);
      nb.set(this.buf.subarray(0, this.len));
      this.buf = nb;
      this.dv = new DataView(nb.buffer);
    }
    const at = this.len;
    this.len += n;
    return at;
  }
  u8(v: number) {
    const at = this.room(1);
    this.dv.setUint8(at, v);
  }
  i8(v: number) {
    const at = this.room(1);
    this.dv.setInt8(at, v);
  }
  u16(v: number) {
    const at = this.room(2);
    this.dv.setUint16(at, v, true);
  }
  i16(v: number) {
    const at = this.room(2);
    this.dv.setInt16(at, v, true);
  }
  u32(v: number) {
    const at = this.room(4);
    this.dv.setUint32(at, v, true);
  }
  i32(v: number) {
    const at = this.room(4);
    this.dv.setInt32(at, v, true);
  }
  f32(v: number) {
    const at = this.room(4);
    this.dv.setFloat32(at, v, true);
  }
  f64(v: number) {
    const at = this.room(8);
    this.dv.setFloat64(at, v, true);
  }
  u64(v: bigint) {
    const at = this.room(8);
    this.dv.setBigUint64(at, v, true);
  }
  i64(v: bigint) {
    const at = this.room(8);
    this.dv.setBigInt64(at, v, true);
  }
  raw(b: Uint8Array) {
    const at = this.room(b.byteLength);
    this.buf.set(b, at);
  }
  str(s: string) {
    const b = Buffer.from(s, 'utf8');
    this.u64(BigInt(b.byteLength));
    this.raw(b);
  }
  pad(alignment: number) {
    const n = (alignment - (this.len % alignment)) % alignment;
    this.room(n); // new room is zero-filled
  }
  bytes(): Uint8Array {
    return this.buf.subarray(0, this.len);
  }
}

function writeScalar(out: Bytes, t: GgufScalarType, v: GgufValue, key: string): void {
  const bad = (): never =>
    werr(`"${key}": ${typeof v === 'string' ? JSON.stringify(v) : String(v)} is not a valid ${t}`);
  switch (t) {
    case 'string':
      if (typeof v !== 'string') bad();
      out.str(v as string);
      return;
    case 'bool':
      if (typeof v !== 'boolean') bad();
      out.u8(v ? 1 : 0);
      return;
    case 'f32':
    case 'f64':
      if (typeof v !== 'number') bad();
      if (t === 'f32') out.f32(v as number);
      else out.f64(v as number);
      return;
    case 'u64':
    case 'i64': {
      if (typeof v !== 'number' && typeof v !== 'bigint') bad();
      if (typeof v === 'number' && !Number.isSafeInteger(v)) bad();
      const b = BigInt(v as number | bigint);
      if (t === 'u64' ? b < 0n || b > 0xffffffffffffffffn : b < -0x8000000000000000n || b > 0x7fffffffffffffffn) bad();
      if (t === 'u64') out.u64(b);
      else out.i64(b);
      return;
    }
    default: {
      const n = typeof v === 'bigint' ? Number(v) : v;
      const [lo, hi] = INT_RANGE[t]!;
      if (typeof n !== 'number' || !Number.isInteger(n) || n < lo || n > hi) bad();
      out[t](n as number);
    }
  }
}

function writeValue(out: Bytes, spec: GgufTypeSpec, v: GgufValue, key: string, withType: boolean): void {
  if (typeof spec === 'string') {
    if (!Object.hasOwn(VT_ID, spec) || spec === ('array' as string))
      werr(`"${key}": unknown GGUF type ${String(spec)}`);
    if (withType) out.u32(VT_ID[spec]);
    writeScalar(out, spec, v, key);
    return;
  }
  if (typeof spec !== 'object' || spec === null || !('array' in spec))
    werr(`"${key}": bad type ${JSON.stringify(spec)}`);
  if (!Array.isArray(v)) werr(`"${key}": type is an array but the value is ${typeof v}`);
  if (withType) out.u32(VT_ID.array);
  const item = spec.array;
  out.u32(typeof item === 'string' ? VT_ID[item] : VT_ID.array);
  out.u64(BigInt(v.length));
  for (let i = 0; i < v.length; i++) {
    writeValue(out, item, v[i]!, `${key}[${i}]`, false);
  }
}

interface TensorPlan {
  t: GgufWriteTensor;
  type: GgmlType;
  numel: number;
  nbytes: number;
  rel: number;
}

function resolveType(t: GgufWriteTensor): GgmlType {
  const type = typeof t.type === 'string' ? ggmlType(t.type) : ggmlType(t.type.id);
  if (!type) werr(`tensor "${t.name}": unknown ggml type ${JSON.stringify(t.type)}`);
  return type;
}

function encodeTensor(p: TensorPlan, d: GgufTensorData): Uint8Array {
  const { t, type, numel, nbytes } = p;
  let bytes: Uint8Array;
  if (d instanceof Float32Array) {
    if (d.length !== numel) {
      throw new ShapeError(`tensor "${t.name}": shape ${fmtShape(t.shape)} has ${numel} values, data has ${d.length}`);
    }
    if (type.name === 'F32' || type.name === 'F16' || type.name === 'BF16') {
      bytes = fromFloat32(d, [numel], type.name).data;
    } else if (type.name === 'Q8_0') bytes = quantizeQ8_0(d);
    else if (type.name === 'Q4_0') bytes = quantizeQ4_0(d);
    else werr(`tensor "${t.name}": f32 data can be written as F32, F16, BF16, Q8_0 or Q4_0, not ${type.name}`);
  } else if (d instanceof Uint16Array) {
    if (type.name !== 'F16' && type.name !== 'BF16') {
      werr(`tensor "${t.name}": Uint16Array data is for F16/BF16 bit patterns, not ${type.name}`);
    }
    bytes = new Uint8Array(d.buffer, d.byteOffset, d.byteLength);
  } else if (d instanceof Uint8Array) bytes = d;
  else werr(`tensor "${t.name}": data must be a Uint8Array, Float32Array or Uint16Array`);
  if (bytes.byteLength !== nbytes) {
    throw new ShapeError(
      `tensor "${t.name}": ${type.name} ${fmtShape(t.shape)} takes ${nbytes} bytes, data has ${bytes.byteLength}`,
    );
  }
  return bytes;
}

/** Builds the header (through the padding before the data section) and the tensor layout. */
function planGguf(opts: GgufWriteOptions): { header: Uint8Array; plans: TensorPlan[]; alignment: number } {
  const meta = opts.metadata ?? {};
  const entries: [string, GgufTypeSpec, GgufValue][] = [];
  for (const [key, raw] of Object.entries(meta)) {
    let spec: GgufTypeSpec;
    let value: GgufValue;
    if (isTyped(raw)) {
      spec = raw.type;
      value = raw.value;
    } else {
      value = raw as GgufValue;
      const given = opts.types && Object.hasOwn(opts.types, key) ? opts.types[key] : undefined;
      spec = given ?? inferType(value, key);
    }
    entries.push([key, spec, value]);
  }
  let alignment = opts.alignment ?? GGUF_DEFAULT_ALIGNMENT;
  const alignEntry = entries.find((e) => e[0] === 'general.alignment');
  if (alignEntry) {
    const [, spec, v] = alignEntry;
    if (spec !== 'u32' || typeof v !== 'number') werr('general.alignment must be written as u32');
    if (opts.alignment !== undefined && opts.alignment !== v) {
      werr(`alignment ${opts.alignment} differs from metadata general.alignment ${v}`);
    }
    alignment = v;
  } else if (alignment !== GGUF_DEFAULT_ALIGNMENT) {
    entries.push(['general.alignment', 'u32', alignment]);
  }
  if (!Number.isInteger(alignment) || alignment <= 0 || (alignment & (alignment - 1)) !== 0) {
    werr(`alignment must be a power of two, got ${alignment}`);
  }

  const plans: TensorPlan[] = [];
  const names = new Set<string>();
  let rel = 0;
  for (const t of opts.tensors) {
    if (typeof t.name !== 'string' || t.name === '') werr('a tensor needs a name');
    if (names.has(t.name)) werr(`tensor "${t.name}" appears twice`);
    names.add(t.name);
    if (Buffer.byteLength(t.name, 'utf8') >= GGML_MAX_NAME) {
      werr(
        `tensor name "${t.name}" is ${Buffer.byteLength(t.name)} bytes; llama.cpp allows at most ${GGML_MAX_NAME - 1}`,
      );
    }
    if (
      !Array.isArray(t.shape) ||
      t.shape.length > GGUF_MAX_DIMS ||
      !t.shape.every((d) => Number.isSafeInteger(d) && d >= 0)
    ) {
      werr(
        `tensor "${t.name}": shape ${JSON.stringify(t.shape)} must be at most ${GGUF_MAX_DIMS} non-negative integers`,
      );
    }
    const type = resolveType(t);
    const ne0 = t.shape.length ? t.shape[t.shape.length - 1]! : 1;
    if (ne0 % type.blockSize !== 0) {
      throw new ShapeError(
        `tensor "${t.name}": the last dimension ${ne0} of ${fmtShape(t.shape)} must be a multiple of the ${type.name} block size ${type.blockSize}`,
      );
    }
    const numel = t.shape.reduce((a, b) => a * b, 1);
    const nbytes = ggmlByteSize(type, numel);
    plans.push({ t, type, numel, nbytes, rel });
    rel += Math.ceil(nbytes / alignment) * alignment;
  }

  const out = new Bytes();
  out.u32(GGUF_MAGIC);
  out.u32(3);
  out.u64(BigInt(plans.length));
  out.u64(BigInt(entries.length));
  for (const [key, spec, value] of entries) {
    out.str(key);
    writeValue(out, spec, value, key, true);
  }
  for (const p of plans) {
    out.str(p.t.name);
    out.u32(p.t.shape.length);
    for (let d = p.t.shape.length - 1; d >= 0; d--) out.u64(BigInt(p.t.shape[d]!));
    out.u32(p.type.id);
    out.u64(BigInt(p.rel));
  }
  if (plans.length > 0) out.pad(alignment);
  return { header: out.bytes(), plans, alignment };
}

function padding(nbytes: number, alignment: number): Uint8Array {
  return new Uint8Array((alignment - (nbytes % alignment)) % alignment);
}

/** Serializes a GGUF file to one buffer (small files and tests). */
export function serializeGguf(opts: GgufWriteOptions): Uint8Array {
  const { header, plans, alignment } = planGguf(opts);
  const parts: Uint8Array[] = [header];
  for (const p of plans) {
    const d = typeof p.t.data === 'function' ? p.t.data() : p.t.data;
    if (d instanceof Promise) werr(`tensor "${p.t.name}": serializeGguf needs synchronous data; use writeGguf`);
    parts.push(encodeTensor(p, d), padding(p.nbytes, alignment));
  }
  const out = new Uint8Array(parts.reduce((n, p) => n + p.byteLength, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.byteLength;
  }
  return out;
}

/**
 * Writes a GGUF v3 file durably (temp file + fsync + rename), streaming tensor by tensor. Tensors are laid out
 * in the order given, each padded to the alignment, as llama.cpp's writers do.
 */
export async function writeGguf(path: string, opts: GgufWriteOptions): Promise<void> {
  const { header, plans, alignment } = planGguf(opts);
  await withAtomicFile(path, async (f) => {
    await f.write(header);
    for (const p of plans) {
      const d = typeof p.t.data === 'function' ? await p.t.data() : p.t.data;
      await f.write(encodeTensor(p, d));
      await f.write(padding(p.nbytes, alignment));
    }
  });
}

/** Synchronous writeGguf (data functions must be synchronous). */
export function writeGgufSync(path: string, opts: GgufWriteOptions): void {
  const { header, plans, alignment } = planGguf(opts);
  const f = new AtomicFileSync(path);
  try {
    f.write(header);
    for (const p of plans) {
      const d = typeof p.t.data === 'function' ? p.t.data() : p.t.data;
      if (d instanceof Promise) werr(`tensor "${p.t.name}": writeGgufSync needs synchronous data; use writeGguf`);
      f.write(encodeTensor(p, d));
      f.write(padding(p.nbytes, alignment));
    }
  } catch (e) {
    f.abort();
    throw e;
  }
  f.commit();
}

export { DEQUANTIZABLE };
