// The engine worker's adapter cache, in three tiers (as vLLM's GPU slots / CPU LRU / disk, sized in bytes as
// well as in count, since adapters of different ranks differ in size):
//
//   resident  adapter weights injected into the model's LoRA layers, usable in a batch: at most `maxLoras`
//             (--max-loras) slots. A slot holds one adapter (at weight 1) or a weighted mixture built on the
//             fly. Evicted LRU when a new slot is needed and no running sequence holds it.
//   host      adapters read from disk into memory (--max-cpu-loras, --max-cpu-lora-mb), LRU; making one
//             resident copies its matrices into the model (addAdapterFromWeights), nothing else.
//   disk      the registered adapter dirs; read on a miss (readAdapterWeights, checked against the model
//             strictly, with the base weights refused, before anything is injected).
//
// The base weights are never touched: each slot is a separate PEFT adapter of one LoraModel, and a batch picks
// one per row through ForwardContext.adapterRows (rows grouped by adapter and scale; each layer computes every
// group in one loraRows call). Adapters of different ranks sit side by side. A request's scale (adapter_scale)
// is a per-row scale on the adapter's slot: scaled and unscaled requests share the same resident weights. Each
// distinct (adapter set, scale) is a "set" (a lease the engine holds), a cheap view of its slot.
//
// A mixture sum_i w_i * s_i * B_i A_i x (LoRAX's linear merge, per request) is computed exactly as one adapter
// whose A stacks the A_i along the rank axis and whose B puts the w_i * s_i * B_i side by side: its rank is the
// sum of the ranks, and nothing is merged into the base weights.

import { ConfigError, LowrankError, RequestError } from '../core/errors.ts';
import { keep } from '../core/scope.ts';
import type { Tensor } from '../core/tensor.ts';
import type { LlamaForCausalLM } from '../models/llama.ts';
import { tensor } from '../ops/create.ts';
import { type LoraConfig, loraConfig, loraScaling } from '../peft/lora/config.ts';
import { LoraModel } from '../peft/lora/model.ts';
import { checkTargetModuleExists } from '../peft/lora/target.ts';
import {
  type AdapterWeights,
  adapterWeightsBytes,
  addAdapterFromWeights,
  checkAdapterWeights,
  disposeAdapterWeights,
  readAdapterWeights,
} from '../peft/lora/weights.ts';
import { type AdapterLease, type AdapterPool, type AdapterRef, type AdapterSpec, adapterKey } from './engine.ts';

export interface AdapterCacheOptions {
  /** Resident adapter slots (distinct adapters or mixtures in the running batch) at most. */
  maxLoras: number;
  /** Adapters kept in host memory at most. */
  maxCpuLoras: number;
  /** Bytes of adapters kept in host memory at most. */
  maxCpuLoraBytes: number;
}

/** What loading an adapter found (answered to load_lora_adapter). */
export interface AdapterInfo {
  name: string;
  rank: number;
  alpha: number;
  targetModules: string[];
  bytes: number;
}

export interface AdapterCacheStats {
  /** Resident sets: adapter sets at a scale that a batch can use now (scaled views share their slot). */
  resident: number;
  /** Adapter weights injected into the model (at most maxResident). */
  residentSlots: number;
  maxResident: number;
  host: number;
  hostBytes: number;
  hitsResident: number;
  hitsHost: number;
  loads: number;
  evictionsResident: number;
  evictionsHost: number;
  /** Adapter names with a resident slot (alone or in a mixture), and names in host memory. */
  residentNames: string[];
  hostNames: string[];
}

type HostRef = Pick<AdapterRef, 'name' | 'version' | 'path'>;

/** One linear layer an adapter adapts. */
interface HostLayer {
  path: string;
  r: number;
  alpha: number;
}

/** An adapter in host memory: its tensors as read (checked against the model), and the layers it adapts. */
interface HostEntry {
  ref: HostRef;
  weights: AdapterWeights;
  layers: HostLayer[];
  bytes: number;
  lastUse: number;
}

