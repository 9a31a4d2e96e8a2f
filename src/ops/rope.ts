// Rotary position embedding (RoPE), HF Llama convention: the first rotary_dim dims of each head split in two
// halves that rotate as pairs (j, j + rotary_dim/2) ("rotate_half", not interleaved pairs); the remaining
// dims pass through (partial rotary, HF's partial_rotary_factor). Positions are per token, so packed
// sequences restart at 0. The scaling variants only change the inverse-frequency table, which a model
// computes once with ropeInvFreq(); the op is one node whose backward is the inverse rotation.

import { getBackend } from '../backend/index.ts';
import { ConfigError, DTypeError, fmtShape, ShapeError } from '../core/errors.ts';
import { Tensor } from '../core/tensor.ts';
import { empty, emptyForOutput } from './create.ts';
import { f32c } from './shape.ts';
import { noGrad, record } from './tape.ts';

/** rope_scaling variants. `linear` divides positions by factor; `llama3` is Llama 3.1's frequency-dependent one. */
export type RopeScaling =
  | { type: 'linear'; factor: number }
  | {
      type: 'llama3';
      factor: number;
      lowFreqFactor: number;
      highFreqFactor: number;
      originalMaxPositionEmbeddings: number;
    };

export interface RopeConfig {
  /** rope_theta, the frequency base (10000 for Llama 2, 500000 for Llama 3). */
  theta: number;
  /** The head dim D. */
  headDim: number;
  /** Dims that rotate (even, <= headDim); default headDim. HF: int(head_dim * partial_rotary_factor). */
  rotaryDim?: number;
  scaling?: RopeScaling | null;
}

function checkConfig(cfg: RopeConfig): number {
  const R = cfg.rotaryDim ?? cfg.headDim;
  if (!Number.isInteger(cfg.headDim) || cfg.headDim <= 0)
    throw new ConfigError(`rope: head_dim must be a positive integer, got ${cfg.headDim}`);
  if (!Number.isInteger(R) || R <= 0 || R % 2 !== 0 || R > cfg.headDim)
    throw new ConfigError(`rope: rotary_dim ${R} must be even, positive and at most head_dim ${cfg.headDim}`);
  if (!(cfg.theta > 0 && Number.isFinite(cfg.theta)))
    throw new ConfigError(`rope: rope_theta must be a positive number, got ${cfg.theta}`);
  const s = cfg.scaling;
  if (s) {
    if (!(s.factor > 0 && Number.isFinite(s.factor)))
      throw new ConfigError(`rope: rope_scaling.factor must be a positive number, got ${s.factor}`);
    if (s.type === 'llama3') {
      if (!(s.highFreqFactor > s.lowFreqFactor && s.lowFreqFactor > 0))
        throw new ConfigError(
          `rope: rope_scaling needs high_freq_factor > low_freq_factor > 0, got ${s.highFreqFactor} and ${s.lowFreqFactor}`,
        );
      if (!(s.originalMaxPositionEmbeddings > 0))
        throw new ConfigError(
          `rope: rope_scaling.original_max_position_embeddings must be positive, got ${s.originalMaxPositionEmbeddings}`,
        );
    }
  }
  return R;
}

/**
 * The inverse frequencies, rotary_dim/2 values, as transformers' ROPE_INIT_FUNCTIONS compute them (in f32:
 * inv_freq[i] = 1 / theta^(2i / rotary_dim), then the scaling variant).
 */
export function computeInvFreq(cfg: RopeConfig): Float32Array {
  const R = checkConfig(cfg);
  const f = Math.fround;
  const half = R / 2;
  const inv = new Float32Array(half);
  // default: 1.0 / (base ** (arange(0, dim, 2).float() / dim)), each step in f32
  for (let i = 0; i < half; i++) inv[i] = f(1 / f(cfg.theta ** f((2 * i) / R)));
  const s = cfg.scaling;
  if (s?.type === 'linear') {
    // positions / factor == inv_freq / factor (what HF does)
    for (let i = 0; i < half; i++) inv[i] = f(inv[i]! / s.factor);
  } else if (s?.type === 'llama3') {
    // transformers' _compute_llama3_parameters: keep high frequencies, divide low ones by factor,
    // interpolate smoothly between the two wavelength bounds
    const lowFreqWavelen = s.originalMaxPositionEmbeddings / s.lowFreqFactor;
    const highFreqWavelen = s.originalMaxPositionEmbeddings / s.highFreqFactor;
    for (let i = 0; i < half; i++) {
      const x = inv[i]!;
      const wavelen = (2 * Math.PI) / x;
      if (wavelen < highFreqWavelen) continue;
      if (wavelen > lowFreqWavelen) inv[i] = f(x / s.factor);
      else {
        const smooth =
          (s.originalMaxPositionEmbeddings / wavelen - s.lowFreqFactor) / (s.highFreqFactor - s.lowFreqFactor);
        inv[i] = f((1 - smooth) * (x / s.factor) + smooth * x);
      }
    }
  }
  return inv;
}

/** The inverse-frequency table as a tensor (f32 [rotary_dim / 2]), computed once per model. */
export function ropeInvFreq(cfg: RopeConfig): Tensor {
  return Tensor.fromTyped(computeInvFreq(cfg), [checkConfig(cfg) / 2], 'f32');
}

function num(cfg: Record<string, unknown>, key: string, where: string, fallback?: number): number {
  const v = cfg[key];
  if (v === undefined || v === null) {
    if (fallback !== undefined) return fallback;
    throw new ConfigError(`${where}: missing "${key}"`);
  }
  if (typeof v !== 'number' || !Number.isFinite(v))
    throw new ConfigError(`${where}: "${key}" must be a number, got ${JSON.stringify(v)}`);
  return v;
}

