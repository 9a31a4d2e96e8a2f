// The tokenizer every model uses: ids <-> text, special tokens, streaming decode and chat templates.
// Tokenization itself is done by @huggingface/tokenizers from a tokenizer.json object; the loaders in this
// folder (HF model dir, GGUF metadata, SentencePiece .model, tiktoken ranks) only build that object and the
// special-token facts around it, so every source shares the one HF-compatible implementation.

import { Tokenizer as HfTokenizer } from '@huggingface/tokenizers';
import { FormatError, IndexError } from '../core/errors.ts';
import { type ChatMessage, type ChatTemplateOptions, renderChatTemplate } from './chat.ts';

/** One entry of tokenizer.json's `added_tokens`. */
export interface AddedTokenJson {
  id: number;
  content: string;
  single_word?: boolean;
  lstrip?: boolean;
  rstrip?: boolean;
  normalized?: boolean;
  special?: boolean;
}

/** The parts of a Hugging Face tokenizer.json this toolkit builds or reads. */
export interface TokenizerJson {
  version?: string;
  added_tokens: AddedTokenJson[];
  normalizer: Record<string, unknown> | null;
  pre_tokenizer: Record<string, unknown> | null;
  post_processor: Record<string, unknown> | null;
  decoder: Record<string, unknown> | null;
  model: { type?: string; [key: string]: unknown };
  [key: string]: unknown;
}

/** Special-token facts that tokenizer.json alone does not hold; the loaders fill them in. */
export interface TokenizerSpec {
  /** Where the tokenizer came from (a dir, a file): used in error messages. */
  source: string;
  bosId?: number | null;
  /** The primary end-of-sequence id (the one appended when addEos is set). */
  eosId?: number | null;
  /** Further ids that end generation (end-of-turn tokens, generation_config.json's eos list). */
  extraEosIds?: Iterable<number>;
  padId?: number | null;
  unkId?: number | null;
  /** Prepend bosId when encoding with addSpecialTokens. */
  addBos?: boolean;
  /** Append eosId when encoding with addSpecialTokens. */
  addEos?: boolean;
  /** Named chat templates; 'default' is the one used unless another is asked for. */
  chatTemplates?: Record<string, string>;
  /** HF's clean_up_tokenization_spaces for decode() (" ," -> ","). Streaming never cleans up. */
  cleanUpSpaces?: boolean;
  /** tokenizer_config.json-style settings for @huggingface/tokenizers (special-token strings and the like). */
  hfConfig?: Record<string, unknown>;
}

export interface EncodeOptions {
  /** Add BOS/EOS as the tokenizer's add_bos/add_eos settings say (default true). */
  addSpecialTokens?: boolean;
}

export interface DecodeOptions {
  /** Drop special (control) tokens from the text (default false). */
  skipSpecialTokens?: boolean;
}

// A window that ends in U+FFFD is held back until a later token completes the character. A model that
// really emits U+FFFD (or invalid bytes) is released by the next ordinary token; this cap only bounds the
// delay for a long run of them.
const MAX_PENDING_TOKENS = 16;

export class Tokenizer {
  readonly source: string;
  readonly bosId: number | null;
  readonly eosId: number | null;
  /** Every id that ends generation; generation stops on any of them. */
  readonly eosIds: ReadonlySet<number>;
  readonly padId: number | null;
  readonly unkId: number | null;
  readonly addBos: boolean;
  readonly addEos: boolean;
  /** Number of ids (the largest id + 1), added tokens included. */
  readonly vocabSize: number;
  readonly chatTemplates: Readonly<Record<string, string>>;
  /** The underlying @huggingface/tokenizers instance, for what this class does not wrap. */
  readonly hf: HfTokenizer;
  private readonly specialIds: Set<number>;
  private readonly cleanUpSpaces: boolean;

  constructor(json: TokenizerJson, spec: TokenizerSpec) {
    this.source = spec.source;
    const full: TokenizerJson = {
      ...json,
      normalizer: json.normalizer ?? null,
      pre_tokenizer: json.pre_tokenizer ?? null,
      post_processor: json.post_processor ?? null,
      decoder: json.decoder ?? null,
      added_tokens: json.added_tokens ?? [],
    };
    try {
      this.hf = new HfTokenizer(full, { ...(spec.hfConfig ?? {}), clean_up_tokenization_spaces: false });
    } catch (e) {
      throw new FormatError(`${spec.source}: cannot build the tokenizer: ${(e as Error).message}`);
    }
    this.specialIds = new Set(full.added_tokens.filter((t) => t.special).map((t) => t.id));
    const extraSpecial = spec.hfConfig?.additional_special_tokens;
    if (Array.isArray(extraSpecial)) {
      for (const t of extraSpecial) {
        const id = typeof t === 'string' ? this.hf.token_to_id(t) : undefined;
        if (id !== undefined) this.specialIds.add(id);
      }
    }
    let size = this.hf.model?.vocab.length ?? 0;
    for (const t of full.added_tokens) size = Math.max(size, t.id + 1);
    this.vocabSize = size;

    const valid = (id: number | null | undefined): number | null =>
      id !== undefined && id !== null && Number.isInteger(id) && id >= 0 && id < size ? id : null;
    this.bosId = valid(spec.bosId);
    this.eosId = valid(spec.eosId);
    this.padId = valid(spec.padId);
    this.unkId = valid(spec.unkId);
    const eos = new Set<number>();
    if (this.eosId !== null) eos.add(this.eosId);
    for (const id of spec.extraEosIds ?? []) if (valid(id) !== null) eos.add(id);
    this.eosIds = eos;
    this.addBos = (spec.addBos ?? false) && this.bosId !== null;
    this.addEos = (spec.addEos ?? false) && this.eosId !== null;
    this.chatTemplates = { ...(spec.chatTemplates ?? {}) };
    this.cleanUpSpaces = spec.cleanUpSpaces ?? false;
  }

