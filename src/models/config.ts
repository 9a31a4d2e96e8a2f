// The Llama-family model config (llama, mistral, qwen2, qwen3), parsed from HF config.json or GGUF metadata,
// and the presets of ../shared/anchors.md used for tests and benchmarks.

import { ConfigError } from '../core/errors.ts';
import { type RopeConfig, ropeConfigFromHF } from '../ops/rope.ts';

export type Architecture = 'llama' | 'mistral' | 'qwen2' | 'qwen3';

export interface ModelConfig {
  architecture: Architecture;
  vocab_size: number;
  hidden_size: number;
  intermediate_size: number;
  num_hidden_layers: number;
  num_attention_heads: number;
  num_key_value_heads: number;
  head_dim: number;
  rms_norm_eps: number;
  rope_theta: number;
  /** rope_scaling as config.json has it (kept for writing it back), null when plain RoPE. */
  rope_scaling: Record<string, unknown> | null;
  /** Rotary dims per head (head_dim unless partial_rotary_factor < 1). */
  rotary_dim: number;
  /** The rotary settings as the rope op takes them (theta, head and rotary dims, scaling). */
  rope: RopeConfig;
  max_position_embeddings: number;
  tie_word_embeddings: boolean;
  /** q/k/v projections have biases (qwen2). */
  attention_bias: boolean;
  /** RMSNorm on q and k per head (qwen3). */
  qk_norm: boolean;
  hidden_act: 'silu' | 'gelu' | 'gelu_pytorch_tanh';
  bos_token_id: number | null;
  eos_token_id: number | number[] | null;
  pad_token_id: number | null;
  torch_dtype: string;
}

const ARCH_BY_MODEL_TYPE: Record<string, Architecture> = {
  llama: 'llama',
  mistral: 'mistral',
  qwen2: 'qwen2',
  qwen3: 'qwen3',
};

function num(src: string, obj: Record<string, unknown>, key: string, fallback?: number): number {
  const v = obj[key];
  if (v === undefined || v === null) {
    if (fallback !== undefined) return fallback;
    throw new ConfigError(`${src}: missing required field '${key}'`);
  }
  if (typeof v !== 'number' || !Number.isFinite(v))
    throw new ConfigError(`${src}: field '${key}' must be a number, got ${JSON.stringify(v)}`);
  return v;
}

function posInt(src: string, obj: Record<string, unknown>, key: string, fallback?: number): number {
  const v = num(src, obj, key, fallback);
  if (!Number.isInteger(v) || v <= 0)
    throw new ConfigError(`${src}: field '${key}' must be a positive integer, got ${v}`);
  return v;
}

