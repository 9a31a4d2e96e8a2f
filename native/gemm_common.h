// Shared, ISA-neutral definitions for the CPU GEMM.
//
// Every ISA translation unit (gemm_avx512.cc, gemm_avx2.cc, gemm_generic.cc) is compiled with its own
// -m flags. Anything defined in a header they share must therefore have internal linkage (static or an
// unnamed namespace): an inline function with external linkage compiled with -mavx512f in one TU could be
// the copy the linker keeps for all of them, and crash a machine without AVX-512.
#pragma once

#include <stdint.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif
#include <string.h>

#include <type_traits>

namespace lowrank {

enum DTypeCode : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

// The kernels' threads (pool.cc): runs fn(ctx, t) once for every t in [0, tasks), task 0 on the calling thread
// and the others on the process's worker threads, and returns when all are done. Which thread runs a task
// never changes a result (when the workers are busy, the caller runs every task itself). Wrap it with a
// lambda through par_tasks_n (ops_simd.h, gemm_driver.h) rather than calling it directly.
using PoolFn = void (*)(void* ctx, int task);
void pool_run(int tasks, PoolFn fn, void* ctx);

// Streamed memory (pool.cc): regions registered as weights read whole, in order, once per step (the decoding
// layout's). After a decode product reads one, the idle workers read ahead the bytes that follow it, so the
// next products find them in the cache while the caller runs everything between products (attention, norms,
// the JavaScript around them). stream_alloc gives zeroed memory in huge pages where the system allows,
// registered until stream_free, which returns only once no worker reads it.
void* stream_alloc(size_t bytes);
void stream_free(void* p, size_t bytes);
// After a product read [p, p + n) of a registered region: the workers read ahead from p + n.
void stream_read_ahead(const void* p, size_t n);
// Bytes read ahead (LOWRANK_READ_AHEAD_MB, default 8 MiB; 0 = off); bytes >= 0 sets it. Returns the value.
int64_t stream_read_ahead_bytes(int64_t bytes);

// A matrix operand: element (r, c) lives at p[r * rs + c * cs] (in elements of its dtype).
// One of rs / cs is 1 for every operand the N-API layer builds (row-major with a leading dimension,
// possibly transposed).
struct Operand {
  const void* p;
  int dtype;
  int64_t rs, cs;
};

// C[M,N] (row-major, leading dimension ldc) = alpha * A(i,k) B(k,j) + beta * C.
// beta == 0 means C is not read (NaN in C does not propagate), as in BLAS.
struct GemmCall {
  int64_t M, N, K;
  float alpha, beta;
  Operand A;  // (i, k)
  Operand B;  // (k, j)
  float* C;
  int64_t ldc;
};

struct BatchedCall {
  GemmCall g;  // matrix 0
  int64_t batch;
  int64_t sa, sb, sc;  // batch strides in elements
};

struct MemBandwidth {
  double read_gbs;
  double copy_gbs;
};

// The functions one ISA provides. threads >= 1.
struct IsaImpl {
  const char* name;
  void (*gemm)(const GemmCall& g, int threads);
  void (*gemm_batched)(const BatchedCall& b, int threads);
  double (*fma_peak)(int threads, double ms);  // GFLOP/s
  MemBandwidth (*mem_bandwidth)(int64_t bytes, int threads);
  void (*blocking)(int64_t kc, int64_t mb, int64_t nb, int64_t out[3]);
};

const IsaImpl* isa_generic();
#if defined(__x86_64__) || defined(_M_X64)
const IsaImpl* isa_avx2();
const IsaImpl* isa_avx512();
#endif

// IEEE half -> float in software (exact; subnormals, inf and NaN kept).
static inline float f16_to_f32_soft(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t e = (h >> 10) & 0x1fu;
  uint32_t m = h & 0x3ffu;
  uint32_t bits;
  if (e == 0) {
    if (m == 0) {
      bits = sign;
    } else {
      int sh = 0;
      while (!(m & 0x400u)) {
        m <<= 1;
        ++sh;
      }
      m &= 0x3ffu;
      bits = sign | ((uint32_t)(113 - sh) << 23) | (m << 13);
    }
  } else if (e == 31) {
    bits = sign | 0x7f800000u | (m << 13);
  } else {
    bits = sign | ((e + 112u) << 23) | (m << 13);
  }
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

static inline float bf16_to_f32(uint16_t h) {
  uint32_t bits = (uint32_t)h << 16;
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
static inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
static inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

}  // namespace lowrank
