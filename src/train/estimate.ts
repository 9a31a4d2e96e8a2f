// Training memory estimate for a Llama-family model (llama, mistral, qwen2, qwen3) from its config.json:
// weights, gradients, optimizer states and activations for full fine-tuning, LoRA and QLoRA.
//
// Per-parameter state (see /work/shared/reference/qlora.md section 6):
//  - full, mixed precision AdamW: 16 B/param (ZeRO, arXiv 1910.02054: 2 bf16 weights + 2 bf16 grads +
//    4 f32 master + 8 Adam m,v); 12 B/param without the master copy; 16 B/param in pure f32.
//  - LoRA: frozen base at the weight dtype; adapters in f32 with f32 grads and Adam state (16 B/param).
//  - QLoRA: quantized linears at their exact NF4/FP4 storage (4.127 bits/param with double quantization
//    at blocksize 64); embeddings, lm_head and norms at the weight dtype.
// Activations: stored tensors of one Llama block per token, after Korthikanti et al. 2022, "Reducing
// Activation Recomputation in Large Transformer Models" (arXiv 2205.05198, section 4.1: 34·s·b·h +
// 5·a·s²·b bytes per GPT layer in 16-bit), adapted to RMSNorm, SwiGLU (intermediate size I), GQA
// (h_kv = kv_heads·head_dim), no dropout, fused attention (flash: O(s) memory, stores O and the
// log-sum-exp) and frozen linears (a frozen weight needs no saved input; only its LoRA path does).
// Gradient checkpointing per decoder layer keeps each layer's input, plus one layer recomputed in backward.
// Not counted: CUDA context and allocator slack (pass overheadBytes), transient gradient buffers.

import { ConfigError } from '../core/errors.ts';
import { storageBytes4bit } from '../quant/blockwise4.ts';

export type EstimateMethod = 'full' | 'lora' | 'qlora';
export type LinearModule = 'q_proj' | 'k_proj' | 'v_proj' | 'o_proj' | 'gate_proj' | 'up_proj' | 'down_proj';
export const LINEAR_MODULES: readonly LinearModule[] = [
  'q_proj',
  'k_proj',
  'v_proj',
  'o_proj',
  'gate_proj',
  'up_proj',
  'down_proj',
];

export interface LlamaShape {
  modelType: string;
  hiddenSize: number;
  intermediateSize: number;
  numLayers: number;
  numHeads: number;
  numKvHeads: number;
  headDim: number;
  vocabSize: number;
  tieWordEmbeddings: boolean;
  /** q/k/v projections carry a bias (qwen2, or attention_bias: true). */
  qkvBias: boolean;
  /** per-head RMSNorm on q and k (qwen3). */
  qkNorm: boolean;
}

/** Reads the fields the estimate needs from a Llama-family config.json; ConfigError names a bad field. */
export function llamaShapeFromConfig(cfg: unknown, where = 'config.json'): LlamaShape {
  if (cfg === null || typeof cfg !== 'object' || Array.isArray(cfg)) throw new ConfigError(`${where}: not an object`);
  const o = cfg as Record<string, unknown>;
  const int = (key: string, def?: number): number => {
    const v = o[key] ?? def;
    if (typeof v !== 'number' || !Number.isInteger(v) || v <= 0) {
      throw new ConfigError(
        `${where}: "${key}" must be a positive integer${v === undefined ? ' (missing)' : `, got ${JSON.stringify(v)}`}`,
      );
    }
    return v;
  };
  const hiddenSize = int('hidden_size');
  const numHeads = int('num_attention_heads');
  const numKvHeads = int('num_key_value_heads', numHeads);
  if (numHeads % numKvHeads !== 0) {
    throw new ConfigError(
      `${where}: "num_key_value_heads" (${numKvHeads}) must divide num_attention_heads (${numHeads})`,
    );
  }
  const headDim = o.head_dim == null ? hiddenSize / numHeads : int('head_dim');
  if (!Number.isInteger(headDim)) {
    throw new ConfigError(
      `${where}: "hidden_size" (${hiddenSize}) is not a multiple of num_attention_heads (${numHeads})`,
    );
  }
  const modelType = typeof o.model_type === 'string' ? o.model_type : 'llama';
  const tie = o.tie_word_embeddings ?? false;
  if (typeof tie !== 'boolean') throw new ConfigError(`${where}: "tie_word_embeddings" must be true or false`);
  const bias = o.attention_bias;
  if (bias !== undefined && typeof bias !== 'boolean') {
    throw new ConfigError(`${where}: "attention_bias" must be true or false`);
  }
  return {
    modelType,
    hiddenSize,
    intermediateSize: int('intermediate_size'),
    numLayers: int('num_hidden_layers'),
    numHeads,
    numKvHeads,
    headDim,
    vocabSize: int('vocab_size'),
    tieWordEmbeddings: tie,
    qkvBias: bias === true || (bias === undefined && modelType === 'qwen2'),
    qkNorm: modelType === 'qwen3',
  };
}

