// startServer: one base model and many LoRA adapters behind the OpenAI-compatible API. The model runs in an
// engine worker thread; this thread parses, authenticates, tokenizes and streams.

import { readFileSync } from 'node:fs';
import { basename } from 'node:path';
import { ConfigError } from '../core/errors.ts';
import type { KvDtypeOption } from '../models/kv-cache.ts';
import { resolveModelPath } from '../models/load.ts';
import { loadTokenizer } from '../tokenize/hf.ts';
import { AdapterRegistry } from './adapters.ts';
import { ApiKeys } from './auth.ts';
import { EngineClient } from './engine-client.ts';
import { ApiServer } from './http.ts';
import { ServerMetrics } from './metrics.ts';
import { DEFAULT_LIMITS, type RequestLimits } from './openai-types.ts';
import type { WorkerInit } from './protocol.ts';

export interface ServeOptions {
  /** Model dir, .gguf file or hf://owner/repo. */
  model: string;
  /** The base model's name in the API (default: the model file or dir name). */
  servedModelName?: string;
  dtype?: 'auto' | 'f32' | 'bf16' | 'f16';
  host?: string;
  /** 0: a free port. */
  port?: number;
  /** name -> adapter dir, loaded lazily (checked at startup). */
  adapters?: Record<string, string>;
  /** A directory whose subdirectories are adapters (watched). */
  adapterDir?: string | null;
  /** Directories that runtime loading may read from; none = runtime loading off. */
  adapterRoots?: string[];
  maxLoras?: number;
  maxCpuLoras?: number;
  maxCpuLoraBytes?: number;
  /** API keys file; the LOWRANK_API_KEYS value is added (pass apiKeysEnv, default process.env). */
  apiKeysFile?: string | null;
  apiKeysEnv?: string | null;
  /** A Jinja chat template file used instead of (or where there is no) tokenizer template. */
  chatTemplateFile?: string | null;
  maxNumSeqs?: number;
  kvCacheBytes?: number;
  /** What the KV cache stores (default 'auto': bf16 for a bf16 model, else f32). */
  kvCacheDtype?: KvDtypeOption;
  maxModelLen?: number;
  prefillChunk?: number;
  maxQueue?: number;
  requestTimeoutMs?: number;
  maxBodyBytes?: number;
  limits?: Partial<RequestLimits>;
  defaultMaxTokens?: number;
  /** ms a request blocked on adapter slots may be overtaken. */
  starvationMs?: number;
  /** How often the adapter dir is rescanned besides fs.watch events (ms). */
  adapterDirPollMs?: number;
}

export interface RunningServer {
  url: string;
  host: string;
  port: number;
  baseName: string;
  api: ApiServer;
  engine: EngineClient;
  registry: AdapterRegistry;
  /** Graceful shutdown: drains in-flight requests for up to drainMs (default 30 s), then stops. */
  close(drainMs?: number): Promise<void>;
}

function servedName(path: string): string {
  return basename(path).replace(/\.gguf$/i, '') || 'model';
}

export async function startServer(o: ServeOptions): Promise<RunningServer> {
  const modelPath = await resolveModelPath(o.model);
  const baseName = o.servedModelName ?? servedName(modelPath);
  const keys = ApiKeys.load(
    o.apiKeysFile ?? undefined,
    o.apiKeysEnv === undefined ? process.env.LOWRANK_API_KEYS : (o.apiKeysEnv ?? undefined),
  );
  let chatTemplate: string | null = null;
  if (o.chatTemplateFile) {
    try {
      chatTemplate = readFileSync(o.chatTemplateFile, 'utf8');
    } catch (e) {
      throw new ConfigError(`--chat-template ${o.chatTemplateFile}: cannot read it: ${(e as Error).message}`);
    }
  }
  const tokenizer = loadTokenizer(modelPath);
  const maxLoras = o.maxLoras ?? 8;
  const init: WorkerInit = {
    modelPath,
    dtype: o.dtype ?? 'auto',
    engine: {
      maxNumSeqs: o.maxNumSeqs ?? 64,
      kvCacheBytes: o.kvCacheBytes ?? 512 * 2 ** 20,
      kvCacheDtype: o.kvCacheDtype ?? 'auto',
      maxModelLen: o.maxModelLen ?? 0,
      prefillChunk: o.prefillChunk ?? 256,
      starvationMs: o.starvationMs ?? 2000,
    },
    adapters: {
      maxLoras,
      maxCpuLoras: Math.max(o.maxCpuLoras ?? Math.max(32, maxLoras), maxLoras),
      maxCpuLoraBytes: o.maxCpuLoraBytes ?? 2 ** 30,
    },
  };
  let engineRef: EngineClient | null = null;
  const registry = new AdapterRegistry(
    baseName,
    { roots: o.adapterRoots ?? [], dir: o.adapterDir ?? null },
    { onDrop: (name, keep) => engineRef?.dropAdapter(name, keep) },
  );
  for (const [name, path] of Object.entries(o.adapters ?? {})) registry.addStatic(name, path);
  const engine = await EngineClient.start(init);
  engineRef = engine;
  try {
    // startup adapters are read now, so a broken one stops the server instead of failing its first request
    for (const e of registry.list()) await engine.loadAdapter(e.name, e.version, e.path);
  } catch (e) {
    await engine.close();
    throw new ConfigError(`--adapter: ${(e as Error).message}`);
  }
  registry.watchDir(o.adapterDirPollMs ?? 5000);
  const metrics = new ServerMetrics();
  const api = new ApiServer(engine, tokenizer, registry, keys, metrics, {
    baseName,
    maxBodyBytes: o.maxBodyBytes ?? 2 ** 20,
    maxQueue: o.maxQueue ?? 256,
    requestTimeoutMs: o.requestTimeoutMs ?? 600_000,
    limits: { ...DEFAULT_LIMITS, ...(o.limits ?? {}) },
    chatTemplate,
    maxModelLen: engine.info.maxModelLen,
    defaultMaxTokens: o.defaultMaxTokens ?? 16,
  });
  const host = o.host ?? '127.0.0.1';
  let addr: { port: number };
  try {
    addr = await api.listen(o.port ?? 8000, host);
  } catch (e) {
    registry.close();
    await engine.close();
    throw e;
  }
  const urlHost = host.includes(':') ? `[${host}]` : host;
  let closing: Promise<void> | null = null;
  return {
    url: `http://${urlHost}:${addr.port}`,
    host,
    port: addr.port,
    baseName,
    api,
    engine,
    registry,
    close(drainMs = 30_000) {
      closing ??= (async () => {
        registry.close();
        await api.shutdown(drainMs);
        await engine.close();
      })();
      return closing;
    },
  };
}