/** Adapter weights injected into the model under `internal`: one adapter, or a weighted mixture. */
interface Slot {
  key: string;
  internal: string;
  parts: AdapterSpec;
  /** Leases held on the sets of this slot. */
  refs: number;
  lastUse: number;
  sets: Set<ResidentSet>;
  retired: boolean;
}

/** A lease: an adapter set at a scale, a view of its slot. */
interface ResidentSet extends AdapterLease {
  slot: Slot;
  /** The per-row scale on the slot (a single adapter's request weight; 1 for mixtures). */
  scale: number;
  refs: number;
  lastUse: number;
  retired: boolean;
}

const hostKey = (r: { name: string; version: number }) => `${r.name}@${r.version}`;
const PREFIX = 'base_model.model.';

/** Rejects what a shared, mixed-batch server cannot apply without changing the base model. */
function checkServable(cfg: LoraConfig, where: string): void {
  if (cfg.use_dora)
    throw new ConfigError(
      `${where}: DoRA adapters cannot be served in mixed batches (merge it into the model instead)`,
    );
  if (cfg.modules_to_save?.length)
    throw new ConfigError(
      `${where}: modules_to_save (${cfg.modules_to_save.join(', ')}) replaces base modules, which a multi-adapter server cannot do`,
    );
  if (cfg.bias !== 'none')
    throw new ConfigError(`${where}: bias '${cfg.bias}' trains base-model biases; only 'none' can be served`);
  // mixtures stack linear LoRA matrices only (and embedding base weights are refused by the loader anyway)
  for (const key of ['model.embed_tokens', 'lm_head'])
    if (checkTargetModuleExists(cfg, key) === 'match')
      throw new ConfigError(
        `${where}: LoRA on '${key}' is not supported by the server (only linear layers inside the blocks)`,
      );
}

export class AdapterCache implements AdapterPool {
  private pm: LoraModel | null = null;
  private readonly host = new Map<string, HostEntry>();
  private readonly slots = new Map<string, Slot>();
  private readonly sets = new Map<string, ResidentSet>();
  /** Slots and sets whose adapter was replaced or removed while sequences hold them: freed on their last release. */
  private readonly retiredSlots = new Set<Slot>();
  private readonly retiredSets = new Set<ResidentSet>();
  private clock = 0;
  private nextInternal = 1;
  private readonly counters = { hitsResident: 0, hitsHost: 0, loads: 0, evictionsResident: 0, evictionsHost: 0 };

  constructor(
    private readonly model: LlamaForCausalLM,
    readonly opts: AdapterCacheOptions,
  ) {
    if (!(opts.maxLoras >= 1)) throw new ConfigError(`--max-loras must be >= 1, got ${opts.maxLoras}`);
    if (!(opts.maxCpuLoras >= 1)) throw new ConfigError(`--max-cpu-loras must be >= 1, got ${opts.maxCpuLoras}`);
  }

  private get lora(): LoraModel {
    if (!this.pm) {
      this.pm = new LoraModel(this.model, null, 'default', { onWarning: (m) => console.warn(`adapter: ${m}`) });
      this.model.eval();
    }
    return this.pm;
  }

  /** Reads an adapter into host memory (validating it); the runtime load endpoint calls this. */
  preload(ref: HostRef): AdapterInfo {
    const h = this.hostEntry(ref);
    let rank = 0;
    let alpha = 0;
    for (const l of h.layers) {
      rank = Math.max(rank, l.r);
      alpha = Math.max(alpha, l.alpha);
    }
    return { name: ref.name, rank, alpha, targetModules: h.layers.map((l) => l.path), bytes: h.bytes };
  }

