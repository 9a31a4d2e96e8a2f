// QLoRA's frozen 4-bit linear layer (bitsandbytes Linear4bit) and the model quantizer that swaps it in for
// every Linear except the output head, as transformers' bitsandbytes quantizer does for load_in_4bit.
//
// Linear4bit is a drop-in for Linear: same inFeatures / outFeatures / forward(x) contract. Its parameters
// carry the names of bitsandbytes' state dict, so `namedParameters()` lists the tensors a transformers
// bnb-4bit checkpoint holds for the layer (only the quant_state JSON blob is made at save time):
//   weight                    u8 [ceil(out*in/2), 1]  packed codes, element 2i in the high nibble
//   bias                      (optional) f32/bf16/f16 [out]
//   weight.absmax             f32 [nblocks], or u8 [nblocks] with double quantization
//   weight.quant_map          f32 [16]
//   weight.nested_absmax      f32 [ceil(nblocks/256)]   (double quantization)
//   weight.nested_quant_map   f32 [256]                 (double quantization)
// All are frozen. The forward and the input-gradient backward run the backend's 4-bit kernels
// (src/backend/kernels/quant.ts), which unpack a tile of rows at a time: the f32 weight never exists whole.
// On the CPU the product is computed in f32 from the exact f32 dequantized values (bitsandbytes on a GPU
// casts them to the compute dtype, bf16 in the QLoRA recipe, first); computeDtype is recorded for the
// checkpoint's quantization_config and for backends that compute in 16 bits.

import { getBackend } from '../backend/index.ts';
import type { Weight4bit } from '../backend/kernels/quant.ts';
import { ConfigError, fmtShape, ShapeError } from '../core/errors.ts';
import { keep } from '../core/scope.ts';
import { Tensor } from '../core/tensor.ts';
import { Linear } from '../nn/layers.ts';
import { Module } from '../nn/module.ts';
import { empty } from '../ops/create.ts';
import { sum } from '../ops/reduce.ts';
import { f32c } from '../ops/shape.ts';
import { noGrad, record } from '../ops/tape.ts';
import {
  checkBlocksize4bit,
  type DoubleQuantAbsmax,
  isDoubleQuant,
  NESTED_BLOCKSIZE,
  type QuantState4bit,
  quantize4bit,
  type WeightDtypeName,
} from './blockwise4.ts';
import { code4bit, type QuantType4 } from './codebooks.ts';

/** bnb_4bit_compute_dtype values. */
export type ComputeDtype = 'float32' | 'bfloat16' | 'float16';
export const COMPUTE_DTYPES: readonly ComputeDtype[] = ['float32', 'bfloat16', 'float16'];

const codeTensors: Partial<Record<QuantType4, Tensor>> = {};

/**
 * bitsandbytes' built-in 16-value table as a (shared, never freed) tensor: its kernels decode with it and
 * ignore the stored quant_map, and so do ours.
 */
export function codeTensor(quantType: QuantType4): Tensor {
  let t = codeTensors[quantType];
  if (!t || t.disposed) {
    t = keep(Tensor.fromTyped(Float32Array.from(code4bit(quantType)), [16], 'f32'));
    codeTensors[quantType] = t;
  }
  return t;
}

/**
 * y = x W^T (+ bias) for a frozen 4-bit W [rows, cols] and x [..., cols] (any float dtype; computed in f32).
 * One node on the tape: its backward gives dx = g W (unpacked tile by tile, never a weight gradient) and,
 * when the bias requires one, db = sum of g over the rows.
 */