/** [in_features, out_features] of each linear projection of one layer. */
export function linearShapes(m: LlamaShape): Record<LinearModule, [number, number]> {
  const h = m.hiddenSize;
  const hq = m.numHeads * m.headDim;
  const hkv = m.numKvHeads * m.headDim;
  const I = m.intermediateSize;
  return {
    q_proj: [h, hq],
    k_proj: [h, hkv],
    v_proj: [h, hkv],
    o_proj: [hq, h],
    gate_proj: [h, I],
    up_proj: [h, I],
    down_proj: [I, h],
  };
}

export interface ParamCounts {
  total: number;
  /** All weights of the 7 linear projections of all layers. */
  linear: number;
  embedding: number;
  /** 0 when tied to the embedding. */
  lmHead: number;
  /** RMSNorm weights, q/k norms and biases. */
  other: number;
}

export function countParams(m: LlamaShape): ParamCounts {
  const shapes = linearShapes(m);
  let perLayerLinear = 0;
  for (const mod of LINEAR_MODULES) perLayerLinear += shapes[mod][0] * shapes[mod][1];
  const hkv = m.numKvHeads * m.headDim;
  const perLayerOther =
    2 * m.hiddenSize + (m.qkvBias ? m.numHeads * m.headDim + 2 * hkv : 0) + (m.qkNorm ? 2 * m.headDim : 0);
  const linear = m.numLayers * perLayerLinear;
  const embedding = m.vocabSize * m.hiddenSize;
  const lmHead = m.tieWordEmbeddings ? 0 : embedding;
  const other = m.numLayers * perLayerOther + m.hiddenSize;
  return { total: linear + embedding + lmHead + other, linear, embedding, lmHead, other };
}

/** LoRA parameters: sum over adapted linears of r·(in + out), times the number of layers. */
export function loraParamCount(m: LlamaShape, rank: number, targets: readonly LinearModule[]): number {
  const shapes = linearShapes(m);
  let perLayer = 0;
  for (const t of targets) perLayer += rank * (shapes[t][0] + shapes[t][1]);
  return perLayer * m.numLayers;
}

export interface EstimateOptions {
  method: EstimateMethod;
  seqLen: number;
  batchSize: number;
  /** LoRA rank; default 16. */
  rank?: number;
  /** Adapted linears (LoRA, QLoRA); default all 7 projections; 'all-linear' as PEFT spells it. */
  targetModules?: readonly string[] | 'all-linear';
  /** Checkpoint each decoder layer; default false. */
  gradientCheckpointing?: boolean;
  /** Storage of the (frozen or trained) model weights; default 'bf16'. QLoRA: the non-quantized ones. */
  weightDtype?: 'f32' | 'bf16';
  /** Dtype of stored activations; default the weight dtype ('bf16' compute for QLoRA). */
  activationDtype?: 'f32' | 'bf16';
  /** 'adamw': 2 f32 states (8 B/param); 'adamw8bit': 2 blockwise 8-bit states; 'sgd': none. Default 'adamw'. */
  optimizer?: 'adamw' | 'adamw8bit' | 'sgd';
  /** Full fine-tuning in bf16: keep an f32 master copy (16 B/param); default true. false gives 12 B/param. */
  masterWeights?: boolean;
  /** 'flash' (fused, O(s) memory; default) or 'eager' (stores the a·s² attention probabilities). */
  attention?: 'flash' | 'eager';
  /** QLoRA: 'nf4' (default) or 'fp4' (same storage). */
  quantType?: 'nf4' | 'fp4';
  /** QLoRA: double quantization of the absmax values; default true. */
  doubleQuant?: boolean;
  /** QLoRA: 4-bit block size; default 64. */
  blocksize?: number;
  /** Added as-is (CUDA context, allocator slack); default 0. */
  overheadBytes?: number;
}

