// The engine worker's adapter cache, in three tiers (as vLLM's GPU slots / CPU LRU / disk, sized in bytes as
// well as in count, since adapters of different ranks differ in size):
//
//   resident  adapter sets injected into the model's LoRA layers, usable in a batch: at most `maxLoras`
//             (--max-loras). An entry is one adapter at weight 1, or a derived set (a scaled adapter, or a
//             weighted mixture) built on the fly. Evicted LRU when a new set needs the slot and no running
//             sequence holds it.
//   host      adapters read from disk and kept in memory (--max-cpu-loras, --max-cpu-lora-mb), LRU.
//   disk      the registered adapter dirs; read on a miss.
//
// The base weights are never touched: each resident set is a separate PEFT adapter of one LoraModel, and a
// batch picks one per row through ForwardContext.adapterRows (rows grouped by adapter, one shrink and one
// expand per group). Adapters of different ranks sit side by side.
//
// A mixture sum_i w_i * s_i * B_i A_i x (LoRAX's linear merge, per request) is computed exactly as one adapter
// whose A stacks the A_i along the rank axis and whose B puts the w_i * s_i * B_i side by side: its rank is the
// sum of the ranks, and nothing is merged into the base weights.

import { getBackend } from '../backend/index.ts';
import { ConfigError, FormatError, LowrankError, RequestError } from '../core/errors.ts';
import { keep } from '../core/scope.ts';
import type { Tensor } from '../core/tensor.ts';
import type { LlamaForCausalLM } from '../models/llama.ts';
import { empty } from '../ops/create.ts';
import { noGrad } from '../ops/tape.ts';
import { type LoraConfig, loraConfig, loraScaling } from '../peft/lora/config.ts';
import { loadAdapter, readAdapterConfig } from '../peft/lora/io.ts';
import { LoraLinear } from '../peft/lora/layer.ts';
import { LoraModel } from '../peft/lora/model.ts';
import { checkTargetModuleExists, rankAndAlpha } from '../peft/lora/target.ts';
import { type AdapterLease, type AdapterPool, type AdapterRef, type AdapterSpec, adapterKey } from './engine.ts';

export interface AdapterCacheOptions {
  /** Resident adapter sets (distinct adapters in the running batch) at most. */
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
  resident: number;
  maxResident: number;
  host: number;
  hostBytes: number;
  hitsResident: number;
  hitsHost: number;
  loads: number;
  evictionsResident: number;
  evictionsHost: number;
  /** Adapter names with a resident entry (alone or in a mixture), and names in host memory. */
  residentNames: string[];
  hostNames: string[];
}

/** An adapter's matrices for one module (f32 copies, owned by the host entry). */
interface ModuleWeights {
  a: Tensor;
  b: Tensor;
  bias: Tensor | null;
}

/** An adapter in host memory: its config and its matrices by module path. */
interface HostEntry {
  ref: AdapterRef;
  config: LoraConfig;
  modules: Map<string, ModuleWeights>;
  bytes: number;
  lastUse: number;
}

interface ResidentEntry extends AdapterLease {
  /** The adapter's name inside the LoraModel. */
  internal: string;
  parts: AdapterSpec;
  refs: number;
  lastUse: number;
}

const hostKey = (r: { name: string; version: number }) => `${r.name}@${r.version}`;

function bytesOf(t: Tensor): number {
  return t.size * (t.dtype === 'f32' || t.dtype === 'i32' ? 4 : t.dtype === 'u8' ? 1 : 2);
}

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
  // PEFT saves the base weights of targeted embedding layers with the adapter; loading them would change the
  // shared base model
  for (const key of ['model.embed_tokens', 'lm_head'])
    if (checkTargetModuleExists(cfg, key) === 'match')
      throw new ConfigError(
        `${where}: LoRA on '${key}' is not supported by the server (only linear layers inside the blocks)`,
      );
}

