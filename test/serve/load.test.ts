// Under load on loopback: many concurrent clients across many adapters (more than the resident slots and the
// host cache hold), bounded in count and time. No errors but intended 429s, every stream complete, outputs
// equal to the same requests served alone, memory back to its baseline. Then the lifecycle: cancellation on
// disconnect, request timeouts, backpressure, graceful drain.

import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import type { RunningServer } from '../../src/serve/server.ts';
import { client, skipNoStories, testServer, waitFor, writeAdapter } from './helpers.ts';

const tmp = mkdtempSync(join(tmpdir(), 'lowrank-load-'));
after(() => rmSync(tmp, { recursive: true, force: true }));

const PROMPTS = ['Once upon a time', 'Tom had a red ball', 'Lily and her mom', 'The dog ran'];
const ADAPTERS = 12;

async function statsOf(srv: RunningServer) {
  return srv.engine.stats();
}

test('32 concurrent clients x 3 requests over 12 adapters of mixed ranks', {
  skip: skipNoStories,
  timeout: 60_000,
}, async () => {
  const adapters: Record<string, string> = {};
  for (let i = 0; i < ADAPTERS; i++)
    adapters[`ad${i}`] = writeAdapter(join(tmp, `ad${i}`), { seed: 100 + i, r: [2, 4, 8, 16][i % 4], std: 0.12 });
  // 4 resident slots and 6 host entries for 12 adapters: the run evicts and reloads in both tiers
  const srv = await testServer({
    adapters,
    maxLoras: 4,
    maxCpuLoras: 6,
    maxNumSeqs: 16,
    maxQueue: 40,
    prefillChunk: 32,
  });
  try {
    const c = client(srv);
    const models = ['stories260K', ...Object.keys(adapters)];
    const job = (k: number) => ({
      model: models[k % models.length]!,
      prompt: PROMPTS[k % PROMPTS.length]!,
      stream: k % 2 === 0,
    });
    // the reference: each distinct (model, prompt) served alone, one at a time
    const expected = new Map<string, string>();
    for (let k = 0; k < models.length * 2; k++) {
      const j = job(k);
      const r = await c.completions.create({ model: j.model, prompt: j.prompt, max_tokens: 8, temperature: 0 });
      expected.set(`${j.model}|${j.prompt}`, r.choices[0]!.text);
    }
    await waitFor(async () => (await statsOf(srv)).engine.running === 0, 2000, 'idle');
    const baseline = (await statsOf(srv)).memoryBytes;
    const rss0 = process.memoryUsage().rss;

    let ok = 0;
    let rejected = 0;
    const failures: string[] = [];
    const t0 = performance.now();
    await Promise.all(
      Array.from({ length: 32 }, async (_, client_) => {
        for (let n = 0; n < 3; n++) {
          const k = client_ * 3 + n;
          const j = job(k);
          try {
            let text = '';
            if (j.stream) {
              const s = await c.completions.create({
                model: j.model,
                prompt: j.prompt,
                max_tokens: 8,
                temperature: 0,
                stream: true,
              });
              let finish: string | null = null;
              for await (const ch of s) {
                text += ch.choices[0]?.text ?? '';
                finish = ch.choices[0]?.finish_reason ?? finish;
              }
              assert.ok(finish, 'the stream ended with a finish reason');
            } else {
              const r = await c.completions.create({ model: j.model, prompt: j.prompt, max_tokens: 8, temperature: 0 });
              text = r.choices[0]!.text;
            }
            const want = expected.get(`${j.model}|${j.prompt}`);
            if (want !== undefined && text !== want)
              failures.push(`${j.model} '${j.prompt}': ${JSON.stringify(text)} != ${JSON.stringify(want)}`);
            ok++;
          } catch (e) {
            const status = (e as { status?: number }).status;
            if (status === 429) rejected++;
            else failures.push(`${j.model}: ${(e as Error).message}`);
          }
        }
      }),
    );
    const secs = (performance.now() - t0) / 1000;
    assert.deepEqual(failures, []);
    assert.equal(ok + rejected, 96);
    assert.ok(ok >= 40, `most requests are served (${ok} ok, ${rejected} x 429)`);
    const after_ = await statsOf(srv);
    assert.equal(after_.engine.running, 0);
    assert.equal(after_.engine.waiting, 0);
    assert.equal(after_.engine.kvUsedTokens, 0);
    assert.ok(after_.adapters.resident <= 4 && after_.adapters.host <= 6, JSON.stringify(after_.adapters));
    assert.ok(after_.adapters.evictionsResident > 0 && after_.adapters.evictionsHost > 0, 'both tiers evicted');
    // engine memory: the same as before the burst, give or take the resident and host adapters
    assert.ok(
      after_.memoryBytes - baseline < 4 * 2 ** 20,
      `engine memory grew by ${after_.memoryBytes - baseline} bytes`,
    );
    assert.ok(process.memoryUsage().rss - rss0 < 256 * 2 ** 20, 'the HTTP side stays bounded');
    assert.equal(srv.engine.inflight, 0);
    console.log(`# load: ${ok} served, ${rejected} x 429, ${((ok * 8) / secs) | 0} tokens/s on loopback`);
  } finally {
    await srv.close(1000);
  }
});

