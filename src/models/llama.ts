// The Llama family (llama, mistral, qwen2 with q/k/v bias, qwen3 with q/k norm) in one readable file.
// Module names follow transformers, so checkpoints and PEFT adapters address the same paths.

import { getBackend } from '../backend/index.ts';
import type { DType } from '../core/dtype.ts';
import { fmtShape, ShapeError } from '../core/errors.ts';
import type { Rng } from '../core/rng.ts';
import { keep } from '../core/scope.ts';
import type { Tensor } from '../core/tensor.ts';
import { Embedding, Linear, RMSNorm } from '../nn/layers.ts';
import { Module, ModuleList } from '../nn/module.ts';
import { gelu, swiglu } from '../ops/activation.ts';
import { attention } from '../ops/attention.ts';
import { empty, emptyStreamed } from '../ops/create.ts';
import { add, mul } from '../ops/elementwise.ts';
import { crossEntropy } from '../ops/loss.ts';
import { linear } from '../ops/matmul.ts';
import { rope, ropeInvFreq } from '../ops/rope.ts';
import { concat, reshape, slice } from '../ops/shape.ts';
import type { ModelConfig } from './config.ts';
import type { KVCache } from './kv-cache.ts';

/** A callable layer: Linear or an adapter wrapping it (LoRA). */
export interface LinearLike extends Module {
  forward(x: Tensor): Tensor;
}

/** Per-forward context shared by the layers. */
export interface ForwardContext {
  /** i32 [B, T] absolute positions (restart per packed sequence). */
  positions: Tensor;
  /** u8/i32 [B, Tk] key padding mask (1 = attend), over the whole cached length. */
  keyMask?: Tensor | null;
  /** i32 [B, T] sequence ids for packed rows (block-diagonal attention). */
  seqIds?: Tensor | null;
  cache?: KVCache | null;
  /** Per-row adapter selection for mixed batches (serving): read by adapter layers. */
  adapterRows?: unknown;
}

/** One layer's weights for decode-plan.ts (projections [out, in], any layout). */
export interface DecodeLayerWeights {
  inputNorm: Tensor;
  qkv: Tensor;
  qkvBias: Tensor | null;
  qNorm: Tensor | null;
  kNorm: Tensor | null;
  o: Tensor;
  oBias: Tensor | null;
  postNorm: Tensor;
  gateUp: Tensor;
  down: Tensor;
  downBias: Tensor | null;
}

export interface DecodeWeights {
  embed: Tensor;
  layers: DecodeLayerWeights[];
  norm: Tensor;
  head: Tensor;
  headBias: Tensor | null;
  invFreq: Tensor;
}

interface InitOptions {
  dtype?: DType;
  rng?: Rng;
  empty?: boolean;
}

export class LlamaAttention extends Module {
  constructor(
    readonly cfg: ModelConfig,
    readonly layerIdx: number,
    o: InitOptions,
  ) {
    super();
    const { hidden_size: h, num_attention_heads: nh, num_key_value_heads: nkv, head_dim: hd } = cfg;
    const lo = { dtype: o.dtype, rng: o.rng, empty: o.empty };
    this.child('q_proj', new Linear(h, nh * hd, { ...lo, bias: cfg.attention_bias }));
    this.child('k_proj', new Linear(h, nkv * hd, { ...lo, bias: cfg.attention_bias }));
    this.child('v_proj', new Linear(h, nkv * hd, { ...lo, bias: cfg.attention_bias }));
    this.child('o_proj', new Linear(nh * hd, h, lo));
    if (cfg.qk_norm) {
      this.child('q_norm', new RMSNorm(hd, cfg.rms_norm_eps, { dtype: o.dtype }));
      this.child('k_norm', new RMSNorm(hd, cfg.rms_norm_eps, { dtype: o.dtype }));
    }
  }

  /** q, k and v in one weight (the decoding layout), while they are plain Linears. */
  fusedQKV: FusedLinears | null = null;

  proj(name: string): LinearLike {
    return this.getChild(name) as LinearLike;
  }

