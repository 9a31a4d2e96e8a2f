// lowrank serve --model M [--adapter name=path]... [--adapter-dir DIR] [--adapter-root DIR]... [--port]
//               [--api-keys FILE] [--max-loras N] ...
// An OpenAI-compatible server for one base model and many LoRA adapters (see src/serve/README.md).

import type { Command } from 'commander';
import { ConfigError } from '../core/errors.ts';
import { startServer } from '../serve/server.ts';
import { collect, int, kvDtypeOption, num } from './common.ts';

interface ServeCliOptions {
  model: string;
  servedModelName?: string;
  adapter: string[];
  adapterDir?: string;
  adapterRoot: string[];
  host: string;
  port: string;
  apiKeys?: string;
  chatTemplate?: string;
  maxLoras?: string;
  maxCpuLoras?: string;
  maxCpuLoraMb?: string;
  maxNumSeqs?: string;
  kvCacheMb?: string;
  kvCacheDtype?: string;
  maxModelLen?: string;
  prefillChunk?: string;
  maxQueue?: string;
  requestTimeout?: string;
  maxBodyKb?: string;
  maxTokensLimit?: string;
  dtype?: string;
}

function parseAdapters(list: string[]): Record<string, string> {
  const out: Record<string, string> = {};
  for (const item of list) {
    const i = item.indexOf('=');
    if (i <= 0 || i === item.length - 1) throw new ConfigError(`--adapter '${item}': expected name=path`);
    const name = item.slice(0, i);
    if (name in out) throw new ConfigError(`--adapter: the name '${name}' is given twice`);
    out[name] = item.slice(i + 1);
  }
  return out;
}

export function registerServe(program: Command): void {
  program
    .command('serve')
    .description('serve a base model and LoRA adapters over an OpenAI-compatible HTTP API')
    .requiredOption('--model <model>', 'model dir, .gguf file or hf://owner/repo')
    .option('--served-model-name <name>', "the base model's name in the API (default: the model's file or dir name)")
    .option('--adapter <name=path>', 'a PEFT adapter dir served under a name (repeatable)', collect, [])
    .option('--adapter-dir <dir>', 'serve every adapter dir inside this directory (watched for changes)')
    .option(
      '--adapter-root <dir>',
      'allow POST /v1/load_lora_adapter to read adapters under this dir (repeatable)',
      collect,
      [],
    )
    .option('--host <addr>', 'address to listen on', '127.0.0.1')
    .option('--port <n>', 'port (0 = any free port)', '8000')
    .option('--api-keys <file>', 'API keys, one per line: KEY [model,model,...] (also LOWRANK_API_KEYS)')
    .option('--chat-template <file>', 'a Jinja chat template (for models without one, or to override it)')
    .option('--max-loras <n>', 'adapters usable in one batch (resident slots)', '8')
    .option('--max-cpu-loras <n>', 'adapters kept in host memory (LRU)', '32')
    .option('--max-cpu-lora-mb <n>', 'host memory for adapters, MiB', '1024')
    .option('--max-num-seqs <n>', 'sequences in the running batch at most', '64')
    .option('--kv-cache-mb <n>', 'KV cache budget, MiB (requests wait when it is full)', '512')
    .option('--kv-cache-dtype <d>', 'KV cache dtype: auto (bf16 for a bf16 model, else f32), f32, bf16', 'auto')
    .option('--max-model-len <n>', "longest prompt + max_tokens (default: the model's context length)")
    .option('--prefill-chunk <n>', 'prompt tokens computed per engine step (chunked prefill)', '256')
    .option('--max-queue <n>', 'requests waiting for the batch before new ones get 429', '256')
    .option('--request-timeout <s>', 'seconds a request may take in all (0 = no limit)', '600')
    .option('--max-body-kb <n>', 'largest request body, KiB', '1024')
    .option('--max-tokens-limit <n>', 'largest max_tokens a request may ask for', '4096')
    .option('--dtype <d>', 'weight dtype in memory: auto, f32, bf16, f16', 'auto')
    .action(async (o: ServeCliOptions) => {
      const dtype = o.dtype;
      if (dtype !== 'auto' && dtype !== 'f32' && dtype !== 'bf16' && dtype !== 'f16')
        throw new ConfigError(`--dtype must be auto, f32, bf16 or f16, got '${o.dtype}'`);
      const positive = (name: string, v: number) => {
        if (!(v > 0)) throw new ConfigError(`--${name} must be > 0, got ${v}`);
        return v;
      };
      const srv = await startServer({
        model: o.model,
        servedModelName: o.servedModelName,
        dtype,
        host: o.host,
        port: int('port', o.port, 8000),
        adapters: parseAdapters(o.adapter),
        adapterDir: o.adapterDir ?? null,
        adapterRoots: o.adapterRoot,
        apiKeysFile: o.apiKeys ?? null,
        chatTemplateFile: o.chatTemplate ?? null,
        maxLoras: positive('max-loras', int('max-loras', o.maxLoras, 8)),
        maxCpuLoras: positive('max-cpu-loras', int('max-cpu-loras', o.maxCpuLoras, 32)),
        maxCpuLoraBytes: positive('max-cpu-lora-mb', num('max-cpu-lora-mb', o.maxCpuLoraMb, 1024)) * 2 ** 20,
        maxNumSeqs: positive('max-num-seqs', int('max-num-seqs', o.maxNumSeqs, 64)),
        kvCacheBytes: positive('kv-cache-mb', num('kv-cache-mb', o.kvCacheMb, 512)) * 2 ** 20,
        kvCacheDtype: kvDtypeOption(o.kvCacheDtype),
        maxModelLen:
          o.maxModelLen === undefined ? 0 : positive('max-model-len', int('max-model-len', o.maxModelLen, 0)),
        prefillChunk: positive('prefill-chunk', int('prefill-chunk', o.prefillChunk, 256)),
        maxQueue: positive('max-queue', int('max-queue', o.maxQueue, 256)),
        requestTimeoutMs: num('request-timeout', o.requestTimeout, 600) * 1000,
        maxBodyBytes: positive('max-body-kb', num('max-body-kb', o.maxBodyKb, 1024)) * 1024,
        limits: { maxTokens: positive('max-tokens-limit', int('max-tokens-limit', o.maxTokensLimit, 4096)) },
      });
      const info = srv.engine.info;
      console.error(
        `lowrank serve: ${srv.baseName} (${info.config.architecture}, context ${info.maxModelLen}, KV cache ` +
          `${info.kvBudgetTokens} tokens) with ${srv.registry.list().length} adapter(s) on ${srv.url}/v1`,
      );
      let stopping = false;
      const stop = (sig: string) => {
        if (stopping) {
          console.error(`lowrank serve: ${sig} again, stopping now`);
          process.exit(1);
        }
        stopping = true;
        console.error(`lowrank serve: ${sig}: finishing in-flight requests (at most 30 s; again to stop now)`);
        void srv.close(30_000).then(() => process.exit(0));
      };
      process.on('SIGINT', () => stop('SIGINT'));
      process.on('SIGTERM', () => stop('SIGTERM'));
    });
}
