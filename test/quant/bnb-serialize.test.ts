import assert from 'node:assert/strict';
import { test } from 'node:test';
import { ConfigError, FormatError } from '../../src/core/errors.ts';
import { dequantize4bit, type QuantState4bit, quantize4bit } from '../../src/quant/blockwise4.ts';
import {
  BNB_CONFIG_FLOAT_KEYS,
  bnbQuantizationConfig,
  findBnb4bitModules,
  fromBnb4bitTensors,
  parseBnbQuantizationConfig,
  quantStateJson,
  type RawTensor,
  toBnb4bitTensors,
} from '../../src/quant/bnb-serialize.ts';
import { FP4_CODE, NF4_CODE } from '../../src/quant/codebooks.ts';
import { pyFloatRepr, pyJsonDumps } from '../../src/quant/pyjson.ts';

const P = 'model.layers.0.self_attn.q_proj';

function weights(n: number, seed = 1): Float32Array {
  const w = new Float32Array(n);
  let s = seed;
  for (let i = 0; i < n; i++) {
    s = (s * 1103515245 + 12345) % 2147483648;
    w[i] = (s / 2147483648 - 0.5) * (1 + (i % 13));
  }
  return w;
}

const text = (t: RawTensor) => new TextDecoder().decode(t.data);

test('keys, order, dtypes and shapes of a double-quantized NF4 weight', () => {
  const n = 32 * 48; // 24 blocks of 64
  const s = quantize4bit(weights(n), { quantType: 'nf4', doubleQuant: true, shape: [32, 48], dtype: 'bfloat16' });
  const t = toBnb4bitTensors(P, s);
  assert.deepEqual(Object.keys(t), [
    `${P}.weight`,
    `${P}.weight.absmax`,
    `${P}.weight.quant_map`,
    `${P}.weight.nested_absmax`,
    `${P}.weight.nested_quant_map`,
    `${P}.weight.quant_state.bitsandbytes__nf4`,
  ]);
  const w = t[`${P}.weight`]!;
  assert.equal(w.dtype, 'U8');
  assert.deepEqual(w.shape, [n / 2, 1]); // bitsandbytes: [(n + 1) // 2, 1]
  assert.deepEqual(t[`${P}.weight.absmax`]!.dtype, 'U8');
  assert.deepEqual(t[`${P}.weight.absmax`]!.shape, [24]);
  assert.deepEqual(t[`${P}.weight.quant_map`]!.shape, [16]);
  assert.deepEqual(t[`${P}.weight.nested_absmax`]!.shape, [1]);
  assert.deepEqual(t[`${P}.weight.nested_quant_map`]!.shape, [256]);
  const qs = t[`${P}.weight.quant_state.bitsandbytes__nf4`]!;
  assert.equal(qs.dtype, 'U8');
  assert.equal(qs.shape[0], qs.data.length);
  const offset = (s.absmax as { offset: number }).offset;
  assert.equal(
    text(qs),
    `{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [32, 48], "nested_blocksize": 256, ` +
      `"nested_dtype": "float32", "nested_offset": ${pyFloatRepr(offset)}}`,
  );
  // quant_map bytes are the float32 table, little-endian.
  assert.deepEqual(new Float32Array(t[`${P}.weight.quant_map`]!.data.slice().buffer), NF4_CODE);
});

test('JSON blob without double quantization, and an integral offset printed as a Python float', () => {
  const plain = quantize4bit(new Float32Array([1, 2, 3]), { quantType: 'fp4' });
  assert.equal(quantStateJson(plain), '{"quant_type": "fp4", "blocksize": 64, "dtype": "float32", "shape": [3]}');
  const t = toBnb4bitTensors('lin', plain);
  assert.deepEqual(Object.keys(t), [
    'lin.weight',
    'lin.weight.absmax',
    'lin.weight.quant_map',
    'lin.weight.quant_state.bitsandbytes__fp4',
  ]);
  assert.equal(t['lin.weight.absmax']!.dtype, 'F32');
  assert.deepEqual(t['lin.weight']!.shape, [2, 1]); // (3 + 1) // 2
  const dq = quantize4bit(new Float32Array([0.5, -2, 1, 0]), { quantType: 'nf4', doubleQuant: true, shape: [2, 2] });
  assert.equal(
    quantStateJson(dq),
    '{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [2, 2], "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 2.0}',
  );
  // FP4's -0 entry keeps its sign bit on disk.
  const qm = t['lin.weight.quant_map']!.data;
  assert.deepEqual(Array.from(qm.subarray(32, 36)), [0, 0, 0, 0x80]);
  assert.deepEqual(new Float32Array(qm.slice().buffer), FP4_CODE);
});

