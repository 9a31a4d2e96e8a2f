// Record formats -> token ids and labels, with loss masking.
//
// Labels follow the Hugging Face convention: unshifted, `labels[t]` is the target for the logits at position
// t-1, and IGNORE_INDEX (-100) marks tokens that carry no loss. Every example's first label is -100: nothing
// predicts the first token, and when examples are packed into one row this keeps the last token of one
// example from being trained to predict the first token of the next (as DataCollatorWithFlattening does).
//
// Where the prompt ends. Text is tokenised whole (never piece by piece, which could tokenise differently
// from inference). A character boundary c in the text becomes a token boundary by tokenising text[0, c) and
// taking the length of its common prefix with the ids of the whole text: a token that straddles the boundary
// counts as after it. For chat data the character spans of the trained turns come from rendering prefixes
// of the conversation with the chat template (the {% generation %} tags HF uses for this are not supported by
// @huggingface/jinja):
//   P = render(messages[0..i), addGenerationPrompt) and F_i = render(messages[0..i]) -> the turn is F_i[|P|..].
// So the span holds everything the template emits for the assistant after the generation prompt: content, an
// empty think block where the template adds one, and the end-of-turn token (Axolotl's train_on_eos: turn).
// This needs P to be a prefix of F_i and F_i a prefix of the whole conversation. Templates that render
// earlier turns differently (Qwen3 drops think blocks from turns before the last user message) break that;
// then the turn is found by searching the whole render, after the previous span, for generation prompt +
// content + end-of-turn text (both learned once per dataset by rendering a two-message probe), then for
// content + end-of-turn, then for the content alone. Such turns are counted in the report; a turn found by
// no means is a DataError. A trained turn of another role (message_field_training) starts at its content
// rather than at the generation prompt.

import { DataError } from '../core/errors.ts';
import type { DatasetConfig } from './config.ts';
import type { SourceRecord } from './data-read.ts';

export const IGNORE_INDEX = -100;

export interface ChatMessage {
  role: string;
  content: string;
}

/** What the pipeline needs from a tokenizer (src/tokenize provides the real one). */
export interface TextTokenizer {
  /** addSpecialTokens (default true) applies the tokenizer's post-processor, e.g. a BOS. */
  encode(text: string, opts?: { addSpecialTokens?: boolean }): number[];
  bosId?: number;
  eosId?: number;
  padId?: number;
  applyChatTemplate?(messages: ChatMessage[], opts: { addGenerationPrompt?: boolean }): string;
}

export type ChatRenderer = (messages: ChatMessage[], opts: { addGenerationPrompt?: boolean }) => string;

export interface SourceRef {
  /** Index into the config's datasets (or test_datasets). */
  dataset: number;
  file: string;
  line: number;
}

export interface Example {
  inputIds: Int32Array;
  labels: Int32Array;
  source: SourceRef;
}

export type DropReason = 'empty' | 'too_long' | 'no_trainable_tokens' | 'no_trainable_tokens_after_truncation';

export const DROP_REASONS: Record<DropReason, string> = {
  empty: 'the record has no text',
  too_long: 'longer than sequence_len (excess_length_strategy: drop)',
  no_trainable_tokens: 'no token carries loss (empty completion, or no trained turn)',
  no_trainable_tokens_after_truncation: 'truncation at sequence_len removed every trained token (the prompt fills it)',
};

export interface FormatOptions {
  sequenceLen: number;
  trainOnInputs: boolean;
  excessLength: 'truncate' | 'drop' | 'raise';
  /** Overrides tokenizer.applyChatTemplate (e.g. the config's chat_template_jinja, rendered by src/tokenize). */
  applyChatTemplate?: ChatRenderer;
}

export type Tokenized =
  | { ok: true; example: Example; rawLength: number; truncated: boolean; searchedTurns: number }
  | { ok: false; reason: DropReason; rawLength: number };

/** How a `completion` dataset's records look; decided once per file from its first record. */
export type CompletionShape = 'prompt_completion' | 'text';

