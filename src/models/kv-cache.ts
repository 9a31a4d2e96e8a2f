// KV cache: per layer, K and V of shape [B, capacity, Hkv, D]. Decoding writes the new positions in place
// and attends over a view of the first `length` positions (no copies of the past).

import { getBackend } from '../backend/index.ts';
import { ShapeError } from '../core/errors.ts';
import type { Tensor } from '../core/tensor.ts';
import { empty } from '../ops/create.ts';
import type { ModelConfig } from './config.ts';

export class KVCache {
  readonly k: Tensor[] = [];
  readonly v: Tensor[] = [];
  /** Positions filled so far (the same for every row; padded rows are masked). */
  length = 0;

  constructor(
    cfg: ModelConfig,
    readonly batch: number,
    readonly capacity: number,
  ) {
    for (let l = 0; l < cfg.num_hidden_layers; l++) {
      this.k.push(empty([batch, capacity, cfg.num_key_value_heads, cfg.head_dim]));
      this.v.push(empty([batch, capacity, cfg.num_key_value_heads, cfg.head_dim]));
    }
  }

  /** Writes k, v [B, T, Hkv, D] of layer l at positions [length, length+T) and returns views of [0, length+T). */
  append(l: number, k: Tensor, v: Tensor): { k: Tensor; v: Tensor } {
    const T = k.shape[1]!;
    const end = this.length + T;
    if (end > this.capacity) throw new ShapeError(`KV cache: ${end} positions exceed its capacity ${this.capacity}`);
    const K = this.k[l]!;
    const V = this.v[l]!;
    const b = getBackend();
    const sh = [this.batch, T, K.shape[2]!, K.shape[3]!];
    const kd = K.view(sh, K.strides, this.length * K.strides[1]!);
    const vd = V.view(sh, V.strides, this.length * V.strides[1]!);
    b.copy(k, kd);
    b.copy(v, vd);
    kd.dispose();
    vd.dispose();
    const full = [this.batch, end, K.shape[2]!, K.shape[3]!];
    return { k: K.view(full, K.strides, 0), v: V.view(full, V.strides, 0) };
  }

  /** Bytes held. */
  get bytes(): number {
    return this.k.reduce((s, t) => s + t.size * 4, 0) * 2;
  }

  dispose(): void {
    for (const t of [...this.k, ...this.v]) t.dispose();
  }
}
