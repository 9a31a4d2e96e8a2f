// Writing models: an HF dir (config.json + model.safetensors, streamed tensor by tensor, written atomically)
// and random-init presets (`lowrank init-model`).

import { copyFileSync, existsSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { type DType, encodeScalar } from '../core/dtype.ts';
import { Rng } from '../core/rng.ts';
import type { Tensor } from '../core/tensor.ts';
import { writeFileAtomic } from '../formats/atomic.ts';
import { saveSafetensors, type TensorSource } from '../formats/safetensors.ts';
import { configFromHF, configToHF, type ModelConfig, PRESETS } from './config.ts';
import { LlamaForCausalLM } from './llama.ts';
import { SAFETENSORS_OF, tensorBytes } from './weights.ts';

const TORCH_DTYPE: Record<string, string> = { f32: 'float32', bf16: 'bfloat16', f16: 'float16' };

/** A safetensors source for a tensor, converted to dtype on demand (one tensor in memory at a time). */
export function tensorSource(t: Tensor, dtype: DType = t.dtype): TensorSource {
  return {
    dtype: SAFETENSORS_OF[dtype],
    shape: [...t.shape],
    data: () => {
      if (dtype === t.dtype) return tensorBytes(t);
      const v = t.toF32();
      const out = dtype === 'f32' ? v : new Uint16Array(v.length);
      if (dtype !== 'f32') for (let i = 0; i < v.length; i++) out[i] = encodeScalar(dtype, v[i]!);
      return new Uint8Array(out.buffer, out.byteOffset, out.byteLength);
    },
  };
}

/** Writes weights (named as transformers names them) and config.json into dir. */
export async function saveModelHF(
  tensors: Iterable<[string, Tensor]>,
  config: ModelConfig,
  dir: string,
  opts: { dtype?: DType; tokenizerFrom?: string } = {},
): Promise<void> {
  mkdirSync(dir, { recursive: true });
  const sources: Record<string, TensorSource> = {};
  let dtype: DType = 'f32';
  for (const [name, t] of tensors) {
    sources[name] = tensorSource(t, opts.dtype ?? t.dtype);
    dtype = opts.dtype ?? t.dtype;
  }
  await saveSafetensors(join(dir, 'model.safetensors'), sources, { format: 'pt' });
  const cfg = configToHF({ ...config, torch_dtype: TORCH_DTYPE[dtype] ?? 'float32' });
  await writeFileAtomic(join(dir, 'config.json'), `${JSON.stringify(cfg, null, 2)}\n`);
  if (opts.tokenizerFrom) copyTokenizerFiles(opts.tokenizerFrom, dir);
}

export const TOKENIZER_FILES = [
  'tokenizer.json',
  'tokenizer_config.json',
  'special_tokens_map.json',
  'chat_template.jinja',
  'generation_config.json',
];

export function copyTokenizerFiles(from: string, to: string): void {
  for (const f of TOKENIZER_FILES) if (existsSync(join(from, f))) copyFileSync(join(from, f), join(to, f));
}

export function presetConfig(name: string): ModelConfig {
  const p = PRESETS[name];
  if (!p) throw new Error(`unknown preset '${name}' (choose one of ${Object.keys(PRESETS).join(', ')})`);
  return configFromHF(p, `preset ${name}`);
}

/** A random-init model of a preset's shape (HF Llama init: normal(0, 0.02) weights, unit norms). */
export function initModel(config: ModelConfig, seed = 0, dtype: DType = 'f32'): LlamaForCausalLM {
  const rng = new Rng(seed);
  const model = new LlamaForCausalLM(config, { dtype, rng });
  return model;
}
