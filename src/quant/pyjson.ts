// Python-compatible JSON text: what `json.dumps` writes. bitsandbytes stores a quantized weight's
// non-tensor fields as the bytes of json.dumps(dict), and transformers writes config.json with
// json.dumps(indent=2, sort_keys=True). To produce those bytes exactly we need Python's float repr
// (`1e-05`, `6.0`), its default separators (", " and ": ") and its ASCII escaping.

/** Python's repr(float): shortest round-trip digits, exponent form when decpt <= -4 or decpt > 16. */
export function pyFloatRepr(x: number): string {
  if (Number.isNaN(x)) return 'NaN';
  if (x === Number.POSITIVE_INFINITY) return 'Infinity';
  if (x === Number.NEGATIVE_INFINITY) return '-Infinity';
  if (x === 0) return Object.is(x, -0) ? '-0.0' : '0.0';
  const sign = x < 0 ? '-' : '';
  // toExponential() with no argument gives the shortest digits that round-trip (as Python's repr does).
  const [mant, expStr] = Math.abs(x).toExponential().split('e') as [string, string];
  const digits = mant.replace('.', '');
  const decpt = Number(expStr) + 1; // value = 0.DIGITS * 10^decpt
  if (decpt <= -4 || decpt > 16) {
    const e = decpt - 1;
    const frac = digits.length > 1 ? `.${digits.slice(1)}` : '';
    const eAbs = Math.abs(e);
    return `${sign}${digits[0]}${frac}e${e < 0 ? '-' : '+'}${eAbs < 10 ? `0${eAbs}` : eAbs}`;
  }
  if (decpt <= 0) return `${sign}0.${'0'.repeat(-decpt)}${digits}`;
  if (decpt >= digits.length) return `${sign}${digits}${'0'.repeat(decpt - digits.length)}.0`;
  return `${sign}${digits.slice(0, decpt)}.${digits.slice(decpt)}`;
}

/** Python json.dumps string escaping with ensure_ascii=True. */
export function pyJsonString(s: string): string {
  let out = '"';
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    if (c === 0x22) out += '\\"';
    else if (c === 0x5c) out += '\\\\';
    else if (c === 0x0a) out += '\\n';
    else if (c === 0x0d) out += '\\r';
    else if (c === 0x09) out += '\\t';
    else if (c === 0x08) out += '\\b';
    else if (c === 0x0c) out += '\\f';
    else if (c < 0x20 || c > 0x7e) out += `\\u${c.toString(16).padStart(4, '0')}`;
    else out += s[i];
  }
  return `${out}"`;
}

export interface PyJsonOptions {
  /** json.dumps(indent=N): newline + N spaces per level, "," item separator. Omitted: one line, ", ". */
  indent?: number;
  /** json.dumps(sort_keys=True). */
  sortKeys?: boolean;
  /**
   * Keys whose numeric values are Python floats. JavaScript has one number type, so an integral value
   * such as 6 would print as `6`; under one of these keys it prints as `6.0`, as Python writes a float.
   * (transformers rejects `"llm_int8_threshold": 6` because it checks isinstance(x, float).)
   */
  floatKeys?: ReadonlySet<string>;
}

/** Serializes plain JSON data (objects, arrays, strings, numbers, booleans, null) as Python's json.dumps does. */
export function pyJsonDumps(value: unknown, opts: PyJsonOptions = {}): string {
  return dump(value, opts, 0, false);
}

function dump(value: unknown, opts: PyJsonOptions, level: number, asFloat: boolean): string {
  if (value === null || value === undefined) return 'null';
  if (typeof value === 'boolean') return value ? 'true' : 'false';
  if (typeof value === 'string') return pyJsonString(value);
  if (typeof value === 'number') {
    if (Number.isInteger(value) && !asFloat && !Object.is(value, -0)) return BigInt(value).toString();
    return pyFloatRepr(value);
  }
  if (typeof value === 'bigint') return value.toString();
  const nl = opts.indent === undefined ? '' : `\n${' '.repeat(opts.indent * (level + 1))}`;
  const nlEnd = opts.indent === undefined ? '' : `\n${' '.repeat(opts.indent * level)}`;
  const itemSep = opts.indent === undefined ? ', ' : ',';
  if (Array.isArray(value) || ArrayBuffer.isView(value)) {
    const items = Array.from(value as ArrayLike<unknown>);
    if (items.length === 0) return '[]';
    return `[${nl}${items.map((v) => dump(v, opts, level + 1, asFloat)).join(itemSep + nl)}${nlEnd}]`;
  }
  if (typeof value === 'object') {
    let keys = Object.keys(value as object).filter((k) => (value as Record<string, unknown>)[k] !== undefined);
    if (opts.sortKeys) keys = keys.sort(comparePyStrings);
    if (keys.length === 0) return '{}';
    const parts = keys.map((k) => {
      const v = (value as Record<string, unknown>)[k];
      return `${pyJsonString(k)}: ${dump(v, opts, level + 1, opts.floatKeys?.has(k) ?? false)}`;
    });
    return `{${nl}${parts.join(itemSep + nl)}${nlEnd}}`;
  }
  throw new TypeError(`pyJsonDumps: cannot serialize a ${typeof value}`);
}

/** Python sorts str keys by code point; JavaScript's default sort compares UTF-16 units (differs only above U+FFFF). */
function comparePyStrings(a: string, b: string): number {
  const ca = Array.from(a, (c) => c.codePointAt(0)!);
  const cb = Array.from(b, (c) => c.codePointAt(0)!);
  const n = Math.min(ca.length, cb.length);
  for (let i = 0; i < n; i++) if (ca[i] !== cb[i]) return ca[i]! - cb[i]!;
  return ca.length - cb.length;
}
