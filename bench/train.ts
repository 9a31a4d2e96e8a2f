// npm run bench:train — training throughput (tokens/s) and peak RSS, beside eager PyTorch measured on the same
// workload in the same run (bench/reference/torch_llama.py: PyTorch fp32, the same threads, AdamW, clipping)
// and the figures ../shared/anchors.md gives for PyTorch 1.13 on the CPU the anchors were taken on:
//
//   LoRA r=16 alpha=32 on q,k,v,o,gate,up,down   tiny (8x256): 944 tokens/s, 2.2 GB   135m (4x256): 110 tokens/s, 6.7 GB
//   full fine-tuning                             tiny (8x256): 846 tokens/s, 1.9 GB   135m (4x256):  88 tokens/s, 6.6 GB
//   QLoRA (nf4 base, same LoRA)                  135m (4x256): no PyTorch figure on the CPU (bitsandbytes needs CUDA)
//
// Random-init models of the presets (src/models/save.ts) train on random token batches with the trainer's own
// pieces (the adapter setup of `lowrank train`, its loss masking, AdamW, clipping): a warm-up step, then timed
// steps. Each case, and each PyTorch run, has its own process, so its peak RSS is its own.
//
//   npm run bench:train [-- --cases lora-tiny,full-tiny --steps 3 --warmup 1 --rounds 2 --timeout-min 30 --all
//                          --no-torch]
//   (--all adds full fine-tuning of 135m; a case that does not finish within --timeout-min is reported as such;
//   each round runs every case, lowrank then PyTorch, and the table takes all rounds' steps together)
//
// PyTorch comes from a python3 that imports torch (bench/common.ts torchPython; on Debian: apt-get install
// python3-torch libopenblas0-pthread). Without one the PyTorch columns stay empty and a note says why. The
// table also gives the FMA bound: the tokens/s a step would reach if all of its products (stepFlops) ran at
// this machine's FMA peak, measured in the same run, and nothing else took time.

import { spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { loadNativeAddon } from '../src/backend/cpu/native-addon.ts';
import { getBackend } from '../src/backend/index.ts';
import { Rng } from '../src/core/rng.ts';
import { tidy } from '../src/core/scope.ts';
import { memoryStats, resetPeakMemory } from '../src/core/storage.ts';
import type { Tensor } from '../src/core/tensor.ts';
import { type ModelConfig, PRESETS } from '../src/models/config.ts';
import type { LlamaForCausalLM } from '../src/models/llama.ts';
import { initModel, presetConfig } from '../src/models/save.ts';
import { intTensor } from '../src/ops/create.ts';
import { crossEntropy } from '../src/ops/loss.ts';
import { reshape } from '../src/ops/shape.ts';
import { backward } from '../src/ops/tape.ts';
import { quantizeModel } from '../src/quant/linear4bit.ts';
import { setupAdapterTraining } from '../src/train/adapter-training.ts';
import { type AdapterKind, parseTrainConfig } from '../src/train/config.ts';
import { type Batch, collate, exampleRows } from '../src/train/data-pack.ts';
import { AdamW, clipFactor, gradNorm } from '../src/train/optim.ts';
import { countTargets, shiftedTargets } from '../src/train/trainer.ts';
import { fmt, machineLine, printTable, ratio, runTorchReference } from './common.ts';

interface Case {
  key: string;
  preset: 'tiny' | '135m';
  method: AdapterKind;
  batch: number;
  seq: number;
  /** PyTorch on this CPU (anchors.md); null where none was measured. */
  torchTps: number | null;
  torchRssGB: number | null;
  /** Only with --all. */
  extra?: boolean;
}

const CASES: Case[] = [
  { key: 'lora-tiny', preset: 'tiny', method: 'lora', batch: 8, seq: 256, torchTps: 944, torchRssGB: 2.2 },
  { key: 'full-tiny', preset: 'tiny', method: 'full', batch: 8, seq: 256, torchTps: 846, torchRssGB: 1.9 },
  { key: 'lora-135m', preset: '135m', method: 'lora', batch: 4, seq: 256, torchTps: 110, torchRssGB: 6.7 },
  { key: 'qlora-135m', preset: '135m', method: 'qlora', batch: 4, seq: 256, torchTps: null, torchRssGB: null },
  { key: 'full-135m', preset: '135m', method: 'full', batch: 4, seq: 256, torchTps: 88, torchRssGB: 6.6, extra: true },
];

interface CaseResult {
  key: string;
  ok: boolean;
  /** Why the case could not run (e.g. the method is not available in this build). */
  note?: string;
  /** From the fastest timed step, and from the median one. */
  tokensPerSecond?: number;
  medianTokensPerSecond?: number;
  stepSeconds?: number[];
  peakRssBytes?: number;
  peakTensorBytes?: number;
  trainable?: number;
  total?: number;
  loss?: number[];
}

function arg(name: string): string | undefined {
  const a = process.argv.slice(2);
  const i = a.indexOf(name);
  return i >= 0 ? a[i + 1] : undefined;
}

/**
 * FLOPs of one training step's products, counting only what the step needs: the linear layers forward, their
 * input gradients (not the first layer's q/k/v/gate/up under an adapter: the frozen embedding wants none),
 * their weight gradients (full fine-tuning, the tied embedding included), LoRA r=16 on the 7 projections (xA^T,
 * uB^T forward; gB, g^T u, du^T x and du A backward), causal attention (QK^T and PV forward; QK^T again, dV,
 * dP, dK, dQ backward) and the LM head (forward and input gradient).
 */
export function stepFlops(cfg: ModelConfig, method: AdapterKind, batch: number, seq: number): number {
  const T = batch * seq;
  const { hidden_size: h, intermediate_size: I, num_hidden_layers: L, head_dim: hd, vocab_size: V } = cfg;
  const qo = cfg.num_attention_heads * hd;
  const kv = cfg.num_key_value_heads * hd;
  const linears: [number, number, boolean][] = [
    // in, out, whether its input is the layer's (normed) input: no input gradient in layer 0 under an adapter
    [h, qo, true],
    [h, kv, true],
    [h, kv, true],
    [qo, h, false],
    [h, I, true],
    [h, I, true],
    [I, h, false],
  ];
  const full = method === 'full';
  const r = 16;
  let flops = 2 * T * h * V * (full ? 3 : 2); // LM head: forward, input gradient (+ the tied embedding's)
  for (let l = 0; l < L; l++) {
    for (const [i, o, first] of linears) {
      const inputGrad = full || l > 0 || !first;
      flops += 2 * T * i * o * (1 + (inputGrad ? 1 : 0) + (full ? 1 : 0));
      if (!full) flops += 2 * T * r * (i + o) * 2 + 2 * T * r * o * 2 + 2 * T * r * i * (inputGrad ? 2 : 1);
    }
    const pairs = batch * cfg.num_attention_heads * ((seq * (seq + 1)) / 2);
    flops += 14 * pairs * hd;
  }
  return flops;
}

/** A batch of random tokens, every position trained (as the PyTorch anchor: labels = input ids). */
function randomBatch(vocab: number, B: number, T: number, rng: Rng): Omit<Batch, 'epoch' | 'index'> {
  const examples = Array.from({ length: B }, () => {
    const ids = Int32Array.from({ length: T }, () => 3 + rng.int(vocab - 3));
    const labels = Int32Array.from(ids);
    labels[0] = -100;
    return { inputIds: ids, labels, source: { dataset: 0, file: 'random', line: 0 } };
  });
  return collate(exampleRows(examples));
}

/** One optimizer step as the trainer takes it: summed CE over trained tokens, backward, clip, AdamW. */
function trainStep(
  model: LlamaForCausalLM,
  trainable: [string, Tensor][],
  opt: AdamW,
  b: Omit<Batch, 'epoch' | 'index'>,
): number {
  const targets = shiftedTargets(b as Batch);
  const n = countTargets(targets);
  const sum = tidy(() => {
    const shape = [b.batchSize, b.seqLen];
    const logits = model.forward(intTensor(b.inputIds, shape), {
      positions: intTensor(b.positionIds, shape),
      seqIds: intTensor(b.seqIds, shape),
    });
    const l = crossEntropy(reshape(logits, [-1, model.config.vocab_size]), intTensor(targets), { reduction: 'sum' });
    const v = l.item();
    backward(l);
    return v;
  });
  const norm = gradNorm(trainable, 1 / n);
  opt.step((1 / n) * clipFactor(norm, 1.0));
  opt.zeroGrad();
  return sum / n;
}

/** Runs one case in this process and returns its figures. */
async function runCase(c: Case, steps: number, warmup: number): Promise<CaseResult> {
  const config = presetConfig(c.preset);
  const model = initModel(config, 0);
  const rng = new Rng(1);
  let trainable: [string, Tensor][];
  if (c.method === 'full') {
    model.requiresGrad(true);
    trainable = model.trainableParameters();
  } else {
    const cfg = parseTrainConfig({
      base_model: `preset:${c.preset}`,
      adapter: c.method,
      lora_r: 16,
      lora_alpha: 32,
      lora_dropout: 0,
      lora_target_modules: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'],
      datasets: [{ path: 'random.jsonl', type: 'text' }],
      learning_rate: 2e-4,
      sequence_len: c.seq,
      micro_batch_size: c.batch,
    });
    if (c.method === 'qlora') quantizeModel(model, { quantType: 'nf4', doubleQuant: true, computeDtype: 'float32' });
    try {
      trainable = (await setupAdapterTraining(model, cfg, `preset:${c.preset}`, rng)).trainable;
    } catch (e) {
      model.dispose();
      return { key: c.key, ok: false, note: `${c.method} is not available in this build: ${(e as Error).message}` };
    }
  }
  const opt = new AdamW(trainable, { lr: 2e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0 });
  model.train(true);
  const trainableCount = trainable.reduce((s, [, p]) => s + p.size, 0);
  const total = model.numParameters();
  const losses: number[] = [];
  for (let i = 0; i < warmup; i++)
    losses.push(trainStep(model, trainable, opt, randomBatch(config.vocab_size, c.batch, c.seq, rng)));
  resetPeakMemory();
  const times: number[] = [];
  for (let i = 0; i < steps; i++) {
    const b = randomBatch(config.vocab_size, c.batch, c.seq, rng);
    const t0 = performance.now();
    losses.push(trainStep(model, trainable, opt, b));
    times.push((performance.now() - t0) / 1000);
  }
  // the fastest step is the least disturbed by other processes on these shared machines (as bench/common.ts)
  const sorted = [...times].sort((a, b) => a - b);
  const result: CaseResult = {
    key: c.key,
    ok: true,
    tokensPerSecond: (c.batch * c.seq) / sorted[0]!,
    medianTokensPerSecond: (c.batch * c.seq) / sorted[Math.floor(sorted.length / 2)]!,
    stepSeconds: times,
    peakRssBytes: process.resourceUsage().maxRSS * 1024,
    peakTensorBytes: memoryStats().peakBytes,
    trainable: trainableCount,
    total,
    loss: losses,
  };
  opt.dispose();
  model.dispose();
  return result;
}

async function child(key: string): Promise<void> {
  const c = CASES.find((x) => x.key === key);
  if (!c) throw new Error(`unknown case ${key}`);
  const r = await runCase(c, Number(arg('--steps') ?? 3), Number(arg('--warmup') ?? 1));
  console.log(JSON.stringify(r));
}

interface TorchResult {
  tokensPerSecond: number;
  medianTokensPerSecond: number;
  stepSeconds: number[];
  peakRssBytes: number;
  gemmGflops: number;
  blas: string;
  torch: string;
}

/** Two runs of a case as one: all their timed steps, the larger peak RSS (a failed run leaves the other). */
function mergeSteps<T extends { stepSeconds?: number[]; peakRssBytes?: number }>(a: T, b: T, c: Case): T {
  if (!a.stepSeconds) return b;
  if (!b.stepSeconds) return a;
  const all = [...a.stepSeconds, ...b.stepSeconds];
  const sorted = [...all].sort((x, y) => x - y);
  return {
    ...a,
    stepSeconds: all,
    tokensPerSecond: (c.batch * c.seq) / sorted[0]!,
    medianTokensPerSecond: (c.batch * c.seq) / sorted[Math.floor(sorted.length / 2)]!,
    peakRssBytes: Math.max(a.peakRssBytes ?? 0, b.peakRssBytes ?? 0),
  };
}

function parent(): void {
  const addon = loadNativeAddon();
  console.log(`${machineLine(addon)}; backend ${getBackend().name}`);
  // the FMA peak, best of several bursts before and after the cases (the higher, the stricter the bound)
  const threads = addon?.getThreads() ?? 1;
  const peak = () => (addon ? Math.max(...Array.from({ length: 8 }, () => addon.fmaPeak(threads, 40))) : undefined);
  let peakGflops = peak();
  const wanted = arg('--cases')?.split(',');
  const cases = CASES.filter((c) => (wanted ? wanted.includes(c.key) : !c.extra || process.argv.includes('--all')));
  const steps = arg('--steps') ?? '3';
  const warmup = arg('--warmup') ?? '1';
  const timeoutMin = Number(arg('--timeout-min') ?? 30);
  const withTorch = !process.argv.includes('--no-torch');
  const self = fileURLToPath(import.meta.url);
  const notes: string[] = [];
  // rounds alternate lowrank and PyTorch, case by case, so a slow minute on this shared machine falls on both
  const rounds = Number(arg('--rounds') ?? 2);
  const results = new Map<string, { c: Case; r: CaseResult; torch?: TorchResult; flops: number }>();
  for (let round = 0; round < rounds; round++)
    for (const c of cases) {
      const flops = stepFlops(presetConfig(c.preset), c.method, c.batch, c.seq);
      process.stderr.write(
        `${c.key} (round ${round + 1}/${rounds}): ${c.method} ${c.preset} ${c.batch}x${c.seq}, ${warmup} warm-up + ${steps} timed step(s)...\n`,
      );
      const p = spawnSync(
        process.execPath,
        ['--import', 'tsx', self, '--case', c.key, '--steps', steps, '--warmup', warmup],
        {
          encoding: 'utf8',
          maxBuffer: 64 << 20,
          timeout: timeoutMin * 60_000,
          killSignal: 'SIGKILL',
        },
      );
      const last = (p.stdout ?? '').trim().split('\n').pop() ?? '';
      let r: CaseResult;
      try {
        r = JSON.parse(last) as CaseResult;
      } catch {
        const why =
          p.signal === 'SIGKILL'
            ? `did not finish within ${timeoutMin} min (--timeout-min)`
            : `failed: ${(p.stderr || `exit ${p.status}`).trim().split('\n').slice(-3).join(' ')}`;
        r = { key: c.key, ok: false, note: why };
      }
      if (!r.ok) notes.push(`${c.key}: ${r.note}`);
      console.log(
        r.ok
          ? `${c.key}: ${fmt(r.tokensPerSecond, 1)} tokens/s best step, ${fmt(r.medianTokensPerSecond, 1)} median, peak RSS ${fmt((r.peakRssBytes ?? 0) / 1e9, 2)} GB, step times ${r.stepSeconds!.map((x) => x.toFixed(2)).join(', ')} s`
          : `${c.key}: ${r.note}`,
      );
      // the same workload in eager PyTorch, right after (QLoRA has none: bitsandbytes' 4-bit layers need CUDA)
      let torch: TorchResult | undefined;
      if (withTorch && c.method !== 'qlora') {
        process.stderr.write(`${c.key}: PyTorch (bench/reference/torch_llama.py)...\n`);
        const t = runTorchReference(
          {
            config: PRESETS[c.preset],
            mode: c.method,
            batch: c.batch,
            seq: c.seq,
            steps: Number(steps),
            warmup: Number(warmup),
          },
          threads,
          timeoutMin * 60_000,
        );
        if (t.error !== null) notes.push(`${c.key}: PyTorch reference not measured: ${t.error}`);
        else {
          torch = t.value as TorchResult;
          console.log(
            `${c.key}: PyTorch ${torch.torch} ${fmt(torch.tokensPerSecond, 1)} tokens/s best step, ${fmt(torch.medianTokensPerSecond, 1)} median, peak RSS ${fmt(torch.peakRssBytes / 1e9, 2)} GB, step times ${torch.stepSeconds.map((x) => x.toFixed(2)).join(', ')} s (its sgemm 1024^3: ${fmt(torch.gemmGflops, 0)} GFLOP/s; BLAS ${torch.blas})`,
          );
        }
      }
      const prev = results.get(c.key);
      results.set(c.key, {
        c,
        flops,
        r: prev ? mergeSteps(prev.r, r, c) : r,
        torch: prev?.torch && torch ? mergeSteps(prev.torch, torch, c) : (torch ?? prev?.torch),
      });
    }
  // the bound columns, once the peak has been measured again after the cases
  const after = peak();
  if (after !== undefined && (peakGflops === undefined || after > peakGflops)) peakGflops = after;
  const rows = [...results.values()].map(({ c, r, torch, flops }) => {
    const bound = peakGflops === undefined ? undefined : (peakGflops * 1e9 * c.batch * c.seq) / flops;
    const rssGB = r.peakRssBytes === undefined ? undefined : r.peakRssBytes / 1e9;
    const torchGB = torch ? torch.peakRssBytes / 1e9 : undefined;
    return [
      c.key,
      `${c.batch}x${c.seq}`,
      r.ok ? `${((100 * r.trainable!) / r.total!).toFixed(2)}%` : '-',
      fmt(r.tokensPerSecond, 0),
      fmt(r.medianTokensPerSecond, 0),
      fmt(torch?.tokensPerSecond, 0),
      ratio(r.tokensPerSecond, torch?.tokensPerSecond),
      ratio(r.medianTokensPerSecond, torch?.medianTokensPerSecond),
      fmt(c.torchTps ?? undefined, 0),
      ratio(r.tokensPerSecond, c.torchTps ?? undefined),
      fmt(rssGB, 2),
      fmt(torchGB, 2),
      ratio(rssGB, torchGB),
      fmt(c.torchRssGB ?? undefined, 1),
      fmt(r.peakTensorBytes === undefined ? undefined : r.peakTensorBytes / 1e9, 2),
      fmt(flops / 1e9, 0),
      fmt(bound, 0),
      ratio(r.tokensPerSecond, bound),
      ratio(torch?.tokensPerSecond, bound),
    ];
  });
  printTable(
    'train: tokens/s (batch x seq / step time, fastest timed step after warm-up; median beside it) and peak RSS, beside eager PyTorch on the same workload in this run (bench/reference/torch_llama.py) and the figures of ../shared/anchors.md (PyTorch 1.13 on the CPU the anchors were taken on)',
    [
      'case',
      'batch',
      'trainable',
      'tokens/s',
      'median',
      'PyTorch',
      'ratio',
      'median ratio',
      'anchor',
      'ratio',
      'peak RSS GB',
      'PyTorch GB',
      'ratio',
      'anchor GB',
      'tensors GB',
      'GFLOP/step',
      'FMA bound tok/s',
      'of bound',
      'PyTorch of bound',
    ],
    rows,
  );
  if (peakGflops !== undefined)
    console.log(
      `\nFMA bound = ${fmt(peakGflops, 0)} GFLOP/s (this machine's FMA peak, ${threads} threads, measured in this run) x tokens / GFLOP per step.`,
    );
  console.log(
    '\nratio = lowrank / PyTorch (higher is faster for tokens/s; lower is leaner for memory). These machines are shared and noisy (about ±20%).',
  );
  for (const n of new Set(notes)) console.log(`note: ${n}`);
}

const caseKey = arg('--case');
if (caseKey) await child(caseKey);
else parent();
