// LoraModel: a Llama-family model with LoRA adapters injected in place (PEFT's PeftModel + LoraModel). Its own
// parameter names are PEFT's in-memory names: base_model.model.<module path>.lora_A.<adapter>.weight.
//
// Several adapters live side by side: add, activate one or several (summed, each with a weight that multiplies
// its scaling, as set_scale), disable (base output), delete. Per-row selection for mixed batches comes through
// ForwardContext.adapterRows: one entry per batch row, an adapter name, null / '__base__' for the base model, or
// {name, scale} for an adapter whose scaling that row multiplies by `scale` (a request's scaled adapter, sharing
// the adapter's weights with the rows that use it unscaled).
//
// Cost: the model keeps an index of the layers and modules_to_save wrappers each adapter lives in, so adding,
// deleting and reading (adapterStateDict) one adapter walk that adapter's layers and the base model's module tree,
// never the other adapters' parameters: the 64th adapter costs what the first did.

import { getBackend } from '../../backend/index.ts';
import { ConfigError } from '../../core/errors.ts';
import { globalRng, type Rng } from '../../core/rng.ts';
import { keep } from '../../core/scope.ts';
import { Tensor } from '../../core/tensor.ts';
import type { ForwardContext, LlamaForCausalLM } from '../../models/llama.ts';
import { Embedding, Linear, RMSNorm } from '../../nn/layers.ts';
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
import {
  ALL_LINEAR,
  checkTargetModuleExists,
  matchesModulesToSave,
  rankAndAlpha,
  resolveTargetModules,
} from './target.ts';

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
  /**
   * Make this adapter the active one. Default (unset): only the first adapter is activated, as get_peft_model
   * does; `false` leaves the active adapters as they are even for the first one (a server selecting per row).
   */
  activate?: boolean;
  /** A plan made by planAdapter for this name and config (it is not resolved again). */
  plan?: AdapterPlan;
}

/** One layer an adapter will be injected into. */
export interface PlannedLayer {
  /** The module path in the model (model.layers.0.self_attn.q_proj). */
  path: string;
  kind: 'linear' | 'embedding';
  r: number;
  alpha: number;
  /** in_features (linear) or num_embeddings (embedding): the columns of lora_A. */
  inF: number;
  /** out_features (linear) or the embedding dim: the rows of lora_B. */
  outF: number;
  /** Whether the layer already is a LoRA layer (of other adapters). */
  wrapped: boolean;
}

/**
 * What addAdapter will do for a name and config, worked out without changing the model: the resolved config
 * (target_modules as PEFT rewrites it), the layers the adapter goes into and the modules_to_save it copies.
 */
export interface AdapterPlan {
  readonly name: string;
  readonly config: LoraConfig;
  readonly layers: readonly PlannedLayer[];
  /** Paths of the modules_to_save wrappers that will hold a copy for this adapter (existing or new). */
  readonly saved: readonly string[];
  readonly forLoading: boolean;
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

/** A module whose contents are adapter machinery (LoRA layer, modules_to_save wrapper): never targeted inside. */
function isAdapterHolder(m: Module): m is LoraLinear | LoraEmbedding | ModulesToSaveWrapper {
  return m instanceof LoraLinear || m instanceof LoraEmbedding || m instanceof ModulesToSaveWrapper;
}

const join = (prefix: string, n: string) => (prefix ? `${prefix}.${n}` : n);

/** A module's own parameters (not its children's), relative names: Module yields them before the children's. */
function* ownParameters(m: Module): Iterable<[string, Tensor]> {
  for (const [n, p] of m.namedParameters()) {
    if (n.includes('.')) return;
    yield [n, p];
  }
}

/** PEFT's get_peft_model rule: names of at least this many targets are condensed over every module name. */
const MIN_TARGETS_CONDENSED = 20;

export class LoraModel extends Module {
  readonly model: LlamaForCausalLM;
  readonly configs = new Map<string, LoraConfig>();
  readonly rt: AdapterRuntime;
  private readonly warn: (m: string) => void;
  private readonly hiddenBefore: LlamaForCausalLM['hidden'];
  private readonly hadOwnHidden: boolean;
  private rowTensors: Tensor[] = [];
  /** Per adapter: the LoRA layers holding it, by path, in model order. */
  private readonly layersOf = new Map<string, Map<string, AdapterLayer>>();
  /** Per adapter: the modules_to_save wrappers holding a copy for it, by path. */
  private readonly savedOf = new Map<string, Map<string, ModulesToSaveWrapper>>();
  /** Adapters whose parameters the last applyTrainable switched on. */
  private trainableNow = new Set<string>();

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

