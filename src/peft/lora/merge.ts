// Exporting a merged model: as a Hugging Face dir (config.json + model.safetensors + tokenizer files) or as a
// GGUF file for llama.cpp (its tensor names, q/k rows permuted for its rope layout, metadata copied from a GGUF
// source or built from the HF config and a byte-level BPE tokenizer.json).

import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import type { DType } from '../../core/dtype.ts';
import { ConfigError, FormatError } from '../../core/errors.ts';
import {
  type GgufTypedValue,
  type GgufTypeSpec,
  type GgufValue,
  type GgufWriteTensor,
  readGguf,
  writeGguf,
} from '../../formats/gguf.ts';
import type { ModelConfig } from '../../models/config.ts';
import type { LlamaForCausalLM } from '../../models/llama.ts';
import { hfToGgufName, permuteRope } from '../../models/load.ts';
import { saveModelHF } from '../../models/save.ts';
import { preTokenizerRecipe } from '../../tokenize/pre-tokenizers.ts';
import { LoraEmbedding, LoraLinear, ModulesToSaveWrapper } from './layer.ts';

function checkPlain(model: LlamaForCausalLM): void {
  for (const [n, m] of model.namedModules())
    if (m instanceof LoraLinear || m instanceof LoraEmbedding || m instanceof ModulesToSaveWrapper)
      throw new ConfigError(`export: '${n}' still holds adapters; call mergeAndUnload() first`);
}

/** Writes a (merged, unloaded) model as an HF dir; tokenizer files are copied from `tokenizerFrom` (an HF dir). */
export async function saveMergedHF(
  model: LlamaForCausalLM,
  dir: string,
  opts: { dtype?: DType; tokenizerFrom?: string | null } = {},
): Promise<void> {
  checkPlain(model);
  await saveModelHF(model.namedParameters(), model.config, dir, {
    dtype: opts.dtype,
    tokenizerFrom: opts.tokenizerFrom ?? undefined,
  });
}

export type GgufFloatType = 'F32' | 'F16' | 'BF16';
const FILE_TYPE: Record<GgufFloatType, number> = { F32: 0, F16: 1, BF16: 32 };

export interface GgufExportOptions {
  /** Tensor type of the matrices (1-D tensors stay F32, as llama.cpp's converter does). Default F32. */
  type?: GgufFloatType;
  /** A GGUF file whose metadata (hyperparameters, tokenizer) is copied. */
  metadataFrom?: string | null;
  /** An HF dir whose tokenizer.json / tokenizer_config.json give the tokenizer metadata. */
  tokenizerDir?: string | null;
  name?: string;
}

/** The tensors of a model under llama.cpp's names (q and k rows permuted for llama/mistral). */
export function ggufTensors(model: LlamaForCausalLM, type: GgufFloatType = 'F32'): GgufWriteTensor[] {
  checkPlain(model);
  const c = model.config;
  const permute = c.architecture === 'llama' || c.architecture === 'mistral';
  const out: GgufWriteTensor[] = [];
  for (const [name, t] of model.namedParameters()) {
    const g = hfToGgufName(name);
    if (!g) throw new FormatError(`export: no llama.cpp name for tensor '${name}'`);
    const shape = [...t.shape];
    out.push({
      name: g,
      shape,
      type: shape.length === 1 ? 'F32' : type,
      data: () => {
        const v = t.toF32();
        if (permute && /\.attn_q\.weight$/.test(g)) return permuteRope(v, shape[0]!, shape[1]!, c.num_attention_heads);
        if (permute && /\.attn_k\.weight$/.test(g)) return permuteRope(v, shape[0]!, shape[1]!, c.num_key_value_heads);
        return v;
      },
    });
  }
  return out;
}

const u32 = (value: number): GgufTypedValue => ({ type: 'u32', value });
const f32 = (value: number): GgufTypedValue => ({ type: 'f32', value });

