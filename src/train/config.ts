// The training config: an Axolotl-style YAML file, validated with zod, normalised into one typed object.
//
// Keys and defaults follow Axolotl (src/axolotl/utils/schemas/*.py) where Axolotl has a default, then the
// Hugging Face Trainer (TrainingArguments), then PEFT (LoraConfig). Each key's default and its source are
// documented on TrainConfig below. Deviations are deliberate and marked "lowrank:".
//
// Errors are ConfigError and point at the place: `config.yaml:12:3: unknown key 'lora_rr' (did you mean
// 'lora_r'?)`, `config.yaml:4:9: lora_r: expected an integer, got "eight" (a string)`. Values from
// `--set key=value` are reported as `--set key`.

import { existsSync, readFileSync } from 'node:fs';
import { homedir } from 'node:os';
import path from 'node:path';
import { type Document, isMap, isScalar, isSeq, LineCounter, parseDocument, parse as parseYaml, stringify } from 'yaml';
import { z } from 'zod';
import { ConfigError } from '../core/errors.ts';

// ---------------------------------------------------------------------------------------------------------
// The typed, normalised config
// ---------------------------------------------------------------------------------------------------------

/** The data formats the pipeline implements (src/train/data-format.ts). */
export type DatasetType = 'text' | 'completion' | 'alpaca' | 'chat' | 'input_output';

/** One entry of `datasets:` or `test_datasets:`. */
export interface DatasetConfig {
  /** A local .jsonl/.ndjson, .json, .csv or .tsv file; relative paths resolve against the config's folder. */
  path: string;
  /**
   * The record format. Accepted spellings: `text`; `completion` (Axolotl's name: records are {text} like
   * `text`, or TRL's {prompt, completion}; the first record decides for the whole file); `alpaca`;
   * `chat` or `chat_template` (Axolotl's name); `input_output` (Axolotl's {segments: [{text, label}]}).
   */
  type: DatasetType;
  /** For a .json file that is an object of splits ({"train": [...], "test": [...]}): which one. Default 'train'. */
  split: string;
  /** Forces the reader instead of guessing from the extension (Axolotl's `ds_type`). */
  ds_type: 'json' | 'jsonl' | 'csv' | 'tsv' | null;
  /** text / completion-as-text: the text field (Axolotl `field`). Default 'text'. */
  field: string;
  /** completion: the prompt and completion fields. Defaults 'prompt', 'completion' (TRL's names). */
  field_prompt: string;
  field_completion: string;
  /** alpaca: field names (Axolotl's user-defined prompter names). Defaults 'instruction', 'input', 'output'. */
  field_instruction: string;
  field_input: string;
  field_output: string;
  /** chat: the messages list field (Axolotl `field_messages`). Default 'messages'. */
  field_messages: string;
  /** chat: which message property holds the role and the content (Axolotl). Default {role: 'role', content: 'content'}. */
  message_property_mappings: { role: string; content: string };
  /** chat: a per-message boolean that forces a turn to be trained or not (Axolotl). Default none. */
  message_field_training: string | null;
  /** chat: target role -> source roles (Axolotl). Default {user: [human, user], assistant: [gpt, assistant], system: [system], tool: [tool]}. */
  roles: Record<string, string[]>;
  /** chat: roles whose turns carry loss (Axolotl). Default ['assistant']. A message with `weight: 0` is not trained. */
  roles_to_train: string[];
  /** chat: which EOS tokens carry loss: the one closing each trained turn (default), all, the last, none (Axolotl). */
  train_on_eos: 'turn' | 'all' | 'last' | 'none';
}

export type AdapterKind = 'lora' | 'dora' | 'qlora' | 'full';

export interface TrainConfig {
  // --- model and adapter ---
  /** Required. A local HF model dir, a .gguf file (both resolved against the config's folder), or a hub id / hf://owner/repo. */
  base_model: string;
  /**
   * lora | dora | qlora | full. Input also accepts `none` (and a missing/null key, as in Axolotl) for full
   * fine-tuning. Normalised: `lora` + `load_in_4bit: true` becomes `qlora`; `lora` + `peft_use_dora: true`
   * becomes `dora` (QDoRA is `dora` + `load_in_4bit`). Invariant: qlora => load_in_4bit; load_in_4bit => qlora | dora.
   */
  adapter: AdapterKind;
  /** An existing adapter to start from (Axolotl). Default null. */
  lora_model_dir: string | null;
  /** LoRA rank. Axolotl has no default; PEFT's is 8. */
  lora_r: number;
  /** LoRA alpha; scale = alpha/r (alpha/sqrt(r) with rsLoRA). Axolotl has no default; PEFT's is 8. */
  lora_alpha: number;
  /** Default 0 (Axolotl, PEFT). */
  lora_dropout: number;
  /**
   * Module names to adapt, or 'all-linear' (`lora_target_linear: true`, every linear layer but lm_head).
   * Default when neither key is set: PEFT's default for llama-family models, ['q_proj', 'v_proj'].
   */
  lora_target_modules: string[] | 'all-linear';
  /** Modules trained in full and saved alongside the adapter (e.g. embed_tokens, lm_head). Default []. */
  lora_modules_to_save: string[];
  /** rsLoRA scaling alpha/sqrt(r). Also spelled `peft_use_rslora` (Axolotl). Default false. */
  use_rslora: boolean;
  /** Load the frozen base in 4 bits (bitsandbytes-compatible). Implied by adapter: qlora. Default false. */
  load_in_4bit: boolean;
  /** nf4 | fp4. Default nf4 (Axolotl's QLoRA setting; transformers' own default is fp4). */
  bnb_4bit_quant_type: 'nf4' | 'fp4';
  /** Quantise the absmax constants too. Default true (Axolotl's QLoRA setting). */
  bnb_4bit_use_double_quant: boolean;
  /** The dtype 4-bit weights are dequantised to. Default 'auto' (lowrank: f32 on the CPU, bf16 on CUDA). */
  bnb_4bit_compute_dtype: 'auto' | 'float32' | 'bfloat16' | 'float16';

  // --- data ---
  datasets: DatasetConfig[];
  /** A separate evaluation set (Axolotl). Exclusive with val_set_size > 0. Default []. */
  test_datasets: DatasetConfig[];
  /** Held-out share of the training examples: a fraction in [0, 1) or a whole count >= 1. Default 0 (Axolotl). */
  val_set_size: number;
  /** Maximum tokens per example (and per packed row). Default 512 (Axolotl). */
  sequence_len: number;
  /**
   * What to do with an example longer than sequence_len: truncate (keep the start), drop, or raise.
   * Default 'truncate' (lowrank: Axolotl's default is 'drop', which silently shrinks the dataset; TRL truncates).
   */
  excess_length_strategy: 'truncate' | 'drop' | 'raise';
  /** Pack several examples into each row, without cross-attention. Default false (Axolotl). */
  sample_packing: boolean;
  /** Pack the evaluation set too. Default: sample_packing (Axolotl). */
  eval_sample_packing: boolean;
  /** Pad every batch to sequence_len rather than to its longest row. Default: sample_packing (Axolotl). */
  pad_to_sequence_len: boolean;
  /** Compute the loss on prompt/user/system tokens too. Default false (Axolotl). */
  train_on_inputs: boolean;
  /** A chat template name (tokenizer_default, chatml, ...) for the tokenizer module to resolve. Default null = the tokenizer's. */
  chat_template: string | null;
  /** A Jinja chat template; the key accepts the template text or a path to a file, and holds the text. Default null. */
  chat_template_jinja: string | null;
  /** Special token overrides: bos_token, eos_token, pad_token, unk_token (Axolotl). Default {}. */
  special_tokens: { bos_token?: string; eos_token?: string; pad_token?: string; unk_token?: string };

