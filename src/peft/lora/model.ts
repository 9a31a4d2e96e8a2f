// LoraModel: a Llama-family model with LoRA adapters injected in place (PEFT's PeftModel + LoraModel). Its own
// parameter names are PEFT's in-memory names: base_model.model.<module path>.lora_A.<adapter>.weight.
//
// Several adapters live side by side: add, activate one or several (summed, each with a weight that multiplies
// its scaling, as set_scale), disable (base output), delete. Per-row selection for mixed batches comes through
// ForwardContext.adapterRows: one adapter name (or null / '__base__') per batch row.

import { getBackend } from '../../backend/index.ts';
import { ConfigError } from '../../core/errors.ts';
import { globalRng, type Rng } from '../../core/rng.ts';
import { keep } from '../../core/scope.ts';
import type { Tensor } from '../../core/tensor.ts';
import type { ForwardContext, LlamaForCausalLM } from '../../models/llama.ts';
import { Embedding, Linear } from '../../nn/layers.ts';
import { Module } from '../../nn/module.ts';
import { intTensor, tensor } from '../../ops/create.ts';
import { noGrad } from '../../ops/tape.ts';
import { checkCreatableInit, type LoraConfig, type LoraConfigInput, loraConfig, loraScaling } from './config.ts';
import { initEmbedding, initLinear, initNeedsBase } from './init.ts';
import {
  AdapterRuntime,
  BASE_ROW,
  type LinearBase,
  LoraEmbedding,
  LoraLinear,
  MergeError,
  ModulesToSaveWrapper,
  type RowGroups,
} from './layer.ts';
import { checkTargetModuleExists, matchesModulesToSave, rankAndAlpha, resolveTargetModules } from './target.ts';

export interface LoraModelOptions {
  /** Randomness for adapter inits and LoRA dropout (default: the global RNG). */
  rng?: Rng;
  /** Where warnings go (default console.warn). */
  onWarning?: (message: string) => void;
}

export interface AddAdapterOptions {
  /**
   * Creating for loading saved weights: random inits are skipped (zeros are written, the file fills them);
   * base-rewriting inits (PiSSA, OLoRA) still run, as PEFT does.
   */
  forLoading?: boolean;
  /** Make this adapter the active one (default: only for the first adapter). */
  activate?: boolean;
}

export interface MergeAndUnloadOptions {
  /** Adapters to merge (default: the active ones). */
  names?: readonly string[];
  /** Refuse (MergeError) a merge that would write NaN or infinity; nothing is changed then. */
  safe?: boolean;
  /** The module replacing a quantized base layer, given its summed delta s B A (f32 [out, in], row-major). */
  replaceQuantized?: (base: LinearBase, delta: Float32Array, path: string) => Module;
}

/** An adapter layer of the model. */
export type AdapterLayer = LoraLinear | LoraEmbedding;

/** The holder that puts the model under `base_model.model` (PEFT's naming). */
class BaseModelHolder extends Module {
  constructor(model: LlamaForCausalLM) {
    super();
    this.child('model', model);
  }
}

/** A linear layer for 'all-linear': Linear, a quantized linear with the same surface, or a LoRA layer on one. */
function isLinearLike(m: Module): boolean {
  return m instanceof Linear || m instanceof LoraLinear || isQuantLinear(m);
}

export class LoraModel extends Module {
  readonly model: LlamaForCausalLM;
  readonly configs = new Map<string, LoraConfig>();
  readonly rt: AdapterRuntime;
  private readonly warn: (m: string) => void;
  private readonly hiddenBefore: LlamaForCausalLM['hidden'];
  private readonly hadOwnHidden: boolean;
  private rowTensors: Tensor[] = [];

