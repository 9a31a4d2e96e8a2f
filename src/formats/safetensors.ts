// safetensors: read lazily (header first, then one positional read per tensor) and write durably.
//
// Layout (huggingface/safetensors, safetensors/src/tensor.rs): u64 little-endian header length N, N bytes of
// UTF-8 JSON, then the data. The JSON maps names to {dtype, shape, data_offsets: [begin, end]} (offsets relative
// to byte 8 + N) plus an optional "__metadata__" string->string map. Validation follows the reference reader:
// N <= 100_000_000 and 8 + N <= file size; sorted by offsets, each tensor starts where the previous ended
// (from 0, no holes or overlaps); end - begin == numel * itemsize; the last end is the end of the file.
// The writer sorts tensors as the reference serializer (dtype in descending enum order, which is descending
// alignment, then name) and pads the header with spaces to a multiple of 8, so tensor data is 8-aligned.
//
// RawTensor is independent of the Tensor class: raw little-endian bytes plus dtype and shape.

import * as fs from 'node:fs';
import * as path from 'node:path';
import { f16ToF32, f32ToBf16, f32ToF16 } from '../core/dtype.ts';
import { DTypeError, FormatError, fmtShape, ShapeError } from '../core/errors.ts';
import { AtomicFileSync, withAtomicFile } from './atomic.ts';

export type SafetensorsDType =
  | 'F64'
  | 'F32'
  | 'F16'
  | 'BF16'
  | 'I64'
  | 'I32'
  | 'I16'
  | 'I8'
  | 'U64'
  | 'U32'
  | 'U16'
  | 'U8'
  | 'BOOL'
  | 'F8_E4M3'
  | 'F8_E5M2';

/** The reference's Dtype enum order (increasing alignment); the serializer sorts by it, descending. */
const DTYPE_ORDER: readonly SafetensorsDType[] = [
  'BOOL',
  'U8',
  'I8',
  'F8_E5M2',
  'F8_E4M3',
  'I16',
  'U16',
  'F16',
  'BF16',
  'I32',
  'U32',
  'F32',
  'F64',
  'I64',
  'U64',
];
const DTYPE_RANK = new Map<string, number>(DTYPE_ORDER.map((d, i) => [d, i]));

const ITEM_SIZE: Record<SafetensorsDType, number> = {
  BOOL: 1,
  U8: 1,
  I8: 1,
  F8_E5M2: 1,
  F8_E4M3: 1,
  I16: 2,
  U16: 2,
  F16: 2,
  BF16: 2,
  I32: 4,
  U32: 4,
  F32: 4,
  F64: 8,
  I64: 8,
  U64: 8,
};

export const SAFETENSORS_DTYPES: readonly SafetensorsDType[] = DTYPE_ORDER;
export const MAX_HEADER_SIZE = 100_000_000;

export function isSafetensorsDType(s: unknown): s is SafetensorsDType {
  return typeof s === 'string' && DTYPE_RANK.has(s);
}

export function safetensorsItemSize(dtype: SafetensorsDType): number {
  return ITEM_SIZE[dtype];
}

/** A tensor as raw little-endian bytes. `data.byteLength == numel(shape) * itemsize(dtype)`. */
export interface RawTensor {
  dtype: SafetensorsDType;
  shape: number[];
  data: Uint8Array;
}

/** A tensor to write whose bytes may be produced on demand (so a large model is never in memory at once). */
export interface TensorSource {
  dtype: SafetensorsDType;
  shape: number[];
  data: Uint8Array | (() => Uint8Array | Promise<Uint8Array>);
}

export interface SafetensorsTensorInfo {
  dtype: SafetensorsDType;
  shape: number[];
  /** Absolute byte offset of the tensor's data in `file`. */
  byteOffset: number;
  byteLength: number;
  /** The file holding the tensor (a shard, for an index). */
  file: string;
}

/** The shared reading interface of one file and of a sharded index. */
export interface SafetensorsReader {
  readonly path: string;
  /** The "__metadata__" map ({} when absent). */
  readonly metadata: Record<string, string>;
  /** Tensor names, in file order (by offset; shard by shard for an index). */
  names(): string[];
  has(name: string): boolean;
  info(name: string): SafetensorsTensorInfo;
  /** Reads only this tensor's bytes, into a fresh (aligned) buffer. */
  read(name: string): RawTensor;
  close(): void;
}

