// The TypeScript reference backend: every kernel family's reference implementation in one object.

import type { Backend } from '../backend.ts';
import { jsActivationKernels } from './js-activation.ts';
import { jsAttentionKernels } from './js-attention.ts';
import { jsCoreKernels } from './js-core.ts';
import { jsDropoutKernels } from './js-dropout.ts';
import { jsEmbeddingKernels } from './js-embedding.ts';
import { jsLoraKernels } from './js-lora.ts';
import { jsLossKernels } from './js-loss.ts';
import { jsNormKernels } from './js-norm.ts';
import { jsOptimKernels } from './js-optim.ts';
import { jsQuantKernels } from './js-quant.ts';
import { jsRopeKernels } from './js-rope.ts';

export const jsBackend: Backend = {
  ...jsCoreKernels,
  ...jsRopeKernels,
  ...jsAttentionKernels,
  ...jsNormKernels,
  ...jsActivationKernels,
  ...jsLossKernels,
  ...jsEmbeddingKernels,
  ...jsDropoutKernels,
  ...jsOptimKernels,
  ...jsQuantKernels,
  ...jsLoraKernels,
};