export class AdapterCache implements AdapterPool {
  private pm: LoraModel | null = null;
  private readonly host = new Map<string, HostEntry>();
  private readonly resident = new Map<string, ResidentEntry>();
  /** Sets whose adapter was replaced or removed while sequences still hold them: freed on their last release. */
  private readonly retired = new Set<ResidentEntry>();
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
  preload(ref: Omit<AdapterRef, 'weight'>): AdapterInfo {
    const h = this.hostEntry({ ...ref, weight: 1 }, null);
    let rank = 0;
    let alpha = 0;
    for (const path of h.modules.keys()) {
      const ra = rankAndAlpha(h.config, path);
      rank = Math.max(rank, ra.r);
      alpha = Math.max(alpha, ra.alpha);
    }
    return { name: ref.name, rank, alpha, targetModules: [...h.modules.keys()], bytes: h.bytes };
  }

  acquire(spec: AdapterSpec): AdapterLease | null {
    const key = adapterKey(spec);
    const now = ++this.clock;
    const hit = this.resident.get(key);
    if (hit) {
      this.counters.hitsResident++;
      hit.refs++;
      hit.lastUse = now;
      for (const p of spec) {
        const h = this.host.get(hostKey(p));
        if (h) h.lastUse = now;
      }
      return hit;
    }
    if (this.resident.size + this.retired.size >= this.opts.maxLoras && !this.evictResident()) return null;
    const internal = `s${this.nextInternal++}`;
    if (spec.length === 1 && spec[0]!.weight === 1) {
      // a disk read loads straight into the slot; a host hit is copied in
      const cached = this.host.has(hostKey(spec[0]!));
      const h = this.hostEntry(spec[0]!, internal);
      if (cached) this.injectOne(internal, h);
    } else
      this.injectMixture(
        internal,
        spec.map((p) => ({ host: this.hostEntry(p, null), weight: p.weight })),
      );
    this.lora.rt.active = [];
    const entry: ResidentEntry = { key, internal, parts: spec, refs: 1, lastUse: now };
    this.resident.set(key, entry);
    return entry;
  }

  release(lease: AdapterLease): void {
    const e = lease as ResidentEntry;
    e.refs--;
    if (e.refs === 0 && this.retired.delete(e)) this.unload(e);
  }

  rows(leases: readonly (AdapterLease | null)[]): unknown {
    if (!this.pm) return undefined;
    return leases.map((l) => (l ? (l as ResidentEntry).internal : null));
  }

  /** Forgets an adapter's cached versions except `keep` (resident sets go when no sequence holds them). */
  drop(name: string, keep?: number): void {
    for (const [k, h] of this.host)
      if (h.ref.name === name && h.ref.version !== keep) {
        this.host.delete(k);
        this.disposeHost(h);
      }
    for (const e of [...this.resident.values()])
      if (e.parts.some((p) => p.name === name && p.version !== keep)) {
        this.resident.delete(e.key);
        if (e.refs === 0) this.unload(e);
        else this.retired.add(e);
      }
  }

  stats(): AdapterCacheStats {
    return {
      resident: this.resident.size + this.retired.size,
      maxResident: this.opts.maxLoras,
      host: this.host.size,
      hostBytes: [...this.host.values()].reduce((s, h) => s + h.bytes, 0),
      ...this.counters,
      residentNames: [...new Set([...this.resident.values()].flatMap((e) => e.parts.map((p) => p.name)))].sort(),
      hostNames: [...new Set([...this.host.values()].map((h) => h.ref.name))].sort(),
    };
  }

  dispose(): void {
    for (const e of [...this.resident.values(), ...this.retired]) this.unload(e);
    this.resident.clear();
    this.retired.clear();
    for (const h of this.host.values()) this.disposeHost(h);
    this.host.clear();
  }

  // ---- tiers ----

  /**
   * The host-memory copy of an adapter, read from disk on a miss. `slot`: on a miss, leave the adapter loaded
   * in the model under this name (it is about to become resident) instead of removing it.
   */
  private hostEntry(ref: AdapterRef, slot: string | null): HostEntry {
    const k = hostKey(ref);
    const now = ++this.clock;
    const hit = this.host.get(k);
    if (hit) {
      this.counters.hitsHost++;
      hit.lastUse = now;
      return hit;
    }
    const h = this.readAdapter(ref, slot);
    this.counters.loads++;
    h.lastUse = now;
    this.host.set(k, h);
    this.trimHost(k);
    return h;
  }