export interface MemoryEstimate {
  method: EstimateMethod;
  params: ParamCounts;
  trainableParams: number;
  /** Bytes. Model weights, the f32 master copy (full bf16) and the LoRA adapters. */
  weights: number;
  gradients: number;
  optimizerStates: number;
  /** Stored activations for backward, including the logits buffers. */
  activations: number;
  overhead: number;
  total: number;
  detail: {
    baseWeights: number;
    masterWeights: number;
    adapterWeights: number;
    /** Bytes of the quantized linears (QLoRA), or 0. */
    quantizedLinears: number;
    /** Stored activations of one decoder layer without checkpointing. */
    activationsPerLayer: number;
    /** All decoder layers (with checkpointing: their inputs plus one recomputed layer). */
    layerActivations: number;
    /** Final norm input (and lm_head input when it trains). */
    headActivations: number;
    /** f32 logits and their gradient. */
    logits: number;
  };
  /** One human-readable line per term, for `lowrank estimate --explain`. */
  formulas: string[];
}

const GB = 1e9;

/** Decimal units, as GPU memory is usually quoted. */
export function formatBytes(b: number): string {
  if (b >= GB) return `${(b / GB).toFixed(2)} GB`;
  if (b >= 1e6) return `${(b / 1e6).toFixed(1)} MB`;
  if (b >= 1e3) return `${(b / 1e3).toFixed(1)} kB`;
  return `${b} B`;
}

const fmtN = (n: number) => n.toLocaleString('en-US');

function checkOptions(opts: EstimateOptions): void {
  const bad = (key: string, what: string): never => {
    throw new ConfigError(`estimate: option ${key} ${what}`);
  };
  if (!['full', 'lora', 'qlora'].includes(opts.method))
    bad('method', `must be full, lora or qlora (got ${opts.method})`);
  for (const k of ['seqLen', 'batchSize', 'rank', 'blocksize'] as const) {
    const v = opts[k];
    if (v !== undefined && (!Number.isInteger(v) || v <= 0)) bad(k, `must be a positive integer (got ${v})`);
  }
  if (opts.weightDtype !== undefined && !['f32', 'bf16'].includes(opts.weightDtype)) {
    bad('weightDtype', `must be f32 or bf16 (got ${opts.weightDtype})`);
  }
  if (opts.activationDtype !== undefined && !['f32', 'bf16'].includes(opts.activationDtype)) {
    bad('activationDtype', `must be f32 or bf16 (got ${opts.activationDtype})`);
  }
  if (opts.optimizer !== undefined && !['adamw', 'adamw8bit', 'sgd'].includes(opts.optimizer)) {
    bad('optimizer', `must be adamw, adamw8bit or sgd (got ${opts.optimizer})`);
  }
  if (opts.attention !== undefined && !['flash', 'eager'].includes(opts.attention)) {
    bad('attention', `must be flash or eager (got ${opts.attention})`);
  }
  if (opts.quantType !== undefined && !['nf4', 'fp4'].includes(opts.quantType)) {
    bad('quantType', `must be nf4 or fp4 (got ${opts.quantType})`);
  }
  if (opts.blocksize !== undefined && ![32, 64, 128, 256, 512, 1024, 2048, 4096].includes(opts.blocksize)) {
    bad('blocksize', `must be a power of two from 32 to 4096 (got ${opts.blocksize})`);
  }
  if (opts.overheadBytes !== undefined && !(opts.overheadBytes >= 0)) bad('overheadBytes', 'must be >= 0');
}

function resolveTargets(t: EstimateOptions['targetModules']): LinearModule[] {
  if (t === undefined || t === 'all-linear') return [...LINEAR_MODULES];
  if (!Array.isArray(t)) throw new ConfigError('estimate: option targetModules must be a list of module names');
  const out: LinearModule[] = [];
  for (const name of t) {
    if (!LINEAR_MODULES.includes(name as LinearModule)) {
      throw new ConfigError(
        `estimate: option targetModules: unknown module "${name}" (known: ${LINEAR_MODULES.join(', ')}, or all-linear)`,
      );
    }
    if (!out.includes(name as LinearModule)) out.push(name as LinearModule);
  }
  if (out.length === 0) throw new ConfigError('estimate: option targetModules is empty');
  return out;
}

