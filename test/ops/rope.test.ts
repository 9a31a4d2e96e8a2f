import assert from 'node:assert/strict';
import { test } from 'node:test';
import { getBackend } from '../../src/backend/index.ts';
import { ConfigError, DTypeError, ShapeError } from '../../src/core/errors.ts';
import { Rng } from '../../src/core/rng.ts';
import type { Tensor } from '../../src/core/tensor.ts';
import { intTensor, tensor } from '../../src/ops/create.ts';
import { computeInvFreq, type RopeConfig, rope, ropeConfigFromHF, ropeInvFreq } from '../../src/ops/rope.ts';
import { permute } from '../../src/ops/shape.ts';
import { backward } from '../../src/ops/tape.ts';
import { gradcheck, randomTensor } from '../helpers/gradcheck.ts';

const rng = new Rng(11);
const R = (shape: number[], req = true) => randomTensor(shape, rng, 1, req);

/** HF's apply_rotary_pos_emb written out: emb = cat(freqs, freqs); x * cos + rotate_half(x) * sin. */
function naiveRope(x: Tensor, pos: number[][], inv: Float32Array): Float64Array {
  const [B, T, H, D] = x.shape as number[] as [number, number, number, number];
  const xv = x.toF32();
  const R2 = inv.length * 2;
  const half = inv.length;
  const out = new Float64Array(xv.length);
  for (let b = 0; b < B; b++)
    for (let t = 0; t < T; t++)
      for (let h = 0; h < H; h++) {
        const base = ((b * T + t) * H + h) * D;
        for (let d = 0; d < D; d++) {
          if (d >= R2) {
            out[base + d] = xv[base + d]!;
            continue;
          }
          const a = pos[b]![t]! * inv[d % half]!;
          const rotated = d < half ? -xv[base + d + half]! : xv[base + d - half]!;
          out[base + d] = xv[base + d]! * Math.cos(a) + rotated * Math.sin(a);
        }
      }
  return out;
}

function assertClose(actual: ArrayLike<number>, expected: ArrayLike<number>, tol: number, what: string): void {
  assert.equal(actual.length, expected.length, `${what}: length`);
  for (let i = 0; i < actual.length; i++) {
    const a = actual[i]!;
    const e = expected[i]!;
    assert.ok(Math.abs(a - e) <= tol * (1 + Math.abs(e)), `${what}[${i}]: ${a} vs ${e}`);
  }
}

const LLAMA31: RopeConfig = {
  theta: 500000,
  headDim: 128,
  scaling: { type: 'llama3', factor: 8, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositionEmbeddings: 8192 },
};

test('default inverse frequencies are 1 / theta^(2i/d)', () => {
  const inv = computeInvFreq({ theta: 10000, headDim: 8 });
  assertClose(inv, [1, 0.1, 0.01, 0.001], 1e-7, 'inv_freq');
  const partial = computeInvFreq({ theta: 10000, headDim: 64, rotaryDim: 16 });
  assert.equal(partial.length, 8);
  assertClose(
    partial,
    [...Array(8).keys()].map((i) => 10000 ** (-(2 * i) / 16)),
    1e-7,
    'partial inv_freq',
  );
  const t = ropeInvFreq({ theta: 10000, headDim: 8 });
  assert.deepEqual(t.shape, [4]);
  assert.equal(t.dtype, 'f32');
});

test('llama3 inverse frequencies match Llama-3.1 (factor 8, low 1, high 4, original 8192, theta 500000)', () => {
  const inv = computeInvFreq(LLAMA31);
  assert.equal(inv.length, 64);
  const base = (i: number) => 500000 ** (-(2 * i) / 128);
  // the bands by wavelength 2*pi/inv_freq: < 8192/4 = 2048 kept (i <= 28: wavelen(28) = 1956.5),
  // > 8192 divided by 8 (i >= 35: wavelen(35) = 8218.7), in between smoothly interpolated (i = 29..34)
  for (let i = 0; i <= 28; i++) assertClose([inv[i]!], [base(i)], 2e-7, `kept ${i}`);
  for (let i = 35; i < 64; i++) assertClose([inv[i]!], [base(i) / 8], 2e-7, `divided ${i}`);
  for (let i = 29; i <= 34; i++) {
    const wavelen = (2 * Math.PI) / base(i);
    const smooth = (8192 / wavelen - 1) / (4 - 1);
    assertClose([inv[i]!], [(1 - smooth) * (base(i) / 8) + smooth * base(i)], 2e-7, `smoothed ${i}`);
  }
  // a few values worked out by hand:
  //   i = 0: 1; i = 63: 500000^(-126/128) / 8
  //   i = 30: inv = 500000^(-60/128) = 0.0021312 -> wavelen 2948.2, smooth = (8192/2948.2 - 1)/3 = 0.59289,
  //           (1 - 0.59289) * inv / 8 + 0.59289 * inv = 0.0013720
  assert.equal(inv[0], 1);
  assertClose([inv[63]!], [3.0689e-7], 1e-4, 'i = 63');
  assertClose([inv[30]!], [0.001372], 1e-4, 'i = 30');
  // and ropeConfigFromHF reads the same config from config.json keys
  const fromHF = ropeConfigFromHF({
    hidden_size: 4096,
    num_attention_heads: 32,
    rope_theta: 500000,
    rope_scaling: {
      factor: 8.0,
      low_freq_factor: 1.0,
      high_freq_factor: 4.0,
      original_max_position_embeddings: 8192,
      rope_type: 'llama3',
    },
  });
  assert.deepEqual(computeInvFreq(fromHF), inv);
});

