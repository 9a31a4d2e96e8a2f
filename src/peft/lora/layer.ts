// LoRA layers, named as PEFT names them so parameter paths match (q_proj.base_layer.weight,
// q_proj.lora_A.<adapter>.weight, q_proj.lora_B.<adapter>.weight, q_proj.lora_magnitude_vector.<adapter>.weight,
// embed_tokens.lora_embedding_A.<adapter>, lm_head.modules_to_save.<adapter>.weight).
//
// LoraLinear wraps a Linear (or any linear-like base with forward(x)): y = base(x) + s B A dropout(x) per active
// adapter, DoRA where configured, PEFT's forward rules for merged/disabled states, and per-row adapter selection
// for mixed batches. With a plain Linear base the first adapter runs fused with the base product (ops.ts).

import { getBackend } from '../../backend/index.ts';
import { ConfigError, fmtShape, LowrankError, ShapeError } from '../../core/errors.ts';
import type { Rng } from '../../core/rng.ts';
import { keep } from '../../core/scope.ts';
import type { Tensor } from '../../core/tensor.ts';
import { Embedding, Linear, RMSNorm } from '../../nn/layers.ts';
import { Module } from '../../nn/module.ts';
import { empty } from '../../ops/create.ts';
import { dropout } from '../../ops/dropout.ts';
import { add, addScalar, div, mul, scale, sub } from '../../ops/elementwise.ts';
import { embedding } from '../../ops/embedding.ts';
import { gemmInto, linear } from '../../ops/matmul.ts';
import { indexSelect, transpose } from '../../ops/shape.ts';
import { noGrad } from '../../ops/tape.ts';
import { addRowsAt, doraLinear, doraWeightNorm, loraLinear, loraMixedRows, type RowGroup } from './ops.ts';

/** Raised when a merge would write non-finite weights (safe merge) or cannot be done. */
export class MergeError extends LowrankError {}

/** Adapter names of PEFT's mixed batches: one per batch row; this name (or null) means the base model. */
export const BASE_ROW = '__base__';

/** Rows of one batch grouped by adapter and scale (built once per forward by the LoraModel). */
export interface RowGroups {
  batch: number;
  /** `scale` multiplies the adapter's scaling for these rows (1 when absent): a request's scaled adapter. */
  groups: { name: string | null; idx: Tensor; scale?: number }[];
}

/** State shared by every adapter layer of one LoraModel. */
export class AdapterRuntime {
  /** Active adapters, in order (their outputs are summed). */
  active: string[] = [];
  /** Per-adapter multipliers of the scaling (PEFT's set_scale); 1 when absent. */
  readonly weights = new Map<string, number>();
  /** Adapters switched off: every layer gives its base output. */
  disabled = false;
  /** Per-row adapter selection of the current forward, or null. */
  rows: RowGroups | null = null;
  constructor(readonly rng: Rng) {}
  weight(name: string): number {
    return this.weights.get(name) ?? 1;
  }
}

/** A dict of child modules keyed by adapter name (PEFT's ModuleDict); entries can be deleted. */
export class ModuleDict<M extends Module = Module> extends Module {
  private readonly items = new Map<string, M>();
  override child<T extends Module>(name: string, m: T): T {
    this.items.set(name, m as unknown as M);
    return m;
  }
  override getChild(name: string): Module | undefined {
    return this.items.get(name);
  }
  get(name: string): M | undefined {
    return this.items.get(name);
  }
  has(name: string): boolean {
    return this.items.has(name);
  }
  keys(): string[] {
    return [...this.items.keys()];
  }
  delete(name: string): void {
    this.items.get(name)?.dispose();
    this.items.delete(name);
  }
  override *namedChildren(): Iterable<[string, Module]> {
    yield* this.items;
  }
  override *namedModules(prefix = ''): Iterable<[string, Module]> {
    yield [prefix, this];
    for (const [n, c] of this.items) yield* c.namedModules(prefix ? `${prefix}.${n}` : n);
  }
  override *namedParameters(prefix = ''): Iterable<[string, Tensor]> {
    for (const [n, c] of this.items) yield* c.namedParameters(prefix ? `${prefix}.${n}` : n);
  }
}

