// The OpenAI HTTP API as this server speaks it: request parsing and validation (every problem is a 400 that
// names the offending field as OpenAI's `param`), and the response and stream-chunk shapes.
//
// Supported: /v1/completions (prompt as a string, token ids, or a list of either: one choice per prompt)
// and /v1/chat/completions with max_tokens / max_completion_tokens, temperature, top_p, seed, stop,
// presence_penalty, frequency_penalty, logit_bias, stream, stream_options.include_usage, echo (completions).
// Extensions (vLLM's names where vLLM has one): top_k, min_p, repetition_penalty, stop_token_ids,
// ignore_eos, and for adapters:
//   adapter_scale: number                       the delta of the adapter named by `model` times this factor
//   adapters: [{ name, weight }, ...]           a weighted sum of adapters' deltas (LoRAX-style linear merge,
//                                               computed on the fly, base weights untouched); `model` must be
//                                               the base model's name
// Rejected with a clear 400: n > 1, best_of > 1, logprobs, suffix, tools / functions, non-text content parts,
// response_format other than text.

import type { SamplingParams } from '../models/sampling.ts';
import type { ChatMessage } from '../tokenize/chat.ts';
import { ApiError } from './errors.ts';

export interface RequestLimits {
  /** Largest max_tokens a request may ask for. */
  maxTokens: number;
  /** Most prompts in one completions request. */
  maxPrompts: number;
  /** Most stop strings (and their length). */
  maxStop: number;
  /** Most messages in one chat request. */
  maxMessages: number;
  /** Most adapters in one `adapters` mixture. */
  maxMixture: number;
}

export const DEFAULT_LIMITS: RequestLimits = {
  maxTokens: 4096,
  maxPrompts: 16,
  maxStop: 16,
  maxMessages: 1024,
  maxMixture: 8,
};

/** Fields common to completions and chat requests. */
export interface GenerationParams {
  model: string;
  /** null: not given (the route picks its default). */
  maxTokens: number | null;
  stream: boolean;
  includeUsage: boolean;
  sampling: SamplingParams;
  seed?: number;
  stop: string[];
  stopTokenIds: number[];
  ignoreEos: boolean;
  logitBias?: Record<number, number>;
  presencePenalty: number;
  frequencyPenalty: number;
  /** The factor on the delta of the adapter named by `model`. */
  adapterScale: number;
  /** A weighted mixture of adapters (with `model` = the base model). */
  adapters: { name: string; weight: number }[] | null;
}

export interface CompletionRequest extends GenerationParams {
  /** Text or token ids, one choice each. */
  prompts: (string | number[])[];
  echo: boolean;
}

export interface ChatRequest extends GenerationParams {
  messages: ChatMessage[];
}

type Body = Record<string, unknown>;

const bad = (param: string, message: string) => new ApiError(400, message, { param });

function has(b: Body, k: string): boolean {
  return b[k] !== undefined && b[k] !== null;
}

function num(b: Body, k: string, lo: number, hi: number, dflt: number, open: 'lo' | 'none' = 'none'): number {
  if (!has(b, k)) return dflt;
  const v = b[k];
  if (typeof v !== 'number' || !Number.isFinite(v)) throw bad(k, `'${k}' must be a number, got ${JSON.stringify(v)}`);
  if ((open === 'lo' ? v <= lo : v < lo) || v > hi)
    throw bad(k, `'${k}' must be in ${open === 'lo' ? '(' : '['}${lo}, ${hi}], got ${v}`);
  return v;
}

function int(b: Body, k: string, lo: number, hi: number): number | undefined {
  if (!has(b, k)) return undefined;
  const v = b[k];
  if (typeof v !== 'number' || !Number.isInteger(v))
    throw bad(k, `'${k}' must be an integer, got ${JSON.stringify(v)}`);
  if (v < lo || v > hi) throw bad(k, `'${k}' must be in [${lo}, ${hi}], got ${v}`);
  return v;
}

function bool(b: Body, k: string, dflt = false): boolean {
  if (!has(b, k)) return dflt;
  if (typeof b[k] !== 'boolean') throw bad(k, `'${k}' must be true or false, got ${JSON.stringify(b[k])}`);
  return b[k] as boolean;
}

function isTokenList(v: unknown): v is number[] {
  return Array.isArray(v) && v.length > 0 && v.every((t) => typeof t === 'number' && Number.isInteger(t) && t >= 0);
}

/** The body as an object, or a 400. */
export function asBody(v: unknown): Body {
  if (!v || typeof v !== 'object' || Array.isArray(v))
    throw new ApiError(400, 'the request body must be a JSON object', { param: null });
  return v as Body;
}