/**
 * A RopeConfig from a Hugging Face config.json object: rope_theta, head_dim (or hidden_size /
 * num_attention_heads), partial_rotary_factor, rope_scaling (`type` or `rope_type`: default, linear, llama3),
 * or the newer `rope_parameters` holding the same keys.
 */
export function ropeConfigFromHF(hf: Record<string, unknown>): RopeConfig {
  const params =
    hf.rope_parameters && typeof hf.rope_parameters === 'object'
      ? (hf.rope_parameters as Record<string, unknown>)
      : null;
  const theta =
    params && params.rope_theta != null
      ? num(params, 'rope_theta', 'config.json rope_parameters')
      : num(hf, 'rope_theta', 'config.json', 10000);
  const headDim =
    hf.head_dim != null
      ? num(hf, 'head_dim', 'config.json')
      : num(hf, 'hidden_size', 'config.json') / num(hf, 'num_attention_heads', 'config.json');
  const prf =
    params && params.partial_rotary_factor != null
      ? num(params, 'partial_rotary_factor', 'config.json rope_parameters')
      : num(hf, 'partial_rotary_factor', 'config.json', 1);
  const rotaryDim = Math.trunc(headDim * prf);
  const rs =
    params ??
    (hf.rope_scaling && typeof hf.rope_scaling === 'object' ? (hf.rope_scaling as Record<string, unknown>) : null);
  const where = params ? 'config.json rope_parameters' : 'config.json rope_scaling';
  const type = rs ? (rs.rope_type ?? rs.type ?? 'default') : 'default';
  let scaling: RopeScaling | null = null;
  if (type === 'linear') scaling = { type: 'linear', factor: num(rs!, 'factor', where) };
  else if (type === 'llama3')
    scaling = {
      type: 'llama3',
      factor: num(rs!, 'factor', where),
      lowFreqFactor: num(rs!, 'low_freq_factor', where),
      highFreqFactor: num(rs!, 'high_freq_factor', where),
      originalMaxPositionEmbeddings: num(rs!, 'original_max_position_embeddings', where),
    };
  else if (type !== 'default')
    throw new ConfigError(
      `${where}: rope type ${JSON.stringify(type)} is not supported (supported: default, linear, llama3); remove rope_scaling to use plain RoPE`,
    );
  const cfg: RopeConfig = { theta, headDim, rotaryDim, scaling };
  checkConfig(cfg);
  return cfg;
}

/**
 * Applies RoPE to x [B, T, H, D] (any float dtype, any layout; out is contiguous f32) at positions
 * (i32 [B, T], or [T] shared by the batch) with the table from ropeInvFreq (rotary_dim = 2 * its length).
 */
export function rope(x: Tensor, positions: Tensor, invFreq: Tensor): Tensor {
  if (x.ndim !== 4) throw new ShapeError(`rope: x must be [B, T, H, D], got ${fmtShape(x.shape)}`);
  const [B, T, , D] = x.shape as [number, number, number, number];
  if (x.dtype === 'i32' || x.dtype === 'u8') throw new DTypeError(`rope: x must be a float tensor, got ${x.dtype}`);
  if (positions.dtype !== 'i32') throw new DTypeError(`rope: positions must be i32, got ${positions.dtype}`);
  const posOk =
    (positions.ndim === 2 && positions.shape[0] === B && positions.shape[1] === T) ||
    (positions.ndim === 1 && positions.shape[0] === T);
  if (!posOk)
    throw new ShapeError(
      `rope: positions ${fmtShape(positions.shape)} do not fit x ${fmtShape(x.shape)} (want [B, T] or [T])`,
    );
  if (invFreq.dtype !== 'f32' || invFreq.ndim !== 1)
    throw new DTypeError(`rope: invFreq must be 1-D f32, got ${fmtShape(invFreq.shape)} ${invFreq.dtype}`);
  if (2 * invFreq.size > D || invFreq.size === 0)
    throw new ShapeError(
      `rope: rotary_dim ${2 * invFreq.size} (invFreq ${fmtShape(invFreq.shape)}) does not fit head dim ${D}`,
    );

  const be = getBackend();
  // the kernel's layouts: contiguous f32 x, contiguous i32 [B, T] positions and f32 invFreq
  const pos = noGrad(() => {
    if (positions.ndim === 2 && positions.isContiguous()) return positions;
    const p = empty([B, T], 'i32');
    const src = positions.ndim === 1 ? positions.view([B, T], [0, positions.strides[0]!], positions.offset) : positions;
    be.copy(src, p);
    if (src !== positions) src.dispose();
    return p;
  });
  const freq = invFreq.isContiguous() ? invFreq : noGrad(() => f32c(invFreq));
  const xc = x.dtype === 'f32' && x.isContiguous() ? x : noGrad(() => f32c(x));
  const out = emptyForOutput(x.shape);
  be.ropeForward(xc, pos, freq, out);
  if (xc !== x) xc.dispose();
  const xShape = x.shape;
  const result = record(
    out,
    'rope',
    [x],
    (g, needs, [sp, sf]) => {
      if (!needs[0]) return [null];
      const gx = emptyForOutput(xShape);
      getBackend().ropeBackward(g, sp!, sf!, gx);
      return [gx];
    },
    [pos, freq],
  );
  if (pos !== positions) pos.dispose();
  if (freq !== invFreq) freq.dispose();
  return result;
}