  // --- optimisation ---
  /** Rows per forward pass. Default 1 (Axolotl). */
  micro_batch_size: number;
  /** Rows per evaluation batch. Default: micro_batch_size (Axolotl). */
  eval_batch_size: number;
  /** Micro batches per optimizer step. Default 1 (Axolotl); derived from `batch_size` / micro_batch_size if that is given. */
  gradient_accumulation_steps: number;
  /** Default 1 (Axolotl); may be fractional. Ignored when max_steps is set (HF Trainer). */
  num_epochs: number;
  /** Optimizer steps to run; overrides num_epochs (HF Trainer). Default null. */
  max_steps: number | null;
  /** Required (Axolotl has no default). Typical: 2e-4 for LoRA, 2e-5 for full fine-tuning. */
  learning_rate: number;
  /** constant | linear | cosine (`constant_with_warmup` is accepted as `constant`). Default cosine (Axolotl). */
  lr_scheduler: 'constant' | 'linear' | 'cosine';
  /** Cosine floor as a fraction of learning_rate (Axolotl). Default 0. */
  cosine_min_lr_ratio: number;
  /** Default null; with warmup_ratio also null, Axolotl's rule applies: min(floor(0.03 * total steps), 100). */
  warmup_steps: number | null;
  /** In [0, 1); exclusive with warmup_steps. Default null. */
  warmup_ratio: number | null;
  /**
   * adamw | sgd. HF names are accepted: adamw_torch, adamw_torch_fused (Axolotl's default), adamw_hf, adamw,
   * adam; the 8-bit and paged variants (adamw_bnb_8bit, adamw_8bit, paged_adamw_8bit, paged_adamw_32bit) map
   * to 32-bit AdamW with a warning.
   */
  optimizer: 'adamw' | 'sgd';
  /** Defaults 0.9, 0.999, 1e-8 (HF Trainer). */
  adam_beta1: number;
  adam_beta2: number;
  adam_epsilon: number;
  /** Decoupled weight decay. Default 0 (Axolotl, HF Trainer). */
  weight_decay: number;
  /** Clip the global gradient norm; 0 disables. Default 1.0 (HF Trainer). */
  max_grad_norm: number;
  /** Recompute activations in backward. Default false (Axolotl). */
  gradient_checkpointing: boolean;
  /** Default 42 (HF Trainer; Axolotl passes none, so the Trainer's applies). */
  seed: number;

  // --- output, evaluation, logging ---
  /** Default './model-out' (Axolotl), resolved against the config's folder. */
  output_dir: string;
  /** Save every N steps, or a fraction (< 1) of total steps (HF). Exclusive with saves_per_epoch. Null with both null: at each epoch end. */
  save_steps: number | null;
  saves_per_epoch: number | null;
  /** Keep at most N checkpoints. Default null = all (HF). */
  save_total_limit: number | null;
  /** Evaluate every N steps or a fraction (< 1) of total steps. Exclusive with evals_per_epoch. Null with both null: at each epoch end. */
  eval_steps: number | null;
  evals_per_epoch: number | null;
  /** Default null = Axolotl's rule max(1, min(10, floor(0.005 * total steps))). */
  logging_steps: number | null;
  /** Stop after N evaluations without improvement of eval_loss. Needs evaluation data. Default null. */
  early_stopping_patience: number | null;
  /** A checkpoint dir to resume from. Default null. */
  resume_from_checkpoint: string | null;
  /**
   * The task metric computed by generation after training, base model and fine-tuned side by side (lowrank):
   * auto (JSON references: json_f1; short labels: accuracy; else exact_match), exact_match, accuracy, json_f1,
   * style, or none to skip. Default auto.
   */
  eval_metric: 'auto' | 'exact_match' | 'accuracy' | 'json_f1' | 'style' | 'none';
  /** Strings a styled output contains; adds the style metric (lowrank). Default []. */
  eval_markers: string[];
  /** Evaluation examples generated for the task metrics (lowrank). Default 50. */
  eval_max_examples: number;

  // --- where it came from ---
  /** The absolute path of the YAML file ('' when parsed from an object). Not a YAML key. */
  config_path: string;
  /** Non-fatal remarks: ignored Axolotl keys, max_steps overriding num_epochs, ... Not a YAML key. */
  warnings: string[];
}

// ---------------------------------------------------------------------------------------------------------
// The zod schema for the raw YAML (before normalisation)
// ---------------------------------------------------------------------------------------------------------

/** Accepts numbers written as strings ("2e-4"), as Axolotl does for learning_rate (PyYAML reads 2e-4 as a string). */
const numeric = (schema: z.ZodNumber) =>
  z.preprocess((v) => (typeof v === 'string' && v.trim() !== '' && Number.isFinite(Number(v)) ? Number(v) : v), schema);

/** Integer keys carry this message so that a string given for one says 'expected an integer', not 'a number'. */
const INT_MESSAGE = 'expected an integer';
const posInt = () => z.int({ error: INT_MESSAGE }).min(1);
const nonNegInt = () => z.int({ error: INT_MESSAGE }).min(0);
const nameList = () => z.array(z.string().min(1));

const DATASET_TYPE_NAMES = ['text', 'completion', 'alpaca', 'chat', 'chat_template', 'input_output'] as const;

const datasetSchema = z.strictObject({
  path: z.string().min(1),
  type: z.enum(DATASET_TYPE_NAMES),
  split: z.string().min(1).optional(),
  ds_type: z.enum(['json', 'jsonl', 'csv', 'tsv']).optional(),
  field: z.string().min(1).optional(),
  field_prompt: z.string().min(1).optional(),
  field_completion: z.string().min(1).optional(),
  field_instruction: z.string().min(1).optional(),
  field_input: z.string().min(1).optional(),
  field_output: z.string().min(1).optional(),
  field_messages: z.string().min(1).optional(),
  message_property_mappings: z.record(z.string(), z.string().min(1)).optional(),
  message_field_role: z.string().min(1).optional(),
  message_field_content: z.string().min(1).optional(),
  message_field_training: z.string().min(1).optional(),
  roles: z.record(z.string(), nameList()).optional(),
  roles_to_train: nameList().optional(),
  train_on_eos: z.enum(['turn', 'all', 'last', 'none']).optional(),
});
type RawDataset = z.output<typeof datasetSchema>;

