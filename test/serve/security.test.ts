// Keys, tenants, confined adapter paths, and bad requests: every refusal has OpenAI's error shape, the right
// status, and no stack trace.

import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { ApiKeys } from '../../src/serve/auth.ts';
import type { RunningServer } from '../../src/serve/server.ts';
import { client, skipNoStories, testServer, writeAdapter } from './helpers.ts';

const tmp = mkdtempSync(join(tmpdir(), 'lowrank-security-'));
const ADMIN = 'sk-admin-0123456789';
const TENANT_A = 'sk-tenant-a-0123456789';
const TENANT_B = 'sk-tenant-b-0123456789';

interface ErrorShape {
  error: { message: string; type: string; param: string | null; code: string | null };
}

function assertErrorShape(body: unknown): ErrorShape['error'] {
  const e = (body as ErrorShape).error;
  assert.ok(e && typeof e.message === 'string' && typeof e.type === 'string', JSON.stringify(body));
  assert.ok('param' in e && 'code' in e);
  assert.doesNotMatch(e.message, /\n\s+at |\.ts:\d+/, 'no stack trace');
  return e;
}

test('API key files: lines, tenant lists, JSON, and bad entries', () => {
  const k = ApiKeys.parse(`# comment\n${ADMIN}\n${TENANT_A} alpha,beta  # two adapters\n`, 'keys');
  assert.equal(k.size, 2);
  assert.equal(k.check(`Bearer ${ADMIN}`)!.models, null);
  assert.deepEqual([...k.check(`Bearer ${TENANT_A}`)!.models!], ['alpha', 'beta']);
  assert.equal(k.check(`Bearer ${ADMIN}x`), null);
  assert.equal(k.check(ADMIN), null);
  assert.equal(k.check(undefined), null);
  const j = ApiKeys.parse(JSON.stringify([{ key: TENANT_B, models: ['beta'] }]), 'keys.json');
  assert.deepEqual([...j.check(`Bearer ${TENANT_B}`)!.models!], ['beta']);
  assert.throws(() => ApiKeys.parse('short', 'keys'), /at least 8/);
  assert.throws(() => ApiKeys.parse(`${ADMIN} a b`, 'keys'), /expected/);
  assert.equal(ApiKeys.load(undefined, ''), null);
  assert.equal(ApiKeys.load(undefined, `${ADMIN};${TENANT_A} alpha`)!.size, 2);
});

