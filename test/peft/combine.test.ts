import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { ConfigError } from '../../src/core/errors.ts';
import { Rng } from '../../src/core/rng.ts';
import { loadModel } from '../../src/models/load.ts';
import { saveModelHF } from '../../src/models/save.ts';
import {
  addWeightedAdapter,
  calculateMajoritySignMask,
  disjointMerge,
  magnitudeBasedPruning,
  mergeTaskTensors,
  prune,
  quantile,
  randomPruning,
  symmetricEigen,
  topSvd,
} from '../../src/peft/lora/combine.ts';
import { loadAdapter, readAdapterConfig, saveAdapter } from '../../src/peft/lora/io.ts';
import { LoraEmbedding, type LoraLinear } from '../../src/peft/lora/layer.ts';
import { mat, svd } from '../../src/peft/lora/linalg.ts';
import { LoraModel } from '../../src/peft/lora/model.ts';
import { writeByteLevelTokenizer } from '../../src/tokenize/synthetic.ts';
import { logitsOf, maxAbsDiff, maxRelDiff, randomizeAdapters, tinyModel } from './helpers.ts';

const quiet = { onWarning: () => {} };
const ROOT = fileURLToPath(new URL('../../', import.meta.url));
const tmp = mkdtempSync(join(tmpdir(), 'lowrank-combine-'));
after(() => rmSync(tmp, { recursive: true, force: true }));

const F = (...v: number[]) => Float64Array.from(v);
// assert.ok without a message re-reads the source to describe the failure, which can hang under tsx
const below = (x: number, tol: number, what: string) => assert.ok(x < tol, `${what}: ${x} is not below ${tol}`);
const close = (a: ArrayLike<number>, b: ArrayLike<number>, tol: number, msg?: string) => {
  assert.equal(a.length, b.length, msg);
  for (let i = 0; i < a.length; i++)
    assert.ok(Math.abs(a[i]! - b[i]!) <= tol, `${msg ?? ''} [${i}]: ${a[i]} vs ${b[i]}`);
};

/** A, B (as f64), rank, scaling and dims of adapter n at a layer; "out"/"in" are B A's shape (embedding: D, V). */
function factors(pm: LoraModel, path: string, n: string) {
  const l = pm.model.getModule(path) as LoraLinear | LoraEmbedding;
  const emb = l instanceof LoraEmbedding;
  const a = emb ? l.embA.get(n)! : (l as LoraLinear).loraA.get(n)!.weight;
  const b = emb ? l.embB.get(n)! : (l as LoraLinear).loraB.get(n)!.weight;
  return {
    a: Float64Array.from(a.toF32()),
    b: Float64Array.from(b.toF32()),
    r: a.shape[0]!,
    s: l.scalingOf(n),
    out: b.shape[0]!,
    in: a.shape[1]!,
  };
}

/** s B A [out, in] in f64. */
function delta(pm: LoraModel, path: string, n: string, withScaling = true): Float64Array {
  const f = factors(pm, path, n);
  const d = new Float64Array(f.out * f.in);
  for (let i = 0; i < f.out; i++)
    for (let k = 0; k < f.r; k++)
      for (let j = 0; j < f.in; j++)
        d[i * f.in + j] += (withScaling ? f.s : 1) * f.b[i * f.r + k]! * f.a[k * f.in + j]!;
  return d;
}

function weighted(parts: [Float64Array, number][]): Float64Array {
  const out = new Float64Array(parts[0]![0].length);
  for (const [t, w] of parts) for (let i = 0; i < out.length; i++) out[i] += w * t[i]!;
  return out;
}

/** a: r=2 alpha 4 on q, v, embed_tokens; b: r=3 alpha 6 rsLoRA on q, up. Random factors. */
function twoAdapters(): LoraModel {
  const pm = new LoraModel(
    tinyModel(3),
    { r: 2, lora_alpha: 4, target_modules: ['q_proj', 'v_proj', 'embed_tokens'] },
    'a',
    { rng: new Rng(1), ...quiet },
  );
  pm.addAdapter('b', { r: 3, lora_alpha: 6, use_rslora: true, target_modules: ['q_proj', 'up_proj'] });
  randomizeAdapters(pm.namedParameters(), 5, 0.2);
  return pm;
}

const Q0 = 'model.layers.0.self_attn.q_proj';
const V1 = 'model.layers.1.self_attn.v_proj';
const UP0 = 'model.layers.0.mlp.up_proj';
const EMB = 'model.embed_tokens';

// ---------------------------------------------------------------------------------------------------------------
// merge_utils primitives on hand-made tensors