export function linear4bit(x: Tensor, w: Weight4bit, bias?: Tensor | null): Tensor {
  const inF = w.cols;
  const outF = w.rows;
  if (x.ndim < 1 || x.shape[x.ndim - 1] !== inF)
    throw new ShapeError(`linear4bit: input ${fmtShape(x.shape)} does not fit a 4-bit weight [${outF}, ${inF}]`);
  if (bias && (bias.ndim !== 1 || bias.shape[0] !== outF))
    throw new ShapeError(`linear4bit: bias ${fmtShape(bias.shape)} does not fit a 4-bit weight [${outF}, ${inF}]`);
  const rows = inF === 0 ? 0 : x.size / inF;
  const xc = noGrad(() => f32c(x));
  const out = empty([...x.shape.slice(0, -1), outF]);
  getBackend().gemm4bit(xc, w, bias ?? null, out, rows);
  if (xc !== x) xc.dispose();
  const xShape = x.shape;
  const saved = [w.packed, w.absmax, w.code];
  if (w.nestedAbsmax && w.nestedCode) saved.push(w.nestedAbsmax, w.nestedCode);
  return record(
    out,
    'linear4bit',
    [x, bias ?? null],
    (g, needs, held) => {
      let gx: Tensor | null = null;
      if (needs[0]) {
        const hw: Weight4bit = {
          ...w,
          packed: held[0]!,
          absmax: held[1]!,
          code: held[2]!,
          nestedAbsmax: held[3] ?? null,
          nestedCode: held[4] ?? null,
        };
        gx = empty(xShape);
        getBackend().gemm4bitBackwardInput(g, hw, gx, rows);
      }
      let gb: Tensor | null = null;
      if (needs[1]) {
        const g2 = g.view([rows, outF], [outF, 1], g.offset);
        gb = sum(g2, 0);
        g2.dispose();
      }
      return [gx, gb];
    },
    saved,
  );
}

export interface Linear4bitOptions {
  /** bnb_4bit_compute_dtype; default 'bfloat16' (the QLoRA recipe). */
  computeDtype?: ComputeDtype;
}

function numel(shape: readonly number[]): number {
  return shape.reduce((a, b) => a * b, 1);
}

/** A frozen NF4/FP4 linear layer: y = x dequant(W)^T + b. See the file comment for its parameters. */
export class Linear4bit extends Module {
  readonly inFeatures: number;
  readonly outFeatures: number;
  computeDtype: ComputeDtype;
  private meta!: {
    quantType: QuantType4;
    blocksize: number;
    dtype: WeightDtypeName;
    offset: number;
    nestedBlocksize: number;
  };

  /**
   * Wraps a quant state of shape [out, in] (its arrays are taken over, not copied) and an optional bias
   * (owned from now on).
   */
  constructor(state: QuantState4bit, bias: Tensor | null = null, opts: Linear4bitOptions = {}) {
    super();
    if (state.shape.length !== 2)
      throw new ShapeError(`Linear4bit: the quantized weight must be 2-D [out, in], got ${fmtShape(state.shape)}`);
    this.outFeatures = state.shape[0]!;
    this.inFeatures = state.shape[1]!;
    const cd = opts.computeDtype ?? 'bfloat16';
    if (!COMPUTE_DTYPES.includes(cd))
      throw new ConfigError(`Linear4bit: computeDtype must be one of ${COMPUTE_DTYPES.join(', ')}, got ${cd}`);
    this.computeDtype = cd;
    if (bias && (bias.ndim !== 1 || bias.shape[0] !== this.outFeatures))
      throw new ShapeError(`Linear4bit: bias ${fmtShape(bias.shape)} does not fit ${this.outFeatures} outputs`);
    this.setState(state, bias);
  }

  /** Quantizes a Linear's weight (f32, or bf16/f16 read as is: no f32 copy) and takes over its bias. */
  static fromLinear(linear: Linear, opts: QuantizeLinearOptions = {}): Linear4bit {
    const w = linear.weight;
    if (w.ndim !== 2) throw new ShapeError(`Linear4bit.fromLinear: weight ${fmtShape(w.shape)} is not 2-D`);
    const state = quantizeWeight(w, opts);
    const b = linear.bias;
    const bias = b ? b.view(b.shape, b.strides, b.offset) : null;
    return new Linear4bit(state, bias, { computeDtype: opts.computeDtype });
  }

  get quantType(): QuantType4 {
    return this.meta.quantType;
  }
  get blocksize(): number {
    return this.meta.blocksize;
  }
  /** The dtype of the weight before quantization ("dtype" in the quant state). */
  get dtype(): WeightDtypeName {
    return this.meta.dtype;
  }
  get doubleQuant(): boolean {
    return this.getParam('weight.nested_absmax') !== null;
  }
  /** The packed codes, u8 [ceil(out*in/2), 1] (bitsandbytes' layout; not an [out, in] matrix). */
  get weight(): Tensor {
    return this.getParam('weight')!;
  }
  get bias(): Tensor | null {
    return this.getParam('bias');
  }

