// Messages between the HTTP thread and the engine worker (structured-cloned through worker_threads ports).

import type { ModelConfig } from '../models/config.ts';
import type { AdapterCacheOptions, AdapterCacheStats, AdapterInfo } from './adapter-cache.ts';
import type { EngineEvent, EngineOptions, EngineRequest, EngineStats } from './engine.ts';

/** What the worker is started with (workerData). */
export interface WorkerInit {
  modelPath: string;
  dtype: 'auto' | 'f32' | 'bf16' | 'f16';
  engine: Omit<EngineOptions, 'kvBudgetTokens' | 'maxModelLen'> & {
    /** KV cache budget in bytes (turned into tokens once the model's shape is known). */
    kvCacheBytes: number;
    /** Longest sequence; 0 = the model's max_position_embeddings. */
    maxModelLen: number;
  };
  adapters: AdapterCacheOptions;
}

export type ToWorker =
  | { t: 'submit'; req: EngineRequest }
  | { t: 'cancel'; id: string }
  /** Reads and checks an adapter (into the host cache); replies with its info or an error. */
  | { t: 'adapter-load'; rid: number; name: string; version: number; path: string }
  /** Forgets the cached versions of an adapter but `keep` (each as soon as no running request uses it). */
  | { t: 'adapter-drop'; name: string; keep?: number }
  | { t: 'stats'; rid: number }
  | { t: 'exit' };

export interface WorkerStats {
  engine: EngineStats;
  adapters: AdapterCacheStats;
  memoryBytes: number;
}

export interface WorkerReady {
  config: ModelConfig;
  kvBudgetTokens: number;
  maxModelLen: number;
}

export type FromWorker =
  | { t: 'ready'; info: WorkerReady }
  | { t: 'fatal'; message: string }
  | { t: 'events'; events: EngineEvent[] }
  | { t: 'reply'; rid: number; ok: true; value: AdapterInfo | WorkerStats | null }
  | { t: 'reply'; rid: number; ok: false; status: number; message: string };