test('magnitude pruning keeps int(density·n) largest |values|, ties by index; density 1 keeps all', () => {
  assert.deepEqual(magnitudeBasedPruning(F(1, -3, 2, 0.5), 0.5), F(0, -3, 2, 0));
  assert.deepEqual(magnitudeBasedPruning(F(1, -3, 2, 0.5), 0.3), F(0, -3, 0, 0)); // int(1.2) = 1
  assert.deepEqual(magnitudeBasedPruning(F(1, -1, 1, 1), 0.5), F(1, -1, 0, 0));
  assert.deepEqual(magnitudeBasedPruning(F(1, 2, 3), 0.2), F(0, 0, 0)); // int(0.6) = 0
  assert.deepEqual(prune(F(1, -3, 2, 0.5), 1, 'magnitude'), F(1, -3, 2, 0.5));
  // int(0.29 * 100) = 28 in IEEE doubles, as in Python
  const t = Float64Array.from({ length: 100 }, (_, i) => i + 1);
  assert.equal(magnitudeBasedPruning(t, 0.29).filter((v) => v !== 0).length, 28);
});

test('DARE random pruning: the seeded Bernoulli(density) mask, kept fraction ≈ density, rescaled by 1/density', () => {
  const n = 20000;
  const t = new Float64Array(n).fill(2);
  const out = randomPruning(t, 0.25, true, new Rng(7));
  const replay = new Rng(7);
  for (let i = 0; i < n; i++) assert.equal(out[i], replay.uniform() < 0.25 ? 8 : 0);
  const kept = out.filter((v) => v !== 0).length / n;
  assert.ok(Math.abs(kept - 0.25) < 0.01, `kept ${kept}`);
  assert.ok(new Set(out).size === 2 && out.includes(8) && out.includes(0), 'values are 0 or 2 / 0.25');
  assert.deepEqual(
    randomPruning(t, 0.25, false, new Rng(7)),
    out.map((v) => v / 4),
  );
  // same seed, same result; dare_linear = Σ w_i · rescaled random prune(T_i), tensors drawn in order
  const t1 = F(1, 2, 3, 4, 5, 6);
  const t2 = F(-1, 0.5, 2, -2, 1, 3);
  const got = mergeTaskTensors('dare_linear', [t1, t2], [2, -1], { density: 0.5, rng: new Rng(11) });
  const r = new Rng(11);
  const p1 = randomPruning(t1, 0.5, true, r);
  const p2 = randomPruning(t2, 0.5, true, r);
  assert.deepEqual(
    got,
    weighted([
      [p1, 2],
      [p2, -1],
    ]),
  );
  assert.deepEqual(mergeTaskTensors('dare_linear', [t1, t2], [2, -1], { density: 0.5, rng: new Rng(11) }), got);
  assert.deepEqual(prune(t1, 1, 'random', { rescale: true, rng: new Rng(1) }), t1, 'density 1: no pruning');
});

test('TIES: magnitude trim, sign election (total / frequency), disjoint mean of the weighted values', () => {
  const t1 = F(1, -2, 3, 0.1);
  const t2 = F(-1, -1, 2, 4);
  // trim to 2 of 4: t1 -> [0, -2, 3, 0], t2 -> [0, 0, 2, 4]; total signs [+, -, +, +];
  // weighted [0, -2, 3, 0] and [0, 0, 4, 8]: idx2 (3 + 4) / 2, idx3 8 / 1
  assert.deepEqual(mergeTaskTensors('ties', [t1, t2], [1, 2], { density: 0.5 }), F(0, -2, 3.5, 8));
  // total and frequency disagree: 5 - 1 - 1 > 0, but two of three signs are negative
  const a = [F(5), F(-1), F(-1)];
  assert.deepEqual(mergeTaskTensors('ties', a, [1, 1, 1], { density: 1, majoritySignMethod: 'total' }), F(5));
  assert.deepEqual(mergeTaskTensors('ties', a, [1, 1, 1], { density: 1, majoritySignMethod: 'frequency' }), F(-1));
  // a zero never counts as agreeing; an all-zero position stays 0 (count clamped to 1)
  const masks = calculateMajoritySignMask([F(0, 2, 0), F(0, -1, -3)], 'total');
  assert.deepEqual(masks, [Uint8Array.of(0, 1, 0), Uint8Array.of(0, 0, 1)]);
  assert.deepEqual(disjointMerge([F(0, 2, 0), F(0, -1, -3)], masks), F(0, 2, -3));
  // a zero sum elects +1
  assert.deepEqual(mergeTaskTensors('ties', [F(1), F(-1)], [1, 1], { density: 1 }), F(1));
  // the election uses the unweighted tensors: a negative weight does not flip it
  assert.deepEqual(mergeTaskTensors('ties', [F(2), F(1)], [-1, 1], { density: 1 }), F(-0.5));
  // dare_ties at density 1 is ties at density 1
  assert.deepEqual(
    mergeTaskTensors('dare_ties', [t1, t2], [1, 2], { density: 1, rng: new Rng(1) }),
    mergeTaskTensors('ties', [t1, t2], [1, 2], { density: 1 }),
  );
});

