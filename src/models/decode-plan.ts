// A decoding step (one new token per row) as a fixed list of backend calls over buffers allocated once.
//
// The module forward spends a few milliseconds per token on the 135m shape in JavaScript around its ~400
// kernels (tensor objects, scopes, shape checks, fresh outputs), about a quarter of a bf16 step. The plan
// makes the same kernel calls with the same inputs (so the logits are bit-identical to the module forward,
// tested), but its products' arguments are built once and its intermediates live in buffers reused every
// step. It covers a plain model in the decoding layout (LlamaForCausalLM.decodeWeights); anything else
// (adapters, GELU MLPs, a layer runner) takes the module forward. Where the backend records plans (the native
// one), those calls are recorded once per KV cache and each step replays them in one native call, which leaves
// about 0.2 ms of JavaScript per 135m token.

import type { Backend, GemmArgs, RecordedPlan } from '../backend/backend.ts';
import { getBackend } from '../backend/index.ts';
import { ShapeError } from '../core/errors.ts';
import { keep } from '../core/scope.ts';
import type { Tensor } from '../core/tensor.ts';
import { Module } from '../nn/module.ts';
import { empty } from '../ops/create.ts';
import { gemmArgs, transposeView } from '../ops/matmul.ts';
import { type KVCache, positionsView } from './kv-cache.ts';
import type { DecodeWeights, LlamaForCausalLM } from './llama.ts';

/** A product x [rows, in] -> out [rows, out] (+ bias), its arguments built once. */
interface Product {
  args: GemmArgs;
  bias: Tensor | null;
}

export class DecodePlan {
  private readonly owned: Tensor[] = [];
  private readonly ids: Tensor;
  private readonly pos: Tensor;
  private readonly x: Tensor;
  private readonly h: Tensor;
  private readonly normed: Tensor;
  private readonly rstd: Tensor;
  private readonly qkv: Tensor;
  private readonly q: Tensor;
  private readonly k: Tensor;
  private readonly qRot: Tensor;
  private readonly kRot: Tensor;
  private readonly headRstd: Tensor | null;
  private readonly qNormed: Tensor | null;
  private readonly kNormed: Tensor | null;
  /** One row: the column slices of the fused outputs are contiguous, and the kernels read them in place. */
  private readonly contiguousQ: boolean;
  private readonly attn: Tensor;
  private readonly lse: Tensor;
  private readonly proj: Tensor;
  private readonly gateUp: Tensor;
  private readonly gate: Tensor;
  private readonly up: Tensor;
  private readonly act: Tensor;
  private readonly logits: Tensor;
  private readonly layers: { qkv: Product; o: Product; gateUp: Product; down: Product }[];
  private readonly head: Product;
  private readonly views: { qkv: Tensor[]; gateUp: Tensor[] };

