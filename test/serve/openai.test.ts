// The server through the official `openai` client on 127.0.0.1: models, completions, chat, streaming,
// routing by model, per-request scale and mixtures, runtime load/unload, the watched adapter dir, parity with
// generate(), metrics.

import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import type OpenAI from 'openai';
import { generate } from '../../src/models/generate.ts';
import { loadModel } from '../../src/models/load.ts';
import { loadAdapter } from '../../src/peft/lora/io.ts';
import type { RunningServer } from '../../src/serve/server.ts';
import { loadTokenizer } from '../../src/tokenize/hf.ts';
import { client, continuation, STORIES, skipNoStories, testServer, waitFor, writeAdapter } from './helpers.ts';

const tmp = mkdtempSync(join(tmpdir(), 'lowrank-openai-'));
after(() => rmSync(tmp, { recursive: true, force: true }));
const PROMPT = 'Once upon a time';
const TEMPLATE = `{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}`;

describe('openai client against lowrank serve', { skip: skipNoStories }, () => {
  let srv: RunningServer;
  let c: OpenAI;
  const root = join(tmp, 'root');
  const dir = join(tmp, 'watched');

  before(async () => {
    writeAdapter(join(tmp, 'alpha'), { seed: 1, std: 0.15 });
    writeAdapter(join(tmp, 'beta'), {
      seed: 2,
      r: 8,
      std: 0.15,
      targets: ['k_proj', 'o_proj', 'gate_proj', 'up_proj'],
    });
    writeAdapter(join(root, 'gamma'), { seed: 3, r: 2, std: 0.2 });
    writeAdapter(join(root, 'gamma2'), { seed: 4, r: 16, std: 0.1 });
    mkdirSync(dir, { recursive: true });
    writeAdapter(join(dir, 'delta'), { seed: 5, std: 0.15 });
    srv = await testServer({
      adapters: { alpha: join(tmp, 'alpha'), beta: join(tmp, 'beta') },
      adapterRoots: [root],
      adapterDir: dir,
    });
    c = client(srv);
  });
  after(async () => {
    await srv?.close(1000);
  });

  const complete = async (model: string, extra: Record<string, unknown> = {}) =>
    (await c.completions.create({ model, prompt: PROMPT, max_tokens: 20, temperature: 0, ...extra } as never))
      .choices[0]!.text;

  test('GET /v1/models lists the base model and the adapters with their parent', async () => {
    const models = (await c.models.list()).data as unknown as { id: string; parent: string | null; object: string }[];
    const ids = models.map((m) => m.id).sort();
    assert.deepEqual(ids, ['alpha', 'beta', 'delta', 'stories260K']);
    for (const m of models) {
      assert.equal(m.object, 'model');
      assert.equal(m.parent, m.id === 'stories260K' ? null : 'stories260K');
    }
  });

  test('completions: text, usage, finish reason; the served greedy text equals generate() with the adapter', async () => {
    const r = await c.completions.create({ model: 'alpha', prompt: PROMPT, max_tokens: 20, temperature: 0 });
    assert.equal(r.object, 'text_completion');
    assert.equal(r.model, 'alpha');
    assert.equal(r.choices[0]!.finish_reason, 'length');
    assert.deepEqual(r.usage, { prompt_tokens: 5, completion_tokens: 20, total_tokens: 25 });
    const { model } = await loadModel(STORIES);
    const tok = loadTokenizer(STORIES);
    loadAdapter(model, join(tmp, 'alpha'), { adapterName: 'alpha' });
    const ref = generate(model, tok, tok.encode(PROMPT), { maxTokens: 20, temperature: 0 });
    assert.equal(r.choices[0]!.text, continuation(tok, tok.encode(PROMPT), ref.tokens));
    model.dispose();
  });

  test('routing: each adapter gives its own output, the base name gives the base output', async () => {
    const [base, a, b, d] = await Promise.all(['stories260K', 'alpha', 'beta', 'delta'].map((m) => complete(m)));
    const { model } = await loadModel(STORIES);
    const tok = loadTokenizer(STORIES);
    const ids = tok.encode(PROMPT);
    assert.equal(base, continuation(tok, ids, generate(model, tok, ids, { maxTokens: 20, temperature: 0 }).tokens));
    model.dispose();
    assert.equal(new Set([base, a, b, d]).size, 4, 'four different outputs');
    // the same requests again, concurrently and interleaved, give the same texts
    const again = await Promise.all(['beta', 'alpha', 'stories260K', 'alpha', 'delta'].map((m) => complete(m)));
    assert.deepEqual(again, [b, a, base, a, d]);
  });

  test('adapter_scale and weighted mixtures are computed per request', async () => {
    const a = await complete('alpha');
    const base = await complete('stories260K');
    assert.equal(await complete('alpha', { adapter_scale: 0 }), base);
    assert.equal(await complete('stories260K', { adapters: [{ name: 'alpha', weight: 1 }] }), a);
    assert.equal(
      await complete('stories260K', {
        adapters: [
          { name: 'alpha', weight: 1 },
          { name: 'beta', weight: 0 },
        ],
      }),
      a,
    );
    const mixed = await complete('stories260K', {
      adapters: [
        { name: 'alpha', weight: 0.5 },
        { name: 'beta', weight: 0.5 },
      ],
    });
    assert.notEqual(mixed, a);
    await assert.rejects(complete('alpha', { adapters: [{ name: 'beta', weight: 1 }] }), { status: 400 });
    await assert.rejects(complete('stories260K', { adapters: [{ name: 'nope', weight: 1 }] }), { status: 404 });
  });

  test('streaming: SSE chunks that add up to the text, usage chunk last, then [DONE]', async () => {
    const full = await complete('beta');
    const stream = await c.completions.create({
      model: 'beta',
      prompt: PROMPT,
      max_tokens: 20,
      temperature: 0,
      stream: true,
      stream_options: { include_usage: true },
    });
    let text = '';
    const chunks = [];
    for await (const ch of stream) chunks.push(ch);
    for (const ch of chunks) text += ch.choices[0]?.text ?? '';
    assert.equal(text, full);
    const last = chunks.at(-1)!;
    assert.deepEqual(last.choices, []);
    assert.deepEqual(last.usage, { prompt_tokens: 5, completion_tokens: 20, total_tokens: 25 });
    assert.equal(chunks.at(-2)!.choices[0]!.finish_reason, 'length');
    assert.equal(new Set(chunks.map((x) => x.id)).size, 1);
    // the raw stream ends with data: [DONE]
    const raw = await fetch(`${srv.url}/v1/completions`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ model: 'stories260K', prompt: PROMPT, max_tokens: 4, stream: true }),
    });
    assert.match(raw.headers.get('content-type') ?? '', /text\/event-stream/);
    const body = await raw.text();
    assert.ok(body.endsWith('data: [DONE]\n\n'));
    assert.ok(
      body
        .split('\n\n')
        .filter(Boolean)
        .every((l) => l.startsWith('data: ')),
    );
  });

  test('stop strings, token-id prompts and several prompts per request', async () => {
    const r = await c.completions.create({
      model: 'stories260K',
      prompt: PROMPT,
      max_tokens: 30,
      temperature: 0,
      stop: [' girl'],
    });
    assert.equal(r.choices[0]!.text, ', there was a little');
    assert.equal(r.choices[0]!.finish_reason, 'stop');
    const tok = loadTokenizer(STORIES);
    const multi = await c.completions.create({
      model: 'stories260K',
      prompt: [PROMPT, tok.encode('Tom had a red ball')] as never,
      max_tokens: 8,
      temperature: 0,
    });
    assert.equal(multi.choices.length, 2);
    assert.deepEqual(
      multi.choices.map((x) => x.index),
      [0, 1],
    );
    assert.equal(multi.choices[0]!.text, (await complete('stories260K', { max_tokens: 8 })).toString());
    assert.equal(multi.usage!.prompt_tokens, 5 + tok.encode('Tom had a red ball').length);
    const echo = await c.completions.create({
      model: 'stories260K',
      prompt: PROMPT,
      max_tokens: 3,
      temperature: 0,
      echo: true,
    });
    assert.ok(echo.choices[0]!.text.startsWith(PROMPT));
  });

  test('chat on a model without a template is a clear 400', async () => {
    await assert.rejects(
      c.chat.completions.create({ model: 'stories260K', messages: [{ role: 'user', content: 'hi' }] }),
      (e: { status: number; error: { code: string; message: string } }) => {
        assert.equal(e.status, 400);
        assert.equal(e.error.code, 'no_chat_template');
        assert.match(e.error.message, /--chat-template/);
        return true;
      },
    );
  });

  test('runtime load and unload (vLLM shapes), load_inplace, and the watched directory', async () => {
    const post = (path: string, body: unknown) =>
      fetch(`${srv.url}${path}`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify(body),
      });
    await assert.rejects(complete('gamma'), { status: 404 });
    let r = await post('/v1/load_lora_adapter', { lora_name: 'gamma', lora_path: 'gamma' });
    assert.equal(r.status, 200);
    assert.equal(await r.text(), "Success: LoRA adapter 'gamma' added successfully.");
    const g1 = await complete('gamma');
    assert.notEqual(g1, await complete('stories260K'));
    r = await post('/v1/load_lora_adapter', { lora_name: 'gamma', lora_path: join(root, 'gamma2') });
    assert.equal(r.status, 400);
    assert.equal(((await r.json()) as { error: { code: string } }).error.code, 'adapter_exists');
    r = await post('/v1/load_lora_adapter', {
      lora_name: 'gamma',
      lora_path: join(root, 'gamma2'),
      load_inplace: true,
    });
    assert.equal(r.status, 200);
    const g2 = await complete('gamma');
    assert.notEqual(g2, g1, 'the replaced adapter serves the new weights');
    r = await post('/v1/unload_lora_adapter', { lora_name: 'gamma' });
    assert.equal(r.status, 200);
    assert.equal(await r.text(), "Success: LoRA adapter 'gamma' removed successfully.");
    await assert.rejects(complete('gamma'), { status: 404 });
    r = await post('/v1/unload_lora_adapter', { lora_name: 'gamma' });
    assert.equal(r.status, 404);
    // a bad adapter is refused at load time, not on first use
    mkdirSync(join(root, 'broken'), { recursive: true });
    writeFileSync(
      join(root, 'broken', 'adapter_config.json'),
      '{"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]}',
    );
    r = await post('/v1/load_lora_adapter', { lora_name: 'broken', lora_path: 'broken' });
    assert.equal(r.status, 400);
    const msg = ((await r.json()) as { error: { message: string } }).error.message;
    assert.ok(!msg.includes(root), `the error names no server path: ${msg}`);

    // the watched dir: a new subdir appears, a removed one goes
    writeAdapter(join(tmp, 'staging-eps'), { seed: 6, std: 0.15 });
    renameSync(join(tmp, 'staging-eps'), join(dir, 'eps'));
    await waitFor(async () => (await c.models.list()).data.some((m) => m.id === 'eps'), 5000, 'eps to appear');
    assert.notEqual(await complete('eps'), await complete('stories260K'));
    rmSync(join(dir, 'delta'), { recursive: true });
    await waitFor(async () => !(await c.models.list()).data.some((m) => m.id === 'delta'), 5000, 'delta to go');
    await assert.rejects(complete('delta'), { status: 404 });
  });

  test('/metrics and /health', async () => {
    const h = await fetch(`${srv.url}/health`);
    assert.equal(h.status, 200);
    const m = await (await fetch(`${srv.url}/metrics`)).text();
    for (const name of [
      'lowrank_requests_total{route="completions",status="200"}',
      'lowrank_generation_tokens_total{model="alpha"}',
      'lowrank_time_to_first_token_seconds_bucket',
      'lowrank_adapter_loads_total',
      'lowrank_adapter_cache_hits_total{tier="resident"}',
      'lowrank_adapter_evictions_total{tier="host"}',
      'lowrank_queue_depth',
      'lowrank_kv_cache_usage_ratio',
    ])
      assert.ok(m.includes(name), `metrics have ${name}`);
  });
});