/** Parameters keyed by adapter name (PEFT's ParameterDict: lora_embedding_A.<adapter>). */
export class ParameterDict extends Module {
  set(name: string, t: Tensor, trainable: boolean): void {
    this.param(name, t, trainable);
  }
  get(name: string): Tensor | null {
    return this.getParam(name);
  }
  has(name: string): boolean {
    return this.getParam(name) !== null;
  }
  delete(name: string): void {
    if (this.getParam(name)) this.param(name, null);
  }
}

/** One adapter matrix as a Linear-like module with `weight` (and lora_B's optional `bias`), as PEFT's nn.Linear holders. */
export class LoraWeight extends Module {
  constructor(weight: Tensor, bias: Tensor | null = null, trainable = false) {
    super();
    this.param('weight', weight, trainable);
    if (bias) this.param('bias', bias, trainable);
  }
  get weight(): Tensor {
    return this.getParam('weight')!;
  }
  get bias(): Tensor | null {
    return this.getParam('bias');
  }
  /** x W^T (+ b), as PEFT's nn.Linear holders compute. */
  forward(x: Tensor): Tensor {
    return linear(x, this.weight, this.bias);
  }
}

/** What one layer keeps per adapter. */
export interface LayerAdapter {
  r: number;
  alpha: number;
  /** alpha / r, or alpha / sqrt(r) with rsLoRA (before the runtime weight). */
  scaling: number;
  useDora: boolean;
  dropout: number;
  loraBias: boolean;
}

/** A linear layer LoRA can wrap: a Linear, or a quantized layer with the same surface. */
export interface LinearBase extends Module {
  readonly inFeatures: number;
  readonly outFeatures: number;
  forward(x: Tensor): Tensor;
}

function setTrainable(m: Module | undefined, on: boolean): void {
  if (m) for (const p of m.parameters()) p.requiresGrad = on;
}

/** y[..., :] = t[..., :] * v (v [n] broadcast over the last axis) in place, through the backend. */
function scaleLastAxisInPlace(t: Tensor, v: Tensor, rows: number, cols: number, invert: boolean): void {
  const be = getBackend();
  const f = empty([cols]);
  be.copy(v, f);
  if (invert) be.unary('recip', f, f);
  const fv = f.view([rows, cols], [0, 1], 0);
  be.binary('mul', t, fv, t);
  fv.dispose();
  f.dispose();
}

/** Per-column scaling (an embedding table [V, D] times v [D]) or per-row ([out, in] times v [out]). */
function scaleRowsInPlace(t: Tensor, v: Tensor, invert: boolean): void {
  const be = getBackend();
  const [rows, cols] = t.shape as [number, number];
  const f = empty([rows]);
  be.copy(v, f);
  if (invert) be.unary('recip', f, f);
  const fv = f.view([rows, cols], [1, 0], 0);
  be.binary('mul', t, fv, t);
  fv.dispose();
  f.dispose();
}

function allFinite(t: Tensor): boolean {
  const v = t.toF32();
  for (let i = 0; i < v.length; i++) if (!Number.isFinite(v[i]!)) return false;
  return true;
}

/** Common adapter bookkeeping of LoraLinear and LoraEmbedding. */
abstract class LoraLayerBase extends Module {
  readonly adapters = new Map<string, LayerAdapter>();
  /** Merged adapters, in merge order (unmerged last-in first-out). */
  merged: string[] = [];
  /** DoRA weight norms of merged adapters, needed to unmerge exactly. */
  protected readonly normCache = new Map<string, Tensor>();

  constructor(
    readonly rt: AdapterRuntime,
    /** The module path in the model (for messages). */
    readonly path: string,
  ) {
    super();
  }

  has(name: string): boolean {
    return this.adapters.has(name);
  }

  /** s = alpha / r (or / sqrt r) times the adapter's weight, times a per-row scale in mixed batches. */
  scalingOf(name: string, rowScale = 1): number {
    return this.adapters.get(name)!.scaling * (this.rt.weight(name) * rowScale);
  }

  /** Marks which adapters train: the listed ones (unless frozen), no others. */
  setTrainable(active: readonly string[], trainable: boolean): void {
    for (const n of this.adapters.keys()) this.setAdapterTrainable(n, trainable && active.includes(n));
  }
  /** Switches one adapter's parameters in this layer on or off for training (the others are left alone). */
  abstract setAdapterTrainable(name: string, on: boolean): void;
  abstract deleteAdapter(name: string): void;
  abstract mergeAdapter(name: string, safe: boolean): void;
  abstract unmergeAdapter(name: string): void;
  abstract get base(): Module;