  /** Every adapter layer with its module path in the model, in model order. */
  adapterLayers(): [string, AdapterLayer][] {
    const out: [string, AdapterLayer][] = [];
    for (const [n, m] of this.baseModules())
      if (m instanceof LoraLinear || m instanceof LoraEmbedding) out.push([n, m]);
    return out;
  }

  /** Every modules_to_save wrapper with its path. */
  savedModules(): [string, ModulesToSaveWrapper][] {
    const out: [string, ModulesToSaveWrapper][] = [];
    for (const [n, m] of this.baseModules()) if (m instanceof ModulesToSaveWrapper) out.push([n, m]);
    return out;
  }

  /** The layers holding one adapter, with their paths, in model order (cost: that adapter's layers). */
  adapterLayersOf(name: string): [string, AdapterLayer][] {
    return [...(this.layersOf.get(name) ?? [])];
  }

  /** The modules_to_save wrappers holding a copy for one adapter, with their paths. */
  savedModulesOf(name: string): [string, ModulesToSaveWrapper][] {
    return [...(this.savedOf.get(name) ?? [])];
  }

  /**
   * The model's module tree without adapter internals, root ('') first, in namedModules order: LoRA layers and
   * modules_to_save wrappers appear, what they hold does not. Its cost does not grow with the adapters.
   */
  baseModules(): [string, Module][] {
    const out: [string, Module][] = [];
    const walk = (m: Module, prefix: string) => {
      out.push([prefix, m]);
      if (isAdapterHolder(m)) return;
      for (const [n, c] of m.namedChildren()) walk(c, join(prefix, n));
    };
    walk(this.model, '');
    return out;
  }

  /**
   * The base model's parameters under their current names (a LoRA layer's base as <path>.base_layer.*, a saved
   * module's original as <path>.original_module.*), in namedParameters order, without any adapter's.
   */
  baseParameters(): [string, Tensor][] {
    const out: [string, Tensor][] = [];
    const walk = (m: Module, prefix: string) => {
      if (m instanceof LoraLinear || m instanceof LoraEmbedding) {
        out.push(...m.base.namedParameters(join(prefix, 'base_layer')));
        return;
      }
      if (m instanceof ModulesToSaveWrapper) {
        out.push(...m.original.namedParameters(join(prefix, 'original_module')));
        return;
      }
      for (const [n, p] of ownParameters(m)) out.push([join(prefix, n), p]);
      for (const [n, c] of m.namedChildren()) walk(c, join(prefix, n));
    };
    walk(this.model, '');
    return out;
  }

