// The OpenAI-compatible HTTP API on node:http (no framework):
//
//   GET  /v1/models                  the base model and the adapters this key may use
//   POST /v1/completions             text completion (stream: SSE)
//   POST /v1/chat/completions        chat completion with the model's (or --chat-template's) template
//   POST /v1/load_lora_adapter       {lora_name, lora_path, load_inplace?}   (vLLM's shape; admin keys only)
//   POST /v1/unload_lora_adapter     {lora_name}
//   GET  /health                     200 when serving, 503 while draining or if the engine died
//   GET  /metrics                    Prometheus text format (admin keys only when auth is on)
//
// Every error is OpenAI's {"error": {message, type, param, code}} with a meaningful status; internal errors
// are logged and answered with a generic 500 (no stack traces). Requests are bounded: body size, prompts,
// max_tokens, a queue limit (429 + Retry-After beyond it) and a total time limit; a client that disconnects
// cancels its generation.

import { randomBytes } from 'node:crypto';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { ConfigError } from '../core/errors.ts';
import type { Tokenizer } from '../tokenize/tokenizer.ts';
import type { AdapterRegistry } from './adapters.ts';
import { type ApiKey, type ApiKeys, isAdmin, mayUse } from './auth.ts';
import type { AdapterSpec, EngineEvent, EngineRequest, FinishReason } from './engine.ts';
import type { EngineClient } from './engine-client.ts';
import { ApiError, errorBody, modelNotFound, toApiError } from './errors.ts';
import type { ServerMetrics } from './metrics.ts';
import {
  asBody,
  type GenerationParams,
  type ModelCard,
  parseChatRequest,
  parseCompletionRequest,
  type RequestLimits,
  usage,
} from './openai-types.ts';
import type { WorkerStats } from './protocol.ts';

export interface HttpOptions {
  /** The base model's name in the API (`model`). */
  baseName: string;
  /** Largest request body in bytes. */
  maxBodyBytes: number;
  /** Requests waiting for admission beyond which new ones get 429. */
  maxQueue: number;
  /** Total time a request may take (queue + generation), ms; 0 = no limit. */
  requestTimeoutMs: number;
  limits: RequestLimits;
  /** A chat template overriding (or standing in for) the tokenizer's. */
  chatTemplate: string | null;
  /** Longest sequence the engine takes (prompt + max_tokens). */
  maxModelLen: number;
  /** max_tokens of a completions request that gives none (OpenAI: 16). */
  defaultMaxTokens: number;
}

interface Job {
  id: string;
  index: number;
  promptTokens: number;
  text: string;
  completionTokens: number;
  finish: FinishReason | null;
  /** Echoed prompt text (completions with echo). */
  prefix: string;
}

type Kind = 'completion' | 'chat';

const ROUTES: Record<string, Record<string, string>> = {
  '/v1/models': { GET: 'models' },
  '/v1/completions': { POST: 'completions' },
  '/v1/chat/completions': { POST: 'chat' },
  '/v1/load_lora_adapter': { POST: 'load' },
  '/v1/unload_lora_adapter': { POST: 'unload' },
  '/health': { GET: 'health' },
  '/metrics': { GET: 'metrics' },
};

const BODY_TIMEOUT_MS = 30_000;

const newId = (prefix: string) => `${prefix}-${randomBytes(12).toString('hex')}`;

export class ApiServer {
  readonly server: Server;
  private draining = false;
  private lastStats: WorkerStats | null = null;

  constructor(
    private readonly engine: EngineClient,
    private readonly tokenizer: Tokenizer,
    private readonly registry: AdapterRegistry,
    private readonly keys: ApiKeys | null,
    private readonly metrics: ServerMetrics,
    private readonly opts: HttpOptions,
  ) {
    this.server = createServer((req, res) => {
      void this.handle(req, res);
    });
    // generation can outlast node's default request timeout; our own timer bounds it
    this.server.requestTimeout = 0;
    this.server.headersTimeout = 30_000;
    this.server.keepAliveTimeout = 5_000;
  }