/** Which dataset keys mean something for which type (others get a warning). */
const DATASET_KEYS_FOR: Record<DatasetType, readonly string[]> = {
  text: ['field'],
  completion: ['field', 'field_prompt', 'field_completion'],
  alpaca: ['field_instruction', 'field_input', 'field_output'],
  chat: [
    'field_messages',
    'message_property_mappings',
    'message_field_role',
    'message_field_content',
    'message_field_training',
    'roles',
    'roles_to_train',
    'train_on_eos',
  ],
  input_output: [],
};
const DATASET_COMMON_KEYS = ['path', 'type', 'split', 'ds_type'];

const rawSchema = z.strictObject({
  base_model: z.string().min(1),
  adapter: z.enum(['lora', 'qlora', 'dora', 'none', 'full']).nullable().optional(),
  lora_model_dir: z.string().min(1).optional(),
  lora_r: posInt().optional(),
  lora_alpha: numeric(z.number().gt(0)).optional(),
  lora_dropout: numeric(z.number().min(0).lt(1)).optional(),
  lora_target_modules: z
    .union([z.string().min(1), nameList()], { error: 'expected a module name or a list of module names' })
    .optional(),
  lora_target_linear: z.boolean().optional(),
  lora_modules_to_save: nameList().optional(),
  use_rslora: z.boolean().optional(),
  peft_use_rslora: z.boolean().optional(),
  peft_use_dora: z.boolean().optional(),
  load_in_4bit: z.boolean().optional(),
  load_in_8bit: z.boolean().optional(),
  bnb_4bit_quant_type: z.enum(['nf4', 'fp4']).optional(),
  bnb_4bit_use_double_quant: z.boolean().optional(),
  bnb_4bit_compute_dtype: z.enum(['auto', 'float32', 'bfloat16', 'float16']).optional(),

  datasets: z.array(datasetSchema).min(1),
  test_datasets: z.array(datasetSchema).min(1).optional(),
  val_set_size: numeric(z.number().min(0)).optional(),
  sequence_len: posInt().optional(),
  excess_length_strategy: z.enum(['truncate', 'drop', 'raise']).optional(),
  sample_packing: z.boolean().optional(),
  eval_sample_packing: z.boolean().optional(),
  pad_to_sequence_len: z.boolean().optional(),
  train_on_inputs: z.boolean().optional(),
  chat_template: z.string().min(1).optional(),
  chat_template_jinja: z.string().min(1).optional(),
  special_tokens: z
    .strictObject({
      bos_token: z.string().optional(),
      eos_token: z.string().optional(),
      pad_token: z.string().optional(),
      unk_token: z.string().optional(),
    })
    .optional(),

  micro_batch_size: posInt().optional(),
  eval_batch_size: posInt().optional(),
  gradient_accumulation_steps: posInt().optional(),
  batch_size: posInt().optional(),
  num_epochs: numeric(z.number().gt(0)).optional(),
  max_steps: posInt().optional(),
  learning_rate: numeric(z.number().gt(0)),
  lr_scheduler: z.enum(['constant', 'constant_with_warmup', 'linear', 'cosine']).optional(),
  cosine_min_lr_ratio: numeric(z.number().min(0).max(1)).optional(),
  warmup_steps: nonNegInt().optional(),
  warmup_ratio: numeric(z.number().min(0).lt(1)).optional(),
  optimizer: z.string().min(1).optional(),
  adam_beta1: numeric(z.number().min(0).lt(1)).optional(),
  adam_beta2: numeric(z.number().min(0).lt(1)).optional(),
  adam_epsilon: numeric(z.number().gt(0)).optional(),
  weight_decay: numeric(z.number().min(0)).optional(),
  max_grad_norm: numeric(z.number().min(0)).optional(),
  gradient_checkpointing: z.boolean().optional(),
  seed: nonNegInt().optional(),

  output_dir: z.string().min(1).optional(),
  save_steps: numeric(z.number().gt(0)).optional(),
  saves_per_epoch: posInt().optional(),
  save_total_limit: posInt().optional(),
  eval_steps: numeric(z.number().gt(0)).optional(),
  evals_per_epoch: posInt().optional(),
  logging_steps: posInt().optional(),
  early_stopping_patience: posInt().optional(),
  resume_from_checkpoint: z.string().min(1).optional(),
  eval_metric: z.enum(['auto', 'exact_match', 'accuracy', 'json_f1', 'style', 'none']).optional(),
  eval_markers: z.array(z.string().min(1)).optional(),
  eval_max_examples: posInt().optional(),
});
type RawConfig = z.output<typeof rawSchema>;

/** Keys of the YAML file, for did-you-mean. */
export const TRAIN_CONFIG_KEYS: readonly string[] = Object.keys(rawSchema.shape);
const DATASET_KEYS: readonly string[] = Object.keys(datasetSchema.shape);

/**
 * Axolotl keys that have no effect in lowrank (precision flags, attention backends, trackers, distributed
 * training, kernels that are always on). They are accepted with a warning, so Axolotl configs load.
 */