  /** Loads through PEFT's loader into an adapter slot of the model and copies the matrices out. */
  private readAdapter(ref: AdapterRef, slot: string | null): HostEntry {
    const where = `adapter '${ref.name}'`;
    const hide = (m: string) => m.split(ref.path).join(`<${ref.name}>`);
    const name = slot ?? `tmp${this.nextInternal++}`;
    const pm = this.lora;
    let ok = false;
    try {
      const cfg = readAdapterConfig(ref.path, () => {});
      checkServable(cfg, where);
      const problems: string[] = [];
      loadAdapter(pm, ref.path, { adapterName: name, onWarning: (m) => problems.push(m) });
      pm.rt.active = [];
      const missing = problems.find((m) => m.includes('missing adapter keys'));
      if (missing) throw new FormatError(`${where} is incomplete: ${missing}`);
      for (const m of problems) console.warn(`${where}: ${hide(m)}`);
      const config = pm.configs.get(name)!;
      const modules = new Map<string, ModuleWeights>();
      let bytes = 0;
      const copy = (t: Tensor) => {
        const c = keep(empty(t.shape));
        getBackend().copy(t, c);
        bytes += bytesOf(c);
        return c;
      };
      noGrad(() => {
        for (const [path, layer] of pm.adapterLayers()) {
          if (!layer.has(name)) continue;
          if (!(layer instanceof LoraLinear))
            throw new ConfigError(
              `${where}: '${path}' is not a linear layer; the server applies LoRA to linear layers only`,
            );
          const B = layer.loraB.get(name)!;
          modules.set(path, {
            a: copy(layer.loraA.get(name)!.weight),
            b: copy(B.weight),
            bias: B.bias ? copy(B.bias) : null,
          });
        }
      });
      ok = true;
      return { ref, config, modules, bytes, lastUse: 0 };
    } catch (e) {
      if (e instanceof RequestError) throw e;
      const msg = e instanceof LowrankError ? hide(e.message) : 'internal error while reading it';
      if (!(e instanceof LowrankError)) console.error(`${where}:`, e);
      throw new RequestError(`${where} could not be loaded: ${msg}`, 400, 'adapter_load_failed');
    } finally {
      if ((!ok || !slot) && pm.configs.has(name)) pm.deleteAdapter(name);
    }
  }

  private trimHost(justAdded: string): void {
    const over = () =>
      this.host.size > this.opts.maxCpuLoras ||
      [...this.host.values()].reduce((s, h) => s + h.bytes, 0) > this.opts.maxCpuLoraBytes;
    while (over()) {
      let victim: [string, HostEntry] | null = null;
      for (const [k, h] of this.host)
        if (k !== justAdded && (!victim || h.lastUse < victim[1].lastUse)) victim = [k, h];
      if (!victim) break; // only the new one is left: it stays (a single adapter larger than the budget)
      this.host.delete(victim[0]);
      this.disposeHost(victim[1]);
      this.counters.evictionsHost++;
    }
  }

  private disposeHost(h: HostEntry): void {
    for (const m of h.modules.values()) for (const t of [m.a, m.b, m.bias]) t?.dispose();
    h.modules.clear();
  }

  /** Frees the least recently used resident set that no sequence holds; false if every one is in use. */
  private evictResident(): boolean {
    let victim: ResidentEntry | null = null;
    for (const e of this.resident.values()) if (e.refs === 0 && (!victim || e.lastUse < victim.lastUse)) victim = e;
    if (!victim) return false;
    this.resident.delete(victim.key);
    this.unload(victim);
    this.counters.evictionsResident++;
    return true;
  }

  /** Removes a set's adapter from the model. */
  private unload(e: ResidentEntry): void {
    if (this.pm?.configs.has(e.internal)) this.pm.deleteAdapter(e.internal);
    if (this.pm) this.pm.rt.active = [];
  }

