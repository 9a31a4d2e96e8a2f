// Small models and comparisons shared by the PEFT tests.

import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { Rng } from '../../src/core/rng.ts';
import { tidy } from '../../src/core/scope.ts';
import { configFromHF } from '../../src/models/config.ts';
import { LlamaForCausalLM } from '../../src/models/llama.ts';
import { intTensor } from '../../src/ops/create.ts';
import { noGrad } from '../../src/ops/tape.ts';

export const SHARED = fileURLToPath(new URL('../../../shared/', import.meta.url));
export const STORIES = `${SHARED}models/stories260K/stories260K.gguf`;

/** false when the path exists, else the reason to skip (printed). */
export function skipUnlessExists(path: string, what: string): false | string {
  if (existsSync(path)) return false;
  const reason = `${what} absent: ${path}`;
  console.log(`# skipping: ${reason}`);
  return reason;
}

export function tinyConfig(over: Record<string, unknown> = {}) {
  return configFromHF({
    model_type: 'llama',
    vocab_size: 48,
    hidden_size: 16,
    intermediate_size: 24,
    num_hidden_layers: 2,
    num_attention_heads: 4,
    num_key_value_heads: 2,
    max_position_embeddings: 64,
    rms_norm_eps: 1e-5,
    tie_word_embeddings: false,
    ...over,
  });
}

/** A random tiny Llama (weights of std ~0.1 so LoRA deltas are visible). */
export function tinyModel(seed = 1, over: Record<string, unknown> = {}): LlamaForCausalLM {
  return new LlamaForCausalLM(tinyConfig(over), { rng: new Rng(seed) });
}

export const IDS = [
  [3, 7, 1, 12, 40, 5],
  [9, 2, 33, 4, 4, 17],
];

/** Logits [B, T, V] as a host array. */
export function logitsOf(model: LlamaForCausalLM, ids: number[][] = IDS, adapterRows?: unknown): Float32Array {
  return noGrad(() =>
    tidy(() => {
      const B = ids.length;
      const T = ids[0]!.length;
      const pos = intTensor(
        ids.flatMap(() => Array.from({ length: T }, (_, i) => i)),
        [B, T],
      );
      return model.forward(intTensor(ids.flat(), [B, T]), { positions: pos, adapterRows }).toF32();
    }),
  );
}

export function maxRelDiff(a: Float32Array, b: Float32Array): number {
  assert.equal(a.length, b.length);
  let m = 0;
  let scale = 0;
  for (let i = 0; i < b.length; i++) scale = Math.max(scale, Math.abs(b[i]!));
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]! - b[i]!));
  return m / (scale || 1);
}

export function maxAbsDiff(a: Float32Array, b: Float32Array): number {
  assert.equal(a.length, b.length);
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]! - b[i]!));
  return m;
}

/** Fills every adapter B (and A) with random values so the adapter changes the output. */
export function randomizeAdapters(
  params: Iterable<[string, import('../../src/core/tensor.ts').Tensor]>,
  seed = 5,
  std = 0.2,
): void {
  const rng = new Rng(seed);
  for (const [n, p] of params) {
    if (!/lora_(A|B|embedding_A|embedding_B)\b/.test(n)) continue;
    const d = p.data as Float32Array;
    for (let i = 0; i < d.length; i++) d[p.offset + i] = std * rng.normal();
  }
}
