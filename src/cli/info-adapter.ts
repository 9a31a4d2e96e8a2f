// `lowrank info` for a PEFT adapter dir: its adapter_config.json and tensors.

import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { FormatError } from '../core/errors.ts';
import { openSafetensors } from '../formats/safetensors.ts';

export function isAdapterDir(dir: string): boolean {
  return existsSync(join(dir, 'adapter_config.json'));
}

export function describeAdapterDir(dir: string): string[] {
  const file = join(dir, 'adapter_config.json');
  let cfg: Record<string, unknown>;
  try {
    cfg = JSON.parse(readFileSync(file, 'utf8'));
  } catch (e) {
    throw new FormatError(`${file}: invalid JSON: ${(e as Error).message}`);
  }
  const lines = [
    `format: PEFT adapter (${cfg.peft_type ?? 'unknown type'})`,
    `base model: ${cfg.base_model_name_or_path ?? '-'}`,
    `r: ${cfg.r}, lora_alpha: ${cfg.lora_alpha}, rslora: ${cfg.use_rslora === true}, dora: ${cfg.use_dora === true}, dropout: ${cfg.lora_dropout ?? 0}`,
    `target_modules: ${JSON.stringify(cfg.target_modules)}`,
  ];
  if (cfg.modules_to_save) lines.push(`modules_to_save: ${JSON.stringify(cfg.modules_to_save)}`);
  const weights = join(dir, 'adapter_model.safetensors');
  if (existsSync(weights)) {
    const r = openSafetensors(weights);
    let params = 0;
    for (const n of r.names()) params += r.info(n).shape.reduce((a, b) => a * b, 1);
    lines.push(`tensors: ${r.names().length}, parameters: ${params.toLocaleString('en-US')}`);
    r.close();
  }
  return lines;
}