test('magnitude_prune and linear merges; quantile as torch.quantile', () => {
  const t1 = F(1, -3, 2, 0.5);
  const t2 = F(0.1, 0.2, -0.3, 4);
  assert.deepEqual(mergeTaskTensors('magnitude_prune', [t1, t2], [2, 1], { density: 0.5 }), F(0, -6, 3.7, 4));
  assert.deepEqual(mergeTaskTensors('linear', [t1, t2], [2, 1]), F(2.1, -5.8, 3.7, 5));
  assert.equal(quantile([4, 1, 3, 2], 0.5), 2.5);
  assert.ok(Math.abs(quantile([4, 1, 3, 2], 0.9) - 3.7) < 1e-12, 'quantile 0.9');
  assert.equal(quantile([4, 1, 3, 2], 1), 4);
  assert.throws(() => mergeTaskTensors('ties', [t1], [1]), /density is required/);
});

test('topSvd (Gram eigendecomposition) agrees with the Jacobi SVD; symmetricEigen is orthonormal', () => {
  const rng = new Rng(4);
  for (const [m, n] of [
    [9, 6],
    [6, 11],
    [20, 20],
  ] as const) {
    const w = mat(m, n);
    for (let i = 0; i < w.data.length; i++) w.data[i] = rng.normal();
    const ref = svd(w);
    const t = topSvd(w, 4);
    close(t.s, ref.s.slice(0, 4), 1e-10, `${m}x${n} singular values`);
    // U diag(S) Vt is the best rank-4 approximation
    for (let i = 0; i < m; i++)
      for (let j = 0; j < n; j++) {
        let x = 0;
        let y = 0;
        for (let k = 0; k < 4; k++) {
          x += t.u.data[i * 4 + k]! * t.s[k]! * t.vt.data[k * n + j]!;
          y += ref.u.data[i * ref.u.cols + k]! * ref.s[k]! * ref.vt.data[k * n + j]!;
        }
        assert.ok(Math.abs(x - y) < 1e-10, `${m}x${n} rank-4 reconstruction`);
      }
  }
  const g = Float64Array.of(4, 1, 0, 1, 3, 1, 0, 1, 2);
  const { values, vectors } = symmetricEigen(g, 3);
  for (let k = 0; k < 3; k++)
    for (let i = 0; i < 3; i++) {
      let av = 0;
      for (let j = 0; j < 3; j++) av += g[i * 3 + j]! * vectors[k * 3 + j]!;
      assert.ok(Math.abs(av - values[k]! * vectors[k * 3 + i]!) < 1e-12, 'G v = λ v');
    }
  assert.ok(values[0]! <= values[1]! && values[1]! <= values[2]!, 'eigenvalues ascending');
});

// ---------------------------------------------------------------------------------------------------------------
// add_weighted_adapter on a tiny Llama

