// The tokenizer written beside random-init preset models: byte-level BPE over the 256 bytes (no merges),
// with <unk>, <s>, </s> and ChatML turn markers as special tokens, and a ChatML chat template. It encodes
// any text exactly (one token per byte), which is what tests and benchmarks on random models need.

import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { BYTE_TO_CHAR } from './byte-level.ts';
import { CHATML_TEMPLATE } from './chat.ts';
import { byteLevelBpeJson } from './gguf.ts';
import { GPT2_PATTERN } from './pre-tokenizers.ts';
import { PieceType } from './spm.ts';

const SPECIALS = ['<unk>', '<s>', '</s>', '<|im_start|>', '<|im_end|>'];

export function writeByteLevelTokenizer(dir: string, vocabSize: number): void {
  const tokens = [...SPECIALS, ...BYTE_TO_CHAR];
  if (tokens.length > vocabSize)
    throw new Error(`vocab_size ${vocabSize} is smaller than the ${tokens.length} base tokens`);
  const types = tokens.map((_, i) => (i < SPECIALS.length ? PieceType.CONTROL : PieceType.NORMAL));
  const json = byteLevelBpeJson(tokens, types, [], [GPT2_PATTERN]);
  writeFileSync(join(dir, 'tokenizer.json'), JSON.stringify(json));
  const cfg = {
    bos_token: '<s>',
    eos_token: '<|im_end|>',
    unk_token: '<unk>',
    pad_token: '</s>',
    add_bos_token: true,
    add_eos_token: false,
    chat_template: CHATML_TEMPLATE,
    model_max_length: 2048,
    tokenizer_class: 'PreTrainedTokenizerFast',
  };
  writeFileSync(join(dir, 'tokenizer_config.json'), `${JSON.stringify(cfg, null, 2)}\n`);
}