  /**
   * Works out what addAdapter(name, input) would do, without changing anything: validates the name and config,
   * resolves target_modules as PEFT does and finds the layers and modules_to_save. Throws the errors addAdapter
   * throws for them; warnings about the config are given here.
   */
  planAdapter(name: string, input: LoraConfigInput | LoraConfig, opts: { forLoading?: boolean } = {}): AdapterPlan {
    if (!name || /[.\s]/.test(name))
      throw new ConfigError(`adapter name '${name}' must be non-empty without dots or spaces`);
    if (name === BASE_ROW) throw new ConfigError(`'${BASE_ROW}' is reserved for the base model in mixed batches`);
    if (this.configs.has(name)) throw new ConfigError(`adapter '${name}' already exists`);
    if ('lora_'.includes(name))
      this.warn(`adapter name '${name}' is part of the prefix 'lora_', which can make PEFT miss keys when loading`);
    const cfg = loraConfig(input as LoraConfigInput, `adapter '${name}'`);
    if (!opts.forLoading) checkCreatableInit(cfg, `adapter '${name}'`);
    if (cfg.bias !== 'none' && this.biasAdapter() !== null)
      throw new ConfigError(`bias: only one adapter may train biases; set bias 'none' for adapter '${name}'`);
    if (cfg.fan_in_fan_out) {
      this.warn(`adapter '${name}': fan_in_fan_out is true but the targets are Linear layers; setting it to false`);
      cfg.fan_in_fan_out = false;
    }
    const modules = this.baseModules();
    const byName = new Map(modules);
    cfg.target_modules = this.resolveTargets(cfg, modules, byName);
    const targeted: string[] = [];
    let excluded = 0;
    let unmatched = 0;
    for (const [key, m] of modules) {
      if (!key) continue;
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
    const layers: PlannedLayer[] = targeted.map((path) => {
      const m = byName.get(path)!;
      const { r, alpha } = rankAndAlpha(cfg, path);
      const wrapped = m instanceof LoraLinear || m instanceof LoraEmbedding;
      if (m instanceof Embedding || m instanceof LoraEmbedding)
        return { path, kind: 'embedding', r, alpha, inF: m.numEmbeddings, outF: m.dim, wrapped };
      const l = m as unknown as LinearBase;
      return { path, kind: 'linear', r, alpha, inF: l.inFeatures, outF: l.outFeatures, wrapped };
    });
    const saved = cfg.modules_to_save?.length ? this.planSaved(name, cfg, modules, new Set(targeted)) : [];
    return { name, config: cfg, layers, saved, forLoading: !!opts.forLoading };
  }

  /** The adapter that trains biases (bias 'all' / 'lora_only'), if any: only one may. */
  private biasAdapter(): string | null {
    for (const [n, c] of this.configs) if (c.bias !== 'none') return n;
    return null;
  }

  /** target_modules resolved as PEFT does: the default list, 'all-linear', long lists condensed to suffixes. */
  private resolveTargets(cfg: LoraConfig, modules: [string, Module][], byName: Map<string, Module>): string | string[] {
    const head = this.model.getChild('lm_head') ? 'lm_head' : null;
    const t = cfg.target_modules;
    const allLinear = typeof t === 'string' && t.toLowerCase() === ALL_LINEAR;
    const linearCount = allLinear ? modules.filter(([n, m]) => n !== '' && n !== head && isLinearLike(m)).length : 0;
    const condensed = (Array.isArray(t) && t.length >= MIN_TARGETS_CONDENSED) || linearCount >= MIN_TARGETS_CONDENSED;
    if (!condensed)
      return resolveTargetModules(
        cfg,
        this.model.config.architecture,
        modules.map(([n]) => n),
        (n) => isLinearLike(byName.get(n)!),
        () => false,
        head,
      );
    // PEFT condenses a long list against every module name, adapter internals included: the full walk
    const holders = new Set(modules.filter(([, m]) => isAdapterHolder(m)).map(([n]) => n));
    const internal = (n: string) => {
      for (let i = n.indexOf('.'); i >= 0; i = n.indexOf('.', i + 1)) if (holders.has(n.slice(0, i))) return true;
      return false;
    };
    const all = [...this.model.namedModules()];
    const allByName = new Map(all);
    return resolveTargetModules(
      cfg,
      this.model.config.architecture,
      all.map(([n]) => n),
      (n) => isLinearLike(allByName.get(n)!),
      internal,
      head,
    );
  }

  /** The modules_to_save wrappers (existing or to be made) that get a copy for this adapter. */
  private planSaved(name: string, cfg: LoraConfig, modules: [string, Module][], targeted: Set<string>): string[] {
    const found: string[] = [];
    const mts = cfg.modules_to_save!;
    for (const [key, m] of modules) {
      if (!key) continue;
      if (m instanceof ModulesToSaveWrapper) {
        // the wrapper itself, or (as PEFT's suffix test does) one of its two children
        if (
          matchesModulesToSave(mts, key) ||
          matchesModulesToSave(mts, `${key}.original_module`) ||
          matchesModulesToSave(mts, `${key}.modules_to_save`)
        )
          found.push(key);
        continue;
      }
      if (!matchesModulesToSave(mts, key)) continue;
      const cls = !targeted.has(key) ? m.constructor.name : m instanceof Embedding ? 'LoraEmbedding' : 'LoraLinear';
      if (targeted.has(key) || !(m instanceof Linear || m instanceof Embedding || m instanceof RMSNorm))
        throw new ConfigError(
          `modules_to_save: '${key}' is a ${cls}; only Linear, Embedding and RMSNorm modules can be saved whole`,
        );
      found.push(key);
    }
    if (found.length === 0)
      this.warn(`adapter '${name}': modules_to_save ${JSON.stringify(cfg.modules_to_save)} matched no module`);
    return found;
  }

  /** Adds an adapter (inactive unless it is the first or `activate` is set), injecting layers where it targets. */
  addAdapter(name: string, input: LoraConfigInput | LoraConfig, opts: AddAdapterOptions = {}): void {
    let plan = opts.plan;
    if (plan) {
      if (plan.name !== name) throw new ConfigError(`addAdapter: the plan is for '${plan.name}', not '${name}'`);
      if (this.configs.has(name)) throw new ConfigError(`adapter '${name}' already exists`);
    } else plan = this.planAdapter(name, input, { forLoading: opts.forLoading });
    const cfg = plan.config;
    const first = this.configs.size === 0;
    this.configs.set(name, cfg);
    this.layersOf.set(name, new Map());
    this.savedOf.set(name, new Map());
    try {
      for (const l of plan.layers) this.injectOne(name, cfg, l.path, plan.forLoading);
      for (const path of plan.saved) this.wrapOne(name, path);
    } catch (e) {
      this.removeAdapterEverywhere(name);
      this.configs.delete(name);
      throw e;
    }
    this.setAdapterTrainable(name, false);
    // get_peft_model activates the first adapter; add_adapter / load_adapter add inactive ones
    if (opts.activate || (first && opts.activate !== false)) this.setAdapter(name);
    else if (this.rt.active.some((a) => this.configs.get(a)!.bias !== 'none')) this.applyTrainable();
  }

  /** Records that `name` lives in a layer (before the layer takes it, so a failing add is undone there too). */
  private indexLayer(name: string, path: string, layer: AdapterLayer): void {
    this.layersOf.get(name)!.set(path, layer);
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
      this.indexLayer(name, key, layer);
      layer.addAdapter(name, ad, Tensor.fromTyped(w.a, [r, V]), Tensor.fromTyped(w.b, [D, r]));
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
    const lb = cfg.lora_bias ? Tensor.fromTyped(new Float32Array(outF), [outF]) : null;
    this.indexLayer(name, key, layer);
    // the fresh f32 arrays become the parameters' storage (no copy)
    layer.addAdapter(name, ad, Tensor.fromTyped(w.a, [r, inF]), Tensor.fromTyped(w.b, [outF, r]), lb);
    if (layer !== target) this.model.setModule(key, layer);
  }

  /** Gives `name` a copy of the module at path, wrapping it in a ModulesToSaveWrapper first if needed. */
  private wrapOne(name: string, path: string): void {
    const m = this.model.getModule(path)!;
    const w = m instanceof ModulesToSaveWrapper ? m : new ModulesToSaveWrapper(m, this.rt, path);
    w.addAdapter(name);
    this.savedOf.get(name)!.set(path, w);
    if (w !== m) this.model.setModule(path, w);
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
    const wrappers = new Map<string, ModulesToSaveWrapper>();
    for (const n of list) for (const [path, w] of this.savedOf.get(n) ?? []) wrappers.set(path, w);
    for (const [path, w] of wrappers) {
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
    if (this.isMerged(name))
      throw new ConfigError(`adapter '${name}' is merged; unmerge it before changing its weight`);
    this.rt.weights.set(name, weight);
  }

  /** Whether any layer holds `name` merged into its base. */
  private isMerged(name: string): boolean {
    for (const l of this.layersOf.get(name)?.values() ?? []) if (l.merged.includes(name)) return true;
    return false;
  }

  /** Switches one adapter's parameters (LoRA matrices, modules_to_save copies) on or off for training. */
  private setAdapterTrainable(name: string, on: boolean): void {
    for (const l of this.layersOf.get(name)?.values() ?? []) l.setAdapterTrainable(name, on);
    for (const w of this.savedOf.get(name)?.values() ?? []) w.setAdapterTrainable(name, on);
  }

  /**
   * Active adapters train (unless inference mode or their config says inference_mode); everything else is frozen.
   * Only the adapters that were or become trainable are visited, and the base model's own parameters.
   */
  private applyTrainable(inferenceMode?: boolean): void {
    const want = new Set(this.rt.active.filter((a) => !(inferenceMode ?? this.configs.get(a)!.inference_mode)));
    for (const n of this.trainableNow) if (!want.has(n) && this.configs.has(n)) this.setAdapterTrainable(n, false);
    for (const n of want) this.setAdapterTrainable(n, true);
    this.trainableNow = want;
    // biases (bias = 'all' | 'lora_only') of the active adapters' configs; every other base parameter is frozen
    const modes = new Set(this.rt.active.map((a) => this.configs.get(a)!.bias));
    const loraBiases = modes.has('lora_only')
      ? new Set(this.adapterLayers().map(([path]) => `${path}.base_layer.bias`))
      : null;
    for (const [n, p] of this.baseParameters()) {
      const isBias = n === 'bias' || n.endsWith('.bias');
      p.requiresGrad = isBias && (modes.has('all') || !!loraBiases?.has(n));
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
    if (this.isMerged(name)) throw new ConfigError(`adapter '${name}' is merged; unmerge it before deleting it`);
    this.removeAdapterEverywhere(name);
    this.configs.delete(name);
    this.rt.weights.delete(name);
    this.trainableNow.delete(name);
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

  /** Takes the adapter out of its layers and wrappers; a layer or wrapper left empty gives way to its base. */
  private removeAdapterEverywhere(name: string): void {
    for (const [path, l] of this.layersOf.get(name) ?? []) {
      l.deleteAdapter(name);
      if (l.adapters.size === 0 && this.model.getModule(path) === l) this.model.setModule(path, l.base);
    }
    for (const [path, w] of this.savedOf.get(name) ?? []) {
      w.deleteAdapter(name);
      if (w.copies.keys().length === 0 && this.model.getModule(path) === w) this.model.setModule(path, w.original);
    }
    this.layersOf.delete(name);
    this.savedOf.delete(name);
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
    this.layersOf.clear();
    this.savedOf.clear();
    this.trainableNow.clear();
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

  /**
   * Groups the batch rows by adapter and scale for this forward (called as the model's forward starts). An entry
   * is an adapter name, null or '__base__' (the base model), or {name, scale}: that adapter with its scaling
   * times `scale` for this row, computed as the adapter alone with setAdapter(name, [scale]) would be.
   */
  private setRows(rows: unknown, batch: number): void {
    this.clearRows();
    if (rows === undefined || rows === null) return;
    const bad = () =>
      new ConfigError(
        'adapterRows must be an array with one entry per row: an adapter name, null for the base model, or {name, scale} with a finite scale',
      );
    if (!Array.isArray(rows)) throw bad();
    const parsed = rows.map((r: unknown): { name: string | null; scale: number } => {
      if (r === null || typeof r === 'string') return { name: r === BASE_ROW ? null : r, scale: 1 };
      if (typeof r !== 'object' || Array.isArray(r)) throw bad();
      const { name, scale = 1 } = r as { name?: unknown; scale?: unknown };
      if (!(name === null || typeof name === 'string') || typeof scale !== 'number' || !Number.isFinite(scale))
        throw bad();
      return { name: name === BASE_ROW ? null : name, scale };
    });
    if (rows.length !== batch)
      throw new ConfigError(`adapterRows has ${rows.length} names but the batch has ${batch} rows`);
    if (this.model.training) throw new ConfigError('adapterRows (per-row adapters) cannot be used in training mode');
    const names = new Set(parsed.map((r) => r.name));
    const unknown = [...names].filter((n): n is string => n !== null && !this.configs.has(n));
    if (unknown.length)
      throw new ConfigError(`adapterRows names adapter(s) that do not exist: ${unknown.sort().join(', ')}`);
    for (const r of names) {
      if (r === null) continue;
      if (this.configs.get(r)!.use_dora)
        throw new ConfigError(`adapterRows: adapter '${r}' uses DoRA, which mixed batches do not support (as in PEFT)`);
    }
    // one group per (adapter, scale); base rows ignore the scale
    const groups = new Map<string, { name: string | null; scale: number; idx: number[] }>();
    parsed.forEach((r, i) => {
      const scale = r.name === null ? 1 : r.scale;
      const k = `${r.name === null ? '' : `=${r.name}`}\u0000${scale}`;
      const g = groups.get(k);
      if (g) g.idx.push(i);
      else groups.set(k, { name: r.name, scale, idx: [i] });
    });
    const out: RowGroups = { batch, groups: [] };
    for (const { name, scale, idx } of groups.values()) {
      const t = keep(intTensor(idx));
      this.rowTensors.push(t);
      out.groups.push(scale === 1 ? { name, idx: t } : { name, idx: t, scale });
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