  /** Listens on host:port (port 0: a free port). */
  listen(port: number, host: string): Promise<AddressInfo> {
    return new Promise((resolve, reject) => {
      this.server.once('error', (e: NodeJS.ErrnoException) =>
        reject(new ConfigError(`cannot listen on ${host}:${port}: ${e.code ?? e.message}`)),
      );
      this.server.listen(port, host, () => resolve(this.server.address() as AddressInfo));
    });
  }

  /**
   * Graceful shutdown: stops taking requests (new ones get 503), lets in-flight ones finish for up to
   * drainMs, then cancels what is left and closes every connection.
   */
  async shutdown(drainMs: number): Promise<void> {
    this.draining = true;
    const closed = new Promise<void>((res) => this.server.close(() => res()));
    this.server.closeIdleConnections();
    const deadline = Date.now() + drainMs;
    while (this.engine.inflight > 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    this.server.closeAllConnections();
    await closed;
  }

  private async handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const t0 = performance.now();
    const path = (req.url ?? '/').split('?')[0]!;
    const methods = ROUTES[path];
    const route = methods?.[req.method ?? ''] ?? null;
    res.setHeader('x-request-id', newId('req'));
    res.setHeader('x-content-type-options', 'nosniff');
    res.once('finish', () => {
      this.metrics.requests.inc({ route: route ?? 'unknown', status: String(res.statusCode) });
      if (route === 'completions' || route === 'chat')
        this.metrics.requestLatency.observe((performance.now() - t0) / 1000, { route });
    });
    try {
      if (!methods) throw new ApiError(404, `no route ${path}`, { code: 'unknown_route' });
      if (!route)
        throw new ApiError(
          405,
          `${req.method} is not allowed on ${path} (allowed: ${Object.keys(methods).join(', ')})`,
          {
            headers: { allow: Object.keys(methods).join(', ') },
          },
        );
      if (route === 'health') return this.health(res);
      if (this.draining) {
        res.setHeader('connection', 'close');
        throw new ApiError(503, 'the server is shutting down', { code: 'shutting_down' });
      }
      const key = this.authenticate(req);
      switch (route) {
        case 'models':
          return await this.models(res, key);
        case 'metrics':
          return await this.metricsRoute(res, key);
        case 'completions':
          return await this.generate(req, res, key, 'completion', t0);
        case 'chat':
          return await this.generate(req, res, key, 'chat', t0);
        case 'load':
          return await this.loadAdapter(req, res, key);
        case 'unload':
          return await this.unloadAdapter(req, res, key);
      }
    } catch (e) {
      this.sendError(res, toApiError(e));
    }
  }

  // ---- plumbing ----

  private authenticate(req: IncomingMessage): ApiKey | null {
    if (!this.keys) return null;
    const key = this.keys.check(req.headers.authorization);
    if (!key)
      throw new ApiError(
        401,
        req.headers.authorization
          ? 'Incorrect API key provided.'
          : 'Missing API key: send it as "Authorization: Bearer KEY".',
        { headers: { 'www-authenticate': 'Bearer' } },
      );
    return key;
  }

  private requireAdmin(key: ApiKey | null): void {
    if (!isAdmin(key, this.keys !== null))
      throw new ApiError(403, 'this key may not use this endpoint (it needs a key without a model list)', {
        code: 'permission_denied',
      });
  }