test('linear scaling divides positions by the factor', () => {
  const cfg: RopeConfig = { theta: 10000, headDim: 6, scaling: { type: 'linear', factor: 4 } };
  assertClose(
    computeInvFreq(cfg),
    Array.from(computeInvFreq({ theta: 10000, headDim: 6 }), (v) => v / 4),
    1e-7,
    'inv',
  );
  const x = R([1, 3, 2, 6], false);
  const scaled = rope(x, intTensor([0, 4, 8], [1, 3]), ropeInvFreq(cfg)).toF32();
  const plain = rope(x, intTensor([0, 1, 2], [1, 3]), ropeInvFreq({ theta: 10000, headDim: 6 })).toF32();
  assertClose(scaled, plain, 1e-6, 'linear');
});

test('ropeConfigFromHF: head_dim, partial rotary, rope_parameters, unsupported types', () => {
  const qwen3 = ropeConfigFromHF({ hidden_size: 1024, num_attention_heads: 16, head_dim: 128, rope_theta: 1000000 });
  assert.deepEqual(qwen3, { theta: 1000000, headDim: 128, rotaryDim: 128, scaling: null });
  const phi = ropeConfigFromHF({ hidden_size: 2560, num_attention_heads: 32, partial_rotary_factor: 0.4 });
  assert.equal(phi.rotaryDim, 32);
  assert.equal(phi.theta, 10000);
  const linear = ropeConfigFromHF({
    hidden_size: 64,
    num_attention_heads: 4,
    rope_scaling: { type: 'linear', factor: 2 },
  });
  assert.deepEqual(linear.scaling, { type: 'linear', factor: 2 });
  const params = ropeConfigFromHF({
    hidden_size: 64,
    num_attention_heads: 4,
    rope_parameters: { rope_type: 'default', rope_theta: 50000 },
  });
  assert.deepEqual(params, { theta: 50000, headDim: 16, rotaryDim: 16, scaling: null });
  assert.throws(
    () => ropeConfigFromHF({ hidden_size: 64, num_attention_heads: 4, rope_scaling: { type: 'yarn', factor: 4 } }),
    (e: unknown) => e instanceof ConfigError && /yarn/.test(e.message),
  );
  assert.throws(
    () =>
      ropeConfigFromHF({ hidden_size: 64, num_attention_heads: 4, rope_scaling: { rope_type: 'llama3', factor: 8 } }),
    (e: unknown) => e instanceof ConfigError && /low_freq_factor/.test(e.message),
  );
  assert.throws(() => computeInvFreq({ theta: 10000, headDim: 8, rotaryDim: 5 }), ConfigError);
  assert.throws(() => computeInvFreq({ theta: 10000, headDim: 8, rotaryDim: 10 }), ConfigError);
});

test('rope matches HF apply_rotary_pos_emb (full and partial rotary, packed positions)', () => {
  const cases: [number[], number, number[][]][] = [
    [
      [2, 3, 2, 8],
      8,
      [
        [0, 1, 2],
        [5, 6, 7],
      ],
    ],
    [[1, 5, 3, 7], 4, [[0, 1, 2, 0, 1]]],
    [[1, 2, 1, 2], 2, [[3, 100000]]],
  ];
  for (const [shape, rot, pos] of cases) {
    const inv = computeInvFreq({ theta: 10000, headDim: shape[3]!, rotaryDim: rot });
    const x = R(shape, false);
    const y = rope(
      x,
      intTensor(pos.flat(), [shape[0]!, shape[1]!]),
      ropeInvFreq({ theta: 10000, headDim: shape[3]!, rotaryDim: rot }),
    );
    assert.deepEqual(y.shape, shape);
    assertClose(y.toF32(), naiveRope(x, pos, inv), 2e-5, `rope ${shape}`);
  }
});

