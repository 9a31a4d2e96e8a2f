// Tokenizers from GGUF metadata (tokenizer.ggml.*). GGUF stores the vocabulary, not a tokenizer.json, so this
// rebuilds the tokenizer.json that Hugging Face uses for the same model: `llama` vocabularies become the
// SentencePiece-BPE conversion (see spm.ts), `gpt2` vocabularies a byte-level BPE with the stored merges and the
// split regexes named by tokenizer.ggml.pre (see pre-tokenizers.ts). Control tokens become special added
// tokens and user-defined ones plain added tokens, as llama.cpp's converter wrote them from tokenizer.json.

import { FormatError } from '../core/errors.ts';
import { parseChatTemplates } from './chat.ts';
import { byteLevelPreTokenizer, preTokenizerRecipe } from './pre-tokenizers.ts';
import { PieceType, spmTokenizerJson } from './spm.ts';
import { type AddedTokenJson, Tokenizer, type TokenizerJson } from './tokenizer.ts';

/** Token texts that end a turn; llama.cpp treats them as end-of-generation when they are control tokens. */
export const END_OF_TURN_TOKENS: readonly string[] = [
  '<|eot_id|>',
  '<|eom_id|>',
  '<|im_end|>',
  '<|end|>',
  '<end_of_turn>',
  '<|endoftext|>',
  '<|end_of_text|>',
  '<EOT>',
  '_<EOT>',
  '<｜end▁of▁sentence｜>',
  '<end_of_utterance>',
  '<|return|>',
  '<|call|>',
];

type Meta = Record<string, unknown>;

function isArrayLike(v: unknown): v is ArrayLike<unknown> {
  return Array.isArray(v) || (ArrayBuffer.isView(v) && !(v instanceof DataView));
}

function num(v: unknown): number | undefined {
  if (typeof v === 'number') return v;
  if (typeof v === 'bigint') return Number(v);
  return undefined;
}

function getArray(meta: Meta, key: string, where: string, required: boolean): ArrayLike<unknown> | undefined {
  const v = meta[key];
  if (v === undefined) {
    if (required) throw new FormatError(`${where}: GGUF metadata has no ${key}`);
    return undefined;
  }
  if (!isArrayLike(v)) throw new FormatError(`${where}: GGUF metadata ${key} must be an array`);
  return v;
}

function getNumbers(meta: Meta, key: string, where: string, n: number): number[] | undefined {
  const a = getArray(meta, key, where, false);
  if (a === undefined) return undefined;
  if (a.length < n) throw new FormatError(`${where}: GGUF metadata ${key} has ${a.length} entries for ${n} tokens`);
  const out = new Array<number>(n);
  for (let i = 0; i < n; i++) {
    const x = num(a[i]);
    if (x === undefined) throw new FormatError(`${where}: GGUF metadata ${key}[${i}] is not a number`);
    out[i] = x;
  }
  return out;
}

function getString(meta: Meta, key: string, where: string): string | undefined {
  const v = meta[key];
  if (v === undefined) return undefined;
  if (typeof v !== 'string') throw new FormatError(`${where}: GGUF metadata ${key} must be a string`);
  return v;
}

function getBool(meta: Meta, key: string): boolean | undefined {
  const v = meta[key];
  if (typeof v === 'boolean') return v;
  const n = num(v);
  return n === undefined ? undefined : n !== 0;
}

export interface GgufTokenizerOptions {
  /** Names the file in error messages (default 'GGUF metadata'). */
  source?: string;
}