/** Parses a Hugging Face config.json object. `src` names the file for error messages. */
export function configFromHF(json: Record<string, unknown>, src = 'config.json'): ModelConfig {
  const mt = json.model_type;
  if (typeof mt !== 'string' || !(mt in ARCH_BY_MODEL_TYPE))
    throw new ConfigError(
      `${src}: model_type ${JSON.stringify(mt)} is not supported (supported: ${Object.keys(ARCH_BY_MODEL_TYPE).join(', ')})`,
    );
  const architecture = ARCH_BY_MODEL_TYPE[mt]!;
  const hidden = posInt(src, json, 'hidden_size');
  const heads = posInt(src, json, 'num_attention_heads');
  const kv = posInt(src, json, 'num_key_value_heads', heads);
  if (heads % kv !== 0)
    throw new ConfigError(`${src}: num_attention_heads (${heads}) must be a multiple of num_key_value_heads (${kv})`);
  const headDim = posInt(src, json, 'head_dim', Math.floor(hidden / heads));
  const rope = ropeConfigFromHF({ ...json, head_dim: headDim });
  const act = (json.hidden_act ?? 'silu') as string;
  if (act !== 'silu' && act !== 'gelu' && act !== 'gelu_pytorch_tanh')
    throw new ConfigError(`${src}: hidden_act '${act}' is not supported (silu, gelu, gelu_pytorch_tanh)`);
  const eos = json.eos_token_id;
  return {
    architecture,
    vocab_size: posInt(src, json, 'vocab_size'),
    hidden_size: hidden,
    intermediate_size: posInt(src, json, 'intermediate_size'),
    num_hidden_layers: posInt(src, json, 'num_hidden_layers'),
    num_attention_heads: heads,
    num_key_value_heads: kv,
    head_dim: headDim,
    rms_norm_eps: num(src, json, 'rms_norm_eps', 1e-6),
    rope_theta: rope.theta,
    rope_scaling: rope.scaling ? (json.rope_scaling as Record<string, unknown>) : null,
    rotary_dim: rope.rotaryDim ?? headDim,
    rope,
    max_position_embeddings: posInt(src, json, 'max_position_embeddings', 2048),
    tie_word_embeddings: json.tie_word_embeddings === true,
    attention_bias: json.attention_bias === true || architecture === 'qwen2',
    qk_norm: architecture === 'qwen3',
    hidden_act: act,
    bos_token_id: typeof json.bos_token_id === 'number' ? json.bos_token_id : null,
    eos_token_id: typeof eos === 'number' || Array.isArray(eos) ? (eos as number | number[]) : null,
    pad_token_id: typeof json.pad_token_id === 'number' ? json.pad_token_id : null,
    torch_dtype:
      typeof json.torch_dtype === 'string' ? json.torch_dtype : typeof json.dtype === 'string' ? json.dtype : 'float32',
  };
}

/** The config.json that transformers writes for this config. */
export function configToHF(c: ModelConfig): Record<string, unknown> {
  const modelType = c.architecture;
  const archClass = {
    llama: 'LlamaForCausalLM',
    mistral: 'MistralForCausalLM',
    qwen2: 'Qwen2ForCausalLM',
    qwen3: 'Qwen3ForCausalLM',
  }[modelType];
  const out: Record<string, unknown> = {
    architectures: [archClass],
    model_type: modelType,
    vocab_size: c.vocab_size,
    hidden_size: c.hidden_size,
    intermediate_size: c.intermediate_size,
    num_hidden_layers: c.num_hidden_layers,
    num_attention_heads: c.num_attention_heads,
    num_key_value_heads: c.num_key_value_heads,
    head_dim: c.head_dim,
    hidden_act: c.hidden_act,
    max_position_embeddings: c.max_position_embeddings,
    rms_norm_eps: c.rms_norm_eps,
    rope_theta: c.rope_theta,
    rope_scaling: c.rope_scaling,
    tie_word_embeddings: c.tie_word_embeddings,
    attention_bias: c.attention_bias,
    bos_token_id: c.bos_token_id,
    eos_token_id: c.eos_token_id,
    pad_token_id: c.pad_token_id,
    torch_dtype: c.torch_dtype,
  };
  if (c.rotary_dim !== c.head_dim) out.partial_rotary_factor = c.rotary_dim / c.head_dim;
  return out;
}