  // ---- building resident sets ----

  /** One adapter at weight 1: its own config, matrices copied into the new slot. */
  private injectOne(internal: string, h: HostEntry): void {
    const pm = this.lora;
    pm.addAdapter(internal, { ...h.config, inference_mode: true }, { forLoading: true });
    try {
      noGrad(() => {
        for (const [path, m] of h.modules) {
          const layer = pm.model.getModule(path);
          if (!(layer instanceof LoraLinear) || !layer.has(internal))
            throw new ConfigError(`adapter '${h.ref.name}': no LoRA slot at '${path}'`);
          const B = layer.loraB.get(internal)!;
          getBackend().copy(m.a, layer.loraA.get(internal)!.weight);
          getBackend().copy(m.b, B.weight);
          if (m.bias && B.bias) getBackend().copy(m.bias, B.bias);
        }
      });
    } catch (e) {
      pm.deleteAdapter(internal);
      throw e;
    }
  }

  /**
   * A weighted set as one adapter: per module, A = [A_1; A_2; ...] and B = [w_1 s_1 B_1, w_2 s_2 B_2, ...]
   * (zero blocks where an adapter does not touch the module), with scaling 1.
   */
  private injectMixture(internal: string, parts: { host: HostEntry; weight: number }[]): void {
    const pm = this.lora;
    const be = getBackend();
    // the union of touched modules; every one gets the summed rank (a zero block keeps the shapes uniform)
    const modules = [...new Set(parts.flatMap((p) => [...p.host.modules.keys()]))].sort();
    const R = parts.reduce(
      (s, p) => s + Math.max(...[...p.host.modules.keys()].map((m) => rankAndAlpha(p.host.config, m).r)),
      0,
    );
    const withBias = parts.some((p) => [...p.host.modules.values()].some((m) => m.bias));
    const cfg = loraConfig({
      r: R,
      lora_alpha: R,
      target_modules: modules,
      lora_dropout: 0,
      lora_bias: withBias,
      inference_mode: true,
      init_lora_weights: false,
    });
    pm.addAdapter(internal, cfg, { forLoading: true });
    try {
      noGrad(() => {
        for (const path of modules) {
          const layer = pm.model.getModule(path);
          if (!(layer instanceof LoraLinear)) throw new ConfigError(`mixture: '${path}' is not a LoRA linear layer`);
          const inF = layer.inFeatures;
          const outF = layer.outFeatures;
          const A = new Float32Array(R * inF);
          const B = new Float32Array(outF * R);
          const bias = withBias ? new Float32Array(outF) : null;
          let off = 0;
          for (const p of parts) {
            const rPart = Math.max(...[...p.host.modules.keys()].map((m) => rankAndAlpha(p.host.config, m).r));
            const mod = p.host.modules.get(path);
            if (mod) {
              const { r, alpha } = rankAndAlpha(p.host.config, path);
              const s = loraScaling(alpha, r, p.host.config.use_rslora) * p.weight;
              const a = mod.a.toF32();
              const b = mod.b.toF32();
              A.set(a, off * inF);
              for (let o = 0; o < outF; o++) for (let j = 0; j < r; j++) B[o * R + off + j] = s * b[o * r + j]!;
              if (bias && mod.bias) {
                const lb = mod.bias.toF32();
                for (let o = 0; o < outF; o++) bias[o]! += s * lb[o]!;
              }
            }
            off += rPart;
          }
          const fill = (dst: Tensor, src: Float32Array) => {
            const t = empty(dst.shape);
            (t.data as Float32Array).set(src);
            be.copy(t, dst);
            t.dispose();
          };
          fill(layer.loraA.get(internal)!.weight, A);
          fill(layer.loraB.get(internal)!.weight, B);
          const lb = layer.loraB.get(internal)!.bias;
          if (lb && bias) fill(lb, bias);
        }
      });
    } catch (e) {
      pm.deleteAdapter(internal);
      throw e;
    }
  }
}