function parseCommon(b: Body, limits: RequestLimits): GenerationParams {
  if (typeof b.model !== 'string' || b.model === '')
    throw bad('model', "'model' is required: the base model's or an adapter's name (GET /v1/models lists them)");
  for (const k of ['n', 'best_of'] as const) {
    const n = int(b, k, 1, 128);
    if (n !== undefined && n !== 1) throw bad(k, `'${k}' must be 1: this server returns one choice per prompt`);
  }
  if (has(b, 'logprobs') && b.logprobs !== false && b.logprobs !== 0)
    throw bad('logprobs', "'logprobs' is not supported by this server");
  if (has(b, 'top_logprobs') && b.top_logprobs !== 0) throw bad('top_logprobs', "'top_logprobs' is not supported");
  for (const k of ['tools', 'functions', 'tool_choice', 'function_call'] as const)
    if (has(b, k) && !(Array.isArray(b[k]) && (b[k] as unknown[]).length === 0) && b[k] !== 'none')
      throw bad(k, `'${k}' (tool calling) is not supported by this server`);
  if (has(b, 'response_format')) {
    const rf = b.response_format as { type?: unknown } | null;
    if (!rf || typeof rf !== 'object' || rf.type !== 'text')
      throw bad('response_format', "only response_format {type: 'text'} is supported");
  }
  const maxTokens =
    int(b, 'max_completion_tokens', 1, limits.maxTokens) ??
    int(b, 'max_tokens', 1, limits.maxTokens) ??
    (null as number | null);
  const stream = bool(b, 'stream');
  let includeUsage = false;
  if (has(b, 'stream_options')) {
    const so = b.stream_options as Body;
    if (typeof so !== 'object' || Array.isArray(so)) throw bad('stream_options', "'stream_options' must be an object");
    if (!stream) throw bad('stream_options', "'stream_options' is only allowed with stream: true");
    includeUsage = bool(so, 'include_usage');
  }
  const topK = int(b, 'top_k', -1, 1 << 30) ?? 0;
  const sampling: SamplingParams = {
    temperature: num(b, 'temperature', 0, 2, 1),
    topP: num(b, 'top_p', 0, 1, 1, 'lo'),
    topK: Math.max(topK, 0),
    minP: num(b, 'min_p', 0, 1, 0),
    repetitionPenalty: num(b, 'repetition_penalty', 0, 2, 1, 'lo'),
  };
  let seed: number | undefined;
  if (has(b, 'seed')) {
    if (typeof b.seed !== 'number' || !Number.isSafeInteger(b.seed)) throw bad('seed', "'seed' must be an integer");
    seed = b.seed;
  }
  let stop: string[] = [];
  if (has(b, 'stop')) {
    const s = b.stop;
    const list = typeof s === 'string' ? [s] : s;
    if (!Array.isArray(list) || !list.every((x) => typeof x === 'string'))
      throw bad('stop', "'stop' must be a string or a list of strings");
    if (list.length > limits.maxStop) throw bad('stop', `'stop' may hold at most ${limits.maxStop} strings`);
    if (list.some((x) => x.length > 1024)) throw bad('stop', 'a stop string may be at most 1024 characters long');
    stop = list.filter((x) => x.length > 0);
  }
  let stopTokenIds: number[] = [];
  if (has(b, 'stop_token_ids')) {
    const s = b.stop_token_ids;
    if (!Array.isArray(s) || s.length > 256 || !s.every((t) => Number.isInteger(t) && t >= 0))
      throw bad('stop_token_ids', "'stop_token_ids' must be a list of token ids");
    stopTokenIds = s as number[];
  }
  let logitBias: Record<number, number> | undefined;
  if (has(b, 'logit_bias')) {
    const lb = b.logit_bias;
    if (typeof lb !== 'object' || Array.isArray(lb))
      throw bad('logit_bias', "'logit_bias' must map token ids to numbers");
    const entries = Object.entries(lb as Body);
    if (entries.length > 1024) throw bad('logit_bias', "'logit_bias' may hold at most 1024 entries");
    logitBias = {};
    for (const [k, v] of entries) {
      const id = Number(k);
      if (!Number.isInteger(id) || id < 0 || typeof v !== 'number' || !(v >= -100 && v <= 100))
        throw bad('logit_bias', `'logit_bias' entry ${JSON.stringify(k)}: keys are token ids, values in [-100, 100]`);
      logitBias[id] = v;
    }
  }
  let adapters: { name: string; weight: number }[] | null = null;
  if (has(b, 'adapters')) {
    const a = b.adapters;
    if (!Array.isArray(a) || a.length === 0 || a.length > limits.maxMixture)
      throw bad('adapters', `'adapters' must be a list of 1 to ${limits.maxMixture} {name, weight} objects`);
    adapters = a.map((x, i) => {
      const e = x as Body;
      if (!e || typeof e !== 'object' || typeof e.name !== 'string' || e.name === '')
        throw bad('adapters', `'adapters[${i}].name' must be an adapter's name`);
      const w = e.weight ?? 1;
      if (typeof w !== 'number' || !Number.isFinite(w) || Math.abs(w) > 100)
        throw bad('adapters', `'adapters[${i}].weight' must be a number in [-100, 100]`);
      return { name: e.name, weight: w };
    });
    if (new Set(adapters.map((x) => x.name)).size !== adapters.length)
      throw bad('adapters', "'adapters' names an adapter twice");
  }
  return {
    model: b.model,
    maxTokens,
    stream,
    includeUsage,
    sampling,
    seed,
    stop,
    stopTokenIds,
    ignoreEos: bool(b, 'ignore_eos'),
    logitBias,
    presencePenalty: num(b, 'presence_penalty', -2, 2, 0),
    frequencyPenalty: num(b, 'frequency_penalty', -2, 2, 0),
    adapterScale: num(b, 'adapter_scale', -100, 100, 1),
    adapters,
  };
}