/** Maps GGUF llama-architecture metadata onto the same config. */
export function configFromGguf(meta: Record<string, unknown>, src = 'model.gguf'): ModelConfig {
  const arch = meta['general.architecture'];
  if (typeof arch !== 'string') throw new ConfigError(`${src}: general.architecture is missing`);
  const supported: Record<string, Architecture> = {
    llama: 'llama',
    mistral: 'mistral',
    qwen2: 'qwen2',
    qwen3: 'qwen3',
  };
  const a = supported[arch as string];
  if (!a) throw new ConfigError(`${src}: architecture '${arch}' is not supported (llama, mistral, qwen2, qwen3)`);
  const k = (name: string) => `${arch}.${name}`;
  const g = (name: string, fallback?: number) => {
    const v = meta[k(name)];
    if (v === undefined) {
      if (fallback !== undefined) return fallback;
      throw new ConfigError(`${src}: metadata key '${k(name)}' is missing`);
    }
    return Number(v);
  };
  const hidden = g('embedding_length');
  const heads = g('attention.head_count');
  const kv = g('attention.head_count_kv', heads);
  const headDim = g('attention.key_length', Math.floor(hidden / heads));
  const tokens = meta['tokenizer.ggml.tokens'];
  const vocab = g('vocab_size', Array.isArray(tokens) ? tokens.length : undefined);
  const scalingType = meta[k('rope.scaling.type')];
  const factor = scalingType === 'linear' ? g('rope.scaling.factor') : 0;
  const rope_scaling = scalingType === 'linear' ? { rope_type: 'linear', factor } : null;
  const rotary = g('rope.dimension_count', headDim);
  const rope: RopeConfig = {
    theta: g('rope.freq_base', 10000),
    headDim,
    rotaryDim: rotary,
    scaling: scalingType === 'linear' ? { type: 'linear', factor } : null,
  };
  const ctx = g('context_length', 2048);
  const eos = meta['tokenizer.ggml.eos_token_id'];
  const bos = meta['tokenizer.ggml.bos_token_id'];
  return {
    architecture: a,
    vocab_size: vocab,
    hidden_size: hidden,
    intermediate_size: g('feed_forward_length'),
    num_hidden_layers: g('block_count'),
    num_attention_heads: heads,
    num_key_value_heads: kv,
    head_dim: headDim,
    rms_norm_eps: g('attention.layer_norm_rms_epsilon', 1e-5),
    rope_theta: rope.theta,
    rope_scaling,
    rotary_dim: rotary,
    rope,
    max_position_embeddings: ctx,
    tie_word_embeddings: false, // decided by the loader: true when output.weight is absent
    attention_bias: a === 'qwen2',
    qk_norm: a === 'qwen3',
    hidden_act: 'silu',
    bos_token_id: typeof bos === 'number' ? bos : null,
    eos_token_id: typeof eos === 'number' ? eos : null,
    pad_token_id: validId(meta['tokenizer.ggml.padding_token_id'], vocab),
    torch_dtype: 'float32',
  };
}

/** Shapes from ../shared/anchors.md (random-init models for tests and benchmarks). */
export const PRESETS: Record<string, Record<string, unknown>> = {
  tiny: {
    model_type: 'llama',
    vocab_size: 8192,
    hidden_size: 256,
    intermediate_size: 688,
    num_hidden_layers: 8,
    num_attention_heads: 8,
    num_key_value_heads: 4,
    max_position_embeddings: 2048,
    rms_norm_eps: 1e-5,
    rope_theta: 10000,
    tie_word_embeddings: true,
    bos_token_id: 1,
    eos_token_id: 2,
  },
  small: {
    model_type: 'llama',
    vocab_size: 8192,
    hidden_size: 512,
    intermediate_size: 1376,
    num_hidden_layers: 8,
    num_attention_heads: 8,
    num_key_value_heads: 4,
    max_position_embeddings: 2048,
    rms_norm_eps: 1e-5,
    rope_theta: 10000,
    tie_word_embeddings: true,
    bos_token_id: 1,
    eos_token_id: 2,
  },
  '135m': {
    model_type: 'llama',
    vocab_size: 49152,
    hidden_size: 576,
    intermediate_size: 1536,
    num_hidden_layers: 30,
    num_attention_heads: 9,
    num_key_value_heads: 3,
    max_position_embeddings: 8192,
    rms_norm_eps: 1e-5,
    rope_theta: 100000,
    tie_word_embeddings: true,
    bos_token_id: 1,
    eos_token_id: 2,
  },
};

/** A token id from metadata, or null when absent or out of range (GGUF writes u32 -1 for "none"). */
function validId(v: unknown, vocab: number): number | null {
  return typeof v === 'number' && Number.isInteger(v) && v >= 0 && v < vocab ? v : null;
}
