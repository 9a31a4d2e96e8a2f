// tiktoken BPE ranks files (Llama 3's original tokenizer.model: one "base64(token bytes) rank" per line).
// Converted the way transformers' TikTokenConverter does: tokens in byte-level spelling with their rank as id,
// merges = every split of a token into two ranked tokens, ordered by the token's rank (then by the parts'
// ranks), and ignore_merges so a whole pre-token that is itself a token is emitted directly, as tiktoken does.

import { readFileSync } from 'node:fs';
import { FormatError } from '../core/errors.ts';
import { BYTE_TO_CHAR } from './byte-level.ts';
import { byteLevelPreTokenizer, LLAMA3_PATTERN } from './pre-tokenizers.ts';
import { type AddedTokenJson, Tokenizer, type TokenizerJson } from './tokenizer.ts';

export interface TiktokenOptions {
  /** The split regex (default: Llama 3's). */
  pattern?: string;
  /** Special tokens: name -> id, or names numbered from the first id after the ranks. */
  specialTokens?: Record<string, number> | readonly string[];
  /** Token text of BOS / EOS (must be among the special tokens). */
  bosToken?: string;
  eosToken?: string;
  /** More token texts that end generation (e.g. '<|eot_id|>'). */
  stopTokens?: readonly string[];
  padToken?: string;
  addBos?: boolean;
  addEos?: boolean;
  chatTemplate?: string;
}

/** Llama 3.x's 256 special tokens in id order from 128000, as Meta's tokenizer.py defines them. */
export function llama3SpecialTokens(): string[] {
  const named = [
    '<|begin_of_text|>',
    '<|end_of_text|>',
    '<|reserved_special_token_0|>',
    '<|reserved_special_token_1|>',
    '<|finetune_right_pad_id|>',
    '<|step_id|>',
    '<|start_header_id|>',
    '<|end_header_id|>',
    '<|eom_id|>',
    '<|eot_id|>',
    '<|python_tag|>',
    '<|image|>',
  ];
  const out = [...named];
  for (let i = 0; out.length < 256; i++) out.push(`<|reserved_special_token_${2 + i}|>`);
  return out;
}

/** Options that make tokenizerFromTiktoken reproduce Meta's Llama 3 tokenizer. */
export function llama3TiktokenOptions(): TiktokenOptions {
  return {
    pattern: LLAMA3_PATTERN,
    specialTokens: llama3SpecialTokens(),
    bosToken: '<|begin_of_text|>',
    eosToken: '<|end_of_text|>',
    stopTokens: ['<|eom_id|>', '<|eot_id|>'],
    padToken: '<|finetune_right_pad_id|>',
    addBos: true,
  };
}

/** Reads a tiktoken ranks file: token bytes (as a latin1 string, one char per byte) -> rank, in file order. */
export function readTiktokenRanks(path: string): Map<string, number> {
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (e) {
    throw new FormatError(`${path}: cannot read tiktoken ranks file: ${(e as Error).message}`);
  }
  const ranks = new Map<string, number>();
  const lines = text.split('\n');
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i]!.trim();
    if (line === '') continue;
    const sp = line.indexOf(' ');
    const rank = sp > 0 ? Number(line.slice(sp + 1)) : Number.NaN;
    const b64 = line.slice(0, sp);
    if (!Number.isInteger(rank) || rank < 0 || !/^[A-Za-z0-9+/]+={0,2}$/.test(b64)) {
      throw new FormatError(
        `${path}:${i + 1}: expected "<base64 token> <rank>", got ${JSON.stringify(line.slice(0, 80))}`,
      );
    }
    const key = Buffer.from(b64, 'base64').toString('latin1');
    if (ranks.has(key))
      throw new FormatError(`${path}:${i + 1}: token listed twice (ranks ${ranks.get(key)} and ${rank})`);
    ranks.set(key, rank);
  }
  if (ranks.size === 0) throw new FormatError(`${path}: no tokens: not a tiktoken ranks file`);
  return ranks;
}