const IGNORED_AXOLOTL_KEYS: Record<string, string> = Object.fromEntries(
  [
    ['bf16', 'compute is f32 on the CPU and chosen by the backend on CUDA'],
    ['fp16', 'compute is f32 on the CPU and chosen by the backend on CUDA'],
    ['tf32', 'compute is f32 on the CPU and chosen by the backend on CUDA'],
    ['bfloat16', 'compute is f32 on the CPU and chosen by the backend on CUDA'],
    ['float16', 'compute is f32 on the CPU and chosen by the backend on CUDA'],
    ['flash_attention', 'lowrank has one fused attention op (packing-aware)'],
    ['sdp_attention', 'lowrank has one fused attention op (packing-aware)'],
    ['xformers_attention', 'lowrank has one fused attention op (packing-aware)'],
    ['flex_attention', 'lowrank has one fused attention op (packing-aware)'],
    ['eager_attention', 'lowrank has one fused attention op (packing-aware)'],
    ['attn_implementation', 'lowrank has one fused attention op (packing-aware)'],
    ['flash_attn_cross_entropy', 'the cross-entropy is always fused'],
    ['flash_attn_rms_norm', 'rmsnorm is always fused'],
    ['lora_mlp_kernel', 'LoRA kernels are always fused'],
    ['lora_qkv_kernel', 'LoRA kernels are always fused'],
    ['lora_o_kernel', 'LoRA kernels are always fused'],
    ['unsloth_cross_entropy_loss', 'the cross-entropy is always fused'],
    ['unsloth_lora_mlp', 'LoRA kernels are always fused'],
    ['unsloth_lora_qkv', 'LoRA kernels are always fused'],
    ['unsloth_lora_o', 'LoRA kernels are always fused'],
    ['unsloth_rms_norm', 'rmsnorm is always fused'],
    ['unsloth_rope', 'rope is always fused'],
    ['model_type', 'the architecture is read from the model files'],
    ['tokenizer_type', 'the tokenizer is read from the model files'],
    ['base_model_config', 'the model config is read from base_model'],
    ['trust_remote_code', 'no remote code is ever run'],
    ['is_llama_derived_model', 'the architecture is read from the model files'],
    ['is_mistral_derived_model', 'the architecture is read from the model files'],
    ['is_qwen_derived_model', 'the architecture is read from the model files'],
    ['strict', 'not used'],
    ['dataset_prepared_path', 'data is prepared in memory each run'],
    ['dataset_processes', 'data is prepared in one process'],
    ['shuffle_merged_datasets', 'training rows are always shuffled per epoch with the seed'],
    ['lora_fan_in_fan_out', 'only nn.Linear-style weights are supported'],
    ['gradient_checkpointing_kwargs', 'not used'],
    ['group_by_length', 'not used'],
    ['resize_token_embeddings_to_32x', 'not used'],
    ['low_cpu_mem_usage', 'weights are always loaded lazily'],
    ['torch_compile', 'no torch'],
    ['torch_compile_backend', 'no torch'],
    ['deepspeed', 'single-device training'],
    ['fsdp', 'single-device training'],
    ['fsdp_config', 'single-device training'],
    ['ddp_timeout', 'single-device training'],
    ['ddp_find_unused_parameters', 'single-device training'],
    ['local_rank', 'single-device training'],
    ['dataloader_num_workers', 'data is prepared in memory'],
    ['dataloader_pin_memory', 'data is prepared in memory'],
    ['dataloader_prefetch_factor', 'data is prepared in memory'],
    ['wandb_project', 'metrics are written as JSONL in output_dir'],
    ['wandb_entity', 'metrics are written as JSONL in output_dir'],
    ['wandb_name', 'metrics are written as JSONL in output_dir'],
    ['wandb_watch', 'metrics are written as JSONL in output_dir'],
    ['wandb_log_model', 'metrics are written as JSONL in output_dir'],
    ['wandb_run_id', 'metrics are written as JSONL in output_dir'],
    ['wandb_mode', 'metrics are written as JSONL in output_dir'],
    ['use_tensorboard', 'metrics are written as JSONL in output_dir'],
    ['use_mlflow', 'metrics are written as JSONL in output_dir'],
    ['mlflow_tracking_uri', 'metrics are written as JSONL in output_dir'],
    ['mlflow_experiment_name', 'metrics are written as JSONL in output_dir'],
    ['hub_model_id', 'nothing is uploaded'],
    ['hub_strategy', 'nothing is uploaded'],
    ['push_dataset_to_hub', 'nothing is uploaded'],
    ['hf_use_auth_token', 'nothing is uploaded'],
    ['include_tokens_per_second', 'tokens/s is always logged'],
    ['include_tkps', 'tokens/s is always logged'],
    ['save_safetensors', 'adapters are always saved as safetensors'],
    ['debug', 'not used'],
  ].map(([k, why]) => [k, why as string]),
);

const OPTIMIZER_ALIASES: Record<string, { to: 'adamw' | 'sgd'; warn?: string }> = {
  adamw: { to: 'adamw' },
  adamw_torch: { to: 'adamw' },
  adamw_torch_fused: { to: 'adamw' },
  adamw_hf: { to: 'adamw' },
  adam: { to: 'adamw' },
  sgd: { to: 'sgd' },
  adamw_bnb_8bit: { to: 'adamw', warn: '8-bit optimizer states are not available in lowrank' },
  adamw_8bit: { to: 'adamw', warn: '8-bit optimizer states are not available in lowrank' },
  paged_adamw_8bit: { to: 'adamw', warn: 'paged and 8-bit optimizer states are not available in lowrank' },
  paged_adamw_32bit: { to: 'adamw', warn: 'paged optimizer states are not available in lowrank' },
};

const DEFAULT_ROLES: Record<string, string[]> = {
  user: ['human', 'user'],
  assistant: ['gpt', 'assistant'],
  system: ['system'],
  tool: ['tool'],
};

// ---------------------------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------------------------

/**
 * Reads, validates and normalises a training config.
 * @param file the YAML file; relative paths inside it resolve against its folder.
 * @param overrides `key=value` strings (the CLI's --set): dotted keys reach into mappings and lists
 *   (`datasets.0.path=x.jsonl`), values are parsed as YAML (`2e-4`, `true`, `[q_proj, v_proj]`), an empty
 *   value removes the key (back to its default). Paths given here resolve against the current directory.
 */
export function loadTrainConfig(file: string, overrides: readonly string[] = []): TrainConfig {
  const abs = path.resolve(file);
  let text: string;
  try {
    text = readFileSync(abs, 'utf8');
  } catch (e) {
    throw new ConfigError(`cannot read training config ${file}: ${(e as NodeJS.ErrnoException).code ?? e}`);
  }
  return parseTrainConfigText(text, abs, overrides);
}

/** As loadTrainConfig, from YAML text; `file` names it in messages and anchors relative paths. */
export function parseTrainConfigText(text: string, file: string, overrides: readonly string[] = []): TrainConfig {
  const lineCounter = new LineCounter();
  const doc = parseDocument(text, { lineCounter, prettyErrors: false, uniqueKeys: true });
  if (doc.errors.length > 0) {
    const err = doc.errors[0]!;
    const pos = err.linePos?.[0] ?? lineCounter.linePos(err.pos[0]);
    const where = `${file}:${pos.line}:${pos.col}`;
    throw new ConfigError(`${where}: YAML syntax error: ${err.message.split('\n')[0]}`);
  }
  const raw: unknown = doc.toJS();
  if (raw === null || raw === undefined) throw new ConfigError(`${file}: the training config is empty`);
  if (typeof raw !== 'object' || Array.isArray(raw)) {
    throw new ConfigError(
      `${file}:1:1: the training config must be a mapping of keys (base_model: ..., datasets: ...)`,
    );
  }
  const locate = (p: readonly PropertyKey[], key: boolean): string => {
    const offset = nodeOffset(doc, p, key);
    if (offset === undefined) return file;
    const { line, col } = lineCounter.linePos(offset);
    return `${file}:${line}:${col}`;
  };
  return parseTrainConfig(raw as Record<string, unknown>, {
    file,
    baseDir: path.dirname(path.resolve(file)),
    overrides,
    locate,
  });
}

export interface ParseOptions {
  /** Names the source in messages. */
  file?: string;
  /** Relative paths in the object resolve against this folder. Default: the current directory. */
  baseDir?: string;
  /** `key=value` overrides, as for loadTrainConfig. */
  overrides?: readonly string[];
  /** Maps a key path to `file:line:col` (set by parseTrainConfigText). */
  locate?: (path: readonly PropertyKey[], key: boolean) => string;
}