  private readBody(req: IncomingMessage): Promise<unknown> {
    const limit = this.opts.maxBodyBytes;
    const tooLarge = () => new ApiError(413, `the request body is larger than ${limit} bytes`);
    const declared = Number(req.headers['content-length'] ?? 0);
    if (declared > limit) {
      req.resume();
      return Promise.reject(tooLarge());
    }
    return new Promise((resolve, reject) => {
      const chunks: Buffer[] = [];
      let size = 0;
      let failed = false;
      // a body that trickles in is cut off (the generation timeout starts only once the body is read)
      const timer = setTimeout(() => {
        if (failed) return;
        failed = true;
        reject(new ApiError(408, `the request body did not arrive within ${BODY_TIMEOUT_MS / 1000} s`));
      }, BODY_TIMEOUT_MS);
      timer.unref();
      req.once('close', () => clearTimeout(timer));
      req.on('data', (c: Buffer) => {
        if (failed) return;
        size += c.length;
        if (size > limit) {
          failed = true;
          reject(tooLarge());
          return;
        }
        chunks.push(c);
      });
      req.on('end', () => {
        clearTimeout(timer);
        if (failed) return;
        const text = Buffer.concat(chunks).toString('utf8');
        if (text.trim() === '') return reject(new ApiError(400, 'the request body is empty; send a JSON object'));
        try {
          resolve(JSON.parse(text));
        } catch (e) {
          reject(new ApiError(400, `the request body is not valid JSON: ${(e as Error).message}`));
        }
      });
      req.on('error', () => {
        if (!failed) reject(new ApiError(400, 'the request body could not be read'));
        failed = true;
      });
    });
  }

  private sendJson(res: ServerResponse, status: number, body: unknown, headers: Record<string, string> = {}): void {
    if (res.headersSent) return;
    const text = JSON.stringify(body);
    res.writeHead(status, {
      'content-type': 'application/json; charset=utf-8',
      'content-length': Buffer.byteLength(text),
      ...headers,
    });
    res.end(text);
  }

  private sendText(res: ServerResponse, status: number, text: string, type = 'text/plain; charset=utf-8'): void {
    res.writeHead(status, { 'content-type': type, 'content-length': Buffer.byteLength(text) });
    res.end(text);
  }

  private sendError(res: ServerResponse, e: ApiError): void {
    if (res.headersSent) {
      res.destroy();
      return;
    }
    if (e.status === 413 || e.status === 408) res.setHeader('connection', 'close');
    this.sendJson(res, e.status, errorBody(e), e.headers);
  }

  private async freshStats(): Promise<WorkerStats | null> {
    try {
      const timeout = new Promise<null>((r) => setTimeout(() => r(null), 1000).unref());
      const s = await Promise.race([this.engine.stats(), timeout]);
      if (s) this.lastStats = s;
    } catch {
      // keep the last snapshot
    }
    return this.lastStats;
  }

  // ---- routes ----

  private health(res: ServerResponse): void {
    if (!this.engine.healthy) this.sendJson(res, 503, { status: 'error', reason: 'the engine stopped' });
    else if (this.draining) this.sendJson(res, 503, { status: 'draining' });
    else this.sendJson(res, 200, { status: 'ok' });
  }

  private async models(res: ServerResponse, key: ApiKey | null): Promise<void> {
    const stats = await this.freshStats();
    const resident = new Set(stats?.adapters.residentNames ?? []);
    const host = new Set(stats?.adapters.hostNames ?? []);
    const admin = isAdmin(key, this.keys !== null);
    const base = this.opts.baseName;
    const data: ModelCard[] = [
      { id: base, object: 'model', created: START, owned_by: 'lowrank', root: base, parent: null, status: 'base' },
    ];
    for (const e of this.registry.list()) {
      if (!mayUse(key, e.name, base)) continue;
      data.push({
        id: e.name,
        object: 'model',
        created: e.created,
        owned_by: 'lowrank',
        root: admin ? e.path : e.name,
        parent: base,
        status: resident.has(e.name) ? 'resident' : host.has(e.name) ? 'host' : 'disk',
      });
    }
    this.sendJson(res, 200, { object: 'list', data });
  }

  private async metricsRoute(res: ServerResponse, key: ApiKey | null): Promise<void> {
    this.requireAdmin(key);
    const stats = await this.freshStats();
    this.sendText(
      res,
      200,
      this.metrics.render(stats, { inflight: this.engine.inflight, waiting: this.engine.waiting }),
      'text/plain; version=0.0.4; charset=utf-8',
    );
  }

