import assert from 'node:assert/strict';
import { test } from 'node:test';
import { pyFloatRepr, pyJsonDumps } from '../../src/quant/pyjson.ts';

test("pyFloatRepr matches Python's repr(float)", () => {
  const cases: [number, string][] = [
    [6, '6.0'],
    [0, '0.0'],
    [-0, '-0.0'],
    [0.1, '0.1'],
    [Math.fround(0.1), '0.10000000149011612'],
    [1e-4, '0.0001'],
    [1e-5, '1e-05'],
    [1.5e-7, '1.5e-07'],
    [-2.5e-7, '-2.5e-07'],
    [123.456, '123.456'],
    [1e15, '1000000000000000.0'],
    [1e16, '1e+16'],
    [1.2345678901234568e17, '1.2345678901234568e+17'],
    [1e100, '1e+100'],
    [5e-324, '5e-324'],
    [0.001234, '0.001234'],
    [Number.NaN, 'NaN'],
    [Number.POSITIVE_INFINITY, 'Infinity'],
  ];
  for (const [x, s] of cases) assert.equal(pyFloatRepr(x), s, String(x));
});

test('pyJsonDumps: default separators, indent, sort_keys, ensure_ascii, float keys', () => {
  assert.equal(
    pyJsonDumps({ a: [1, 2], b: 'x', c: null, d: true, e: 0.5 }),
    '{"a": [1, 2], "b": "x", "c": null, "d": true, "e": 0.5}',
  );
  assert.equal(pyJsonDumps({ t: 6 }, { floatKeys: new Set(['t']) }), '{"t": 6.0}');
  assert.equal(pyJsonDumps({ s: 'é"\n\u0001' }), '{"s": "\\u00e9\\"\\n\\u0001"}');
  assert.equal(
    pyJsonDumps({ b: 1, a: { y: [], x: {} } }, { indent: 2, sortKeys: true }),
    '{\n  "a": {\n    "x": {},\n    "y": []\n  },\n  "b": 1\n}',
  );
  assert.equal(pyJsonDumps([1e21, 2 ** 53]), '[1000000000000000000000, 9007199254740992]');
});