export function completionShape(first: Record<string, unknown>, spec: DatasetConfig): CompletionShape {
  return spec.field_prompt in first || spec.field_completion in first ? 'prompt_completion' : 'text';
}

/** The standard Alpaca prompt (Stanford Alpaca; Axolotl's AlpacaPrompter). */
export const ALPACA_PROMPT_WITH_INPUT =
  'Below is an instruction that describes a task, paired with an input that provides further context. ' +
  'Write a response that appropriately completes the request.\n\n' +
  '### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n';
export const ALPACA_PROMPT_NO_INPUT =
  'Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n' +
  '### Instruction:\n{instruction}\n\n### Response:\n';

export function alpacaPrompt(instruction: string, input?: string): string {
  return input
    ? ALPACA_PROMPT_WITH_INPUT.replace('{instruction}', instruction).replace('{input}', input)
    : ALPACA_PROMPT_NO_INPUT.replace('{instruction}', instruction);
}

/** Per-dataset state: the completion shape and the chat template's end-of-turn text. */
export interface DatasetFormatState {
  shape: CompletionShape;
  /** Learned from the chat template on first need. */
  frame?: TurnFrame;
}

/** Turns one record into an example (or a drop with its reason). Throws DataError for malformed records. */
export function tokenizeRecord(
  rec: SourceRecord,
  spec: DatasetConfig,
  datasetIndex: number,
  tok: TextTokenizer,
  opts: FormatOptions,
  state: DatasetFormatState,
): Tokenized {
  const source: SourceRef = { dataset: datasetIndex, file: spec.path, line: rec.line };
  let ids: number[];
  let train: boolean[];
  let searchedTurns = 0;
  switch (spec.type) {
    case 'text': {
      const text = stringField(rec, spec, spec.field, 'text');
      if (text === '') return { ok: false, reason: 'empty', rawLength: 0 };
      ({ ids, train } = spanTokens(tok, text, [[0, text.length]], true));
      appendEos(tok, ids, train, true);
      break;
    }
    case 'completion': {
      if (state.shape === 'text') {
        const text = stringField(rec, spec, spec.field, 'completion');
        if (text === '') return { ok: false, reason: 'empty', rawLength: 0 };
        ({ ids, train } = spanTokens(tok, text, [[0, text.length]], true));
      } else {
        const prompt = stringField(rec, spec, spec.field_prompt, 'completion');
        const completion = stringField(rec, spec, spec.field_completion, 'completion');
        if (prompt === '' && completion === '') return { ok: false, reason: 'empty', rawLength: 0 };
        const text = prompt + completion;
        ({ ids, train } = spanTokens(tok, text, [[prompt.length, text.length]], true));
      }
      appendEos(tok, ids, train, true);
      break;
    }
    case 'alpaca': {
      const instruction = stringField(rec, spec, spec.field_instruction, 'alpaca');
      const input = optionalStringField(rec, spec, spec.field_input, 'alpaca');
      const output = stringField(rec, spec, spec.field_output, 'alpaca');
      const prompt = alpacaPrompt(instruction, input);
      const text = prompt + output;
      ({ ids, train } = spanTokens(tok, text, [[prompt.length, text.length]], true));
      appendEos(tok, ids, train, true);
      break;
    }
    case 'chat': {
      const r = chatTokens(rec, spec, tok, opts, state);
      ids = r.ids;
      train = r.train;
      searchedTurns = r.searchedTurns;
      if (ids.length === 0) return { ok: false, reason: 'empty', rawLength: 0 };
      break;
    }
    case 'input_output': {
      ({ ids, train } = segmentTokens(rec, spec, tok));
      if (ids.length === 0) return { ok: false, reason: 'empty', rawLength: 0 };
      break;
    }
  }
  if (opts.trainOnInputs && spec.type !== 'input_output') train.fill(true);

  const rawLength = ids.length;
  const trainedAnywhere = train.some((on, t) => on && t > 0);
  let truncated = false;
  if (ids.length > opts.sequenceLen) {
    if (opts.excessLength === 'drop') return { ok: false, reason: 'too_long', rawLength };
    if (opts.excessLength === 'raise') {
      throw new DataError(
        `${spec.path}:${rec.line}: the example has ${ids.length} tokens, more than sequence_len ${opts.sequenceLen} (excess_length_strategy: raise); raise sequence_len, shorten the record, or use truncate or drop`,
      );
    }
    ids = ids.slice(0, opts.sequenceLen);
    train = train.slice(0, opts.sequenceLen);
    truncated = true;
  }
  const inputIds = Int32Array.from(ids);
  const labels = new Int32Array(ids.length);
  let trainable = 0;
  for (let t = 0; t < ids.length; t++) {
    const on = t > 0 && train[t]!;
    labels[t] = on ? ids[t]! : IGNORE_INDEX;
    if (on) trainable++;
  }
  if (trainable === 0) {
    const reason = truncated && trainedAnywhere ? 'no_trainable_tokens_after_truncation' : 'no_trainable_tokens';
    return { ok: false, reason, rawLength };
  }
  return { ok: true, example: { inputIds, labels, source }, rawLength, truncated, searchedTurns };
}