  /** Merges the given adapters (default: the active ones present here) into the base weight. */
  merge(names?: readonly string[], safe = false): void {
    for (const n of names ?? this.rt.active) {
      if (!this.adapters.has(n) || this.merged.includes(n)) continue;
      this.mergeAdapter(n, safe);
      this.merged.push(n);
    }
  }

  unmerge(): void {
    while (this.merged.length) this.unmergeAdapter(this.merged.pop()!);
  }

  protected checkRows(x: Tensor, rows: RowGroups): void {
    if (x.shape[0] !== rows.batch)
      throw new ShapeError(
        `${this.path}: adapter rows name ${rows.batch} adapters but the batch has ${x.shape[0]} rows (${fmtShape(x.shape)})`,
      );
    if (this.merged.length)
      throw new ConfigError(
        `${this.path}: per-row adapters cannot be used while adapters are merged; unmerge them first`,
      );
  }

  override dispose(): void {
    super.dispose();
    for (const t of this.normCache.values()) t.dispose();
    this.normCache.clear();
  }
}

export class LoraLinear extends LoraLayerBase implements LinearBase {
  constructor(base: LinearBase, rt: AdapterRuntime, path: string) {
    super(rt, path);
    this.child('base_layer', base);
    this.child('lora_A', new ModuleDict<LoraWeight>());
    this.child('lora_B', new ModuleDict<LoraWeight>());
    this.child('lora_magnitude_vector', new ModuleDict<LoraWeight>());
  }

  get base(): LinearBase {
    return this.getChild('base_layer') as LinearBase;
  }
  get inFeatures(): number {
    return this.base.inFeatures;
  }
  get outFeatures(): number {
    return this.base.outFeatures;
  }
  /** The base weight (used where the model reads a head's weight directly). */
  get weight(): Tensor {
    return this.plainBase('read the weight of').weight;
  }
  get bias(): Tensor | null {
    const b = this.base;
    return b instanceof Linear ? b.bias : null;
  }
  get loraA(): ModuleDict<LoraWeight> {
    return this.getChild('lora_A') as ModuleDict<LoraWeight>;
  }
  get loraB(): ModuleDict<LoraWeight> {
    return this.getChild('lora_B') as ModuleDict<LoraWeight>;
  }
  get magnitude(): ModuleDict<LoraWeight> {
    return this.getChild('lora_magnitude_vector') as ModuleDict<LoraWeight>;
  }

  private plainBase(what: string): Linear {
    const b = this.base;
    if (!(b instanceof Linear))
      throw new ConfigError(
        `${this.path}: cannot ${what} a ${b.constructor.name} base layer (a plain Linear is needed)`,
      );
    return b;
  }

  /** Adds an adapter with its initial A [r, in], B [out, r] (and B's bias) as f32 host arrays. */
  addAdapter(name: string, ad: LayerAdapter, a: Tensor, b: Tensor, loraBias: Tensor | null): void {
    if (this.adapters.has(name)) throw new ConfigError(`${this.path}: adapter '${name}' already exists`);
    if (ad.useDora) this.plainBase('apply DoRA to');
    this.adapters.set(name, ad);
    this.loraA.child(name, new LoraWeight(a));
    this.loraB.child(name, new LoraWeight(b, loraBias));
    if (ad.useDora) {
      // m = ||W + s B A||_row (PEFT's DoRA init; = ||W|| at the default init where B = 0)
      const base = this.plainBase('apply DoRA to');
      const m = doraWeightNorm(base.weight, a, b, ad.scaling);
      this.magnitude.child(name, new LoraWeight(m));
    }
  }

  deleteAdapter(name: string): void {
    if (this.merged.includes(name))
      throw new ConfigError(`${this.path}: adapter '${name}' is merged; unmerge it first`);
    this.adapters.delete(name);
    for (const d of [this.loraA, this.loraB, this.magnitude]) d.delete(name);
  }

  setAdapterTrainable(name: string, on: boolean): void {
    setTrainable(this.loraA.get(name), on);
    setTrainable(this.loraB.get(name), on);
    setTrainable(this.magnitude.get(name), on);
  }

