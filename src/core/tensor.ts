// Tensor: a typed, strided view of a Storage, with autograd fields and explicit lifetime.
// Data lives wherever the storage lives; reading it back to the host is explicit (toF32, toArray, item).

import type { AnyTypedArray, DType } from './dtype.ts';
import { allocTyped, readScalar, toF32 } from './dtype.ts';
import { fmtShape, LifetimeError, ShapeError } from './errors.ts';
import { type Disposable, track } from './scope.ts';
import { CpuStorage, type Device, type Storage } from './storage.ts';

export type Shape = readonly number[];

export function numel(shape: Shape): number {
  let n = 1;
  for (const d of shape) n *= d;
  return n;
}

export function contiguousStrides(shape: Shape): number[] {
  const s = new Array<number>(shape.length);
  let acc = 1;
  for (let i = shape.length - 1; i >= 0; i--) {
    s[i] = acc;
    acc *= shape[i]!;
  }
  return s;
}

export function sameShape(a: Shape, b: Shape): boolean {
  return a.length === b.length && a.every((d, i) => d === b[i]);
}

export function checkShape(op: string, shape: Shape): void {
  for (const d of shape)
    if (!Number.isInteger(d) || d < 0) throw new ShapeError(`${op}: invalid shape ${fmtShape(shape)}`);
}

/** One recorded operation on the autograd tape. */
export interface GradNode {
  readonly op: string;
  /** The op's inputs; null where an input is not a tensor or needs no gradient. */
  readonly inputs: readonly (Tensor | null)[];
  /**
   * Given the gradient of the output (contiguous f32, the output's shape), returns one gradient per input
   * (null where not needed). `needs[i]` says whether input i wants a gradient: a frozen weight gets none
   * computed at all.
   */
  backward(gradOut: Tensor, needs: readonly boolean[]): (Tensor | null)[];
  /** Frees what was saved for backward. */
  release(): void;
}

let nextId = 1;

export class Tensor implements Disposable {
  readonly id = nextId++;
  readonly shape: Shape;
  readonly strides: readonly number[];
  readonly offset: number;
  readonly dtype: DType;
  private _storage: Storage | null;
  requiresGrad = false;
  grad: Tensor | null = null;
  gradFn: GradNode | null = null;
  kept = false;
  name?: string;

  constructor(storage: Storage, shape: Shape, strides?: readonly number[], offset = 0) {
    this._storage = storage;
    this.shape = Object.freeze([...shape]);
    this.strides = Object.freeze(strides ? [...strides] : contiguousStrides(shape));
    this.offset = offset;
    this.dtype = storage.dtype;
    track(this);
  }

  /** Wraps host data (no copy) as a CPU tensor; the tensor owns the array from now on. */
  static fromTyped(data: AnyTypedArray, shape: Shape, dtype?: DType): Tensor {
    const dt: DType =
      dtype ??
      (data instanceof Float32Array
        ? 'f32'
        : data instanceof Int32Array
          ? 'i32'
          : data instanceof Uint8Array
            ? 'u8'
            : 'bf16');
    checkShape('fromTyped', shape);
    if (numel(shape) !== data.length)
      throw new ShapeError(`fromTyped: ${data.length} values do not fill shape ${fmtShape(shape)}`);
    return new Tensor(new CpuStorage(dt, data), shape);
  }

  get storage(): Storage {
    if (!this._storage) throw new LifetimeError(`tensor ${this.describe()} used after dispose()`);
    return this._storage;
  }
  get device(): Device {
    return this.storage.device;
  }
  get disposed(): boolean {
    return this._storage === null;
  }
  get ndim(): number {
    return this.shape.length;
  }
  get size(): number {
    return numel(this.shape);
  }
  /** Host data of a CPU tensor (the whole storage; index with offset and strides). */
  get data(): AnyTypedArray {
    const s = this.storage;
    if (!(s instanceof CpuStorage)) throw new LifetimeError('tensor.data is only for CPU tensors; use toF32()');
    return s.data;
  }