test('round trip: tensors -> state -> tensors is byte-exact, state fields identical', () => {
  const cases: [QuantState4bit, object][] = [
    [quantize4bit(weights(4096 + 64 * 300, 3), { quantType: 'nf4', doubleQuant: true, shape: [23296] }), {}],
    [quantize4bit(weights(777, 5), { quantType: 'fp4', blocksize: 128, shape: [7, 111] }), {}],
    [
      quantize4bit(weights(64 * 8, 9), { quantType: 'nf4', doubleQuant: true, shape: [8, 64], dtype: 'float16' }),
      { quantStorage: 'bfloat16' },
    ],
  ];
  for (const [s, opts] of cases) {
    const t = toBnb4bitTensors(P, s, opts);
    const back = fromBnb4bitTensors({ ...t, 'other.weight': { dtype: 'F32', shape: [1], data: new Uint8Array(4) } }, P);
    assert.deepEqual(back, s);
    const again = toBnb4bitTensors(P, back, opts);
    assert.deepEqual(Object.keys(again), Object.keys(t));
    for (const k of Object.keys(t)) {
      assert.equal(again[k]!.dtype, t[k]!.dtype);
      assert.deepEqual(again[k]!.shape, t[k]!.shape);
      assert.deepEqual(again[k]!.data, t[k]!.data, k);
    }
    assert.deepEqual(dequantize4bit(back), dequantize4bit(s));
  }
  const bf = toBnb4bitTensors(P, cases[2]![0], { quantStorage: 'bfloat16' })[`${P}.weight`]!;
  assert.equal(bf.dtype, 'BF16');
  assert.deepEqual(bf.shape, [128, 1]); // 256 bytes viewed as bf16
  assert.throws(
    () => toBnb4bitTensors(P, quantize4bit(weights(6), { quantType: 'nf4' }), { quantStorage: 'float32' }),
    ConfigError,
  );
});

test('findBnb4bitModules lists the quantized module prefixes', () => {
  const s = quantize4bit(weights(64), { quantType: 'nf4' });
  const all = { ...toBnb4bitTensors('a.q_proj', s), ...toBnb4bitTensors('a.k_proj', s), 'a.norm.weight': {} };
  assert.deepEqual(findBnb4bitModules(Object.keys(all)), ['a.k_proj', 'a.q_proj']);
});

test('malformed states: FormatError naming the tensor', () => {
  const s = quantize4bit(weights(64 * 5), { quantType: 'nf4', doubleQuant: true, shape: [5, 64] });
  const good = toBnb4bitTensors(P, s);
  const W = `${P}.weight`;
  const QS = `${W}.quant_state.bitsandbytes__nf4`;
  const json = (o: object): RawTensor => {
    const data = new TextEncoder().encode(JSON.stringify(o));
    return { dtype: 'U8', shape: [data.length], data };
  };
  const meta = JSON.parse(text(good[QS]!));
  const without = (k: string) => Object.fromEntries(Object.entries(good).filter(([key]) => key !== k));
  const cases: [string, Record<string, RawTensor>, string][] = [
    ['missing quant_state', without(QS), `${W}.quant_state.bitsandbytes__*`],
    ['missing packed weight', without(W), W],
    ['missing absmax', without(`${W}.absmax`), `${W}.absmax`],
    ['missing nested_absmax', without(`${W}.nested_absmax`), `${W}.nested_absmax`],
    ['missing quant_map', without(`${W}.quant_map`), `${W}.quant_map`],
    [
      'unknown quant type',
      { ...without(QS), [`${W}.quant_state.bitsandbytes__int4`]: good[QS]! },
      'bitsandbytes__int4',
    ],
    ['two quant states', { ...good, [`${W}.quant_state.bitsandbytes__fp4`]: good[QS]! }, `${W}.quant_state`],
    ['unknown part', { ...good, [`${W}.zeros`]: good[`${W}.absmax`]! }, `${W}.zeros`],
    ['quant_type mismatch', { ...good, [QS]: json({ ...meta, quant_type: 'fp4' }) }, QS],
    ['bad blocksize', { ...good, [QS]: json({ ...meta, blocksize: 48 }) }, QS],
    ['bad dtype', { ...good, [QS]: json({ ...meta, dtype: 'int8' }) }, QS],
    ['bad shape', { ...good, [QS]: json({ ...meta, shape: [5, -64] }) }, QS],
    ['unknown JSON key', { ...good, [QS]: json({ ...meta, extra: 1 }) }, QS],
    ['nested key missing', { ...good, [QS]: json({ ...meta, nested_offset: undefined }) }, QS],
    ['bad nested_dtype', { ...good, [QS]: json({ ...meta, nested_dtype: 'float16' }) }, QS],
    ['not JSON', { ...good, [QS]: { dtype: 'U8', shape: [3], data: new Uint8Array([123, 34, 255]) } }, QS],
    ['shape does not match packed size', { ...good, [QS]: json({ ...meta, shape: [6, 64] }) }, W],
    ['packed dtype', { ...good, [W]: { ...good[W]!, dtype: 'I32', shape: [40, 1] } }, W],
    ['packed flat shape', { ...good, [W]: { ...good[W]!, shape: [160] } }, W],
    ['data length', { ...good, [W]: { ...good[W]!, data: good[W]!.data.subarray(1) } }, W],
    ['absmax size', { ...good, [`${W}.absmax`]: { dtype: 'U8', shape: [4], data: new Uint8Array(4) } }, `${W}.absmax`],
    [
      'absmax dtype',
      { ...good, [`${W}.absmax`]: { dtype: 'F32', shape: [5], data: new Uint8Array(20) } },
      `${W}.absmax`,
    ],
    [
      'nested map size',
      { ...good, [`${W}.nested_quant_map`]: { dtype: 'F32', shape: [16], data: new Uint8Array(64) } },
      `${W}.nested_quant_map`,
    ],
    [
      'quant_map is not the NF4 table',
      {
        ...good,
        [`${W}.quant_map`]: toBnb4bitTensors(P, quantize4bit(weights(64), { quantType: 'fp4' }))[`${W}.quant_map`]!,
      },
      `${W}.quant_map`,
    ],
  ];
  for (const [what, tensors, name] of cases) {
    assert.throws(
      () => fromBnb4bitTensors(tensors, P),
      (e: unknown) => e instanceof FormatError && e.message.includes(name),
      what,
    );
  }
});