/**
 * A fresh copy of bytes [start, end) with its own ArrayBuffer (so typed-array views of it are aligned).
 * Never use `.slice()` for this: on a Node Buffer it returns a view, not a copy.
 */
export function copyBytes(b: Uint8Array, start = 0, end = b.byteLength): Uint8Array {
  return new Uint8Array(b.subarray(start, end));
}

export function numelOf(shape: readonly number[]): number {
  let n = 1;
  for (const d of shape) n *= d;
  return n;
}

// ---------------------------------------------------------------------------------------------------------
// Reading

const READ_CHUNK = 0x40000000; // 1 GiB per readSync call (the syscall caps one read at about 2 GiB)

/** Reads exactly `length` bytes at `position` or throws FormatError naming what was being read. */
export function readExactly(
  fd: number,
  file: string,
  position: number,
  length: number,
  what: string,
  into?: Uint8Array,
): Uint8Array {
  const buf = into ?? new Uint8Array(length);
  let done = 0;
  while (done < length) {
    const n = fs.readSync(fd, buf, done, Math.min(length - done, READ_CHUNK), position + done);
    if (n === 0) {
      throw new FormatError(
        `${file}: unexpected end of file while reading ${what} (${length} bytes at offset ${position}, got ${done}); ` +
          'the file is truncated: download or export it again',
      );
    }
    done += n;
  }
  return buf;
}

function fail(file: string, msg: string): never {
  throw new FormatError(`${file}: ${msg}`);
}

function describe(v: unknown): string {
  const s = JSON.stringify(v);
  if (s === undefined) return String(v);
  return s.length > 60 ? `${s.slice(0, 57)}...` : s;
}

/** Sets an own enumerable property, even for a key named "__proto__" (plain assignment would set the prototype). */
export function setOwn<T>(obj: Record<string, T>, key: string, value: T): void {
  Object.defineProperty(obj, key, { value, enumerable: true, writable: true, configurable: true });
}

interface HeaderEntry {
  name: string;
  dtype: SafetensorsDType;
  shape: number[];
  begin: number;
  end: number;
}

/** Validates a parsed header against the reference rules; returns entries sorted by offset. */
function validateHeader(
  file: string,
  json: unknown,
  dataLength: number,
): { metadata: Record<string, string>; entries: HeaderEntry[] } {
  if (typeof json !== 'object' || json === null || Array.isArray(json)) {
    fail(file, 'the safetensors header is not a JSON object; this is not a safetensors file, or it is corrupt');
  }
  const metadata: Record<string, string> = {};
  const entries: HeaderEntry[] = [];
  for (const [name, value] of Object.entries(json as Record<string, unknown>)) {
    if (name === '__metadata__') {
      if (value === null) continue;
      if (typeof value !== 'object' || Array.isArray(value)) {
        fail(file, `"__metadata__" must be an object of strings, got ${describe(value)}`);
      }
      for (const [k, v] of Object.entries(value as Record<string, unknown>)) {
        if (typeof v !== 'string') {
          fail(file, `"__metadata__" key "${k}" must be a string, got ${describe(v)}; re-save with string values`);
        }
        setOwn(metadata, k, v);
      }
      continue;
    }
    const where = `tensor "${name}"`;
    if (typeof value !== 'object' || value === null || Array.isArray(value)) {
      fail(file, `${where}: expected {dtype, shape, data_offsets}, got ${describe(value)}`);
    }
    const e = value as Record<string, unknown>;
    if (!('dtype' in e) || !('shape' in e) || !('data_offsets' in e)) {
      const missing = ['dtype', 'shape', 'data_offsets'].filter((k) => !(k in e));
      fail(file, `${where}: missing field ${missing.join(', ')}`);
    }
    if (!isSafetensorsDType(e.dtype)) {
      fail(file, `${where}: unknown dtype ${describe(e.dtype)} (known: ${DTYPE_ORDER.join(', ')})`);
    }
    if (!Array.isArray(e.shape) || !e.shape.every((d) => Number.isSafeInteger(d) && (d as number) >= 0)) {
      fail(file, `${where}: shape must be a list of non-negative integers, got ${describe(e.shape)}`);
    }
    const off = e.data_offsets;
    if (!Array.isArray(off) || off.length !== 2 || !off.every((d) => Number.isSafeInteger(d) && (d as number) >= 0)) {
      fail(file, `${where}: data_offsets must be [begin, end] non-negative integers, got ${describe(off)}`);
    }
    entries.push({ name, dtype: e.dtype, shape: e.shape as number[], begin: off[0] as number, end: off[1] as number });
  }
  entries.sort((a, b) => a.begin - b.begin || a.end - b.end);
  let start = 0;
  for (const t of entries) {
    const where = `tensor "${t.name}"`;
    if (t.begin !== start || t.end < t.begin) {
      fail(
        file,
        `${where}: data_offsets [${t.begin}, ${t.end}] do not continue from the previous tensor's end ${start} ` +
          '(tensors must be contiguous from 0 with no holes or overlaps); the header is corrupt',
      );
    }
    start = t.end;
    let numel = 1;
    for (const d of t.shape) {
      numel *= d;
      if (!Number.isSafeInteger(numel)) fail(file, `${where}: shape ${fmtShape(t.shape)} overflows`);
    }
    const nbytes = numel * ITEM_SIZE[t.dtype];
    if (!Number.isSafeInteger(nbytes)) fail(file, `${where}: shape ${fmtShape(t.shape)} overflows`);
    if (t.end - t.begin !== nbytes) {
      fail(
        file,
        `${where}: ${t.dtype} ${fmtShape(t.shape)} needs ${nbytes} bytes but data_offsets [${t.begin}, ${t.end}] ` +
          `span ${t.end - t.begin}; the header is corrupt`,
      );
    }
  }
  if (start !== dataLength) {
    fail(
      file,
      `the tensors cover ${start} bytes of data but the file holds ${dataLength} bytes after the header ` +
        `(${start < dataLength ? 'extra bytes at the end' : 'the file is truncated'}); download or export it again`,
    );
  }
  return { metadata, entries };
}

