// TypeScript reference kernels for LoRA: the DoRA weight norm, one output row at a time (f64 accumulation).

import type { Tensor } from '../../core/tensor.ts';
import type { LoraKernels } from '../kernels/lora.ts';
import { f32, reader } from './js-core.ts';

function loraWeightNorm(
  w: Tensor,
  a: Tensor,
  b: Tensor,
  scale: number,
  out: Tensor,
  outF: number,
  inF: number,
  r: number,
  wTransposed: boolean,
): void {
  const rw = reader(w);
  const ad = f32(a);
  const bd = f32(b);
  const o = f32(out);
  const row = new Float64Array(inF);
  for (let oi = 0; oi < outF; oi++) {
    for (let i = 0; i < inF; i++) row[i] = rw(w.offset + (wTransposed ? i * outF + oi : oi * inF + i));
    for (let j = 0; j < r; j++) {
      const bv = scale * bd[b.offset + oi * r + j]!;
      if (bv === 0) continue;
      const ao = a.offset + j * inF;
      for (let i = 0; i < inF; i++) row[i] += bv * ad[ao + i]!;
    }
    let s = 0;
    for (let i = 0; i < inF; i++) s += row[i]! * row[i]!;
    o[out.offset + oi] = Math.sqrt(s);
  }
}

export const jsLoraKernels: LoraKernels = { loraWeightNorm };