test('cat: tensors are the concatenation [w s A_i] / [B_i], and the adapter equals the stacked adapters', () => {
  const pm = twoAdapters();
  const w = [0.7, -1.3];
  const res = addWeightedAdapter(pm, ['a', 'b'], w, 'c', { combinationType: 'cat' });
  assert.equal(res.combinationType, 'cat');
  assert.equal(res.r, 5);
  assert.deepEqual(res.layers.sort(), [
    EMB,
    'model.layers.0.mlp.up_proj',
    Q0,
    'model.layers.0.self_attn.v_proj',
    'model.layers.1.mlp.up_proj',
    'model.layers.1.self_attn.q_proj',
    V1,
  ]);
  const cfg = pm.configs.get('c')!;
  assert.equal(cfg.r, 5);
  assert.equal(cfg.lora_alpha, 5);
  assert.equal(cfg.use_rslora, false, 'PEFT PR #3449: the combined adapter has scaling 1');
  assert.deepEqual([...(cfg.target_modules as string[])].sort(), ['embed_tokens', 'q_proj', 'up_proj', 'v_proj']);
  assert.ok(!pm.activeAdapters.includes('c'), 'added inactive, as PEFT');
  // q_proj: both adapters
  const fa = factors(pm, Q0, 'a');
  const fb = factors(pm, Q0, 'b');
  const fc = factors(pm, Q0, 'c');
  assert.equal(fc.s, 1);
  assert.ok(Math.abs(fb.s - 6 / Math.sqrt(3)) < 1e-12, 'rsLoRA scaling of b');
  const wantA = [...fa.a.map((v) => v * w[0]! * fa.s), ...fb.a.map((v) => v * w[1]! * fb.s)];
  close(fc.a, wantA, 1e-6, 'A');
  for (let i = 0; i < fc.out; i++) {
    close(fc.b.subarray(i * 5, i * 5 + 2), fa.b.subarray(i * 2, i * 2 + 2), 0, 'B of a');
    close(fc.b.subarray(i * 5 + 2, i * 5 + 5), fb.b.subarray(i * 3, i * 3 + 3), 0, 'B of b');
  }
  // v_proj: only a, zero-padded to rank 5
  const va = factors(pm, V1, 'a');
  const vc = factors(pm, V1, 'c');
  close(
    vc.a.subarray(0, 2 * vc.in),
    va.a.map((v) => v * w[0]! * va.s),
    1e-6,
  );
  assert.ok(
    vc.a.subarray(2 * vc.in).every((v) => v === 0),
    'zero padding',
  );
  // the embedding: Σ w s (B A) with B A [D, V]
  close(delta(pm, EMB, 'c'), weighted([[delta(pm, EMB, 'a'), w[0]!]]), 1e-5, 'embedding delta');
  // the first source uses rsLoRA: the combined adapter does not (PEFT PR #3449), so its scaling stays 1
  addWeightedAdapter(pm, ['b', 'a'], [w[1]!, w[0]!], 'c2', { combinationType: 'cat' });
  assert.equal(pm.configs.get('c2')!.use_rslora, false);
  pm.setAdapter('c2');
  const cat2 = logitsOf(pm.model);
  pm.setAdapter(['a', 'b'], w);
  const stacked = logitsOf(pm.model);
  below(maxAbsDiff(cat2, stacked), 1e-5, 'cat with an rsLoRA first source');
  pm.setAdapter('c');
  const cat = logitsOf(pm.model);
  assert.ok(maxAbsDiff(cat, stacked) < 1e-5, `logits differ by ${maxAbsDiff(cat, stacked)}`);
  pm.disableAdapters();
  assert.ok(maxAbsDiff(logitsOf(pm.model), stacked) > 1e-3, 'the adapters change the output');
});

test('linear (equal ranks): √|w s|·sign on A and √|w s| on B; one adapter reproduces w·ΔW', () => {
  const pm = new LoraModel(tinyModel(5), { r: 2, lora_alpha: 4, target_modules: ['q_proj', 'v_proj'] }, 'a', {
    rng: new Rng(1),
    ...quiet,
  });
  pm.addAdapter('a2', { r: 2, lora_alpha: 2, target_modules: ['q_proj'] });
  randomizeAdapters(pm.namedParameters(), 9, 0.3);
  const res = addWeightedAdapter(pm, ['a', 'a2'], [1.5, -0.5], 'lin', { combinationType: 'linear' });
  assert.equal(res.r, 2);
  const fa = factors(pm, Q0, 'a');
  const f2 = factors(pm, Q0, 'a2');
  const fl = factors(pm, Q0, 'lin');
  assert.equal(fl.s, 1);
  const ca = Math.sqrt(1.5 * 2);
  const c2 = Math.sqrt(0.5 * 1);
  close(
    fl.a,
    weighted([
      [fa.a, ca],
      [f2.a, -c2],
    ]),
    1e-6,
    'A',
  );
  close(
    fl.b,
    weighted([
      [fa.b, ca],
      [f2.b, c2],
    ]),
    1e-6,
    'B',
  );
  // v_proj holds only a: B A = 1.5 · s B_a A_a exactly
  close(delta(pm, V1, 'lin'), weighted([[delta(pm, V1, 'a'), 1.5]]), 1e-5);

  const warnings: string[] = [];
  const one = addWeightedAdapter(pm, ['a'], [0.6], 'one', {
    combinationType: 'svd',
    onWarning: (m) => warnings.push(m),
  });
  assert.equal(one.combinationType, 'linear', "one source adapter: PEFT's linear");
  assert.match(warnings.join('\n'), /using 'linear'/);
  pm.setAdapter('one');
  const got = logitsOf(pm.model);
  pm.setAdapter('a', [0.6]);
  below(maxAbsDiff(got, logitsOf(pm.model)), 1e-5, 'single-adapter linear logits');
});