  /**
   * Wraps model (its layers are replaced in place). With a config, an adapter named `adapterName` is added and
   * made active, as get_peft_model does.
   */
  constructor(
    model: LlamaForCausalLM,
    config?: LoraConfigInput | LoraConfig | null,
    adapterName = 'default',
    opts: LoraModelOptions = {},
  ) {
    super();
    this.model = model;
    this.child('base_model', new BaseModelHolder(model));
    for (const [n, m] of model.namedModules())
      if (m instanceof LoraLinear || m instanceof LoraEmbedding || m instanceof ModulesToSaveWrapper)
        throw new ConfigError(
          `the model already holds adapters ('${n}'); add more through its LoraModel (addAdapter / loadAdapter)`,
        );
    this.rt = new AdapterRuntime(opts.rng ?? globalRng);
    this.warn = opts.onWarning ?? ((m) => console.warn(`warning: ${m}`));
    // a PEFT model trains only its adapters
    for (const p of model.parameters()) p.requiresGrad = false;
    // per-row adapters reach the layers through the forward context: capture it where the model's forward starts
    this.hiddenBefore = model.hidden;
    this.hadOwnHidden = Object.hasOwn(model, 'hidden');
    const self = this;
    model.hidden = function hidden(this: LlamaForCausalLM, ids: Tensor, ctx: ForwardContext): Tensor {
      self.setRows(ctx.adapterRows, ids.shape[0]!);
      return self.hiddenBefore.call(this, ids, ctx);
    };
    if (config) this.addAdapter(adapterName, config);
  }

  /** Names of all adapters, in the order they were added. */
  get adapterNames(): string[] {
    return [...this.configs.keys()];
  }
  get activeAdapters(): string[] {
    return [...this.rt.active];
  }
  get disabled(): boolean {
    return this.rt.disabled;
  }

  /** Every adapter layer with its module path in the model. */
  adapterLayers(): [string, AdapterLayer][] {
    const out: [string, AdapterLayer][] = [];
    for (const [n, m] of this.model.namedModules())
      if (m instanceof LoraLinear || m instanceof LoraEmbedding) out.push([n, m]);
    return out;
  }

  /** Every modules_to_save wrapper with its path. */
  savedModules(): [string, ModulesToSaveWrapper][] {
    const out: [string, ModulesToSaveWrapper][] = [];
    for (const [n, m] of this.model.namedModules()) if (m instanceof ModulesToSaveWrapper) out.push([n, m]);
    return out;
  }

