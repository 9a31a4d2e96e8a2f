import assert from 'node:assert/strict';
import { test } from 'node:test';
import { Rng } from '../../src/core/rng.ts';
import { tidy } from '../../src/core/scope.ts';
import { configFromHF } from '../../src/models/config.ts';
import { LlamaForCausalLM } from '../../src/models/llama.ts';
import { checkpoint } from '../../src/ops/checkpoint.ts';
import { intTensor } from '../../src/ops/create.ts';
import { dropout } from '../../src/ops/dropout.ts';
import { mul } from '../../src/ops/elementwise.ts';
import { sum } from '../../src/ops/reduce.ts';
import { backward } from '../../src/ops/tape.ts';
import { randomTensor } from '../helpers/gradcheck.ts';

test('gradient checkpointing gives the same gradients as storing activations', () => {
  const cfg = configFromHF({
    model_type: 'llama',
    vocab_size: 20,
    hidden_size: 16,
    intermediate_size: 24,
    num_hidden_layers: 3,
    num_attention_heads: 4,
    num_key_value_heads: 2,
  });
  const model = new LlamaForCausalLM(cfg, { rng: new Rng(2) });
  model.requiresGrad(true);
  const ids = intTensor([1, 5, 7, 3, 2, 9, 11, 4], [2, 4]);
  const labels = intTensor([5, 7, 3, -100, 9, 11, 4, 2], [2, 4]);
  const positions = intTensor([0, 1, 2, 3, 0, 1, 2, 3], [2, 4]);
  const grads = (useCheckpoint: boolean) => {
    model.zeroGrad();
    model.layerRunner = useCheckpoint
      ? (layer, x, ctx, inv) =>
          checkpoint(
            (h) => layer.forward(h, ctx, inv),
            x,
            layer.trainableParameters().map(([, p]) => p),
          )
      : null;
    tidy(() => backward(model.loss(ids, labels, { positions })));
    return model.parameters().map((p) => p.grad!.toF32());
  };
  const plain = grads(false);
  const ck = grads(true);
  assert.equal(plain.length, ck.length);
  for (const [i, g] of plain.entries()) assert.deepEqual(ck[i], g, `parameter ${i}`);
  model.dispose();
});

test('checkpointing rewinds the RNG so a recomputed dropout mask is the same', () => {
  const rng = new Rng(9);
  const x = randomTensor([3, 8], new Rng(1));
  const w = randomTensor([3, 8], new Rng(2));
  const f = (h: typeof x) => mul(dropout(h, 0.5, rng), w);
  const r0 = rng.state();
  tidy(() => backward(sum(f(x))));
  const plain = x.grad!.toF32();
  x.grad = null;
  w.grad = null;
  rng.setState(r0);
  tidy(() => backward(sum(checkpoint(f, x, [w], rng))));
  assert.deepEqual(x.grad!.toF32(), plain);
});