/** Builds a Tokenizer from GGUF metadata (the key/value section of a .gguf file, arrays as arrays). */
export function tokenizerFromGguf(metadata: Record<string, unknown>, opts: GgufTokenizerOptions = {}): Tokenizer {
  const where = opts.source ?? 'GGUF metadata';
  const model = getString(metadata, 'tokenizer.ggml.model', where);
  if (model === undefined) {
    throw new FormatError(`${where}: GGUF metadata has no tokenizer.ggml.model, so the file carries no tokenizer`);
  }
  const rawTokens = getArray(metadata, 'tokenizer.ggml.tokens', where, true)!;
  const n = rawTokens.length;
  const seen = new Map<string, number>();
  const tokens = new Array<string>(n);
  for (let i = 0; i < n; i++) {
    const raw = rawTokens[i];
    if (typeof raw !== 'string') throw new FormatError(`${where}: tokenizer.ggml.tokens[${i}] is not a string`);
    const t = raw === '' ? `[EMPTY_${i}]` : raw; // as llama.cpp names empty tokens
    const prev = seen.get(t);
    if (prev !== undefined) {
      throw new FormatError(`${where}: tokenizer.ggml.tokens has '${t}' twice (ids ${prev} and ${i})`);
    }
    seen.set(t, i);
    tokens[i] = t;
  }
  const types = getNumbers(metadata, 'tokenizer.ggml.token_type', where, n) ?? new Array<number>(n).fill(1);
  const id = (key: string): number | null | undefined => {
    const v = metadata[key];
    if (v === undefined) return undefined;
    const x = num(v);
    return x !== undefined && Number.isInteger(x) && x >= 0 && x < n ? x : null;
  };

  let json: TokenizerJson;
  let bos: number | null | undefined = id('tokenizer.ggml.bos_token_id');
  let eos: number | null | undefined = id('tokenizer.ggml.eos_token_id');
  let unk: number | null | undefined = id('tokenizer.ggml.unknown_token_id');
  let addBosDefault: boolean;
  if (model === 'llama') {
    const scores = getNumbers(metadata, 'tokenizer.ggml.scores', where, n) ?? new Array<number>(n).fill(0);
    bos = bos === undefined ? (n > 1 ? 1 : null) : bos; // llama.cpp's SPM defaults
    eos = eos === undefined ? (n > 2 ? 2 : null) : eos;
    unk = unk === undefined ? 0 : unk;
    json = spmTokenizerJson(
      { pieces: tokens, scores, types },
      {
        addDummyPrefix: getBool(metadata, 'tokenizer.ggml.add_space_prefix') ?? true,
        removeExtraWhitespaces: getBool(metadata, 'tokenizer.ggml.remove_extra_whitespaces') ?? false,
        unkToken: unk === null ? null : tokens[unk]!,
      },
    );
    addBosDefault = true;
  } else if (model === 'gpt2') {
    const pre = getString(metadata, 'tokenizer.ggml.pre', where);
    const recipe = preTokenizerRecipe(pre, where);
    const mergesRaw = getArray(metadata, 'tokenizer.ggml.merges', where, true)!;
    const merges = new Array<[string, string]>(mergesRaw.length);
    for (let i = 0; i < mergesRaw.length; i++) {
      const m = mergesRaw[i];
      const cut = typeof m === 'string' ? m.indexOf(' ', 1) : -1;
      if (typeof m !== 'string' || cut < 0) {
        throw new FormatError(`${where}: tokenizer.ggml.merges[${i}] is not "left right": ${JSON.stringify(m)}`);
      }
      merges[i] = [m.slice(0, cut), m.slice(cut + 1)];
    }
    json = byteLevelBpeJson(tokens, types, merges, recipe.regexes, {
      ignoreMerges: recipe.ignoreMerges ?? false,
      nfc: recipe.nfc ?? false,
    });
    addBosDefault = recipe.addBos ?? false;
  } else {
    throw new FormatError(
      `${where}: tokenizer.ggml.model '${model}' is not supported (supported: 'llama' SentencePiece BPE, 'gpt2' byte-level BPE)`,
    );
  }

  const extraEos: number[] = [];
  for (const key of ['tokenizer.ggml.eot_token_id', 'tokenizer.ggml.eom_token_id']) {
    const x = id(key);
    if (x !== undefined && x !== null) extraEos.push(x);
  }
  for (const t of END_OF_TURN_TOKENS) {
    const i = seen.get(t);
    if (i !== undefined && types[i] === PieceType.CONTROL) extraEos.push(i);
  }

  const templates: Record<string, string> = {};
  for (const [key, value] of Object.entries(metadata)) {
    if (key === 'tokenizer.chat_template') Object.assign(templates, parseChatTemplates(value, `${where} ${key}`));
    else if (key.startsWith('tokenizer.chat_template.') && typeof value === 'string') {
      templates[key.slice('tokenizer.chat_template.'.length)] = value;
    }
  }

  return new Tokenizer(json, {
    source: where,
    bosId: bos,
    eosId: eos,
    extraEosIds: extraEos,
    padId: id('tokenizer.ggml.padding_token_id'),
    unkId: unk,
    addBos: getBool(metadata, 'tokenizer.ggml.add_bos_token') ?? addBosDefault,
    addEos: getBool(metadata, 'tokenizer.ggml.add_eos_token') ?? false,
    chatTemplates: templates,
    cleanUpSpaces: false,
  });
}

/**
 * The tokenizer.json of a byte-level BPE (GPT-2 family) vocabulary: tokens in byte-level spelling, merges as
 * pairs, split regexes applied before byte-level spelling. Control tokens (type 3) become special added tokens,
 * user-defined ones (type 4) non-special added tokens matched in raw text.
 */
export function byteLevelBpeJson(
  tokens: readonly string[],
  types: ArrayLike<number>,
  merges: [string, string][],
  regexes: readonly string[],
  opts: { ignoreMerges?: boolean; nfc?: boolean } = {},
): TokenizerJson {
  const vocab: Record<string, number> = Object.create(null);
  const added: AddedTokenJson[] = [];
  for (let i = 0; i < tokens.length; i++) {
    vocab[tokens[i]!] = i;
    const t = types[i];
    if (t === PieceType.CONTROL || t === PieceType.USER_DEFINED || t === PieceType.UNKNOWN) {
      added.push({
        id: i,
        content: tokens[i]!,
        single_word: false,
        lstrip: false,
        rstrip: false,
        normalized: false,
        special: t !== PieceType.USER_DEFINED,
      });
    }
  }
  return {
    version: '1.0',
    added_tokens: added,
    normalizer: opts.nfc ? { type: 'NFC' } : null,
    pre_tokenizer: byteLevelPreTokenizer(regexes),
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
      ignore_merges: opts.ignoreMerges ?? false,
      vocab,
      merges,
    },
  };
}
