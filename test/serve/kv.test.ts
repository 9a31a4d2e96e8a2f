// The server's KV caches: per-sequence caches gathered into one right-aligned batch per forward.

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { f32ToBf16 } from '../../src/core/dtype.ts';
import { Rng } from '../../src/core/rng.ts';
import { configFromHF } from '../../src/models/config.ts';
import { type KvDtype, kvBytesPerToken, positionsView } from '../../src/models/kv-cache.ts';
import { randn } from '../../src/ops/create.ts';
import { BatchKV, KvScratch, SeqKV } from '../../src/serve/kv.ts';

const cfg = configFromHF({
  model_type: 'llama',
  vocab_size: 50,
  hidden_size: 32,
  intermediate_size: 40,
  num_hidden_layers: 1,
  num_attention_heads: 4,
  num_key_value_heads: 2,
});
const [H, D] = [cfg.num_key_value_heads, cfg.head_dim];

test('KvScratch keeps its buffers while they are large enough and grows the time axis geometrically', () => {
  const s = new KvScratch(cfg);
  const a = s.stores(3, 70);
  assert.deepEqual(a.k.shape, [3, H, 70, D]);
  assert.equal(s.stores(2, 70).k, a.k, 'smaller or equal: the same buffer');
  assert.equal(s.stores(3, 10).v, a.v);
  const b = s.stores(3, 71);
  assert.notEqual(b.k, a.k);
  assert.deepEqual(b.k.shape, [3, H, 105, D], 'grown by half');
  assert.equal(s.stores(3, 100).k, b.k);
  s.dispose();
});

test('BatchKV writes each row’s new keys to its cache and gathers the rows right-aligned (f32 and bf16)', () => {
  for (const dtype of ['f32', 'bf16'] as const) batchKvCase(dtype);
});

function batchKvCase(dtype: KvDtype): void {
  const rng = new Rng(3);
  // what the cache stores for an f32 value
  const enc = (x: number) => (dtype === 'f32' ? x : f32ToBf16(x));
  const scratch = new KvScratch(cfg, dtype);
  const seqs = [new SeqKV(cfg, 16, dtype), new SeqKV(cfg, 16, dtype)];
  assert.equal(seqs[0]!.bytes, 16 * kvBytesPerToken(cfg, dtype));
  // row 0 has 5 cached positions, row 1 has 2; this forward adds 1 and 3 (T = 3: row 0 is padded)
  const fill = (kv: SeqKV, n: number) => {
    const k = randn([1, n, H, D], { rng });
    const v = randn([1, n, H, D], { rng });
    const kd = positionsView(kv.k[0]!, 0, n);
    const vd = positionsView(kv.v[0]!, 0, n);
    for (const [src, dst] of [
      [k, kd],
      [v, vd],
    ] as const)
      for (let p = 0; p < n; p++)
        for (let h = 0; h < H; h++)
          for (let d = 0; d < D; d++)
            dst.data[dst.offset + p * dst.strides[1]! + h * dst.strides[2]! + d] = enc(
              (src.data as Float32Array)[(p * H + h) * D + d]!,
            );
    kv.length = n;
  };
  fill(seqs[0]!, 5);
  fill(seqs[1]!, 2);
  const kNew = randn([2, 3, H, D], { rng });
  const vNew = randn([2, 3, H, D], { rng });
  const batch = new BatchKV(
    [
      { kv: seqs[0]!, add: 1 },
      { kv: seqs[1]!, add: 3 },
    ],
    3,
    scratch,
  );
  assert.equal(batch.Tk, 6);
  const { k, v } = batch.append(0, kNew, vNew);
  assert.deepEqual(k.shape, [2, 6, H, D]);
  assert.equal(k.dtype, dtype);
  const at = (t: typeof k, b: number, p: number, h: number, d: number) =>
    t.data[t.offset + b * t.strides[0]! + p * t.strides[1]! + h * t.strides[2]! + d]!;
  for (const [b, n, add] of [
    [0, 6, 1],
    [1, 5, 3],
  ] as const) {
    const cache = positionsView(seqs[b]!.k[0]!, 0, n);
    for (let p = 0; p < n; p++)
      for (let h = 0; h < H; h++)
        for (let d = 0; d < D; d++) {
          const want = at(cache, 0, p, h, d);
          assert.equal(at(k, b, 6 - n + p, h, d), want, `row ${b} position ${p}`);
          // the new positions are the forward's last `add` ones
          if (p >= n - add) assert.equal(want, enc(at(kNew, b, 3 - (n - p), h, d)));
        }
    assert.equal(at(v, b, 5, 1, 2), at(positionsView(seqs[b]!.v[0]!, 0, n), 0, n - 1, 1, 2));
  }
  batch.commit();
  assert.deepEqual(
    seqs.map((s) => s.length),
    [6, 5],
  );
  for (const s of seqs) s.dispose();
  scratch.dispose();
}