test('svd: full rank reproduces Σ w s ΔW; a lower rank is the best rank-k approximation; clamp', () => {
  const pm = twoAdapters();
  const w = [0.7, -1.3];
  addWeightedAdapter(pm, ['a', 'b'], w, 'full', { combinationType: 'svd', svdRank: 5 });
  addWeightedAdapter(pm, ['a', 'b'], w, 'low', { combinationType: 'svd', svdRank: 2 });
  const dflt = addWeightedAdapter(pm, ['a', 'b'], w, 'dflt', { combinationType: 'svd' });
  assert.equal(dflt.r, 3, 'svd_rank defaults to the largest rank');
  addWeightedAdapter(pm, ['a', 'b'], w, 'clamped', { combinationType: 'svd', svdRank: 2, svdClamp: 0.9 });
  for (const path of [Q0, V1, UP0, EMB]) {
    const parts: [Float64Array, number][] = [];
    for (const [n, i] of [
      ['a', 0],
      ['b', 1],
    ] as const)
      if ((pm.model.getModule(path) as LoraLinear).has(n)) parts.push([delta(pm, path, n), w[i]!]);
    const want = weighted(parts);
    close(delta(pm, path, 'full'), want, 1e-4, `${path} full rank`);
    // rank 2: the top singular values and the truncated reconstruction of the summed delta
    const f = factors(pm, path, 'low');
    const ref = svd({ rows: f.out, cols: f.in, data: want });
    const best = new Float64Array(f.out * f.in);
    for (let i = 0; i < f.out; i++)
      for (let j = 0; j < f.in; j++)
        for (let k = 0; k < 2; k++)
          best[i * f.in + j] += ref.u.data[i * ref.u.cols + k]! * ref.s[k]! * ref.vt.data[k * f.in + j]!;
    close(delta(pm, path, 'low'), best, 1e-4, `${path} rank 2`);
    const got = svd({ rows: f.out, cols: f.in, data: delta(pm, path, 'low') });
    close(got.s.slice(0, 2), ref.s.slice(0, 2), 1e-4 * ref.s[0]!, `${path} singular values`);
    // B = U diag(S): its column norms are the singular values; A = Vh has orthonormal rows
    for (let k = 0; k < 2; k++) {
      let nb = 0;
      for (let i = 0; i < f.out; i++) nb += f.b[i * 2 + k]! ** 2;
      below(Math.abs(Math.sqrt(nb) - ref.s[k]!), 1e-4 * ref.s[0]!, `${path} |B[:, ${k}]|`);
      let na = 0;
      for (let j = 0; j < f.in; j++) na += f.a[k * f.in + j]! ** 2;
      below(Math.abs(na - 1), 1e-5, `${path} |A[${k}]|`);
    }
    // clamp: the same factors clamped to ±quantile(cat(B, A), 0.9)
    const c = factors(pm, path, 'clamped');
    const hi = quantile([...f.b, ...f.a], 0.9);
    close(
      c.b,
      f.b.map((v) => Math.min(Math.max(v, -hi), hi)),
      1e-6,
      `${path} clamped B`,
    );
    close(
      c.a,
      f.a.map((v) => Math.min(Math.max(v, -hi), hi)),
      1e-6,
      `${path} clamped A`,
    );
  }
  pm.setAdapter(['a', 'b'], w);
  const stacked = logitsOf(pm.model);
  pm.setAdapter('full');
  below(maxRelDiff(logitsOf(pm.model), stacked), 1e-5, 'full-rank svd logits');
});

test('ties_svd / magnitude_prune_svd / dare_ties_svd merge the dense deltas (scaling once), then truncate', () => {
  const pm = twoAdapters();
  const w = [0.7, -1.3];
  addWeightedAdapter(pm, ['a', 'b'], w, 'ts', { combinationType: 'ties_svd', density: 0.5, svdRank: 16 });
  addWeightedAdapter(pm, ['a', 'b'], w, 'mp', { combinationType: 'magnitude_prune_svd', density: 0.3, svdRank: 4 });
  for (const path of [Q0, UP0]) {
    const names = (['a', 'b'] as const).filter((n) => (pm.model.getModule(path) as LoraLinear).has(n));
    const ds = names.map((n) => delta(pm, path, n));
    const ws = names.map((n) => w[n === 'a' ? 0 : 1]!);
    const ties = mergeTaskTensors('ties', ds, ws, { density: 0.5 });
    close(delta(pm, path, 'ts'), ties, 1e-4, `${path} ties_svd at full rank`);
    const mp = mergeTaskTensors('magnitude_prune', ds, ws, { density: 0.3 });
    const f = factors(pm, path, 'mp');
    const ref = svd({ rows: f.out, cols: f.in, data: mp });
    const best = new Float64Array(f.out * f.in);
    for (let i = 0; i < f.out; i++)
      for (let j = 0; j < f.in; j++)
        for (let k = 0; k < 4; k++)
          best[i * f.in + j] += ref.u.data[i * ref.u.cols + k]! * ref.s[k]! * ref.vt.data[k * f.in + j]!;
    close(delta(pm, path, 'mp'), best, 1e-4, `${path} magnitude_prune_svd rank 4`);
  }
  // DARE: reproducible for a seed, different for another
  const opts = { combinationType: 'dare_ties_svd', density: 0.5, svdRank: 4 } as const;
  addWeightedAdapter(pm, ['a', 'b'], w, 'd1', { ...opts, rng: new Rng(3) });
  addWeightedAdapter(pm, ['a', 'b'], w, 'd2', { ...opts, rng: new Rng(3) });
  addWeightedAdapter(pm, ['a', 'b'], w, 'd3', { ...opts, rng: new Rng(4) });
  assert.deepEqual(delta(pm, Q0, 'd1'), delta(pm, Q0, 'd2'));
  assert.ok(
    maxAbsDiff(Float32Array.from(delta(pm, Q0, 'd1')), Float32Array.from(delta(pm, Q0, 'd3'))) > 1e-4,
    'another seed gives another result',
  );
});