/** Parses and validates a header from the first bytes of a file; `fileSize` is the whole file's size. */
function parseSafetensorsHeader(
  file: string,
  readAt: (position: number, length: number, what: string) => Uint8Array,
  fileSize: number,
): { headerSize: number; metadata: Record<string, string>; entries: HeaderEntry[] } {
  if (fileSize < 8) fail(file, `only ${fileSize} bytes: too small for a safetensors file (8-byte header size first)`);
  const lenBytes = readAt(0, 8, 'the header size');
  const n64 = new DataView(lenBytes.buffer, lenBytes.byteOffset, 8).getBigUint64(0, true);
  if (n64 > BigInt(MAX_HEADER_SIZE)) {
    fail(
      file,
      `header size ${n64} is over the ${MAX_HEADER_SIZE}-byte limit; this is not a safetensors file, or it is corrupt`,
    );
  }
  const n = Number(n64);
  if (8 + n > fileSize) {
    fail(file, `header size ${n} runs past the end of the ${fileSize}-byte file; the file is truncated or corrupt`);
  }
  const headerBytes = readAt(8, n, 'the JSON header');
  let text: string;
  try {
    text = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true }).decode(headerBytes);
  } catch {
    fail(file, 'the header is not valid UTF-8; the file is corrupt');
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (e) {
    fail(file, `the header is not valid JSON (${(e as Error).message}); the file is corrupt`);
  }
  const { metadata, entries } = validateHeader(file, json, fileSize - 8 - n);
  return { headerSize: n, metadata, entries };
}

function similarNames(names: Iterable<string>, want: string, max = 3): string[] {
  const tail = want.split('.').slice(-2).join('.');
  const out: string[] = [];
  for (const n of names) {
    if (n.endsWith(tail) || n.includes(want)) out.push(n);
    if (out.length >= max) break;
  }
  return out;
}

function notFound(file: string, name: string, names: Iterable<string>, count: number): never {
  const near = similarNames(names, name);
  throw new FormatError(
    `${file}: no tensor named "${name}" (the file has ${count} tensors${near.length ? `, e.g. ${near.map((s) => `"${s}"`).join(', ')}` : ''})`,
  );
}

class SafetensorsFile implements SafetensorsReader {
  readonly path: string;
  readonly metadata: Record<string, string>;
  readonly headerSize: number;
  private readonly byName = new Map<string, SafetensorsTensorInfo>();
  private readonly order: string[];
  private fd: number | null;