// ---------------------------------------------------------------------------------------------------------
// Fields
// ---------------------------------------------------------------------------------------------------------

function expectedShape(spec: DatasetConfig): string {
  switch (spec.type) {
    case 'text':
      return `{"${spec.field}": "..."}`;
    case 'completion':
      return `{"${spec.field_prompt}": "...", "${spec.field_completion}": "..."} or {"${spec.field}": "..."}`;
    case 'alpaca':
      return `{"${spec.field_instruction}": "...", "${spec.field_input}": "..." (optional), "${spec.field_output}": "..."}`;
    case 'chat': {
      const { role, content } = spec.message_property_mappings;
      return `{"${spec.field_messages}": [{"${role}": "user", "${content}": "..."}, {"${role}": "assistant", "${content}": "..."}]}`;
    }
    case 'input_output':
      return '{"segments": [{"text": "...", "label": false}, {"text": "...", "label": true}]}';
  }
}

function found(v: unknown): string {
  if (v === undefined) return 'nothing';
  if (v === null) return 'null';
  const kind = Array.isArray(v) ? 'a list' : typeof v === 'object' ? 'an object' : `a ${typeof v}`;
  let shown = JSON.stringify(v) ?? String(v);
  if (shown.length > 50) shown = `${shown.slice(0, 47)}...`;
  return `${shown} (${kind})`;
}

function fieldError(rec: SourceRecord, spec: DatasetConfig, field: string, what: string, value: unknown): DataError {
  const missing = value === undefined;
  const keys = Object.keys(rec.value);
  const hint = missing
    ? `; the record has ${keys.length > 0 ? `fields ${keys.slice(0, 8).join(', ')}` : 'no fields'}`
    : '';
  let extra = '';
  if (spec.type === 'chat' && missing && 'conversations' in rec.value) {
    extra =
      '. For ShareGPT data set field_messages: conversations and message_property_mappings: {role: from, content: value}';
  }
  const problem = missing ? `missing field '${field}'` : `field '${field}' should be ${what}, found ${found(value)}`;
  return new DataError(
    `${spec.path}:${rec.line}: ${problem}${hint}; a ${spec.type} record looks like ${expectedShape(spec)}${extra}`,
  );
}

function stringField(rec: SourceRecord, spec: DatasetConfig, field: string, _type: string): string {
  const v = rec.value[field];
  if (typeof v !== 'string') throw fieldError(rec, spec, field, 'a string', v);
  return v;
}

function optionalStringField(rec: SourceRecord, spec: DatasetConfig, field: string, _type: string): string | undefined {
  const v = rec.value[field];
  if (v === undefined || v === null || v === '') return undefined;
  if (typeof v !== 'string') throw fieldError(rec, spec, field, 'a string', v);
  return v;
}

