// Durable writes (DESIGN decision 8): write a temp file in the same folder, fsync it, rename it over the
// target, then fsync the folder so the rename itself survives a crash. A reader sees either the old file or
// the complete new one, never a torn write; a failed write leaves the old file untouched and removes the temp.

import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';

/** What writeFileAtomic accepts: bytes, text (UTF-8), or chunks produced one after another (sync or async). */
export type AtomicData = Uint8Array | string | Iterable<Uint8Array> | AsyncIterable<Uint8Array>;

export interface AtomicOptions {
  /** File mode for a new file (default 0o666 minus the umask, as fs.writeFile). */
  mode?: number;
}

/** Temp file name next to the target: hidden, unique per process and call, recognisable for cleanup. */
function tempPathFor(target: string): string {
  const dir = path.dirname(target);
  const base = path.basename(target);
  return path.join(dir, `.${base}.${process.pid}.${randomBytes(6).toString('hex')}.tmp`);
}

/** fsync a folder so a rename in it is durable. Some platforms (Windows) cannot open folders: then skip. */
function fsyncDirSync(dir: string): void {
  let fd: number;
  try {
    fd = fs.openSync(dir, 'r');
  } catch {
    return;
  }
  try {
    fs.fsyncSync(fd);
  } catch {
    // EINVAL/EPERM on file systems without directory fsync: the rename is still atomic.
  } finally {
    fs.closeSync(fd);
  }
}

async function fsyncDir(dir: string): Promise<void> {
  let h: fsp.FileHandle;
  try {
    h = await fsp.open(dir, 'r');
  } catch {
    return;
  }
  try {
    await h.sync();
  } catch {
    // see fsyncDirSync
  } finally {
    await h.close();
  }
}

function writeAllSync(fd: number, bytes: Uint8Array): void {
  let off = 0;
  while (off < bytes.byteLength) {
    // Positional writes are capped at 2 GiB per call on some platforms.
    const n = fs.writeSync(fd, bytes, off, Math.min(bytes.byteLength - off, 0x7fff0000));
    off += n;
  }
}

async function writeAll(h: fsp.FileHandle, bytes: Uint8Array): Promise<void> {
  let off = 0;
  while (off < bytes.byteLength) {
    const { bytesWritten } = await h.write(bytes, off, Math.min(bytes.byteLength - off, 0x7fff0000));
    off += bytesWritten;
  }
}

function toBytes(s: string): Uint8Array {
  return Buffer.from(s, 'utf8');
}

/**
 * A file being written through a temp file. Write chunks in order, then commit() (fsync + rename + folder
 * fsync) or abort() (remove the temp). Use withAtomicFile() unless you need the handle's lifetime yourself.
 */
export class AtomicFile {
  readonly target: string;
  readonly tempPath: string;
  private handle: fsp.FileHandle | null;
  private written = 0;

  private constructor(target: string, tempPath: string, handle: fsp.FileHandle) {
    this.target = target;
    this.tempPath = tempPath;
    this.handle = handle;
  }

  static async open(target: string, opts: AtomicOptions = {}): Promise<AtomicFile> {
    const abs = path.resolve(target);
    const tmp = tempPathFor(abs);
    const handle = await fsp.open(tmp, 'wx', opts.mode ?? 0o666);
    return new AtomicFile(abs, tmp, handle);
  }

  /** Bytes written so far. */
  get bytesWritten(): number {
    return this.written;
  }

  async write(chunk: Uint8Array | string): Promise<void> {
    if (!this.handle) throw new Error(`AtomicFile ${this.target}: write after commit or abort`);
    const bytes = typeof chunk === 'string' ? toBytes(chunk) : chunk;
    await writeAll(this.handle, bytes);
    this.written += bytes.byteLength;
  }