  constructor(file: string) {
    this.path = file;
    this.fd = fs.openSync(file, 'r');
    try {
      const size = fs.fstatSync(this.fd).size;
      const fd = this.fd;
      const { headerSize, metadata, entries } = parseSafetensorsHeader(
        file,
        (pos, len, what) => readExactly(fd, file, pos, len, what),
        size,
      );
      this.headerSize = headerSize;
      this.metadata = metadata;
      const base = 8 + headerSize;
      for (const e of entries) {
        this.byName.set(e.name, {
          dtype: e.dtype,
          shape: e.shape,
          byteOffset: base + e.begin,
          byteLength: e.end - e.begin,
          file,
        });
      }
      this.order = entries.map((e) => e.name);
    } catch (e) {
      fs.closeSync(this.fd);
      this.fd = null;
      throw e;
    }
  }

  names(): string[] {
    return [...this.order];
  }

  has(name: string): boolean {
    return this.byName.has(name);
  }

  info(name: string): SafetensorsTensorInfo {
    const i = this.byName.get(name);
    if (!i) notFound(this.path, name, this.order, this.order.length);
    return { ...i, shape: [...i.shape] };
  }

  read(name: string): RawTensor {
    const i = this.info(name);
    if (this.fd === null) this.fd = fs.openSync(this.path, 'r');
    const data = readExactly(this.fd, this.path, i.byteOffset, i.byteLength, `tensor "${name}"`);
    return { dtype: i.dtype, shape: i.shape, data };
  }

  close(): void {
    if (this.fd !== null) fs.closeSync(this.fd);
    this.fd = null;
  }
}

/** Opens one .safetensors file: reads and validates the header now, tensors when asked. */
export function openSafetensors(file: string): SafetensorsReader {
  return new SafetensorsFile(file);
}

/** Reads a whole file into memory (small files: adapters, tests). */
export function loadSafetensors(file: string): {
  tensors: Record<string, RawTensor>;
  metadata: Record<string, string>;
} {
  const r = openSafetensors(file);
  try {
    const tensors: Record<string, RawTensor> = {};
    for (const n of r.names()) tensors[n] = r.read(n);
    return { tensors, metadata: { ...r.metadata } };
  } finally {
    r.close();
  }
}

/** Parses bytes of a whole safetensors file held in memory (validated exactly as a file). */
export function deserializeSafetensors(
  bytes: Uint8Array,
  name = '<buffer>',
): { tensors: Record<string, RawTensor>; metadata: Record<string, string> } {
  const { headerSize, metadata, entries } = parseSafetensorsHeader(
    name,
    (pos, len) => bytes.subarray(pos, pos + len),
    bytes.byteLength,
  );
  const tensors: Record<string, RawTensor> = {};
  const base = 8 + headerSize;
  for (const e of entries) {
    tensors[e.name] = { dtype: e.dtype, shape: e.shape, data: copyBytes(bytes, base + e.begin, base + e.end) };
  }
  return { tensors, metadata };
}

class SafetensorsIndex implements SafetensorsReader {
  readonly path: string;
  readonly metadata: Record<string, string>;
  /** The index's own "metadata" (e.g. total_size), as written. */
  readonly indexMetadata: Record<string, unknown>;
  private readonly shards = new Map<string, SafetensorsFile>();
  private readonly weightMap = new Map<string, string>();
  private readonly order: string[] = [];