/** Validates and normalises an already-parsed config object. */
export function parseTrainConfig(input: Record<string, unknown>, opts: ParseOptions = {}): TrainConfig {
  const file = opts.file ?? '<config>';
  const baseDir = opts.baseDir ?? process.cwd();
  const obj = structuredClone(input);
  const overridden = applyOverrides(obj, opts.overrides ?? [], file);
  const where = (p: readonly PropertyKey[], key = false): string => {
    const dotted = p.join('.');
    for (const o of overridden) if (dotted === o || dotted.startsWith(`${o}.`)) return `--set ${o}`;
    return opts.locate ? opts.locate(p, key) : file;
  };

  const warnings: string[] = [];
  for (const key of Object.keys(obj)) {
    if (key in IGNORED_AXOLOTL_KEYS) {
      warnings.push(`${where([key], true)}: '${key}' has no effect in lowrank (${IGNORED_AXOLOTL_KEYS[key]})`);
      delete obj[key];
    }
  }

  const parsed = rawSchema.safeParse(obj);
  if (!parsed.success) {
    const problems = parsed.error.issues.flatMap((issue) => describeIssue(issue, obj, where));
    throw configProblems(file, problems);
  }
  const pathBase = (p: readonly PropertyKey[]): string => (where(p).startsWith('--set ') ? process.cwd() : baseDir);
  return normalise(parsed.data, { file, where, pathBase, warnings });
}

function configProblems(file: string, problems: string[]): ConfigError {
  if (problems.length === 1) return new ConfigError(problems[0]!);
  return new ConfigError(`${file}: ${problems.length} problems in the training config:\n  ${problems.join('\n  ')}`);
}

// ---------------------------------------------------------------------------------------------------------
// Overrides (--set key=value)
// ---------------------------------------------------------------------------------------------------------

/** Applies `key=value` overrides in place; returns the dotted keys it set. */
export function applyOverrides(
  obj: Record<string, unknown>,
  overrides: readonly string[],
  file = '<config>',
): string[] {
  const done: string[] = [];
  for (const o of overrides) {
    const eq = o.indexOf('=');
    if (eq <= 0) throw new ConfigError(`--set expects key=value (e.g. --set learning_rate=1e-4), got '${o}'`);
    const key = o.slice(0, eq).trim();
    const text = o.slice(eq + 1);
    let value: unknown;
    try {
      value = parseYaml(text);
    } catch {
      value = text; // not valid YAML on its own (e.g. 'a: b: c'): take it as a plain string
    }
    const segs = key.split('.');
    if (segs.some((s) => s === '')) throw new ConfigError(`--set ${key}: empty segment in the dotted key`);
    let node: unknown = obj;
    for (let i = 0; i < segs.length - 1; i++) {
      const seg = segs[i]!;
      const here = segs.slice(0, i + 1).join('.');
      const child = getChild(node, seg, key, here);
      if (child === undefined || child === null) {
        // Create a missing mapping on the way (e.g. --set special_tokens.eos_token=...).
        const created = /^\d+$/.test(segs[i + 1]!) ? [] : {};
        setChild(node, seg, created, key, here);
        node = created;
      } else if (typeof child !== 'object') {
        throw new ConfigError(
          `--set ${key}: '${here}' is ${describeValue(child)} in ${file}, not a mapping or list to set '${segs[i + 1]}' in`,
        );
      } else {
        node = child;
      }
    }
    const last = segs[segs.length - 1]!;
    if (value === null) deleteChild(node, last, key);
    else setChild(node, last, value, key, key);
    done.push(key);
  }
  return done;
}

function getChild(node: unknown, seg: string, key: string, here: string): unknown {
  if (Array.isArray(node)) {
    const i = listIndex(seg, node.length, key, here, true);
    return node[i];
  }
  return (node as Record<string, unknown>)[seg];
}

function setChild(node: unknown, seg: string, value: unknown, key: string, here: string): void {
  if (Array.isArray(node)) node[listIndex(seg, node.length, key, here, true)] = value;
  else (node as Record<string, unknown>)[seg] = value;
}

function deleteChild(node: unknown, seg: string, key: string): void {
  if (Array.isArray(node)) node.splice(listIndex(seg, node.length, key, key, false), 1);
  else delete (node as Record<string, unknown>)[seg];
}

function listIndex(seg: string, length: number, key: string, here: string, allowAppend: boolean): number {
  if (!/^\d+$/.test(seg)) throw new ConfigError(`--set ${key}: '${here}' indexes a list, so it needs a number`);
  const i = Number(seg);
  if (i > length || (i === length && !allowAppend)) {
    throw new ConfigError(`--set ${key}: index ${i} is out of range (the list has ${length} item(s))`);
  }
  return i;
}

// ---------------------------------------------------------------------------------------------------------
// Messages
// ---------------------------------------------------------------------------------------------------------

function getAt(obj: unknown, p: readonly PropertyKey[]): unknown {
  let v: unknown = obj;
  for (const s of p) {
    if (v === null || typeof v !== 'object') return undefined;
    v = (v as Record<PropertyKey, unknown>)[s];
  }
  return v;
}

function describeValue(v: unknown): string {
  if (v === undefined) return 'missing';
  if (v === null) return 'null';
  const kind = Array.isArray(v) ? 'a list' : typeof v === 'object' ? 'a mapping' : `a ${typeof v}`;
  let shown = JSON.stringify(v) ?? String(v);
  if (shown.length > 60) shown = `${shown.slice(0, 57)}...`;
  return `${shown} (${kind})`;
}

const EXPECTED_NAMES: Record<string, string> = {
  int: 'an integer',
  number: 'a number',
  string: 'a string',
  boolean: 'true or false',
  array: 'a list',
  object: 'a mapping',
};

function describeIssue(
  issue: z.core.$ZodIssue,
  obj: unknown,
  where: (p: readonly PropertyKey[], key?: boolean) => string,
): string[] {
  const p = issue.path;
  const name = p.join('.');
  const value = getAt(obj, p);
  if (value === undefined && issue.code !== 'unrecognized_keys') {
    return [`${where(p.slice(0, -1), true)}: '${name}' is required${requiredHint(name)}`];
  }
  switch (issue.code) {
    case 'unrecognized_keys': {
      const known = p.length === 0 ? TRAIN_CONFIG_KEYS : p[0] === 'special_tokens' ? SPECIAL_TOKEN_KEYS : DATASET_KEYS;
      return issue.keys.map((k) => {
        const hint = didYouMean(k, known);
        const scope = p.length === 0 ? '' : ` in ${name}`;
        return `${where([...p, k], true)}: unknown key '${k}'${scope}${hint ? ` (did you mean '${hint}'?)` : ''}`;
      });
    }
    case 'invalid_type': {
      const expected =
        issue.message === INT_MESSAGE ? 'an integer' : (EXPECTED_NAMES[issue.expected] ?? issue.expected);
      return [`${where(p)}: ${name}: expected ${expected}, got ${describeValue(value)}`];
    }
    case 'too_small': {
      if (issue.origin === 'array') {
        return [`${where(p)}: ${name}: needs at least ${issue.minimum} item(s), got ${describeValue(value)}`];
      }
      if (issue.origin === 'string') return [`${where(p)}: ${name}: must not be empty`];
      const op = issue.inclusive ? '>=' : '>';
      return [`${where(p)}: ${name}: must be ${op} ${issue.minimum}, got ${describeValue(value)}`];
    }
    case 'too_big': {
      const op = issue.inclusive ? '<=' : '<';
      return [`${where(p)}: ${name}: must be ${op} ${issue.maximum}, got ${describeValue(value)}`];
    }
    case 'invalid_value': {
      const options = issue.values.map(String);
      const hint = typeof value === 'string' ? didYouMean(value, options) : undefined;
      return [
        `${where(p)}: ${name}: expected one of ${options.join(', ')}, got ${describeValue(value)}${hint ? ` (did you mean '${hint}'?)` : ''}`,
      ];
    }
    default:
      return [`${where(p)}: ${name}: ${issue.message}, got ${describeValue(value)}`];
  }
}

