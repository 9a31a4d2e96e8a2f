// Basic layers: Linear, Embedding, RMSNorm. Parameter names follow PyTorch (weight, bias).

import type { DType } from '../core/dtype.ts';
import { globalRng, type Rng } from '../core/rng.ts';
import type { Tensor } from '../core/tensor.ts';
import { empty, randn, uniform } from '../ops/create.ts';
import { embedding } from '../ops/embedding.ts';
import { linear } from '../ops/matmul.ts';
import { rmsnorm } from '../ops/norm.ts';
import { Module } from './module.ts';

export interface LinearOptions {
  bias?: boolean;
  dtype?: DType;
  rng?: Rng;
  /** Skip the random init (weights will be loaded). */
  empty?: boolean;
}

/** y = x W^T + b, W [out, in]. Init as PyTorch's nn.Linear: kaiming-uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)). */
export class Linear extends Module {
  constructor(
    readonly inFeatures: number,
    readonly outFeatures: number,
    opts: LinearOptions = {},
  ) {
    super();
    const bound = 1 / Math.sqrt(inFeatures);
    const dtype = opts.dtype ?? 'f32';
    const w = opts.empty
      ? empty([outFeatures, inFeatures], dtype)
      : uniform([outFeatures, inFeatures], -bound, bound, opts.rng ?? globalRng, dtype);
    this.param('weight', w);
    this.param(
      'bias',
      opts.bias
        ? opts.empty
          ? empty([outFeatures])
          : uniform([outFeatures], -bound, bound, opts.rng ?? globalRng)
        : null,
    );
  }
  get weight(): Tensor {
    return this.getParam('weight')!;
  }
  get bias(): Tensor | null {
    return this.getParam('bias');
  }
  forward(x: Tensor): Tensor {
    return linear(x, this.weight, this.bias);
  }
}

/** A lookup table [num, dim]; init normal(0, 0.02) as HF's initializer_range. */
export class Embedding extends Module {
  constructor(
    readonly numEmbeddings: number,
    readonly dim: number,
    opts: { dtype?: DType; rng?: Rng; std?: number; empty?: boolean } = {},
  ) {
    super();
    const shape = [numEmbeddings, dim];
    const dtype = opts.dtype ?? 'f32';
    this.param(
      'weight',
      opts.empty ? empty(shape, dtype) : randn(shape, { std: opts.std ?? 0.02, rng: opts.rng, dtype }),
    );
  }
  get weight(): Tensor {
    return this.getParam('weight')!;
  }
  forward(ids: Tensor): Tensor {
    return embedding(ids, this.weight);
  }
}

export class RMSNorm extends Module {
  constructor(
    readonly dim: number,
    readonly eps = 1e-6,
    opts: { dtype?: DType } = {},
  ) {
    super();
    const w = empty([dim], opts.dtype ?? 'f32');
    w.data.fill(opts.dtype === 'bf16' ? 0x3f80 : opts.dtype === 'f16' ? 0x3c00 : 1);
    this.param('weight', w);
  }
  get weight(): Tensor {
    return this.getParam('weight')!;
  }
  forward(x: Tensor): Tensor {
    return rmsnorm(x, this.weight, this.eps);
  }
}