test('ties / dare_linear / magnitude_prune on A and B separately (equal ranks)', () => {
  const pm = new LoraModel(tinyModel(6), { r: 3, lora_alpha: 6, target_modules: ['q_proj'] }, 'x', {
    rng: new Rng(1),
    ...quiet,
  });
  pm.addAdapter('y', { r: 3, lora_alpha: 3, target_modules: ['q_proj'] });
  randomizeAdapters(pm.namedParameters(), 13, 0.3);
  const w = [1, -2];
  const fx = factors(pm, Q0, 'x');
  const fy = factors(pm, Q0, 'y');
  const wa = [Math.sqrt(1 * fx.s), -Math.sqrt(2 * fy.s)];
  const wb = [Math.sqrt(1 * fx.s), Math.sqrt(2 * fy.s)];
  for (const type of ['ties', 'magnitude_prune'] as const) {
    addWeightedAdapter(pm, ['x', 'y'], w, type, {
      combinationType: type,
      density: 0.4,
      majoritySignMethod: 'frequency',
    });
    const f = factors(pm, Q0, type);
    const mo = { density: 0.4, majoritySignMethod: 'frequency' } as const;
    close(f.a, mergeTaskTensors(type, [fx.a, fy.a], wa, mo), 1e-6, `${type} A`);
    close(f.b, mergeTaskTensors(type, [fx.b, fy.b], wb, mo), 1e-6, `${type} B`);
  }
  // dare_linear: the rng goes over this layer's A tensors, then its B tensors, layer by layer in module order
  addWeightedAdapter(pm, ['x', 'y'], w, 'dare', { combinationType: 'dare_linear', density: 0.5, rng: new Rng(21) });
  const rng = new Rng(21);
  const wantA = mergeTaskTensors('dare_linear', [fx.a, fy.a], wa, { density: 0.5, rng });
  const wantB = mergeTaskTensors('dare_linear', [fx.b, fy.b], wb, { density: 0.5, rng });
  close(factors(pm, Q0, 'dare').a, wantA, 1e-6);
  close(factors(pm, Q0, 'dare').b, wantB, 1e-6);
});

test('rank patterns are zero-padded to the new rank; layers_to_transform of the first adapter does not drop layers', () => {
  const pm = new LoraModel(
    tinyModel(7),
    {
      r: 4,
      lora_alpha: 8,
      rank_pattern: { v_proj: 2 },
      target_modules: ['q_proj', 'v_proj'],
      layers_to_transform: [0],
    },
    'a',
    { rng: new Rng(1), ...quiet },
  );
  pm.addAdapter('b', { r: 4, lora_alpha: 4, target_modules: ['q_proj'], layers_to_transform: [1] });
  randomizeAdapters(pm.namedParameters(), 3, 0.3);
  const res = addWeightedAdapter(pm, ['a', 'b'], [1, 0.5], 'c', { combinationType: 'cat' });
  assert.equal(res.r, 8);
  assert.deepEqual(res.layers.sort(), [Q0, 'model.layers.0.self_attn.v_proj', 'model.layers.1.self_attn.q_proj']);
  const cfg = pm.configs.get('c')!;
  assert.deepEqual(cfg.rank_pattern, {});
  assert.equal(cfg.layers_to_transform, null);
  assert.deepEqual([...(cfg.target_modules as string[])].sort(), res.layers.sort());
  const v = factors(pm, 'model.layers.0.self_attn.v_proj', 'c');
  assert.equal(v.r, 8);
  assert.ok(
    v.a.subarray(2 * v.in).every((x) => x === 0),
    'zero padding',
  );
  pm.setAdapter(['a', 'b'], [1, 0.5]);
  const stacked = logitsOf(pm.model);
  pm.setAdapter('c');
  below(maxAbsDiff(logitsOf(pm.model), stacked), 1e-5, 'cat logits');
  // linear pads a layer whose (single) rank is below r
  const lin = addWeightedAdapter(pm, ['a', 'b'], [1, 1], 'lin', { combinationType: 'linear' });
  assert.equal(lin.r, 4);
  assert.equal(factors(pm, 'model.layers.0.self_attn.v_proj', 'lin').r, 4);
});

