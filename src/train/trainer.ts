// The training loop: AdamW with decoupled weight decay, warmup + schedule, gradient accumulation with the
// loss normalised over all trainable tokens of the accumulated micro batches, global-norm clipping,
// optional gradient checkpointing, non-finite detection, evaluation, early stopping, and exact resume from
// atomic checkpoints. Deterministic for a seed and thread count.

import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { DataError, LowrankError } from '../core/errors.ts';
import type { Rng } from '../core/rng.ts';
import { tidy } from '../core/scope.ts';
import { memoryStats, resetPeakMemory } from '../core/storage.ts';
import type { Tensor } from '../core/tensor.ts';
import { writeFileAtomic } from '../formats/atomic.ts';
import type { ForwardContext, LlamaForCausalLM } from '../models/llama.ts';
import { checkpoint } from '../ops/checkpoint.ts';
import { intTensor } from '../ops/create.ts';
import { crossEntropy } from '../ops/loss.ts';
import { reshape } from '../ops/shape.ts';
import { backward, noGrad } from '../ops/tape.ts';
import {
  cleanPartialCheckpoints,
  latestCheckpoint,
  loadCheckpoint,
  type MetricRecord,
  saveCheckpoint,
  type TrainerState,
} from './checkpoint.ts';
import { planSteps, serializeTrainConfig, type TrainConfig } from './config.ts';
import { createLoaders, type PreparedData } from './data.ts';
import type { Batch, DataLoader } from './data-pack.ts';
import { AdamW, clipFactor, gradNorm, lrLambda } from './optim.ts';
import type { ProgressInfo } from './progress.ts';

/** The model with its trainable tensors and how to save the result (set up by adapter-setup.ts). */
export interface TrainTarget {
  model: LlamaForCausalLM;
  trainable: [string, Tensor][];
  /** Writes the trained artefact (PEFT adapter, or full HF model) into dir. */
  writeArtifact(dir: string): Promise<void>;
  /** The RNG that dropout layers draw from (restored on resume, rewound by gradient checkpointing). */
  rng: Rng;
  padId: number;
}

export type TrainLog = (line: string) => void;

export interface TrainOptions {
  /** Resume from this checkpoint dir, or true for the latest in output_dir. */
  resume?: string | boolean;
  log?: TrainLog;
  onProgress?: (p: ProgressInfo) => void;
  /** Stop with an error after this many consecutive skipped (non-finite) steps. Default 10. */
  maxNonFinite?: number;
}

export interface TrainSummary {
  steps: number;
  finalLoss: number;
  evalLoss: number | null;
  history: MetricRecord[];
  tokensPerSecond: number;
  peakBytes: number;
  wallSeconds: number;
  stoppedEarly: boolean;
  outputDir: string;
}

/** Shifts HF-style labels left (label[t+1] is the target of position t), masking across packed examples. */
export function shiftedTargets(b: Batch): Int32Array {
  const { batchSize: B, seqLen: T } = b;
  const out = new Int32Array(B * T).fill(-100);
  for (let r = 0; r < B; r++)
    for (let t = 0; t + 1 < T; t++) {
      const i = r * T + t;
      if (b.seqIds[i] !== 0 && b.seqIds[i + 1] === b.seqIds[i]) out[i] = b.labels[i + 1]!;
    }
  return out;
}

export function countTargets(t: Int32Array): number {
  let n = 0;
  for (const v of t) if (v !== -100) n++;
  return n;
}

function contextOf(b: Batch): ForwardContext {
  return {
    positions: intTensor(b.positionIds, [b.batchSize, b.seqLen]),
    seqIds: intTensor(b.seqIds, [b.batchSize, b.seqLen]),
  };
}

/** Summed cross-entropy of one micro batch (recorded for backward when grad is on). */
function batchLossSum(model: LlamaForCausalLM, b: Batch, targets: Int32Array): Tensor {
  const ids = intTensor(b.inputIds, [b.batchSize, b.seqLen]);
  const logits = model.forward(ids, contextOf(b));
  return crossEntropy(reshape(logits, [-1, model.config.vocab_size]), intTensor(targets), { reduction: 'sum' });
}

/** Mean eval loss over a loader (no gradients). */
export function evaluateLoss(model: LlamaForCausalLM, loader: DataLoader): { loss: number; tokens: number } {
  let sum = 0;
  let tokens = 0;
  const wasTraining = model.training;
  model.eval();
  noGrad(() => {
    for (let i = 0; i < loader.batchesPerEpoch; i++) {
      const b = loader.batchAt(0, i);
      const targets = shiftedTargets(b);
      const n = countTargets(targets);
      if (n === 0) continue;
      sum += tidy(() => batchLossSum(model, b, targets).item());
      tokens += n;
    }
  });
  model.train(wasTraining);
  return { loss: tokens ? sum / tokens : Number.NaN, tokens };
}