  /** Replaces the quantized weight (e.g. after a re-quantizing merge); the bias is kept unless given. */
  setState(state: QuantState4bit, bias: Tensor | null | undefined = undefined): void {
    if (state.shape.length !== 2 || state.shape[0] !== this.outFeatures || state.shape[1] !== this.inFeatures)
      throw new ShapeError(
        `Linear4bit: quant state ${fmtShape(state.shape)} does not fit [${this.outFeatures}, ${this.inFeatures}]`,
      );
    checkBlocksize4bit(state.blocksize, 'Linear4bit blocksize');
    const n = numel(state.shape);
    if (state.packed.length !== Math.ceil(n / 2))
      throw new ShapeError(`Linear4bit: ${state.packed.length} packed bytes for ${n} elements`);
    const a = state.absmax;
    const nblocks = Math.ceil(n / state.blocksize);
    const nAbs = isDoubleQuant(a) ? a.quantizedAbsmax.length : a.length;
    if (nAbs !== nblocks) throw new ShapeError(`Linear4bit: ${nAbs} absmax values for ${nblocks} blocks`);
    const oldBias = this.getParam('bias');
    // Registration order follows bitsandbytes' state dict: weight, bias, then the quant state parts.
    this.param('weight', Tensor.fromTyped(state.packed, [state.packed.length, 1], 'u8'));
    if (bias !== undefined) this.param('bias', bias);
    else if (oldBias === undefined || oldBias === null) this.param('bias', null);
    if (isDoubleQuant(a)) {
      this.param('weight.absmax', Tensor.fromTyped(a.quantizedAbsmax, [a.quantizedAbsmax.length], 'u8'));
      this.param('weight.quant_map', Tensor.fromTyped(state.quantMap, [state.quantMap.length], 'f32'));
      this.param('weight.nested_absmax', Tensor.fromTyped(a.nestedAbsmax, [a.nestedAbsmax.length], 'f32'));
      this.param('weight.nested_quant_map', Tensor.fromTyped(a.nestedQuantMap, [a.nestedQuantMap.length], 'f32'));
    } else {
      this.param('weight.absmax', Tensor.fromTyped(a, [a.length], 'f32'));
      this.param('weight.quant_map', Tensor.fromTyped(state.quantMap, [state.quantMap.length], 'f32'));
      this.param('weight.nested_absmax', null);
      this.param('weight.nested_quant_map', null);
    }
    this.meta = {
      quantType: state.quantType,
      blocksize: state.blocksize,
      dtype: state.dtype,
      offset: isDoubleQuant(a) ? a.offset : 0,
      nestedBlocksize: isDoubleQuant(a) ? a.nestedBlocksize : NESTED_BLOCKSIZE,
    };
  }

  /** The kernel view of the weight (tensors shared, nothing copied). */
  weight4bit(): Weight4bit {
    return {
      rows: this.outFeatures,
      cols: this.inFeatures,
      quantType: this.meta.quantType,
      blocksize: this.meta.blocksize,
      code: codeTensor(this.meta.quantType),
      packed: this.weight,
      absmax: this.getParam('weight.absmax')!,
      nestedAbsmax: this.getParam('weight.nested_absmax'),
      nestedCode: this.getParam('weight.nested_quant_map'),
      nestedBlocksize: this.meta.nestedBlocksize,
      offset: this.meta.offset,
    };
  }

  /** The quant state (views of the parameters' host arrays, not copies) for serialization. */
  quantState(): QuantState4bit {
    const host = (name: string) => {
      const t = this.getParam(name)!;
      return t.data.subarray(t.offset, t.offset + t.size);
    };
    let absmax: Float32Array | DoubleQuantAbsmax;
    if (this.doubleQuant) {
      absmax = {
        quantizedAbsmax: host('weight.absmax') as Uint8Array,
        nestedAbsmax: host('weight.nested_absmax') as Float32Array,
        nestedQuantMap: host('weight.nested_quant_map') as Float32Array,
        offset: this.meta.offset,
        nestedBlocksize: this.meta.nestedBlocksize,
        nestedDtype: 'float32',
      };
    } else absmax = host('weight.absmax') as Float32Array;
    return {
      packed: host('weight') as Uint8Array,
      absmax,
      quantMap: host('weight.quant_map') as Float32Array,
      shape: [this.outFeatures, this.inFeatures],
      dtype: this.meta.dtype,
      blocksize: this.meta.blocksize,
      quantType: this.meta.quantType,
    };
  }

