import assert from 'node:assert/strict';
import { test } from 'node:test';
import { DTypeError, ShapeError } from '../../src/core/errors.ts';
import { Rng } from '../../src/core/rng.ts';
import { tidy } from '../../src/core/scope.ts';
import { Tensor } from '../../src/core/tensor.ts';
import { type AttentionOptions, attention } from '../../src/ops/attention.ts';
import { intTensor, tensor } from '../../src/ops/create.ts';
import * as E from '../../src/ops/elementwise.ts';
import { matmul } from '../../src/ops/matmul.ts';
import { max, sum } from '../../src/ops/reduce.ts';
import { contiguous, indexSelect, permute, slice } from '../../src/ops/shape.ts';
import { backward, noGrad } from '../../src/ops/tape.ts';
import { gradcheck, randomTensor } from '../helpers/gradcheck.ts';

const rng = new Rng(5);
const R = (shape: number[], req = true, scale = 1) => randomTensor(shape, rng, scale, req);

interface Masks {
  keyMask?: number[][];
  seqIds?: number[][];
  window?: number;
}

/** visible[b][i][j]: the masking rule written out independently of the kernel. */
function visibility(B: number, Tq: number, Tk: number, m: Masks): boolean[][][] {
  const out: boolean[][][] = [];
  for (let b = 0; b < B; b++) {
    const rows: boolean[][] = [];
    for (let i = 0; i < Tq; i++) {
      const p = Tk - Tq + i;
      const row: boolean[] = [];
      for (let j = 0; j < Tk; j++)
        row.push(
          j <= p &&
            (!m.window || j > p - m.window) &&
            (!m.keyMask || m.keyMask[b]![j] !== 0) &&
            (!m.seqIds || m.seqIds[b]![j] === m.seqIds[b]![p]),
        );
      rows.push(row);
    }
    out.push(rows);
  }
  return out;
}

/**
 * The unfused composition: repeat kv heads, q @ k^T, scale, additive mask, softmax (max-subtracted),
 * @ v, with rows that see nothing zeroed. Built from tape ops, so its gradients are the reference too.
 */
function naiveAttention(q: Tensor, k: Tensor, v: Tensor, scale: number, m: Masks = {}): Tensor {
  const [B, Tq, Hq] = q.shape as [number, number, number];
  const [, Tk, Hkv] = k.shape as [number, number, number];
  const group = Hq / Hkv;
  const heads = intTensor([...Array(Hq).keys()].map((h) => Math.floor(h / group)));
  const kx = indexSelect(k, 2, heads); // [B, Tk, Hq, D]
  const vx = indexSelect(v, 2, heads);
  const qh = permute(q, [0, 2, 1, 3]); // [B, Hq, Tq, D]
  const kh = permute(kx, [0, 2, 3, 1]); // [B, Hq, D, Tk]
  const vh = contiguous(permute(vx, [0, 2, 1, 3])); // [B, Hq, Tk, D]
  const s = E.scale(matmul(contiguous(qh), contiguous(kh)), scale); // [B, Hq, Tq, Tk]
  const vis = visibility(B, Tq, Tk, m);
  const bias = new Float32Array(B * Tq * Tk);
  const rowValid = new Float32Array(B * Tq);
  for (let b = 0; b < B; b++)
    for (let i = 0; i < Tq; i++) {
      for (let j = 0; j < Tk; j++) bias[(b * Tq + i) * Tk + j] = vis[b]![i]![j] ? 0 : -1e9;
      rowValid[b * Tq + i] = vis[b]![i]!.some((x) => x) ? 1 : 0;
    }
  const masked = E.add(s, tensor(bias, [B, 1, Tq, Tk]));
  const rowMax = noGrad(() => max(masked, -1, true));
  const e = E.exp(E.sub(masked, rowMax));
  const p = E.mul(E.div(e, sum(e, -1, true)), tensor(rowValid, [B, 1, Tq, 1]));
  return contiguous(permute(matmul(p, vh), [0, 2, 1, 3]));
}

function assertClose(actual: ArrayLike<number>, expected: ArrayLike<number>, tol: number, what: string): void {
  assert.equal(actual.length, expected.length, `${what}: length`);
  for (let i = 0; i < actual.length; i++) {
    const a = actual[i]!;
    const e = expected[i]!;
    assert.ok(Number.isFinite(a), `${what}[${i}] is ${a}`);
    assert.ok(Math.abs(a - e) <= tol * (1 + Math.abs(e)), `${what}[${i}]: ${a} vs ${e}`);
  }
}