  constructor(indexPath: string) {
    this.path = indexPath;
    let json: unknown;
    try {
      json = JSON.parse(fs.readFileSync(indexPath, 'utf8'));
    } catch (e) {
      fail(indexPath, `not a valid JSON index (${(e as Error).message})`);
    }
    if (typeof json !== 'object' || json === null || Array.isArray(json)) fail(indexPath, 'expected a JSON object');
    const j = json as Record<string, unknown>;
    const wm = j.weight_map;
    if (typeof wm !== 'object' || wm === null || Array.isArray(wm)) {
      fail(indexPath, '"weight_map" must be an object of tensor name -> shard file');
    }
    this.indexMetadata =
      typeof j.metadata === 'object' && j.metadata !== null ? { ...(j.metadata as Record<string, unknown>) } : {};
    const dir = path.dirname(indexPath);
    const shardOrder: string[] = [];
    for (const [name, shard] of Object.entries(wm as Record<string, unknown>)) {
      if (typeof shard !== 'string' || shard === '' || path.isAbsolute(shard) || shard.split(/[\\/]/).includes('..')) {
        fail(indexPath, `weight_map["${name}"] must be a shard file name inside the folder, got ${describe(shard)}`);
      }
      this.weightMap.set(name, shard);
      if (!shardOrder.includes(shard)) shardOrder.push(shard);
    }
    try {
      for (const shard of shardOrder) {
        const p = path.join(dir, shard);
        if (!fs.existsSync(p)) {
          fail(indexPath, `shard "${shard}" listed in weight_map is missing from ${dir}; download it again`);
        }
        this.shards.set(shard, new SafetensorsFile(p));
      }
      for (const shard of shardOrder) {
        const f = this.shards.get(shard)!;
        for (const n of f.names()) if (this.weightMap.get(n) === shard) this.order.push(n);
      }
      for (const [name, shard] of this.weightMap) {
        if (!this.shards.get(shard)!.has(name)) {
          fail(indexPath, `weight_map puts tensor "${name}" in "${shard}", but that shard has no such tensor`);
        }
      }
    } catch (e) {
      this.close();
      throw e;
    }
    const first = shardOrder.length ? this.shards.get(shardOrder[0]!)! : null;
    this.metadata = first ? { ...first.metadata } : {};
  }

  names(): string[] {
    return [...this.order];
  }

  has(name: string): boolean {
    return this.weightMap.has(name);
  }

  private shardOf(name: string): SafetensorsFile {
    const s = this.weightMap.get(name);
    if (s === undefined) notFound(this.path, name, this.order, this.order.length);
    return this.shards.get(s)!;
  }

  info(name: string): SafetensorsTensorInfo {
    return this.shardOf(name).info(name);
  }

  read(name: string): RawTensor {
    return this.shardOf(name).read(name);
  }

  close(): void {
    for (const s of this.shards.values()) s.close();
  }
}

/**
 * Opens a sharded checkpoint through its index (model.safetensors.index.json, or the one *.safetensors.index.json
 * in a folder). Every shard header is read and checked against the weight_map now.
 */
export function openSafetensorsIndex(
  dirOrIndex: string,
): SafetensorsReader & { indexMetadata: Record<string, unknown> } {
  let indexPath = dirOrIndex;
  if (fs.statSync(dirOrIndex).isDirectory()) {
    const preferred = path.join(dirOrIndex, 'model.safetensors.index.json');
    if (fs.existsSync(preferred)) indexPath = preferred;
    else {
      const found = fs.readdirSync(dirOrIndex).filter((f) => f.endsWith('.safetensors.index.json'));
      if (found.length !== 1) {
        throw new FormatError(
          `${dirOrIndex}: expected one *.safetensors.index.json, found ${found.length ? found.join(', ') : 'none'}`,
        );
      }
      indexPath = path.join(dirOrIndex, found[0]!);
    }
  }
  return new SafetensorsIndex(indexPath);
}

// ---------------------------------------------------------------------------------------------------------
// Writing

function checkTensorSource(name: string, t: TensorSource): number {
  if (name === '__metadata__') throw new FormatError('"__metadata__" is reserved in safetensors: rename the tensor');
  if (!isSafetensorsDType(t.dtype)) {
    throw new DTypeError(`tensor "${name}": unknown safetensors dtype ${describe(t.dtype)}`);
  }
  if (!Array.isArray(t.shape) || !t.shape.every((d) => Number.isSafeInteger(d) && d >= 0)) {
    throw new ShapeError(`tensor "${name}": shape must be non-negative integers, got ${describe(t.shape)}`);
  }
  const nbytes = numelOf(t.shape) * ITEM_SIZE[t.dtype];
  if (t.data instanceof Uint8Array && t.data.byteLength !== nbytes) {
    throw new ShapeError(
      `tensor "${name}": ${t.dtype} ${fmtShape(t.shape)} needs ${nbytes} bytes but its data has ${t.data.byteLength}`,
    );
  }
  return nbytes;
}

interface Plan {
  header: Uint8Array;
  order: { name: string; t: TensorSource; nbytes: number }[];
  dataLength: number;
}