  forward(x: Tensor): Tensor {
    return linear4bit(x, this.weight4bit(), this.bias);
  }

  /** Bytes of the quantized weight's tensors (packed codes and scales; no bias). */
  quantizedBytes(): number {
    let b = 0;
    for (const [n, p] of this.namedParameters()) if (n.startsWith('weight')) b += p.storage.bytes;
    return b;
  }
}

export interface QuantizeLinearOptions {
  /** Default 'nf4' (the QLoRA recipe; transformers' own default is 'fp4'). */
  quantType?: QuantType4;
  /** Double quantization of the absmax values; default true (QLoRA). */
  doubleQuant?: boolean;
  /** Default 64 (transformers always uses 64). */
  blocksize?: number;
  /** Default 'bfloat16'. */
  computeDtype?: ComputeDtype;
}

/** Quantizes a 2-D weight tensor in place of its dtype (bf16/f16 bits are read directly). */
export function quantizeWeight(w: Tensor, opts: QuantizeLinearOptions = {}): QuantState4bit {
  const n = w.size;
  const base = {
    quantType: opts.quantType ?? 'nf4',
    blocksize: opts.blocksize ?? 64,
    doubleQuant: opts.doubleQuant ?? true,
    shape: [...w.shape],
  };
  if (!w.isContiguous()) return quantize4bit(w.toF32(), base);
  const d = w.data;
  if (w.dtype === 'f32') return quantize4bit((d as Float32Array).subarray(w.offset, w.offset + n), base);
  if (w.dtype === 'bf16' || w.dtype === 'f16')
    return quantize4bit((d as Uint16Array).subarray(w.offset, w.offset + n), {
      ...base,
      dtype: w.dtype === 'bf16' ? 'bfloat16' : 'float16',
    });
  throw new ConfigError(`quantizeWeight: cannot quantize a ${w.dtype} weight`);
}

export interface QuantizeModelOptions extends QuantizeLinearOptions {
  /**
   * Modules kept in full precision, matched as transformers does: the full name, or a dotted suffix or
   * prefix of it. Default ['lm_head'].
   */
  skipModules?: readonly string[];
}

export const DEFAULT_SKIP_MODULES: readonly string[] = ['lm_head'];

/** Whether module `name` is kept unquantized under `skip` (exact name, or a dotted component path of it). */
export function isSkippedModule(name: string, skip: readonly string[]): boolean {
  return skip.some((k) => name === k || name.endsWith(`.${k}`) || name.startsWith(`${k}.`) || name.includes(`.${k}.`));
}

/**
 * Replaces every frozen Linear of the model (not under skipModules, not a LoRA lora_A / lora_B) by a
 * Linear4bit, freeing each full-precision weight as soon as it is quantized. A Linear wrapped by an adapter
 * layer (e.g. "...q_proj.base_layer") is replaced in place. Returns the names of the quantized modules.
 */
export function quantizeModel(model: Module, opts: QuantizeModelOptions = {}): string[] {
  checkBlocksize4bit(opts.blocksize ?? 64);
  const skip = opts.skipModules ?? DEFAULT_SKIP_MODULES;
  const targets: [string, Linear][] = [];
  for (const [name, m] of model.namedModules()) {
    // Adapter matrices (trainable, or PEFT's lora_A / lora_B) are never quantized.
    if (!name || !(m instanceof Linear) || isSkippedModule(name, skip)) continue;
    if (m.weight.requiresGrad || /(^|\.)lora_[A-Za-z_]+(\.|$)/.test(name)) continue;
    targets.push([name, m]);
  }
  for (const [name, lin] of targets) {
    const q = Linear4bit.fromLinear(lin, opts);
    model.setModule(name, q);
    lin.dispose();
  }
  return targets.map(([n]) => n);
}
