// Storage: the reference-counted memory behind tensors. Views share one Storage; it is freed when the last
// tensor (or saved-for-backward reference) lets go. Device memory never waits for the garbage collector.

import type { AnyTypedArray, DType } from './dtype.ts';
import { itemSize } from './dtype.ts';
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

  constructor(dtype: DType, data: AnyTypedArray) {
    super('cpu', dtype, data.length);
    this._data = data;
  }

  get data(): AnyTypedArray {
    if (!this._data) throw new LifetimeError('tensor data used after dispose()');
    return this._data;
  }

  protected free(): void {
    this._data = null;
  }
}
