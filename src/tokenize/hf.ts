// Tokenizers from a Hugging Face model dir: tokenizer.json (the tokenizer itself) plus tokenizer_config.json
// (special tokens, add_bos_token/add_eos_token, chat_template), special_tokens_map.json, chat_template.jinja /
// chat_template.json / additional_chat_templates/*.jinja and generation_config.json (the ids that end
// generation). Also the one entry point that takes any tokenizer source: a dir, a .gguf or a .model file.

import { existsSync, readdirSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { FormatError } from '../core/errors.ts';
import { readGguf } from '../formats/gguf.ts';
import { parseChatTemplates } from './chat.ts';
import { END_OF_TURN_TOKENS, tokenizerFromGguf } from './gguf.ts';
import { tokenizerFromSentencePieceModel } from './spm.ts';
import { llama3TiktokenOptions, tokenizerFromTiktoken } from './tiktoken.ts';
import { Tokenizer, type TokenizerJson } from './tokenizer.ts';

function readJson(path: string): unknown {
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (e) {
    throw new FormatError(`${path}: cannot read: ${(e as Error).message}`);
  }
  try {
    return JSON.parse(text);
  } catch (e) {
    throw new FormatError(`${path}: not valid JSON: ${(e as Error).message}`);
  }
}

function readObject(path: string): Record<string, unknown> | null {
  if (!existsSync(path)) return null;
  const v = readJson(path);
  if (!v || typeof v !== 'object' || Array.isArray(v)) throw new FormatError(`${path}: expected a JSON object`);
  return v as Record<string, unknown>;
}

/** A special-token value of tokenizer_config.json: a string, {content: string, ...} or null. */
function tokenText(v: unknown, file: string, key: string): string | null {
  if (v === undefined || v === null) return null;
  if (typeof v === 'string') return v;
  if (typeof v === 'object' && typeof (v as { content?: unknown }).content === 'string') {
    return (v as { content: string }).content;
  }
  throw new FormatError(`${file}: "${key}" must be a string or an object with "content"`);
}

function idList(v: unknown): number[] {
  if (typeof v === 'number' && Number.isInteger(v)) return [v];
  if (Array.isArray(v)) return v.filter((x): x is number => typeof x === 'number' && Number.isInteger(x));
  return [];
}

/** BOS/EOS ids the post-processor adds around a single sequence (TemplateProcessing, Bert, Roberta). */
function postProcessorSpecials(pp: unknown): { prefix: number[]; suffix: number[] } | null {
  if (!pp || typeof pp !== 'object') return null;
  const p = pp as Record<string, unknown>;
  if (p.type === 'Sequence' && Array.isArray(p.processors)) {
    for (const sub of p.processors) {
      const r = postProcessorSpecials(sub);
      if (r) return r;
    }
    return null;
  }
  if (p.type === 'TemplateProcessing' && Array.isArray(p.single)) {
    const specials = (p.special_tokens ?? {}) as Record<string, { ids?: number[] }>;
    const prefix: number[] = [];
    const suffix: number[] = [];
    let seenSeq = false;
    for (const item of p.single as Record<string, { id?: string }>[]) {
      if (item.Sequence) seenSeq = true;
      else if (item.SpecialToken?.id !== undefined) {
        const ids = specials[item.SpecialToken.id]?.ids ?? [];
        (seenSeq ? suffix : prefix).push(...ids);
      }
    }
    return { prefix, suffix };
  }
  if ((p.type === 'BertProcessing' || p.type === 'RobertaProcessing') && Array.isArray(p.cls) && Array.isArray(p.sep)) {
    return { prefix: [Number(p.cls[1])], suffix: [Number(p.sep[1])] };
  }
  return null;
}

/** Loads the tokenizer of a Hugging Face model dir (tokenizer.json required; tokenizer.model as a fallback). */
export function tokenizerFromHfDir(dir: string): Tokenizer {
  const tjPath = join(dir, 'tokenizer.json');
  if (!existsSync(tjPath)) {
    const model = join(dir, 'tokenizer.model');
    if (existsSync(model)) return tokenizerFromModelFile(model, readChatTemplates(dir, null));
    throw new FormatError(
      `${dir}: no tokenizer.json (nor tokenizer.model) in the model dir; download the model's tokenizer files too`,
    );
  }
  const json = readJson(tjPath) as TokenizerJson;
  if (!json || typeof json !== 'object' || !json.model || typeof json.model !== 'object') {
    throw new FormatError(`${tjPath}: no "model" object: not a tokenizer.json`);
  }
  const cfgPath = join(dir, 'tokenizer_config.json');
  const cfg = readObject(cfgPath) ?? {};
  const stmPath = join(dir, 'special_tokens_map.json');
  const stm = readObject(stmPath) ?? {};
  const gen = readObject(join(dir, 'generation_config.json')) ?? {};

  const special = (key: string): string | null =>
    tokenText(cfg[key], cfgPath, key) ?? tokenText(stm[key], stmPath, key);
  const added = new Map<string, number>();
  for (const t of json.added_tokens ?? []) added.set(t.content, t.id);
  const vocab = (json.model as { vocab?: unknown }).vocab;
  const idOf = (text: string | null): number | null => {
    if (text === null) return null;
    const a = added.get(text);
    if (a !== undefined) return a;
    if (vocab && typeof vocab === 'object' && !Array.isArray(vocab)) {
      const v = (vocab as Record<string, unknown>)[text];
      if (typeof v === 'number' && Object.hasOwn(vocab, text)) return v;
    }
    if (Array.isArray(vocab)) {
      // Unigram: [[piece, score], ...]
      const i = vocab.findIndex((e) => Array.isArray(e) && e[0] === text);
      if (i >= 0) return i;
    }
    return null;
  };

  let bosId = idOf(special('bos_token'));
  let eosId = idOf(special('eos_token'));
  const pp = postProcessorSpecials(json.post_processor);
  let addBos = typeof cfg.add_bos_token === 'boolean' ? cfg.add_bos_token : undefined;
  let addEos = typeof cfg.add_eos_token === 'boolean' ? cfg.add_eos_token : undefined;
  if (addBos === undefined) {
    addBos = (pp?.prefix.length ?? 0) > 0;
    if (addBos && bosId === null) bosId = pp!.prefix[0]!;
  }
  if (addEos === undefined) {
    addEos = (pp?.suffix.length ?? 0) > 0;
    if (addEos && eosId === null) eosId = pp!.suffix[0]!;
  }

  const extraEos = idList(gen.eos_token_id);
  for (const t of json.added_tokens ?? []) {
    if (t.special && END_OF_TURN_TOKENS.includes(t.content)) extraEos.push(t.id);
  }

  const additional = Array.isArray(cfg.additional_special_tokens)
    ? cfg.additional_special_tokens.map((v, i) => tokenText(v, cfgPath, `additional_special_tokens[${i}]`))
    : [];
  return new Tokenizer(json, {
    source: dir,
    bosId,
    eosId,
    extraEosIds: extraEos,
    padId: idOf(special('pad_token')),
    unkId: idOf(special('unk_token')),
    addBos,
    addEos,
    chatTemplates: readChatTemplates(dir, cfg),
    cleanUpSpaces: cfg.clean_up_tokenization_spaces === true,
    hfConfig: {
      bos_token: special('bos_token'),
      eos_token: special('eos_token'),
      unk_token: special('unk_token'),
      pad_token: special('pad_token'),
      additional_special_tokens: additional.filter((x): x is string => x !== null),
      remove_space: cfg.remove_space,
      do_lowercase_and_remove_accent: cfg.do_lowercase_and_remove_accent,
    },
  });
}

/**
 * The chat templates of a model dir. As in transformers, chat_template.jinja (or the older chat_template.json)
 * replaces tokenizer_config.json's "chat_template", and additional_chat_templates/<name>.jinja add named ones.
 */
function readChatTemplates(dir: string, cfg: Record<string, unknown> | null): Record<string, string> {
  const templates = parseChatTemplates(cfg?.chat_template, `${join(dir, 'tokenizer_config.json')} "chat_template"`);
  const jinja = join(dir, 'chat_template.jinja');
  const jsonFile = join(dir, 'chat_template.json');
  if (existsSync(jinja)) templates.default = readFileSync(jinja, 'utf8');
  else if (existsSync(jsonFile)) {
    const obj = readObject(jsonFile);
    Object.assign(templates, parseChatTemplates(obj?.chat_template, `${jsonFile} "chat_template"`));
  }
  const extra = join(dir, 'additional_chat_templates');
  if (existsSync(extra) && statSync(extra).isDirectory()) {
    for (const f of readdirSync(extra).sort()) {
      if (f.endsWith('.jinja')) templates[f.slice(0, -'.jinja'.length)] = readFileSync(join(extra, f), 'utf8');
    }
  }
  return templates;
}

/** A tokenizer.model file: SentencePiece protobuf, or a tiktoken ranks file (Llama 3's 128,000 ranks get Llama 3's specials). */
function tokenizerFromModelFile(path: string, templates: Record<string, string>): Tokenizer {
  const head = readFileSync(path).subarray(0, 64);
  const firstLine = head.toString('latin1').split('\n')[0] ?? '';
  const chatTemplate = templates.default;
  if (/^[A-Za-z0-9+/]+={0,2} \d+$/.test(firstLine)) {
    const lines = readFileSync(path, 'latin1')
      .split('\n')
      .filter((l) => l.trim() !== '').length;
    const opts = lines === 128000 ? llama3TiktokenOptions() : {};
    return tokenizerFromTiktoken(path, { ...opts, ...(chatTemplate ? { chatTemplate } : {}) });
  }
  return tokenizerFromSentencePieceModel(path, chatTemplate ? { chatTemplate } : {});
}

/**
 * Loads a tokenizer from whatever holds one: a Hugging Face model dir, a .gguf file (its metadata), a
 * SentencePiece or tiktoken tokenizer.model, or a bare tokenizer.json file.
 */
export function loadTokenizer(path: string): Tokenizer {
  let st: ReturnType<typeof statSync>;
  try {
    st = statSync(path);
  } catch {
    throw new FormatError(`${path}: no such file or directory`);
  }
  if (st.isDirectory()) return tokenizerFromHfDir(path);
  if (path.endsWith('.gguf')) {
    const f = readGguf(path);
    try {
      return tokenizerFromGguf(f.metadata, { source: path });
    } finally {
      f.close();
    }
  }
  if (path.endsWith('.json')) {
    const json = readJson(path) as TokenizerJson;
    if (!json || typeof json !== 'object' || !json.model) throw new FormatError(`${path}: not a tokenizer.json`);
    return new Tokenizer(json, { source: path });
  }
  return tokenizerFromModelFile(path, {});
}