/** Header bytes (8-byte size + padded JSON) and the tensor order, as the reference serializer lays them out. */
function plan(tensors: Record<string, TensorSource>, metadata?: Record<string, string>): Plan {
  const order = Object.entries(tensors).map(([name, t]) => ({ name, t, nbytes: checkTensorSource(name, t) }));
  order.sort((a, b) => {
    const r = DTYPE_RANK.get(b.t.dtype)! - DTYPE_RANK.get(a.t.dtype)!;
    if (r !== 0) return r;
    // Rust compares strings by bytes: for UTF-8 that is code point order, which the default JS sort is not.
    return Buffer.compare(Buffer.from(a.name, 'utf8'), Buffer.from(b.name, 'utf8'));
  });
  const parts: string[] = [];
  if (metadata !== undefined) {
    for (const [k, v] of Object.entries(metadata)) {
      if (typeof v !== 'string') {
        throw new FormatError(`safetensors metadata "${k}" must be a string, got ${describe(v)}`);
      }
    }
    parts.push(`"__metadata__":${JSON.stringify(metadata)}`);
  }
  let offset = 0;
  for (const { name, t, nbytes } of order) {
    parts.push(
      `${JSON.stringify(name)}:{"dtype":"${t.dtype}","shape":[${t.shape.join(',')}],"data_offsets":[${offset},${offset + nbytes}]}`,
    );
    offset += nbytes;
  }
  const json = Buffer.from(`{${parts.join(',')}}`, 'utf8');
  const padded = Math.ceil(json.byteLength / 8) * 8;
  const out = new Uint8Array(8 + padded);
  new DataView(out.buffer).setBigUint64(0, BigInt(padded), true);
  out.set(json, 8);
  out.fill(0x20, 8 + json.byteLength);
  return { header: out, order, dataLength: offset };
}

function checkProduced(name: string, want: number, got: Uint8Array): Uint8Array {
  if (!(got instanceof Uint8Array) || got.byteLength !== want) {
    throw new ShapeError(
      `tensor "${name}": its data producer returned ${got instanceof Uint8Array ? got.byteLength : typeof got} bytes, expected ${want}`,
    );
  }
  return got;
}

/** Serializes to one buffer, byte-identical to the reference `serialize` (metadata keys in insertion order). */
export function serializeSafetensors(
  tensors: Record<string, TensorSource>,
  metadata?: Record<string, string>,
): Uint8Array {
  const p = plan(tensors, metadata);
  const out = new Uint8Array(p.header.byteLength + p.dataLength);
  out.set(p.header, 0);
  let off = p.header.byteLength;
  for (const { name, t, nbytes } of p.order) {
    const d = typeof t.data === 'function' ? t.data() : t.data;
    if (d instanceof Promise) throw new ShapeError(`tensor "${name}": serializeSafetensors needs synchronous data`);
    out.set(checkProduced(name, nbytes, d), off);
    off += nbytes;
  }
  return out;
}

/** Writes a .safetensors file durably, streaming tensor by tensor (data producers are called one at a time). */
export async function saveSafetensors(
  file: string,
  tensors: Record<string, TensorSource>,
  metadata?: Record<string, string>,
): Promise<void> {
  const p = plan(tensors, metadata);
  await withAtomicFile(file, async (f) => {
    await f.write(p.header);
    for (const { name, t, nbytes } of p.order) {
      const d = typeof t.data === 'function' ? await t.data() : t.data;
      await f.write(checkProduced(name, nbytes, d));
    }
  });
}

/** Synchronous saveSafetensors (data producers must be synchronous). */
export function saveSafetensorsSync(
  file: string,
  tensors: Record<string, TensorSource>,
  metadata?: Record<string, string>,
): void {
  const p = plan(tensors, metadata);
  const f = new AtomicFileSync(file);
  try {
    f.write(p.header);
    for (const { name, t, nbytes } of p.order) {
      const d = typeof t.data === 'function' ? t.data() : t.data;
      if (d instanceof Promise) throw new ShapeError(`tensor "${name}": saveSafetensorsSync needs synchronous data`);
      f.write(checkProduced(name, nbytes, d));
    }
  } catch (e) {
    f.abort();
    throw e;
  }
  f.commit();
}

// ---------------------------------------------------------------------------------------------------------
// Decoding and encoding values

let f16Table: Float32Array | null = null;