const SPECIAL_TOKEN_KEYS = ['bos_token', 'eos_token', 'pad_token', 'unk_token'];

function requiredHint(name: string): string {
  if (name === 'learning_rate') return ' (Axolotl has no default: 2e-4 is typical for LoRA, 2e-5 for full fine-tuning)';
  if (name === 'base_model') return ' (a local HF model dir, a .gguf file or hf://owner/repo)';
  if (name === 'datasets') return ' (a list of {path, type})';
  if (name.endsWith('.type')) return ` (one of ${DATASET_TYPE_NAMES.join(', ')})`;
  return '';
}

/** Levenshtein distance (two rows). */
export function editDistance(a: string, b: string): number {
  let prev = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    const cur = [i];
    for (let j = 1; j <= b.length; j++) {
      cur[j] = Math.min(prev[j]! + 1, cur[j - 1]! + 1, prev[j - 1]! + (a[i - 1] === b[j - 1] ? 0 : 1));
    }
    prev = cur;
  }
  return prev[b.length]!;
}

/** The closest candidate within a third of the word's length (at least 2 edits), if any. */
export function didYouMean(word: string, candidates: readonly string[]): string | undefined {
  let best: string | undefined;
  let bestD = Math.max(2, Math.floor(word.length / 3)) + 1;
  for (const c of candidates) {
    const d = editDistance(word.toLowerCase(), c.toLowerCase());
    if (d < bestD) {
      bestD = d;
      best = c;
    }
  }
  return best;
}

/** The source offset of a key (or of its value) in the YAML document. */
function nodeOffset(doc: Document, p: readonly PropertyKey[], key: boolean): number | undefined {
  let node: unknown = doc.contents;
  let keyOffset: number | undefined;
  for (const seg of p) {
    if (isMap(node)) {
      const pair = node.items.find((it) => isScalar(it.key) && String(it.key.value) === String(seg));
      if (!pair) return offsetOf(node);
      keyOffset = isScalar(pair.key) ? pair.key.range?.[0] : undefined;
      node = pair.value;
    } else if (isSeq(node)) {
      const item = node.items[Number(seg)];
      if (item === undefined) return offsetOf(node);
      keyOffset = offsetOf(item);
      node = item;
    } else {
      return offsetOf(node) ?? keyOffset;
    }
  }
  return key ? keyOffset : (offsetOf(node) ?? keyOffset);
}

function offsetOf(node: unknown): number | undefined {
  const range = (node as { range?: [number, number, number] } | null)?.range;
  return range?.[0];
}

// ---------------------------------------------------------------------------------------------------------
// Normalisation and cross-field checks
// ---------------------------------------------------------------------------------------------------------

interface NormaliseCtx {
  file: string;
  where: (p: readonly PropertyKey[], key?: boolean) => string;
  pathBase: (p: readonly PropertyKey[]) => string;
  warnings: string[];
}

