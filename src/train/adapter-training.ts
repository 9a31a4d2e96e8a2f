// Adapter training setup (LoRA / DoRA / QLoRA): wired to src/peft once it lands.

import { ConfigError } from '../core/errors.ts';
import type { Rng } from '../core/rng.ts';
import type { Tensor } from '../core/tensor.ts';
import type { LlamaForCausalLM } from '../models/llama.ts';
import type { TrainConfig } from './config.ts';

export async function setupAdapterTraining(
  _model: LlamaForCausalLM,
  cfg: TrainConfig,
  _modelPath: string,
  _rng: Rng,
): Promise<{ trainable: [string, Tensor][]; writeArtifact: (dir: string) => Promise<void> }> {
  throw new ConfigError(`adapter '${cfg.adapter}' (TEMPORARY)`);
}