  /** Adds an adapter (inactive unless it is the first or `activate` is set), injecting layers where it targets. */
  addAdapter(name: string, input: LoraConfigInput | LoraConfig, opts: AddAdapterOptions = {}): void {
    if (!name || /[.\s]/.test(name))
      throw new ConfigError(`adapter name '${name}' must be non-empty without dots or spaces`);
    if (name === BASE_ROW) throw new ConfigError(`'${BASE_ROW}' is reserved for the base model in mixed batches`);
    if (this.configs.has(name)) throw new ConfigError(`adapter '${name}' already exists`);
    if ('lora_'.includes(name))
      this.warn(`adapter name '${name}' is part of the prefix 'lora_', which can make PEFT miss keys when loading`);
    const cfg = loraConfig(input as LoraConfigInput, `adapter '${name}'`);
    if (!opts.forLoading) checkCreatableInit(cfg, `adapter '${name}'`);
    if (cfg.bias !== 'none' && [...this.configs.values()].some((c) => c.bias !== 'none'))
      throw new ConfigError(`bias: only one adapter may train biases; set bias 'none' for adapter '${name}'`);
    if (cfg.fan_in_fan_out) {
      this.warn(`adapter '${name}': fan_in_fan_out is true but the targets are Linear layers; setting it to false`);
      cfg.fan_in_fan_out = false;
    }
    const first = this.configs.size === 0;
    const modules = [...this.model.namedModules()];
    const names = modules.map(([n]) => n);
    const byName = new Map(modules);
    const internal = (n: string) =>
      modules.some(
        ([p, m]) =>
          (m instanceof LoraLinear || m instanceof LoraEmbedding || m instanceof ModulesToSaveWrapper) &&
          n.startsWith(`${p}.`),
      );
    const head = this.model.getChild('lm_head') ? 'lm_head' : null;
    cfg.target_modules = resolveTargetModules(
      cfg,
      this.model.config.architecture,
      names,
      (n) => isLinearLike(byName.get(n)!),
      internal,
      head,
    );
    const prefixes = modules
      .filter(([, m]) => m instanceof LoraLinear || m instanceof LoraEmbedding || m instanceof ModulesToSaveWrapper)
      .map(([p]) => `${p}.`);
    const targeted: string[] = [];
    let excluded = 0;
    let unmatched = 0;
    for (const [key, m] of modules) {
      if (!key || prefixes.some((p) => key.startsWith(p))) continue;
      const res = checkTargetModuleExists(cfg, key);
      if (res === 'excluded') excluded++;
      else if (res === 'unmatched') unmatched++;
      else targeted.push(key);
      if (
        res === 'match' &&
        !(
          m instanceof Linear ||
          m instanceof LoraLinear ||
          m instanceof Embedding ||
          m instanceof LoraEmbedding ||
          isQuantLinear(m)
        )
      )
        throw new ConfigError(
          `target module '${key}' is a ${m.constructor.name}; LoRA supports Linear and Embedding layers here`,
        );
    }
    if (targeted.length === 0) {
      const t = JSON.stringify(cfg.target_modules);
      if (excluded && !unmatched)
        throw new ConfigError(
          'target_modules: all modules were excluded (check target_modules, exclude_modules, modules_to_save)',
        );
      throw new ConfigError(
        `target_modules: ${t} matched no module of the model${cfg.layers_to_transform !== null ? ` (layers_to_transform ${JSON.stringify(cfg.layers_to_transform)})` : ''}; module names look like 'model.layers.0.self_attn.q_proj'`,
      );
    }
    this.configs.set(name, cfg);
    try {
      for (const key of targeted) this.injectOne(name, cfg, key, !!opts.forLoading);
      if (cfg.modules_to_save?.length) this.wrapModulesToSave(name, cfg);
    } catch (e) {
      this.removeAdapterEverywhere(name);
      this.configs.delete(name);
      throw e;
    }
    // get_peft_model activates the first adapter; add_adapter / load_adapter add inactive ones
    if (first || opts.activate) this.setAdapter(name);
    else this.applyTrainable();
  }

  private injectOne(name: string, cfg: LoraConfig, key: string, forLoading: boolean): void {
    const target = this.model.getModule(key)!;
    const { r, alpha } = rankAndAlpha(cfg, key);
    const scaling = loraScaling(alpha, r, cfg.use_rslora);
    const ad = { r, alpha, scaling, useDora: cfg.use_dora, dropout: cfg.lora_dropout, loraBias: cfg.lora_bias };
    const rng = this.rt.rng;
    const init = cfg.init_lora_weights;
    if (target instanceof Embedding || target instanceof LoraEmbedding) {
      const layer = target instanceof LoraEmbedding ? target : new LoraEmbedding(target, this.rt, key);
      if (cfg.lora_bias) this.warn(`${key}: lora_bias is not supported for embedding layers; ignored`);
      const V = layer.numEmbeddings;
      const D = layer.dim;
      const w = forLoading
        ? { a: new Float32Array(r * V), b: new Float32Array(D * r) }
        : initEmbedding(init, V, D, r, rng);
      layer.addAdapter(name, ad, tensor(w.a, [r, V]), tensor(w.b, [D, r]));
      if (layer !== target) this.model.setModule(key, layer);
      return;
    }
    const layer = target instanceof LoraLinear ? target : new LoraLinear(target as LinearBase, this.rt, key);
    const outF = layer.outFeatures;
    const inF = layer.inFeatures;
    if (cfg.lora_bias && !(layer.base instanceof Linear && layer.base.bias))
      this.warn(`${key}: lora_bias is set but the layer has no bias, so merging this adapter will not be possible`);
    const needsBase = initNeedsBase(init);
    let w: { a: Float32Array; b: Float32Array; base?: Float32Array };
    if (forLoading && !needsBase) w = { a: new Float32Array(r * inF), b: new Float32Array(outF * r) };
    else {
      const base = layer.base;
      const weightF32 = needsBase
        ? () => {
            if (!(base instanceof Linear))
              throw new ConfigError(`${key}: init_lora_weights '${init}' needs a plain (unquantized) base layer`);
            return base.weight.toF32();
          }
        : null;
      w = initLinear(init, outF, inF, r, scaling, rng, weightF32, key);
    }
    if (w.base) {
      // PiSSA / OLoRA: the base keeps the residual W - s B A, rounded to its own dtype
      const W = (layer.base as Linear).weight;
      noGrad(() => {
        const t = tensor(w.base!, W.shape);
        getBackend().copy(t, W);
        t.dispose();
      });
    }
    const lb = cfg.lora_bias ? tensor(new Float32Array(outF), [outF]) : null;
    layer.addAdapter(name, ad, tensor(w.a, [r, inF]), tensor(w.b, [outF, r]), lb);
    if (layer !== target) this.model.setModule(key, layer);
  }

