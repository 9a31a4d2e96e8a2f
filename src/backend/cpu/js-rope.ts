// TypeScript reference for the rope kernels: per token, the cos/sin of every frequency once, then every
// head rotated with them.

import type { Tensor } from '../../core/tensor.ts';
import type { RopeKernels } from '../kernels/rope.ts';
import { f32, i32 } from './js-core.ts';

/** Rotates every head of x by +angle (sign 1) or -angle (sign -1) into out; out may be x. */
function rotate(x: Tensor, positions: Tensor, invFreq: Tensor, out: Tensor, sign: 1 | -1): void {
  const [B, T, H, D] = x.shape as [number, number, number, number];
  const half = invFreq.size;
  const xd = f32(x);
  const od = f32(out);
  const pd = i32(positions);
  const fd = f32(invFreq);
  const inPlace = xd === od && x.offset === out.offset;
  const cos = new Float64Array(half);
  const sin = new Float64Array(half);
  for (let bt = 0; bt < B * T; bt++) {
    // the angle is rounded to f32 as HF computes it (inv_freq @ position_ids in f32)
    const pos = Math.fround(pd[positions.offset + bt]!);
    for (let j = 0; j < half; j++) {
      const a = Math.fround(pos * fd[invFreq.offset + j]!);
      cos[j] = Math.cos(a);
      sin[j] = sign * Math.sin(a);
    }
    for (let h = 0; h < H; h++) {
      const xi = x.offset + (bt * H + h) * D;
      const oi = out.offset + (bt * H + h) * D;
      for (let j = 0; j < half; j++) {
        const x1 = xd[xi + j]!;
        const x2 = xd[xi + j + half]!;
        od[oi + j] = x1 * cos[j]! - x2 * sin[j]!;
        od[oi + j + half] = x2 * cos[j]! + x1 * sin[j]!;
      }
      if (!inPlace) for (let d = 2 * half; d < D; d++) od[oi + d] = xd[xi + d]!;
    }
  }
}

export const jsRopeKernels: RopeKernels = {
  ropeForward(x, positions, invFreq, out) {
    rotate(x, positions, invFreq, out, 1);
  },
  ropeBackward(g, positions, invFreq, gx) {
    rotate(g, positions, invFreq, gx, -1);
  },
};
