// Test-only GGUF metadata reader (header + key/value section, no tensors). It exists so the tokenizer tests
// can read vocabularies before src/formats/gguf.ts lands; delete it once that reader is available.
import { closeSync, openSync, readSync } from 'node:fs';

type Reader = { buf: Buffer; pos: number; need(n: number): void };

function makeReader(path: string): Reader {
  const fd = openSync(path, 'r');
  const chunks: Buffer[] = [];
  const r: Reader = {
    buf: Buffer.alloc(0),
    pos: 0,
    need(n: number) {
      while (r.buf.length - r.pos < n) {
        const chunk = Buffer.alloc(Math.max(1 << 20, n));
        const got = readSync(fd, chunk, 0, chunk.length, null);
        if (got === 0) throw new Error(`${path}: unexpected end of file in GGUF header`);
        chunks.length = 0;
        r.buf = Buffer.concat([r.buf.subarray(r.pos), chunk.subarray(0, got)]);
        r.pos = 0;
      }
    },
  };
  (r as Reader & { close: () => void }).close = () => closeSync(fd);
  return r;
}

function u32(r: Reader): number {
  r.need(4);
  const v = r.buf.readUInt32LE(r.pos);
  r.pos += 4;
  return v;
}
function u64(r: Reader): number {
  r.need(8);
  const v = r.buf.readBigUInt64LE(r.pos);
  r.pos += 8;
  return Number(v);
}
function str(r: Reader): string {
  const n = u64(r);
  r.need(n);
  const s = r.buf.toString('utf8', r.pos, r.pos + n);
  r.pos += n;
  return s;
}

function value(r: Reader, type: number): unknown {
  switch (type) {
    case 0:
      r.need(1);
      return r.buf.readUInt8(r.pos++);
    case 1:
      r.need(1);
      return r.buf.readInt8(r.pos++);
    case 2:
      r.need(2);
      r.pos += 2;
      return r.buf.readUInt16LE(r.pos - 2);
    case 3:
      r.need(2);
      r.pos += 2;
      return r.buf.readInt16LE(r.pos - 2);
    case 4:
      return u32(r);
    case 5:
      r.need(4);
      r.pos += 4;
      return r.buf.readInt32LE(r.pos - 4);
    case 6:
      r.need(4);
      r.pos += 4;
      return r.buf.readFloatLE(r.pos - 4);
    case 7:
      r.need(1);
      return r.buf.readUInt8(r.pos++) !== 0;
    case 8:
      return str(r);
    case 9: {
      const t = u32(r);
      const n = u64(r);
      const out = new Array<unknown>(n);
      for (let i = 0; i < n; i++) out[i] = value(r, t);
      return out;
    }
    case 10:
      return u64(r);
    case 11:
      r.need(8);
      r.pos += 8;
      return Number(r.buf.readBigInt64LE(r.pos - 8));
    case 12:
      r.need(8);
      r.pos += 8;
      return r.buf.readDoubleLE(r.pos - 8);
    default:
      throw new Error(`unknown GGUF value type ${type}`);
  }
}

/** Reads only the metadata key/value pairs of a GGUF file. */
export function readGgufMetadata(path: string): Record<string, unknown> {
  const r = makeReader(path);
  try {
    if (u32(r) !== 0x46554747) throw new Error(`${path}: not a GGUF file (bad magic)`);
    const version = u32(r);
    if (version < 2) throw new Error(`${path}: GGUF version ${version} is not supported`);
    u64(r); // tensor count
    const kvCount = u64(r);
    const meta: Record<string, unknown> = {};
    for (let i = 0; i < kvCount; i++) {
      const key = str(r);
      meta[key] = value(r, u32(r));
    }
    return meta;
  } finally {
    (r as Reader & { close: () => void }).close();
  }
}
