// npm run bench:generate — prefill and decode tokens/s for the 135m preset (SmolLM2-135M shape) with f32 and
// bf16 weights, beside the memory-bandwidth bound measured in the same run (a decoding step reads every weight
// once and the KV cache up to its position, f32 or, for bf16 weights, bf16 (kv-cache.ts 'auto'), so
// bandwidth / those bytes bounds tokens/s) and eager PyTorch on the same workload and dtype in the same run
// (bench/reference/torch_llama.py; NO_TORCH=1 skips it). Each side runs ROUNDS (default 3) rounds and keeps
// its fastest. The read bandwidth is probed right before and right after every decoding round, and each round
// is set against the mean of its two probes: on a shared machine whose bandwidth swings (35-75 GB/s within
// minutes on the Zen 5 one), the fastest probe of a run and the fastest round are rarely taken in the same
// conditions. "of bound" is the median of the rounds' ratios, with the best in brackets.
// ../shared/anchors.md gives PyTorch 1.13 158 tokens/s prefill and 7.5 tokens/s decode (f32) on the CPU the
// anchors were taken on. Each dtype runs with the decoding layout (useDecodeLayout, as lowrank generate and
// serve use) and with the default one, and then BATCH (default 8) sequences at once in the decoding layout, as
// a server decodes them: tokens/s count every sequence's tokens, and the bound is B x bandwidth / (the weights
// + B caches), the bytes a step of B rows reads.

import { loadNativeAddon } from '../src/backend/cpu/native-addon.ts';
import { getBackend } from '../src/backend/index.ts';
import { Rng } from '../src/core/rng.ts';
import { PRESETS } from '../src/models/config.ts';
import { DecodeSession } from '../src/models/generate.ts';
import { kvBytesPerToken, resolveKvDtype } from '../src/models/kv-cache.ts';
import { argmax } from '../src/models/sampling.ts';
import { initModel, presetConfig } from '../src/models/save.ts';
import { fmt, machineLine, measureLimits, printTable, quantile, ratio, runTorchReference } from './common.ts';

const preset = process.argv[2] ?? '135m';
const prefillLen = Number(process.env.PREFILL ?? 256);
const decodeTokens = Number(process.env.DECODE ?? 64);
const rounds = Number(process.env.ROUNDS ?? 3);
const addon = loadNativeAddon();
console.log(`${machineLine(addon)}; backend ${getBackend().name}; preset ${preset}`);
const threads = addon?.getThreads() ?? 1;
// the read bandwidth before each row and after the last, the highest kept: the stricter bound (one probe alone
// read low at times on these shared machines, and a decode then came out above its "bound")
const probe = () => (addon ? measureLimits(addon, threads, 256 << 20).readT : undefined);
let readT = probe();
const keepBest = (r: number | undefined) => {
  if (r !== undefined && (readT === undefined || r > readT)) readT = r;
};
const rows: string[][] = [];
const notes: string[] = [];
// eager PyTorch, once per dtype, on the same prompt length and decode count
const torchOf = new Map<
  string,
  { prefillTokensPerSecond: number; decodeTokensPerSecond: number; decodeMedianTokensPerSecond: number }
