// The tokenizer layer: one Tokenizer class (HF-compatible, via @huggingface/tokenizers) built from any source.

export { BYTE_TO_CHAR, bytesToByteLevel, textToByteLevel } from './byte-level.ts';
export {
  CHATML_TEMPLATE,
  type ChatMessage,
  type ChatTemplateOptions,
  parseChatTemplates,
  renderChatTemplate,
} from './chat.ts';
export { byteLevelBpeJson, END_OF_TURN_TOKENS, type GgufTokenizerOptions, tokenizerFromGguf } from './gguf.ts';
export { loadTokenizer, tokenizerFromHfDir } from './hf.ts';
export {
  byteLevelPreTokenizer,
  GPT2_PATTERN,
  knownPreTokenizers,
  LLAMA3_PATTERN,
  type PreTokenizerRecipe,
  preTokenizerRecipe,
  QWEN2_PATTERN,
} from './pre-tokenizers.ts';
export {
  PieceType,
  parseSentencePieceModel,
  type SpmModelProto,
  type SpmOptions,
  type SpmVocab,
  spmMerges,
  spmTokenizerJson,
  tokenizerFromSentencePieceModel,
} from './spm.ts';
export {
  llama3SpecialTokens,
  llama3TiktokenOptions,
  readTiktokenRanks,
  type TiktokenOptions,
  tiktokenJson,
  tokenizerFromTiktoken,
} from './tiktoken.ts';
export {
  type AddedTokenJson,
  type DecodeOptions,
  type EncodeOptions,
  StreamDecoder,
  Tokenizer,
  type TokenizerJson,
  type TokenizerSpec,
} from './tokenizer.ts';