describe('chat with a --chat-template', { skip: skipNoStories }, () => {
  let srv: RunningServer;
  before(async () => {
    const file = join(tmp, 'template.jinja');
    writeFileSync(file, TEMPLATE);
    srv = await testServer({ chatTemplateFile: file });
  });
  after(async () => {
    await srv?.close(1000);
  });

  test('chat completions (plain and streamed) follow the template', async () => {
    const c = client(srv);
    const messages = [{ role: 'user' as const, content: 'Tell me a story about a cat.' }];
    const r = await c.chat.completions.create({ model: 'stories260K', messages, max_tokens: 16, temperature: 0 });
    assert.equal(r.object, 'chat.completion');
    assert.equal(r.choices[0]!.message.role, 'assistant');
    const tok = loadTokenizer(STORIES);
    const ids = tok.encodeChat(messages, { addGenerationPrompt: true, template: TEMPLATE });
    assert.equal(r.usage!.prompt_tokens, ids.length);
    const { model } = await loadModel(STORIES);
    assert.equal(
      r.choices[0]!.message.content,
      continuation(tok, ids, generate(model, tok, ids, { maxTokens: 16, temperature: 0 }).tokens),
    );
    model.dispose();
    const stream = await c.chat.completions.create({
      model: 'stories260K',
      messages,
      max_completion_tokens: 16,
      temperature: 0,
      stream: true,
      stream_options: { include_usage: true },
    });
    const chunks = [];
    for await (const ch of stream) chunks.push(ch);
    assert.equal(chunks[0]!.object, 'chat.completion.chunk');
    assert.deepEqual(chunks[0]!.choices[0]!.delta, { role: 'assistant', content: '' });
    const text = chunks.map((ch) => ch.choices[0]?.delta.content ?? '').join('');
    assert.equal(text, r.choices[0]!.message.content);
    assert.equal(chunks.at(-2)!.choices[0]!.finish_reason, 'length');
    assert.equal(chunks.at(-1)!.usage!.completion_tokens, 16);
  });
});
