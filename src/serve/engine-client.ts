// The HTTP thread's handle on the engine worker: starts it, routes its events to the requests they belong
// to, and turns adapter and stats commands into promises. If the worker dies, every open request fails
// (500) and the engine is reported unhealthy.

import { Worker } from 'node:worker_threads';
import { LowrankError, RequestError } from '../core/errors.ts';
import type { AdapterInfo } from './adapter-cache.ts';
import type { EngineEvent, EngineRequest } from './engine.ts';
import type { FromWorker, ToWorker, WorkerInit, WorkerReady, WorkerStats } from './protocol.ts';

export type EventHandler = (ev: EngineEvent) => void;

export class EngineClient {
  private readonly handlers = new Map<string, EventHandler>();
  private readonly started = new Set<string>();
  private readonly pending = new Map<number, { resolve: (v: unknown) => void; reject: (e: Error) => void }>();
  private nextRid = 1;
  private dead: string | null = null;
  private closing = false;
  private exited: Promise<void>;

  private constructor(
    private readonly worker: Worker,
    readonly info: WorkerReady,
  ) {
    worker.on('message', (m: FromWorker) => this.onMessage(m));
    worker.on('error', (e) => this.die(`engine worker failed: ${e.message}`));
    this.exited = new Promise((res) => worker.once('exit', () => res()));
    worker.once('exit', (code) => this.die(`engine worker exited (code ${code})`));
  }

  /** Starts the worker and waits until the model is loaded. */
  static start(init: WorkerInit): Promise<EngineClient> {
    const worker = new Worker(new URL('./worker-entry.mjs', import.meta.url), { workerData: { init } });
    return new Promise((resolve, reject) => {
      const onMessage = (m: FromWorker) => {
        if (m.t === 'ready') {
          worker.off('message', onMessage);
          worker.off('error', onError);
          resolve(new EngineClient(worker, m.info));
        } else if (m.t === 'fatal') {
          void worker.terminate();
          reject(new LowrankError(`could not start the engine: ${m.message}`));
        }
      };
      const onError = (e: Error) => reject(new LowrankError(`could not start the engine: ${e.message}`));
      worker.on('message', onMessage);
      worker.once('error', onError);
    });
  }

  get healthy(): boolean {
    return this.dead === null;
  }

  /** Requests submitted and not finished. */
  get inflight(): number {
    return this.handlers.size;
  }

  /** Requests submitted and not yet admitted into the running batch. */
  get waiting(): number {
    return this.handlers.size - this.started.size;
  }

  submit(req: EngineRequest, onEvent: EventHandler): void {
    if (this.dead) throw new RequestError('the engine is not running', 503, 'engine_unavailable');
    this.handlers.set(req.id, onEvent);
    this.send({ t: 'submit', req });
  }

  cancel(id: string): void {
    if (!this.handlers.delete(id)) return;
    this.started.delete(id);
    if (!this.dead) this.send({ t: 'cancel', id });
  }

  loadAdapter(name: string, version: number, path: string): Promise<AdapterInfo> {
    return this.call((rid) => ({ t: 'adapter-load', rid, name, version, path })) as Promise<AdapterInfo>;
  }

  dropAdapter(name: string, keep?: number): void {
    if (!this.dead) this.send({ t: 'adapter-drop', name, keep });
  }

  stats(): Promise<WorkerStats> {
    return this.call((rid) => ({ t: 'stats', rid })) as Promise<WorkerStats>;
  }

  /** Stops the worker (after the caller has drained the requests it wants finished). */
  async close(): Promise<void> {
    this.closing = true;
    if (!this.dead) {
      this.send({ t: 'exit' });
      const timer = setTimeout(() => void this.worker.terminate(), 5000);
      await this.exited;
      clearTimeout(timer);
    }
  }

  private call(make: (rid: number) => ToWorker): Promise<unknown> {
    if (this.dead) return Promise.reject(new RequestError('the engine is not running', 503, 'engine_unavailable'));
    const rid = this.nextRid++;
    return new Promise((resolve, reject) => {
      this.pending.set(rid, { resolve, reject });
      this.send(make(rid));
    });
  }

  private send(m: ToWorker): void {
    this.worker.postMessage(m);
  }

  private onMessage(m: FromWorker): void {
    if (m.t === 'events') {
      for (const ev of m.events) {
        const h = this.handlers.get(ev.id);
        if (!h) continue; // cancelled
        if (ev.type === 'started') this.started.add(ev.id);
        if (ev.type === 'done' || ev.type === 'error') {
          this.handlers.delete(ev.id);
          this.started.delete(ev.id);
        }
        h(ev);
      }
    } else if (m.t === 'reply') {
      const p = this.pending.get(m.rid);
      if (!p) return;
      this.pending.delete(m.rid);
      if (m.ok) p.resolve(m.value);
      else p.reject(new RequestError(m.message, m.status));
    }
  }

  private die(reason: string): void {
    if (this.dead) return;
    this.dead = reason;
    if (!this.closing) console.error(`lowrank serve: ${reason}`);
    for (const [id, h] of this.handlers)
      h({ type: 'error', id, status: 500, code: 'engine_unavailable', message: 'the engine stopped' });
    this.handlers.clear();
    this.started.clear();
    for (const p of this.pending.values()) p.reject(new RequestError('the engine stopped', 503, 'engine_unavailable'));
    this.pending.clear();
  }
}
