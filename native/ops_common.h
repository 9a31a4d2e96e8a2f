// Shared, ISA-neutral declarations of the fused CPU kernels (everything but the GEMM itself).
//
// ops_kernels.h holds the kernels; each ISA translation unit (ops_avx512.cc, ops_avx2.cc, ops_generic.cc)
// includes it inside its own namespace and is compiled with only that ISA's flags, exactly as the GEMM
// (see gemm_common.h for why everything there has internal linkage). ops_addon.cc checks the N-API arguments
// and calls the table of the ISA in use. Every kernel is deterministic for a given thread count: static
// partitions, and reductions combined in a fixed order (no atomics).
#pragma once

#include <stdint.h>

#include <array>
#include <atomic>
#include <utility>
#include <vector>

#include "gemm_common.h"

namespace lowrank {

// Element codes of the op kernels (f32/bf16/f16 as in the GEMM; raw integer copies for i32 and u8).
enum OpDType : int { kOpF32 = 0, kOpBF16 = 1, kOpF16 = 2, kOpI32 = 3, kOpU8 = 4 };

enum BinaryOpCode : int { kAdd = 0, kSub, kMul, kDiv, kMax, kMin, kEq };
enum UnaryOpCode : int {
  kNeg = 0,
  kExp,
  kLog,
  kSqrt,
  kRsqrt,
  kAbs,
  kSquare,
  kRecip,
  kSigmoid,
  kTanh,
  kRelu,
  kSilu,
  kGeluTanh,
  kPow,
  kScale,
  kAddScalar,
  kSign,
  kSigmoidGrad,
  kTanhGrad,
  kReluGrad,
  kSiluGrad,
  kUnaryCount
};
enum ReduceOpCode : int { kRSum = 0, kRMax, kRMin };

// Up to 4 collapsed dimensions; element (i0, i1, i2, i3) of an operand at off + sum_d i_d * stride[d].
struct Strided4 {
  int ndim;
  int64_t shape[4];
};

// The row-invariant GEMM (see ops_gemm in ops_kernels.h): batch of C = alpha op(A) op(B) + beta C.
struct RowGemm {
  GemmCall g;
  int64_t batch, sa, sb, sc;
};

// Attention (layouts as src/backend/kernels/attention.ts; strides in elements, last dim contiguous).
struct AttnArgs {
  int64_t B, Tq, Tk, Hq, Hkv, D;
  const void* q;
  int qdt;
  int64_t qs[3];  // strides of b, t, h
  const void* k;
  int kdt;
  int64_t ks[3];
  const void* v;
  int vdt;
  int64_t vs[3];
  float scale;
  const void* key_mask;  // u8 or i32 [B, Tk] or null
  int mask_i32;
  const int32_t* seq_ids;  // [B, Tk] or null
  int64_t window;
};

// A 4-bit weight (see src/backend/kernels/quant.ts), all pointers at their tensors' offsets.
struct W4Args {
  int64_t rows, cols, bs;
  const float* code;      // [16]
  const uint8_t* packed;  // ceil(rows*cols/2)
  const float* absmax;    // f32 [nblocks] or null
  const uint8_t* qabs;    // u8 [nblocks] (double quantization) or null
  const float* nested_absmax;
  const float* nested_code;  // [256]
  int64_t nbs;
  double offset;  // added in f64 then rounded, as the reference
};

// One adapter of a mixed-adapter batch (ops_lora.h): lora_A [r, in], lora_B [outF, r], lora_B's bias [outF] or
// null, all f32 and contiguous, and the scale s.
struct LoraRowsGroup {
  const float* a;
  const float* b;
  const float* lb;
  int64_t r;
  double scale;
  // a holds the group's weights already packed by lora_pack (A^T, then B^T unscaled); b is unused
  bool packed = false;
};

struct AdamWScalars {
  double beta1, beta2, one_minus_beta1, one_minus_beta2, bc2, step_size, decay, eps, grad_scale;
};

// The kernels of one ISA. threads >= 1 everywhere.
struct OpsImpl {
  const char* name;
  // core
  void (*binary)(int op, const Strided4& s, const float* a, const int64_t* as, const float* b, const int64_t* bs,
                 float* out, int threads);
  void (*unary)(int op, const float* x, float* out, int64_t n, double scalar, int threads);
  void (*reduce)(int op, const float* x, float* out, int64_t outer, int64_t n, int64_t inner, int threads);
  void (*copy)(const Strided4& s, const void* src, int sdt, const int64_t* ss, void* dst, int ddt, const int64_t* ds,
               int threads);
  void (*fill)(void* dst, int dt, int64_t n, double value, int threads);
  void (*gather_rows)(const void* x, int xdt, const int32_t* idx, int64_t count, int64_t cols, void* out, int odt,
                      int threads);
  void (*scatter_add_rows)(const float* g, const int32_t* idx, int64_t count, int64_t cols, float* out,
                           int32_t skip_id, int threads);
  void (*gemm_rows)(const RowGemm& r, int threads);
  // norm, rope
  void (*rmsnorm_fwd)(const float* x, const void* w, int wdt, float* y, float* rstd, int64_t rows, int64_t dim,
                      double eps, int threads);
  void (*rmsnorm_bwd)(const float* g, const float* x, const void* w, int wdt, const float* rstd, float* dx, float* dw,
                      int64_t rows, int64_t dim, int threads);
  void (*rope)(const float* x, const int32_t* pos, const float* inv_freq, int64_t half, float* out, int64_t bt,
               int64_t H, int64_t D, int sign, int threads);
  // attention
  void (*attn_fwd)(const AttnArgs& a, float* out, float* lse, int threads);
  void (*attn_bwd)(const AttnArgs& a, const float* out, const float* lse, const float* gout, float* dq, float* dk,
                   float* dv, int threads);
  // activations, softmax
  void (*swiglu_fwd)(const float* gate, const float* up, float* out, int64_t n, int threads);
  void (*swiglu_bwd)(const float* g, const float* gate, const float* up, float* dgate, float* dup, int64_t n,
                     int threads);
  void (*softmax_fwd)(const float* x, float* out, int64_t rows, int64_t cols, int log, int threads);
  void (*softmax_bwd)(const float* g, const float* y, float* dx, int64_t rows, int64_t cols, int log, int threads);
  // loss: returns the sum of the row losses (in row order, f64); row_loss may be null
  double (*ce_fwd)(const float* logits, const int32_t* targets, float* lse, float* row_loss, int64_t rows,
                   int64_t vocab, int32_t ignore, int threads);
  void (*ce_bwd)(const float* grad_rows, float shared_scale, const float* logits, const int32_t* targets,
                 const float* lse, float* dlogits, int64_t rows, int64_t vocab, int32_t ignore, int threads);
  // optimizer
  void (*adamw)(float* p, const float* g, float* m, float* v, int64_t n, const AdamWScalars& s, int threads);
  double (*sum_squares)(const float* x, int64_t n, int threads);
  // the first index of the largest of x[0 .. n) (NaN never largest), 0 when none exceeds -inf
  int64_t (*argmax)(const float* x, int64_t n);
  // dropout (counter-based mask, see src/backend/kernels/dropout.ts)
  void (*dropout)(const float* x, float* out, int64_t n, int64_t threshold, double scale, uint32_t key0,
                  uint32_t key1, int threads);
  // lora
  void (*lora_weight_norm)(const void* w, int wdt, const float* a, const float* b, float scale, float* out,
                           int64_t outF, int64_t inF, int64_t r, int transposed, int threads);
  void (*lora_rows)(const float* x, float* out, const int32_t* row_group, int64_t rows, int64_t inF, int64_t outF,
                    const LoraRowsGroup* groups, int64_t ngroups, int threads);
  // lora_rows' packed form of one adapter's weights (LoraRowsGroup::packed): its size in floats, and packing
  int64_t (*lora_packed_floats)(int64_t r, int64_t inF, int64_t outF);
  void (*lora_pack)(const float* a, const float* b, int64_t r, int64_t inF, int64_t outF, float* dst);
  // 4-bit
  void (*gemm4bit)(const float* x, const W4Args& w, const void* bias, int bdt, float* y, int64_t m, int threads);
  void (*gemm4bit_bwd)(const float* g, const W4Args& w, float* dx, int64_t m, int threads);
  void (*dequant4bit)(const W4Args& w, int64_t row0, int64_t count, float* out, int threads);
};

const OpsImpl* ops_generic();
#if defined(__x86_64__) || defined(_M_X64)
const OpsImpl* ops_avx2();
const OpsImpl* ops_avx512();
#endif

}  // namespace lowrank