test('modules_to_save: the one trained copy is carried over; two copies of one module are refused', () => {
  const pm = new LoraModel(tinyModel(9), { r: 2, target_modules: ['q_proj'], modules_to_save: ['lm_head'] }, 'a', {
    rng: new Rng(1),
    ...quiet,
  });
  pm.addAdapter('b', { r: 2, target_modules: ['v_proj'] });
  randomizeAdapters(pm.namedParameters(), 4, 0.3);
  const head = pm.savedModules()[0]![1];
  const p = head.copies.get('a')!.getParam('weight')!;
  const d = p.data as Float32Array;
  for (let i = 0; i < p.size; i++) d[p.offset + i] = d[p.offset + i]! + 0.05 * Math.sin(i);
  addWeightedAdapter(pm, ['b', 'a'], [1, 1], 'c', { combinationType: 'cat' });
  assert.deepEqual(pm.configs.get('c')!.modules_to_save, ['lm_head']);
  assert.deepEqual(head.copies.get('c')!.getParam('weight')!.toF32(), p.toF32());
  pm.setAdapter(['a', 'b']);
  const stacked = logitsOf(pm.model);
  pm.setAdapter('c');
  below(maxAbsDiff(logitsOf(pm.model), stacked), 1e-5, 'cat with a modules_to_save head');
  pm.addAdapter('h', { r: 2, target_modules: ['q_proj'], modules_to_save: ['lm_head'] });
  assert.throws(
    () => addWeightedAdapter(pm, ['a', 'h'], [1, 1], 'x', { combinationType: 'cat' }),
    /'a' and 'h' each have a trained copy of 'lm_head'/,
  );
});

test('the combined adapter saves in PEFT format and loads back with the same outputs', async () => {
  const pm = twoAdapters();
  addWeightedAdapter(pm, ['a', 'b'], [0.7, -1.3], 'c', { combinationType: 'svd', svdRank: 3 });
  pm.setAdapter('c');
  const want = logitsOf(pm.model);
  const dir = join(tmp, 'saved');
  await saveAdapter(pm, dir, { adapters: ['c'] });
  const json = JSON.parse(readFileSync(join(dir, 'c', 'adapter_config.json'), 'utf8'));
  assert.equal(json.r, 3);
  assert.equal(json.lora_alpha, 3);
  assert.equal(json.use_rslora, false);
  const back = loadAdapter(tinyModel(3), join(dir, 'c'), quiet);
  below(maxAbsDiff(logitsOf(back.model), want), 1e-6, 'reloaded logits');
});

test('errors name the field: unknown method, density, ranks, weights, names, DoRA', () => {
  const pm = twoAdapters();
  pm.addAdapter('a2', { r: 2, lora_alpha: 2, target_modules: ['q_proj'] });
  pm.addAdapter('d', { r: 2, use_dora: true, target_modules: ['q_proj'] });
  const bad = (fn: () => unknown, re: RegExp) =>
    assert.throws(fn, (e: unknown) => e instanceof ConfigError && re.test(e.message), String(re));
  bad(
    () => addWeightedAdapter(pm, ['a', 'b'], [1, 1], 'x', { combinationType: 'linear' }),
    /adapters must all have the same r.*'a' r=2, 'b' r=3/,
  );
  bad(() => addWeightedAdapter(pm, ['a', 'b'], [1, 1], 'x', { combinationType: 'ties', density: 0.5 }), /same r/);
  bad(
    () => addWeightedAdapter(pm, ['a', 'b'], [1, 1], 'x', { combinationType: 'mean' as never }),
    /combinationType 'mean' is not one of/,
  );
  for (const d of [0, -0.1, 1.5, Number.NaN])
    bad(
      () => addWeightedAdapter(pm, ['a', 'a2'], [1, 1], 'x', { combinationType: 'ties', density: d }),
      /density must be a number in \(0, 1\]/,
    );
  bad(
    () => addWeightedAdapter(pm, ['a', 'a2'], [1, 1], 'x', { combinationType: 'dare_linear' }),
    /density is required/,
  );
  bad(() => addWeightedAdapter(pm, ['a', 'b'], [1], 'x', { combinationType: 'cat' }), /weights gives 1 weight/);
  bad(() => addWeightedAdapter(pm, ['a', 'b'], [1, Number.POSITIVE_INFINITY], 'x'), /weights \[1\] must be a finite/);
  bad(() => addWeightedAdapter(pm, ['a', 'nope'], [1, 1], 'x'), /adapters names 'nope', which does not exist/);
  bad(() => addWeightedAdapter(pm, ['a', 'b'], [1, 1], 'b'), /newName 'b' is an existing adapter/);
  bad(() => addWeightedAdapter(pm, ['a', 'd'], [1, 1], 'x', { combinationType: 'cat' }), /'d' uses DoRA/);
  bad(() => addWeightedAdapter(pm, ['a', 'b'], [1, 1], 'x', { svdRank: 0 }), /svdRank must be a positive integer/);
  bad(() => addWeightedAdapter(pm, ['a', 'b'], [1, 1], 'x', { svdClamp: 1.5 }), /svdClamp must be a quantile/);
  bad(
    () => addWeightedAdapter(pm, ['a', 'b'], [1, 1], 'x', { majoritySignMethod: 'mean' as never }),
    /majoritySignMethod/,
  );
  assert.ok(!pm.configs.has('x'), 'a refused combination leaves the model unchanged');
  // per-layer rank mismatch (a rank pattern) for a linear-family type
  const pm2 = new LoraModel(tinyModel(8), { r: 4, target_modules: ['q_proj'] }, 'p', quiet);
  pm2.addAdapter('q', { r: 4, rank_pattern: { q_proj: 2 }, target_modules: ['q_proj', 'v_proj'] });
  bad(
    () => addWeightedAdapter(pm2, ['p', 'q'], [1, 1], 'x', { combinationType: 'linear' }),
    /model\.layers\.0\.self_attn\.q_proj: the adapters have ranks 4, 2/,
  );
  assert.ok(!pm2.configs.has('x'), 'model unchanged');
});