function normalise(r: RawConfig, ctx: NormaliseCtx): TrainConfig {
  const { where, warnings } = ctx;
  const problems: string[] = [];
  const fail = (p: PropertyKey[], msg: string) => problems.push(`${where(p, true)}: ${msg}`);
  const resolvePath = (p: PropertyKey[], value: string) => expandPath(value, ctx.pathBase(p));

  // --- adapter ---
  let adapter: AdapterKind = r.adapter === 'lora' || r.adapter === 'qlora' || r.adapter === 'dora' ? r.adapter : 'full';
  if (r.adapter === undefined || r.adapter === null) {
    warnings.push(
      `${ctx.file}: no 'adapter' key: training all parameters (full fine-tuning), as Axolotl does; set adapter: lora for LoRA`,
    );
  }
  if (r.peft_use_dora) {
    if (adapter === 'full') fail(['peft_use_dora'], 'peft_use_dora needs adapter: lora or qlora');
    else adapter = 'dora';
  }
  if (r.load_in_8bit) {
    fail(
      ['load_in_8bit'],
      'training on an 8-bit base is not supported; use load_in_4bit: true (QLoRA) or leave it off',
    );
  }
  let load4 = r.load_in_4bit ?? false;
  if (r.adapter === 'qlora') {
    if (r.load_in_4bit === false) fail(['load_in_4bit'], 'adapter: qlora needs load_in_4bit: true (or leave it out)');
    load4 = true;
  }
  if (load4 && adapter === 'full') {
    fail(
      ['load_in_4bit'],
      'load_in_4bit needs an adapter (full fine-tuning cannot train 4-bit weights); set adapter: qlora or drop load_in_4bit',
    );
  }
  if (load4 && adapter === 'lora') adapter = 'qlora';
  if (r.use_rslora !== undefined && r.peft_use_rslora !== undefined && r.use_rslora !== r.peft_use_rslora) {
    fail(
      ['peft_use_rslora'],
      `use_rslora (${r.use_rslora}) and peft_use_rslora (${r.peft_use_rslora}) disagree; keep one`,
    );
  }
  const loraKeys = ['lora_r', 'lora_alpha', 'lora_dropout', 'lora_target_modules', 'lora_target_linear'] as const;
  if (adapter === 'full') {
    const set = loraKeys.filter((k) => r[k] !== undefined);
    if (set.length > 0) warnings.push(`${where([set[0]!], true)}: ${set.join(', ')} ignored for full fine-tuning`);
  }
  if (!load4) {
    for (const k of ['bnb_4bit_quant_type', 'bnb_4bit_use_double_quant', 'bnb_4bit_compute_dtype'] as const) {
      if (r[k] !== undefined) warnings.push(`${where([k], true)}: ${k} has no effect without load_in_4bit`);
    }
  }
  let targets: string[] | 'all-linear';
  if (r.lora_target_linear) {
    targets = 'all-linear';
    if (r.lora_target_modules !== undefined) {
      warnings.push(
        `${where(['lora_target_modules'], true)}: lora_target_linear: true already targets every linear layer`,
      );
    }
  } else if (r.lora_target_modules === undefined) {
    targets = ['q_proj', 'v_proj'];
  } else if (typeof r.lora_target_modules === 'string') {
    targets =
      r.lora_target_modules === 'all-linear' || r.lora_target_modules === 'all_linear'
        ? 'all-linear'
        : [r.lora_target_modules];
  } else {
    targets = r.lora_target_modules;
  }

  // --- data ---
  const datasets = r.datasets.map((d, i) => normaliseDataset(d, ['datasets', i], ctx, resolvePath));
  const testDatasets = (r.test_datasets ?? []).map((d, i) =>
    normaliseDataset(d, ['test_datasets', i], ctx, resolvePath),
  );
  const valSetSize = r.val_set_size ?? 0;
  if (valSetSize >= 1 && !Number.isInteger(valSetSize)) {
    fail(['val_set_size'], `val_set_size is a fraction in [0, 1) or a whole count of examples, got ${valSetSize}`);
  }
  if (valSetSize > 0 && testDatasets.length > 0) {
    fail(['val_set_size'], 'val_set_size and test_datasets both define the evaluation set; keep one');
  }
  const hasEval = valSetSize > 0 || testDatasets.length > 0;
  const packing = r.sample_packing ?? false;

  let chatJinja: string | null = null;
  if (r.chat_template_jinja !== undefined) {
    const v = r.chat_template_jinja;
    if (v.includes('{{') || v.includes('{%')) {
      chatJinja = v;
    } else {
      const p = resolvePath(['chat_template_jinja'], v);
      try {
        chatJinja = readFileSync(p, 'utf8');
      } catch {
        fail(['chat_template_jinja'], `chat_template_jinja is neither a Jinja template nor a readable file: ${p}`);
      }
    }
  }

  // --- optimisation ---
  const micro = r.micro_batch_size ?? 1;
  let accum = r.gradient_accumulation_steps ?? 1;
  if (r.batch_size !== undefined) {
    if (r.gradient_accumulation_steps !== undefined) {
      if (r.batch_size !== micro * r.gradient_accumulation_steps) {
        fail(
          ['batch_size'],
          `batch_size ${r.batch_size} != micro_batch_size ${micro} x gradient_accumulation_steps ${r.gradient_accumulation_steps}; set two of the three`,
        );
      }
    } else if (r.batch_size % micro !== 0) {
      fail(['batch_size'], `batch_size ${r.batch_size} is not a multiple of micro_batch_size ${micro}`);
    } else {
      accum = r.batch_size / micro;
    }
  }
  if (r.max_steps !== undefined && r.num_epochs !== undefined) {
    warnings.push(
      `${where(['max_steps'], true)}: max_steps (${r.max_steps}) overrides num_epochs (${r.num_epochs}), as in the HF Trainer`,
    );
  }
  if (r.warmup_steps !== undefined && r.warmup_ratio !== undefined) {
    fail(['warmup_ratio'], 'warmup_steps and warmup_ratio are exclusive; keep one');
  }
  const scheduler = r.lr_scheduler === 'constant_with_warmup' ? 'constant' : (r.lr_scheduler ?? 'cosine');
  if (r.cosine_min_lr_ratio !== undefined && scheduler !== 'cosine') {
    warnings.push(
      `${where(['cosine_min_lr_ratio'], true)}: cosine_min_lr_ratio has no effect with lr_scheduler: ${scheduler}`,
    );
  }
  let optimizer: 'adamw' | 'sgd' = 'adamw';
  if (r.optimizer !== undefined) {
    const alias = OPTIMIZER_ALIASES[r.optimizer];
    if (!alias) {
      const hint = didYouMean(r.optimizer, Object.keys(OPTIMIZER_ALIASES));
      fail(
        ['optimizer'],
        `optimizer: unknown optimizer '${r.optimizer}'${hint ? ` (did you mean '${hint}'?)` : ''}; supported: ${Object.keys(OPTIMIZER_ALIASES).join(', ')}`,
      );
    } else {
      optimizer = alias.to;
      if (alias.warn) warnings.push(`${where(['optimizer'], true)}: ${r.optimizer}: ${alias.warn}; using 32-bit AdamW`);
    }
  }

  // --- evaluation and saving ---
  if (r.eval_steps !== undefined && r.evals_per_epoch !== undefined) {
    fail(['evals_per_epoch'], 'eval_steps and evals_per_epoch are exclusive; keep one');
  }
  if (r.save_steps !== undefined && r.saves_per_epoch !== undefined) {
    fail(['saves_per_epoch'], 'save_steps and saves_per_epoch are exclusive; keep one');
  }
  for (const k of ['eval_steps', 'save_steps'] as const) {
    const v = r[k];
    if (v !== undefined && v > 1 && !Number.isInteger(v)) {
      fail([k], `${k} is a whole number of steps or a fraction (< 1) of all steps, got ${v}`);
    }
  }
  if (r.early_stopping_patience !== undefined && !hasEval) {
    fail(
      ['early_stopping_patience'],
      'early_stopping_patience needs evaluation data: set val_set_size or test_datasets',
    );
  }
  if (!hasEval) {
    for (const k of ['eval_steps', 'evals_per_epoch', 'eval_batch_size', 'eval_sample_packing'] as const) {
      if (r[k] !== undefined)
        warnings.push(`${where([k], true)}: ${k} has no effect without val_set_size or test_datasets`);
    }
  }

  if (problems.length > 0) throw configProblems(ctx.file, problems);

  return {
    base_model: resolveModel(r.base_model, ctx.pathBase(['base_model'])),
    adapter,
    lora_model_dir: r.lora_model_dir === undefined ? null : resolvePath(['lora_model_dir'], r.lora_model_dir),
    lora_r: r.lora_r ?? 8,
    lora_alpha: r.lora_alpha ?? 8,
    lora_dropout: r.lora_dropout ?? 0,
    lora_target_modules: targets,
    lora_modules_to_save: r.lora_modules_to_save ?? [],
    use_rslora: r.use_rslora ?? r.peft_use_rslora ?? false,
    load_in_4bit: load4,
    bnb_4bit_quant_type: r.bnb_4bit_quant_type ?? 'nf4',
    bnb_4bit_use_double_quant: r.bnb_4bit_use_double_quant ?? true,
    bnb_4bit_compute_dtype: r.bnb_4bit_compute_dtype ?? 'auto',

    datasets,
    test_datasets: testDatasets,
    val_set_size: valSetSize,
    sequence_len: r.sequence_len ?? 512,
    excess_length_strategy: r.excess_length_strategy ?? 'truncate',
    sample_packing: packing,
    eval_sample_packing: r.eval_sample_packing ?? packing,
    pad_to_sequence_len: r.pad_to_sequence_len ?? packing,
    train_on_inputs: r.train_on_inputs ?? false,
    chat_template: r.chat_template ?? null,
    chat_template_jinja: chatJinja,
    special_tokens: { ...(r.special_tokens ?? {}) },

    micro_batch_size: micro,
    eval_batch_size: r.eval_batch_size ?? micro,
    gradient_accumulation_steps: accum,
    num_epochs: r.num_epochs ?? 1,
    max_steps: r.max_steps ?? null,
    learning_rate: r.learning_rate,
    lr_scheduler: scheduler,
    cosine_min_lr_ratio: r.cosine_min_lr_ratio ?? 0,
    warmup_steps: r.warmup_steps ?? null,
    warmup_ratio: r.warmup_ratio ?? null,
    optimizer,
    adam_beta1: r.adam_beta1 ?? 0.9,
    adam_beta2: r.adam_beta2 ?? 0.999,
    adam_epsilon: r.adam_epsilon ?? 1e-8,
    weight_decay: r.weight_decay ?? 0,
    max_grad_norm: r.max_grad_norm ?? 1.0,
    gradient_checkpointing: r.gradient_checkpointing ?? false,
    seed: r.seed ?? 42,

    output_dir: resolvePath(['output_dir'], r.output_dir ?? './model-out'),
    save_steps: r.save_steps ?? null,
    saves_per_epoch: r.saves_per_epoch ?? null,
    save_total_limit: r.save_total_limit ?? null,
    eval_steps: r.eval_steps ?? null,
    evals_per_epoch: r.evals_per_epoch ?? null,
    logging_steps: r.logging_steps ?? null,
    early_stopping_patience: r.early_stopping_patience ?? null,
    resume_from_checkpoint:
      r.resume_from_checkpoint === undefined ? null : resolvePath(['resume_from_checkpoint'], r.resume_from_checkpoint),
    eval_metric: r.eval_metric ?? 'auto',
    eval_markers: r.eval_markers ?? [],
    eval_max_examples: r.eval_max_examples ?? 50,

    config_path: ctx.file === '<config>' ? '' : ctx.file,
    warnings,
  };
}

