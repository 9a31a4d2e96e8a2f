// Adapters held in host memory, for a server's middle tier (vLLM's CPU LoRA cache, LoRAX's host tier): an adapter
// dir is read once into tensors without touching any model (readAdapterWeights), checked against a model without
// injecting it (checkAdapterWeights), and made resident when a batch needs it (addAdapterFromWeights), which costs
// a copy of that adapter's matrices and nothing that grows with the other adapters. deleteAdapter evicts it again.

import { getBackend } from '../../backend/index.ts';
import { FormatError } from '../../core/errors.ts';
import { keep } from '../../core/scope.ts';
import { Tensor } from '../../core/tensor.ts';
import { openSafetensors, type RawTensor, toFloat32 } from '../../formats/safetensors.ts';
import type { LlamaForCausalLM } from '../../models/llama.ts';
import { DTYPE_OF } from '../../models/weights.ts';
import type { LoraConfig } from './config.ts';
import { adapterWeightsFile, type FillSource, type LoadAdapterOptions, loadFrom, readAdapterConfig } from './io.ts';
import { adapterLayout, checkKeys, type KeyCheck, type KeyCheckOptions, type WeightSource } from './layout.ts';
import type { LoraModel, PlannedLayer } from './model.ts';

/** An adapter read into memory: its config and its tensors by on-disk key (base_model.model.….lora_A.weight). */
export interface AdapterWeights {
  config: LoraConfig;
  /** Host tensors in the file's dtype (f32, bf16 or f16; other dtypes as f32), owned by this object. */
  tensors: Map<string, Tensor>;
  /** The file the tensors came from (named in errors). */
  file: string;
}

export interface ReadAdapterWeightsOptions {
  /** Where config warnings go (default console.warn). */
  onWarning?: (message: string) => void;
}

/** A raw safetensors tensor as a kept host Tensor, without a copy where the dtype is one lowrank stores. */
function hostTensor(raw: RawTensor, where: string): Tensor {
  const dt = DTYPE_OF[raw.dtype];
  const shape = [...raw.shape];
  const n = raw.shape.reduce((a, b) => a * b, 1);
  const b = raw.data;
  let t: Tensor;
  if (dt === 'f32' && b.byteOffset % 4 === 0) t = Tensor.fromTyped(new Float32Array(b.buffer, b.byteOffset, n), shape);
  else if ((dt === 'bf16' || dt === 'f16') && b.byteOffset % 2 === 0)
    t = Tensor.fromTyped(new Uint16Array(b.buffer, b.byteOffset, n), shape, dt);
  else {
    let v: Float32Array;
    try {
      v = toFloat32(raw);
    } catch (e) {
      throw new FormatError(`${where}: cannot read ${raw.dtype} as floats: ${(e as Error).message}`);
    }
    t = Tensor.fromTyped(v, shape);
  }
  return keep(t);
}

/**
 * Reads an adapter dir (adapter_config.json + adapter_model.safetensors) into memory. No model is involved: check
 * it against one with checkAdapterWeights, add it with addAdapterFromWeights, free it with disposeAdapterWeights.
 */
export function readAdapterWeights(dir: string, opts: ReadAdapterWeightsOptions = {}): AdapterWeights {
  const config = readAdapterConfig(dir, opts.onWarning);
  const file = adapterWeightsFile(dir);
  const reader = openSafetensors(file);
  const tensors = new Map<string, Tensor>();
  try {
    for (const key of reader.names()) tensors.set(key, hostTensor(reader.read(key), `${file}: tensor '${key}'`));
  } catch (e) {
    for (const t of tensors.values()) t.dispose();
    throw e;
  } finally {
    reader.close();
  }
  return { config, tensors, file };
}

/** Frees the tensors of an adapter read with readAdapterWeights. */
export function disposeAdapterWeights(w: AdapterWeights): void {
  for (const t of w.tensors.values()) t.dispose();
  w.tensors.clear();
}

/** Host bytes an adapter's tensors take. */
export function adapterWeightsBytes(w: AdapterWeights): number {
  let n = 0;
  for (const t of w.tensors.values())
    n += t.size * (t.dtype === 'f32' || t.dtype === 'i32' ? 4 : t.dtype === 'u8' ? 1 : 2);
  return n;
}

function memorySource(w: AdapterWeights): FillSource {
  const be = getBackend();
  return {
    file: w.file,
    keys: () => [...w.tensors.keys()],
    shape: (key) => w.tensors.get(key)!.shape,
    fill: (key, dst) => be.copy(w.tensors.get(key)!, dst),
  };
}

export interface AddFromWeightsOptions extends Omit<LoadAdapterOptions, 'adapterName'> {}

/**
 * Adds an adapter held in memory to a model (a plain model is wrapped in a new LoraModel), as loadAdapter would
 * add it from its dir: the same checks (`strict`, `baseWeights`), warnings and activation rules. The model gets
 * its own f32 copies; `loaded` stays usable (add it again under another name, or dispose it).
 */
export function addAdapterFromWeights(
  target: LlamaForCausalLM | LoraModel,
  name: string,
  loaded: AdapterWeights,
  opts: AddFromWeightsOptions = {},
): LoraModel {
  const cfg: LoraConfig = {
    ...loaded.config,
    extra: { ...loaded.config.extra },
    inference_mode: !opts.isTrainable,
  };
  return loadFrom(target, name, cfg, memorySource(loaded), { ...opts, where: loaded.file });
}

export interface AdapterWeightsCheck extends KeyCheck {
  /** The layers the adapter would go into, with their ranks and shapes. */
  layers: readonly PlannedLayer[];
  /** modules_to_save it would copy. */
  saved: readonly string[];
}

/**
 * Checks an adapter held in memory against a LoraModel without changing it: its config against the model (as
 * addAdapter would), its tensors' shapes, the base-weights policy and, with `strict`, missing and unexpected
 * keys. Throws what addAdapterFromWeights would throw for them; returns what it would load.
 */
export function checkAdapterWeights(
  pm: LoraModel,
  loaded: AdapterWeights,
  opts: KeyCheckOptions = {},
): AdapterWeightsCheck {
  let name = 'adapter';
  for (let i = 1; pm.configs.has(name); i++) name = `adapter${i}`;
  const plan = pm.planAdapter(name, loaded.config, { forLoading: true });
  const src: WeightSource = memorySource(loaded);
  const check = checkKeys(adapterLayout(pm, plan), plan.config, src, opts);
  return { ...check, layers: plan.layers, saved: plan.saved };
}