// ---------------------------------------------------------------------------------------------------------------
// lowrank merge --combine

function lowrank(...args: string[]): string {
  return execFileSync(process.execPath, [join(ROOT, 'bin/lowrank.js'), ...args], {
    encoding: 'utf8',
    cwd: ROOT,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
}

function lowrankError(...args: string[]): string {
  try {
    lowrank(...args);
  } catch (e) {
    return String((e as { stderr?: string }).stderr);
  }
  assert.fail(`lowrank ${args.join(' ')} succeeded`);
}

test('lowrank merge --combine cat --save-adapter: the merged model and the saved adapter equal the stacked adapters', async () => {
  const src = join(tmp, 'tiny-hf');
  const m = tinyModel(4, { vocab_size: 300 });
  await saveModelHF(m.namedParameters(), m.config, src);
  writeByteLevelTokenizer(src, 300);
  const dirs: string[] = [];
  for (const [i, cfg] of [
    { r: 2, lora_alpha: 4, target_modules: ['q_proj', 'v_proj'] },
    { r: 3, lora_alpha: 3, target_modules: ['q_proj', 'down_proj'] },
  ].entries()) {
    const pm = new LoraModel((await loadModel(src)).model, cfg, 'default', { rng: new Rng(i + 1), ...quiet });
    randomizeAdapters(pm.namedParameters(), 20 + i, 0.3);
    const dir = join(tmp, `ad${i}`);
    await saveAdapter(pm, dir);
    dirs.push(dir);
  }
  let pm = loadAdapter((await loadModel(src)).model, dirs[0]!, { adapterName: 'x', ...quiet });
  pm = loadAdapter(pm, dirs[1]!, { adapterName: 'y', ...quiet });
  pm.setAdapter(['x', 'y'], [0.5, 1.5]);
  const want = logitsOf(pm.model);

  const outModel = join(tmp, 'merged');
  const outAdapter = join(tmp, 'combined-adapter');
  const log = lowrank(
    'merge',
    '--model',
    src,
    '--adapter',
    dirs[0]!,
    '--adapter',
    dirs[1]!,
    '--weights',
    '0.5,1.5',
    '--combine',
    'cat',
    '--save-adapter',
    outAdapter,
    '--out',
    outModel,
  );
  assert.match(log, /with cat into 'combined': r=5/);
  const merged = await loadModel(outModel);
  below(maxRelDiff(logitsOf(merged.model), want), 1e-5, 'merged model logits');
  assert.equal(readAdapterConfig(outAdapter, () => {}).r, 5);
  const back = loadAdapter((await loadModel(src)).model, outAdapter, quiet);
  below(maxRelDiff(logitsOf(back.model), want), 1e-5, 'saved adapter logits');

  assert.match(
    lowrankError(
      'merge',
      '--model',
      src,
      '--adapter',
      dirs[0]!,
      '--adapter',
      dirs[1]!,
      '--combine',
      'ties',
      '--density',
      '1.5',
      '--out',
      outModel,
    ),
    /ConfigError: --density must be in \(0, 1\]/,
  );
  assert.match(
    lowrankError('merge', '--model', src, '--adapter', dirs[0]!, '--save-adapter', outAdapter),
    /ConfigError: --save-adapter needs --combine/,
  );
});
