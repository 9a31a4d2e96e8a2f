// Activation kernels: SwiGLU (silu(gate) * up, the Llama MLP), GELU (exact erf form and tanh approximation),
// and softmax / log-softmax over the last axis. Elementwise kernels take their length from out.size; row
// kernels view their tensors as [rows, cols].

import type { Tensor } from '../../core/tensor.ts';

/** 'none': 0.5 x (1 + erf(x / sqrt 2)) (HF 'gelu'); 'tanh': the tanh approximation (HF 'gelu_pytorch_tanh'). */
export type GeluApproximate = 'none' | 'tanh';

export interface ActivationKernels {
  /** out[i] = silu(gate[i]) * up[i] = gate[i] * sigmoid(gate[i]) * up[i]. All contiguous f32, same size. */
  swigluForward(gate: Tensor, up: Tensor, out: Tensor): void;
  /**
   * dGate[i] = g[i] * up[i] * sigmoid(gate[i]) * (1 + gate[i] * (1 - sigmoid(gate[i])))
   * dUp[i]   = g[i] * silu(gate[i])
   * All contiguous f32, same size; dGate or dUp null = not computed.
   */
  swigluBackward(g: Tensor, gate: Tensor, up: Tensor, dGate: Tensor | null, dUp: Tensor | null): void;
  /** out[i] = gelu(x[i]). Contiguous f32, same size. */
  geluForward(x: Tensor, out: Tensor, approximate: GeluApproximate): void;
  /** dx[i] = g[i] * gelu'(x[i]). Contiguous f32, same size. */
  geluBackward(g: Tensor, x: Tensor, dx: Tensor, approximate: GeluApproximate): void;
  /**
   * out[r, :] = softmax(x[r, :]) over cols, with the row maximum subtracted first (numerically stable).
   * A row that is entirely -inf (fully masked) gives zeros. x, out: contiguous f32 [rows, cols].
   */
  softmaxForward(x: Tensor, out: Tensor, rows: number, cols: number): void;
  /** dx[r, j] = y[r, j] * (g[r, j] - sum_k g[r, k] * y[r, k]), y the softmax output. Contiguous f32. */
  softmaxBackward(g: Tensor, y: Tensor, dx: Tensor, rows: number, cols: number): void;
  /** out[r, :] = x[r, :] - max - log(sum(exp(x[r, :] - max))). Contiguous f32 [rows, cols]. */
  logSoftmaxForward(x: Tensor, out: Tensor, rows: number, cols: number): void;
  /** dx[r, j] = g[r, j] - exp(y[r, j]) * sum_k g[r, k], y the log-softmax output. Contiguous f32. */
  logSoftmaxBackward(g: Tensor, y: Tensor, dx: Tensor, rows: number, cols: number): void;
}