  async commit(): Promise<void> {
    const h = this.handle;
    if (!h) throw new Error(`AtomicFile ${this.target}: commit after commit or abort`);
    this.handle = null;
    try {
      await h.sync();
      await h.close();
      await fsp.rename(this.tempPath, this.target);
    } catch (e) {
      await h.close().catch(() => {});
      await fsp.rm(this.tempPath, { force: true });
      throw e;
    }
    await fsyncDir(path.dirname(this.target));
  }

  async abort(): Promise<void> {
    const h = this.handle;
    if (!h) return;
    this.handle = null;
    await h.close().catch(() => {});
    await fsp.rm(this.tempPath, { force: true });
  }
}

/** Synchronous twin of AtomicFile (for code paths that cannot await, such as process exit handlers). */
export class AtomicFileSync {
  readonly target: string;
  readonly tempPath: string;
  private fd: number | null;
  private written = 0;

  constructor(target: string, opts: AtomicOptions = {}) {
    this.target = path.resolve(target);
    this.tempPath = tempPathFor(this.target);
    this.fd = fs.openSync(this.tempPath, 'wx', opts.mode ?? 0o666);
  }

  get bytesWritten(): number {
    return this.written;
  }

  write(chunk: Uint8Array | string): void {
    if (this.fd === null) throw new Error(`AtomicFileSync ${this.target}: write after commit or abort`);
    const bytes = typeof chunk === 'string' ? toBytes(chunk) : chunk;
    writeAllSync(this.fd, bytes);
    this.written += bytes.byteLength;
  }

  commit(): void {
    const fd = this.fd;
    if (fd === null) throw new Error(`AtomicFileSync ${this.target}: commit after commit or abort`);
    this.fd = null;
    try {
      fs.fsyncSync(fd);
      fs.closeSync(fd);
      fs.renameSync(this.tempPath, this.target);
    } catch (e) {
      try {
        fs.closeSync(fd);
      } catch {
        // already closed
      }
      fs.rmSync(this.tempPath, { force: true });
      throw e;
    }
    fsyncDirSync(path.dirname(this.target));
  }

  abort(): void {
    const fd = this.fd;
    if (fd === null) return;
    this.fd = null;
    try {
      fs.closeSync(fd);
    } catch {
      // already closed
    }
    fs.rmSync(this.tempPath, { force: true });
  }
}

/**
 * Streams a file durably: `fn` writes chunks through the AtomicFile; when it resolves the file is committed,
 * when it throws the temp file is removed and the target is left as it was.
 */
export async function withAtomicFile<T>(
  target: string,
  fn: (file: AtomicFile) => Promise<T>,
  opts: AtomicOptions = {},
): Promise<T> {
  const file = await AtomicFile.open(target, opts);
  let result: T;
  try {
    result = await fn(file);
  } catch (e) {
    await file.abort();
    throw e;
  }
  await file.commit();
  return result;
}

/** Writes `data` to `target` durably (temp file, fsync, rename, folder fsync). */
export async function writeFileAtomic(target: string, data: AtomicData, opts: AtomicOptions = {}): Promise<void> {
  await withAtomicFile(
    target,
    async (f) => {
      if (typeof data === 'string' || data instanceof Uint8Array) {
        await f.write(data);
      } else if (Symbol.asyncIterator in data) {
        for await (const chunk of data as AsyncIterable<Uint8Array>) await f.write(chunk);
      } else {
        for (const chunk of data as Iterable<Uint8Array>) await f.write(chunk);
      }
    },
    opts,
  );
}

/** Synchronous writeFileAtomic (bytes, text, or a sync iterable of chunks). */
export function writeFileAtomicSync(
  target: string,
  data: Uint8Array | string | Iterable<Uint8Array>,
  opts: AtomicOptions = {},
): void {
  const f = new AtomicFileSync(target, opts);
  try {
    if (typeof data === 'string' || data instanceof Uint8Array) f.write(data);
    else for (const chunk of data) f.write(chunk);
  } catch (e) {
    f.abort();
    throw e;
  }
  f.commit();
}