  private wrapModulesToSave(name: string, cfg: LoraConfig): void {
    const found: string[] = [];
    for (const [key, m] of [...this.model.namedModules()]) {
      if (!key || !matchesModulesToSave(cfg.modules_to_save!, key)) continue;
      const parent = key.includes('.') ? this.model.getModule(key.slice(0, key.lastIndexOf('.'))) : this.model;
      if (parent instanceof ModulesToSaveWrapper || m instanceof ModulesToSaveWrapper) {
        const w = m instanceof ModulesToSaveWrapper ? m : (parent as ModulesToSaveWrapper);
        if (!found.includes(w.path)) {
          w.addAdapter(name);
          found.push(w.path);
        }
        continue;
      }
      if (this.isInsideWrapper(key)) continue;
      const w = new ModulesToSaveWrapper(m, this.rt, key);
      w.addAdapter(name);
      this.model.setModule(key, w);
      found.push(key);
    }
    if (found.length === 0)
      this.warn(`adapter '${name}': modules_to_save ${JSON.stringify(cfg.modules_to_save)} matched no module`);
  }

  private isInsideWrapper(key: string): boolean {
    const parts = key.split('.');
    for (let i = 1; i < parts.length; i++) {
      const m = this.model.getModule(parts.slice(0, i).join('.'));
      if (m instanceof ModulesToSaveWrapper || m instanceof LoraLinear || m instanceof LoraEmbedding) return true;
    }
    return false;
  }

  /** Activates one adapter or several (their outputs summed); weights multiply each adapter's scaling. */
  setAdapter(
    names: string | readonly string[],
    weights?: readonly number[],
    opts: { inferenceMode?: boolean } = {},
  ): void {
    const list = typeof names === 'string' ? [names] : [...names];
    for (const n of list)
      if (!this.configs.has(n))
        throw new ConfigError(`adapter '${n}' does not exist (have: ${this.adapterNames.join(', ') || 'none'})`);
    if (new Set(list).size !== list.length)
      throw new ConfigError(`setAdapter: ${JSON.stringify(list)} names an adapter twice`);
    if (weights && weights.length !== list.length)
      throw new ConfigError(`setAdapter: ${weights.length} weights for ${list.length} adapters`);
    for (const w of weights ?? [])
      if (!Number.isFinite(w)) throw new ConfigError(`setAdapter: weight ${w} is not a finite number`);
    for (const [path, w] of this.savedModules()) {
      const withCopy = list.filter((n) => w.has(n));
      if (withCopy.length > 1)
        throw new ConfigError(
          `adapters ${withCopy.join(' and ')} both have a trained copy of '${path}' (modules_to_save); only one of them can be active`,
        );
    }
    if (this.adapterLayers().some(([, l]) => l.merged.length)) {
      this.warn('adapters were merged; unmerging them before changing the active adapters');
      this.unmerge();
    }
    this.rt.active = list;
    list.forEach((n, i) => {
      if (weights) this.rt.weights.set(n, weights[i]!);
    });
    this.applyTrainable(opts.inferenceMode);
  }