  acquire(spec: AdapterSpec): AdapterLease | null {
    const key = adapterKey(spec);
    const now = ++this.clock;
    const hit = this.sets.get(key);
    if (hit) {
      this.counters.hitsResident++;
      this.hold(hit, now);
      for (const p of spec) {
        const h = this.host.get(hostKey(p));
        if (h) h.lastUse = now;
      }
      return hit;
    }
    // one adapter at any weight shares its slot (the weight is a per-row scale); a mixture is a slot of its own
    const single = spec.length === 1;
    const slotKey = single ? hostKey(spec[0]!) : key;
    let slot = this.slots.get(slotKey);
    if (slot) this.counters.hitsResident++;
    else {
      if (this.slots.size + this.retiredSlots.size >= this.opts.maxLoras && !this.evictSlot()) return null;
      slot = this.makeSlot(slotKey, spec);
    }
    const set: ResidentSet = { key, slot, scale: single ? spec[0]!.weight : 1, refs: 0, lastUse: now, retired: false };
    slot.sets.add(set);
    this.sets.set(key, set);
    this.hold(set, now);
    this.trimSets();
    return set;
  }

  release(lease: AdapterLease): void {
    const e = lease as ResidentSet;
    e.refs--;
    e.slot.refs--;
    if (e.refs === 0 && e.retired) this.retiredSets.delete(e);
    if (e.slot.refs === 0 && e.slot.retired) {
      this.retiredSlots.delete(e.slot);
      this.unload(e.slot);
    }
  }

  rows(leases: readonly (AdapterLease | null)[]): unknown {
    if (!this.pm) return undefined;
    return leases.map((l) => {
      if (!l) return null;
      const e = l as ResidentSet;
      return e.scale === 1 ? e.slot.internal : { name: e.slot.internal, scale: e.scale };
    });
  }

  /** Forgets an adapter's cached versions except `keep` (resident slots go when no sequence holds them). */
  drop(name: string, keep?: number): void {
    for (const [k, h] of this.host)
      if (h.ref.name === name && h.ref.version !== keep) {
        this.host.delete(k);
        disposeAdapterWeights(h.weights);
      }
    for (const slot of [...this.slots.values()])
      if (slot.parts.some((p) => p.name === name && p.version !== keep)) {
        this.slots.delete(slot.key);
        for (const set of slot.sets) {
          this.sets.delete(set.key);
          if (set.refs > 0) {
            set.retired = true;
            this.retiredSets.add(set);
          }
        }
        if (slot.refs === 0) this.unload(slot);
        else {
          slot.retired = true;
          this.retiredSlots.add(slot);
        }
      }
  }

  stats(): AdapterCacheStats {
    return {
      resident: this.sets.size + this.retiredSets.size,
      residentSlots: this.slots.size + this.retiredSlots.size,
      maxResident: this.opts.maxLoras,
      host: this.host.size,
      hostBytes: this.hostBytes(),
      ...this.counters,
      residentNames: [...new Set([...this.slots.values()].flatMap((e) => e.parts.map((p) => p.name)))].sort(),
      hostNames: [...new Set([...this.host.values()].map((h) => h.ref.name))].sort(),
    };
  }

  dispose(): void {
    for (const e of [...this.slots.values(), ...this.retiredSlots]) this.unload(e);
    this.slots.clear();
    this.sets.clear();
    this.retiredSlots.clear();
    this.retiredSets.clear();
    for (const h of this.host.values()) disposeAdapterWeights(h.weights);
    this.host.clear();
  }

  // ---- tiers ----

  private hostBytes(): number {
    let n = 0;
    for (const h of this.host.values()) n += h.bytes;
    return n;
  }

  /** The host-memory copy of an adapter, read from disk on a miss; `pinned` host entries are not evicted now. */
  private hostEntry(ref: HostRef, pinned: ReadonlySet<string> = new Set()): HostEntry {
    const k = hostKey(ref);
    const now = ++this.clock;
    const hit = this.host.get(k);
    if (hit) {
      this.counters.hitsHost++;
      hit.lastUse = now;
      return hit;
    }
    const h = this.readAdapter(ref);
    this.counters.loads++;
    h.lastUse = now;
    this.host.set(k, h);
    this.trimHost(new Set([...pinned, k]));
    return h;
  }

