// Builds what the trainer trains from the config: loads the base model and tokenizer, prepares the data,
// and makes the trainable set (LoRA/DoRA/QLoRA adapters, or every weight for full fine-tuning).

import { ConfigError } from '../core/errors.ts';
import { Rng } from '../core/rng.ts';
import { keep } from '../core/scope.ts';
import type { Tensor } from '../core/tensor.ts';
import type { LlamaForCausalLM } from '../models/llama.ts';
import { loadModel, resolveModelPath } from '../models/load.ts';
import { copyTokenizerFiles, saveModelHF } from '../models/save.ts';
import { cast } from '../ops/shape.ts';
import { noGrad } from '../ops/tape.ts';
import { loadModelQuantized } from '../quant/load.ts';
import { loadTokenizer } from '../tokenize/hf.ts';
import type { Tokenizer } from '../tokenize/tokenizer.ts';
import { setupAdapterTraining } from './adapter-training.ts';
import type { TrainConfig } from './config.ts';
import { type PreparedData, prepareData } from './data.ts';
import type { TextTokenizer } from './data-format.ts';
import type { TrainTarget } from './trainer.ts';

export interface TrainSetup {
  target: TrainTarget;
  tokenizer: Tokenizer;
  data: PreparedData;
  modelPath: string;
  /** Parameters: total and trainable. */
  params: { total: number; trainable: number };
}

export function textTokenizer(tok: Tokenizer, chatTemplate?: string | null): TextTokenizer {
  return {
    encode: (t, o) => tok.encode(t, o),
    bosId: tok.bosId ?? undefined,
    eosId: tok.eosId ?? undefined,
    padId: tok.padId ?? undefined,
    applyChatTemplate:
      tok.hasChatTemplate || chatTemplate
        ? (messages, o) =>
            tok.applyChatTemplate(
              messages.map((m) => ({ ...m })),
              { addGenerationPrompt: o.addGenerationPrompt, ...(chatTemplate ? { template: chatTemplate } : {}) },
            )
        : undefined,
  };
}

/** Every weight trainable, in f32 (full fine-tuning). */
function fullTrainable(model: LlamaForCausalLM): [string, Tensor][] {
  noGrad(() => {
    for (const [name, p] of [...model.namedParameters()]) {
      if (p.dtype === 'f32') continue;
      const path = name.split('.');
      const leaf = path.pop()!;
      const owner = model.getModule(path.join('.'))!;
      owner.setParam(leaf, keep(cast(p, 'f32')));
    }
  });
  model.requiresGrad(true);
  return model.trainableParameters();
}

export async function setupTraining(
  cfg: TrainConfig,
  log: (m: string) => void = (m) => console.warn(m),
): Promise<TrainSetup> {
  const modelPath = await resolveModelPath(cfg.base_model);
  const tokenizer = loadTokenizer(modelPath);
  const data = prepareData(cfg, textTokenizer(tokenizer, cfg.chat_template_jinja));
  const rng = new Rng(cfg.seed);
  const { model, config } = cfg.load_in_4bit
    ? await loadModelQuantized(modelPath, {
        quant_method: 'bitsandbytes',
        load_in_4bit: true,
        bnb_4bit_quant_type: cfg.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant: cfg.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype: cfg.bnb_4bit_compute_dtype === 'auto' ? 'float32' : cfg.bnb_4bit_compute_dtype,
      })
    : await loadModel(modelPath, { dtype: cfg.adapter === 'full' ? 'f32' : 'auto' });
  let trainable: [string, Tensor][];
  let writeArtifact: (dir: string) => Promise<void>;
  if (cfg.adapter === 'full') {
    trainable = fullTrainable(model);
    writeArtifact = async (dir) => {
      await saveModelHF(model.namedParameters(), config, dir);
      copyTokenizerFiles(modelPath, dir);
    };
  } else {
    const a = await setupAdapterTraining(model, cfg, cfg.base_model, rng, log);
    trainable = a.trainable;
    writeArtifact = a.writeArtifact;
  }
  if (trainable.length === 0)
    throw new ConfigError(`${cfg.config_path}: the adapter settings select no module to train`);
  const padId = tokenizer.padId ?? tokenizer.eosId ?? 0;
  const total = model.numParameters();
  const nTrain = trainable.reduce((s, [, p]) => s + p.size, 0);
  return {
    target: { model, trainable, writeArtifact, rng, padId },
    tokenizer,
    data,
    modelPath,
    params: { total, trainable: nTrain },
  };
}