  get bosToken(): string | null {
    return this.bosId === null ? null : (this.idToToken(this.bosId) ?? null);
  }

  get eosToken(): string | null {
    return this.eosId === null ? null : (this.idToToken(this.eosId) ?? null);
  }

  /** Text to ids. Special tokens written in the text (e.g. "<|im_end|>") become their ids, as in HF. */
  encode(text: string, opts: EncodeOptions = {}): number[] {
    const ids = text.length === 0 ? [] : this.hf.encode(text, { add_special_tokens: false }).ids;
    if (opts.addSpecialTokens ?? true) {
      if (this.addBos) ids.unshift(this.bosId!);
      if (this.addEos) ids.push(this.eosId!);
    }
    return ids;
  }

  /** Ids to text. An empty list gives ''. */
  decode(ids: readonly number[], opts: DecodeOptions = {}): string {
    return this.decodeWith(ids, opts.skipSpecialTokens ?? false, this.cleanUpSpaces);
  }

  /** A decoder for streaming: push ids as they are generated, get back only completed text. */
  streamDecoder(opts: DecodeOptions = {}): StreamDecoder {
    return new StreamDecoder(this, opts.skipSpecialTokens ?? false);
  }

  idToToken(id: number): string | undefined {
    return this.hf.id_to_token(id);
  }

  tokenToId(token: string): number | undefined {
    return this.hf.token_to_id(token);
  }

  /** Whether id is a special (control) token: BOS, EOS, chat markers and the like. */
  isSpecial(id: number): boolean {
    return this.specialIds.has(id);
  }

  /** Whether generation should stop at this id. */
  isEos(id: number): boolean {
    return this.eosIds.has(id);
  }

  get hasChatTemplate(): boolean {
    return Object.keys(this.chatTemplates).length > 0;
  }

  /** Renders a conversation with the model's chat template (see ChatTemplateOptions for the choices). */
  applyChatTemplate(messages: readonly ChatMessage[], opts: ChatTemplateOptions = {}): string {
    return renderChatTemplate(
      this.chatTemplates,
      this.source,
      messages,
      {
        bos_token: this.bosToken ?? '',
        eos_token: this.eosToken ?? '',
        ...(this.padId !== null ? { pad_token: this.idToToken(this.padId) } : {}),
        ...(this.unkId !== null ? { unk_token: this.idToToken(this.unkId) } : {}),
      },
      opts,
    );
  }

  /** Renders the chat template and encodes the result. The template writes BOS itself, so none is added. */
  encodeChat(messages: readonly ChatMessage[], opts: ChatTemplateOptions = {}): number[] {
    return this.encode(this.applyChatTemplate(messages, opts), { addSpecialTokens: false });
  }

  /** @internal decode without the option object; StreamDecoder calls it with cleanUp = false. */
  decodeWith(ids: readonly number[], skipSpecial: boolean, cleanUp: boolean): string {
    if (ids.length === 0) return '';
    for (const id of ids) {
      if (!Number.isInteger(id) || id < 0 || id >= this.vocabSize) {
        throw new IndexError(`${this.source}: token id ${id} is out of range (vocabulary has ${this.vocabSize} ids)`);
      }
    }
    return this.hf.decode(ids as number[], {
      skip_special_tokens: skipSpecial,
      clean_up_tokenization_spaces: cleanUp,
    });
  }
}

/**
 * Incremental detokenizer. Decoding one token at a time breaks multibyte characters that span tokens and
 * loses the spaces SentencePiece decoders strip from a first token, so it decodes a short window of recent
 * ids twice (with and without the new ones) and returns the difference once it no longer ends in an
 * incomplete character (U+FFFD). The concatenation of everything returned equals decode(all ids) without
 * the space clean-up.
 */
export class StreamDecoder {
  private readonly ids: number[] = [];
  private prefixOffset = 0;
  private readOffset = 0;
  private emitted = '';

  constructor(
    private readonly tokenizer: Tokenizer,
    private readonly skipSpecial: boolean,
  ) {}

  /** Adds one or more ids; returns the text they completed ('' while a character is still incomplete). */
  push(ids: number | readonly number[]): string {
    if (typeof ids === 'number') this.ids.push(ids);
    else this.ids.push(...ids);
    return this.step(false);
  }

  /** Returns whatever is still pending (an incomplete character comes out as U+FFFD). */
  flush(): string {
    return this.step(true);
  }

  /** All text returned so far. */
  get text(): string {
    return this.emitted;
  }

  private step(force: boolean): string {
    if (this.readOffset === this.ids.length) return '';
    const dec = (a: number, b: number) => this.tokenizer.decodeWith(this.ids.slice(a, b), this.skipSpecial, false);
    const prefixText = dec(this.prefixOffset, this.readOffset);
    const newText = dec(this.prefixOffset, this.ids.length);
    const pending = this.ids.length - this.readOffset;
    if (!force && newText.endsWith('\uFFFD') && pending < MAX_PENDING_TOKENS) return '';
    let out: string;
    if (newText.startsWith(prefixText)) {
      out = newText.slice(prefixText.length);
    } else {
      // The window decoded differently with the new ids (rare: a decoder that looks across tokens).
      // Fall back to the whole sequence so the stream stays equal to a full decode.
      const all = dec(0, this.ids.length);
      out = all.startsWith(this.emitted) ? all.slice(this.emitted.length) : '';
    }
    this.prefixOffset = this.readOffset;
    this.readOffset = this.ids.length;
    this.emitted += out;
    return out;
  }
}
