// The code books of bitsandbytes' 4-bit and 8-bit blockwise quantization, as float32 values.
//
// Sources (facts, re-implemented): bitsandbytes/functional.py get_4bit_type and create_dynamic_map;
// csrc/kernels.cu nf4_dequantization_lut / fp4_dequantization_lut; PyTorch's CPU linspace kernel
// (aten/src/ATen/native/cpu/RangeFactoriesKernel.cpp), whose float32 arithmetic decides the dynamic map's
// last bits. See /work/shared/reference/qlora.md sections 1 and 3.

/**
 * NF4 (QLoRA's NormalFloat4): 16 quantiles of N(0, 1) scaled to [-1, 1]; the index is the 4-bit code.
 * Sorted, with 7 negative values, an exact zero (code 7) and 8 positive values.
 */
export const NF4_CODE: Float32Array = Float32Array.from([
  -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635, -0.18477343022823334,
  -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
  0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]);

/**
 * FP4 (E2M1, bias 2 in bitsandbytes' convention): bit 3 is the sign, bits 0-2 index the magnitudes
 * [0, 0.0625, 8, 12, 4, 6, 2, 3], and get_4bit_type divides them by 12 in float32. Not sorted.
 * Code 8 is -0.0 (its float32 bits are 0x80000000, which matter for byte-exact files).
 */
export const FP4_CODE: Float32Array = (() => {
  const raw = [0, 0.0625, 8, 12, 4, 6, 2, 3, -0, -0.0625, -8, -12, -4, -6, -2, -3];
  return Float32Array.from(raw, (v) => Math.fround(v / 12));
})();

export type QuantType4 = 'nf4' | 'fp4';

export function code4bit(quantType: QuantType4): Float32Array {
  return quantType === 'nf4' ? NF4_CODE : FP4_CODE;
}

/**
 * torch.linspace(start, end, steps, dtype=torch.float32) on the CPU, bit for bit.
 * The kernel computes step = (end - start) / (steps - 1) in float32, then fills the first half as
 * start + step*i and the second half as end - step*(steps-1-i). PyTorch's AVX2 build contracts each of
 * these into one fused multiply-add, so each element is rounded once: in double, step*i is exact
 * (24-bit mantissa times a small integer) and so is the sum, and Math.fround rounds once, as the FMA does.
 */
export function torchLinspaceF32(start: number, end: number, steps: number): Float32Array {
  const f = Math.fround;
  const out = new Float32Array(steps);
  if (steps === 1) {
    out[0] = f(start);
    return out;
  }
  const s = f(start);
  const e = f(end);
  const step = f(f(e - s) / (steps - 1));
  const halfway = Math.floor(steps / 2);
  for (let i = 0; i < steps; i++) out[i] = i < halfway ? f(s + step * i) : f(e - step * (steps - 1 - i));
  return out;
}

export interface DynamicMapOptions {
  signed?: boolean;
  maxExponentBits?: number;
  totalBits?: number;
}

/**
 * bitsandbytes' dynamic tree quantization map (Dettmers 2015, "8-Bit Approximations for Parallelism in
 * Deep Learning"), re-implemented from functional.py create_dynamic_map:
 * for each exponent i in [0, maxExponentBits): 2^(i + nonSignBits - maxExponentBits) (+1 if unsigned) + 1
 * boundaries linspace(0.1, 1) in float32, their midpoints, times 10^(i - maxExponentBits + 1) in float32;
 * mirrored when signed; then 0 and 1.0; zero-padded to 2^totalBits; sorted.
 * The default (signed, 7, 8) is the map that double quantization uses for the absmax values.
 */
export function createDynamicMap(opts: DynamicMapOptions = {}): Float32Array {
  const signed = opts.signed ?? true;
  const maxExponentBits = opts.maxExponentBits ?? 7;
  const totalBits = opts.totalBits ?? 8;
  const f = Math.fround;
  const data: number[] = [];
  const nonSignBits = totalBits - 1;
  const additionalItems = 2 ** (nonSignBits - maxExponentBits) - 1;
  const pushScaled = (exponent: number, items: number) => {
    const b = torchLinspaceF32(0.1, 1, items);
    // Python's 10 ** -k is the double nearest 10^-k; parse it rather than use Math.pow (not exact in V8).
    const scale = f(Number(`1e${exponent}`));
    for (let k = 0; k + 1 < items; k++) {
      const mean = f(f(b[k]! + b[k + 1]!) / 2);
      const v = f(scale * mean);
      data.push(v);
      if (signed) data.push(-v);
    }
  };
  let i = 0;
  for (i = 0; i < maxExponentBits; i++) {
    const items = signed
      ? 2 ** (i + nonSignBits - maxExponentBits) + 1
      : 2 ** (i + nonSignBits - maxExponentBits + 1) + 1;
    pushScaled(-(maxExponentBits - 1) + i, items);
  }
  // As in the Python source, the extra items reuse the loop variable's final value.
  if (additionalItems > 0) pushScaled(-(maxExponentBits - 1) + (i - 1), additionalItems + 1);
  data.push(0, 1.0);
  const size = 2 ** totalBits;
  if (data.length !== size) {
    throw new RangeError(`createDynamicMap: ${data.length} values for ${totalBits} bits (expected ${size})`);
  }
  return Float32Array.from(data.sort((a, b) => a - b));
}

/** The signed 8-bit dynamic map (create_dynamic_map() defaults): nested_quant_map of double quantization. */
export const DYNAMIC_MAP_SIGNED: Float32Array = createDynamicMap();
