// SentencePiece BPE vocabularies (Llama 1/2, Mistral v1, TinyStories' tok512...), from a .model protobuf file
// or from GGUF `llama` metadata. Both become the tokenizer.json that transformers' LlamaConverter writes:
// a BPE model with byte fallback over the pieces, merges derived from the piece scores, spaces written as
// '▁' with one prepended (SentencePiece's add_dummy_prefix), and a decoder that undoes all of that.

import { readFileSync } from 'node:fs';
import { FormatError } from '../core/errors.ts';
import { type AddedTokenJson, Tokenizer, type TokenizerJson } from './tokenizer.ts';

/** SentencePiece piece types (ModelProto.SentencePiece.Type); GGUF's tokenizer.ggml.token_type uses the same numbers. */
export const PieceType = { NORMAL: 1, UNKNOWN: 2, CONTROL: 3, USER_DEFINED: 4, UNUSED: 5, BYTE: 6 } as const;

export interface SpmVocab {
  pieces: readonly string[];
  scores: ArrayLike<number>;
  types: ArrayLike<number>;
}

export interface SpmOptions {
  /** SentencePiece add_dummy_prefix: write a '▁' before the text (default true). */
  addDummyPrefix?: boolean;
  /** SentencePiece remove_extra_whitespaces: trim and collapse runs of spaces (default false). */
  removeExtraWhitespaces?: boolean;
  /** The unknown piece (default: the piece of type UNKNOWN, else none). */
  unkToken?: string | null;
}

/**
 * BPE merges in the order transformers' SentencePiece conversion (generate_merges) produces them: every split
 * of every piece into two pieces that are both in the vocabulary, ordered by the whole piece's score (higher
 * first), then by the left and right parts' lengths (longer first); ties keep vocabulary order, and splits of
 * one piece are ordered by the ids of their parts. Lengths are in code points, as Python counts them.
 */
export function spmMerges(pieces: readonly string[], scores: ArrayLike<number>): [string, string][] {
  const id = new Map<string, number>();
  for (let i = 0; i < pieces.length; i++) id.set(pieces[i]!, i);
  type M = { l: string; r: string; score: number; ll: number; rl: number };
  const merges: M[] = [];
  for (let i = 0; i < pieces.length; i++) {
    const piece = pieces[i]!;
    if (id.get(piece) !== i) continue; // a duplicated piece counts once
    const chars = Array.from(piece);
    if (chars.length < 2) continue;
    const score = scores[id.get(piece)!] ?? 0;
    const local: M[] = [];
    let left = '';
    for (let k = 1; k < chars.length; k++) {
      left += chars[k - 1];
      const right = chars.slice(k).join('');
      if (id.has(left) && id.has(right)) local.push({ l: left, r: right, score, ll: k, rl: chars.length - k });
    }
    local.sort((a, b) => id.get(a.l)! - id.get(b.l)! || id.get(a.r)! - id.get(b.r)!);
    merges.push(...local);
  }
  merges.sort((a, b) => b.score - a.score || b.ll - a.ll || b.rl - a.rl);
  return merges.map((m) => [m.l, m.r]);
}

