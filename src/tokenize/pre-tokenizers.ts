// Byte-level BPE pre-tokenization per GGUF `tokenizer.ggml.pre` name. A GGUF vocabulary keeps only the name of
// the pre-tokenizer its model used; the split regexes per name are the ones llama.cpp uses (src/llama-vocab.cpp),
// written in their original tokenizer.json form where llama.cpp rewrote them for its own regex engine. Each
// regex splits every piece further and keeps the text between matches (HF's Split, behavior "Isolated"), as
// llama.cpp's unicode_regex_split does; then the pieces are spelled as bytes (HF's ByteLevel, use_regex false).

import { FormatError } from '../core/errors.ts';

export interface PreTokenizerRecipe {
  /** Split regexes applied in turn (Oniguruma/HF syntax). */
  regexes: readonly string[];
  /** Words already in the vocabulary are not broken into merges (tiktoken behaviour; Llama 3). */
  ignoreMerges?: boolean;
  /** llama.cpp's default for add_bos when the GGUF does not say. */
  addBos?: boolean;
  /** The HF tokenizer.json of these models has an NFC normalizer. */
  nfc?: boolean;
}

/** GPT-2's split regex (also the one HF's ByteLevel pre-tokenizer applies). */
export const GPT2_PATTERN = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";
/** Llama 3's split regex (tiktoken cl100k-style, numbers in groups of up to 3). */
export const LLAMA3_PATTERN =
  "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
/** Qwen 2 / 2.5 / 3's split regex (single digits). */
export const QWEN2_PATTERN =
  "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
const QWEN35_PATTERN =
  "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?[\\p{L}\\p{M}]+|\\p{N}| ?[^\\s\\p{L}\\p{M}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
// GPT-2's regex without the final \s+ (llama.cpp's form; the unmatched rest is kept either way).
const GPT2_CORE = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)";
const TEKKEN_PATTERN =
  '[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+|[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+';
const GPT4O_PATTERN =
  "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
const DEEPSEEK3_MAIN =
  '[!"#$%&\'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\\r\\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+';
const BLOOM_PATTERN = ' ?[^(\\s|.,!?…。，、।۔،)]+';

const GPT2: PreTokenizerRecipe = { regexes: [GPT2_PATTERN] };
const LLAMA3: PreTokenizerRecipe = { regexes: [LLAMA3_PATTERN], ignoreMerges: true, addBos: true };
const LLAMA3_REGEX_ONLY: PreTokenizerRecipe = { regexes: [LLAMA3_PATTERN] };
const STARCODER: PreTokenizerRecipe = { regexes: ['\\p{N}', GPT2_PATTERN] };
const QWEN2: PreTokenizerRecipe = { regexes: [QWEN2_PATTERN], nfc: true };
const QWEN2_NO_NFC: PreTokenizerRecipe = { regexes: [QWEN2_PATTERN] };
const DEEPSEEK3: PreTokenizerRecipe = { regexes: ['\\p{N}{1,3}', '[一-龥぀-ゟ゠-ヿ]+', DEEPSEEK3_MAIN] };
const GPT4O: PreTokenizerRecipe = { regexes: [GPT4O_PATTERN] };