/** llama.cpp's hyperparameter keys for a Llama-family config. */
export function ggufHparams(
  c: ModelConfig,
  type: GgufFloatType,
  name?: string,
): Record<string, GgufValue | GgufTypedValue> {
  const a = c.architecture;
  if (c.rope_scaling && c.rope_scaling.rope_type !== 'linear')
    throw new ConfigError(`export: GGUF export of '${c.rope_scaling.rope_type}' rope scaling is not supported`);
  const md: Record<string, GgufValue | GgufTypedValue> = {
    'general.architecture': a,
    'general.name': name ?? a,
    'general.file_type': u32(FILE_TYPE[type]),
    [`${a}.vocab_size`]: u32(c.vocab_size),
    [`${a}.context_length`]: u32(c.max_position_embeddings),
    [`${a}.embedding_length`]: u32(c.hidden_size),
    [`${a}.block_count`]: u32(c.num_hidden_layers),
    [`${a}.feed_forward_length`]: u32(c.intermediate_size),
    [`${a}.attention.head_count`]: u32(c.num_attention_heads),
    [`${a}.attention.head_count_kv`]: u32(c.num_key_value_heads),
    [`${a}.attention.layer_norm_rms_epsilon`]: f32(c.rms_norm_eps),
    [`${a}.rope.freq_base`]: f32(c.rope_theta),
    [`${a}.rope.dimension_count`]: u32(c.rotary_dim),
  };
  if (c.head_dim !== c.hidden_size / c.num_attention_heads) {
    md[`${a}.attention.key_length`] = u32(c.head_dim);
    md[`${a}.attention.value_length`] = u32(c.head_dim);
  }
  const rs = c.rope_scaling;
  if (rs && rs.rope_type === 'linear') {
    md[`${a}.rope.scaling.type`] = 'linear';
    md[`${a}.rope.scaling.factor`] = f32(Number(rs.factor));
  }
  return md;
}

function readJson(file: string): Record<string, unknown> {
  try {
    return JSON.parse(readFileSync(file, 'utf8')) as Record<string, unknown>;
  } catch (e) {
    throw new FormatError(`${file}: invalid JSON: ${(e as Error).message}`);
  }
}

/** The Split regexes of a byte-level tokenizer.json pre-tokenizer (ByteLevel with use_regex = GPT-2's regex). */
function splitRegexes(pre: Record<string, unknown> | null, file: string): string[] {
  const fail = (): never => {
    throw new ConfigError(
      `${file}: GGUF export needs a byte-level BPE tokenizer (pre_tokenizer ${JSON.stringify(pre)?.slice(0, 120)})`,
    );
  };
  if (!pre) return fail();
  if (pre.type === 'ByteLevel') return pre.use_regex === false ? [] : ['GPT2'];
  if (pre.type !== 'Sequence' || !Array.isArray(pre.pretokenizers)) return fail();
  const out: string[] = [];
  for (const p of pre.pretokenizers as Record<string, unknown>[]) {
    if (p.type === 'Split') {
      const pat = p.pattern as { Regex?: string } | undefined;
      if (!pat?.Regex) return fail();
      out.push(pat.Regex);
    } else if (p.type === 'ByteLevel') {
      if (p.use_regex !== false) out.push('GPT2');
    } else if (p.type !== 'Digits') return fail();
  }
  return out;
}

/** Which llama.cpp pre-tokenizer name has exactly these split regexes. */
function preTokenizerName(regexes: string[], nfc: boolean, file: string): string {
  const candidates = [
    'gpt-2',
    'llama-bpe',
    'qwen2',
    'default',
    'smollm',
    'gpt-4o',
    'tekken',
    'deepseek-v3',
    'dbrx',
    'mpt',
    'stablelm2',
  ];
  for (const name of candidates) {
    const r = preTokenizerRecipe(name, file);
    const want = r.regexes.map((x) => (x === preTokenizerRecipe('gpt-2', file).regexes[0] ? 'GPT2' : x));
    const got = regexes.map((x) => (x === preTokenizerRecipe('gpt-2', file).regexes[0] ? 'GPT2' : x));
    if (want.length === got.length && want.every((x, i) => x === got[i]) && (r.nfc ?? false) === nfc) return name;
  }
  throw new ConfigError(
    `${file}: the tokenizer's split regexes match no llama.cpp pre-tokenizer known here; export from a GGUF source instead`,
  );
}

