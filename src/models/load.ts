// Loading models: a Hugging Face model dir (config.json + safetensors, sharded or not), a .gguf file, or
// hf://owner/repo[/file] through the Hugging Face cache. Tensors stream one at a time into their final
// dtype and place.

import { existsSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import type { DType } from '../core/dtype.ts';
import { ConfigError, FormatError } from '../core/errors.ts';
import type { Tensor } from '../core/tensor.ts';
import { readGguf } from '../formats/gguf.ts';
import { isHubUri, resolveHubUri } from '../formats/hub.ts';
import { openSafetensors, openSafetensorsIndex, type SafetensorsReader } from '../formats/safetensors.ts';
import { noGrad } from '../ops/tape.ts';
import { configFromGguf, configFromHF, type ModelConfig } from './config.ts';
import { LlamaForCausalLM } from './llama.ts';
import { DTYPE_OF, fillFromF32, fillFromRaw } from './weights.ts';

export interface LoadOptions {
  /** Weight dtype in memory: 'auto' keeps the checkpoint's float dtype (f32 for GGUF, dequantized). */
  dtype?: DType | 'auto';
  onProgress?: (done: number, total: number, name: string) => void;
}

export interface LoadedModel {
  model: LlamaForCausalLM;
  config: ModelConfig;
  /** What was loaded: the local dir or .gguf path. */
  path: string;
  kind: 'hf' | 'gguf';
  /** GGUF metadata (tokenizer lives there), when kind is gguf. */
  ggufMetadata?: Record<string, unknown>;
}

/** Resolves a model argument to a local path (downloading hf:// sources into the HF cache). */
export async function resolveModelPath(source: string): Promise<string> {
  if (isHubUri(source)) return resolveHubUri(source);
  if (!existsSync(source))
    throw new ConfigError(`model '${source}' does not exist (give a model dir, a .gguf file or hf://owner/repo)`);
  return source;
}

export async function loadModel(source: string, opts: LoadOptions = {}): Promise<LoadedModel> {
  const path = await resolveModelPath(source);
  if (statSync(path).isDirectory()) return loadHFDir(path, opts);
  if (path.endsWith('.gguf')) return loadGgufModel(path, opts);
  throw new ConfigError(`model '${source}': expected a model dir (with config.json) or a .gguf file`);
}

function openWeights(dir: string): SafetensorsReader {
  if (existsSync(join(dir, 'model.safetensors.index.json'))) return openSafetensorsIndex(dir);
  const single = join(dir, 'model.safetensors');
  if (existsSync(single)) return openSafetensors(single);
  throw new FormatError(
    `${dir}: no model.safetensors or model.safetensors.index.json (only safetensors weights are read)`,
  );
}

/** config.json of a model dir as an object; ConfigError naming the file when absent or not a JSON object. */
export function readConfigJson(dir: string): { file: string; json: Record<string, unknown> } {
  const file = join(dir, 'config.json');
  if (!existsSync(file)) throw new ConfigError(`${dir}: no config.json (is this a Hugging Face model dir?)`);
  let json: unknown;
  try {
    json = JSON.parse(readFileSync(file, 'utf8'));
  } catch (e) {
    throw new ConfigError(`${file}: invalid JSON: ${(e as Error).message}`);
  }
  if (json === null || typeof json !== 'object' || Array.isArray(json))
    throw new ConfigError(`${file}: expected a JSON object`);
  return { file, json: json as Record<string, unknown> };
}

export function readHFConfig(dir: string): ModelConfig {
  const { file, json } = readConfigJson(dir);
  return configFromHF(json, file);
}

export async function loadHFDir(dir: string, opts: LoadOptions = {}): Promise<LoadedModel> {
  const config = readHFConfig(dir);
  const reader = openWeights(dir);
  try {
    let dtype: DType = opts.dtype && opts.dtype !== 'auto' ? opts.dtype : 'f32';
    if (!opts.dtype || opts.dtype === 'auto') {
      const first = reader.names().find((n) => n.endsWith('.weight'));
      const dt = first ? DTYPE_OF[reader.info(first).dtype] : undefined;
      if (dt === 'bf16' || dt === 'f16' || dt === 'f32') dtype = dt;
    }
    const model = new LlamaForCausalLM(config, { dtype, empty: true });
    const params = [...model.namedParameters()];
    let done = 0;
    noGrad(() => {
      for (const [name, p] of params) {
        if (!reader.has(name)) throw new FormatError(`${reader.path}: missing tensor '${name}'`);
        fillFromRaw(p, reader.read(name), `${reader.path}: tensor '${name}'`);
        opts.onProgress?.(++done, params.length, name);
      }
    });
    return { model, config, path: dir, kind: 'hf' };
  } finally {
    reader.close();
  }
}

/** GGUF tensor name -> HF parameter name, for the llama family. */
export function ggufToHFName(name: string): string | null {
  const fixed: Record<string, string> = {
    'token_embd.weight': 'model.embed_tokens.weight',
    'output_norm.weight': 'model.norm.weight',
    'output.weight': 'lm_head.weight',
  };
  if (fixed[name]) return fixed[name]!;
  const m = /^blk\.(\d+)\.(\w+)\.(weight|bias)$/.exec(name);
  if (!m) return null;
  const map: Record<string, string> = {
    attn_norm: 'input_layernorm',
    ffn_norm: 'post_attention_layernorm',
    attn_q: 'self_attn.q_proj',
    attn_k: 'self_attn.k_proj',
    attn_v: 'self_attn.v_proj',
    attn_output: 'self_attn.o_proj',
    attn_q_norm: 'self_attn.q_norm',
    attn_k_norm: 'self_attn.k_norm',
    ffn_gate: 'mlp.gate_proj',
    ffn_up: 'mlp.up_proj',
    ffn_down: 'mlp.down_proj',
  };
  const part = map[m[2]!];
  return part ? `model.layers.${m[1]}.${part}.${m[3]}` : null;
}

export function hfToGgufName(name: string): string | null {
  const fixed: Record<string, string> = {
    'model.embed_tokens.weight': 'token_embd.weight',
    'model.norm.weight': 'output_norm.weight',
    'lm_head.weight': 'output.weight',
  };
  if (fixed[name]) return fixed[name]!;
  const m = /^model\.layers\.(\d+)\.(.+)\.(weight|bias)$/.exec(name);
  if (!m) return null;
  const map: Record<string, string> = {
    input_layernorm: 'attn_norm',
    post_attention_layernorm: 'ffn_norm',
    'self_attn.q_proj': 'attn_q',
    'self_attn.k_proj': 'attn_k',
    'self_attn.v_proj': 'attn_v',
    'self_attn.o_proj': 'attn_output',
    'self_attn.q_norm': 'attn_q_norm',
    'self_attn.k_norm': 'attn_k_norm',
    'mlp.gate_proj': 'ffn_gate',
    'mlp.up_proj': 'ffn_up',
    'mlp.down_proj': 'ffn_down',
  };
  const part = map[m[2]!];
  return part ? `blk.${m[1]}.${part}.${m[3]}` : null;
}

/**
 * llama.cpp stores llama/mistral q and k weights with each head's rows reordered for its interleaved rope
 * (HF row s*hd/2 + j becomes row 2j + s). These map between the two orders.
 */
export function unpermuteRope(w: Float32Array, rows: number, cols: number, heads: number): Float32Array {
  return permuteRows(w, rows, cols, heads, false);
}
export function permuteRope(w: Float32Array, rows: number, cols: number, heads: number): Float32Array {
  return permuteRows(w, rows, cols, heads, true);
}
function permuteRows(w: Float32Array, rows: number, cols: number, heads: number, toGguf: boolean): Float32Array {
  const hd = rows / heads;
  const half = hd / 2;
  const out = new Float32Array(w.length);
  for (let h = 0; h < heads; h++)
    for (let j = 0; j < half; j++)
      for (let s = 0; s < 2; s++) {
        const hfRow = h * hd + s * half + j;
        const ggRow = h * hd + 2 * j + s;
        const [from, to] = toGguf ? [hfRow, ggRow] : [ggRow, hfRow];
        out.set(w.subarray(from * cols, (from + 1) * cols), to * cols);
      }
  return out;
}

export async function loadGgufModel(path: string, opts: LoadOptions = {}): Promise<LoadedModel> {
  const g = readGguf(path);
  try {
    const meta = g.metadata as Record<string, unknown>;
    const config = configFromGguf(meta, path);
    const names = new Set(g.tensors.map((t) => t.name));
    config.tie_word_embeddings = !names.has('output.weight');
    const dtype: DType = opts.dtype && opts.dtype !== 'auto' ? opts.dtype : 'f32';
    const model = new LlamaForCausalLM(config, { dtype, empty: true });
    const params = new Map<string, Tensor>(model.namedParameters());
    const permuted = config.architecture === 'llama' || config.architecture === 'mistral';
    let done = 0;
    const seen = new Set<string>();
    noGrad(() => {
      for (const info of g.tensors) {
        const hf = ggufToHFName(info.name);
        if (!hf) throw new FormatError(`${path}: unexpected tensor '${info.name}' for a ${config.architecture} model`);
        const p = params.get(hf);
        if (!p) throw new FormatError(`${path}: tensor '${info.name}' (${hf}) has no place in the model`);
        if (info.shape.join() !== p.shape.join())
          throw new FormatError(
            `${path}: tensor '${info.name}' has shape [${info.shape}] but the model expects [${p.shape}]`,
          );
        let vals = g.readTensorF32(info);
        if (permuted && /attn_q\.weight$/.test(info.name))
          vals = unpermuteRope(vals, p.shape[0]!, p.shape[1]!, config.num_attention_heads);
        else if (permuted && /attn_k\.weight$/.test(info.name))
          vals = unpermuteRope(vals, p.shape[0]!, p.shape[1]!, config.num_key_value_heads);
        fillFromF32(p, vals);
        seen.add(hf);
        opts.onProgress?.(++done, g.tensors.length, hf);
      }
    });
    for (const name of params.keys())
      if (!seen.has(name)) throw new FormatError(`${path}: no tensor for '${hfToGgufName(name) ?? name}' (${name})`);
    return { model, config, path, kind: 'gguf', ggufMetadata: meta };
  } finally {
    g.close();
  }
}