/** A list field; CSV cells holding JSON (e.g. a messages column) are parsed. */
function listField(rec: SourceRecord, spec: DatasetConfig, field: string): unknown[] {
  let v = rec.value[field];
  if (typeof v === 'string' && v.trimStart().startsWith('[')) {
    try {
      v = JSON.parse(v);
    } catch {
      // reported below as a wrong type
    }
  }
  if (!Array.isArray(v)) throw fieldError(rec, spec, field, 'a list', v);
  return v;
}

// ---------------------------------------------------------------------------------------------------------
// Text with trained character spans -> tokens
// ---------------------------------------------------------------------------------------------------------

function commonPrefix(a: readonly number[], b: readonly number[]): number {
  const n = Math.min(a.length, b.length);
  let i = 0;
  while (i < n && a[i] === b[i]) i++;
  return i;
}

/**
 * Tokenises `text` whole and marks the tokens inside the trained character spans (sorted, disjoint).
 * A character boundary c maps to the common-prefix length of encode(text[0, c)) with the full ids.
 */
export function spanTokens(
  tok: TextTokenizer,
  text: string,
  spans: readonly (readonly [number, number])[],
  addSpecialTokens: boolean,
): { ids: number[]; train: boolean[] } {
  const ids = tok.encode(text, { addSpecialTokens });
  const train = new Array<boolean>(ids.length).fill(false);
  const cache = new Map<number, number>();
  const boundary = (c: number): number => {
    if (c >= text.length) return ids.length;
    let b = cache.get(c);
    if (b === undefined) {
      b = commonPrefix(tok.encode(text.slice(0, c), { addSpecialTokens }), ids);
      cache.set(c, b);
    }
    return b;
  };
  for (const [s, e] of spans) {
    if (e <= s) continue;
    const from = boundary(s);
    const to = boundary(e);
    for (let t = from; t < to; t++) train[t] = true;
  }
  return { ids, train };
}

/** Appends EOS when the tokenizer has one and the ids do not already end with it. */
function appendEos(tok: TextTokenizer, ids: number[], train: boolean[], trained: boolean): void {
  if (tok.eosId === undefined) return;
  if (ids.length > 0 && ids[ids.length - 1] === tok.eosId) {
    train[train.length - 1] = trained;
    return;
  }
  ids.push(tok.eosId);
  train.push(trained);
}

// ---------------------------------------------------------------------------------------------------------
// input_output: segments tokenised one by one, no special tokens added (the user writes them)
// ---------------------------------------------------------------------------------------------------------

function segmentTokens(
  rec: SourceRecord,
  spec: DatasetConfig,
  tok: TextTokenizer,
): { ids: number[]; train: boolean[] } {
  const segments = listField(rec, spec, 'segments');
  const ids: number[] = [];
  const train: boolean[] = [];
  segments.forEach((seg, i) => {
    const s = seg as Record<string, unknown> | null;
    if (s === null || typeof s !== 'object' || typeof s.text !== 'string') {
      throw fieldError(rec, spec, `segments[${i}].text`, 'a string', s === null || typeof s !== 'object' ? s : s.text);
    }
    const label = s.label ?? true;
    if (typeof label !== 'boolean') throw fieldError(rec, spec, `segments[${i}].label`, 'true or false', label);
    for (const id of tok.encode(s.text, { addSpecialTokens: false })) {
      ids.push(id);
      train.push(label);
    }
  });
  return { ids, train };
}

// ---------------------------------------------------------------------------------------------------------
// chat
// ---------------------------------------------------------------------------------------------------------

interface ParsedMessage extends ChatMessage {
  trained: boolean;
}

