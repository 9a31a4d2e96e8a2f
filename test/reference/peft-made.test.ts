// Adapters really made by Hugging Face PEFT (copied from public repositories: see peft-made/README.md) load into
// lowrank onto a model with their base's projection shapes, and lowrank's writer gives back PEFT's config fields,
// key names, shapes, dtypes and tensor bytes. The vocabulary and MLP width of the stand-in base are shrunk (the
// adapters do not touch them) so the test stays small; every targeted projection has its real shape.

import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { Rng } from '../../src/core/rng.ts';
import { tidy } from '../../src/core/scope.ts';
import { openSafetensors } from '../../src/formats/safetensors.ts';
import { configFromHF } from '../../src/models/config.ts';
import { LlamaForCausalLM } from '../../src/models/llama.ts';
import { randn } from '../../src/ops/create.ts';
import { noGrad } from '../../src/ops/tape.ts';
import {
  ADAPTER_CONFIG_KEYS,
  loraScaling,
  OTHER_FIELD_DEFAULTS,
  parseAdapterConfig,
} from '../../src/peft/lora/config.ts';
import { loadAdapter, saveAdapter } from '../../src/peft/lora/io.ts';
import { LoraLinear } from '../../src/peft/lora/layer.ts';
import type { LoraModel } from '../../src/peft/lora/model.ts';
import { checkTargetModuleExists } from '../../src/peft/lora/target.ts';

const DATA = fileURLToPath(new URL('./peft-made/', import.meta.url));
const tmp = mkdtempSync(join(tmpdir(), 'lowrank-peft-made-'));
after(() => rmSync(tmp, { recursive: true, force: true }));

interface Case {
  dir: string;
  sha256: Record<string, string>;
  /** The base's config.json, with vocab_size / intermediate_size shrunk (not targeted). */
  base: Record<string, unknown>;
  r: number;
  alpha: number;
  rslora: boolean;
  targets: string[];
  dtype: string;
  /** lowrank's saved adapter_model.safetensors is byte for byte PEFT's file (same tensor order and header). */
  identicalFile: boolean;
  /** Expected shape of lora_A / lora_B per target. */
  shapes: Record<string, { A: number[]; B: number[] }>;
}

const CASES: Case[] = [
  {
    dir: 'qwen2.5-0.5b-instruct-r6-qv',
    sha256: {
      'adapter_config.json': 'f9a1b50fb2802958ce5592aa82902276527259a0189295ffe42f945865266352',
      'adapter_model.safetensors': 'c24c2fab162774b72c80d601caf5a939636d058f2353ec4b50e89ba0deb6fddc',
    },
    // Qwen/Qwen2.5-0.5B-Instruct config.json (vocab_size 151936 and intermediate_size 4864 in the real model)
    base: {
      model_type: 'qwen2',
      vocab_size: 64,
      hidden_size: 896,
      intermediate_size: 32,
      num_hidden_layers: 24,
      num_attention_heads: 14,
      num_key_value_heads: 2,
      max_position_embeddings: 32768,
      rms_norm_eps: 1e-6,
      rope_theta: 1000000,
      tie_word_embeddings: true,
    },
    r: 6,
    alpha: 32,
    rslora: false,
    targets: ['q_proj', 'v_proj'],
    dtype: 'F32',
    identicalFile: true,
    shapes: { q_proj: { A: [6, 896], B: [896, 6] }, v_proj: { A: [6, 896], B: [128, 6] } },
  },
];

const PREFIX = 'base_model.model.';
const LINEAR_SUFFIXES = [
  'self_attn.q_proj',
  'self_attn.k_proj',
  'self_attn.v_proj',
  'self_attn.o_proj',
  'mlp.gate_proj',
  'mlp.up_proj',
  'mlp.down_proj',
];

// biome-ignore lint/suspicious/noExplicitAny: adapter_config.json objects
function readJson(file: string): any {
  return JSON.parse(readFileSync(file, 'utf8'));
}

function sha256(file: string): string {
  return createHash('sha256').update(readFileSync(file)).digest('hex');
}

/** name -> { dtype, shape, bytes } of a safetensors file, and its metadata. */
function readFile(file: string) {
  const r = openSafetensors(file);
  try {
    const tensors = new Map(
      r.names().map((n) => {
        const t = r.read(n);
        return [n, { dtype: t.dtype as string, shape: t.shape, bytes: Buffer.from(t.data) }];
      }),
    );
    return { metadata: { ...r.metadata }, tensors };
  } finally {
    r.close();
  }
}

function baseModel(c: Case): LlamaForCausalLM {
  return new LlamaForCausalLM(configFromHF(c.base), { rng: new Rng(7) });
}

/** Every linear module path of the base model (the names PEFT's target matching sees). */
function linearPaths(c: Case): string[] {
  const n = c.base.num_hidden_layers as number;
  return Array.from({ length: n }, (_, i) => LINEAR_SUFFIXES.map((s) => `model.layers.${i}.${s}`)).flat();
}