  /** PEFT's set_scale for every layer of one adapter: scaling = weight * alpha / r (or / sqrt r). */
  setAdapterWeight(name: string, weight: number): void {
    if (!this.configs.has(name)) throw new ConfigError(`adapter '${name}' does not exist`);
    if (this.adapterLayers().some(([, l]) => l.merged.includes(name)))
      throw new ConfigError(`adapter '${name}' is merged; unmerge it before changing its weight`);
    this.rt.weights.set(name, weight);
  }

  /** Active adapters train (unless inference mode or their config says inference_mode); everything else is frozen. */
  private applyTrainable(inferenceMode?: boolean): void {
    for (const [, l] of this.adapterLayers())
      for (const n of l.adapters.keys()) {
        const train = !(inferenceMode ?? this.configs.get(n)!.inference_mode);
        l.setTrainable(
          this.rt.active.filter((a) => a === n),
          train,
        );
      }
    for (const [, w] of this.savedModules()) {
      const act = this.rt.active.filter((a) => w.has(a) && !(inferenceMode ?? this.configs.get(a)!.inference_mode));
      w.setTrainable(act, true);
    }
    // biases (bias = 'all' | 'lora_only') of the active adapters' configs
    const modes = new Set(this.rt.active.map((a) => this.configs.get(a)!.bias));
    const adapterParam = new Set<Tensor>();
    for (const [, l] of this.adapterLayers())
      for (const [n, p] of l.namedParameters()) if (!n.startsWith('base_layer.')) adapterParam.add(p);
    for (const [, w] of this.savedModules())
      for (const [n, p] of w.namedParameters()) if (n.startsWith('modules_to_save.')) adapterParam.add(p);
    for (const [n, p] of this.model.namedParameters()) {
      if (adapterParam.has(p)) continue;
      const isBias = n === 'bias' || n.endsWith('.bias');
      p.requiresGrad =
        isBias &&
        (modes.has('all') ||
          (modes.has('lora_only') && this.adapterLayers().some(([path]) => n === `${path}.base_layer.bias`)));
    }
  }

  /** Base-model output everywhere (PEFT's disable_adapter_layers); merged layers are unmerged. */
  disableAdapters(): void {
    for (const a of this.rt.active) {
      const b = this.configs.get(a)!.bias;
      if (b !== 'none')
        this.warn(`disabling adapter layers with bias '${b}' does not give the base model's output exactly`);
    }
    this.rt.disabled = true;
  }
  enableAdapters(): void {
    this.rt.disabled = false;
  }
  /** Runs fn with the adapters disabled (PEFT's disable_adapter() context). */
  withAdaptersDisabled<T>(fn: () => T): T {
    const prev = this.rt.disabled;
    this.rt.disabled = true;
    try {
      return fn();
    } finally {
      this.rt.disabled = prev;
    }
  }

  /** Deletes an adapter; if it was active, the remaining active ones stay (or the first other one becomes active). */
  deleteAdapter(name: string): void {
    if (!this.configs.has(name)) throw new ConfigError(`adapter '${name}' does not exist`);
    if (this.adapterLayers().some(([, l]) => l.merged.includes(name)))
      throw new ConfigError(`adapter '${name}' is merged; unmerge it before deleting it`);
    this.removeAdapterEverywhere(name);
    this.configs.delete(name);
    this.rt.weights.delete(name);
    if (this.rt.active.includes(name)) {
      const rest = this.rt.active.filter((n) => n !== name);
      if (rest.length) this.setAdapter(rest);
      else {
        const remaining = [...this.configs.keys()].sort();
        if (remaining.length) {
          this.warn(`adapter '${name}' was active and is now deleted; setting the active adapter to '${remaining[0]}'`);
          this.setAdapter(remaining[0]!);
        } else this.rt.active = [];
      }
    }
  }

  private removeAdapterEverywhere(name: string): void {
    for (const [path, l] of this.adapterLayers()) {
      if (!l.has(name)) continue;
      l.deleteAdapter(name);
      if (l.adapters.size === 0) this.model.setModule(path, l.base);
    }
    for (const [path, w] of this.savedModules()) {
      if (!w.has(name)) continue;
      w.deleteAdapter(name);
      if (w.copies.keys().length === 0) this.model.setModule(path, w.original);
    }
  }

