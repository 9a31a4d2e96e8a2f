// The engine thread: loads the model and runs the Engine, so the HTTP thread keeps answering while a
// batch computes. Between two engine steps it takes in new requests, cancellations and adapter commands
// (each step is one decode forward plus at most one chunk budget of prefill, so that wait is bounded).
// Started through worker-entry.mjs, which registers the TypeScript loader first.

import { parentPort, workerData } from 'node:worker_threads';
import { LowrankError, RequestError } from '../core/errors.ts';
import { memoryStats } from '../core/storage.ts';
import { kvBytesPerToken, resolveKvDtype } from '../models/kv-cache.ts';
import { loadModel } from '../models/load.ts';
import { loadTokenizer } from '../tokenize/hf.ts';
import { AdapterCache } from './adapter-cache.ts';
import { Engine } from './engine.ts';
import type { FromWorker, ToWorker, WorkerInit, WorkerStats } from './protocol.ts';

const port = parentPort!;
const init = (workerData as { init: WorkerInit }).init;

function post(m: FromWorker): void {
  port.postMessage(m);
}

async function start(): Promise<void> {
  const { model, config } = await loadModel(init.modelPath, { dtype: init.dtype });
  model.eval();
  model.useDecodeLayout();
  const tokenizer = loadTokenizer(init.modelPath);
  const maxModelLen = init.engine.maxModelLen > 0 ? init.engine.maxModelLen : config.max_position_embeddings;
  const perToken = kvBytesPerToken(config, resolveKvDtype(model, init.engine.kvCacheDtype));
  const kvBudgetTokens = Math.floor(init.engine.kvCacheBytes / perToken);
  if (kvBudgetTokens < 1) throw new LowrankError(`the KV cache budget holds no token (${perToken} bytes per token)`);
  const adapters = new AdapterCache(model, init.adapters);
  const engine = new Engine(model, tokenizer, adapters, { ...init.engine, kvBudgetTokens, maxModelLen });

  let scheduled = false;
  let exiting = false;
  const loop = () => {
    scheduled = false;
    if (exiting) return;
    const events = engine.step();
    if (events.length > 0) post({ t: 'events', events });
    if (engine.hasWork()) kick();
  };
  // setImmediate, not a tight loop: port messages (cancel, submit) are handled between steps
  const kick = () => {
    if (!scheduled) {
      scheduled = true;
      setImmediate(loop);
    }
  };

  const reply = (rid: number, f: () => unknown) => {
    try {
      post({ t: 'reply', rid, ok: true, value: (f() ?? null) as never });
    } catch (e) {
      const status = e instanceof RequestError ? e.status : e instanceof LowrankError ? 400 : 500;
      const message = e instanceof LowrankError ? `${e.name}: ${e.message}` : 'internal error';
      if (!(e instanceof LowrankError)) console.error('engine worker:', e);
      post({ t: 'reply', rid, ok: false, status, message });
    }
  };

  port.on('message', (m: ToWorker) => {
    switch (m.t) {
      case 'submit':
        engine.submit(m.req);
        kick();
        break;
      case 'cancel':
        engine.cancel(m.id);
        break;
      case 'adapter-load':
        reply(m.rid, () => adapters.preload({ name: m.name, version: m.version, path: m.path }));
        break;
      case 'adapter-drop':
        adapters.drop(m.name, m.keep);
        break;
      case 'stats':
        reply(
          m.rid,
          (): WorkerStats => ({
            engine: engine.stats(),
            adapters: adapters.stats(),
            memoryBytes: memoryStats().liveBytes,
          }),
        );
        break;
      case 'exit':
        exiting = true;
        engine.dispose();
        adapters.dispose();
        model.dispose();
        port.close();
        break;
    }
  });
  post({ t: 'ready', info: { config, kvBudgetTokens, maxModelLen } });
}

start().catch((e: unknown) => {
  post({
    t: 'fatal',
    message: e instanceof LowrankError ? `${e.name}: ${e.message}` : String((e as Error)?.stack ?? e),
  });
});