test('rope backward matches finite differences', () => {
  const inv = ropeInvFreq({ theta: 10000, headDim: 6 });
  gradcheck('rope [2,3,2,6]', (x) => rope(x!, intTensor([0, 1, 2, 7, 8, 9], [2, 3]), inv), [R([2, 3, 2, 6])]);
  const invP = ropeInvFreq({ theta: 500000, headDim: 7, rotaryDim: 4 });
  gradcheck('rope partial [1,5,3,7]', (x) => rope(x!, intTensor([0, 1, 2, 0, 1], [1, 5]), invP), [R([1, 5, 3, 7])]);
  const invL = ropeInvFreq({ ...LLAMA31, headDim: 10 });
  gradcheck('rope llama3 [1,2,1,10]', (x) => rope(x!, intTensor([9000, 130000], [1, 2]), invL), [R([1, 2, 1, 10])]);
});

test('rope: the backward is the inverse rotation, positions far beyond any table work', () => {
  const inv = ropeInvFreq({ theta: 10000, headDim: 12 });
  const x = R([1, 3, 2, 12]);
  const pos = intTensor([0, 131072, 2_000_000_000], [1, 3]);
  const y = rope(x, pos, inv);
  const yv = y.toF32();
  assert.ok(yv.every(Number.isFinite));
  // a rotation keeps every pair's norm
  const xv = x.toF32();
  for (let r = 0; r < 6; r++)
    for (let j = 0; j < 6; j++) {
      const o = r * 12;
      const nx = Math.hypot(xv[o + j]!, xv[o + j + 6]!);
      const ny = Math.hypot(yv[o + j]!, yv[o + j + 6]!);
      assert.ok(Math.abs(nx - ny) < 1e-5 * (1 + nx));
    }
  // backprop y itself: the gradient is rope^-1(y) = x
  backward(y, y);
  assertClose(x.grad!.toF32(), xv, 1e-5, 'inverse');
});

test('rope accepts [T] positions, strided and bf16 inputs', () => {
  const inv = ropeInvFreq({ theta: 10000, headDim: 4 });
  const x = R([2, 3, 2, 4], false);
  const shared = rope(x, intTensor([4, 5, 6]), inv).toF32();
  const perBatch = rope(x, intTensor([4, 5, 6, 4, 5, 6], [2, 3]), inv).toF32();
  assert.deepEqual(shared, perBatch);
  // a [B, H, T, D] tensor permuted to [B, T, H, D]
  const xt = R([2, 2, 3, 4], false);
  const view = permute(xt, [0, 2, 1, 3]);
  const y = rope(view, intTensor([0, 1, 2]), inv);
  assertClose(
    y.toF32(),
    naiveRope(
      view,
      [
        [0, 1, 2],
        [0, 1, 2],
      ],
      inv.toF32(),
    ),
    2e-5,
    'strided',
  );
  const xb = tensor(x.toF32(), x.shape, 'bf16');
  const yb = rope(xb, intTensor([4, 5, 6]), inv);
  assert.equal(yb.dtype, 'f32');
  assertClose(
    yb.toF32(),
    naiveRope(
      xb,
      [
        [4, 5, 6],
        [4, 5, 6],
      ],
      inv.toF32(),
    ),
    2e-5,
    'bf16',
  );
});

test('rope errors name the op and the shapes', () => {
  const inv = ropeInvFreq({ theta: 10000, headDim: 4 });
  assert.throws(
    () => rope(R([3, 2, 4]), intTensor([0, 1, 2]), inv),
    (e: unknown) => e instanceof ShapeError && /rope.*\[3, 2, 4\]/.test(e.message),
  );
  assert.throws(
    () => rope(R([1, 3, 2, 4]), intTensor([0, 1]), inv),
    (e: unknown) => e instanceof ShapeError && /positions \[2\]/.test(e.message),
  );
  assert.throws(() => rope(R([1, 3, 2, 4]), tensor([0, 1, 2]), inv), DTypeError);
  assert.throws(
    () => rope(R([1, 3, 2, 2]), intTensor([0, 1, 2]), inv),
    (e: unknown) => e instanceof ShapeError && /rotary_dim 4/.test(e.message),
  );
  assert.throws(() => rope(intTensor([1, 2, 3, 4], [1, 1, 1, 4]), intTensor([0]), inv), DTypeError);
});

test('the rope kernels may write in place', () => {
  const be = getBackend();
  const inv = ropeInvFreq({ theta: 10000, headDim: 6, rotaryDim: 4 });
  const pos = intTensor([3, 9], [1, 2]);
  const x = R([1, 2, 2, 6], false);
  const expected = rope(x, pos, inv).toF32();
  const y = tensor(x.toF32(), x.shape);
  be.ropeForward(y, pos, inv, y);
  assert.deepEqual(y.toF32(), expected);
  be.ropeBackward(y, pos, inv, y);
  assertClose(y.toF32(), x.toF32(), 1e-6, 'round trip');
});