test('a client that disconnects cancels its generation; timeouts and a full queue are answered', {
  skip: skipNoStories,
}, async () => {
  const srv = await testServer({ maxNumSeqs: 1, maxQueue: 1, requestTimeoutMs: 1000 });
  try {
    const c = client(srv);
    // disconnect mid-stream
    const ctl = new AbortController();
    const s = await c.completions.create(
      { model: 'stories260K', prompt: 'Once upon a time', max_tokens: 1500, stream: true, ignore_eos: true } as never,
      { signal: ctl.signal },
    );
    let got = 0;
    try {
      for await (const _ of s as unknown as AsyncIterable<unknown>) if (++got === 3) ctl.abort();
    } catch {
      // the SDK may end the iteration with an abort error
    }
    assert.ok(got >= 3);
    await waitFor(() => srv.engine.inflight === 0, 5000, 'the cancelled request to leave');
    assert.equal((await srv.engine.stats()).engine.kvUsedTokens, 0);

    // a request that cannot finish in time: 504, and it does not linger in the engine
    await assert.rejects(
      c.completions.create({ model: 'stories260K', prompt: 'Once', max_tokens: 1900, ignore_eos: true } as never),
      (e: { status: number; headers: Headers }) => {
        assert.equal(e.status, 504);
        assert.equal(e.headers.get('x-should-retry'), 'false');
        return true;
      },
    );
    await waitFor(() => srv.engine.inflight === 0, 5000, 'the timed-out request to leave');

    // one running, one waiting: the next gets 429 with Retry-After
    const slow = () => c.completions.create({ model: 'stories260K', prompt: 'Once', max_tokens: 6 });
    const results = await Promise.allSettled([slow(), slow(), slow(), slow()]);
    const statuses = results.map((r) => (r.status === 'fulfilled' ? 200 : (r.reason as { status: number }).status));
    assert.ok(statuses.includes(429), statuses.join());
    assert.ok(statuses.includes(200), statuses.join());
    const r429 = results.find((r) => r.status === 'rejected' && (r.reason as { status: number }).status === 429)!;
    assert.equal(((r429 as PromiseRejectedResult).reason as { headers: Headers }).headers.get('retry-after'), '1');
    const metrics = await (await fetch(`${srv.url}/metrics`)).text();
    assert.match(metrics, /lowrank_requests_cancelled_total\{reason="disconnect"\} 1/);
    assert.match(metrics, /lowrank_requests_rejected_total\{reason="queue_full"\} \d/);
  } finally {
    await srv.close(1000);
  }
});

test('graceful shutdown drains in-flight streams and refuses new work', { skip: skipNoStories }, async () => {
  const srv = await testServer();
  const c = client(srv);
  const s = await c.completions.create({
    model: 'stories260K',
    prompt: 'Once upon a time',
    max_tokens: 60,
    stream: true,
    ignore_eos: true,
  } as never);
  const reading = (async () => {
    let n = 0;
    let finish = null;
    for await (const ch of s as unknown as AsyncIterable<{
      choices: { text: string; finish_reason: string | null }[];
    }>) {
      n += ch.choices[0]?.text ? 1 : 0;
      finish = ch.choices[0]?.finish_reason ?? finish;
    }
    return { n, finish };
  })();
  await waitFor(() => srv.engine.inflight === 1, 2000, 'the stream to start');
  const closing = srv.close(10_000);
  const { finish } = await reading;
  assert.equal(finish, 'length', 'the in-flight stream ran to its end');
  await closing;
  await assert.rejects(fetch(`${srv.url}/health`), 'the port is closed');
});