/** All 65536 f16 values as f32 (256 KiB, built once): bulk f16 decoding is one lookup per element. */
export function f16LookupTable(): Float32Array {
  if (!f16Table) {
    f16Table = new Float32Array(65536);
    for (let h = 0; h < 65536; h++) f16Table[h] = f16ToF32(h);
  }
  return f16Table;
}

/** Little-endian u16 view of bytes (copies only when the bytes are not 2-aligned). */
function u16View(b: Uint8Array): Uint16Array {
  if (b.byteOffset % 2 === 0) return new Uint16Array(b.buffer, b.byteOffset, b.byteLength >> 1);
  return new Uint16Array(copyBytes(b).buffer);
}

function alignedView<T>(b: Uint8Array, size: number, make: (buf: ArrayBufferLike, off: number, n: number) => T): T {
  if (b.byteOffset % size === 0) return make(b.buffer, b.byteOffset, b.byteLength / size);
  return make(copyBytes(b).buffer, 0, b.byteLength / size);
}

/** f16 bytes -> f32 values. */
export function f16BytesToF32(
  bytes: Uint8Array,
  out: Float32Array = new Float32Array(bytes.byteLength >> 1),
): Float32Array {
  const t = f16LookupTable();
  const u = u16View(bytes);
  for (let i = 0; i < u.length; i++) out[i] = t[u[i]!]!;
  return out;
}

/** bf16 bytes -> f32 values (a bf16 is the top half of an f32). */
export function bf16BytesToF32(
  bytes: Uint8Array,
  out: Float32Array = new Float32Array(bytes.byteLength >> 1),
): Float32Array {
  const u = u16View(bytes);
  const o = new Uint32Array(out.buffer, out.byteOffset, u.length);
  for (let i = 0; i < u.length; i++) o[i] = u[i]! << 16;
  return out;
}

/** float8 e4m3fn (bias 7, no infinities, S.1111.111 is NaN, max 448) -> f32. */
export function f8e4m3ToF32(b: number): number {
  const sign = b & 0x80 ? -1 : 1;
  const e = (b >> 3) & 0xf;
  const m = b & 7;
  if (e === 15 && m === 7) return Number.NaN;
  if (e === 0) return sign * m * 2 ** -9;
  return sign * (1 + m / 8) * 2 ** (e - 7);
}

/** float8 e5m2 (the top byte of an f16) -> f32. */
export function f8e5m2ToF32(b: number): number {
  return f16ToF32(b << 8);
}

/** Decodes any numeric RawTensor to f32 (64-bit integers beyond 2^24 lose precision, as a cast would). */
export function toFloat32(t: RawTensor): Float32Array {
  const b = t.data;
  const n = b.byteLength / ITEM_SIZE[t.dtype];
  switch (t.dtype) {
    case 'F32':
      return alignedView(b, 4, (buf, off, len) => new Float32Array(buf, off, len)).slice();
    case 'F16':
      return f16BytesToF32(b);
    case 'BF16':
      return bf16BytesToF32(b);
    case 'F64':
      return Float32Array.from(alignedView(b, 8, (buf, off, len) => new Float64Array(buf, off, len)));
    case 'F8_E4M3': {
      const out = new Float32Array(n);
      for (let i = 0; i < n; i++) out[i] = f8e4m3ToF32(b[i]!);
      return out;
    }
    case 'F8_E5M2': {
      const out = new Float32Array(n);
      for (let i = 0; i < n; i++) out[i] = f8e5m2ToF32(b[i]!);
      return out;
    }
    case 'I64':
    case 'U64': {
      const v = toBigInt64(t);
      const out = new Float32Array(n);
      for (let i = 0; i < n; i++) out[i] = Number(t.dtype === 'U64' ? BigInt.asUintN(64, v[i]!) : v[i]!);
      return out;
    }
    case 'U32':
      return Float32Array.from(alignedView(b, 4, (buf, off, len) => new Uint32Array(buf, off, len)));
    default:
      return Float32Array.from(toInt32(t));
  }
}

