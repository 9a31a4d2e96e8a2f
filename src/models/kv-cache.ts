// KV cache: per layer, K and V stored [B, Hkv, capacity, D] and seen through views [B, T, Hkv, D]
// (positionsView). Decoding writes the new positions in place and attends over a view of the first `length`
// positions (no copies of the past).
//
// The cache holds f32 or bf16. 'auto' (the default, vLLM's kv_cache_dtype) stores a bf16 model's keys and
// values in bf16, as transformers keeps them for a bf16 model: half the bytes a decoding step reads per
// position and half the memory per token, each value rounded to nearest even as it is written (the k and v
// rows themselves are computed in f32). Attention widens them exactly; the native kernels read bf16 rows in
// place. Any other model (f32 or f16 weights, a 4-bit base computing in f32) keeps f32.

import { getBackend } from '../backend/index.ts';
import { itemSize } from '../core/dtype.ts';
import { ShapeError } from '../core/errors.ts';
import type { Tensor } from '../core/tensor.ts';
import { empty } from '../ops/create.ts';
import type { ModelConfig } from './config.ts';
import type { LlamaForCausalLM } from './llama.ts';

/** What a KV cache stores. */
export type KvDtype = 'f32' | 'bf16';
/** A KV cache dtype as options take it: 'auto' is the model's (bf16 for a bf16 model, else f32). */
export type KvDtypeOption = 'auto' | KvDtype;
export const KV_DTYPES: readonly KvDtypeOption[] = ['auto', 'f32', 'bf16'];

/**
 * The dtype a cache for `model` stores under `option`. 'auto' goes by the final norm's weight, which loading
 * casts with every other weight and no adapter wraps (an embedding adapter does wrap embed_tokens).
 */
export function resolveKvDtype(model: LlamaForCausalLM, option: KvDtypeOption = 'auto'): KvDtype {
  if (option !== 'auto') return option;
  return model.inner.getChild('norm')?.getParam('weight')?.dtype === 'bf16' ? 'bf16' : 'f32';
}

/** Bytes of K and V per token (every layer) in a cache of `dtype`. */
export function kvBytesPerToken(cfg: ModelConfig, dtype: KvDtype = 'f32'): number {
  return cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * itemSize(dtype);
}

/**
 * Positions [t0, t0 + T) of a cache stored [B, H, capacity, D], seen as [B, T, H, D] (the layout attention and
 * the model use). Stored head-major, each kv head's keys are contiguous, which attention's task for one kv head
 * streams instead of picking D of every H * D values.
 */
export function positionsView(store: Tensor, t0: number, T: number): Tensor {
  const [B, H, , D] = store.shape as [number, number, number, number];
  return store.view([B, T, H, D], [store.strides[0]!, D, store.strides[1]!, 1], store.offset + t0 * D);
}

export class KVCache {
  readonly k: Tensor[] = [];
  readonly v: Tensor[] = [];
  /** Positions filled so far (the same for every row; padded rows are masked). */
  length = 0;

  constructor(
    cfg: ModelConfig,
    readonly batch: number,
    readonly capacity: number,
    readonly dtype: KvDtype = 'f32',
  ) {
    for (let l = 0; l < cfg.num_hidden_layers; l++) {
      this.k.push(empty([batch, cfg.num_key_value_heads, capacity, cfg.head_dim], dtype));
      this.v.push(empty([batch, cfg.num_key_value_heads, capacity, cfg.head_dim], dtype));
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
    const kd = positionsView(K, this.length, T);
    const vd = positionsView(V, this.length, T);
    b.copy(k, kd);
    b.copy(v, vd);
    kd.dispose();
    vd.dispose();
    return { k: positionsView(K, 0, end), v: positionsView(V, 0, end) };
  }

  /** Bytes held. */
  get bytes(): number {
    return this.k.reduce((s, t) => s + t.size, 0) * 2 * itemSize(this.dtype);
  }

  dispose(): void {
    for (const t of [...this.k, ...this.v]) t.dispose();
  }
}
