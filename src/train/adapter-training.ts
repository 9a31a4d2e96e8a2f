// Adapter training setup (LoRA, DoRA, QLoRA): wraps the loaded base in a LoraModel with the config's
// settings (or continues an existing adapter from lora_model_dir), and saves in PEFT's format.

import type { Rng } from '../core/rng.ts';
import type { Tensor } from '../core/tensor.ts';
import type { LlamaForCausalLM } from '../models/llama.ts';
import { loadAdapter, saveAdapter } from '../peft/lora/io.ts';
import { LoraModel } from '../peft/lora/model.ts';
import type { TrainConfig } from './config.ts';

export interface AdapterTraining {
  lora: LoraModel;
  trainable: [string, Tensor][];
  writeArtifact: (dir: string) => Promise<void>;
}

export async function setupAdapterTraining(
  model: LlamaForCausalLM,
  cfg: TrainConfig,
  baseModelName: string,
  rng: Rng,
  warn: (m: string) => void = (m) => console.warn(`warning: ${m}`),
): Promise<AdapterTraining> {
  const lora = cfg.lora_model_dir
    ? loadAdapter(model, cfg.lora_model_dir, { isTrainable: true, rng, onWarning: warn })
    : new LoraModel(
        model,
        {
          r: cfg.lora_r,
          lora_alpha: cfg.lora_alpha,
          lora_dropout: cfg.lora_dropout,
          target_modules: cfg.lora_target_modules,
          use_rslora: cfg.use_rslora,
          use_dora: cfg.adapter === 'dora',
          modules_to_save: cfg.lora_modules_to_save.length ? cfg.lora_modules_to_save : null,
          task_type: 'CAUSAL_LM',
          base_model_name_or_path: baseModelName,
        },
        'default',
        { rng, onWarning: warn },
      );
  return {
    lora,
    trainable: lora.trainableParameters(),
    writeArtifact: async (dir) => {
      await saveAdapter(lora, dir);
    },
  };
}