  /** ΔW = s B A, f32 [out, in]. */
  deltaWeight(name: string): Tensor {
    const d = empty([this.outFeatures, this.inFeatures]);
    gemmInto(this.loraB.get(name)!.weight, this.loraA.get(name)!.weight, d, this.scalingOf(name), 0);
    return d;
  }

  mergeAdapter(name: string, safe: boolean): void {
    const base = this.plainBase('merge into');
    const ad = this.adapters.get(name)!;
    const be = getBackend();
    const W = base.weight;
    const s = this.scalingOf(name);
    noGrad(() => {
      const w32 = empty(W.shape);
      be.copy(W, w32);
      const d = this.deltaWeight(name);
      let norm: Tensor | null = null;
      if (ad.useDora) {
        // W' = (m / ||W + ΔW||) (W + ΔW), the norm kept to unmerge
        norm = doraWeightNorm(W, this.loraA.get(name)!.weight, this.loraB.get(name)!.weight, s);
        be.binary('add', w32, d, w32);
        const k = empty(norm.shape);
        be.binary('div', this.magnitude.get(name)!.weight, norm, k);
        scaleRowsInPlace(w32, k, false);
        k.dispose();
      } else be.binary('add', w32, d, w32);
      d.dispose();
      let newBias: Tensor | null = null;
      const lb = this.loraB.get(name)!.bias;
      if (ad.loraBias && lb) {
        if (!base.bias)
          throw new MergeError(
            `${this.path}: adapter '${name}' has lora_bias but the base layer has no bias to merge into`,
          );
        newBias = empty([this.outFeatures]);
        be.copy(base.bias, newBias);
        const t = empty([this.outFeatures]);
        be.unary('scale', lb, t, s);
        be.binary('add', newBias, t, newBias);
        t.dispose();
      }
      if (safe && (!allFinite(w32) || (newBias && !allFinite(newBias)))) {
        w32.dispose();
        newBias?.dispose();
        norm?.dispose();
        throw new MergeError(
          `${this.path}: merging adapter '${name}' gives non-finite weights (NaN or infinity); the adapter seems to be broken, nothing was changed`,
        );
      }
      be.copy(w32, W);
      w32.dispose();
      if (newBias) {
        be.copy(newBias, base.bias!);
        newBias.dispose();
      }
      if (norm) this.normCache.set(name, keep(norm));
    });
  }

  unmergeAdapter(name: string): void {
    const base = this.plainBase('unmerge from');
    const ad = this.adapters.get(name);
    if (!ad) return;
    const be = getBackend();
    const W = base.weight;
    noGrad(() => {
      const w32 = empty(W.shape);
      be.copy(W, w32);
      if (ad.useDora) {
        const norm = this.normCache.get(name)!;
        const k = empty(norm.shape);
        be.binary('div', this.magnitude.get(name)!.weight, norm, k);
        scaleRowsInPlace(w32, k, true);
        k.dispose();
        norm.dispose();
        this.normCache.delete(name);
      }
      const d = this.deltaWeight(name);
      be.binary('sub', w32, d, w32);
      d.dispose();
      be.copy(w32, W);
      w32.dispose();
      const lb = this.loraB.get(name)!.bias;
      if (ad.loraBias && lb && base.bias) {
        const t = empty([this.outFeatures]);
        be.copy(base.bias, t);
        const u = empty([this.outFeatures]);
        be.unary('scale', lb, u, this.scalingOf(name));
        be.binary('sub', t, u, t);
        be.copy(t, base.bias);
        t.dispose();
        u.dispose();
      }
    });
  }