test('quantization_config: transformers defaults and the QLoRA recipe, as to_dict() writes them', () => {
  const def = bnbQuantizationConfig();
  assert.equal(def.bnb_4bit_quant_type, 'fp4');
  assert.equal(def.bnb_4bit_use_double_quant, false);
  assert.equal(def.bnb_4bit_compute_dtype, 'float32');
  assert.equal(def.load_in_4bit, false);
  const q = bnbQuantizationConfig({ loadIn4bit: true, quantType: 'nf4', doubleQuant: true, computeDtype: 'bfloat16' });
  // json.dumps(BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
  //            bnb_4bit_compute_dtype=torch.bfloat16).to_dict())
  assert.equal(
    pyJsonDumps(q, { floatKeys: BNB_CONFIG_FLOAT_KEYS }),
    '{"quant_method": "bitsandbytes", "_load_in_8bit": false, "_load_in_4bit": true, "llm_int8_threshold": 6.0, ' +
      '"llm_int8_skip_modules": null, "llm_int8_enable_fp32_cpu_offload": false, "llm_int8_has_fp16_weight": false, ' +
      '"bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": true, "bnb_4bit_compute_dtype": "bfloat16", ' +
      '"bnb_4bit_quant_storage": "uint8", "load_in_4bit": true, "load_in_8bit": false}',
  );
  // In config.json (save_pretrained: indent=2, sort_keys=True).
  const file = pyJsonDumps({ quantization_config: q }, { indent: 2, sortKeys: true, floatKeys: BNB_CONFIG_FLOAT_KEYS });
  assert.ok(
    file.includes(
      '\n    "_load_in_4bit": true,\n    "_load_in_8bit": false,\n    "bnb_4bit_compute_dtype": "bfloat16",',
    ),
  );
  assert.ok(file.includes('"llm_int8_threshold": 6.0,'));
  assert.deepEqual(parseBnbQuantizationConfig(JSON.parse(file).quantization_config), q);
});

test('quantization_config validation: ConfigError naming the field', () => {
  const q = bnbQuantizationConfig({ loadIn4bit: true, quantType: 'nf4' });
  // Older files: only the public keys; torch.-prefixed dtype strings.
  const old = parseBnbQuantizationConfig({
    quant_method: 'bitsandbytes',
    load_in_4bit: true,
    bnb_4bit_quant_type: 'nf4',
    bnb_4bit_compute_dtype: 'torch.bfloat16',
  });
  assert.equal(old._load_in_4bit, true);
  assert.equal(old.bnb_4bit_compute_dtype, 'bfloat16');
  assert.equal(old.bnb_4bit_quant_storage, 'uint8');
  const bad: [Record<string, unknown>, string][] = [
    [{ ...q, quant_method: 'gptq' }, 'quant_method'],
    [{ ...q, bnb_4bit_quant_type: 'int4' }, 'bnb_4bit_quant_type'],
    [{ ...q, bnb_4bit_compute_dtype: 'float8' }, 'bnb_4bit_compute_dtype'],
    [{ ...q, bnb_4bit_quant_storage: 'int32' }, 'bnb_4bit_quant_storage'],
    [{ ...q, bnb_4bit_use_double_quant: 'yes' }, 'bnb_4bit_use_double_quant'],
    [{ ...q, load_in_8bit: true, _load_in_8bit: true }, 'load_in_4bit'],
    [{ ...q, load_in_4bit: false }, 'load_in_4bit'],
    [{ ...q, llm_int8_threshold: '6' }, 'llm_int8_threshold'],
    [{ ...q, llm_int8_skip_modules: 'lm_head' }, 'llm_int8_skip_modules'],
  ];
  for (const [cfg, field] of bad) {
    assert.throws(
      () => parseBnbQuantizationConfig(cfg),
      (e: unknown) => e instanceof ConfigError && e.message.includes(`quantization_config.${field}`),
      field,
    );
  }
  assert.throws(() => parseBnbQuantizationConfig([]), ConfigError);
});