const RECIPES: Record<string, PreTokenizerRecipe> = {
  default: { regexes: ['[\\p{P}\\$\\+<=>\\^~\\|]+', GPT2_CORE, '\\p{N}+', '[0-9][0-9][0-9]'] },
  llama3: LLAMA3,
  'llama-v3': LLAMA3,
  'llama-bpe': LLAMA3,
  falcon3: LLAMA3,
  'falcon-h1': LLAMA3,
  pixtral: LLAMA3,
  'midm-2.0': LLAMA3,
  lfm2: LLAMA3,
  'jina-v5-nano': LLAMA3,
  dbrx: LLAMA3_REGEX_ONLY,
  'smaug-bpe': LLAMA3_REGEX_ONLY,
  glm4: LLAMA3_REGEX_ONLY,
  'chatglm-bpe': LLAMA3_REGEX_ONLY,
  'deepseek-coder': { regexes: ['[\\r\\n]', '\\s?\\p{L}+', '\\s?\\p{P}+', '[一-龥ࠀ-一가-퟿]+', '\\p{N}'] },
  'deepseek-v3': DEEPSEEK3,
  'hunyuan-dense': DEEPSEEK3,
  'joyai-llm': DEEPSEEK3,
  hy_v4: DEEPSEEK3,
  falcon: { regexes: ['[\\p{P}\\$\\+<=>\\^~\\|`]+', GPT2_CORE, '[0-9][0-9][0-9]'] },
  mpt: { regexes: [GPT2_PATTERN], nfc: true }, // the GPT-NeoX tokenizer normalizes to NFC
  starcoder: STARCODER,
  refact: STARCODER,
  'command-r': STARCODER,
  smollm: STARCODER,
  codeshell: STARCODER,
  exaone: STARCODER,
  'minerva-7b': STARCODER,
  mellum2: STARCODER,
  'gpt-2': GPT2,
  'phi-2': GPT2,
  'jina-es': GPT2,
  'jina-de': GPT2,
  gigachat: GPT2,
  'jina-v2-es': GPT2,
  'jina-v2-de': GPT2,
  'jina-v1-en': GPT2,
  'jina-v2-code': GPT2,
  'roberta-bpe': GPT2,
  'a.x-4.0': GPT2,
  mellum: GPT2,
  'modern-bert': GPT2,
  olmo: GPT2,
  jais: GPT2,
  trillion: GPT2,
  'granite-docling': GPT2,
  exaone4: GPT2,
  qwen2: QWEN2,
  'deepseek-r1-qwen': QWEN2,
  kormo: QWEN2_NO_NFC,
  f2llmv2: QWEN2_NO_NFC,
  megrez: QWEN2_NO_NFC,
  stablelm2: QWEN2_NO_NFC,
  hunyuan: QWEN2_NO_NFC,
  'solar-open': QWEN2_NO_NFC,
  'grok-2': QWEN2_NO_NFC,
  qwen35: { regexes: [QWEN35_PATTERN], nfc: true },
  tekken: { regexes: [TEKKEN_PATTERN], ignoreMerges: true, addBos: true },
  'gpt-4o': GPT4O,
  llama4: GPT4O,
  kanana2: GPT4O,
  talkie: GPT4O,
  'minimax-m2': GPT4O,
  'seed-coder': {
    regexes: [
      "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1}| ?[^\\s\\p{L}\\p{N}\\r\\n]+|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    ],
  },
  bailingmoe: {
    regexes: [
      "'(?i:[sdmt]|ll|ve|re)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]|\\s+(?!\\S)|\\s+",
    ],
  },
  bloom: { regexes: [BLOOM_PATTERN] },
  'poro-chat': { regexes: [BLOOM_PATTERN] },
  'gpt3-finnish': { regexes: [BLOOM_PATTERN] },
  viking: { regexes: [BLOOM_PATTERN, '\\p{N}'] },
  minicpm5: {
    regexes: [
      '\\p{N}{1,3}',
      "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}+| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    ],
    ignoreMerges: true,
  },
  ufakzeka: {
    regexes: ['[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+'],
  },
};
RECIPES.bailingmoe2 = RECIPES.bailingmoe!;
RECIPES['llada-moe'] = RECIPES.bailingmoe!;

/** The names of the GGUF pre-tokenizers this module knows. */
export function knownPreTokenizers(): string[] {
  return Object.keys(RECIPES).sort();
}

/** The recipe for a `tokenizer.ggml.pre` value; a missing value means llama.cpp's 'default'. */
export function preTokenizerRecipe(pre: string | undefined, where: string): PreTokenizerRecipe {
  const recipe = RECIPES[pre === undefined || pre === '' ? 'default' : pre];
  if (!recipe) {
    throw new FormatError(
      `${where}: tokenizer.ggml.pre '${pre}' is not a supported pre-tokenizer (known: ${knownPreTokenizers().join(', ')})`,
    );
  }
  return recipe;
}

/** The tokenizer.json pre_tokenizer for byte-level BPE with these split regexes. */
export function byteLevelPreTokenizer(regexes: readonly string[]): Record<string, unknown> {
  return {
    type: 'Sequence',
    pretokenizers: [
      ...regexes.map((r) => ({ type: 'Split', pattern: { Regex: r }, behavior: 'Isolated', invert: false })),
      { type: 'ByteLevel', add_prefix_space: false, trim_offsets: false, use_regex: false },
    ],
  };
}