  forward(x: Tensor): Tensor {
    const rt = this.rt;
    const base = this.base;
    if (rt.disabled) {
      if (this.merged.length) this.unmerge();
      return base.forward(x);
    }
    if (rt.rows) return this.mixedForward(x, rt.rows);
    if (this.merged.length) return base.forward(x);
    const active = rt.active.filter((n) => this.adapters.has(n));
    if (active.length === 0) return base.forward(x);
    const plain = base instanceof Linear ? base : null;
    let result: Tensor | null = null;
    for (const name of active) {
      const ad = this.adapters.get(name)!;
      const s = this.scalingOf(name);
      const A = this.loraA.get(name)!.weight;
      const Bm = this.loraB.get(name)!;
      const drop = this.training && ad.dropout > 0;
      const xl = drop ? dropout(x, ad.dropout, rt.rng, true) : x;
      if (!ad.useDora) {
        if (result === null && plain)
          result = loraLinear(x, plain.weight, plain.bias, A, Bm.weight, s, { xl, loraBias: Bm.bias });
        else {
          result ??= base.forward(x);
          const lora = loraLinear(xl, null, null, A, Bm.weight, s, { loraBias: Bm.bias });
          const sum = add(result, lora);
          result.free();
          lora.free();
          result = sum;
        }
        continue;
      }
      const lin = this.plainBase('apply DoRA to');
      const m = this.magnitude.get(name)!.weight;
      if (result === null) {
        result = doraLinear(x, lin.weight, lin.bias, A, Bm.weight, m, s, { xl });
        continue;
      }
      // DoRA after other adapters (PEFT): the running result minus the bias is rescaled too
      const norm = doraWeightNorm(lin.weight, A, Bm.weight, s);
      const k = div(m, norm);
      const baseResult = drop ? linear(xl, lin.weight) : lin.bias ? sub(result, lin.bias) : result;
      const lora = loraLinear(xl, null, null, A, Bm.weight, s);
      result = add(result, add(mul(baseResult, addScalar(k, -1)), mul(lora, k)));
    }
    return result!;
  }

  /** PEFT's _mixed_batch_forward: the base on the whole batch, then one shrink and one expand per adapter group. */
  private mixedForward(x: Tensor, rows: RowGroups): Tensor {
    this.checkRows(x, rows);
    const groups: RowGroup[] = [];
    const loraA = this.loraA;
    const loraB = this.loraB;
    const rt = this.rt;
    const weighted = rt.weights.size > 0;
    for (const g of rows.groups) {
      const ad = g.name === null ? undefined : this.adapters.get(g.name);
      if (!ad) continue;
      const name = g.name!;
      if (ad.useDora)
        throw new ConfigError(`${this.path}: per-row adapters cannot use DoRA adapters ('${name}'), as in PEFT`);
      const Bm = loraB.get(name)!;
      groups.push({
        idx: g.idx,
        a: loraA.get(name)!.weight,
        b: Bm.weight,
        scale: ad.scaling * ((weighted ? rt.weight(name) : 1) * (g.scale ?? 1)), // = scalingOf(name, g.scale)
        loraBias: Bm.bias,
      });
    }
    const base = this.base.forward(x);
    // base is this forward's own temporary: without a gradient the adapters' rows are added into it
    return groups.length ? loraMixedRows(base, x, groups, { inPlace: true }) : base;
  }
}

/** LoRA on an embedding: y = E[ids] + s (A^T[ids]) B^T with lora_embedding_A [r, V], lora_embedding_B [D, r]. */
export class LoraEmbedding extends LoraLayerBase {
  constructor(base: Embedding, rt: AdapterRuntime, path: string) {
    super(rt, path);
    this.child('base_layer', base);
    this.child('lora_embedding_A', new ParameterDict());
    this.child('lora_embedding_B', new ParameterDict());
    this.child('lora_magnitude_vector', new ModuleDict<LoraWeight>());
  }
  get base(): Embedding {
    return this.getChild('base_layer') as Embedding;
  }
  get weight(): Tensor {
    return this.base.weight;
  }
  get numEmbeddings(): number {
    return this.base.numEmbeddings;
  }
  get dim(): number {
    return this.base.dim;
  }
  get embA(): ParameterDict {
    return this.getChild('lora_embedding_A') as ParameterDict;
  }
  get embB(): ParameterDict {
    return this.getChild('lora_embedding_B') as ParameterDict;
  }
  get magnitude(): ModuleDict<LoraWeight> {
    return this.getChild('lora_magnitude_vector') as ModuleDict<LoraWeight>;
  }

  addAdapter(name: string, ad: LayerAdapter, a: Tensor, b: Tensor): void {
    if (this.adapters.has(name)) throw new ConfigError(`${this.path}: adapter '${name}' already exists`);
    this.adapters.set(name, ad);
    this.embA.set(name, a, false);
    this.embB.set(name, b, false);
    if (ad.useDora)
      this.magnitude.child(name, new LoraWeight(doraWeightNorm(this.base.weight, a, b, ad.scaling, true)));
  }