describe('auth, tenants and confined runtime loading', { skip: skipNoStories }, () => {
  let srv: RunningServer;
  const root = join(tmp, 'root');
  const outside = join(tmp, 'outside');
  const post = (path: string, body: unknown, key?: string, raw?: string) =>
    fetch(`${srv.url}${path}`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', ...(key ? { authorization: `Bearer ${key}` } : {}) },
      body: raw ?? JSON.stringify(body),
    });

  before(async () => {
    writeAdapter(join(tmp, 'alpha'), { seed: 1, std: 0.15 });
    writeAdapter(join(tmp, 'beta'), { seed: 2, std: 0.15 });
    writeAdapter(join(outside, 'secret'), { seed: 3 });
    writeAdapter(join(root, 'ok'), { seed: 4 });
    mkdirSync(root, { recursive: true });
    symlinkSync(join(outside, 'secret'), join(root, 'link-to-secret'));
    // an adapter dir inside the root whose weights file is a symlink out of it
    mkdirSync(join(root, 'sneaky'));
    writeFileSync(
      join(root, 'sneaky', 'adapter_config.json'),
      '{"peft_type":"LORA","r":4,"target_modules":["q_proj"]}',
    );
    symlinkSync(
      join(outside, 'secret', 'adapter_model.safetensors'),
      join(root, 'sneaky', 'adapter_model.safetensors'),
    );
    const keys = join(tmp, 'keys.txt');
    writeFileSync(keys, `${ADMIN}\n${TENANT_A} alpha\n${TENANT_B} beta\n`);
    srv = await testServer({
      adapters: { alpha: join(tmp, 'alpha'), beta: join(tmp, 'beta') },
      adapterRoots: [root],
      apiKeysFile: keys,
      maxBodyBytes: 4096,
      limits: { maxTokens: 64 },
    });
  });
  after(async () => {
    await srv?.close(1000);
    rmSync(tmp, { recursive: true, force: true });
  });

  test('a missing or wrong key is a 401', async () => {
    await assert.rejects(client(srv).models.list(), { status: 401 });
    await assert.rejects(client(srv, 'sk-wrong-0123456789').models.list(), { status: 401 });
    const r = await post('/v1/completions', { model: 'stories260K', prompt: 'x' });
    assert.equal(r.status, 401);
    assert.equal(r.headers.get('www-authenticate'), 'Bearer');
    assertErrorShape(await r.json());
    assert.equal((await fetch(`${srv.url}/health`)).status, 200, '/health needs no key');
  });

  test("a tenant sees and uses only its adapters; another tenant's adapter is the same 404 as an unknown one", async () => {
    const a = client(srv, TENANT_A);
    const ids = (await a.models.list()).data.map((m) => m.id).sort();
    assert.deepEqual(ids, ['alpha', 'stories260K']);
    const ok = await a.completions.create({ model: 'alpha', prompt: 'Once', max_tokens: 4, temperature: 0 });
    assert.equal(ok.choices.length, 1);
    await a.completions.create({ model: 'stories260K', prompt: 'Once', max_tokens: 2 });
    const errOf = async (model: string) => {
      const r = await post('/v1/completions', { model, prompt: 'Once', max_tokens: 2 }, TENANT_A);
      assert.equal(r.status, 404);
      return assertErrorShape(await r.json());
    };
    const foreign = await errOf('beta');
    const unknown = await errOf('zzzz');
    assert.deepEqual(
      { ...foreign, message: foreign.message.replace('beta', 'X') },
      { ...unknown, message: unknown.message.replace('zzzz', 'X') },
    );
    // also inside a mixture
    const mix = await post(
      '/v1/completions',
      { model: 'stories260K', prompt: 'Once', adapters: [{ name: 'beta', weight: 1 }] },
      TENANT_A,
    );
    assert.equal(mix.status, 404);
    // tenants may not load adapters or read metrics
    assert.equal((await post('/v1/load_lora_adapter', { lora_name: 'x', lora_path: 'ok' }, TENANT_A)).status, 403);
    assert.equal((await fetch(`${srv.url}/metrics`, { headers: { authorization: `Bearer ${TENANT_B}` } })).status, 403);
    assert.equal((await fetch(`${srv.url}/metrics`, { headers: { authorization: `Bearer ${ADMIN}` } })).status, 200);
  });

  test('runtime loading reads only under --adapter-root: no traversal, no symlink escapes', async () => {
    const load = async (lora_path: string) => {
      const r = await post(
        '/v1/load_lora_adapter',
        { lora_name: `n${Math.random().toString(36).slice(2, 8)}`, lora_path },
        ADMIN,
      );
      return { status: r.status, body: r.status === 200 ? null : assertErrorShape(await r.json()) };
    };
    for (const p of [
      '../outside/secret',
      join(outside, 'secret'),
      'link-to-secret',
      'sneaky',
      '/etc',
      'ok/../../outside/secret',
    ]) {
      const r = await load(p);
      assert.equal(r.status, 400, `${p}: ${JSON.stringify(r.body)}`);
      assert.equal(r.body!.code, 'path_not_allowed', p);
      assert.ok(!r.body!.message.includes(outside), 'the message does not echo server paths');
    }
    assert.equal((await load('does-not-exist')).status, 404);
    assert.equal((await load('ok')).status, 200);
    // bad names and missing fields
    assert.equal(
      (await post('/v1/load_lora_adapter', { lora_name: 'stories260K', lora_path: 'ok' }, ADMIN)).status,
      400,
    );
    assert.equal((await post('/v1/load_lora_adapter', { lora_name: '../x', lora_path: 'ok' }, ADMIN)).status, 400);
    assert.equal((await post('/v1/load_lora_adapter', { lora_name: 'x' }, ADMIN)).status, 400);
  });

  test('oversized, malformed and out-of-range requests get 4xx in the OpenAI shape', async () => {
    const c = client(srv, ADMIN);
    const cases: [string, number, string | null][] = [];
    const check = async (what: string, r: Response, status: number, param: string | null = null) => {
      assert.equal(r.status, status, what);
      const e = assertErrorShape(await r.json());
      if (param) assert.equal(e.param, param, what);
      cases.push([what, status, param]);
    };
    await check(
      'body too large',
      await post('/v1/completions', { model: 'stories260K', prompt: 'x'.repeat(10_000) }, ADMIN),
      413,
    );
    await check('not JSON', await post('/v1/completions', null, ADMIN, '{"model": "stories260K", '), 400);
    await check('empty body', await post('/v1/completions', null, ADMIN, ''), 400);
    await check('an array', await post('/v1/completions', null, ADMIN, '[1,2]'), 400);
    const gen = (body: Record<string, unknown>) =>
      post('/v1/completions', { model: 'stories260K', prompt: 'Once', ...body }, ADMIN);
    await check('max_tokens above the limit', await gen({ max_tokens: 65 }), 400, 'max_tokens');
    await check('max_tokens 0', await gen({ max_tokens: 0 }), 400, 'max_tokens');
    await check('n = 2', await gen({ n: 2 }), 400, 'n');
    await check('temperature 5', await gen({ temperature: 5 }), 400, 'temperature');
    await check('top_p 0', await gen({ top_p: 0 }), 400, 'top_p');
    await check('stop of numbers', await gen({ stop: [1] }), 400, 'stop');
    await check('logprobs', await gen({ logprobs: 2 }), 400, 'logprobs');
    await check('no prompt', await post('/v1/completions', { model: 'stories260K' }, ADMIN), 400, 'prompt');
    await check('no model', await post('/v1/completions', { prompt: 'x' }, ADMIN), 400, 'model');
    await check('token id out of range', await gen({ prompt: [1, 99999] }), 400, 'prompt');
    await check(
      'stream_options without stream',
      await gen({ stream_options: { include_usage: true } }),
      400,
      'stream_options',
    );
    await check(
      'bad chat message',
      await post('/v1/chat/completions', { model: 'stories260K', messages: [{ content: 'x' }] }, ADMIN),
      400,
    );
    await check(
      'tools',
      await post(
        '/v1/chat/completions',
        { model: 'stories260K', messages: [{ role: 'user', content: 'x' }], tools: [{}] },
        ADMIN,
      ),
      400,
      'tools',
    );
    await check('unknown route', await post('/v1/nothing', {}, ADMIN), 404);
    const m = await fetch(`${srv.url}/v1/completions`, { headers: { authorization: `Bearer ${ADMIN}` } });
    await check('wrong method', m, 405);
    // through the client: the SDK's exception classes follow the status
    await assert.rejects(c.completions.create({ model: 'stories260K', prompt: 'Once', max_tokens: 1000 }), {
      status: 400,
    });
    assert.equal(cases.length, 19);
    // the server still works after all that
    const ok = await c.completions.create({ model: 'stories260K', prompt: 'Once', max_tokens: 4 });
    assert.equal(ok.usage!.completion_tokens, 4);
  });
});
