// Loading 4-bit models, as transformers' from_pretrained(..., quantization_config=BitsAndBytesConfig(...)):
//  - quantize on load: a plain HF model dir (any float dtype, sharded or not) or a .gguf file, read layer by
//    layer; every decoder-layer Linear weight is quantized as soon as it is read, so the full-precision
//    model never exists in memory (peak: the 4-bit model + one raw tensor + one layer's norms);
//  - a pre-quantized bitsandbytes dir (config.json with quantization_config, the bnb-4bit tensors of
//    src/quant/bnb-serialize.ts): the quant states are read as they are, bit for bit;
//  - an LLM.int8() dir (load_in_8bit: "P.weight" int8 + "P.SCB"): dequantized to dense Linears.
// Malformed quant states raise FormatError naming the file and the tensor.

import { existsSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { type DType, fromF32 } from '../core/dtype.ts';
import { ConfigError, FormatError, fmtShape } from '../core/errors.ts';
import type { Tensor } from '../core/tensor.ts';
import { readGguf } from '../formats/gguf.ts';
import {
  openSafetensors,
  openSafetensorsIndex,
  type RawTensor,
  type SafetensorsReader,
  toFloat32,
} from '../formats/safetensors.ts';
import { configFromGguf, configFromHF, type ModelConfig } from '../models/config.ts';
import { LlamaDecoderLayer, LlamaForCausalLM } from '../models/llama.ts';
import {
  ggufToHFName,
  hfToGgufName,
  type LoadedModel,
  readConfigJson,
  resolveModelPath,
  unpermuteRope,
} from '../models/load.ts';
import { DTYPE_OF, fillFromF32, fillFromRaw } from '../models/weights.ts';
import { Linear } from '../nn/layers.ts';
import { type Module, ModuleList } from '../nn/module.ts';
import { empty } from '../ops/create.ts';
import { noGrad } from '../ops/tape.ts';
import { type QuantState4bit, quantize4bit } from './blockwise4.ts';
import {
  type BnbQuantizationConfig,
  type RawTensor as BnbRawTensor,
  fromBnb4bitTensors,
  parseBnbQuantizationConfig,
} from './bnb-serialize.ts';
import { dequantizeInt8Rowwise } from './int8.ts';
import {
  COMPUTE_DTYPES,
  type ComputeDtype,
  DEFAULT_SKIP_MODULES,
  isSkippedModule,
  Linear4bit,
  type QuantizeLinearOptions,
} from './linear4bit.ts';

const QS_MARKER = '.weight.quant_state.bitsandbytes__';

export interface LoadQuantizedOptions {
  /**
   * torch_dtype: 'auto' (default) keeps the checkpoint's float dtype; otherwise the dense weights are held in
   * this dtype and the quantized ones are cast to it before quantization (their quant state records it).
   */
  dtype?: DType | 'auto';
  /** 4-bit block size when quantizing on load (transformers always uses 64); default 64. */
  blocksize?: number;
  onProgress?: (done: number, total: number, name: string) => void;
}

export interface LoadedQuantizedModel extends LoadedModel {
  /** The quantization_config in effect (the checkpoint's own for a pre-quantized dir), normalized. */
  quantizationConfig: BnbQuantizationConfig;
  /** True when the weights were read already quantized. */
  prequantized: boolean;
  /** Names of the Linear4bit modules. */
  quantizedModules: string[];
}

/** BitsAndBytesConfig of the QLoRA recipe: 4-bit NF4, double quantization, bf16 compute. */
export function qloraConfig(): BnbQuantizationConfig {
  return parseBnbQuantizationConfig({
    quant_method: 'bitsandbytes',
    load_in_4bit: true,
    bnb_4bit_quant_type: 'nf4',
    bnb_4bit_use_double_quant: true,
    bnb_4bit_compute_dtype: 'bfloat16',
  });
}

/** Raw HF-named tensors of a checkpoint, one at a time. */
interface WeightSource {
  /** The file or dir for messages. */
  readonly path: string;
  names(): string[];
  has(name: string): boolean;
  read(name: string): RawTensor;
  /** The file holding a tensor (a shard, for an index). */
  fileOf(name: string): string;
  close(): void;
}

function hfSource(dir: string): WeightSource {
  let r: SafetensorsReader;
  if (existsSync(join(dir, 'model.safetensors.index.json'))) r = openSafetensorsIndex(dir);
  else if (existsSync(join(dir, 'model.safetensors'))) r = openSafetensors(join(dir, 'model.safetensors'));
  else
    throw new FormatError(
      `${dir}: no model.safetensors or model.safetensors.index.json (only safetensors weights are read)`,
    );
  return {
    path: r.path,
    names: () => r.names(),
    has: (n) => r.has(n),
    read: (n) => {
      if (!r.has(n)) throw new FormatError(`${r.path}: missing tensor '${n}'`);
      return r.read(n);
    },
    fileOf: (n) => (r.has(n) ? r.info(n).file : r.path),
    close: () => r.close(),
  };
}

function f32Raw(v: Float32Array, shape: number[]): RawTensor {
  return { dtype: 'F32', shape, data: new Uint8Array(v.buffer, v.byteOffset, v.byteLength) };
}

function ggufSource(path: string): { src: WeightSource; config: ModelConfig; meta: Record<string, unknown> } {
  const g = readGguf(path);
  try {
    const meta = g.metadata as Record<string, unknown>;
    const config = configFromGguf(meta, path);
    const byHF = new Map<string, (typeof g.tensors)[number]>();
    for (const t of g.tensors) {
      const hf = ggufToHFName(t.name);
      if (!hf) throw new FormatError(`${path}: unexpected tensor '${t.name}' for a ${config.architecture} model`);
      byHF.set(hf, t);
    }
    config.tie_word_embeddings = !byHF.has('lm_head.weight');
    const permuted = config.architecture === 'llama' || config.architecture === 'mistral';
    const src: WeightSource = {
      path,
      names: () => [...byHF.keys()],
      has: (n) => byHF.has(n),
      read: (n) => {
        const info = byHF.get(n);
        if (!info) throw new FormatError(`${path}: no tensor for '${hfToGgufName(n) ?? n}' (${n})`);
        const shape = [...info.shape];
        let v = g.readTensorF32(info);
        if (permuted && /self_attn\.q_proj\.weight$/.test(n))
          v = unpermuteRope(v, shape[0]!, shape[1]!, config.num_attention_heads);
        else if (permuted && /self_attn\.k_proj\.weight$/.test(n))
          v = unpermuteRope(v, shape[0]!, shape[1]!, config.num_key_value_heads);
        return f32Raw(v, shape);
      },
      fileOf: () => path,
      close: () => g.close(),
    };
    return { src, config, meta };
  } catch (e) {
    g.close();
    throw e;
  }
}

/** The checkpoint's quantization_config, normalized; null when it has none. */
export function readQuantizationConfig(dir: string): BnbQuantizationConfig | null {
  const { file, json } = readConfigJson(dir);
  return parseFileQuantConfig(file, json);
}

function parseFileQuantConfig(file: string, json: Record<string, unknown>): BnbQuantizationConfig | null {
  const qc = json.quantization_config;
  if (qc === undefined || qc === null) return null;
  const method = (qc as Record<string, unknown>)?.quant_method;
  if (typeof qc === 'object' && method !== 'bitsandbytes')
    throw new ConfigError(
      `${file}: quantization_config.quant_method ${JSON.stringify(method)} is not supported (only bitsandbytes 4-bit and 8-bit checkpoints are read)`,
    );
  return parseBnbQuantizationConfig(qc, `${file}: quantization_config`);
}

function normalizeConfig(cfg: BnbQuantizationConfig | Record<string, unknown>): BnbQuantizationConfig {
  return parseBnbQuantizationConfig({ ...cfg, quant_method: cfg.quant_method ?? 'bitsandbytes' }, 'bnbConfig');
}

function computeDtypeOf(cfg: BnbQuantizationConfig): ComputeDtype {
  const cd = cfg.bnb_4bit_compute_dtype;
  // float64 compute has no 4-bit kernel anywhere; the CPU computes in f32 regardless.
  return (COMPUTE_DTYPES as readonly string[]).includes(cd) ? (cd as ComputeDtype) : 'float32';
}

/**
 * Loads a model in 4 bits. `source` is a model dir, a .gguf file or hf://owner/repo.
 * - A dir whose config.json has a bitsandbytes quantization_config is read pre-quantized (its config wins
 *   over `bnbConfig`, as in transformers).
 * - Otherwise `bnbConfig` (transformers' BitsAndBytesConfig fields, e.g. qloraConfig()) must ask for
 *   load_in_4bit, and every Linear outside llm_int8_skip_modules (default ['lm_head']) is quantized as it is
 *   read. Defaults are transformers': fp4, no double quantization, unless the config says otherwise.
 */
export async function loadModelQuantized(
  source: string,
  bnbConfig?: BnbQuantizationConfig | Record<string, unknown> | null,
  opts: LoadQuantizedOptions = {},
): Promise<LoadedQuantizedModel> {
  const path = await resolveModelPath(source);
  if (statSync(path).isDirectory()) {
    const { file, json } = readConfigJson(path);
    const fileCfg = parseFileQuantConfig(file, json);
    const config = configFromHF(json, file);
    if (fileCfg) {
      if (!fileCfg.load_in_4bit && !fileCfg.load_in_8bit)
        throw new ConfigError(`${file}: quantization_config has neither load_in_4bit nor load_in_8bit set`);
      const src = hfSource(path);
      try {
        return build(config, src, fileCfg, true, path, 'hf', opts);
      } finally {
        src.close();
      }
    }
    const cfg = requireOnLoadConfig(bnbConfig);
    const src = hfSource(path);
    try {
      return build(config, src, cfg, false, path, 'hf', opts);
    } finally {
      src.close();
    }
  }
  if (path.endsWith('.gguf')) {
    const cfg = requireOnLoadConfig(bnbConfig);
    const { src, config, meta } = ggufSource(path);
    try {
      const out = build(config, src, cfg, false, path, 'gguf', opts);
      out.ggufMetadata = meta;
      return out;
    } finally {
      src.close();
    }
  }
  throw new ConfigError(`model '${source}': expected a model dir (with config.json) or a .gguf file`);
}

function requireOnLoadConfig(
  bnbConfig: BnbQuantizationConfig | Record<string, unknown> | null | undefined,
): BnbQuantizationConfig {
  if (!bnbConfig)
    throw new ConfigError(
      'loadModelQuantized: the checkpoint is not quantized; pass a bitsandbytes config (e.g. qloraConfig())',
    );
  const cfg = normalizeConfig(bnbConfig);
  if (cfg.load_in_8bit)
    throw new ConfigError(
      'load_in_8bit: 8-bit layers are not kept in memory (lowrank trains on 4-bit bases); write an 8-bit checkpoint with `lowrank quantize --to int8`, or use load_in_4bit',
    );
  if (!cfg.load_in_4bit) throw new ConfigError('bnbConfig: load_in_4bit must be true to quantize on load');
  return cfg;
}

/** The dtype of the weights kept dense: the checkpoint's float dtype of the embedding, unless told. */
function denseDtype(src: WeightSource, opts: LoadQuantizedOptions): DType {
  if (opts.dtype && opts.dtype !== 'auto') return opts.dtype;
  const probe = ['model.embed_tokens.weight', 'model.norm.weight'].find((n) => src.has(n));
  if (!probe) return 'f32';
  const dt = DTYPE_OF[src.read(probe).dtype];
  return dt === 'bf16' || dt === 'f16' || dt === 'f32' ? dt : 'f32';
}

function sameShape(a: readonly number[], b: readonly number[]): boolean {
  return a.length === b.length && a.every((d, i) => d === b[i]);
}

/**
 * Quantizes a raw weight straight from its bytes (bf16/f16 read as 16-bit patterns: no f32 copy). With a
 * target dtype the weight is first cast to it, as transformers casts to torch_dtype before quantizing, and
 * the quant state records that dtype.
 */
function quantizeRaw(
  raw: RawTensor,
  shape: number[],
  q: QuantizeLinearOptions,
  where: string,
  target: DType | null,
): QuantState4bit {
  if (!sameShape(raw.shape, shape))
    throw new FormatError(`${where}: shape ${fmtShape(raw.shape)} does not match the model's ${fmtShape(shape)}`);
  const n = shape[0]! * shape[1]!;
  const opts = {
    quantType: q.quantType ?? 'fp4',
    blocksize: q.blocksize ?? 64,
    doubleQuant: q.doubleQuant ?? false,
    shape,
  };
  const rawDtype = DTYPE_OF[raw.dtype];
  const b = raw.data;
  if (
    (target === null || target === rawDtype) &&
    (raw.dtype === 'BF16' || raw.dtype === 'F16') &&
    b.byteOffset % 2 === 0
  )
    return quantize4bit(new Uint16Array(b.buffer, b.byteOffset, n), {
      ...opts,
      dtype: raw.dtype === 'BF16' ? 'bfloat16' : 'float16',
    });
  if ((target === null || target === 'f32') && raw.dtype === 'F32' && b.byteOffset % 4 === 0)
    return quantize4bit(new Float32Array(b.buffer, b.byteOffset, n), opts);
  let v: Float32Array;
  try {
    v = toFloat32(raw);
  } catch (e) {
    throw new FormatError(`${where}: cannot read a ${raw.dtype} weight: ${(e as Error).message}`);
  }
  if (target === 'bf16' || target === 'f16')
    return quantize4bit(fromF32(target, v) as Uint16Array, {
      ...opts,
      dtype: target === 'bf16' ? 'bfloat16' : 'float16',
    });
  return quantize4bit(v, opts);
}

/** A dense tensor of `dtype` filled from the checkpoint. */
function denseFromSource(src: WeightSource, name: string, shape: readonly number[], dtype: DType): Tensor {
  const t = empty(shape, dtype);
  fillFromRaw(t, src.read(name), `${src.fileOf(name)}: tensor '${name}'`);
  return t;
}

/** Every name of the checkpoint under `${prefix}.weight.` (the quant state parts). */
function bnbParts(src: WeightSource, names: string[], prefix: string): Record<string, BnbRawTensor> {
  const w = `${prefix}.weight`;
  const out: Record<string, BnbRawTensor> = {};
  for (const n of names) {
    // The bnb module reads a subset of safetensors dtypes; any other one is rejected by its checks.
    if (n === w || n.startsWith(`${w}.`)) out[n] = src.read(n) as unknown as BnbRawTensor;
  }
  return out;
}

interface BuildContext {
  src: WeightSource;
  names: string[];
  /** Module prefixes stored as bnb-4bit in the checkpoint. */
  bnb4: Set<string>;
  dtype: DType;
  /** The dtype weights are cast to before quantization (an explicit opts.dtype), or null: as stored. */
  castTo: DType | null;
  prequantized: boolean;
  skip: readonly string[];
  quant: QuantizeLinearOptions;
  computeDtype: ComputeDtype;
  quantized: string[];
}

/** The module that goes at `name` in place of a Linear [out, in] (4-bit, dequantized int8, or dense). */
function linearFor(ctx: BuildContext, name: string, lin: Linear): Module {
  const { src } = ctx;
  const hasBias = lin.bias !== null;
  const bias = () => (hasBias ? denseFromSource(src, `${name}.bias`, [lin.outFeatures], ctx.dtype) : null);
  const shape = [lin.outFeatures, lin.inFeatures];
  if (ctx.prequantized && ctx.bnb4.has(name)) {
    let state: QuantState4bit;
    try {
      state = fromBnb4bitTensors(bnbParts(src, ctx.names, name), name);
    } catch (e) {
      if (e instanceof FormatError) throw new FormatError(`${src.fileOf(`${name}.weight`)}: ${e.message}`);
      throw e;
    }
    if (!sameShape(state.shape, shape))
      throw new FormatError(
        `${src.fileOf(`${name}.weight`)}: bnb-4bit tensor ${name}.weight has shape ${fmtShape(state.shape)} in its quant state, the model expects ${fmtShape(shape)}`,
      );
    ctx.quantized.push(name);
    return new Linear4bit(state, bias(), { computeDtype: ctx.computeDtype });
  }
  if (ctx.prequantized && src.has(`${name}.SCB`)) {
    const file = src.fileOf(`${name}.weight`);
    const w = src.read(`${name}.weight`);
    const scb = src.read(`${name}.SCB`);
    if (w.dtype !== 'I8' || !sameShape(w.shape, shape))
      throw new FormatError(
        `${file}: int8 tensor ${name}.weight must be I8 ${fmtShape(shape)}, got ${w.dtype} ${fmtShape(w.shape)}`,
      );
    if (scb.dtype !== 'F32' || !sameShape(scb.shape, [shape[0]!]))
      throw new FormatError(
        `${file}: tensor ${name}.SCB must be F32 [${shape[0]}], got ${scb.dtype} ${fmtShape(scb.shape)}`,
      );
    const int8 = new Int8Array(w.data.buffer, w.data.byteOffset, w.data.byteLength);
    const values = dequantizeInt8Rowwise({ int8, scale: toFloat32(scb) }, shape[0]!, shape[1]!);
    const out = new Linear(lin.inFeatures, lin.outFeatures, { bias: hasBias, dtype: ctx.dtype, empty: true });
    fillFromF32(out.weight, values);
    const b = bias();
    if (b) out.setParam('bias', b);
    return out;
  }
  if (!ctx.prequantized && !isSkippedModule(name, ctx.skip)) {
    const wName = `${name}.weight`;
    const state = quantizeRaw(src.read(wName), shape, ctx.quant, `${src.fileOf(wName)}: tensor '${wName}'`, ctx.castTo);
    ctx.quantized.push(name);
    return new Linear4bit(state, bias(), { computeDtype: ctx.computeDtype });
  }
  const out = new Linear(lin.inFeatures, lin.outFeatures, { bias: hasBias, dtype: ctx.dtype, empty: true });
  out.setParam('weight', denseFromSource(src, `${name}.weight`, shape, ctx.dtype));
  const b = bias();
  if (b) out.setParam('bias', b);
  return out;
}

/** Fills the dense parameters of a module tree (replacing the shape-only u8 tensors it was built with) and swaps its Linears. */
function fillModule(ctx: BuildContext, root: Module, prefix: string): void {
  const modules = [...root.namedModules()];
  for (const [path, m] of modules) {
    const name = path ? `${prefix}.${path}` : prefix;
    if (m instanceof Linear) {
      if (!path) continue; // the root itself (lm_head) is handled by the caller
      root.setModule(path, linearFor(ctx, name, m));
      m.dispose();
      continue;
    }
    // own parameters (a child's are visited with the child)
    for (const [pn, p] of [...m.namedParameters()]) {
      if (pn.includes('.')) continue;
      m.setParam(pn, denseFromSource(ctx.src, `${name}.${pn}`, p.shape, ctx.dtype));
    }
  }
}

function build(
  config: ModelConfig,
  src: WeightSource,
  cfg: BnbQuantizationConfig,
  prequantized: boolean,
  path: string,
  kind: 'hf' | 'gguf',
  opts: LoadQuantizedOptions,
): LoadedQuantizedModel {
  const names = src.names();
  const bnb4 = new Set<string>();
  for (const n of names) {
    const i = n.lastIndexOf(QS_MARKER);
    if (i > 0) bnb4.add(n.slice(0, i));
  }
  if (prequantized && cfg.load_in_4bit && bnb4.size === 0)
    throw new FormatError(
      `${src.path}: config.json asks for load_in_4bit, but no tensor has a quant state (P.weight.quant_state.bitsandbytes__nf4|fp4)`,
    );
  const ctx: BuildContext = {
    src,
    names,
    bnb4,
    dtype: denseDtype(src, opts),
    castTo: opts.dtype && opts.dtype !== 'auto' ? opts.dtype : null,
    prequantized,
    skip: cfg.llm_int8_skip_modules ?? DEFAULT_SKIP_MODULES,
    quant: {
      quantType: cfg.bnb_4bit_quant_type,
      doubleQuant: cfg.bnb_4bit_use_double_quant,
      blocksize: opts.blocksize ?? 64,
    },
    computeDtype: computeDtypeOf(cfg),
    quantized: [],
  };
  const L = config.num_hidden_layers;
  const total = L + 1;
  const model = noGrad(() => {
    // The shell holds the embedding, final norm and head; decoder layers are built one at a time so that
    // only one layer's shape-only tensors exist at once.
    const shellCfg: ModelConfig = { ...config, num_hidden_layers: 0 };
    const m = new LlamaForCausalLM(shellCfg, { dtype: 'u8', empty: true });
    shellCfg.num_hidden_layers = L;
    const inner = m.inner;
    for (const [name, p] of [...inner.namedParameters()]) {
      const [child, pn] = [name.slice(0, name.lastIndexOf('.')), name.slice(name.lastIndexOf('.') + 1)];
      inner.getModule(child)!.setParam(pn, denseFromSource(src, `model.${name}`, p.shape, ctx.dtype));
    }
    const head = m.getChild('lm_head');
    if (head instanceof Linear) {
      const replacement = linearFor(ctx, 'lm_head', head);
      m.setModule('lm_head', replacement);
      head.dispose();
    }
    opts.onProgress?.(1, total, 'embeddings and head');
    const layers: LlamaDecoderLayer[] = [];
    for (let i = 0; i < L; i++) {
      // shape-only u8 tensors (never written) mark the shapes; fillModule replaces every one of them.
      const layer = new LlamaDecoderLayer(config, i, { dtype: 'u8', empty: true });
      fillModule(ctx, layer, `model.layers.${i}`);
      layers.push(layer);
      opts.onProgress?.(i + 2, total, `model.layers.${i}`);
    }
    const list = new ModuleList(layers);
    inner.child('layers', list);
    // LlamaModel keeps the list in a field too (read by hidden()).
    Object.assign(inner, { layers: list });
    return m;
  });
  if (prequantized && cfg.load_in_4bit) {
    const missing = [...bnb4].filter((p) => !ctx.quantized.includes(p));
    if (missing.length > 0)
      throw new FormatError(`${src.path}: bnb-4bit weights for modules the model does not have: ${missing.join(', ')}`);
  }
  return {
    model,
    config: model.config,
    path,
    kind,
    quantizationConfig: cfg,
    prequantized,
    quantizedModules: ctx.quantized,
  };
}