  private constructor(
    private readonly model: LlamaForCausalLM,
    private readonly w: DecodeWeights,
    readonly batch: number,
  ) {
    this.version = Module.structureVersion;
    this.hidden = model.hidden;
    const cfg = model.config;
    const B = batch;
    const { hidden_size: H, num_attention_heads: nh, num_key_value_heads: nkv, head_dim: hd } = cfg;
    const I = cfg.intermediate_size;
    const V = w.head.shape[0]!;
    const buf = (shape: number[], dtype: 'f32' | 'i32' = 'f32') => {
      const t = keep(empty(shape, dtype));
      this.owned.push(t);
      return t;
    };
    this.ids = buf([B, 1], 'i32');
    this.pos = buf([B, 1], 'i32');
    this.x = buf([B, 1, H]);
    this.h = buf([B, 1, H]);
    this.normed = buf([B, 1, H]);
    this.rstd = buf([B]);
    this.qkv = buf([B, 1, (nh + 2 * nkv) * hd]);
    this.q = buf([B, 1, nh, hd]);
    this.k = buf([B, 1, nkv, hd]);
    this.qRot = buf([B, 1, nh, hd]);
    this.kRot = buf([B, 1, nkv, hd]);
    this.headRstd = cfg.qk_norm ? buf([B * nh]) : null;
    this.qNormed = cfg.qk_norm ? buf([B, 1, nh, hd]) : null;
    this.kNormed = cfg.qk_norm ? buf([B, 1, nkv, hd]) : null;
    this.attn = buf([B, 1, nh, hd]);
    this.lse = buf([B, nh, 1]);
    this.proj = buf([B, 1, H]);
    this.gateUp = buf([B, 1, 2 * I]);
    this.gate = buf([B, 1, I]);
    this.up = buf([B, 1, I]);
    this.act = buf([B, 1, I]);
    this.logits = buf([B, V]);
    // q, k, v and gate, up: column slices of the fused outputs, shaped as the module forward reshapes them
    const N = (nh + 2 * nkv) * hd;
    const col = (t: Tensor, off: number, shape: number[], strides: number[]) =>
      keep(t.view(shape, strides, t.offset + off));
    this.views = {
      qkv: [
        col(this.qkv, 0, [B, 1, nh, hd], [N, N, hd, 1]),
        col(this.qkv, nh * hd, [B, 1, nkv, hd], [N, N, hd, 1]),
        col(this.qkv, (nh + nkv) * hd, [B, 1, nkv, hd], [N, N, hd, 1]),
      ],
      gateUp: [col(this.gateUp, 0, [B, 1, I], [2 * I, 2 * I, 1]), col(this.gateUp, I, [B, 1, I], [2 * I, 2 * I, 1])],
    };
    this.owned.push(...this.views.qkv, ...this.views.gateUp);
    this.contiguousQ = [...this.views.qkv, ...this.views.gateUp].every((t) => t.isContiguous());
    const rows = (t: Tensor, n: number) => {
      const v = keep(t.view([B, n], [n, 1], t.offset));
      this.owned.push(v);
      return v;
    };
    const product = (x: Tensor, inF: number, weight: Tensor, bias: Tensor | null, out: Tensor, outF: number) => {
      const wt = keep(transposeView(weight));
      this.owned.push(wt);
      const { args, owned } = gemmArgs(rows(x, inF), wt, rows(out, outF), 1, bias ? 1 : 0);
      if (owned.length) throw new Error('DecodePlan: a weight needs a copy to be multiplied'); // decode layout only
      let bv: Tensor | null = null;
      if (bias) {
        bv = keep(bias.view([B, outF], [0, 1], bias.offset));
        this.owned.push(bv);
      }
      return { args, bias: bv };
    };
    this.layers = w.layers.map((l) => ({
      qkv: product(this.normed, H, l.qkv, l.qkvBias, this.qkv, N),
      o: product(this.attn, nh * hd, l.o, l.oBias, this.proj, H),
      gateUp: product(this.normed, H, l.gateUp, null, this.gateUp, 2 * I),
      down: product(this.act, I, l.down, l.downBias, this.proj, H),
    }));
    this.head = product(this.normed, H, w.head, w.headBias, this.logits, V);
  }

  /** A plan for the model's batch rows, or null where the model takes the module forward. */
  static build(model: LlamaForCausalLM, batch: number): DecodePlan | null {
    const w = model.decodeWeights();
    return w ? new DecodePlan(model, w, batch) : null;
  }

  /** Whether the model still is what the plan was built over (no adapter added since, same weights). */
  current(): boolean {
    if (Module.structureVersion === this.version && !this.model.layerRunner && this.model.hidden === this.hidden)
      return true;
    const w = this.model.decodeWeights();
    const same = (a: Tensor | null, b: Tensor | null) => a === b;
    const ok =
      !!w &&
      same(w.head, this.w.head) &&
      same(w.headBias, this.w.headBias) &&
      same(w.embed, this.w.embed) &&
      same(w.norm, this.w.norm) &&
      w.layers.every((l, i) => {
        const p = this.w.layers[i]!;
        return (Object.keys(l) as (keyof typeof l)[]).every((k) => same(l[k], p[k]));
      });
    if (ok) this.version = Module.structureVersion;
    return ok;
  }

  private version: number;
  private readonly hidden: LlamaForCausalLM['hidden'];

  /**
   * One token per row (ids[b] at position pos[b]), appended to the cache; returns the logits per row. The
   * cache's length advances by one. keyMask: i32 [B, length + 1] (1 = attend) where rows hold padding.
   */
  step(cache: KVCache, ids: readonly number[], pos: readonly number[], keyMask: Tensor | null = null): Float32Array[] {
    if (cache.length + 1 > cache.capacity)
      throw new ShapeError(`KV cache: ${cache.length + 1} positions exceed its capacity ${cache.capacity}`);
    const be = getBackend();
    (this.ids.data as Int32Array).set(ids);
    (this.pos.data as Int32Array).set(pos);
    be.embeddingForward(this.w.embed, this.ids, this.x, this.w.embed.shape[0]!, this.model.config.hidden_size);
    const plan = DecodePlan.record ? this.recorded(be, cache) : null;
    if (plan) plan.run(cache.length, keyMask);
    else this.calls(be, cache, cache.length, keyMask, null);
    this.replayed = plan !== null;
    cache.length += 1;
    const V = this.logits.shape[1]!;
    const all = this.logits.data as Float32Array;
    return Array.from({ length: this.batch }, (_, b) => all.slice(b * V, (b + 1) * V));
  }