  forward(x: Tensor, ctx: ForwardContext, invFreq: Tensor): Tensor {
    const [B, T] = x.shape as [number, number, number];
    const { num_attention_heads: nh, num_key_value_heads: nkv, head_dim: hd } = this.cfg;
    // each intermediate is freed once used (what backward needs, the ops saved)
    const then = (t: Tensor, f: (t: Tensor) => Tensor): Tensor => {
      const r = f(t);
      if (r !== t) t.free();
      return r;
    };
    let q: Tensor;
    let k: Tensor;
    let v: Tensor;
    const qkv = fusedOutputs(this, this.fusedQKV, x);
    if (qkv) {
      [q, k, v] = [qkv[0]!, qkv[1]!, qkv[2]!];
      q = then(q, (t) => reshape(t, [B, T, nh, hd]));
      k = then(k, (t) => reshape(t, [B, T, nkv, hd]));
      v = then(v, (t) => reshape(t, [B, T, nkv, hd]));
    } else {
      q = then(this.proj('q_proj').forward(x), (t) => reshape(t, [B, T, nh, hd]));
      k = then(this.proj('k_proj').forward(x), (t) => reshape(t, [B, T, nkv, hd]));
      v = then(this.proj('v_proj').forward(x), (t) => reshape(t, [B, T, nkv, hd]));
    }
    if (this.cfg.qk_norm) {
      q = then(q, (t) => (this.getChild('q_norm') as RMSNorm).forward(t));
      k = then(k, (t) => (this.getChild('k_norm') as RMSNorm).forward(t));
    }
    q = then(q, (t) => rope(t, ctx.positions, invFreq));
    k = then(k, (t) => rope(t, ctx.positions, invFreq));
    if (ctx.cache) {
      const kv = ctx.cache.append(this.layerIdx, k, v);
      k.free();
      v.free();
      ({ k, v } = kv);
    }
    const a = attention(q, k, v, { keyMask: ctx.keyMask ?? null, seqIds: ctx.seqIds ?? null });
    for (const t of [q, k, v]) t.free();
    return then(
      then(a, (t) => reshape(t, [B, T, nh * hd])),
      (t) => this.proj('o_proj').forward(t),
    );
  }
}

export class LlamaMLP extends Module {
  constructor(
    readonly cfg: ModelConfig,
    o: InitOptions,
  ) {
    super();
    const lo = { dtype: o.dtype, rng: o.rng, empty: o.empty };
    this.child('gate_proj', new Linear(cfg.hidden_size, cfg.intermediate_size, lo));
    this.child('up_proj', new Linear(cfg.hidden_size, cfg.intermediate_size, lo));
    this.child('down_proj', new Linear(cfg.intermediate_size, cfg.hidden_size, lo));
  }
  /** gate and up in one weight (the decoding layout), while they are plain Linears. */
  fusedGateUp: FusedLinears | null = null;

  proj(name: string): LinearLike {
    return this.getChild(name) as LinearLike;
  }
  forward(x: Tensor): Tensor {
    const gu = fusedOutputs(this, this.fusedGateUp, x);
    const g = gu ? gu[0]! : this.proj('gate_proj').forward(x);
    const u = gu ? gu[1]! : this.proj('up_proj').forward(x);
    const h =
      this.cfg.hidden_act === 'silu' ? swiglu(g, u) : mul(gelu(g, this.cfg.hidden_act === 'gelu_pytorch_tanh'), u);
    g.free();
    u.free();
    const y = this.proj('down_proj').forward(h);
    h.free();
    return y;
  }
}

export class LlamaDecoderLayer extends Module {
  constructor(cfg: ModelConfig, idx: number, o: InitOptions) {
    super();
    this.child('self_attn', new LlamaAttention(cfg, idx, o));
    this.child('mlp', new LlamaMLP(cfg, o));
    this.child('input_layernorm', new RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, { dtype: o.dtype }));
    this.child('post_attention_layernorm', new RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, { dtype: o.dtype }));
  }
  forward(x: Tensor, ctx: ForwardContext, invFreq: Tensor): Tensor {
    const attn = this.getChild('self_attn') as LlamaAttention;
    const mlp = this.getChild('mlp') as LlamaMLP;
    const n1 = this.getChild('input_layernorm') as RMSNorm;
    const n2 = this.getChild('post_attention_layernorm') as RMSNorm;
    const a1 = n1.forward(x);
    const a2 = attn.forward(a1, ctx, invFreq);
    a1.free();
    const h = add(x, a2);
    a2.free();
    const m1 = n2.forward(h);
    const m2 = mlp.forward(m1);
    m1.free();
    const out = add(h, m2);
    m2.free();
    h.free();
    return out;
  }
}

export class LlamaModel extends Module {
  readonly layers: ModuleList<LlamaDecoderLayer>;
  constructor(cfg: ModelConfig, o: InitOptions) {
    super();
    this.child(
      'embed_tokens',
      new Embedding(cfg.vocab_size, cfg.hidden_size, { dtype: o.dtype, rng: o.rng, empty: o.empty }),
    );
    this.layers = this.child(
      'layers',
      new ModuleList(Array.from({ length: cfg.num_hidden_layers }, (_, i) => new LlamaDecoderLayer(cfg, i, o))),
    );
    this.child('norm', new RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, { dtype: o.dtype }));
  }
}

