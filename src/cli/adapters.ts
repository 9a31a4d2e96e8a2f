// Applying --adapter options to a loaded model: each PEFT adapter dir is loaded (frozen) and all are activated
// together, --weights scaling each one (PEFT's set_scale: scaling = weight * alpha / r).

import { basename, resolve } from 'node:path';
import { ConfigError } from '../core/errors.ts';
import type { LlamaForCausalLM } from '../models/llama.ts';
import { loadAdapter } from '../peft/lora/io.ts';
import type { LoraModel } from '../peft/lora/model.ts';

/** Parses --weights: comma-separated finite numbers, one per adapter. */
export function parseAdapterWeights(weights: string | undefined, count: number): number[] | undefined {
  if (weights === undefined) return undefined;
  const parts = weights.split(',').map((s) => s.trim());
  const vals = parts.map(Number);
  if (parts.some((p) => p === '') || vals.some((v) => !Number.isFinite(v)))
    throw new ConfigError(`--weights must be comma-separated numbers, got '${weights}'`);
  if (vals.length !== count)
    throw new ConfigError(`--weights gives ${vals.length} value(s) for ${count} adapter(s); give one per --adapter`);
  return vals;
}

/** Adapter names from their dirs: the folder name (made a valid name), unique. */
function adapterNames(paths: readonly string[]): string[] {
  const used = new Set<string>();
  return paths.map((p, i) => {
    let base = basename(resolve(p)).replace(/[^\w-]/g, '_') || `adapter_${i}`;
    if (base === '__base__') base = `adapter_${i}`;
    let name = base;
    for (let k = 2; used.has(name); k++) name = `${base}_${k}`;
    used.add(name);
    return name;
  });
}

/**
 * Loads the adapters onto the model (in place) and activates them all with their weights. Returns the LoraModel,
 * or null when no adapter was given. Warnings go to stderr.
 */
export function applyAdapterOptions(model: LlamaForCausalLM, adapters: string[], weights?: string): LoraModel | null {
  if (adapters.length === 0) {
    if (weights) throw new ConfigError('--weights needs --adapter');
    return null;
  }
  const w = parseAdapterWeights(weights, adapters.length);
  for (const a of adapters)
    if (/^hf:\/\//.test(a))
      throw new ConfigError(
        `--adapter ${a}: give a local adapter dir (download hub adapters first, e.g. with huggingface-cli)`,
      );
  const names = adapterNames(adapters);
  const onWarning = (m: string) => console.error(`warning: ${m}`);
  let pm: LoraModel | null = null;
  adapters.forEach((dir, i) => {
    pm = loadAdapter(pm ?? model, dir, { adapterName: names[i], onWarning });
  });
  pm!.setAdapter(names, w);
  return pm;
}
