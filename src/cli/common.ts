// Helpers shared by CLI commands: loading a model with its tokenizer, parsing numbers.

import type { DType } from '../core/dtype.ts';
import { ConfigError } from '../core/errors.ts';
import { KV_DTYPES, type KvDtypeOption } from '../models/kv-cache.ts';
import { type LoadedModel, loadModel, resolveModelPath } from '../models/load.ts';
import { loadTokenizer } from '../tokenize/hf.ts';
import type { Tokenizer } from '../tokenize/tokenizer.ts';

export interface ModelAndTokenizer extends LoadedModel {
  tokenizer: Tokenizer;
}

export async function loadModelAndTokenizer(
  source: string,
  dtype: DType | 'auto' = 'auto',
): Promise<ModelAndTokenizer> {
  const path = await resolveModelPath(source);
  const loaded = await loadModel(path, { dtype, onProgress: loadProgress() });
  return { ...loaded, tokenizer: loadTokenizer(path) };
}

export function num(name: string, v: string | undefined, fallback: number): number {
  if (v === undefined) return fallback;
  const n = Number(v);
  if (!Number.isFinite(n)) throw new ConfigError(`--${name} must be a number, got '${v}'`);
  return n;
}

export function int(name: string, v: string | undefined, fallback: number): number {
  const n = num(name, v, fallback);
  if (!Number.isInteger(n)) throw new ConfigError(`--${name} must be an integer, got '${v}'`);
  return n;
}

export function collect(value: string, previous: string[] = []): string[] {
  return [...previous, value];
}

export function parseDtype(v: string | undefined): DType | 'auto' {
  if (v === undefined || v === 'auto') return 'auto';
  if (v === 'f32' || v === 'bf16' || v === 'f16') return v;
  throw new ConfigError(`--dtype must be auto, f32, bf16 or f16, got '${v}'`);
}

export function kvDtypeOption(v: string | undefined): KvDtypeOption {
  if (v === undefined) return 'auto';
  if ((KV_DTYPES as readonly string[]).includes(v)) return v as KvDtypeOption;
  throw new ConfigError(`--kv-cache-dtype must be ${KV_DTYPES.join(', ')}, got '${v}'`);
}

/** A loading progress line on a terminal (nothing when stderr is not a TTY). */
export function loadProgress(): ((done: number, total: number, name: string) => void) | undefined {
  if (!process.stderr.isTTY) return undefined;
  return (done, total, name) => {
    process.stderr.write(`\rloading ${done}/${total} ${name.slice(0, 60)}\x1b[K`);
    if (done === total) process.stderr.write('\r\x1b[K');
  };
}