>();
const torchFor = (dtype: 'f32' | 'bf16') => {
  if (process.env.NO_TORCH || torchOf.has(dtype)) return torchOf.get(dtype);
  process.stderr.write(`PyTorch ${dtype} (bench/reference/torch_llama.py)...\n`);
  const spec = { config: PRESETS[preset], mode: 'generate', seq: prefillLen, decode: decodeTokens, rounds };
  const t = runTorchReference({ ...spec, dtype: dtype === 'f32' ? 'float32' : 'bfloat16' }, threads);
  if (t.error !== null) {
    notes.push(`PyTorch ${dtype} not measured: ${t.error}`);
    return undefined;
  }
  const v = t.value as {
    prefillTokensPerSecond: number;
    decodeTokensPerSecond: number;
    decodeMedianTokensPerSecond: number;
    blas: string;
    torch: string;
  };
  console.log(`PyTorch ${v.torch} ${dtype}: BLAS ${v.blas}`);
  torchOf.set(dtype, v);
  return torchOf.get(dtype);
};
// the default weight layout too (LAYOUTS=decode to skip it): the same-run reference for the decoding layout;
// then BATCH sequences at once in the decoding layout (default 8, as a server's batch; BATCH=1 skips them)
const layouts = (process.env.LAYOUTS ?? 'decode,default').split(',');
const batch = Number(process.env.BATCH ?? 8);
const configs: { dtype: 'f32' | 'bf16'; layout: string; B: number }[] = [];
for (const dtype of ['f32', 'bf16'] as const) for (const layout of layouts) configs.push({ dtype, layout, B: 1 });
if (batch > 1) for (const dtype of ['f32', 'bf16'] as const) configs.push({ dtype, layout: 'decode', B: batch });
for (const { dtype, layout, B } of configs) {
  keepBest(probe());
  const cfg = presetConfig(preset);
  const model = initModel(cfg, 0, dtype);
  model.eval();
  if (layout === 'decode') model.useDecodeLayout();
  let weightBytes = 0;
  for (const [, p] of model.namedParameters()) weightBytes += p.size * (p.dtype === 'f32' ? 4 : 2);
  const rng = new Rng(1);
  const prompts = Array.from({ length: B }, () =>
    Array.from({ length: prefillLen }, () => 3 + rng.int(cfg.vocab_size - 3)),
  );
  const prompt = prompts[0]!;
  // warm up, then time prefill and decode: a whole prefill first (its activations and logits are the largest
  // buffers; the first row of a run otherwise paid their first touch, and prefill came out 12-25% slower
  // there), then a few dozen decoding steps (the JIT compiles the decoding path over them)
  const warm = new DecodeSession(model, 1, prefillLen + 33);
  warm.step([prompt]);
  for (let i = 0; i < 32; i++) warm.step([[prompt[i]!]]);
  warm.dispose();
  // rounds of a fresh session each (its first decoding step records the plan, as every generation's does):
  // the fastest round is set beside the fastest bandwidth probe, both best of several on a shared machine
  // K and V (every layer and kv head, in the cache's dtype) at the decoded positions' mean cache length
  const meanLen = prefillLen + (decodeTokens + 1) / 2;
  const kvBytes = kvBytesPerToken(cfg, resolveKvDtype(model)) * meanLen;
  // a step of B rows reads the weights once and each row's cache
  const stepBytes = weightBytes + B * kvBytes;
  const readNow = () => (addon ? addon.memBandwidth(256 << 20, threads).read : undefined);
  const prefillS: number[] = [];
  const decodeS: number[] = [];
  const roundBounds: number[] = [];
  const roundRatios: number[] = [];
  for (let round = 0; round < rounds; round++) {
    const s = new DecodeSession(model, B, prefillLen + decodeTokens + 1);
    let t0 = performance.now();
    let logits = s.step(prompts);
    prefillS.push((performance.now() - t0) / 1000);
    const before = readNow();
    t0 = performance.now();
    for (let i = 0; i < decodeTokens; i++) {
      logits = s.step(logits.map((l) => [argmax(l)])); // greedy, as lowrank generate picks
    }
    const secs = (performance.now() - t0) / 1000;
    decodeS.push(secs);
    const after = readNow();
    if (before !== undefined && after !== undefined) {
      keepBest(Math.max(before, after));
      const bound = (B * ((before + after) / 2) * 1e9) / stepBytes;
      roundBounds.push(bound);
      roundRatios.push((B * decodeTokens) / secs / bound);
    }
    s.dispose();
  }
  model.dispose();
  const prefillTps = (B * prefillLen) / Math.min(...prefillS);
  const decodeTps = (B * decodeTokens) / Math.min(...decodeS);
  const decodeMedian = (B * decodeTokens) / quantile(decodeS, 0.5);
  const torch = B === 1 ? torchFor(dtype) : undefined; // the reference decodes one sequence
  rows.push([
    `${dtype}, ${layout} layout${B > 1 ? `, batch ${B}` : ''}`,
    `${(weightBytes / 1e6).toFixed(0)} + ${((B * kvBytes) / 1e6).toFixed(0)} MB`,
    fmt(prefillTps),
    fmt(torch?.prefillTokensPerSecond),
    ratio(prefillTps, torch?.prefillTokensPerSecond),
    B === 1 ? ratio(prefillTps, 158) : '-', // the anchors are one sequence's
    `${fmt(decodeTps, 2)} (${fmt(decodeMedian, 2)})`,
    torch ? `${fmt(torch.decodeTokensPerSecond, 2)} (${fmt(torch.decodeMedianTokensPerSecond, 2)})` : '-',
    ratio(decodeTps, torch?.decodeTokensPerSecond),
    B === 1 ? ratio(decodeTps, 7.5) : '-',
    roundBounds.length ? fmt(quantile(roundBounds, 0.5), 1) : '-',
    roundRatios.length
      ? `${(quantile(roundRatios, 0.5) * 100).toFixed(0)}% (${(Math.max(...roundRatios) * 100).toFixed(0)}%)`
      : '-',
  ]);
}
keepBest(probe());
printTable(
  `generate: ${preset}, prefill 1x${prefillLen} (Bx${prefillLen} in a batch row), greedy decode ${decodeTokens} tokens a sequence with the KV cache, fastest of ${rounds} rounds (median in brackets)${readT !== undefined ? `; read bandwidth up to ${fmt(readT)} GB/s (${threads} threads, the best probe of this run)` : ''}`,
  [
    'weights, layout',
    'bytes/step (weights + KV)',
    'prefill tok/s',
    'PyTorch',
    'ratio',
    'vs anchor 158',
    'decode tok/s (median)',
    'PyTorch (median)',
    'ratio',
    'vs anchor 7.5',
    'bandwidth bound tok/s (median of rounds)',
    'of bound: median (best) of rounds',
  ],
  rows,
);
console.log(
  '\nPyTorch = eager PyTorch on the same prompt and decode count and the same dtype, measured in this run (bench/reference/torch_llama.py, KV cache, greedy); anchor = ../shared/anchors.md (f32, another CPU).',
);
for (const n of notes) console.log(`note: ${n}`);