function normaliseDataset(
  d: RawDataset,
  at: PropertyKey[],
  ctx: NormaliseCtx,
  resolvePath: (p: PropertyKey[], v: string) => string,
): DatasetConfig {
  const type: DatasetType = d.type === 'chat_template' ? 'chat' : d.type;
  const meaningful = new Set([...DATASET_COMMON_KEYS, ...DATASET_KEYS_FOR[type]]);
  for (const k of Object.keys(d)) {
    if (!meaningful.has(k)) ctx.warnings.push(`${ctx.where([...at, k], true)}: ${k} has no effect for type ${d.type}`);
  }
  const mappings = { role: 'role', content: 'content', ...(d.message_property_mappings ?? {}) };
  if (d.message_field_role) mappings.role = d.message_field_role;
  if (d.message_field_content) mappings.content = d.message_field_content;
  return {
    path: resolvePath([...at, 'path'], d.path),
    type,
    split: d.split ?? 'train',
    ds_type: d.ds_type ?? null,
    field: d.field ?? 'text',
    field_prompt: d.field_prompt ?? 'prompt',
    field_completion: d.field_completion ?? 'completion',
    field_instruction: d.field_instruction ?? 'instruction',
    field_input: d.field_input ?? 'input',
    field_output: d.field_output ?? 'output',
    field_messages: d.field_messages ?? 'messages',
    message_property_mappings: { role: mappings.role, content: mappings.content },
    message_field_training: d.message_field_training ?? null,
    roles: d.roles ?? structuredClone(DEFAULT_ROLES),
    roles_to_train: d.roles_to_train ?? ['assistant'],
    train_on_eos: d.train_on_eos ?? 'turn',
  };
}

/** A dataset entry with every default filled in (for programmatic use and tests); the path is taken as is. */
export function datasetConfig(
  d: { path: string; type: DatasetType | 'chat_template' } & Partial<Omit<DatasetConfig, 'path' | 'type'>>,
): DatasetConfig {
  const { path: p, type, ...rest } = d;
  const ctx: NormaliseCtx = { file: '<dataset>', where: () => '<dataset>', pathBase: () => '', warnings: [] };
  const base = normaliseDataset({ path: p, type }, ['datasets', 0], ctx, (_at, v) => v);
  return { ...base, ...rest };
}

function expandPath(p: string, base: string): string {
  if (p === '~' || p.startsWith('~/')) return path.join(homedir(), p.slice(1));
  return path.resolve(base, p);
}

/** base_model: hub ids (owner/name) and hf:// stay as they are; local-looking or existing paths are resolved. */
function resolveModel(m: string, base: string): string {
  if (m.startsWith('hf://') || path.isAbsolute(m)) return m;
  if (m.startsWith('./') || m.startsWith('../') || m.startsWith('~') || m.endsWith('.gguf')) return expandPath(m, base);
  const local = path.resolve(base, m);
  return existsSync(local) ? local : m;
}

// ---------------------------------------------------------------------------------------------------------
// Derived step counts
// ---------------------------------------------------------------------------------------------------------

export interface StepPlan {
  /** Optimizer steps per epoch: ceil(micro batches per epoch / gradient_accumulation_steps). */
  stepsPerEpoch: number;
  totalSteps: number;
  warmupSteps: number;
  loggingSteps: number;
  /** Evaluate every N steps; null = no evaluation data. Without eval_steps/evals_per_epoch: once per epoch. */
  evalSteps: number | null;
  /** Save every N steps. Without save_steps/saves_per_epoch: once per epoch. */
  saveSteps: number;
}

/** Turns the config's step keys into numbers, once the number of micro batches per epoch is known. */
export function planSteps(cfg: TrainConfig, microBatchesPerEpoch: number, hasEval: boolean): StepPlan {
  const stepsPerEpoch = Math.max(1, Math.ceil(microBatchesPerEpoch / cfg.gradient_accumulation_steps));
  const totalSteps = cfg.max_steps ?? Math.max(1, Math.ceil(cfg.num_epochs * stepsPerEpoch));
  const warmupSteps =
    cfg.warmup_steps ??
    (cfg.warmup_ratio !== null
      ? Math.floor(cfg.warmup_ratio * totalSteps)
      : Math.min(Math.floor(0.03 * totalSteps), 100));
  const loggingSteps = cfg.logging_steps ?? Math.max(1, Math.min(10, Math.floor(0.005 * totalSteps)));
  const every = (steps: number | null, perEpoch: number | null): number => {
    if (steps !== null) return steps < 1 ? Math.max(1, Math.ceil(steps * totalSteps)) : steps;
    if (perEpoch !== null) return Math.max(1, Math.floor(stepsPerEpoch / perEpoch));
    return stepsPerEpoch;
  };
  return {
    stepsPerEpoch,
    totalSteps,
    warmupSteps: Math.min(warmupSteps, totalSteps),
    loggingSteps,
    evalSteps: hasEval ? every(cfg.eval_steps, cfg.evals_per_epoch) : null,
    saveSteps: every(cfg.save_steps, cfg.saves_per_epoch),
  };
}

/**
 * The normalised config as YAML (what a checkpoint stores), without config_path, warnings and null values;
 * parsing it again gives the same config.
 */
export function serializeTrainConfig(cfg: TrainConfig): string {
  const { config_path: _p, warnings: _w, ...rest } = cfg;
  const dropNulls = (v: unknown): unknown => {
    if (Array.isArray(v)) return v.map(dropNulls);
    if (v !== null && typeof v === 'object') {
      return Object.fromEntries(
        Object.entries(v)
          .filter(([, x]) => x !== null && !(Array.isArray(x) && x.length === 0))
          .map(([k, x]) => [k, dropNulls(x)]),
      );
    }
    return v;
  };
  return stringify(dropNulls(rest));
}