function chatMessages(rec: SourceRecord, spec: DatasetConfig): ParsedMessage[] {
  const raw = listField(rec, spec, spec.field_messages);
  const { role: roleKey, content: contentKey } = spec.message_property_mappings;
  const toRole = new Map<string, string>();
  for (const [target, sources] of Object.entries(spec.roles)) for (const s of sources) toRole.set(s, target);
  return raw.map((m, i) => {
    const at = `${spec.field_messages}[${i}]`;
    if (m === null || typeof m !== 'object' || Array.isArray(m)) throw fieldError(rec, spec, at, 'an object', m);
    const msg = m as Record<string, unknown>;
    const role = msg[roleKey];
    if (typeof role !== 'string') throw fieldError(rec, spec, `${at}.${roleKey}`, 'a string', role);
    let content = msg[contentKey];
    if (content === null && role !== 'user') content = ''; // e.g. an assistant turn that only made a tool call
    if (typeof content !== 'string') throw fieldError(rec, spec, `${at}.${contentKey}`, 'a string', content);
    const mapped = toRole.get(role) ?? role;
    let trained = spec.roles_to_train.includes(mapped);
    const weight = msg.weight;
    if (weight !== undefined && typeof weight !== 'number')
      throw fieldError(rec, spec, `${at}.weight`, 'a number', weight);
    if (weight === 0) trained = false;
    if (spec.message_field_training !== null) {
      const flag = msg[spec.message_field_training];
      if (flag !== undefined) {
        if (typeof flag !== 'boolean') {
          throw fieldError(rec, spec, `${at}.${spec.message_field_training}`, 'true or false', flag);
        }
        trained = flag;
      }
    }
    return { role: mapped, content, trained };
  });
}

function chatRenderer(spec: DatasetConfig, rec: SourceRecord, tok: TextTokenizer, opts: FormatOptions): ChatRenderer {
  const render = opts.applyChatTemplate ?? tok.applyChatTemplate?.bind(tok);
  if (!render) {
    throw new DataError(
      `${spec.path}:${rec.line}: chat data needs a chat template, and the tokenizer has none; set chat_template (e.g. chatml) or chat_template_jinja in the config`,
    );
  }
  return (messages, o) => {
    try {
      return render(messages, o);
    } catch (e) {
      throw new DataError(
        `${spec.path}:${rec.line}: the chat template failed on this conversation: ${(e as Error).message}`,
      );
    }
  };
}

/** What a template emits around an assistant turn, learned once per dataset from a two-message probe. */
interface TurnFrame {
  /** The generation prompt, e.g. "<|im_start|>assistant\n". */
  header: string;
  /** What follows the content, e.g. "<|im_end|>\n". */
  endOfTurn: string;
}

function learnTurnFrame(render: ChatRenderer): TurnFrame {
  const question = [{ role: 'user', content: 'lowrank probe question' }];
  const answer = 'lowrank probe answer';
  const frame: TurnFrame = { header: '', endOfTurn: '' };
  try {
    const full = render([...question, { role: 'assistant', content: answer }], { addGenerationPrompt: false });
    const at = full.lastIndexOf(answer);
    if (at >= 0) frame.endOfTurn = full.slice(at + answer.length);
    const asked = render(question, { addGenerationPrompt: false });
    const prompted = render(question, { addGenerationPrompt: true });
    if (prompted.startsWith(asked)) frame.header = prompted.slice(asked.length);
  } catch {
    // a template that rejects the probe: search by content alone
  }
  return frame;
}

function renderOr(
  render: ChatRenderer,
  messages: ChatMessage[],
  addGenerationPrompt: boolean,
  fallback: string,
): string {
  try {
    return render(messages, { addGenerationPrompt });
  } catch {
    return fallback;
  }
}

/**
 * The character spans of the trained turns in `full` (see the header comment). An assistant turn starts
 * after the generation prompt; another trained role (message_field_training) starts at its content. Both
 * end after the template's end-of-turn text.
 */