/** Wraps a decoder layer call, e.g. with gradient checkpointing. */
export type LayerRunner = (layer: LlamaDecoderLayer, x: Tensor, ctx: ForwardContext, invFreq: Tensor) => Tensor;

export class LlamaForCausalLM extends Module {
  readonly invFreq: Tensor;
  layerRunner: LayerRunner | null = null;

  constructor(
    readonly config: ModelConfig,
    o: InitOptions = {},
  ) {
    super();
    this.child('model', new LlamaModel(config, o));
    if (!config.tie_word_embeddings)
      this.child(
        'lm_head',
        new Linear(config.hidden_size, config.vocab_size, { dtype: o.dtype, rng: o.rng, empty: o.empty }),
      );
    this.invFreq = keep(ropeInvFreq(config.rope));
  }

  get inner(): LlamaModel {
    return this.getChild('model') as LlamaModel;
  }

  /**
   * The decoding layout, for inference only: every dense, frozen Linear weight [out, in] is stored as its
   * transpose [in, out] and kept as a transposed view (the same logical tensor, so every op reads it as
   * before), and with tied embeddings the head gets a transposed copy of the table. A decode step's products
   * (a few rows of activations against each weight) then read each weight along its rows, once, at memory
   * speed; the results are bit-identical to the default layout. Costs a transient copy of one weight at a
   * time, plus the head's copy when tied. Use a model without it to train, merge or save.
   */
  useDecodeLayout(): void {
    const movable = (w: Tensor) =>
      w.ndim === 2 && w.isContiguous() && !w.requiresGrad && w.dtype !== 'i32' && w.dtype !== 'u8';
    // Every weight re-stored here goes into one fresh buffer per dtype, backed by huge pages where the system
    // allows: decoding streams all of them once per token.
    const sizes = new Map<DType, number>();
    const need = (w: Tensor) => sizes.set(w.dtype, (sizes.get(w.dtype) ?? 0) + WeightArena.span(w.size));
    for (const [, m] of this.namedModules()) if (m instanceof Linear && movable(m.weight)) need(m.weight);
    const tiedHead = !this.getChild('lm_head') && !this.headT;
    if (tiedHead) need(this.lmHeadWeight);
    const arena = new WeightArena(sizes);
    const move = (m: Module | undefined) => {
      if (m instanceof Linear && movable(m.weight)) m.setParam('weight', storedTransposed(m.weight, arena));
    };
    // in the order a forward reads them: the backend reads ahead of each product what follows its weight
    for (const layer of this.inner.layers.items) {
      const attn = layer.getChild('self_attn') as LlamaAttention;
      const mlp = layer.getChild('mlp') as LlamaMLP;
      attn.fusedQKV ??= fuseLinears(attn, ['q_proj', 'k_proj', 'v_proj'], arena);
      for (const n of ['q_proj', 'k_proj', 'v_proj', 'o_proj']) move(attn.getChild(n));
      mlp.fusedGateUp ??= fuseLinears(mlp, ['gate_proj', 'up_proj'], arena);
      for (const n of ['gate_proj', 'up_proj', 'down_proj']) move(mlp.getChild(n));
    }
    for (const [, m] of this.namedModules()) move(m);
    if (tiedHead) this.headT = keep(storedTransposed(this.lmHeadWeight, arena));
    arena.dispose();
  }

  private headT: Tensor | null = null;