  private async loadAdapter(req: IncomingMessage, res: ServerResponse, key: ApiKey | null): Promise<void> {
    this.requireAdmin(key);
    const b = asBody(await this.readBody(req));
    if (typeof b.lora_name !== 'string' || typeof b.lora_path !== 'string')
      throw new ApiError(400, "both 'lora_name' and 'lora_path' must be given as strings", {
        param: typeof b.lora_name !== 'string' ? 'lora_name' : 'lora_path',
      });
    const inplace = b.load_inplace === true;
    this.registry.checkRuntimeName(b.lora_name, inplace);
    const real = this.registry.resolveRuntimePath(b.lora_path);
    const version = this.registry.reserveVersion();
    try {
      await this.engine.loadAdapter(b.lora_name, version, real);
    } catch (e) {
      const err = toApiError(e);
      // the engine's messages name files; answer with the adapter's name, not server paths
      throw new ApiError(err.status, err.message.split(real).join(`<${b.lora_name}>`), { param: 'lora_path' });
    }
    this.registry.addRuntime(b.lora_name, real, inplace, version);
    this.sendText(res, 200, `Success: LoRA adapter '${b.lora_name}' added successfully.`);
  }

  private async unloadAdapter(req: IncomingMessage, res: ServerResponse, key: ApiKey | null): Promise<void> {
    this.requireAdmin(key);
    const b = asBody(await this.readBody(req));
    if (typeof b.lora_name !== 'string') throw new ApiError(400, "'lora_name' must be given", { param: 'lora_name' });
    if (!this.registry.remove(b.lora_name))
      throw new ApiError(404, `The lora adapter '${b.lora_name}' cannot be found.`, {
        param: 'lora_name',
        code: 'adapter_not_found',
      });
    this.sendText(res, 200, `Success: LoRA adapter '${b.lora_name}' removed successfully.`);
  }

  /** The adapters a request runs with (empty: the base model); unknown or forbidden names are the same 404. */
  private resolveAdapters(p: GenerationParams, key: ApiKey | null): AdapterSpec {
    const base = this.opts.baseName;
    const lookup = (name: string, param: string) => {
      const e = this.registry.get(name);
      if (!e || !mayUse(key, name, base)) {
        const nf = modelNotFound(name);
        throw new ApiError(404, nf.message, { param, code: nf.code });
      }
      return e;
    };
    if (p.adapters) {
      if (p.model !== base)
        throw new ApiError(400, `with 'adapters', 'model' must be the base model ('${base}')`, { param: 'model' });
      return p.adapters.map((a) => {
        const e = lookup(a.name, 'adapters');
        return { name: e.name, version: e.version, path: e.path, weight: a.weight * p.adapterScale };
      });
    }
    if (p.model === base) {
      if (p.adapterScale !== 1)
        throw new ApiError(400, "'adapter_scale' needs an adapter: name one in 'model' or use 'adapters'", {
          param: 'adapter_scale',
        });
      return [];
    }
    const e = lookup(p.model, 'model');
    return [{ name: e.name, version: e.version, path: e.path, weight: p.adapterScale }];
  }

  private encodePrompts(kind: Kind, body: unknown): { params: GenerationParams; prompts: number[][]; echo: string[] } {
    const V = this.tokenizer.vocabSize;
    if (kind === 'completion') {
      const r = parseCompletionRequest(body, this.opts.limits);
      const prompts = r.prompts.map((p, i) => {
        if (typeof p === 'string') return this.tokenizer.encode(p, { addSpecialTokens: true });
        if (p.some((t) => t >= V))
          throw new ApiError(400, `prompt ${i} holds a token id outside the vocabulary (size ${V})`, {
            param: 'prompt',
          });
        return p;
      });
      const echo = r.prompts.map((p) => (!r.echo ? '' : typeof p === 'string' ? p : this.tokenizer.decode(p)));
      return { params: r, prompts, echo };
    }
    const r = parseChatRequest(body, this.opts.limits);
    if (!this.tokenizer.hasChatTemplate && !this.opts.chatTemplate)
      throw new ApiError(
        400,
        `the model '${this.opts.baseName}' has no chat template, so /v1/chat/completions cannot format messages. ` +
          'Use /v1/completions, or start the server with --chat-template FILE (a Jinja template).',
        { param: 'messages', code: 'no_chat_template' },
      );
    const ids = this.tokenizer.encodeChat(r.messages, {
      addGenerationPrompt: true,
      ...(this.opts.chatTemplate ? { template: this.opts.chatTemplate } : {}),
    });
    return { params: r, prompts: [ids], echo: [''] };
  }

