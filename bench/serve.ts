// npm run bench:serve — the OpenAI-compatible server under concurrent streaming load on loopback, with the base
// model alone and with 1, 8 and 64 distinct LoRA adapters (round-robin over the requests), in one run:
// aggregate generated tokens/s and p50/p99 time to first token as the client sees them.
//
// Model: stories260K (../shared/models/stories260K, a real TinyStories Llama with its tokenizer). Adapters:
// random rank-8 LoRA on all seven projections, written in PEFT's format. The server holds every adapter
// resident (--max-loras 64), so the rows show the cost of mixed-adapter batches, not of reloading.
// References measured in the same run: the base-alone row (the ratio column), and the model alone batched in
// process (generateBatch, no server, no adapters) at the same batch size: the server's overhead.
//
// Environment: CONC (concurrent clients, default 32), REQS (requests per client, 2), TOKENS (max_tokens, 24),
// ROUNDS (default 2: every workload runs once per round, interleaved; the best round is kept, as the machines
// are shared and noisy).

import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import OpenAI from 'openai';
import { getBackend } from '../src/backend/index.ts';
import { generateBatch } from '../src/models/generate.ts';
import { loadModel } from '../src/models/load.ts';
import { startServer } from '../src/serve/server.ts';
import { loadTokenizer } from '../src/tokenize/hf.ts';
import { writeAdapter } from '../test/serve/helpers.ts';
import { fmt, machineLine, printTable, quantile, ratio } from './common.ts';

const STORIES = fileURLToPath(new URL('../../shared/models/stories260K/stories260K.gguf', import.meta.url));
const CONC = Number(process.env.CONC ?? 32);
const REQS = Number(process.env.REQS ?? 2);
const ROUNDS = Number(process.env.ROUNDS ?? 2);
const TOKENS = Number(process.env.TOKENS ?? 24);
const PROMPTS = [
  'Once upon a time',
  'Tom had a red ball and',
  'Lily went to the park with her mom. She saw',
  'The little dog was sad because',
];
const ALL = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'];

if (!existsSync(STORIES)) {
  console.log(`bench:serve needs ${STORIES}`);
  process.exit(0);
}

console.log(`${machineLine(null)}; backend ${getBackend().name}`);
console.log(
  `stories260K, ${CONC} concurrent streaming clients x ${REQS} requests, max_tokens ${TOKENS}, greedy, ignore_eos`,
);

// the reference: the model alone, batched in process
const tok = loadTokenizer(STORIES);
const { model } = await loadModel(STORIES);
const prompts = Array.from({ length: CONC }, (_, i) => tok.encode(PROMPTS[i % PROMPTS.length]!));
generateBatch(model, prompts.slice(0, 2), { maxTokens: 2, temperature: 0 });
let refTps = 0;
for (let r = 0; r < ROUNDS; r++) {
  const t = performance.now();
  generateBatch(model, prompts, { maxTokens: TOKENS, temperature: 0 });
  refTps = Math.max(refTps, (CONC * TOKENS) / ((performance.now() - t) / 1000));
}
model.dispose();

const tmp = mkdtempSync(join(tmpdir(), 'lowrank-bench-serve-'));
const adapters: Record<string, string> = {};
for (let i = 0; i < 64; i++)
  adapters[`ad${i}`] = writeAdapter(join(tmp, `ad${i}`), { seed: i + 1, r: 8, std: 0.05, targets: ALL });
const srv = await startServer({
  model: STORIES,
  port: 0,
  host: '127.0.0.1',
  apiKeysEnv: null,
  adapters,
  maxLoras: 64,
  maxCpuLoras: 64,
  maxNumSeqs: Math.max(CONC, 1),
  maxQueue: CONC * 4,
});
const client = new OpenAI({ baseURL: `${srv.url}/v1`, apiKey: 'none', maxRetries: 0 });

async function run(models: string[]): Promise<{ tps: number; ttft: number[]; errors: number }> {
  const ttft: number[] = [];
  let tokens = 0;
  let errors = 0;
  const start = performance.now();
  await Promise.all(
    Array.from({ length: CONC }, async (_, c) => {
      for (let r = 0; r < REQS; r++) {
        const k = c * REQS + r;
        const t = performance.now();
        try {
          const s = await client.completions.create({
            model: models[k % models.length]!,
            prompt: PROMPTS[k % PROMPTS.length]!,
            max_tokens: TOKENS,
            temperature: 0,
            stream: true,
            stream_options: { include_usage: true },
            ignore_eos: true,
          } as never);
          let first = true;
          for await (const ch of s as unknown as AsyncIterable<OpenAI.Completion>) {
            if (first && ch.choices[0]?.text) {
              ttft.push(performance.now() - t);
              first = false;
            }
            if (ch.usage) tokens += ch.usage.completion_tokens;
          }
        } catch {
          errors++;
        }
      }
    }),
  );
  return { tps: tokens / ((performance.now() - start) / 1000), ttft, errors };
}

// warm every adapter (host and resident tiers filled, code paths compiled)
const t0 = performance.now();
await Promise.all(
  ['stories260K', ...Object.keys(adapters)].map((m) =>
    client.completions.create({ model: m, prompt: 'Once', max_tokens: 1, temperature: 0 }),
  ),
);
const warmS = (performance.now() - t0) / 1000;

const workloads = [0, 1, 8, 64];
const best = new Map<number, { tps: number; ttft: number[]; errors: number }>();
for (let round = 0; round < ROUNDS; round++)
  for (const n of workloads) {
    const r = await run(n === 0 ? ['stories260K'] : Object.keys(adapters).slice(0, n));
    const prev = best.get(n);
    if (!prev || r.tps > prev.tps) best.set(n, { ...r, errors: r.errors + (prev?.errors ?? 0) });
    else prev.errors += r.errors;
  }
const baseTps = best.get(0)!.tps;
const rows: string[][] = workloads.map((n) => {
  const r = best.get(n)!;
  return [
    n === 0 ? 'base model alone' : `${n} distinct adapter${n > 1 ? 's' : ''}`,
    String(CONC * REQS),
    fmt(r.tps, 0),
    ratio(r.tps, baseTps),
    ratio(r.tps, refTps),
    fmt(quantile(r.ttft, 0.5), 0),
    fmt(quantile(r.ttft, 0.99), 0),
    String(r.errors),
  ];
});
rows.push(['reference: generateBatch in process', String(CONC), fmt(refTps, 0), '-', '100%', '-', '-', '-']);
printTable(
  `bench:serve (stories260K; ${CONC} clients; best of ${ROUNDS} rounds; warming 64 adapters took ${fmt(warmS, 1)} s)`,
  ['workload', 'requests/round', 'tokens/s', 'vs base', 'vs model alone', 'TTFT p50 ms', 'TTFT p99 ms', 'errors'],
  rows,
);
await srv.close(5000);
rmSync(tmp, { recursive: true, force: true });