  /** Merges adapters (default: the active ones) into the base weights; `safe` refuses non-finite results. */
  merge(names?: readonly string[], opts: { safe?: boolean } = {}): void {
    const list = names ? [...names] : this.activeAdapters;
    for (const n of list) if (!this.configs.has(n)) throw new ConfigError(`adapter '${n}' does not exist`);
    const layers = this.adapterLayers().filter(([, l]) => list.some((n) => l.has(n)));
    for (const [path, l] of layers)
      if (l instanceof LoraLinear && !(l.base instanceof Linear))
        throw new MergeError(
          `${path}: cannot merge in place into a ${l.base.constructor.name} base layer; use mergeAndUnload with replaceQuantized (a dense merged layer), or load the base unquantized`,
        );
    this.mergeLayers(layers, list, opts.safe ?? false);
  }

  /** All or nothing: a failing layer (safe merge) rolls back the layers merged before it. */
  private mergeLayers(layers: [string, AdapterLayer][], list: readonly string[], safe: boolean): void {
    const done: [AdapterLayer, number][] = [];
    try {
      for (const [, l] of layers) {
        done.push([l, l.merged.length]);
        l.merge(list, safe);
      }
    } catch (e) {
      for (const [l, n] of done.reverse()) while (l.merged.length > n) l.unmergeAdapter(l.merged.pop()!);
      throw e;
    }
  }

  /** Unmerges every merged adapter (last merged first). */
  unmerge(): void {
    for (const [, l] of this.adapterLayers()) l.unmerge();
  }

  /**
   * PEFT's merge_and_unload: merges (default: the active adapters), then puts the base layers back, with the
   * active adapter's modules_to_save copy in place of each saved module. Returns the plain model; this wrapper
   * must not be used afterwards.
   *
   * A base layer that cannot take the merge in place (a quantized one) is replaced by what `replaceQuantized`
   * returns for it and the summed delta s B A of its merged adapters (f32 [out, in], row-major): typically a
   * dense 16-bit Linear holding dequant(W) + delta. Without it such layers make the merge fail.
   */
  mergeAndUnload(opts: MergeAndUnloadOptions = {}): LlamaForCausalLM {
    const list = opts.names ? [...opts.names] : this.activeAdapters;
    for (const n of list) if (!this.configs.has(n)) throw new ConfigError(`adapter '${n}' does not exist`);
    if (!opts.replaceQuantized) {
      this.merge(list, { safe: opts.safe });
      return this.unloadLayers(list);
    }
    const layers = this.adapterLayers().filter(([, l]) => list.some((n) => l.has(n)));
    const quant = layers.filter(([, l]) => l instanceof LoraLinear && !(l.base instanceof Linear)) as [
      string,
      LoraLinear,
    ][];
    // build the replacements first: nothing changes if one fails
    const replacements = new Map<string, Module>();
    noGrad(() => {
      for (const [path, l] of quant) {
        const names = list.filter((n) => l.has(n));
        for (const n of names)
          if (l.adapters.get(n)!.loraBias)
            throw new MergeError(
              `${path}: adapter '${n}' has lora_bias, which cannot be merged into a quantized layer`,
            );
        const delta = new Float32Array(l.outFeatures * l.inFeatures);
        for (const n of names) {
          const d = l.deltaWeight(n);
          const v = d.toF32();
          d.dispose();
          for (let i = 0; i < v.length; i++) delta[i] += v[i]!;
        }
        if (opts.safe && delta.some((v) => !Number.isFinite(v)))
          throw new MergeError(
            `${path}: merging gives non-finite weights (NaN or infinity); the adapter seems to be broken`,
          );
        replacements.set(path, opts.replaceQuantized!(l.base, delta, path));
      }
    });
    this.mergeLayers(
      layers.filter(([p]) => !replacements.has(p)),
      list,
      opts.safe ?? false,
    );
    for (const [path, l] of quant) {
      const r = replacements.get(path)!;
      this.model.setModule(path, r);
      l.dispose(); // the quantized base goes with it
    }
    return this.unloadLayers(list);
  }

