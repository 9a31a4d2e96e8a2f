// TypeScript reference kernels for cross-entropy fused with log-softmax. O(rows * vocab), no temporaries
// beyond O(rows); log-sum-exp and the loss sum in f64.

import { IndexError } from '../../core/errors.ts';
import type { Tensor } from '../../core/tensor.ts';
import type { LossKernels, LossReduction } from '../kernels/loss.ts';
import { f32, i32 } from './js-core.ts';
import { fmtPosition } from './js-embedding.ts';

function checkTargets(targets: Tensor, rows: number, vocab: number, ignoreIndex: number): number {
  const t = i32(targets);
  let count = 0;
  for (let r = 0; r < rows; r++) {
    const v = t[targets.offset + r]!;
    if (v === ignoreIndex) continue;
    if (v < 0 || v >= vocab)
      throw new IndexError(
        `crossEntropy: target ${v} at position ${fmtPosition(targets.shape, r)} of targets ${JSON.stringify(targets.shape)} is out of range [0, ${vocab}) and is not the ignore index ${ignoreIndex}`,
      );
    count++;
  }
  return count;
}

function crossEntropyForward(
  logits: Tensor,
  targets: Tensor,
  lse: Tensor,
  loss: Tensor,
  rows: number,
  vocab: number,
  ignoreIndex: number,
  reduction: LossReduction,
): void {
  const count = checkTargets(targets, rows, vocab, ignoreIndex);
  const x = f32(logits);
  const t = i32(targets);
  const ld = f32(lse);
  const out = f32(loss);
  let total = 0;
  for (let r = 0; r < rows; r++) {
    const target = t[targets.offset + r]!;
    let rowLoss = 0;
    let rowLse = 0;
    if (target !== ignoreIndex) {
      const base = logits.offset + r * vocab;
      let m = Number.NEGATIVE_INFINITY;
      for (let j = 0; j < vocab; j++) {
        const v = x[base + j]!;
        if (v > m || Number.isNaN(v)) m = v;
      }
      let s = 0;
      for (let j = 0; j < vocab; j++) s += Math.exp(x[base + j]! - m);
      rowLse = m + Math.log(s);
      rowLoss = rowLse - x[base + target]!;
    }
    ld[lse.offset + r] = rowLse;
    if (reduction === 'none') out[loss.offset + r] = rowLoss;
    else total += rowLoss;
  }
  if (reduction === 'sum') out[loss.offset] = total;
  else if (reduction === 'mean') out[loss.offset] = count > 0 ? total / count : 0;
}

function crossEntropyBackward(
  gradOut: Tensor,
  logits: Tensor,
  targets: Tensor,
  lse: Tensor,
  dlogits: Tensor,
  rows: number,
  vocab: number,
  ignoreIndex: number,
  reduction: LossReduction,
): void {
  const g = f32(gradOut);
  const x = f32(logits);
  const t = i32(targets);
  const ld = f32(lse);
  const o = f32(dlogits);
  let count = 0;
  if (reduction === 'mean') for (let r = 0; r < rows; r++) if (t[targets.offset + r]! !== ignoreIndex) count++;
  const shared = reduction === 'mean' ? (count > 0 ? g[gradOut.offset]! / count : 0) : g[gradOut.offset]!;
  for (let r = 0; r < rows; r++) {
    const target = t[targets.offset + r]!;
    const ob = dlogits.offset + r * vocab;
    if (target === ignoreIndex) {
      o.fill(0, ob, ob + vocab);
      continue;
    }
    const scale = reduction === 'none' ? g[gradOut.offset + r]! : shared;
    const base = logits.offset + r * vocab;
    const l = ld[lse.offset + r]!;
    for (let j = 0; j < vocab; j++) o[ob + j] = Math.exp(x[base + j]! - l) * scale;
    o[ob + target] = (Math.exp(x[base + target]! - l) - 1) * scale;
  }
}

export const jsLossKernels: LossKernels = { crossEntropyForward, crossEntropyBackward };