/** Builds the HF tokenizer.json for a SentencePiece BPE vocabulary. */
export function spmTokenizerJson(vocab: SpmVocab, opts: SpmOptions = {}): TokenizerJson {
  const { pieces, scores, types } = vocab;
  const addDummyPrefix = opts.addDummyPrefix ?? true;
  const v: Record<string, number> = Object.create(null);
  for (let i = 0; i < pieces.length; i++) v[pieces[i]!] = i;
  const added: AddedTokenJson[] = [];
  let unk: string | null = null;
  for (let i = 0; i < pieces.length; i++) {
    const t = types[i] ?? PieceType.NORMAL;
    if (t === PieceType.UNKNOWN) unk ??= pieces[i]!;
    if (t === PieceType.UNKNOWN || t === PieceType.CONTROL || t === PieceType.USER_DEFINED) {
      // Control pieces are special; user-defined ones are matched whole in text but are ordinary text
      // (transformers adds them with special=False).
      added.push({
        id: i,
        content: pieces[i]!,
        single_word: false,
        lstrip: false,
        rstrip: false,
        normalized: false,
        special: t !== PieceType.USER_DEFINED,
      });
    }
  }
  const unkToken = opts.unkToken === undefined ? unk : opts.unkToken;
  const normalizers: Record<string, unknown>[] = [];
  if (opts.removeExtraWhitespaces) {
    // SentencePiece trims and collapses spaces only (not newlines or tabs).
    normalizers.push({ type: 'Replace', pattern: { Regex: '\\A +| +\\z' }, content: '' });
    normalizers.push({ type: 'Replace', pattern: { Regex: ' {2,}' }, content: ' ' });
  }
  if (addDummyPrefix) normalizers.push({ type: 'Prepend', prepend: '▁' });
  normalizers.push({ type: 'Replace', pattern: { String: ' ' }, content: '▁' });
  const decoders: Record<string, unknown>[] = [
    { type: 'Replace', pattern: { String: '▁' }, content: ' ' },
    { type: 'ByteFallback' },
    { type: 'Fuse' },
  ];
  if (addDummyPrefix) decoders.push({ type: 'Strip', content: ' ', start: 1, stop: 0 });
  return {
    version: '1.0',
    added_tokens: added,
    normalizer: { type: 'Sequence', normalizers },
    pre_tokenizer: null,
    post_processor: null,
    decoder: { type: 'Sequence', decoders },
    model: {
      type: 'BPE',
      dropout: null,
      unk_token: unkToken,
      continuing_subword_prefix: null,
      end_of_word_suffix: null,
      fuse_unk: true,
      byte_fallback: true,
      ignore_merges: false,
      vocab: v,
      merges: spmMerges(pieces, scores),
    },
  };
}

// ---- SentencePiece ModelProto (protobuf) ----

export interface SpmModelProto {
  pieces: string[];
  scores: Float32Array;
  types: Int32Array;
  /** TrainerSpec.model_type: 1 unigram, 2 BPE, 3 word, 4 char. */
  modelType: number;
  byteFallback: boolean;
  unkId: number;
  bosId: number;
  eosId: number;
  padId: number;
  addDummyPrefix: boolean;
  removeExtraWhitespaces: boolean;
  normalizerName: string;
}

class ProtoReader {
  pos: number;
  constructor(
    readonly buf: Uint8Array,
    readonly where: string,
    start = 0,
    readonly end = buf.length,
  ) {
    this.pos = start;
  }
  varint(): bigint {
    let result = 0n;
    let shift = 0n;
    for (;;) {
      if (this.pos >= this.end) throw new FormatError(`${this.where}: truncated protobuf varint`);
      const b = this.buf[this.pos++]!;
      result |= BigInt(b & 0x7f) << shift;
      if ((b & 0x80) === 0) return result;
      shift += 7n;
      if (shift > 63n) throw new FormatError(`${this.where}: malformed protobuf varint`);
    }
  }
  int32(): number {
    return Number(BigInt.asIntN(32, this.varint()));
  }
  len(): number {
    const n = Number(this.varint());
    if (this.pos + n > this.end) throw new FormatError(`${this.where}: protobuf field runs past its message`);
    return n;
  }
  skip(wire: number): void {
    if (wire === 0) this.varint();
    else if (wire === 1) this.pos += 8;
    else if (wire === 2) {
      const n = this.len();
      this.pos += n;
    } else if (wire === 5) this.pos += 4;
    else throw new FormatError(`${this.where}: unsupported protobuf wire type ${wire}`);
    if (this.pos > this.end) throw new FormatError(`${this.where}: truncated protobuf message`);
  }
}

const utf8 = new TextDecoder('utf-8', { fatal: true });