  /**
   * Removes every adapter without merging; returns the plain base model. Merged adapters are unmerged first, so
   * the result is the original base (PEFT's unload would keep merged weights in it).
   */
  unload(): LlamaForCausalLM {
    this.unmerge();
    return this.unloadLayers([]);
  }

  private unloadLayers(keep: readonly string[]): LlamaForCausalLM {
    for (const [path, l] of this.adapterLayers()) {
      this.model.setModule(path, l.base);
      l.child('base_layer', new Module0());
      l.dispose();
    }
    for (const [path, w] of this.savedModules()) {
      const use = keep.find((n) => w.has(n));
      const replacement = use ? w.copies.get(use)! : w.original;
      this.model.setModule(path, replacement);
      for (const n of w.copies.keys()) if (n !== use) w.copies.delete(n);
      if (use) w.original.dispose();
    }
    this.configs.clear();
    this.rt.active = [];
    this.clearRows();
    // the hook goes; the method it wrapped answers again
    if (this.hadOwnHidden) this.model.hidden = this.hiddenBefore;
    else delete (this.model as { hidden?: unknown }).hidden;
    return this.model;
  }

  /** Logits [B, T, V]; ctx.adapterRows selects an adapter per batch row. */
  forward(ids: Tensor, ctx: ForwardContext): Tensor {
    return this.model.forward(ids, ctx);
  }

  loss(ids: Tensor, labels: Tensor, ctx: ForwardContext): Tensor {
    return this.model.loss(ids, labels, ctx);
  }

  private clearRows(): void {
    for (const t of this.rowTensors) t.dispose();
    this.rowTensors = [];
    this.rt.rows = null;
  }

  /** Groups the batch rows by adapter for this forward (called as the model's forward starts). */
  private setRows(rows: unknown, batch: number): void {
    this.clearRows();
    if (rows === undefined || rows === null) return;
    if (!Array.isArray(rows) || !rows.every((r) => r === null || typeof r === 'string'))
      throw new ConfigError('adapterRows must be an array with one adapter name (or null for the base model) per row');
    if (rows.length !== batch)
      throw new ConfigError(`adapterRows has ${rows.length} names but the batch has ${batch} rows`);
    if (this.model.training) throw new ConfigError('adapterRows (per-row adapters) cannot be used in training mode');
    const unknown = [...new Set(rows.filter((r): r is string => r !== null && r !== BASE_ROW && !this.configs.has(r)))];
    if (unknown.length)
      throw new ConfigError(`adapterRows names adapter(s) that do not exist: ${unknown.sort().join(', ')}`);
    for (const r of new Set(rows)) {
      if (r === null || r === BASE_ROW) continue;
      if (this.configs.get(r)!.use_dora)
        throw new ConfigError(`adapterRows: adapter '${r}' uses DoRA, which mixed batches do not support (as in PEFT)`);
    }
    const groups = new Map<string | null, number[]>();
    rows.forEach((r, i) => {
      const k = r === BASE_ROW ? null : (r as string | null);
      const g = groups.get(k);
      if (g) g.push(i);
      else groups.set(k, [i]);
    });
    const out: RowGroups = { batch, groups: [] };
    for (const [name, idx] of groups) {
      const t = keep(intTensor(idx));
      this.rowTensors.push(t);
      out.groups.push({ name, idx: t });
    }
    this.rt.rows = out;
  }

  /** Number of trainable and of all parameters (PEFT's print_trainable_parameters). */
  trainableSummary(): { trainable: number; total: number } {
    let trainable = 0;
    let total = 0;
    for (const [, p] of this.namedParameters()) {
      total += p.size;
      if (p.requiresGrad) trainable += p.size;
    }
    return { trainable, total };
  }
}

/** An empty module (stands in for a detached base layer so disposing the wrapper leaves the base alone). */
class Module0 extends Module {}

function isQuantLinear(m: Module): boolean {
  const f = m as unknown as { inFeatures?: unknown; outFeatures?: unknown; forward?: unknown };
  return typeof f.inFeatures === 'number' && typeof f.outFeatures === 'number' && typeof f.forward === 'function';
}