  deleteAdapter(name: string): void {
    if (this.merged.includes(name))
      throw new ConfigError(`${this.path}: adapter '${name}' is merged; unmerge it first`);
    this.adapters.delete(name);
    this.embA.delete(name);
    this.embB.delete(name);
    this.magnitude.delete(name);
  }

  setAdapterTrainable(name: string, on: boolean): void {
    const a = this.embA.get(name);
    const b = this.embB.get(name);
    if (a) a.requiresGrad = on;
    if (b) b.requiresGrad = on;
    setTrainable(this.magnitude.get(name), on);
  }

  /** ΔW = s (B A)^T, f32 [V, D]. */
  deltaWeight(name: string): Tensor {
    const a = this.embA.get(name)!;
    const b = this.embB.get(name)!;
    const d = empty([this.numEmbeddings, this.dim]);
    const at = a.view([a.shape[1]!, a.shape[0]!], [1, a.shape[1]!], a.offset);
    const bt = b.view([b.shape[1]!, b.shape[0]!], [1, b.shape[1]!], b.offset);
    gemmInto(at, bt, d, this.scalingOf(name), 0);
    at.dispose();
    bt.dispose();
    return d;
  }

  mergeAdapter(name: string, safe: boolean): void {
    const ad = this.adapters.get(name)!;
    const be = getBackend();
    const W = this.base.weight;
    noGrad(() => {
      const w32 = empty(W.shape);
      be.copy(W, w32);
      const d = this.deltaWeight(name);
      be.binary('add', w32, d, w32);
      d.dispose();
      let norm: Tensor | null = null;
      if (ad.useDora) {
        norm = doraWeightNorm(W, this.embA.get(name)!, this.embB.get(name)!, this.scalingOf(name), true);
        const k = empty(norm.shape);
        be.binary('div', this.magnitude.get(name)!.weight, norm, k);
        scaleLastAxisInPlace(w32, k, this.numEmbeddings, this.dim, false);
        k.dispose();
      }
      if (safe && !allFinite(w32)) {
        w32.dispose();
        norm?.dispose();
        throw new MergeError(
          `${this.path}: merging adapter '${name}' gives non-finite weights (NaN or infinity); the adapter seems to be broken, nothing was changed`,
        );
      }
      be.copy(w32, W);
      w32.dispose();
      if (norm) this.normCache.set(name, keep(norm));
    });
  }

  unmergeAdapter(name: string): void {
    const ad = this.adapters.get(name);
    if (!ad) return;
    const be = getBackend();
    const W = this.base.weight;
    noGrad(() => {
      const w32 = empty(W.shape);
      be.copy(W, w32);
      if (ad.useDora) {
        const norm = this.normCache.get(name)!;
        const k = empty(norm.shape);
        be.binary('div', this.magnitude.get(name)!.weight, norm, k);
        scaleLastAxisInPlace(w32, k, this.numEmbeddings, this.dim, true);
        k.dispose();
        norm.dispose();
        this.normCache.delete(name);
      }
      const d = this.deltaWeight(name);
      be.binary('sub', w32, d, w32);
      d.dispose();
      be.copy(w32, W);
      w32.dispose();
    });
  }

  /** s (A^T[ids]) B^T: the adapter's contribution [..., D] (s times a per-row scale in mixed batches). */
  private branch(ids: Tensor, name: string, rowScale = 1): Tensor {
    const a = this.embA.get(name)!;
    const b = this.embB.get(name)!;
    const afterA = embedding(ids, transpose(a));
    return scale(linear(afterA, b), this.scalingOf(name, rowScale));
  }

  forward(ids: Tensor): Tensor {
    const rt = this.rt;
    if (rt.disabled) {
      if (this.merged.length) this.unmerge();
      return this.base.forward(ids);
    }
    if (rt.rows) {
      this.checkRows(ids, rt.rows);
      let result = this.base.forward(ids);
      for (const g of rt.rows.groups) {
        if (g.name === null || !this.adapters.has(g.name)) continue;
        if (this.adapters.get(g.name)!.useDora)
          throw new ConfigError(`${this.path}: per-row adapters cannot use DoRA adapters ('${g.name}'), as in PEFT`);
        result = addRowsAt(result, g.idx, this.branch(indexSelect(ids, 0, g.idx), g.name, g.scale ?? 1));
      }
      return result;
    }
    let result = this.base.forward(ids);
    if (this.merged.length) return result;
    for (const name of rt.active) {
      const ad = this.adapters.get(name);
      if (!ad) continue;
      if (!ad.useDora) {
        result = add(result, this.branch(ids, name));
        continue;
      }
      // DoRA (PEFT's DoraEmbeddingLayer): y = (m / ||W^T + s B A||) (result + s A^T[ids] B^T), per output column
      const norm = doraWeightNorm(
        this.base.weight,
        this.embA.get(name)!,
        this.embB.get(name)!,
        this.scalingOf(name),
        true,
      );
      const k = div(this.magnitude.get(name)!.weight, norm);
      result = add(mul(result, k), mul(this.branch(ids, name), k));
    }
    return result;
  }
}