function byteLevel(latin1: string): string {
  let s = '';
  for (let i = 0; i < latin1.length; i++) s += BYTE_TO_CHAR[latin1.charCodeAt(i)];
  return s;
}

/** The tokenizer.json of a tiktoken vocabulary (ranks as ids) with the given split regex. */
export function tiktokenJson(
  ranks: Map<string, number>,
  pattern: string,
  special: { content: string; id: number }[],
): TokenizerJson {
  const vocab: Record<string, number> = Object.create(null);
  type M = { l: string; r: string; rank: number; lr: number; rr: number };
  const merges: M[] = [];
  for (const [token, rank] of ranks) {
    vocab[byteLevel(token)] = rank;
    if (token.length === 1) continue;
    const local: M[] = [];
    for (let k = 1; k < token.length; k++) {
      const l = token.slice(0, k);
      const r = token.slice(k);
      const lr = ranks.get(l);
      const rr = ranks.get(r);
      if (lr !== undefined && rr !== undefined) local.push({ l, r, rank, lr, rr });
    }
    local.sort((a, b) => a.lr - b.lr || a.rr - b.rr);
    merges.push(...local);
  }
  merges.sort((a, b) => a.rank - b.rank);
  const added: AddedTokenJson[] = special.map((s) => ({
    id: s.id,
    content: s.content,
    single_word: false,
    lstrip: false,
    rstrip: false,
    normalized: false,
    special: true,
  }));
  return {
    version: '1.0',
    added_tokens: added,
    normalizer: null,
    pre_tokenizer: byteLevelPreTokenizer([pattern]),
    post_processor: null,
    decoder: { type: 'ByteLevel', add_prefix_space: true, trim_offsets: true, use_regex: true },
    model: {
      type: 'BPE',
      dropout: null,
      unk_token: null,
      continuing_subword_prefix: null,
      end_of_word_suffix: null,
      fuse_unk: false,
      byte_fallback: false,
      ignore_merges: true,
      vocab,
      merges: merges.map((m) => [byteLevel(m.l), byteLevel(m.r)]),
    },
  };
}

/** Loads a tiktoken ranks file as a Tokenizer (byte-level BPE, the way HF converts Llama 3's tokenizer.model). */
export function tokenizerFromTiktoken(path: string, opts: TiktokenOptions = {}): Tokenizer {
  const ranks = readTiktokenRanks(path);
  let next = 0;
  for (const r of ranks.values()) next = Math.max(next, r + 1);
  const special: { content: string; id: number }[] = [];
  const given = opts.specialTokens ?? [];
  if (Array.isArray(given)) {
    for (const [i, content] of (given as readonly string[]).entries()) special.push({ content, id: next + i });
  } else {
    for (const [content, id] of Object.entries(given as Record<string, number>)) special.push({ content, id });
  }
  const byName = new Map(special.map((s) => [s.content, s.id]));
  const idOf = (name: string | undefined, what: string): number | null => {
    if (name === undefined) return null;
    const id = byName.get(name);
    if (id === undefined) throw new FormatError(`${path}: ${what} '${name}' is not among the special tokens given`);
    return id;
  };
  return new Tokenizer(tiktokenJson(ranks, opts.pattern ?? LLAMA3_PATTERN, special), {
    source: path,
    bosId: idOf(opts.bosToken, 'bosToken'),
    eosId: idOf(opts.eosToken, 'eosToken'),
    extraEosIds: (opts.stopTokens ?? []).map((t) => idOf(t, 'stop token')!),
    padId: idOf(opts.padToken, 'padToken'),
    addBos: opts.addBos ?? false,
    addEos: opts.addEos ?? false,
    chatTemplates: opts.chatTemplate ? { default: opts.chatTemplate } : {},
    cleanUpSpaces: false,
  });
}
