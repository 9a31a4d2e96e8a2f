// Writing quantized models as transformers does (save_pretrained of a bitsandbytes model):
//  - 4-bit: every Linear4bit as the bnb-4bit tensors of bnb-serialize.ts (packed weight, absmax, quant_map,
//    nested parts, the quant_state JSON blob), everything else in its dtype; config.json carries
//    "quantization_config" and is written as json.dumps(indent=2, sort_keys=True) would write it.
//  - 8-bit (LLM.int8()): streamed tensor by tensor from a source checkpoint, each decoder-layer Linear as
//    bitsandbytes' Linear8bitLt state dict: "P.weight" int8 [out, in], "P.SCB" f32 [out] (row absmax) and
//    "P.weight_format" u8 scalar 0 ("row"), as Linear8bitLt._save_to_state_dict writes them.
// Files are written atomically (temp file, fsync, rename).

import { existsSync, mkdirSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import type { DType } from '../core/dtype.ts';
import { ConfigError, FormatError, fmtShape } from '../core/errors.ts';
import { writeFileAtomic } from '../formats/atomic.ts';
import { readGguf } from '../formats/gguf.ts';
import {
  openSafetensors,
  openSafetensorsIndex,
  type RawTensor,
  type SafetensorsReader,
  saveSafetensors,
  type TensorSource,
  toFloat32,
} from '../formats/safetensors.ts';
import { configFromGguf, configFromHF, configToHF, type ModelConfig } from '../models/config.ts';
import { ggufToHFName, resolveModelPath, unpermuteRope } from '../models/load.ts';
import { copyTokenizerFiles, tensorSource } from '../models/save.ts';
import { DTYPE_OF } from '../models/weights.ts';
import type { Module } from '../nn/module.ts';
import { isDoubleQuant } from './blockwise4.ts';
import {
  BNB_CONFIG_FLOAT_KEYS,
  type BnbQuantizationConfig,
  bnbQuantizationConfig,
  type QuantStorage,
  toBnb4bitTensors,
} from './bnb-serialize.ts';
import { quantizeInt8Rowwise } from './int8.ts';
import { DEFAULT_SKIP_MODULES, isSkippedModule, Linear4bit } from './linear4bit.ts';
import { pyJsonDumps } from './pyjson.ts';

const TORCH_DTYPE: Record<string, string> = { f32: 'float32', bf16: 'bfloat16', f16: 'float16' };

/** config.json keys whose values Python writes as floats (so 10000 prints as 10000.0, 1e-5 as 1e-05). */
export const CONFIG_FLOAT_KEYS: ReadonlySet<string> = new Set([
  ...BNB_CONFIG_FLOAT_KEYS,
  'rms_norm_eps',
  'rope_theta',
  'factor',
  'low_freq_factor',
  'high_freq_factor',
  'partial_rotary_factor',
]);

/** config.json text as transformers writes it: json.dumps(indent=2, sort_keys=True) + "\n". */
export function configJsonText(config: ModelConfig, quantizationConfig: BnbQuantizationConfig | null): string {
  const cfg: Record<string, unknown> = configToHF(config);
  if (quantizationConfig) cfg.quantization_config = quantizationConfig;
  return `${pyJsonDumps(cfg, { indent: 2, sortKeys: true, floatKeys: CONFIG_FLOAT_KEYS })}\n`;
}

/** The quantization_config describing a model's Linear4bit layers (transformers' defaults elsewhere). */
export function bnbConfigForModel(model: Module, skipModules: string[] | null = null): BnbQuantizationConfig {
  let first: Linear4bit | null = null;
  for (const [, m] of model.namedModules()) {
    if (m instanceof Linear4bit) {
      first = m;
      break;
    }
  }
  if (!first) throw new ConfigError('saveModelQuantized: the model has no 4-bit layers (run quantizeModel first)');
  return bnbQuantizationConfig({
    loadIn4bit: true,
    quantType: first.quantType,
    doubleQuant: first.doubleQuant,
    computeDtype: first.computeDtype,
    skipModules,
  });
}

export interface SaveQuantizedOptions {
  /** Written into config.json; default bnbConfigForModel(model). */
  quantizationConfig?: BnbQuantizationConfig;
  /** Storage dtype of the packed weights; default the config's bnb_4bit_quant_storage (uint8). */
  quantStorage?: QuantStorage;
  /** Copy tokenizer files from this HF dir. */
  tokenizerFrom?: string;
}

/**
 * Saves a model holding Linear4bit layers as a transformers bnb-4bit checkpoint: model.safetensors (key for
 * key and byte for byte the layout transformers writes) and config.json with quantization_config.
 * Tensors are produced one at a time while the file is written.
 */
export async function saveModelQuantized(
  model: Module,
  config: ModelConfig,
  dir: string,
  opts: SaveQuantizedOptions = {},
): Promise<void> {
  const qc = opts.quantizationConfig ?? bnbConfigForModel(model);
  const storage = opts.quantStorage ?? (qc.bnb_4bit_quant_storage as QuantStorage);
  mkdirSync(dir, { recursive: true });
  const sources: Record<string, TensorSource> = {};
  const owned = new Set<string>();
  let denseDtype: DType | null = null;
  for (const [prefix, m] of model.namedModules()) {
    if (!(m instanceof Linear4bit)) continue;
    for (const [n] of m.namedParameters(prefix)) owned.add(n);
    // Shapes and dtypes now; the bytes (a copy of this layer's parts) only when the writer asks.
    const layout = toBnb4bitTensors(prefix, m.quantState(), { quantStorage: storage });
    for (const [key, t] of Object.entries(layout)) {
      sources[key] = {
        dtype: t.dtype,
        shape: t.shape,
        data: () => toBnb4bitTensors(prefix, m.quantState(), { quantStorage: storage })[key]!.data,
      };
    }
    if (m.bias) sources[`${prefix}.bias`] = tensorSource(m.bias);
  }
  for (const [name, p] of model.namedParameters()) {
    if (owned.has(name)) continue;
    sources[name] = tensorSource(p);
    if (name.endsWith('embed_tokens.weight')) denseDtype = p.dtype;
  }
  await saveSafetensors(join(dir, 'model.safetensors'), sources, { format: 'pt' });
  const torchDtype = TORCH_DTYPE[denseDtype ?? 'f32'] ?? 'float32';
  await writeFileAtomic(join(dir, 'config.json'), configJsonText({ ...config, torch_dtype: torchDtype }, qc));
  if (opts.tokenizerFrom) copyTokenizerFiles(opts.tokenizerFrom, dir);
}

/** Summary of what a saved 4-bit model holds (for the CLI). */
export function quantizedSummary(model: Module): { layers: number; quantizedBytes: number; doubleQuant: boolean } {
  let layers = 0;
  let bytes = 0;
  let dq = false;
  for (const [, m] of model.namedModules()) {
    if (m instanceof Linear4bit) {
      layers++;
      bytes += m.quantizedBytes();
      dq ||= isDoubleQuant(m.quantState().absmax);
    }
  }
  return { layers, quantizedBytes: bytes, doubleQuant: dq };
}

// ---------------------------------------------------------------------------------------------------------
// LLM.int8() checkpoints

export interface Int8SaveOptions {
  /** Modules kept in their dtype; default ['lm_head']. */
  skipModules?: readonly string[];
  /** Copy tokenizer files from the source (when it is an HF dir); default true. */
  copyTokenizer?: boolean;
}

interface RawSource {
  names: string[];
  info(name: string): { dtype: RawTensor['dtype']; shape: number[] };
  read(name: string): RawTensor;
  close(): void;
  config: ModelConfig;
  dir: string | null;
}

function openRawSource(path: string): RawSource {
  if (statSync(path).isDirectory()) {
    const file = join(path, 'config.json');
    if (!existsSync(file)) throw new ConfigError(`${path}: no config.json (is this a Hugging Face model dir?)`);
    let json: Record<string, unknown>;
    try {
      json = JSON.parse(readFileSync(file, 'utf8'));
    } catch (e) {
      throw new ConfigError(`${file}: invalid JSON: ${(e as Error).message}`);
    }
    if (json.quantization_config)
      throw new ConfigError(`${file}: the model is already quantized; quantize a 16- or 32-bit checkpoint`);
    const config = configFromHF(json, file);
    let r: SafetensorsReader;
    if (existsSync(join(path, 'model.safetensors.index.json'))) r = openSafetensorsIndex(path);
    else if (existsSync(join(path, 'model.safetensors'))) r = openSafetensors(join(path, 'model.safetensors'));
    else throw new FormatError(`${path}: no model.safetensors or model.safetensors.index.json`);
    return {
      names: r.names(),
      info: (n) => r.info(n),
      read: (n) => r.read(n),
      close: () => r.close(),
      config,
      dir: path,
    };
  }
  const g = readGguf(path);
  const meta = g.metadata as Record<string, unknown>;
  const config = configFromGguf(meta, path);
  const byHF = new Map<string, (typeof g.tensors)[number]>();
  for (const t of g.tensors) {
    const hf = ggufToHFName(t.name);
    if (!hf) {
      g.close();
      throw new FormatError(`${path}: unexpected tensor '${t.name}' for a ${config.architecture} model`);
    }
    byHF.set(hf, t);
  }
  config.tie_word_embeddings = !byHF.has('lm_head.weight');
  const permuted = config.architecture === 'llama' || config.architecture === 'mistral';
  return {
    names: [...byHF.keys()],
    info: (n) => ({ dtype: 'F32', shape: [...byHF.get(n)!.shape] }),
    read: (n) => {
      const info = byHF.get(n)!;
      const shape = [...info.shape];
      let v = g.readTensorF32(info);
      if (permuted && n.endsWith('self_attn.q_proj.weight'))
        v = unpermuteRope(v, shape[0]!, shape[1]!, config.num_attention_heads);
      else if (permuted && n.endsWith('self_attn.k_proj.weight'))
        v = unpermuteRope(v, shape[0]!, shape[1]!, config.num_key_value_heads);
      return { dtype: 'F32', shape, data: new Uint8Array(v.buffer, v.byteOffset, v.byteLength) };
    },
    close: () => g.close(),
    config,
    dir: null,
  };
}

const LINEAR_WEIGHT = /^model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)\.weight$/;