function maskOpts(B: number, m: Masks): AttentionOptions {
  return {
    keyMask: m.keyMask ? Tensor.fromTyped(Uint8Array.from(m.keyMask.flat()), [B, m.keyMask[0]!.length], 'u8') : null,
    seqIds: m.seqIds ? intTensor(m.seqIds.flat(), [B, m.seqIds[0]!.length]) : null,
    slidingWindow: m.window ?? null,
  };
}

/** Values and the gradients of sum(w * out) of the fused op against the naive composition. */
function compareWithNaive(
  name: string,
  qs: number[],
  ks: number[],
  m: Masks = {},
  scale = 1 / Math.sqrt(qs[3]!),
  inputScale = 1,
): void {
  const q = R(qs, true, inputScale);
  const k = R(ks, true, inputScale);
  const v = R(ks);
  const w = R(qs, false);
  const run = (f: () => Tensor) =>
    tidy(() => {
      const out = f();
      const vals = out.toF32();
      backward(sum(E.mul(out, w)));
      const grads = [q, k, v].map((t) => {
        const g = t.grad!.toF32();
        t.grad!.dispose();
        t.grad = null;
        return g;
      });
      return { vals, grads };
    });
  const opts = { ...maskOpts(qs[0]!, m), scale };
  const fused = run(() => attention(q, k, v, opts));
  const naive = run(() => naiveAttention(q, k, v, scale, m));
  assertClose(fused.vals, naive.vals, 1e-5, `${name} out`);
  for (const [i, g] of fused.grads.entries()) assertClose(g, naive.grads[i]!, 1e-4, `${name} grad ${'qkv'[i]}`);
}

test('attention matches the naive composition (GQA, decode, chunked prefill, odd sizes)', () => {
  compareWithNaive('B2 T5 Hq4 Hkv2 D3', [2, 5, 4, 3], [2, 5, 2, 3]);
  compareWithNaive('decode Tq1 Tk6', [2, 1, 2, 5], [2, 6, 1, 5]);
  compareWithNaive('chunk Tq3 Tk7 D1', [1, 3, 3, 1], [1, 7, 3, 1]);
  compareWithNaive('T1', [1, 1, 1, 2], [1, 1, 1, 2]);
  compareWithNaive('Hq6 Hkv2 D13 T11', [1, 11, 6, 13], [1, 11, 2, 13]);
  compareWithNaive('scale 0.3', [1, 4, 2, 3], [1, 4, 2, 3], {}, 0.3);
  compareWithNaive('large scores', [1, 6, 2, 4], [1, 6, 1, 4], {}, undefined, 30);
  compareWithNaive('sliding window 3', [2, 7, 2, 3], [2, 7, 1, 3], { window: 3 });
  compareWithNaive('padding', [2, 5, 2, 3], [2, 5, 2, 3], {
    keyMask: [
      [1, 1, 1, 1, 0],
      [0, 0, 1, 1, 1],
    ],
  });
  // decoding over many keys: the native kernel splits them into chunks of 192 and combines the chunks
  compareWithNaive('decode Tq1 Tk300 GQA 3', [1, 1, 9, 16], [1, 300, 3, 16]);
  compareWithNaive('decode Tq2 Tk333 larger scores', [2, 2, 4, 8], [2, 333, 2, 8], {}, undefined, 4);
  compareWithNaive('decode Tq1 Tk290 window 150', [1, 1, 2, 8], [1, 290, 1, 8], { window: 150 });
  const longMask = (n: number, from: number, to: number) =>
    Array.from({ length: n }, (_, j) => (j >= from && j < to ? 1 : 0));
  compareWithNaive('decode Tq1 Tk270 padding', [2, 1, 2, 8], [2, 270, 1, 8], {
    keyMask: [longMask(270, 200, 270), longMask(270, 0, 270)],
  });
  compareWithNaive('packed', [2, 6, 2, 3], [2, 6, 1, 3], {
    seqIds: [
      [0, 0, 1, 1, 1, 2],
      [5, 5, 5, 5, 5, 5],
    ],
  });
});