  /**
   * The weights a decoding step reads, when the model is plain in the decoding layout: q/k/v and gate/up fused,
   * every other projection a plain Linear (no adapter), SiLU MLPs, no layer runner. Null otherwise (the step
   * then runs the module forward). See decode-plan.ts.
   */
  decodeWeights(): DecodeWeights | null {
    const cfg = this.config;
    if (this.layerRunner || cfg.hidden_act !== 'silu') return null;
    // a wrapper (LoraModel) that takes over the forward, or any module replaced by another kind, keeps the
    // module forward
    const proto = LlamaForCausalLM.prototype;
    if (this.hidden !== proto.hidden || this.head !== proto.head || this.forward !== proto.forward) return null;
    const plain = (m: Module | undefined): m is Linear => m?.constructor === Linear;
    const norm = (m: Module | undefined): m is RMSNorm => m?.constructor === RMSNorm;
    const head = this.getChild('lm_head');
    if (head && !plain(head)) return null;
    const embed = this.inner.getChild('embed_tokens');
    if (embed?.constructor !== Embedding || !norm(this.inner.getChild('norm'))) return null;
    const layers: DecodeLayerWeights[] = [];
    for (const layer of this.inner.layers.items) {
      const attn = layer.getChild('self_attn') as LlamaAttention;
      const mlp = layer.getChild('mlp') as LlamaMLP;
      const o = attn.getChild('o_proj');
      const down = mlp.getChild('down_proj');
      if (!fusedInForce(attn, attn.fusedQKV) || !fusedInForce(mlp, mlp.fusedGateUp)) return null;
      if (!plain(o) || !plain(down)) return null;
      const norms = ['input_layernorm', 'post_attention_layernorm'].map((n) => layer.getChild(n));
      if (!norms.every(norm) || (cfg.qk_norm && !['q_norm', 'k_norm'].every((n) => norm(attn.getChild(n)))))
        return null;
      layers.push({
        inputNorm: (layer.getChild('input_layernorm') as RMSNorm).weight,
        qkv: attn.fusedQKV.w,
        qkvBias: attn.fusedQKV.bias,
        qNorm: cfg.qk_norm ? (attn.getChild('q_norm') as RMSNorm).weight : null,
        kNorm: cfg.qk_norm ? (attn.getChild('k_norm') as RMSNorm).weight : null,
        o: o.weight,
        oBias: o.bias,
        postNorm: (layer.getChild('post_attention_layernorm') as RMSNorm).weight,
        gateUp: mlp.fusedGateUp.w,
        down: down.weight,
        downBias: down.bias,
      });
    }
    return {
      embed: (this.inner.getChild('embed_tokens') as Embedding).weight,
      layers,
      norm: (this.inner.getChild('norm') as RMSNorm).weight,
      head: head ? (head as Linear).weight : (this.headT ?? this.lmHeadWeight),
      headBias: head ? (head as Linear).bias : null,
      invFreq: this.invFreq,
    };
  }

  /** The output head's weight [V, H] (the embedding table when tied). */
  get lmHeadWeight(): Tensor {
    const head = this.getChild('lm_head') as Linear | undefined;
    return head ? head.weight : (this.inner.getChild('embed_tokens') as Embedding).weight;
  }

  /** Final hidden states [B, T, H] for ids [B, T]. */
  hidden(ids: Tensor, ctx: ForwardContext): Tensor {
    if (ids.ndim !== 2 || ids.dtype !== 'i32')
      throw new ShapeError(
        `LlamaForCausalLM: input ids must be i32 [batch, seq], got ${fmtShape(ids.shape)} ${ids.dtype}`,
      );
    const m = this.inner;
    let x = (m.getChild('embed_tokens') as Embedding).forward(ids);
    for (const layer of m.layers.items)
      x = this.layerRunner ? this.layerRunner(layer, x, ctx, this.invFreq) : layer.forward(x, ctx, this.invFreq);
    return (m.getChild('norm') as RMSNorm).forward(x);
  }

  /** Logits [B, T, V]. */
  forward(ids: Tensor, ctx: ForwardContext): Tensor {
    return this.head(this.hidden(ids, ctx));
  }

  /** The output head on hidden states [..., H] -> logits [..., V]. */
  head(h: Tensor): Tensor {
    const head = this.getChild('lm_head') as LinearLike | undefined;
    return head ? head.forward(h) : linear(h, this.headT ?? this.lmHeadWeight);
  }

  /** Mean cross-entropy over labels != -100 (labels already shifted: label[t] is the target for position t). */
  loss(ids: Tensor, labels: Tensor, ctx: ForwardContext): Tensor {
    const logits = this.forward(ids, ctx);
    const V = this.config.vocab_size;
    return crossEntropy(reshape(logits, [-1, V]), reshape(labels, [-1]));
  }

  override dispose(): void {
    for (const layer of this.inner.layers.items) {
      for (const f of [
        (layer.getChild('self_attn') as LlamaAttention).fusedQKV,
        (layer.getChild('mlp') as LlamaMLP).fusedGateUp,
      ]) {
        f?.w.dispose();
        f?.bias?.dispose();
      }
    }
    super.dispose();
    this.invFreq.dispose();
    this.headT?.dispose();
    this.headT = null;
  }
}

/**
 * Fresh contiguous pieces of a few large buffers (one per dtype, sized up front, in huge pages where the
 * backend can): views keep the memory alive after dispose().
 */