/** tokenizer.ggml.* metadata from an HF dir with a byte-level BPE tokenizer.json. */
export function ggufTokenizerFromHF(dir: string, config: ModelConfig): Record<string, GgufValue | GgufTypedValue> {
  const file = join(dir, 'tokenizer.json');
  if (!existsSync(file)) throw new ConfigError(`${dir}: no tokenizer.json to put in the GGUF file`);
  const tj = readJson(file);
  const model = tj.model as {
    type?: string;
    vocab?: Record<string, number>;
    merges?: unknown[];
    byte_fallback?: boolean;
  };
  if (model?.type !== 'BPE' || model.byte_fallback)
    throw new ConfigError(
      `${file}: GGUF export from an HF dir needs a byte-level BPE tokenizer; export from a GGUF source instead`,
    );
  const regexes = splitRegexes(tj.pre_tokenizer as Record<string, unknown> | null, file);
  const nfc = (tj.normalizer as { type?: string } | null)?.type === 'NFC';
  const pre = preTokenizerName(regexes, nfc, file);
  const added = (tj.added_tokens ?? []) as { id: number; content: string; special?: boolean }[];
  let n = config.vocab_size;
  for (const id of Object.values(model.vocab ?? {})) n = Math.max(n, id + 1);
  for (const t of added) n = Math.max(n, t.id + 1);
  const tokens = new Array<string>(n).fill('');
  const types = new Array<number>(n).fill(1);
  for (const [tok, id] of Object.entries(model.vocab ?? {})) tokens[id] = tok;
  for (const t of added) {
    tokens[t.id] = t.content;
    types[t.id] = t.special === false ? 4 : 3;
  }
  for (let i = 0; i < n; i++)
    if (tokens[i] === '') {
      tokens[i] = `[PAD${i}]`;
      types[i] = 5;
    }
  const merges = (model.merges ?? []).map((m) => (Array.isArray(m) ? m.join(' ') : String(m)));
  const tc = existsSync(join(dir, 'tokenizer_config.json')) ? readJson(join(dir, 'tokenizer_config.json')) : {};
  const md: Record<string, GgufValue | GgufTypedValue> = {
    'tokenizer.ggml.model': 'gpt2',
    'tokenizer.ggml.pre': pre,
    'tokenizer.ggml.tokens': tokens,
    'tokenizer.ggml.token_type': { type: { array: 'i32' }, value: types },
  };
  md['tokenizer.ggml.merges'] = { type: { array: 'string' }, value: merges };
  const idOf = (key: string, fallback: number | number[] | null): number | null => {
    const v = tc[key];
    const s = typeof v === 'string' ? v : v && typeof v === 'object' ? (v as { content?: string }).content : undefined;
    if (s !== undefined) {
      const i = tokens.indexOf(s);
      if (i >= 0) return i;
    }
    const f = Array.isArray(fallback) ? fallback[0] : fallback;
    return typeof f === 'number' ? f : null;
  };
  const bos = idOf('bos_token', config.bos_token_id);
  const eos = idOf('eos_token', config.eos_token_id);
  const pad = idOf('pad_token', config.pad_token_id);
  if (bos !== null) md['tokenizer.ggml.bos_token_id'] = u32(bos);
  if (eos !== null) md['tokenizer.ggml.eos_token_id'] = u32(eos);
  if (pad !== null) md['tokenizer.ggml.padding_token_id'] = u32(pad);
  if (typeof tc.add_bos_token === 'boolean') md['tokenizer.ggml.add_bos_token'] = tc.add_bos_token;
  if (typeof tc.add_eos_token === 'boolean') md['tokenizer.ggml.add_eos_token'] = tc.add_eos_token;
  const jinja = join(dir, 'chat_template.jinja');
  const tmpl = existsSync(jinja)
    ? readFileSync(jinja, 'utf8')
    : typeof tc.chat_template === 'string'
      ? tc.chat_template
      : null;
  if (tmpl) md['tokenizer.chat_template'] = tmpl;
  return md;
}

/** Writes a (merged, unloaded) model as one GGUF file. */
export async function saveMergedGguf(
  model: LlamaForCausalLM,
  file: string,
  opts: GgufExportOptions = {},
): Promise<void> {
  const type = opts.type ?? 'F32';
  let metadata: Record<string, GgufValue | GgufTypedValue>;
  let types: Record<string, GgufTypeSpec> | undefined;
  if (opts.metadataFrom) {
    const g = readGguf(opts.metadataFrom);
    try {
      metadata = { ...g.metadata };
      types = { ...g.metadataTypes };
    } finally {
      g.close();
    }
    delete metadata['general.alignment'];
    delete types['general.alignment'];
    metadata['general.file_type'] = FILE_TYPE[type];
    types['general.file_type'] = 'u32';
  } else {
    metadata = ggufHparams(model.config, type, opts.name);
    if (opts.tokenizerDir) Object.assign(metadata, ggufTokenizerFromHF(opts.tokenizerDir, model.config));
  }
  await writeGguf(file, { metadata, types, tensors: ggufTensors(model, type) });
}
