// API keys. Given as a file (--api-keys FILE) or the LOWRANK_API_KEYS environment variable, one key per line
// (or separated by ';' in the variable):
//
//   sk-admin-0123456789                 # a key with no list: every model, the adapter admin endpoints, /metrics
//   sk-tenant-a-0123456789  support-bot,support-bot-v2
//                                        # a tenant key: the base model and the listed adapters only
//
// A JSON file works too: [{"key": "...", "models": ["a", "b"]}, {"key": "..."}].
// A tenant asking for another tenant's adapter gets the same 404 as for an unknown name, and /v1/models
// lists only what the key may use. Keys are compared through their SHA-256 digests, so lookup time does not
// depend on how much of a guess matches.

import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { ConfigError } from '../core/errors.ts';

export interface ApiKey {
  /** A printable label (never the key): "key 3 of FILE". */
  label: string;
  /** The adapters this key may use; null = all (an admin key). */
  models: ReadonlySet<string> | null;
}

const digest = (k: string) => createHash('sha256').update(k).digest('hex');

export class ApiKeys {
  private readonly byDigest = new Map<string, ApiKey>();

  get size(): number {
    return this.byDigest.size;
  }

  add(key: string, models: string[] | null, label: string): void {
    if (key.length < 8) throw new ConfigError(`${label}: an API key must be at least 8 characters long`);
    if (/\s/.test(key)) throw new ConfigError(`${label}: an API key cannot contain whitespace`);
    this.byDigest.set(digest(key), { label, models: models ? new Set(models) : null });
  }

  /** The key of an Authorization header ("Bearer KEY"), or null if missing or unknown. */
  check(authorization: string | undefined): ApiKey | null {
    if (!authorization) return null;
    const m = /^Bearer\s+(\S+)\s*$/i.exec(authorization);
    if (!m) return null;
    return this.byDigest.get(digest(m[1]!)) ?? null;
  }

  /** Parses the line format (or JSON) described at the top of this file. */
  static parse(text: string, source: string, into = new ApiKeys()): ApiKeys {
    const trimmed = text.trim();
    if (trimmed.startsWith('[')) {
      let json: unknown;
      try {
        json = JSON.parse(trimmed);
      } catch (e) {
        throw new ConfigError(`${source}: invalid JSON: ${(e as Error).message}`);
      }
      (json as unknown[]).forEach((e, i) => {
        const entry = e as { key?: unknown; models?: unknown };
        const label = `key ${i + 1} of ${source}`;
        if (!entry || typeof entry.key !== 'string') throw new ConfigError(`${label}: needs a string "key"`);
        if (
          entry.models !== undefined &&
          !(Array.isArray(entry.models) && entry.models.every((x) => typeof x === 'string'))
        )
          throw new ConfigError(`${label}: "models" must be a list of names`);
        into.add(entry.key, (entry.models as string[] | undefined) ?? null, label);
      });
      return into;
    }
    let n = 0;
    for (const raw of text.split(/[\n;]/)) {
      const line = raw.replace(/#.*$/, '').trim();
      if (!line) continue;
      n++;
      const [key, list, ...rest] = line.split(/\s+/);
      const label = `key ${n} of ${source}`;
      if (rest.length > 0) throw new ConfigError(`${label}: expected 'KEY' or 'KEY model,model,...'`);
      const models = list
        ? list
            .split(',')
            .map((s) => s.trim())
            .filter(Boolean)
        : null;
      into.add(key!, models, label);
    }
    return into;
  }

  /** Keys from a file and/or the environment; null when neither gives any (auth off). */
  static load(file: string | undefined, env: string | undefined): ApiKeys | null {
    const keys = new ApiKeys();
    if (file) {
      let text: string;
      try {
        text = readFileSync(file, 'utf8');
      } catch (e) {
        throw new ConfigError(`--api-keys ${file}: cannot read it: ${(e as Error).message}`);
      }
      ApiKeys.parse(text, file, keys);
      if (keys.size === 0) throw new ConfigError(`--api-keys ${file}: the file holds no key`);
    }
    if (env?.trim()) ApiKeys.parse(env, 'LOWRANK_API_KEYS', keys);
    return keys.size > 0 ? keys : null;
  }
}

/** Whether a key may use a model (the base model is open to every valid key). */
export function mayUse(key: ApiKey | null, model: string, baseName: string): boolean {
  return !key?.models || model === baseName || key.models.has(model);
}

/** Whether a key may use the admin endpoints (adapter loading, metrics): auth off, or a key without a list. */
export function isAdmin(key: ApiKey | null, authOn: boolean): boolean {
  return !authOn || (key !== null && key.models === null);
}
