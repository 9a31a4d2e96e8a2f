// Causal self-attention with grouped-query heads as one fused op: scores, scale, mask, softmax and the
// weighted sum of values. The forward saves q, k, v, the output and the per-row log-sum-exp, never the
// Tq x Tk probabilities; the backward recomputes them row by row (flash-attention style).
// Masking: causal with an offset (queries are the last Tq of Tk positions, so decoding against a KV cache
// works), an optional key padding mask, optional sequence ids for packed sequences (block-diagonal causal)
// and an optional sliding window.

import { getBackend } from '../backend/index.ts';
import type { AttentionArgs } from '../backend/kernels/attention.ts';
import { DTypeError, fmtShape, ShapeError } from '../core/errors.ts';
import type { Tensor } from '../core/tensor.ts';
import { emptyForOutput } from './create.ts';
import { contiguous } from './shape.ts';
import { noGrad, record } from './tape.ts';

export interface AttentionOptions {
  /** Score scale; default 1 / sqrt(D). */
  scale?: number;
  /** Key padding mask, u8 or i32 [B, Tk]: 1 = attend, 0 = padding. */
  keyMask?: Tensor | null;
  /**
   * Sequence ids, i32 [B, Tk], for packed sequences: a query attends only to keys with its own id (the id at
   * its absolute position Tk - Tq + i).
   */
  seqIds?: Tensor | null;
  /** Sliding window (Mistral's sliding_window): a query sees only the last `slidingWindow` keys, itself included. */
  slidingWindow?: number | null;
}

const isFloatT = (t: Tensor) => t.dtype === 'f32' || t.dtype === 'bf16' || t.dtype === 'f16';

function maskArg(
  name: string,
  m: Tensor | null | undefined,
  B: number,
  Tk: number,
  dtypes: readonly string[],
): Tensor | null {
  if (!m) return null;
  if (!dtypes.includes(m.dtype))
    throw new DTypeError(`attention: ${name} must be ${dtypes.join(' or ')}, got ${m.dtype}`);
  if (m.ndim !== 2 || m.shape[0] !== B || m.shape[1] !== Tk)
    throw new ShapeError(`attention: ${name} ${fmtShape(m.shape)} must be [B, Tk] = [${B}, ${Tk}]`);
  return m.isContiguous() ? m : noGrad(() => contiguous(m));
}

/**
 * softmax(scale * q k^T + mask) v for q [B, Tq, Hq, D] and k, v [B, Tk, Hkv, D] (f32, bf16 or f16; k and v
 * may be strided views such as the first Tk positions of a KV cache). Query head h uses kv head
 * floor(h / (Hq / Hkv)); query i sits at position Tk - Tq + i. Returns out [B, Tq, Hq, D] f32 contiguous;
 * a query that sees no key outputs zeros.
 */
export function attention(q: Tensor, k: Tensor, v: Tensor, opts: AttentionOptions = {}): Tensor {
  const shapes = () => `q ${fmtShape(q.shape)}, k ${fmtShape(k.shape)}, v ${fmtShape(v.shape)}`; // for errors only
  if (q.ndim !== 4 || k.ndim !== 4 || v.ndim !== 4)
    throw new ShapeError(`attention: q, k, v must be [B, T, H, D], got ${shapes()}`);
  if (!isFloatT(q) || !isFloatT(k) || !isFloatT(v))
    throw new DTypeError(`attention: q, k, v must be float tensors, got ${q.dtype}, ${k.dtype}, ${v.dtype}`);
  const [B, Tq, Hq, D] = q.shape as [number, number, number, number];
  const [Bk, Tk, Hkv, Dk] = k.shape as [number, number, number, number];
  if (Bk !== B || Dk !== D || k.shape.some((d, i) => d !== v.shape[i]))
    throw new ShapeError(`attention: batch and head dims must agree and k, v must have one shape; got ${shapes()}`);
  if (Hkv === 0 || Hq % Hkv !== 0)
    throw new ShapeError(`attention: query heads ${Hq} must be a multiple of kv heads ${Hkv} (${shapes()})`);
  if (Tq > Tk) throw new ShapeError(`attention: more queries (${Tq}) than keys (${Tk}) (${shapes()})`);
  const scale = opts.scale ?? 1 / Math.sqrt(D);
  if (!Number.isFinite(scale)) throw new ShapeError(`attention: scale must be finite, got ${scale}`);
  const window = opts.slidingWindow ?? 0;
  if (!Number.isInteger(window) || window < 0)
    throw new ShapeError(`attention: slidingWindow must be a non-negative integer, got ${window}`);
  const keyMask = maskArg('keyMask', opts.keyMask, B, Tk, ['u8', 'i32']);
  const seqIds = maskArg('seqIds', opts.seqIds, B, Tk, ['i32']);
  // the kernel reads rows with strides; only the innermost dim must be packed
  const packed = (t: Tensor) => (t.shape[3]! <= 1 || t.strides[3] === 1 ? t : noGrad(() => contiguous(t)));
  const qk = packed(q);
  const kk = packed(k);
  const vk = packed(v);

  const args: AttentionArgs = { q: qk, k: kk, v: vk, scale, keyMask, seqIds, window };
  const out = emptyForOutput([B, Tq, Hq, D]);
  const lse = emptyForOutput([B, Hq, Tq]);
  getBackend().attentionForward(args, out, lse);

  const saved = [qk, kk, vk, out, lse];
  if (keyMask) saved.push(keyMask);
  if (seqIds) saved.push(seqIds);
  const result = record(
    out,
    'attention',
    [q, k, v],
    (g, needs, s) => {
      const [sq, sk, sv, so, sl] = s as [Tensor, Tensor, Tensor, Tensor, Tensor];
      let at = 5;
      const sm = keyMask ? s[at++]! : null;
      const ss = seqIds ? s[at++]! : null;
      const dq = needs[0] ? emptyForOutput(sq.shape) : null;
      const dk = needs[1] ? emptyForOutput(sk.shape) : null;
      const dv = needs[2] ? emptyForOutput(sv.shape) : null;
      if (dq || dk || dv)
        getBackend().attentionBackward(
          { q: sq, k: sk, v: sv, scale, keyMask: sm, seqIds: ss, window },
          so,
          sl,
          g,
          dq,
          dk,
          dv,
        );
      return [dq, dk, dv];
    },
    saved,
  );
  // record holds its own handles on what it saved; drop the temporaries made here
  lse.dispose();
  for (const [t, orig] of [
    [qk, q],
    [kk, k],
    [vk, v],
    [keyMask, opts.keyMask],
    [seqIds, opts.seqIds],
  ] as const)
    if (t && t !== orig) t.dispose();
  return result;
}