export function parseCompletionRequest(body: unknown, limits: RequestLimits = DEFAULT_LIMITS): CompletionRequest {
  const b = asBody(body);
  const common = parseCommon(b, limits);
  const p = b.prompt;
  let prompts: (string | number[])[];
  if (typeof p === 'string') prompts = [p];
  else if (isTokenList(p)) prompts = [p];
  else if (Array.isArray(p) && p.length > 0 && p.every((x) => typeof x === 'string' || isTokenList(x)))
    prompts = p as (string | number[])[];
  else throw bad('prompt', "'prompt' must be a string, a list of token ids, or a non-empty list of either");
  if (prompts.length > limits.maxPrompts) throw bad('prompt', `at most ${limits.maxPrompts} prompts per request`);
  if (has(b, 'suffix') && b.suffix !== '') throw bad('suffix', "'suffix' is not supported by this server");
  return { ...common, prompts, echo: bool(b, 'echo') };
}

const ROLES = new Set(['system', 'developer', 'user', 'assistant', 'tool']);

export function parseChatRequest(body: unknown, limits: RequestLimits = DEFAULT_LIMITS): ChatRequest {
  const b = asBody(body);
  const common = parseCommon(b, limits);
  const m = b.messages;
  if (!Array.isArray(m) || m.length === 0) throw bad('messages', "'messages' must be a non-empty list");
  if (m.length > limits.maxMessages) throw bad('messages', `at most ${limits.maxMessages} messages per request`);
  const messages = m.map((x, i): ChatMessage => {
    const msg = x as Body;
    if (!msg || typeof msg !== 'object' || typeof msg.role !== 'string' || !ROLES.has(msg.role))
      throw bad(`messages[${i}].role`, `messages[${i}] needs a role: one of ${[...ROLES].join(', ')}`);
    let content: string;
    if (typeof msg.content === 'string') content = msg.content;
    else if (msg.content === null || msg.content === undefined) content = '';
    else if (Array.isArray(msg.content)) {
      content = msg.content
        .map((part, j) => {
          const pt = part as Body;
          if (pt?.type !== 'text' || typeof pt.text !== 'string')
            throw bad(`messages[${i}].content[${j}]`, 'only text content parts ({type: "text", text}) are supported');
          return pt.text;
        })
        .join('');
    } else throw bad(`messages[${i}].content`, `messages[${i}].content must be a string or a list of text parts`);
    const out: ChatMessage = { role: msg.role, content };
    if (typeof msg.name === 'string') out.name = msg.name;
    return out;
  });
  return { ...common, messages };
}

export interface Usage {
  prompt_tokens: number;
  completion_tokens: number;
  total_tokens: number;
}

export function usage(prompt: number, completion: number): Usage {
  return { prompt_tokens: prompt, completion_tokens: completion, total_tokens: prompt + completion };
}

export interface ModelCard {
  id: string;
  object: 'model';
  created: number;
  owned_by: string;
  root: string;
  parent: string | null;
  /** Extension: where the adapter lives now (resident in a batch slot, in host memory, or on disk). */
  status?: 'base' | 'resident' | 'host' | 'disk';
}