/** Memory needed to train `hfConfig` (a config.json object) with the given method and batch shape. */
export function estimateMemory(hfConfig: unknown, opts: EstimateOptions): MemoryEstimate {
  checkOptions(opts);
  const m = llamaShapeFromConfig(hfConfig);
  const method = opts.method;
  const s = opts.seqLen;
  const b = opts.batchSize;
  const T = s * b;
  const rank = opts.rank ?? 16;
  const targets = method === 'full' ? [...LINEAR_MODULES] : resolveTargets(opts.targetModules);
  const weightDtype = opts.weightDtype ?? 'bf16';
  const wB = weightDtype === 'f32' ? 4 : 2;
  const actDtype = opts.activationDtype ?? (method === 'qlora' ? 'bf16' : weightDtype);
  const p = actDtype === 'f32' ? 4 : 2;
  const optimizer = opts.optimizer ?? 'adamw';
  const attention = opts.attention ?? 'flash';
  const ckpt = opts.gradientCheckpointing ?? false;
  const params = countParams(m);
  const f: string[] = [];
  const h = m.hiddenSize;
  const hq = m.numHeads * m.headDim;
  const hkv = m.numKvHeads * m.headDim;
  const I = m.intermediateSize;
  const L = m.numLayers;

  f.push(
    `model: ${m.modelType}, ${L} layers, hidden ${h}, intermediate ${I}, heads ${m.numHeads} (kv ${m.numKvHeads}, head_dim ${m.headDim}), vocab ${m.vocabSize}${m.tieWordEmbeddings ? ', tied embeddings' : ''}`,
  );
  f.push(
    `params: ${fmtN(params.total)} = linear ${fmtN(params.linear)} + embedding ${fmtN(params.embedding)}` +
      `${params.lmHead ? ` + lm_head ${fmtN(params.lmHead)}` : ''} + norms/biases ${fmtN(params.other)}`,
  );

  // Weights, gradients, optimizer states.
  let baseWeights = 0;
  let masterWeights = 0;
  let adapterWeights = 0;
  let quantizedLinears = 0;
  let trainable: number;
  let gradients: number;
  if (method === 'full') {
    trainable = params.total;
    baseWeights = params.total * wB;
    f.push(`weights: ${fmtN(params.total)} × ${wB} B (${weightDtype}) = ${formatBytes(baseWeights)}`);
    if (weightDtype === 'bf16' && (opts.masterWeights ?? true)) {
      masterWeights = params.total * 4;
      f.push(
        `master weights: ${fmtN(params.total)} × 4 B (f32 copy for mixed precision) = ${formatBytes(masterWeights)}`,
      );
    }
    gradients = params.total * wB;
    f.push(`gradients: ${fmtN(params.total)} × ${wB} B (${weightDtype}) = ${formatBytes(gradients)}`);
  } else {
    const lora = loraParamCount(m, rank, targets);
    trainable = lora;
    f.push(`LoRA params: ${L} layers × Σ r·(in + out) over [${targets.join(', ')}], r = ${rank} → ${fmtN(lora)}`);
    if (method === 'lora') {
      baseWeights = params.total * wB;
      f.push(`frozen base: ${fmtN(params.total)} × ${wB} B (${weightDtype}) = ${formatBytes(baseWeights)}`);
    } else {
      const blocksize = opts.blocksize ?? 64;
      const doubleQuant = opts.doubleQuant ?? true;
      const shapes = linearShapes(m);
      let perLayer = 0;
      for (const mod of LINEAR_MODULES) {
        perLayer += storageBytes4bit(shapes[mod][0] * shapes[mod][1], {
          blocksize,
          doubleQuant,
          perTensorConstants: true,
        });
      }
      quantizedLinears = perLayer * L;
      const rest = params.total - params.linear;
      baseWeights = quantizedLinears + rest * wB;
      const bits = (quantizedLinears * 8) / params.linear;
      f.push(
        `4-bit linears: ${fmtN(params.linear)} × ${bits.toFixed(3)} bits (${opts.quantType ?? 'nf4'}, blocksize ${blocksize}, ` +
          `${doubleQuant ? 'double quant: 4 + 8/64 + 32/(64·256)' : 'f32 absmax: 4 + 32/64'}) = ${formatBytes(quantizedLinears)}`,
      );
      f.push(`embedding, lm_head, norms: ${fmtN(rest)} × ${wB} B (${weightDtype}) = ${formatBytes(rest * wB)}`);
    }
    adapterWeights = lora * 4;
    f.push(`adapter weights: ${fmtN(lora)} × 4 B (f32) = ${formatBytes(adapterWeights)}`);
    gradients = lora * 4;
    f.push(`gradients: ${fmtN(lora)} × 4 B (f32, adapters only) = ${formatBytes(gradients)}`);
  }
  let optimizerStates: number;
  if (optimizer === 'adamw') {
    optimizerStates = trainable * 8;
    f.push(`optimizer: AdamW m and v in f32: ${fmtN(trainable)} × 8 B = ${formatBytes(optimizerStates)}`);
  } else if (optimizer === 'adamw8bit') {
    optimizerStates = 2 * (trainable + Math.ceil(trainable / 256) * 4);
    f.push(
      `optimizer: 8-bit AdamW, 2 states × (1 B + 4 B per 256-block): ${fmtN(trainable)} × ~2.03 B = ${formatBytes(optimizerStates)}`,
    );
  } else {
    optimizerStates = 0;
    f.push('optimizer: SGD without momentum: no state');
  }
  const weights = baseWeights + masterWeights + adapterWeights;

  // Activations of one decoder layer (bytes), per token unless noted.
  const trains = (mod: LinearModule) => method === 'full' || targets.includes(mod);
  const terms: [string, number][] = [
    ['attn norm input h', h],
    ['q,k,v after RoPE (hq + 2·h_kv)', hq + 2 * hkv],
    ['attention output hq', hq],
    ['mlp norm input h', h],
    ['gate, up outputs 2·I', 2 * I],
  ];
  if (trains('q_proj') || trains('k_proj') || trains('v_proj')) terms.push(['q/k/v input h', h]);
  if (trains('gate_proj') || trains('up_proj')) terms.push(['gate/up input h', h]);
  if (trains('down_proj')) terms.push(['down input I', I]);
  if (method !== 'full') terms.push([`LoRA x·A, ${targets.length} × r`, targets.length * rank]);
  const perTokenElems = terms.reduce((a, [, v]) => a + v, 0);
  let perLayer = p * T * perTokenElems + 4 * T * 2; // + f32 rstd of the two norms
  let attnExtra: string;
  if (attention === 'flash') {
    perLayer += 4 * T * m.numHeads; // f32 log-sum-exp per head and token
    attnExtra = `4 B × ${m.numHeads} heads (f32 log-sum-exp)`;
  } else {
    perLayer += p * b * m.numHeads * s * s; // softmax probabilities
    attnExtra = `${p} B × ${m.numHeads} heads × ${s} (attention probabilities, eager)`;
  }
  f.push(
    `activations per layer: ${p} B × ${fmtN(T)} tokens × (${terms.map(([k, v]) => `${k} = ${v}`).join(' + ')}) ` +
      `+ ${fmtN(T)} × (${attnExtra} + 8 B norm rstd) = ${formatBytes(perLayer)} ` +
      `(Korthikanti et al. 2022 per-layer accounting, adapted to RMSNorm, SwiGLU, GQA, no dropout)`,
  );
  let layerActivations: number;
  if (ckpt) {
    const inputs = L * p * T * h;
    layerActivations = inputs + perLayer;
    f.push(
      `layers with checkpointing: ${L} × ${p} B × ${fmtN(T)} × ${h} (layer inputs) + one layer recomputed in backward = ${formatBytes(layerActivations)}`,
    );
  } else {
    layerActivations = L * perLayer;
    f.push(`layers: ${L} × ${formatBytes(perLayer)} = ${formatBytes(layerActivations)}`);
  }
  const headActivations = p * T * h * (method === 'full' ? 2 : 1) + 4 * T;
  f.push(
    `final norm${method === 'full' ? ' and lm_head inputs' : ' input'}: ${p} B × ${fmtN(T)} × ${h}${method === 'full' ? ' × 2' : ''} = ${formatBytes(headActivations)}`,
  );
  const logits = 8 * T * m.vocabSize;
  f.push(
    `logits: ${fmtN(T)} tokens × ${fmtN(m.vocabSize)} vocab × (4 B f32 logits + 4 B gradient) = ${formatBytes(logits)}`,
  );
  const activations = layerActivations + headActivations + logits;
  const overhead = opts.overheadBytes ?? 0;
  if (overhead > 0) f.push(`overhead (CUDA context, allocator): ${formatBytes(overhead)}`);
  const total = weights + gradients + optimizerStates + activations + overhead;
  f.push(
    `total: weights ${formatBytes(weights)} + gradients ${formatBytes(gradients)} + optimizer ${formatBytes(optimizerStates)} + ` +
      `activations ${formatBytes(activations)}${overhead ? ` + overhead ${formatBytes(overhead)}` : ''} = ${formatBytes(total)}`,
  );

  return {
    method,
    params,
    trainableParams: trainable,
    weights,
    gradients,
    optimizerStates,
    activations,
    overhead,
    total,
    detail: {
      baseWeights,
      masterWeights,
      adapterWeights,
      quantizedLinears,
      activationsPerLayer: perLayer,
      layerActivations,
      headActivations,
      logits,
    },
    formulas: f,
  };
}