function load(c: Case, dir: string): { pm: LoraModel; warnings: string[] } {
  const warnings: string[] = [];
  const pm = loadAdapter(baseModel(c), dir, { strict: true, onWarning: (m) => warnings.push(m) });
  return { pm, warnings };
}

for (const c of CASES) {
  const dir = join(DATA, c.dir);
  const cfgFile = join(dir, 'adapter_config.json');
  const wFile = join(dir, 'adapter_model.safetensors');

  test(`${c.dir}: the files are PEFT's bytes (checksums in README.md)`, () => {
    for (const [f, want] of Object.entries(c.sha256))
      assert.equal(sha256(join(dir, f)), want, `${c.dir}/${f}: SHA-256 differs from the copied original`);
  });

  test(`${c.dir}: adapter_config.json parses with PEFT's values and no warnings`, () => {
    const raw = readJson(cfgFile);
    const { config, warnings } = parseAdapterConfig(raw, cfgFile);
    assert.deepEqual(warnings, [], `${c.dir}: every field PEFT wrote is known`);
    assert.equal(config.peft_type, 'LORA', `${c.dir}: peft_type`);
    assert.equal(config.r, c.r, `${c.dir}: r`);
    assert.equal(config.lora_alpha, c.alpha, `${c.dir}: lora_alpha`);
    assert.equal(config.use_rslora, c.rslora, `${c.dir}: use_rslora`);
    assert.equal(config.use_dora, false, `${c.dir}: use_dora`);
    assert.deepEqual(
      [...(config.target_modules as string[])].sort(),
      [...c.targets].sort(),
      `${c.dir}: target_modules`,
    );
    for (const k of Object.keys(raw))
      assert.ok(ADAPTER_CONFIG_KEYS.includes(k), `${c.dir}: field ${k} is one lowrank writes back`);
    // the fields lowrank does not interpret are kept as read
    for (const k of Object.keys(raw))
      if (k in OTHER_FIELD_DEFAULTS) assert.deepEqual(config.extra[k], raw[k], `${c.dir}: extra field ${k} kept`);
  });

  test(`${c.dir}: every tensor key names a module that target matching selects, with the base's shapes`, () => {
    const { config } = parseAdapterConfig(readJson(cfgFile), cfgFile);
    const selected = linearPaths(c).filter((p) => checkTargetModuleExists(config, p) === 'match');
    const { metadata, tensors } = readFile(wFile);
    assert.deepEqual(metadata, { format: 'pt' }, `${c.dir}: safetensors metadata`);
    const want = new Set<string>();
    for (const p of selected) for (const ab of ['lora_A', 'lora_B']) want.add(`${PREFIX}${p}.${ab}.weight`);
    assert.deepEqual([...tensors.keys()].sort(), [...want].sort(), `${c.dir}: keys are the selected modules' A/B`);
    assert.equal(
      selected.length,
      (c.base.num_hidden_layers as number) * c.targets.length,
      `${c.dir}: one module per target per layer`,
    );
    for (const [k, t] of tensors) {
      const target = c.targets.find((s) => k.includes(`.${s}.`))!;
      const ab = k.endsWith('.lora_A.weight') ? 'A' : 'B';
      assert.equal(t.dtype, c.dtype, `${c.dir}: ${k} dtype`);
      assert.deepEqual(t.shape, c.shapes[target]![ab], `${c.dir}: ${k} shape`);
    }
  });

  test(`${c.dir}: loads strictly onto a base of its shapes; A, B and scaling are PEFT's`, () => {
    const { pm, warnings } = load(c, dir);
    assert.deepEqual(warnings, [], `${c.dir}: no missing or unexpected keys`);
    const layers = pm.adapterLayers();
    const { tensors } = readFile(wFile);
    assert.equal(layers.length * 2, tensors.size, `${c.dir}: one adapted layer per A/B pair`);
    const scale = loraScaling(c.alpha, c.r, c.rslora);
    for (const [path, l] of layers) {
      assert.ok(l instanceof LoraLinear, `${c.dir}: ${path} is a LoraLinear`);
      assert.equal(l.scalingOf('default'), scale, `${c.dir}: ${path} scaling alpha/r`);
      for (const [ab, m] of [
        ['lora_A', l.loraA],
        ['lora_B', l.loraB],
      ] as const) {
        const want = tensors.get(`${PREFIX}${path}.${ab}.weight`);
        assert.ok(want, `${c.dir}: ${path}.${ab} is in the file`);
        const got = m.get('default')!.weight;
        assert.deepEqual(got.shape, want.shape, `${c.dir}: ${path}.${ab} shape`);
        assert.ok(
          Buffer.from(got.toF32().buffer).equals(want.bytes),
          `${c.dir}: ${path}.${ab} holds the file's F32 values bit for bit`,
        );
      }
    }
  });

  test(`${c.dir}: the adapted layers add scaling * B A x to the base output`, () => {
    const { pm } = load(c, dir);
    const layers = pm.adapterLayers();
    const scale = loraScaling(c.alpha, c.r, c.rslora);
    // first and last layer of each target
    const n = c.base.num_hidden_layers as number;
    const chosen = layers.filter(([p]) => p.startsWith('model.layers.0.') || p.startsWith(`model.layers.${n - 1}.`));
    assert.equal(chosen.length, 2 * c.targets.length, `${c.dir}: checking first and last layer of each target`);
    for (const [path, l] of chosen) {
      const lin = l as LoraLinear;
      const A = lin.loraA.get('default')!.weight;
      const B = lin.loraB.get('default')!.weight;
      const [r, inF] = A.shape as [number, number];
      const outF = B.shape[0]!;
      const T = 3;
      const { x, y, y0 } = noGrad(() =>
        tidy(() => {
          const xt = randn([1, T, inF], { rng: new Rng(11) });
          const x = xt.toF32();
          const y = lin.forward(xt).toF32();
          const y0 = pm.withAdaptersDisabled(() => lin.forward(xt).toF32());
          return { x, y, y0 };
        }),
      );
      const a = A.toF32();
      const b = B.toF32();
      let maxErr = 0;
      let maxRef = 0;
      for (let t = 0; t < T; t++) {
        const ax = new Float64Array(r);
        for (let j = 0; j < r; j++) for (let i = 0; i < inF; i++) ax[j]! += a[j * inF + i]! * x[t * inF + i]!;
        for (let o = 0; o < outF; o++) {
          let d = 0;
          for (let j = 0; j < r; j++) d += b[o * r + j]! * ax[j]!;
          d *= scale;
          maxRef = Math.max(maxRef, Math.abs(d));
          maxErr = Math.max(maxErr, Math.abs(y[t * outF + o]! - y0[t * outF + o]! - d));
        }
      }
      assert.ok(maxRef > 0, `${c.dir}: ${path} the adapter changes the output`);
      assert.ok(maxErr / maxRef < 1e-4, `${c.dir}: ${path} delta = s B A x (rel err ${maxErr / maxRef})`);
    }
  });

  test(`${c.dir}: saving gives PEFT's config fields, keys, shapes, dtypes and bytes; the copy loads back`, async () => {
    const { pm } = load(c, dir);
    const out = join(tmp, c.dir);
    await saveAdapter(pm, out);

    const ja = readJson(cfgFile);
    const jb = readJson(join(out, 'adapter_config.json'));
    const norm = (v: unknown) => (Array.isArray(v) ? [...v].sort() : v);
    for (const k of Object.keys(ja)) {
      assert.ok(k in jb, `${c.dir}: saved config has field ${k}`);
      assert.deepEqual(norm(jb[k]), norm(ja[k]), `${c.dir}: saved config field ${k}`);
    }
    // fields a newer PEFT writes are added at PEFT's defaults, nothing else
    for (const k of Object.keys(jb).filter((f) => !(f in ja))) {
      assert.ok(k in OTHER_FIELD_DEFAULTS, `${c.dir}: added field ${k} is a PEFT LoraConfig field`);
      assert.deepEqual(jb[k], OTHER_FIELD_DEFAULTS[k], `${c.dir}: added field ${k} at PEFT's default`);
    }
    assert.deepEqual(Object.keys(jb), [...Object.keys(jb)].sort(), `${c.dir}: saved config keys sorted, as PEFT`);
    assert.deepEqual(
      parseAdapterConfig(jb).config,
      parseAdapterConfig(ja).config,
      `${c.dir}: the saved config parses to the same LoraConfig`,
    );

    const a = readFile(wFile);
    const b = readFile(join(out, 'adapter_model.safetensors'));
    assert.deepEqual(b.metadata, a.metadata, `${c.dir}: safetensors metadata`);
    assert.deepEqual([...b.tensors.keys()].sort(), [...a.tensors.keys()].sort(), `${c.dir}: same key names`);
    for (const [k, ta] of a.tensors) {
      const tb = b.tensors.get(k)!;
      assert.equal(tb.dtype, ta.dtype, `${c.dir}: ${k} dtype`);
      assert.deepEqual(tb.shape, ta.shape, `${c.dir}: ${k} shape`);
      assert.ok(tb.bytes.equals(ta.bytes), `${c.dir}: ${k} bytes round-trip`);
    }
    if (c.identicalFile)
      assert.ok(
        readFileSync(join(out, 'adapter_model.safetensors')).equals(readFileSync(wFile)),
        `${c.dir}: the saved adapter_model.safetensors is PEFT's file byte for byte`,
      );

    const again = load(c, out);
    assert.deepEqual(again.warnings, [], `${c.dir}: the saved copy loads strictly without warnings`);
    assert.equal(again.pm.adapterLayers().length, pm.adapterLayers().length, `${c.dir}: same adapted layers`);
  });
}
