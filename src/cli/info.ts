// lowrank info <model|adapter>: what it is.

import { existsSync, statSync } from 'node:fs';
import { join } from 'node:path';
import type { Command } from 'commander';
import { readGguf } from '../formats/gguf.ts';
import { openSafetensors, openSafetensorsIndex } from '../formats/safetensors.ts';
import { configFromGguf, type ModelConfig } from '../models/config.ts';
import { readHFConfig, resolveModelPath } from '../models/load.ts';
import { loadTokenizer } from '../tokenize/hf.ts';
import { describeAdapterDir, isAdapterDir } from './info-adapter.ts';

function paramCount(c: ModelConfig): number {
  const h = c.hidden_size;
  const attn = h * c.num_attention_heads * c.head_dim * 2 + h * c.num_key_value_heads * c.head_dim * 2;
  const mlp = 3 * h * c.intermediate_size;
  const layer = attn + mlp + 2 * h;
  return c.vocab_size * h * (c.tie_word_embeddings ? 1 : 2) + c.num_hidden_layers * layer + h;
}

export function describeConfig(c: ModelConfig): string[] {
  return [
    `architecture: ${c.architecture}`,
    `parameters: ${(paramCount(c) / 1e6).toFixed(2)}M`,
    `layers: ${c.num_hidden_layers}, hidden: ${c.hidden_size}, intermediate: ${c.intermediate_size}`,
    `heads: ${c.num_attention_heads} (kv ${c.num_key_value_heads}), head_dim: ${c.head_dim}`,
    `vocab: ${c.vocab_size}, context: ${c.max_position_embeddings}, rope_theta: ${c.rope_theta}${c.rope.scaling ? `, rope_scaling: ${c.rope.scaling.type} x${c.rope.scaling.factor}` : ''}`,
    `tied embeddings: ${c.tie_word_embeddings}`,
  ];
}

export function registerInfo(program: Command): void {
  program
    .command('info')
    .description('describe a model (HF dir or .gguf) or a PEFT adapter dir')
    .argument('<path>', 'model dir, .gguf file, adapter dir or hf://owner/repo')
    .action(async (src: string) => {
      const path = await resolveModelPath(src);
      const lines: string[] = [`path: ${path}`];
      if (statSync(path).isDirectory() && isAdapterDir(path)) {
        lines.push(...describeAdapterDir(path));
      } else if (statSync(path).isDirectory()) {
        const cfg = readHFConfig(path);
        lines.push('format: Hugging Face model dir', ...describeConfig(cfg));
        const r = existsSync(join(path, 'model.safetensors.index.json'))
          ? openSafetensorsIndex(path)
          : openSafetensors(join(path, 'model.safetensors'));
        const dtypes = new Map<string, number>();
        for (const n of r.names()) dtypes.set(r.info(n).dtype, (dtypes.get(r.info(n).dtype) ?? 0) + 1);
        lines.push(`tensors: ${r.names().length} (${[...dtypes].map(([d, n]) => `${n} ${d}`).join(', ')})`);
        r.close();
      } else {
        const g = readGguf(path);
        const cfg = configFromGguf(g.metadata as Record<string, unknown>, path);
        cfg.tie_word_embeddings = !g.tensors.some((t) => t.name === 'output.weight');
        const types = new Map<string, number>();
        for (const t of g.tensors) types.set(t.type.name, (types.get(t.type.name) ?? 0) + 1);
        lines.push(`format: GGUF v${g.version}`, ...describeConfig(cfg));
        lines.push(`tensors: ${g.tensors.length} (${[...types].map(([d, n]) => `${n} ${d}`).join(', ')})`);
        g.close();
      }
      try {
        const tok = loadTokenizer(path);
        lines.push(
          `tokenizer: ${tok.vocabSize} tokens, bos ${tok.bosId ?? '-'}, eos ${[...tok.eosIds].join('/') || '-'}, chat template: ${tok.hasChatTemplate ? 'yes' : 'no'}`,
        );
      } catch (e) {
        if (!isAdapterDir(path)) lines.push(`tokenizer: none (${(e as Error).message})`);
      }
      console.log(lines.join('\n'));
    });
}