  private async generate(
    req: IncomingMessage,
    res: ServerResponse,
    key: ApiKey | null,
    kind: Kind,
    t0: number,
  ): Promise<void> {
    const body = await this.readBody(req);
    const { params: p, prompts, echo } = this.encodePrompts(kind, body);
    const adapters = this.resolveAdapters(p, key);
    for (const [i, ids] of prompts.entries()) {
      if (ids.length === 0) throw new ApiError(400, `prompt ${i} is empty (no tokens)`, { param: 'prompt' });
      if (ids.length >= this.opts.maxModelLen)
        throw new ApiError(
          400,
          `this model's maximum context length is ${this.opts.maxModelLen} tokens, but the prompt has ${ids.length}`,
          { param: kind === 'chat' ? 'messages' : 'prompt', code: 'context_length_exceeded' },
        );
    }
    const longest = Math.max(...prompts.map((x) => x.length));
    let maxTokens = p.maxTokens;
    if (maxTokens === null)
      maxTokens =
        kind === 'completion'
          ? this.opts.defaultMaxTokens
          : Math.min(this.opts.limits.maxTokens, this.opts.maxModelLen - longest);
    if (longest + maxTokens > this.opts.maxModelLen)
      throw new ApiError(
        400,
        `this model's maximum context length is ${this.opts.maxModelLen} tokens; the request needs ${longest + maxTokens} ` +
          `(${longest} in the prompt + ${maxTokens} max_tokens). Shorten the prompt or lower max_tokens.`,
        { param: 'max_tokens', code: 'context_length_exceeded' },
      );
    if (this.engine.waiting + prompts.length > this.opts.maxQueue) {
      this.metrics.rejected.inc({ reason: 'queue_full' });
      throw new ApiError(429, 'the server is busy: too many requests are waiting; retry after a moment', {
        headers: { 'retry-after': '1' },
      });
    }

    const rid = newId(kind === 'chat' ? 'chatcmpl' : 'cmpl');
    const created = Math.floor(Date.now() / 1000);
    const jobs: Job[] = prompts.map((ids, index) => ({
      id: `${rid}-${index}`,
      index,
      promptTokens: ids.length,
      text: '',
      completionTokens: 0,
      finish: null,
      prefix: echo[index]!,
    }));
    const model = p.model;
    let finished = false;
    let streamStarted = false;
    let firstTokenAt = 0;
    let timer: NodeJS.Timeout | null = null;

    const cancelAll = () => {
      for (const j of jobs) if (!j.finish) this.engine.cancel(j.id);
    };
    const end = () => {
      finished = true;
      if (timer) clearTimeout(timer);
    };
    const observe = () => {
      const pt = jobs.reduce((s, j) => s + j.promptTokens, 0);
      const ct = jobs.reduce((s, j) => s + j.completionTokens, 0);
      this.metrics.promptTokens.inc({ model }, pt);
      this.metrics.generationTokens.inc({ model }, ct);
      if (firstTokenAt) {
        this.metrics.ttft.observe((firstTokenAt - t0) / 1000, { route: kind });
        if (ct > 1) this.metrics.tpot.observe((performance.now() - firstTokenAt) / 1000 / (ct - 1), { route: kind });
      }
    };
    const chunkBase = () => ({
      id: rid,
      object: kind === 'chat' ? 'chat.completion.chunk' : 'text_completion',
      created,
      model,
    });
    const sse = (obj: unknown) => {
      res.write(`data: ${JSON.stringify(obj)}\n\n`);
    };
    const choiceChunk = (j: Job, text: string | null, finish: FinishReason | null, first = false) => {
      const choice =
        kind === 'chat'
          ? {
              index: j.index,
              delta: finish ? {} : first ? { role: 'assistant', content: text ?? '' } : { content: text },
              logprobs: null,
              finish_reason: finish,
            }
          : { index: j.index, text: text ?? '', logprobs: null, finish_reason: finish };
      sse({ ...chunkBase(), choices: [choice], ...(p.includeUsage ? { usage: null } : {}) });
    };
    const startStream = () => {
      if (streamStarted) return;
      streamStarted = true;
      res.writeHead(200, {
        'content-type': 'text/event-stream; charset=utf-8',
        'cache-control': 'no-cache',
        connection: 'keep-alive',
        'x-accel-buffering': 'no',
      });
      for (const j of jobs) {
        if (kind === 'chat') choiceChunk(j, '', null, true);
        else if (j.prefix) choiceChunk(j, j.prefix, null);
      }
    };
    const totalUsage = () =>
      usage(
        jobs.reduce((s, j) => s + j.promptTokens, 0),
        jobs.reduce((s, j) => s + j.completionTokens, 0),
      );
    const fail = (err: ApiError) => {
      if (finished) return;
      end();
      cancelAll();
      if (!p.stream || !streamStarted) return this.sendError(res, err);
      sse(errorBody(err));
      res.end('data: [DONE]\n\n');
    };
    const complete = () => {
      end();
      observe();
      if (p.stream) {
        if (p.includeUsage) sse({ ...chunkBase(), choices: [], usage: totalUsage() });
        res.end('data: [DONE]\n\n');
        return;
      }
      const choices = jobs.map((j) =>
        kind === 'chat'
          ? { index: j.index, message: { role: 'assistant', content: j.text }, logprobs: null, finish_reason: j.finish }
          : { index: j.index, text: j.prefix + j.text, logprobs: null, finish_reason: j.finish },
      );
      this.sendJson(res, 200, {
        id: rid,
        object: kind === 'chat' ? 'chat.completion' : 'text_completion',
        created,
        model,
        choices,
        usage: totalUsage(),
      });
    };

    const onEvent = (ev: EngineEvent) => {
      if (finished) return;
      const j = jobs.find((x) => x.id === ev.id)!;
      switch (ev.type) {
        case 'started':
          this.metrics.queueTime.observe(ev.queueMs / 1000);
          if (p.stream) startStream();
          break;
        case 'delta':
          if (!firstTokenAt && ev.tokens > 0) firstTokenAt = performance.now();
          j.text += ev.text;
          j.completionTokens += ev.tokens;
          if (p.stream && ev.text) {
            startStream();
            choiceChunk(j, ev.text, null);
          }
          break;
        case 'done':
          j.finish = ev.finishReason;
          j.completionTokens = ev.completionTokens;
          if (p.stream) {
            startStream();
            choiceChunk(j, null, ev.finishReason);
          }
          if (jobs.every((x) => x.finish)) complete();
          break;
        case 'error':
          j.finish = 'stop';
          fail(new ApiError(ev.status, ev.message, { code: ev.code }));
          break;
      }
    };

    res.on('close', () => {
      if (finished) return;
      end();
      cancelAll();
      this.metrics.cancelled.inc({ reason: 'disconnect' });
    });
    if (this.opts.requestTimeoutMs > 0) {
      timer = setTimeout(() => {
        this.metrics.cancelled.inc({ reason: 'timeout' });
        fail(
          new ApiError(504, `the request did not finish within ${this.opts.requestTimeoutMs / 1000} s`, {
            headers: { 'x-should-retry': 'false' },
          }),
        );
      }, this.opts.requestTimeoutMs);
      timer.unref();
    }
    const base: Omit<EngineRequest, 'id' | 'prompt'> = {
      maxTokens,
      sampling: p.sampling,
      seed: p.seed,
      stop: p.stop,
      stopTokenIds: p.stopTokenIds,
      ignoreEos: p.ignoreEos,
      logitBias: p.logitBias,
      presencePenalty: p.presencePenalty,
      frequencyPenalty: p.frequencyPenalty,
      adapters,
    };
    try {
      jobs.forEach((j, i) => {
        this.engine.submit({ ...base, id: j.id, prompt: prompts[i]! }, onEvent);
      });
    } catch (e) {
      end();
      cancelAll();
      throw e;
    }
  }
}

const START = Math.floor(Date.now() / 1000);
