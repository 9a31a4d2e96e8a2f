// The PyTorch reference of bench:train and bench:generate (bench/reference/torch_llama.py) computes what
// lowrank computes: on the same saved base model and PEFT adapter (LoRA, and DoRA as PEFT's DoraLinearLayer
// computes it), its logits, its summed next-token cross-entropy and the adapter weights' gradients (PyTorch
// autograd) match lowrank's. This also checks lowrank's
// forward and backward against an independent implementation. Skips, with the reason printed, where no python3
// imports torch (on Debian: apt-get install python3-torch).

import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { runTorchReference, torchPython } from '../../bench/common.ts';
import { Rng } from '../../src/core/rng.ts';
import { tidy } from '../../src/core/scope.ts';
import type { Tensor } from '../../src/core/tensor.ts';
import { saveModelHF } from '../../src/models/save.ts';
import { intTensor } from '../../src/ops/create.ts';
import { crossEntropy } from '../../src/ops/loss.ts';
import { reshape } from '../../src/ops/shape.ts';
import { backward } from '../../src/ops/tape.ts';
import { saveAdapter } from '../../src/peft/lora/io.ts';
import { LoraModel } from '../../src/peft/lora/model.ts';
import { maxRelDiff, randomizeAdapters, tinyModel } from '../peft/helpers.ts';

const found = torchPython();
const skip = found.python === null ? found.error : false;
if (skip) console.log(`# skipping: ${skip}`);

const tmp = mkdtempSync(join(tmpdir(), 'lowrank-torch-ref-'));
after(() => rmSync(tmp, { recursive: true, force: true }));

const TARGETS = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'];
const IDS = [
  [3, 7, 1, 12, 40, 5, 9, 22, 31, 2],
  [9, 2, 33, 4, 4, 17, 45, 11, 0, 6],
];

interface Check {
  logits: number[];
  loss: number;
  grads: Record<string, number[]>;
}

for (const [tied, dora] of [
  [true, false],
  [false, false],
  [true, true],
])
  test(`torch_llama.py gives lowrank's logits, loss and ${dora ? 'DoRA' : 'LoRA'} gradients (tie_word_embeddings ${tied})`, {
    skip,
  }, async () => {
    const dir = join(tmp, `tied-${tied}-dora-${dora}`);
    const model = tinyModel(3, { tie_word_embeddings: tied, rope_theta: 10000 });
    await saveModelHF(model.namedParameters(), model.config, join(dir, 'base'));
    const pm = new LoraModel(model, { r: 4, lora_alpha: 8, target_modules: TARGETS, use_dora: dora }, 'default', {
      rng: new Rng(2),
      onWarning: () => {},
    });
    randomizeAdapters(pm.namedParameters(), 7, 0.2);
    await saveAdapter(pm, join(dir, 'adapter'));

    const B = IDS.length;
    const T = IDS[0]!.length;
    const V = model.config.vocab_size;
    const targets = IDS.flatMap((row) => row.map((_, t) => (t + 1 < T ? row[t + 1]! : -100)));
    const trainable = pm.trainableParameters() as [string, Tensor][];
    const { logits, loss } = tidy(() => {
      const pos = intTensor(
        IDS.flatMap(() => [...Array(T).keys()]),
        [B, T],
      );
      const lg = pm.model.forward(intTensor(IDS.flat(), [B, T]), { positions: pos });
      const l = crossEntropy(reshape(lg, [-1, V]), intTensor(targets), { reduction: 'sum' });
      const out = { logits: lg.toF32(), loss: l.item() };
      backward(l);
      return out;
    });

    const r = runTorchReference(
      { mode: 'check', model_dir: join(dir, 'base'), adapter_dir: join(dir, 'adapter'), ids: IDS },
      1,
      120_000,
    );
    assert.equal(r.error, null, String(r.error));
    const ref = r.value as Check;
    const le = maxRelDiff(logits, Float32Array.from(ref.logits));
    assert.ok(le < 1e-5, `logits differ: ${le}`);
    assert.ok(Math.abs(loss - ref.loss) < 1e-5 * Math.abs(ref.loss), `loss ${loss} vs ${ref.loss}`);
    // every LoRA weight (and DoRA magnitude) has a gradient in both, under the PEFT name the adapter file uses;
    // the magnitudes start as W's row norms and B is random, so DoRA's rescaling is not the identity here
    assert.equal(Object.keys(ref.grads).length, trainable.length);
    assert.equal(trainable.length, 2 * (dora ? 3 : 2) * TARGETS.length);
    for (const [name, p] of trainable) {
      const saved = name
        .replace(/\.lora_magnitude_vector\.default\.weight$/, '.lora_magnitude_vector')
        .replace('.default.', '.');
      const g = ref.grads[saved];
      assert.ok(g, `no PyTorch gradient for ${saved}`);
      assert.ok(p.grad, `no lowrank gradient for ${name}`);
      const e = maxRelDiff(p.grad.toF32(), Float32Array.from(g));
      assert.ok(e < 1e-4, `${name}: gradient differs by ${e}`);
    }
  });