function layerParams(layer: { trainableParameters(): [string, Tensor][] }): Tensor[] {
  return layer.trainableParameters().map(([, p]) => p);
}

export async function runTraining(
  cfg: TrainConfig,
  target: TrainTarget,
  data: PreparedData,
  opts: TrainOptions = {},
): Promise<TrainSummary> {
  const log = opts.log ?? ((l: string) => process.stderr.write(`${l}\n`));
  const { model, trainable, rng } = target;
  if (trainable.length === 0) throw new LowrankError('nothing to train: no parameter requires a gradient');
  const out = cfg.output_dir;
  mkdirSync(out, { recursive: true });
  cleanPartialCheckpoints(out);
  const loaders = createLoaders(data, cfg, { padId: target.padId });
  const plan = planSteps(cfg, loaders.train.batchesPerEpoch, loaders.eval !== null);
  const opt = new AdamW(trainable, {
    lr: cfg.learning_rate,
    beta1: cfg.adam_beta1,
    beta2: cfg.adam_beta2,
    eps: cfg.adam_epsilon,
    weightDecay: cfg.weight_decay,
  });
  if (cfg.gradient_checkpointing)
    model.layerRunner = (layer, x, ctx, invFreq) =>
      checkpoint((h) => layer.forward(h, ctx, invFreq), x, layerParams(layer), rng);
  let state: TrainerState = {
    step: 0,
    epoch: 0,
    rng: rng.state(),
    data: loaders.train.position,
    history: [],
    bestEvalLoss: null,
    evalsWithoutImprovement: 0,
    nonFiniteSkipped: 0,
    tokensSeen: 0,
    elapsedSeconds: 0,
  };
  const resumeDir = opts.resume === true ? latestCheckpoint(out) : typeof opts.resume === 'string' ? opts.resume : null;
  if (opts.resume === true && !resumeDir) log(`no checkpoint in ${out}: starting from scratch`);
  if (resumeDir) {
    state = loadCheckpoint(resumeDir, trainable, opt);
    rng.setState(state.rng);
    loaders.train.seek(state.data);
    log(`resumed from ${resumeDir} at step ${state.step}/${plan.totalSteps}`);
  }
  const configYaml = serializeTrainConfig(cfg);
  const writeMetrics = () =>
    writeFileAtomic(
      join(out, 'metrics.jsonl'),
      state.history.map((r) => JSON.stringify(r)).join('\n') + (state.history.length ? '\n' : ''),
    );
  const save = async () => {
    state.rng = rng.state();
    state.data = loaders.train.position;
    const dir = await saveCheckpoint({
      outputDir: out,
      state,
      trainable,
      optimizer: opt,
      configYaml,
      writeArtifact: target.writeArtifact,
      saveTotalLimit: cfg.save_total_limit,
    });
    await writeMetrics();
    log(`saved ${dir}`);
  };
  const runEval = (): number | null => {
    if (!loaders.eval) return null;
    const { loss } = evaluateLoss(model, loaders.eval);
    return loss;
  };

  model.train(true);
  resetPeakMemory();
  const start = performance.now();
  const elapsedBefore = state.elapsedSeconds;
  let tokensThisRun = 0;
  let stepsThisRun = 0;
  let pausedMs = 0; // evaluation and saving: not training time
  let consecutiveBad = 0;
  let lastLoss = Number.NaN;
  let lastEval: number | null = null;
  let stoppedEarly = false;
  const maxBad = opts.maxNonFinite ?? 10;
  let windowLoss = 0;
  let windowSteps = 0;

  while (state.step < plan.totalSteps) {
    const lrNow = cfg.learning_rate * lrLambda(cfg.lr_scheduler, state.step, plan.warmupSteps, plan.totalSteps);
    const lr =
      cfg.lr_scheduler === 'cosine' && cfg.cosine_min_lr_ratio > 0
        ? Math.max(lrNow, state.step < plan.warmupSteps ? 0 : cfg.learning_rate * cfg.cosine_min_lr_ratio)
        : lrNow;
    // gather the accumulation group: its trainable-token count normalises the summed loss
    const micro: { b: Batch; targets: Int32Array }[] = [];
    for (let k = 0; k < cfg.gradient_accumulation_steps; k++) {
      const b = loaders.train.next();
      micro.push({ b, targets: shiftedTargets(b) });
    }
    const tokens = micro.reduce((s, m) => s + countTargets(m.targets), 0);
    let lossSum = 0;
    for (const m of micro) {
      if (countTargets(m.targets) === 0) continue;
      lossSum += tidy(() => {
        const l = batchLossSum(model, m.b, m.targets);
        const v = l.item();
        backward(l);
        return v;
      });
      tokensThisRun += m.b.numTokens;
      state.tokensSeen += m.b.numTokens;
    }
    state.epoch = loaders.train.position.epoch;
    const loss = tokens ? lossSum / tokens : 0;
    const scale = tokens ? 1 / tokens : 0;
    const norm = gradNorm(trainable, scale);
    if (!Number.isFinite(loss) || !Number.isFinite(norm)) {
      opt.zeroGrad();
      state.nonFiniteSkipped++;
      consecutiveBad++;
      log(
        `step ${state.step + 1}: non-finite ${Number.isFinite(loss) ? 'gradient' : 'loss'}; skipped (${consecutiveBad} in a row)`,
      );
      if (consecutiveBad >= maxBad)
        throw new DataError(
          `training stopped: ${consecutiveBad} steps in a row had a non-finite loss or gradient. Lower learning_rate (now ${cfg.learning_rate}), set max_grad_norm, or check the data for degenerate examples`,
        );
      state.step++;
      continue;
    }
    consecutiveBad = 0;
    opt.lr = lr;
    opt.step(scale * clipFactor(norm, cfg.max_grad_norm));
    opt.zeroGrad();
    state.step++;
    lastLoss = loss;
    windowLoss += loss;
    windowSteps++;
    const elapsed = (performance.now() - start - pausedMs) / 1000;
    const tps = tokensThisRun / Math.max(elapsed, 1e-9);
    stepsThisRun++;
    const eta = ((plan.totalSteps - state.step) * elapsed) / stepsThisRun;
    opts.onProgress?.({
      step: state.step,
      total: plan.totalSteps,
      loss,
      lr,
      tokensPerSecond: tps,
      etaSeconds: eta,
      gradNorm: norm,
    });
    if (state.step % plan.loggingSteps === 0 || state.step === plan.totalSteps) {
      const rec: MetricRecord = {
        step: state.step,
        epoch: Number((state.step / plan.stepsPerEpoch).toFixed(4)),
        loss: windowLoss / windowSteps,
        lr,
        grad_norm: norm,
        tokens_per_second: Math.round(tps),
        peak_bytes: memoryStats().peakBytes,
      };
      state.history.push(rec);
      windowLoss = 0;
      windowSteps = 0;
      log(
        `step ${state.step}/${plan.totalSteps} loss ${(rec.loss as number).toFixed(4)} lr ${lr.toExponential(2)} grad_norm ${norm.toFixed(3)} ${Math.round(tps)} tok/s`,
      );
    }
    const pauseStart = performance.now();
    if (plan.evalSteps && (state.step % plan.evalSteps === 0 || state.step === plan.totalSteps)) {
      lastEval = runEval();
      if (lastEval !== null) {
        state.history.push({ step: state.step, eval_loss: lastEval, eval_perplexity: Math.exp(lastEval) });
        log(`step ${state.step}: eval_loss ${lastEval.toFixed(4)} perplexity ${Math.exp(lastEval).toFixed(3)}`);
        if (state.bestEvalLoss === null || lastEval < state.bestEvalLoss) {
          state.bestEvalLoss = lastEval;
          state.evalsWithoutImprovement = 0;
        } else state.evalsWithoutImprovement++;
        if (cfg.early_stopping_patience && state.evalsWithoutImprovement >= cfg.early_stopping_patience) {
          log(`early stopping: eval_loss has not improved for ${state.evalsWithoutImprovement} evaluations`);
          stoppedEarly = true;
        }
      }
    }
    state.elapsedSeconds = elapsedBefore + (performance.now() - start) / 1000;
    if (state.step % plan.saveSteps === 0 || state.step === plan.totalSteps || stoppedEarly) await save();
    pausedMs += performance.now() - pauseStart;
    if (stoppedEarly) break;
  }
  model.layerRunner = null;
  model.eval();
  await writeMetrics();
  const wall = (performance.now() - start) / 1000;
  const summary: TrainSummary = {
    steps: state.step,
    finalLoss: lastLoss,
    evalLoss: lastEval,
    history: state.history,
    tokensPerSecond: tokensThisRun / Math.max(wall - pausedMs / 1000, 1e-9),
    peakBytes: memoryStats().peakBytes,
    wallSeconds: state.elapsedSeconds,
    stoppedEarly,
    outputDir: out,
  };
  await target.writeArtifact(out);
  writeFileSync(join(out, 'data_report.txt'), data.reportText);
  opt.dispose();
  return summary;
}
