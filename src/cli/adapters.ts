// Applying --adapter options to a loaded model (filled in by the LoRA layer).

import { ConfigError } from '../core/errors.ts';
import type { LlamaForCausalLM } from '../models/llama.ts';

export function applyAdapterOptions(_model: LlamaForCausalLM, adapters: string[], weights?: string): void {
  if (adapters.length === 0) {
    if (weights) throw new ConfigError('--weights needs --adapter');
    return;
  }
  throw new ConfigError('--adapter: LoRA adapters are not available in this build yet');
}
