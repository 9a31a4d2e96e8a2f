// Helpers for the server tests: small PEFT-format adapters written directly (adapter_config.json +
// adapter_model.safetensors), a server on 127.0.0.1 with a random port, and an OpenAI client for it.

import { existsSync, mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import OpenAI from 'openai';
import { Rng } from '../../src/core/rng.ts';
import { saveSafetensorsSync } from '../../src/formats/safetensors.ts';
import { type RunningServer, type ServeOptions, startServer } from '../../src/serve/server.ts';
import type { Tokenizer } from '../../src/tokenize/tokenizer.ts';

export const STORIES = fileURLToPath(new URL('../../../shared/models/stories260K/stories260K.gguf', import.meta.url));

/** false when stories260K is present, else the reason to skip (printed once per file). */
export const skipNoStories: false | string = existsSync(STORIES) ? false : `stories260K absent: ${STORIES}`;
if (skipNoStories) console.log(`# skipping: ${skipNoStories}`);

/** stories260K's shapes: hidden 64, 8 heads x 8, 4 kv heads, intermediate 172, 5 layers. */
const DIMS: Record<string, [number, number]> = {
  q_proj: [64, 64],
  k_proj: [32, 64],
  v_proj: [32, 64],
  o_proj: [64, 64],
  gate_proj: [172, 64],
  up_proj: [172, 64],
  down_proj: [64, 172],
};
const PARENT: Record<string, string> = {
  q_proj: 'self_attn',
  k_proj: 'self_attn',
  v_proj: 'self_attn',
  o_proj: 'self_attn',
  gate_proj: 'mlp',
  up_proj: 'mlp',
  down_proj: 'mlp',
};

export interface AdapterSpecOptions {
  r?: number;
  alpha?: number;
  targets?: string[];
  seed?: number;
  /** Standard deviation of A and B entries (large enough to change greedy outputs). */
  std?: number;
  layers?: number;
  extraConfig?: Record<string, unknown>;
}

/** Writes a random LoRA adapter for stories260K in PEFT's format. */
export function writeAdapter(dir: string, o: AdapterSpecOptions = {}): string {
  const r = o.r ?? 4;
  const targets = o.targets ?? ['q_proj', 'v_proj', 'down_proj'];
  const rng = new Rng(o.seed ?? 1);
  const std = o.std ?? 0.3;
  const tensors: Record<string, { dtype: 'F32'; shape: number[]; data: Uint8Array }> = {};
  const rand = (n: number) => {
    const v = new Float32Array(n);
    for (let i = 0; i < n; i++) v[i] = std * rng.normal();
    return new Uint8Array(v.buffer);
  };
  for (let l = 0; l < (o.layers ?? 5); l++)
    for (const t of targets) {
      const [out, inF] = DIMS[t]!;
      const base = `base_model.model.model.layers.${l}.${PARENT[t]}.${t}`;
      tensors[`${base}.lora_A.weight`] = { dtype: 'F32', shape: [r, inF], data: rand(r * inF) };
      tensors[`${base}.lora_B.weight`] = { dtype: 'F32', shape: [out, r], data: rand(out * r) };
    }
  mkdirSync(dir, { recursive: true });
  saveSafetensorsSync(join(dir, 'adapter_model.safetensors'), tensors, { format: 'pt' });
  const config = {
    peft_type: 'LORA',
    task_type: 'CAUSAL_LM',
    base_model_name_or_path: 'stories260K',
    r,
    lora_alpha: o.alpha ?? 2 * r,
    lora_dropout: 0,
    target_modules: targets,
    bias: 'none',
    use_rslora: false,
    use_dora: false,
    fan_in_fan_out: false,
    inference_mode: true,
    ...(o.extraConfig ?? {}),
  };
  writeFileSync(join(dir, 'adapter_config.json'), JSON.stringify(config, null, 2));
  return dir;
}

/** A server for tests: loopback, a free port, no keys from the environment, a short adapter-dir poll. */
export function testServer(o: Partial<ServeOptions> = {}): Promise<RunningServer> {
  return startServer({ model: STORIES, port: 0, host: '127.0.0.1', apiKeysEnv: null, adapterDirPollMs: 200, ...o });
}

export function client(srv: RunningServer, apiKey = 'none', opts: { maxRetries?: number } = {}): OpenAI {
  return new OpenAI({ baseURL: `${srv.url}/v1`, apiKey, maxRetries: opts.maxRetries ?? 0, timeout: 30_000 });
}

/** Waits until cond() is true (polling), or fails after ms. */
export async function waitFor(cond: () => boolean | Promise<boolean>, ms = 5000, what = 'condition'): Promise<void> {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    if (await cond()) return;
    await new Promise((r) => setTimeout(r, 25));
  }
  throw new Error(`timed out waiting for ${what}`);
}

/**
 * The text generated tokens add to a prompt: decode(prompt + tokens) minus decode(prompt). What a completion
 * must return so that prompt + completion reads right (generate() decodes the new tokens alone, which drops a
 * SentencePiece leading space on the first one).
 */
export function continuation(tok: Tokenizer, prompt: readonly number[], tokens: readonly number[]): string {
  const p = tok.decode(prompt, { skipSpecialTokens: true });
  const all = tok.decode([...prompt, ...tokens], { skipSpecialTokens: true });
  if (!all.startsWith(p))
    throw new Error(`decode(prompt + tokens) does not start with decode(prompt): ${JSON.stringify(all)}`);
  return all.slice(p.length);
}
