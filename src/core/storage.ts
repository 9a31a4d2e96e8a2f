// Storage: the reference-counted memory behind tensors. Views share one Storage; it is freed when the last
// tensor (or saved-for-backward reference) lets go. Device memory never waits for the garbage collector.

import { totalmem } from 'node:os';
import type { AnyTypedArray, DType } from './dtype.ts';
import { allocTyped, itemSize, typedOver } from './dtype.ts';
import { LifetimeError } from './errors.ts';

export type Device = 'cpu' | 'cuda';

const stats = { liveBytes: 0, peakBytes: 0, liveStorages: 0, allocations: 0 };

/** Bytes held by live storages (all devices), the peak since the last reset, and counts. */
export function memoryStats(): Readonly<typeof stats> {
  return { ...stats };
}
export function resetPeakMemory(): void {
  stats.peakBytes = stats.liveBytes;
}

export abstract class Storage {
  private refs = 1;
  readonly bytes: number;

  constructor(
    readonly device: Device,
    readonly dtype: DType,
    readonly length: number,
  ) {
    this.bytes = length * itemSize(dtype);
    stats.liveBytes += this.bytes;
    stats.liveStorages++;
    stats.allocations++;
    if (stats.liveBytes > stats.peakBytes) stats.peakBytes = stats.liveBytes;
  }

  get alive(): boolean {
    return this.refs > 0;
  }

  retain(): this {
    if (this.refs <= 0) throw new LifetimeError('storage used after it was freed');
    this.refs++;
    return this;
  }

  release(): void {
    if (this.refs <= 0) return;
    if (--this.refs === 0) {
      stats.liveBytes -= this.bytes;
      stats.liveStorages--;
      this.free();
    }
  }

  protected abstract free(): void;
}

/** Host memory: a typed array (f32: Float32Array; bf16/f16: Uint16Array bit patterns; i32; u8). */
export class CpuStorage extends Storage {
  private _data: AnyTypedArray | null;

  /** recycle: the memory came from allocCpu and goes back to its pool when freed (see allocCpu). */
  constructor(
    dtype: DType,
    data: AnyTypedArray,
    private readonly recycle = false,
  ) {
    super('cpu', dtype, data.length);
    this._data = data;
  }

  get data(): AnyTypedArray {
    if (!this._data) throw new LifetimeError('tensor data used after dispose()');
    return this._data;
  }

  protected free(): void {
    if (this.recycle && this._data) pool.put(this._data.buffer as ArrayBuffer);
    this._data = null;
  }
}

/**
 * Freed host buffers kept for reuse, by size. A new ArrayBuffer is zeroed by the OS one page fault at a time
 * as a kernel first writes it (about 1 ms per 6 MB here, three times the kernel's own work), and the old one
 * is only returned when the garbage collector runs; a training step allocates the same few sizes over and
 * over, so reusing them (zeroed with fill(0)) saves both. Only memory that allocCpu made is recycled, never
 * an array a caller handed to Tensor.fromTyped. LOWRANK_POOL_MB caps the bytes held (default: a quarter of the
 * machine's memory; 0 = off). The cap must hold a step's transient buffers: at 512 MB, 135m LoRA's 200 MB logits
 * gradient was a fresh buffer every step, and its first write alone (page faults) took 240-470 ms of a 5 s step.
 */
class BufferPool {
  private readonly free = new Map<number, ArrayBuffer[]>();
  private held = 0;
  private readonly cap = Math.max(0, Number(process.env.LOWRANK_POOL_MB ?? totalmem() / 4 / 2 ** 20)) * 2 ** 20;
  static readonly MIN_BYTES = 1 << 16;

  put(buf: ArrayBuffer): void {
    const n = buf.byteLength;
    if (n < BufferPool.MIN_BYTES || this.held + n > this.cap) return;
    let list = this.free.get(n);
    if (!list) this.free.set(n, (list = []));
    list.push(buf);
    this.held += n;
  }

  take(bytes: number): ArrayBuffer | null {
    const list = this.free.get(bytes);
    for (let buf = list?.pop(); buf; buf = list!.pop()) {
      this.held -= bytes;
      // a buffer transferred to another thread since (postMessage) is detached: its length reads 0
      if (buf.byteLength === bytes) return buf;
    }
    return null;
  }

  clear(): void {
    this.free.clear();
    this.held = 0;
  }
}

const pool = new BufferPool();

/** Drops the buffers kept for reuse (they go to the garbage collector). */
export function clearBufferPool(): void {
  pool.clear();
}

/**
 * A host storage of n elements, from the pool when a buffer of the size is there: zeroed, unless zero is false
 * (then a recycled buffer keeps its old contents, for an output the caller writes whole).
 */
export function allocCpu(dtype: DType, n: number, zero = true): CpuStorage {
  const bytes = n * itemSize(dtype);
  const buf = bytes >= BufferPool.MIN_BYTES ? pool.take(bytes) : null;
  if (!buf) return new CpuStorage(dtype, allocTyped(dtype, n), true);
  if (zero) new Uint8Array(buf).fill(0);
  return new CpuStorage(dtype, typedOver(dtype, buf), true);
}
