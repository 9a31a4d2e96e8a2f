// Checkpoints: everything needed to resume exactly. A checkpoint is a folder `checkpoint-<step>` written
// under a temporary name and renamed into place, so a crash at any moment leaves either the whole
// checkpoint or none (a leftover temporary folder is ignored and removed).
//
//   trainable.safetensors   the trainable tensors, by module path
//   optimizer.safetensors   AdamW moments (<name>.exp_avg, <name>.exp_avg_sq)
//   trainer_state.json      step, optimizer step, RNG state, data position, metric history, early stopping
//   config.yaml             the normalised training config
//   adapter/ (or model/)    the adapter in PEFT format (or the full model), for use as is

import { existsSync, mkdirSync, readdirSync, readFileSync, renameSync, rmSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { FormatError } from '../core/errors.ts';
import type { Tensor } from '../core/tensor.ts';
import { writeFileAtomic } from '../formats/atomic.ts';
import { openSafetensors, saveSafetensors, type TensorSource } from '../formats/safetensors.ts';
import { fillFromRaw, toRaw } from '../models/weights.ts';
import type { DataPosition } from './data-pack.ts';
import type { AdamW } from './optim.ts';

export interface MetricRecord {
  step: number;
  [key: string]: number | string | null;
}

export interface TrainerState {
  /** Optimizer steps completed. */
  step: number;
  epoch: number;
  rng: { s: number[]; spare: number | null };
  data: DataPosition;
  history: MetricRecord[];
  bestEvalLoss: number | null;
  evalsWithoutImprovement: number;
  nonFiniteSkipped: number;
  tokensSeen: number;
  elapsedSeconds: number;
}

const PREFIX = 'checkpoint-';

export function checkpointDirs(outputDir: string): { step: number; dir: string }[] {
  if (!existsSync(outputDir)) return [];
  return readdirSync(outputDir)
    .filter((n) => n.startsWith(PREFIX) && /^\d+$/.test(n.slice(PREFIX.length)))
    .map((n) => ({ step: Number(n.slice(PREFIX.length)), dir: join(outputDir, n) }))
    .filter((c) => existsSync(join(c.dir, 'trainer_state.json')))
    .sort((a, b) => a.step - b.step);
}

export function latestCheckpoint(outputDir: string): string | null {
  const all = checkpointDirs(outputDir);
  return all.length ? all[all.length - 1]!.dir : null;
}

/** Removes temporary folders left by a crash during a save. */
export function cleanPartialCheckpoints(outputDir: string): void {
  if (!existsSync(outputDir)) return;
  for (const n of readdirSync(outputDir))
    if (n.startsWith(PREFIX) && n.includes('.partial')) rmSync(join(outputDir, n), { recursive: true, force: true });
}

export interface SaveCheckpointArgs {
  outputDir: string;
  state: TrainerState;
  trainable: readonly [string, Tensor][];
  optimizer: AdamW;
  configYaml: string;
  /** Writes the user-facing artefact (PEFT adapter or full model) into the given folder. */
  writeArtifact: (dir: string) => Promise<void>;
  saveTotalLimit: number | null;
}

export async function saveCheckpoint(a: SaveCheckpointArgs): Promise<string> {
  const final = join(a.outputDir, `${PREFIX}${a.state.step}`);
  const tmp = `${final}.partial-${process.pid}`;
  rmSync(tmp, { recursive: true, force: true });
  mkdirSync(tmp, { recursive: true });
  const trainable: Record<string, TensorSource> = {};
  for (const [name, t] of a.trainable) trainable[name] = toRaw(t);
  await saveSafetensors(join(tmp, 'trainable.safetensors'), trainable);
  const opt = a.optimizer.state();
  const moments: Record<string, TensorSource> = {};
  for (const [name, { m, v }] of Object.entries(opt.moments)) {
    const shape = [m.length];
    moments[`${name}.exp_avg`] = { dtype: 'F32', shape, data: new Uint8Array(m.buffer, m.byteOffset, m.byteLength) };
    moments[`${name}.exp_avg_sq`] = { dtype: 'F32', shape, data: new Uint8Array(v.buffer, v.byteOffset, v.byteLength) };
  }
  await saveSafetensors(join(tmp, 'optimizer.safetensors'), moments, { step: String(opt.step) });
  await writeFileAtomic(join(tmp, 'trainer_state.json'), `${JSON.stringify(a.state, null, 1)}\n`);
  await writeFileAtomic(join(tmp, 'config.yaml'), a.configYaml);
  await a.writeArtifact(join(tmp, 'adapter'));
  rmSync(final, { recursive: true, force: true });
  renameSync(tmp, final);
  if (a.saveTotalLimit) {
    const all = checkpointDirs(a.outputDir);
    for (const c of all.slice(0, Math.max(0, all.length - a.saveTotalLimit)))
      rmSync(c.dir, { recursive: true, force: true });
  }
  return final;
}

/** Restores trainable tensors and optimizer moments in place; returns the trainer state. */
export function loadCheckpoint(dir: string, trainable: readonly [string, Tensor][], optimizer: AdamW): TrainerState {
  const stateFile = join(dir, 'trainer_state.json');
  if (!existsSync(stateFile) || !statSync(dir).isDirectory())
    throw new FormatError(`${dir}: not a lowrank checkpoint (no trainer_state.json)`);
  let state: TrainerState;
  try {
    state = JSON.parse(readFileSync(stateFile, 'utf8'));
  } catch (e) {
    throw new FormatError(`${stateFile}: invalid JSON: ${(e as Error).message}`);
  }
  const tr = openSafetensors(join(dir, 'trainable.safetensors'));
  try {
    for (const [name, t] of trainable) {
      if (!tr.has(name))
        throw new FormatError(`${tr.path}: no tensor '${name}': the checkpoint was made with another adapter setup`);
      fillFromRaw(t, tr.read(name), `${tr.path}: '${name}'`);
    }
  } finally {
    tr.close();
  }
  const op = openSafetensors(join(dir, 'optimizer.safetensors'));
  try {
    const moments: Record<string, { m: Float32Array; v: Float32Array }> = {};
    for (const [name] of trainable) {
      const m = op.read(`${name}.exp_avg`);
      const v = op.read(`${name}.exp_avg_sq`);
      moments[name] = {
        m: new Float32Array(m.data.buffer, m.data.byteOffset, m.data.byteLength / 4),
        v: new Float32Array(v.data.buffer, v.data.byteOffset, v.data.byteLength / 4),
      };
    }
    optimizer.loadState({ step: Number(op.metadata.step ?? state.step), moments });
  } finally {
    op.close();
  }
  return state;
}