test('attention backward matches finite differences', () => {
  const check = (name: string, qs: number[], ks: number[], m: Masks = {}) => {
    const opts = maskOpts(qs[0]!, m);
    gradcheck(name, (q, k, v) => attention(q!, k!, v!, opts), [R(qs), R(ks), R(ks)]);
  };
  check('B2 Tq=Tk=5 Hq4 Hkv2 D3', [2, 5, 4, 3], [2, 5, 2, 3]);
  check('decode Tq1 Tk6', [1, 1, 4, 3], [1, 6, 2, 3]);
  check('Hq3 Hkv1 D7 T4', [1, 4, 3, 7], [1, 4, 1, 7]);
  check('padding', [2, 4, 2, 3], [2, 4, 1, 3], {
    keyMask: [
      [0, 1, 1, 1],
      [1, 1, 0, 1],
    ],
  });
  check('packed', [1, 5, 2, 3], [1, 5, 2, 3], { seqIds: [[0, 0, 1, 1, 1]] });
  check('window 2', [1, 5, 2, 3], [1, 5, 2, 3], { window: 2 });
  // only some inputs need a gradient
  const q = R([1, 3, 2, 3]);
  const k = R([1, 3, 1, 3], false);
  const v = R([1, 3, 1, 3], false);
  gradcheck('q only', (a, b, c) => attention(a!, b!, c!), [q, k, v]);
  gradcheck('v only', (a, b, c) => attention(a!, b!, c!), [
    R([1, 3, 2, 3], false),
    R([1, 3, 1, 3], false),
    R([1, 3, 1, 3]),
  ]);
});

test('packed sequences give the same outputs and gradients as running them separately', () => {
  const lens = [3, 1, 4, 2];
  const T = lens.reduce((a, b) => a + b);
  const seq = lens.flatMap((n, s) => Array(n).fill(s) as number[]);
  const q = R([1, T, 4, 5]);
  const k = R([1, T, 2, 5]);
  const v = R([1, T, 2, 5]);
  const w = R([1, T, 4, 5], false);
  const packed = tidy(() => {
    const out = attention(q, k, v, { seqIds: intTensor(seq, [1, T]) });
    backward(sum(E.mul(out, w)));
    return out.toF32();
  });
  const packedGrads = [q, k, v].map((t) => {
    const g = t.grad!.toF32();
    t.grad!.dispose();
    t.grad = null;
    return g;
  });
  const separate = tidy(() => {
    const outs: Tensor[] = [];
    let at = 0;
    for (const n of lens) {
      const o = attention(slice(q, 1, at, at + n), slice(k, 1, at, at + n), slice(v, 1, at, at + n));
      outs.push(o);
      backward(sum(E.mul(o, slice(w, 1, at, at + n))));
      at += n;
    }
    return outs.flatMap((o) => Array.from(o.toF32()));
  });
  assertClose(packed, separate, 1e-6, 'packed out');
  for (const [i, t] of [q, k, v].entries())
    assertClose(packedGrads[i]!, t.grad!.toF32(), 1e-6, `packed grad ${'qkv'[i]}`);
});

test('a sequence right-aligned in a padded batch gets bit-identical outputs to the same sequence alone', () => {
  // decoding over hundreds of keys (split into chunks by the native kernel), and a short prefill tile. With D = 16
  // (whole vectors), the native kernel reads V in place, alone from the first key of the oldest block that exists,
  // padded from a packed copy.
  for (const [Tq, len, pad, D] of [
    [1, 250, 130, 8],
    [1, 129, 300, 8],
    [3, 200, 57, 8],
    [1, 250, 130, 16],
    [1, 300, 21, 16],
  ] as const) {
    const [Hq, Hkv] = [6, 2];
    const q = R([1, Tq, Hq, D], false);
    const k = R([1, len, Hkv, D], false);
    const v = R([1, len, Hkv, D], false);
    const alone = attention(q, k, v).toF32();
    // row 1 holds the sequence after `pad` padding positions of garbage; row 0 another sequence, unpadded
    const T = len + pad;
    const padded = (x: Tensor) => {
      const other = R([1, T, Hkv, D], false).toF32();
      const garbage = R([1, pad, Hkv, D], false).toF32();
      return Tensor.fromTyped(Float32Array.from([...other, ...garbage, ...x.toF32()]), [2, T, Hkv, D], 'f32');
    };
    const qb = Tensor.fromTyped(Float32Array.from([...R([1, Tq, Hq, D], false).toF32(), ...q.toF32()]), [2, Tq, Hq, D]);
    const keyMask = [Array(T).fill(1), [...Array(pad).fill(0), ...Array(len).fill(1)]];
    const out = attention(qb, padded(k), padded(v), maskOpts(2, { keyMask })).toF32();
    assert.deepEqual(out.subarray(Tq * Hq * D), alone, `Tq ${Tq}, D ${D}, ${len} keys after ${pad} of padding`);
  }
});