/** Encodes f32 values as an F32, F16 or BF16 RawTensor (round to nearest even). */
export function fromFloat32(
  values: Float32Array | ArrayLike<number>,
  shape: number[],
  dtype: 'F32' | 'F16' | 'BF16' = 'F32',
): RawTensor {
  const n = numelOf(shape);
  if (values.length !== n) {
    throw new ShapeError(`fromFloat32: shape ${fmtShape(shape)} has ${n} elements but ${values.length} values given`);
  }
  if (dtype === 'F32') {
    const f = values instanceof Float32Array ? values.slice() : Float32Array.from(values);
    return { dtype, shape: [...shape], data: new Uint8Array(f.buffer) };
  }
  const u = new Uint16Array(n);
  if (dtype === 'BF16') for (let i = 0; i < n; i++) u[i] = f32ToBf16(values[i]!);
  else for (let i = 0; i < n; i++) u[i] = f32ToF16(values[i]!);
  return { dtype, shape: [...shape], data: new Uint8Array(u.buffer) };
}

/** Decodes a BOOL/U8/I8/I16/U16/I32 tensor (and U32/I64/U64 whose values fit) to Int32Array. */
export function toInt32(t: RawTensor): Int32Array {
  const b = t.data;
  switch (t.dtype) {
    case 'BOOL':
    case 'U8':
      return Int32Array.from(b);
    case 'I8':
      return Int32Array.from(new Int8Array(b.buffer, b.byteOffset, b.byteLength));
    case 'I16':
      return Int32Array.from(alignedView(b, 2, (buf, off, len) => new Int16Array(buf, off, len)));
    case 'U16':
      return Int32Array.from(u16View(b));
    case 'I32':
      return alignedView(b, 4, (buf, off, len) => new Int32Array(buf, off, len)).slice();
    case 'U32': {
      const u = alignedView(b, 4, (buf, off, len) => new Uint32Array(buf, off, len));
      const out = new Int32Array(u.length);
      for (let i = 0; i < u.length; i++) {
        if (u[i]! > 0x7fffffff) throw new DTypeError(`toInt32: U32 value ${u[i]} at index ${i} does not fit int32`);
        out[i] = u[i]!;
      }
      return out;
    }
    case 'I64':
    case 'U64': {
      const v = toBigInt64(t);
      const out = new Int32Array(v.length);
      for (let i = 0; i < v.length; i++) {
        const x = t.dtype === 'U64' ? BigInt.asUintN(64, v[i]!) : v[i]!;
        if (x > 0x7fffffffn || x < -0x80000000n) {
          throw new DTypeError(`toInt32: ${t.dtype} value ${x} at index ${i} does not fit int32`);
        }
        out[i] = Number(x);
      }
      return out;
    }
    default:
      throw new DTypeError(`toInt32: ${t.dtype} is a float dtype; use toFloat32`);
  }
}

/** Raw 64-bit integers (I64 as signed; U64 bit patterns, read them with BigInt.asUintN(64, x)); smaller ints widen. */
export function toBigInt64(t: RawTensor): BigInt64Array {
  if (t.dtype === 'I64' || t.dtype === 'U64') {
    return alignedView(t.data, 8, (buf, off, len) => new BigInt64Array(buf, off, len)).slice();
  }
  const i = toInt32(t);
  const out = new BigInt64Array(i.length);
  for (let k = 0; k < i.length; k++) out[k] = BigInt(i[k]!);
  return out;
}

/** Encodes integers as an I32/I64/I16/I8/U8/BOOL RawTensor. */
export function fromInts(
  values: ArrayLike<number>,
  shape: number[],
  dtype: 'I64' | 'I32' | 'I16' | 'I8' | 'U8' | 'BOOL' = 'I64',
): RawTensor {
  const n = numelOf(shape);
  if (values.length !== n) {
    throw new ShapeError(`fromInts: shape ${fmtShape(shape)} has ${n} elements but ${values.length} values given`);
  }
  let data: Uint8Array;
  if (dtype === 'I64') {
    const a = new BigInt64Array(n);
    for (let i = 0; i < n; i++) a[i] = BigInt(values[i]!);
    data = new Uint8Array(a.buffer);
  } else if (dtype === 'I32') data = new Uint8Array(Int32Array.from(values).buffer);
  else if (dtype === 'I16') data = new Uint8Array(Int16Array.from(values).buffer);
  else if (dtype === 'I8') data = new Uint8Array(Int8Array.from(values).buffer);
  else if (dtype === 'BOOL') data = Uint8Array.from(values, (v) => (v ? 1 : 0));
  else data = Uint8Array.from(values);
  return { dtype, shape: [...shape], data };
}