  isContiguous(): boolean {
    let acc = 1;
    for (let i = this.shape.length - 1; i >= 0; i--) {
      if (this.shape[i] !== 1 && this.strides[i] !== acc) return false;
      acc *= this.shape[i]!;
    }
    return true;
  }

  /** A new tensor handle on the same storage (shares memory, holds its own reference). */
  view(shape: Shape, strides: readonly number[], offset: number): Tensor {
    return new Tensor(this.storage.retain(), shape, strides, offset);
  }

  /** Drops this handle's reference; storage is freed when the last one goes. Idempotent. */
  dispose(): void {
    if (!this._storage) return;
    this._storage.release();
    this._storage = null;
    if (this.grad) {
      this.grad.dispose();
      this.grad = null;
    }
    if (this.gradFn) {
      this.gradFn.release();
      this.gradFn = null;
    }
  }

  /**
   * Releases this handle's storage now but keeps its place on the autograd tape (the node that made it still
   * runs in backward, from what it saved). For intermediates that nothing reads again: forward passes free
   * them as they go, so a step's peak holds only what backward needs.
   */
  free(): void {
    if (!this._storage) return;
    this._storage.release();
    this._storage = null;
  }

  describe(): string {
    return `${this.name ? `${this.name} ` : ''}${fmtShape(this.shape)} ${this.dtype}`;
  }

  /** Copies the values out as f32 in row-major order (host memory). */
  toF32(): Float32Array {
    const s = this.storage;
    if (!(s instanceof CpuStorage)) throw new LifetimeError('toF32 on a non-CPU tensor needs the backend');
    const n = this.size;
    if (this.isContiguous()) {
      const slice = s.data.subarray(this.offset, this.offset + n);
      return toF32(this.dtype, slice);
    }
    const out = new Float32Array(n);
    forEachIndex(this.shape, this.strides, this.offset, (src, dst) => {
      out[dst] = readScalar(this.dtype, s.data, src);
    });
    return out;
  }

  /** Copies the raw elements out (no conversion) in row-major order. */
  toTyped(): AnyTypedArray {
    const s = this.storage;
    if (!(s instanceof CpuStorage)) throw new LifetimeError('toTyped on a non-CPU tensor needs the backend');
    const n = this.size;
    if (this.isContiguous()) return s.data.slice(this.offset, this.offset + n);
    const out = allocTyped(this.dtype, n);
    forEachIndex(this.shape, this.strides, this.offset, (src, dst) => {
      out[dst] = s.data[src]!;
    });
    return out;
  }

  toArray(): number[] {
    return Array.from(this.toF32());
  }

  item(): number {
    if (this.size !== 1) throw new ShapeError(`item: tensor ${fmtShape(this.shape)} has ${this.size} elements, not 1`);
    const s = this.storage;
    if (!(s instanceof CpuStorage)) return this.toF32()[0]!;
    return readScalar(this.dtype, s.data, this.offset);
  }

  toString(): string {
    return `Tensor(${this.describe()})`;
  }
}

/** Calls f(sourceIndex, destIndex) for every element of a strided view, in row-major order. */
export function forEachIndex(
  shape: Shape,
  strides: readonly number[],
  offset: number,
  f: (src: number, dst: number) => void,
): void {
  const nd = shape.length;
  const n = numel(shape);
  if (n === 0) return;
  if (nd === 0) {
    f(offset, 0);
    return;
  }
  const idx = new Array<number>(nd).fill(0);
  let src = offset;
  const last = nd - 1;
  const lastDim = shape[last]!;
  const lastStride = strides[last]!;
  for (let dst = 0; dst < n; ) {
    for (let j = 0; j < lastDim; j++) f(src + j * lastStride, dst++);
    // advance the outer index
    let d = last - 1;
    while (d >= 0) {
      idx[d]!++;
      src += strides[d]!;
      if (idx[d]! < shape[d]!) break;
      src -= strides[d]! * shape[d]!;
      idx[d] = 0;
      d--;
    }
    if (d < 0) break;
  }
}