  /**
   * The backend's recording of the step's calls for this cache (one native call per step instead of ~400
   * from JavaScript), or null where the backend records none. Recorded once per cache and backend.
   */
  private recorded(be: Backend, cache: KVCache): RecordedPlan | null {
    const r = this.native;
    if (r && r.cache === cache && r.be === be) return r.plan;
    r?.plan?.dispose();
    this.native = null;
    const plan = be.recordPlan?.((dynamic) => this.calls(be, cache, 0, null, dynamic)) ?? null;
    this.native = { cache, be, plan };
    return plan;
  }

  private native: { cache: KVCache; be: Backend; plan: RecordedPlan | null } | null = null;
  /** Whether steps replay the backend's recording where it makes one (tests turn it off to compare). */
  static record = true;
  /** Whether the last step ran as a replayed recording. */
  replayed = false;

  /**
   * The step's kernel calls after the embedding, for L positions already in the cache. While recording
   * (dynamic given), the calls that depend on L are marked and made for L = 0.
   */
  private calls(
    be: Backend,
    cache: KVCache,
    L: number,
    keyMask: Tensor | null,
    dynamic: ((step: number) => void) | null,
  ): void {
    const cfg = this.model.config;
    const B = this.batch;
    const { hidden_size: H, num_attention_heads: nh, head_dim: hd } = cfg;
    const eps = cfg.rms_norm_eps;
    const run = (p: Product) => {
      if (p.bias) be.copy(p.bias, p.args.c);
      be.gemm(p.args);
    };
    const [qv, kv, vv] = this.views.qkv as [Tensor, Tensor, Tensor];
    const scale = 1 / Math.sqrt(hd);
    this.w.layers.forEach((lw, l) => {
      const lp = this.layers[l]!;
      be.rmsNormForward(this.x, lw.inputNorm, this.normed, this.rstd, B, H, eps);
      run(lp.qkv);
      // the kernels take contiguous inputs, as the module forward's ops hand them (copied where a column slice
      // is not: more than one row)
      let q = this.contiguousQ ? qv : this.q;
      let k = this.contiguousQ ? kv : this.k;
      if (!this.contiguousQ) {
        be.copy(qv, this.q);
        be.copy(kv, this.k);
      }
      if (lw.qNorm && lw.kNorm) {
        be.rmsNormForward(q, lw.qNorm, this.qNormed!, this.headRstd!, B * nh, hd, eps);
        be.rmsNormForward(k, lw.kNorm, this.kNormed!, this.headRstd!, B * cfg.num_key_value_heads, hd, eps);
        q = this.qNormed!;
        k = this.kNormed!;
      }
      be.ropeForward(q, this.pos, this.w.invFreq, this.qRot);
      be.ropeForward(k, this.pos, this.w.invFreq, this.kRot);
      const K = cache.k[l]!;
      const Vc = cache.v[l]!;
      const kd = positionsView(K, L, 1);
      const vd = positionsView(Vc, L, 1);
      dynamic?.(hd);
      be.copy(this.kRot, kd);
      dynamic?.(hd);
      be.copy(vv, vd);
      kd.dispose();
      vd.dispose();
      const ka = positionsView(K, 0, L + 1);
      const va = positionsView(Vc, 0, L + 1);
      dynamic?.(1);
      be.attentionForward({ q: this.qRot, k: ka, v: va, scale, keyMask, seqIds: null, window: 0 }, this.attn, this.lse);
      ka.dispose();
      va.dispose();
      run(lp.o);
      be.binary('add', this.x, this.proj, this.h);
      be.rmsNormForward(this.h, lw.postNorm, this.normed, this.rstd, B, H, eps);
      run(lp.gateUp);
      if (this.contiguousQ) {
        be.swigluForward(this.views.gateUp[0]!, this.views.gateUp[1]!, this.act);
      } else {
        be.copy(this.views.gateUp[0]!, this.gate);
        be.copy(this.views.gateUp[1]!, this.up);
        be.swigluForward(this.gate, this.up, this.act);
      }
      run(lp.down);
      be.binary('add', this.h, this.proj, this.x);
    });
    be.rmsNormForward(this.x, this.w.norm, this.normed, this.rstd, B, H, eps);
    run(this.head);
  }

  dispose(): void {
    this.native?.plan?.dispose();
    this.native = null;
    for (const t of this.owned) t.dispose();
    this.owned.length = 0;
  }
}