test('k and v may be strided views of a KV cache', () => {
  const [B, cap, Tk, Hkv, D] = [2, 9, 6, 2, 3];
  const cacheK = R([B, cap, Hkv, D], false);
  const cacheV = R([B, cap, Hkv, D], false);
  const q = R([B, 2, 4, D], false);
  const kView = slice(cacheK, 1, 0, Tk);
  const vView = slice(cacheV, 1, 0, Tk);
  assert.ok(!kView.isContiguous());
  const viaView = attention(q, kView, vView).toF32();
  const viaCopy = attention(q, contiguous(kView), contiguous(vView)).toF32();
  assert.deepEqual(viaView, viaCopy);
  // a head-major cache [B, Hkv, cap, D] seen as [B, Tk, Hkv, D]
  const headMajor = R([B, Hkv, cap, D], false);
  const hv = slice(permute(headMajor, [0, 2, 1, 3]), 1, 0, Tk);
  assertClose(attention(q, hv, hv).toF32(), attention(q, contiguous(hv), contiguous(hv)).toF32(), 0, 'head-major');
  // gradients flow back into the cache tensor through the view
  gradcheck('cache view', (qq, ck, cv) => attention(qq!, slice(ck!, 1, 0, Tk), slice(cv!, 1, 0, Tk)), [
    R([B, 2, 4, D]),
    R([B, cap, Hkv, D]),
    R([B, cap, Hkv, D]),
  ]);
});

test('rows that see no key output zeros with zero gradient; i32 masks and bf16 k, v work', () => {
  // left padding: query 0 of batch 1 sees only padding
  const mask = [
    [1, 1, 1, 1],
    [0, 0, 1, 1],
  ];
  const q = R([2, 4, 2, 3]);
  const k = R([2, 4, 2, 3]);
  const v = R([2, 4, 2, 3]);
  const u8 = maskOpts(2, { keyMask: mask });
  const out = attention(q, k, v, u8);
  const o = out.toF32();
  assert.ok(o.every(Number.isFinite));
  // rows (b=1, i=0) and (b=1, i=1), all heads
  for (let i = 0; i < 2; i++) for (let x = 0; x < 6; x++) assert.equal(o[(1 * 4 + i) * 6 + x], 0);
  backward(sum(out));
  const gq = q.grad!.toF32();
  assert.ok(gq.every(Number.isFinite));
  for (let x = 0; x < 12; x++) assert.equal(gq[(1 * 4 + 0) * 6 + x], 0);
  for (const t of [q, k, v]) {
    t.grad?.dispose();
    t.grad = null;
  }
  const asI32 = attention(q, k, v, { keyMask: intTensor(mask.flat(), [2, 4]) }).toF32();
  assert.deepEqual(asI32, o);
  const kb = tensor(k.toF32(), k.shape, 'bf16');
  const vb = tensor(v.toF32(), v.shape, 'bf16');
  const ref = attention(q, tensor(kb.toF32(), k.shape), tensor(vb.toF32(), v.shape)).toF32();
  assertClose(attention(q, kb, vb).toF32(), ref, 1e-6, 'bf16 k, v');
});

test('attention errors name the op and the shapes', () => {
  const q = R([1, 3, 4, 2], false);
  const k = R([1, 3, 3, 2], false);
  const isShape = (re: RegExp) => (e: unknown) =>
    e instanceof ShapeError && /attention/.test(e.message) && re.test(e.message);
  assert.throws(() => attention(q, k, k), isShape(/multiple of kv heads 3/));
  assert.throws(
    () => attention(R([1, 4, 2, 2], false), R([1, 3, 2, 2], false), R([1, 3, 2, 2], false)),
    isShape(/more queries/),
  );
  assert.throws(() => attention(q, R([1, 3, 2, 5], false), R([1, 3, 2, 5], false)), isShape(/\[1, 3, 2, 5\]/));
  assert.throws(() => attention(q, R([1, 3, 2, 2], false), R([1, 4, 2, 2], false)), isShape(/v \[1, 4, 2, 2\]/));
  assert.throws(() => attention(R([3, 4, 2], false), k, k), isShape(/\[B, T, H, D\]/));
  const kv = R([1, 3, 2, 2], false);
  assert.throws(() => attention(q, kv, kv, { keyMask: intTensor([1, 1], [1, 2]) }), isShape(/keyMask \[1, 2\]/));
  assert.throws(() => attention(q, kv, kv, { keyMask: tensor([1, 1, 1], [1, 3]) }), DTypeError);
  assert.throws(() => attention(q, kv, kv, { seqIds: Tensor.fromTyped(new Uint8Array(3), [1, 3], 'u8') }), DTypeError);
  assert.throws(() => attention(intTensor([0, 0], [1, 1, 1, 2]), kv, kv), DTypeError);
  assert.throws(() => attention(q, kv, kv, { slidingWindow: -1 }), isShape(/slidingWindow/));
});