class WeightArena {
  private readonly bufs = new Map<DType, { t: Tensor; off: number }>();
  /** Elements a piece of n takes: pieces start 64 bytes apart at least. */
  static span(n: number): number {
    return Math.ceil(n / 32) * 32;
  }
  constructor(sizes: Map<DType, number>) {
    for (const [dt, n] of sizes) if (n > 0) this.bufs.set(dt, { t: emptyStreamed([n], dt), off: 0 });
  }
  /** A contiguous zeroed [rows, cols] tensor. */
  take(rows: number, cols: number, dtype: DType): Tensor {
    const b = this.bufs.get(dtype);
    const n = rows * cols;
    if (!b || b.off + n > b.t.size) return empty([rows, cols], dtype);
    const v = b.t.view([rows, cols], [cols, 1], b.off);
    b.off += WeightArena.span(n);
    return v;
  }
  dispose(): void {
    for (const b of this.bufs.values()) b.t.dispose();
    this.bufs.clear();
  }
}

/** w [R, C] (contiguous) as a view [R, C] with strides [1, R] over a new contiguous [C, R] copy from the arena. */
function storedTransposed(w: Tensor, arena: WeightArena): Tensor {
  const [r, c] = w.shape as [number, number];
  const t = arena.take(c, r, w.dtype);
  const wt = w.view([c, r], [1, c], w.offset);
  getBackend().copy(wt, t);
  wt.dispose();
  const v = t.view([r, c], [1, r], t.offset);
  t.dispose();
  return v;
}

/**
 * Linears of one module that read the same input, stored as one decoding-layout weight [in, sum of outs]:
 * each keeps a transposed view of its own columns as its weight, and one product gives all their outputs
 * (bit-identical: every output element's FMA chain is its own).
 */
interface FusedLinears {
  names: string[];
  parts: Linear[];
  /** The views set as the parts' weights: while they are in place, the fused product stands for the parts. */
  weights: Tensor[];
  w: Tensor;
  bias: Tensor | null;
  sizes: number[];
}

function fuseLinears(owner: Module, names: string[], arena: WeightArena): FusedLinears | null {
  const parts = names.map((n) => owner.getChild(n));
  if (!parts.every((p): p is Linear => p instanceof Linear)) return null;
  const w0 = parts[0]!.weight;
  const fusable = (p: Linear) =>
    p.weight.ndim === 2 &&
    p.weight.isContiguous() &&
    !p.weight.requiresGrad &&
    p.weight.dtype === w0.dtype &&
    p.weight.shape[1] === w0.shape[1] &&
    !!p.bias === !!parts[0]!.bias &&
    !p.bias?.requiresGrad;
  if (!parts.every(fusable) || (w0.dtype !== 'f32' && w0.dtype !== 'bf16' && w0.dtype !== 'f16')) return null;
  const K = w0.shape[1]!;
  const sizes = parts.map((p) => p.weight.shape[0]!);
  const N = sizes.reduce((a, b) => a + b, 0);
  const t = arena.take(K, N, w0.dtype);
  let off = 0;
  const weights = parts.map((p, i) => {
    const w = p.weight;
    const wt = w.view([K, sizes[i]!], [1, K], w.offset);
    const dst = t.view([K, sizes[i]!], [N, 1], t.offset + off);
    getBackend().copy(wt, dst);
    wt.dispose();
    dst.dispose();
    const v = t.view([sizes[i]!, K], [1, N], t.offset + off);
    off += sizes[i]!;
    p.setParam('weight', v);
    return p.weight;
  });
  const bias = parts[0]!.bias
    ? keep(
        concat(
          parts.map((p) => p.bias!),
          0,
        ),
      )
    : null;
  const w = keep(t.view([N, K], [1, N], t.offset));
  t.dispose();
  return { names, parts: parts as Linear[], weights, w, bias, sizes };
}

/** Whether the fused product still stands for its parts (none replaced, e.g. wrapped by an adapter). */
function fusedInForce(owner: Module, f: FusedLinears | null): f is FusedLinears {
  return !!f?.names.every((n, i) => owner.getChild(n) === f.parts[i] && f.parts[i]!.weight === f.weights[i]);
}

/** The parts' outputs from one product, or null when the parts were replaced (e.g. wrapped by an adapter). */
function fusedOutputs(owner: Module, f: FusedLinears | null, x: Tensor): Tensor[] | null {
  if (!fusedInForce(owner, f)) return null;
  const y = linear(x, f.w, f.bias);
  const outs: Tensor[] = [];
  let off = 0;
  for (const n of f.sizes) {
    outs.push(slice(y, -1, off, off + n));
    off += n;
  }
  y.free();
  return outs;
}