  /** Reads an adapter dir into memory and checks it against the model (strictly, base weights refused). */
  private readAdapter(ref: HostRef): HostEntry {
    const where = `adapter '${ref.name}'`;
    const hide = (m: string) => m.split(ref.path).join(`<${ref.name}>`);
    let weights: AdapterWeights | null = null;
    try {
      weights = readAdapterWeights(ref.path, { onWarning: (m) => console.warn(`${where}: ${hide(m)}`) });
      checkServable(weights.config, where);
      const check = checkAdapterWeights(this.lora, weights, { strict: true, baseWeights: 'refuse' });
      const layers: HostLayer[] = [];
      for (const l of check.layers) {
        if (l.kind !== 'linear')
          throw new ConfigError(
            `${where}: '${l.path}' is not a linear layer; the server applies LoRA to linear layers only`,
          );
        layers.push({ path: l.path, r: l.r, alpha: l.alpha });
      }
      return { ref, weights, layers, bytes: adapterWeightsBytes(weights), lastUse: 0 };
    } catch (e) {
      if (weights) disposeAdapterWeights(weights);
      if (e instanceof RequestError) throw e;
      const msg = e instanceof LowrankError ? hide(e.message) : 'internal error while reading it';
      if (!(e instanceof LowrankError)) console.error(`${where}:`, e);
      throw new RequestError(`${where} could not be loaded: ${msg}`, 400, 'adapter_load_failed');
    }
  }

  private trimHost(keepNow: ReadonlySet<string>): void {
    const over = () => this.host.size > this.opts.maxCpuLoras || this.hostBytes() > this.opts.maxCpuLoraBytes;
    while (over()) {
      let victim: [string, HostEntry] | null = null;
      for (const [k, h] of this.host)
        if (!keepNow.has(k) && (!victim || h.lastUse < victim[1].lastUse)) victim = [k, h];
      if (!victim) break; // only entries in use now are left: they stay (adapters larger than the budget)
      this.host.delete(victim[0]);
      disposeAdapterWeights(victim[1].weights);
      this.counters.evictionsHost++;
    }
  }

  private hold(set: ResidentSet, now: number): void {
    set.refs++;
    set.lastUse = now;
    set.slot.refs++;
    set.slot.lastUse = now;
  }

  /** Keeps the sets (cheap views) bounded: the least recently used unheld ones go, their slots stay. */
  private trimSets(): void {
    const cap = Math.max(16, 4 * this.opts.maxLoras);
    while (this.sets.size > cap) {
      let victim: ResidentSet | null = null;
      for (const e of this.sets.values()) if (e.refs === 0 && (!victim || e.lastUse < victim.lastUse)) victim = e;
      if (!victim) return;
      this.sets.delete(victim.key);
      victim.slot.sets.delete(victim);
    }
  }

  /** Frees the least recently used slot that no sequence holds; false if every one is in use. */
  private evictSlot(): boolean {
    let victim: Slot | null = null;
    for (const e of this.slots.values()) if (e.refs === 0 && (!victim || e.lastUse < victim.lastUse)) victim = e;
    if (!victim) return false;
    this.slots.delete(victim.key);
    for (const set of victim.sets) this.sets.delete(set.key);
    this.unload(victim);
    this.counters.evictionsResident++;
    return true;
  }

  /** Removes a slot's adapter from the model. */
  private unload(e: Slot): void {
    e.sets.clear();
    if (this.pm?.configs.has(e.internal)) this.pm.deleteAdapter(e.internal);
  }

  // ---- building slots ----

  /** Injects one adapter (from host memory) or a weighted mixture as a new, inactive adapter of the model. */
  private makeSlot(key: string, spec: AdapterSpec): Slot {
    const internal = `s${this.nextInternal++}`;
    const opts = { strict: true, baseWeights: 'refuse' as const, activate: false };
    if (spec.length === 1) addAdapterFromWeights(this.lora, internal, this.hostEntry(spec[0]!).weights, opts);
    else {
      const pinned = new Set<string>();
      const parts = spec.map((p) => {
        const host = this.hostEntry(p, pinned);
        pinned.add(hostKey(p));
        return { host, weight: p.weight };
      });
      const mixed = this.mixtureWeights(parts);
      try {
        addAdapterFromWeights(this.lora, internal, mixed, opts);
      } finally {
        disposeAdapterWeights(mixed);
      }
    }
    const slot: Slot = { key, internal, parts: spec, refs: 0, lastUse: this.clock, sets: new Set(), retired: false };
    this.slots.set(key, slot);
    return slot;
  }