/**
 * Writes an LLM.int8() checkpoint of `source` (HF dir or .gguf) to `dir`, as transformers saves a model
 * loaded with load_in_8bit: each decoder-layer Linear as int8 weight + SCB + weight_format, the rest in its
 * dtype, config.json with quantization_config {load_in_8bit: true}. Streams: one tensor in memory at a time.
 */
export async function saveInt8Checkpoint(source: string, dir: string, opts: Int8SaveOptions = {}): Promise<number> {
  const path = await resolveModelPath(source);
  const src = openRawSource(path);
  const skip = opts.skipModules ?? DEFAULT_SKIP_MODULES;
  try {
    mkdirSync(dir, { recursive: true });
    const sources: Record<string, TensorSource> = {};
    let count = 0;
    let embDtype: DType = 'f32';
    for (const name of src.names) {
      const raw0 = () => src.read(name);
      const module = name.slice(0, name.lastIndexOf('.'));
      if (LINEAR_WEIGHT.test(name) && !isSkippedModule(module, skip)) {
        // Shapes come from the config: [out, in] of the projection.
        const shape = linearShape(src.config, name);
        const values = () => {
          const raw = raw0();
          if (raw.shape.length !== 2 || raw.shape[0] !== shape[0] || raw.shape[1] !== shape[1])
            throw new FormatError(
              `${path}: tensor '${name}' has shape ${fmtShape(raw.shape)}, expected ${fmtShape(shape)}`,
            );
          return toFloat32(raw);
        };
        sources[name] = {
          dtype: 'I8',
          shape,
          data: () => {
            const q = quantizeInt8Rowwise(values(), shape[0]!, shape[1]!);
            return new Uint8Array(q.int8.buffer, q.int8.byteOffset, q.int8.byteLength);
          },
        };
        sources[`${module}.SCB`] = {
          dtype: 'F32',
          shape: [shape[0]!],
          data: () => {
            const v = values();
            const scb = new Float32Array(shape[0]!);
            for (let r = 0; r < shape[0]!; r++) {
              let m = 0;
              for (let c = 0; c < shape[1]!; c++) {
                const a = Math.abs(v[r * shape[1]! + c]!);
                if (a > m) m = a;
              }
              scb[r] = m;
            }
            return new Uint8Array(scb.buffer);
          },
        };
        sources[`${module}.weight_format`] = { dtype: 'U8', shape: [], data: new Uint8Array([0]) };
        count++;
        continue;
      }
      const info = src.info(name);
      if (name === 'model.embed_tokens.weight') embDtype = DTYPE_OF[info.dtype] ?? 'f32';
      sources[name] = { dtype: info.dtype, shape: info.shape, data: () => src.read(name).data };
    }
    if (count === 0) throw new FormatError(`${path}: no decoder-layer linear weights to quantize`);
    await saveSafetensors(join(dir, 'model.safetensors'), sources, { format: 'pt' });
    const qc = bnbQuantizationConfig({
      loadIn8bit: true,
      skipModules: opts.skipModules ? [...opts.skipModules] : null,
    });
    const config = { ...src.config, torch_dtype: TORCH_DTYPE[embDtype] ?? 'float32' };
    await writeFileAtomic(join(dir, 'config.json'), configJsonText(config, qc));
    if ((opts.copyTokenizer ?? true) && src.dir) copyTokenizerFiles(src.dir, dir);
    return count;
  } finally {
    src.close();
  }
}

function linearShape(c: ModelConfig, name: string): [number, number] {
  const h = c.hidden_size;
  const q = c.num_attention_heads * c.head_dim;
  const kv = c.num_key_value_heads * c.head_dim;
  const I = c.intermediate_size;
  const mod = /\.(\w+_proj)\.weight$/.exec(name)![1]!;
  const shapes: Record<string, [number, number]> = {
    q_proj: [q, h],
    k_proj: [kv, h],
    v_proj: [kv, h],
    o_proj: [h, q],
    gate_proj: [I, h],
    up_proj: [I, h],
    down_proj: [h, I],
  };
  return shapes[mod]!;
}