/** Parses a SentencePiece .model file (a serialized ModelProto). */
export function parseSentencePieceModel(bytes: Uint8Array, where: string): SpmModelProto {
  const out: SpmModelProto = {
    pieces: [],
    scores: new Float32Array(0),
    types: new Int32Array(0),
    modelType: 1,
    byteFallback: false,
    unkId: 0,
    bosId: 1,
    eosId: 2,
    padId: -1,
    addDummyPrefix: true,
    removeExtraWhitespaces: true,
    normalizerName: '',
  };
  const scores: number[] = [];
  const types: number[] = [];
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const str = (r: ProtoReader) => {
    const n = r.len();
    try {
      return utf8.decode(bytes.subarray(r.pos, (r.pos += n)));
    } catch {
      throw new FormatError(`${where}: a string field is not valid UTF-8 at byte ${r.pos - n}`);
    }
  };
  const top = new ProtoReader(bytes, where);
  while (top.pos < top.end) {
    const key = Number(top.varint());
    const field = key >>> 3;
    const wire = key & 7;
    if (field === 1 && wire === 2) {
      const n = top.len();
      const r = new ProtoReader(bytes, where, top.pos, top.pos + n);
      let piece: string | null = null;
      let score = 0;
      let type = 1;
      while (r.pos < r.end) {
        const k = Number(r.varint());
        if (k === (1 << 3) + 2) piece = str(r);
        else if (k === (2 << 3) + 5) {
          score = view.getFloat32(r.pos, true);
          r.pos += 4;
        } else if (k === (3 << 3) + 0) type = r.int32();
        else r.skip(k & 7);
      }
      if (piece === null) throw new FormatError(`${where}: piece ${out.pieces.length} has no text`);
      out.pieces.push(piece);
      scores.push(score);
      types.push(type);
      top.pos += n;
    } else if ((field === 2 || field === 3) && wire === 2) {
      const n = top.len();
      const r = new ProtoReader(bytes, where, top.pos, top.pos + n);
      while (r.pos < r.end) {
        const k = Number(r.varint());
        const f = k >>> 3;
        const w = k & 7;
        if (field === 2 && w === 0 && f === 3) out.modelType = r.int32();
        else if (field === 2 && w === 0 && f === 35) out.byteFallback = r.varint() !== 0n;
        else if (field === 2 && w === 0 && f === 40) out.unkId = r.int32();
        else if (field === 2 && w === 0 && f === 41) out.bosId = r.int32();
        else if (field === 2 && w === 0 && f === 42) out.eosId = r.int32();
        else if (field === 2 && w === 0 && f === 43) out.padId = r.int32();
        else if (field === 3 && w === 2 && f === 1) out.normalizerName = str(r);
        else if (field === 3 && w === 0 && f === 3) out.addDummyPrefix = r.varint() !== 0n;
        else if (field === 3 && w === 0 && f === 4) out.removeExtraWhitespaces = r.varint() !== 0n;
        else r.skip(w);
      }
      top.pos += n;
    } else {
      top.skip(wire);
    }
  }
  if (out.pieces.length === 0) throw new FormatError(`${where}: no pieces: not a SentencePiece model file`);
  out.scores = Float32Array.from(scores);
  out.types = Int32Array.from(types);
  return out;
}

/** Loads a SentencePiece BPE .model file (e.g. Llama 2's tokenizer.model) as a Tokenizer. */
export function tokenizerFromSentencePieceModel(
  path: string,
  opts: { chatTemplate?: string; addBos?: boolean; addEos?: boolean } = {},
): Tokenizer {
  let bytes: Uint8Array;
  try {
    bytes = readFileSync(path);
  } catch (e) {
    throw new FormatError(`${path}: cannot read SentencePiece model: ${(e as Error).message}`);
  }
  const m = parseSentencePieceModel(bytes, path);
  if (m.modelType !== 2) {
    const kind = ['', 'unigram', 'BPE', 'word', 'char'][m.modelType] ?? String(m.modelType);
    throw new FormatError(
      `${path}: trainer_spec.model_type is ${kind}; only SentencePiece BPE models are supported (convert it to tokenizer.json with transformers)`,
    );
  }
  if (m.normalizerName !== '' && m.normalizerName !== 'identity') {
    throw new FormatError(
      `${path}: normalizer_spec.name is '${m.normalizerName}'; only the 'identity' normalizer is supported (use the model's tokenizer.json)`,
    );
  }
  const json = spmTokenizerJson(m, {
    addDummyPrefix: m.addDummyPrefix,
    removeExtraWhitespaces: m.removeExtraWhitespaces,
    unkToken: m.unkId >= 0 && m.unkId < m.pieces.length ? m.pieces[m.unkId]! : null,
  });
  const id = (i: number) => (i >= 0 && i < m.pieces.length ? i : null);
  return new Tokenizer(json, {
    source: path,
    bosId: id(m.bosId),
    eosId: id(m.eosId),
    padId: id(m.padId),
    unkId: id(m.unkId),
    addBos: opts.addBos ?? true,
    addEos: opts.addEos ?? false,
    chatTemplates: opts.chatTemplate ? { default: opts.chatTemplate } : {},
  });
}