  /**
   * A weighted set as one adapter's weights: per module, A = [A_1; A_2; ...] and B = [w_1 s_1 B_1, w_2 s_2 B_2,
   * ...] (zero blocks where an adapter does not touch the module), with scaling 1.
   */
  private mixtureWeights(parts: { host: HostEntry; weight: number }[]): AdapterWeights {
    // the union of touched modules; every one gets the summed rank (a zero block keeps the shapes uniform)
    const modules = [...new Set(parts.flatMap((p) => p.host.layers.map((l) => l.path)))].sort();
    const rankOf = parts.map((p) => Math.max(...p.host.layers.map((l) => l.r)));
    const R = rankOf.reduce((s, r) => s + r, 0);
    const withBias = parts.some((p) => p.host.weights.config.lora_bias);
    const config = loraConfig({
      r: R,
      lora_alpha: R,
      target_modules: this.targetsFor(modules),
      lora_dropout: 0,
      lora_bias: withBias,
      inference_mode: true,
      init_lora_weights: false,
    });
    const tensors = new Map<string, Tensor>();
    const put = (key: string, v: Float32Array, shape: number[]) => tensors.set(key, keep(tensor(v, shape)));
    try {
      for (const path of modules) {
        const k = `${PREFIX}${path}`;
        const some = parts.find((p) => p.host.weights.tensors.has(`${k}.lora_A.weight`))!.host.weights.tensors;
        const inF = some.get(`${k}.lora_A.weight`)!.shape[1]!;
        const outF = some.get(`${k}.lora_B.weight`)!.shape[0]!;
        const A = new Float32Array(R * inF);
        const B = new Float32Array(outF * R);
        const bias = withBias ? new Float32Array(outF) : null;
        let off = 0;
        parts.forEach((p, i) => {
          const layer = p.host.layers.find((l) => l.path === path);
          if (layer) {
            const { r, alpha } = layer;
            const s = loraScaling(alpha, r, p.host.weights.config.use_rslora) * p.weight;
            const t = p.host.weights.tensors;
            A.set(t.get(`${k}.lora_A.weight`)!.toF32(), off * inF);
            const b = t.get(`${k}.lora_B.weight`)!.toF32();
            for (let o = 0; o < outF; o++) for (let j = 0; j < r; j++) B[o * R + off + j] = s * b[o * r + j]!;
            const lb = t.get(`${k}.lora_B.bias`);
            if (bias && lb) {
              const v = lb.toF32();
              for (let o = 0; o < outF; o++) bias[o]! += s * v[o]!;
            }
          }
          off += rankOf[i]!;
        });
        put(`${k}.lora_A.weight`, A, [R, inF]);
        put(`${k}.lora_B.weight`, B, [outF, R]);
        if (bias) put(`${k}.lora_B.bias`, bias, [outF]);
      }
    } catch (e) {
      for (const t of tensors.values()) t.dispose();
      throw e;
    }
    return { config, tensors, file: `mixture of ${parts.map((p) => `'${p.host.ref.name}'`).join(', ')}` };
  }

  /**
   * target_modules selecting exactly these module paths: their leaf names when those select nothing else (a
   * short list, matched per module), else the paths as one anchored regex.
   */
  private targetsFor(paths: string[]): string | string[] {
    const want = new Set(paths);
    const leaves = [...new Set(paths.map((p) => p.slice(p.lastIndexOf('.') + 1)))].sort();
    const selected = this.lora
      .baseModules()
      .filter(([n]) => n && leaves.some((l) => n === l || n.endsWith(`.${l}`)))
      .map(([n]) => n);
    if (selected.length === want.size && selected.every((n) => want.has(n))) return leaves;
    return paths.map((p) => p.replace(/[.]/g, '\\.')).join('|');
  }
}