function chatSpans(
  messages: ParsedMessage[],
  full: string,
  render: ChatRenderer,
  state: DatasetFormatState,
  where: string,
  field: string,
): { spans: [number, number][]; searchedTurns: number } {
  const plain = messages.map(({ role, content }) => ({ role, content }));
  const spans: [number, number][] = [];
  let cursor = 0;
  let searchedTurns = 0;
  for (let i = 0; i < messages.length; i++) {
    const msg = messages[i]!;
    if (!msg.trained) continue;
    const assistant = msg.role === 'assistant';
    // An unrenderable empty prefix means the turn starts the text; any other failure forces the search.
    const before = renderOr(render, plain.slice(0, i), assistant, i === 0 ? '' : '\u0000');
    const upto = i === messages.length - 1 ? full : render(plain.slice(0, i + 1), { addGenerationPrompt: false });
    if (full.startsWith(upto) && upto.startsWith(before) && before.length >= cursor) {
      let start = before.length;
      if (!assistant) {
        state.frame ??= learnTurnFrame(render);
        const eot = state.frame.endOfTurn;
        const body = eot && upto.endsWith(eot) ? upto.slice(0, upto.length - eot.length) : upto;
        if (body.endsWith(msg.content) && body.length - msg.content.length >= start) {
          start = body.length - msg.content.length;
        }
      }
      spans.push([start, upto.length]);
      cursor = upto.length;
      continue;
    }
    // Not prefix-stable: look for header + content + end-of-turn after the previous span, then for less.
    state.frame ??= learnTurnFrame(render);
    const { header, endOfTurn } = state.frame;
    let found: [number, number] | undefined;
    for (const content of new Set([msg.content, msg.content.trim()])) {
      const tries: [needle: string, skip: number][] = [
        [content + endOfTurn, 0],
        [content, 0],
      ];
      if (assistant && header) tries.unshift([header + content + endOfTurn, header.length]);
      for (const [needle, skip] of tries) {
        const at = needle === '' ? -1 : full.indexOf(needle, cursor);
        if (at >= 0) {
          found = [at + skip, at + needle.length];
          // content alone: take the end-of-turn text too when it follows
          if (needle === content && endOfTurn && full.startsWith(endOfTurn, found[1])) found[1] += endOfTurn.length;
          break;
        }
      }
      if (found) break;
    }
    if (!found) {
      throw new DataError(
        `${where}: cannot locate ${field}[${i}] (${msg.role}) in the chat template's output: the template is not prefix-stable and changes the text of this turn; use a template such as chatml, or train_on_inputs: true`,
      );
    }
    spans.push(found);
    cursor = found[1];
    searchedTurns++;
  }
  return { spans, searchedTurns };
}

function chatTokens(
  rec: SourceRecord,
  spec: DatasetConfig,
  tok: TextTokenizer,
  opts: FormatOptions,
  state: DatasetFormatState,
): { ids: number[]; train: boolean[]; searchedTurns: number } {
  const messages = chatMessages(rec, spec);
  if (messages.length === 0) return { ids: [], train: [], searchedTurns: 0 };
  const render = chatRenderer(spec, rec, tok, opts);
  const full = render(
    messages.map(({ role, content }) => ({ role, content })),
    { addGenerationPrompt: false },
  );
  if (opts.trainOnInputs) {
    const { ids, train } = spanTokens(tok, full, [[0, full.length]], false);
    return { ids, train, searchedTurns: 0 };
  }
  const { spans, searchedTurns } = chatSpans(
    messages,
    full,
    render,
    state,
    `${spec.path}:${rec.line}`,
    spec.field_messages,
  );
  const { ids, train } = spanTokens(tok, full, spans, false);
  applyTrainOnEos(ids, train, tok.eosId, spec.train_on_eos);
  return { ids, train, searchedTurns };
}

/** Axolotl's train_on_eos for chat: turn (as rendered), all, last, none. */
function applyTrainOnEos(
  ids: number[],
  train: boolean[],
  eos: number | undefined,
  mode: DatasetConfig['train_on_eos'],
): void {
  if (eos === undefined || mode === 'turn') return;
  const last = ids.lastIndexOf(eos);
  for (let t = 0; t < ids.length; t++) {
    if (ids[t] !== eos) continue;
    if (mode === 'none') train[t] = false;
    else if (mode === 'all') train[t] = true;
    else train[t] = t === last; // 'last'
  }
}