/** A copy of a plain layer (Linear, Embedding, RMSNorm) for modules_to_save. */
export function cloneModule(m: Module, path: string): Module {
  const be = getBackend();
  const copyParams = (to: Module) => {
    const src = new Map(m.namedParameters());
    noGrad(() => {
      for (const [n, p] of to.namedParameters()) be.copy(src.get(n)!, p);
    });
    return to;
  };
  if (m instanceof Linear)
    return copyParams(
      new Linear(m.inFeatures, m.outFeatures, { bias: m.bias !== null, dtype: m.weight.dtype, empty: true }),
    );
  if (m instanceof Embedding)
    return copyParams(new Embedding(m.numEmbeddings, m.dim, { dtype: m.weight.dtype, empty: true }));
  if (m instanceof RMSNorm) return copyParams(new RMSNorm(m.dim, m.eps, { dtype: m.weight.dtype }));
  throw new ConfigError(
    `modules_to_save: '${path}' is a ${m.constructor.name}; only Linear, Embedding and RMSNorm modules can be saved whole`,
  );
}

interface Callable extends Module {
  forward(x: Tensor): Tensor;
}

/**
 * PEFT's ModulesToSaveWrapper: the original module plus one trainable copy per adapter
 * (`<path>.modules_to_save.<adapter>.weight`); the active adapter's copy runs.
 */
export class ModulesToSaveWrapper extends Module {
  constructor(
    original: Module,
    readonly rt: AdapterRuntime,
    readonly path: string,
  ) {
    super();
    this.child('original_module', original);
    this.child('modules_to_save', new ModuleDict());
  }
  get original(): Callable {
    return this.getChild('original_module') as Callable;
  }
  get copies(): ModuleDict {
    return this.getChild('modules_to_save') as ModuleDict;
  }
  has(name: string): boolean {
    return this.copies.has(name);
  }
  addAdapter(name: string): void {
    if (this.copies.has(name)) throw new ConfigError(`${this.path}: adapter '${name}' already exists`);
    this.copies.child(name, cloneModule(this.original, this.path));
  }
  deleteAdapter(name: string): void {
    this.copies.delete(name);
  }
  setTrainable(active: readonly string[], trainable: boolean): void {
    for (const n of this.copies.keys()) setTrainable(this.copies.get(n), trainable && active.includes(n));
  }
  setAdapterTrainable(name: string, on: boolean): void {
    setTrainable(this.copies.get(name), on);
  }
  /** The module that runs now: the first active adapter's copy, or the original. */
  current(): Callable {
    if (this.rt.disabled) return this.original;
    for (const n of this.rt.active) if (this.copies.has(n)) return this.copies.get(n) as Callable;
    return this.original;
  }
  /** The running module's weight (the model reads a head's weight directly). */
  get weight(): Tensor {
    return this.current().getParam('weight')!;
  }
  get bias(): Tensor | null {
    return this.current().getParam('bias');
  }
  forward(x: Tensor): Tensor {
    const rows = this.rt.rows;
    if (!rows || this.rt.disabled) return this.current().forward(x);
    if (x.shape[0] !== rows.batch)
      throw new ShapeError(
        `${this.path}: adapter rows name ${rows.batch} adapters but the batch has ${x.shape[0]} rows`,
      );
    let out: Tensor | null = null;
    for (const g of rows.groups) {
      const m = g.name !== null && this.copies.has(g.name) ? (this.copies.get(g.name) as Callable) : this.original;
      const y = m.forward(indexSelect(x, 0, g.idx));
      out ??= empty([rows.batch, ...y.shape.slice(1)]);
      out = addRowsAt(out, g.idx, y);
    }
    return out!;
  }
}
