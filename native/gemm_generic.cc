// Portable GEMM kernels in plain C++ (compiled for the baseline of the target: SSE2 on x86-64, NEON on arm64).
// Used on CPUs without AVX2/FMA, on other architectures, and by tests that force setIsa('generic').
// Same blocking and threading as the vector paths; the compiler vectorizes the inner loops.
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "gemm_common.h"

namespace lowrank {
namespace generic {

#include "gemm_scalar.h"

namespace {

constexpr int MR = 4;
constexpr int NR = 8;
int64_t g_kc = 256, g_mb = 4 * 512, g_nb = 512;

template <int DT>
void pack_a_t(const Operand& A, int64_t i0, int64_t mb, int64_t k0, int64_t kc, float* Ap) {
  for (int64_t is = 0; is < mb; is += MR)
    pack_a_sliver_scalar<DT>(A, i0 + is, min64(MR, mb - is), k0, kc, Ap + is * kc, MR);
}

template <int DT>
void pack_b_t(const Operand& B, int64_t k0, int64_t kc, int64_t j0, int64_t nb, float* Bp) {
  for (int64_t js = 0; js < nb; js += NR)
    pack_b_sliver_scalar<DT>(B, k0, kc, j0 + js, min64(NR, nb - js), Bp + js * kc, NR);
}

void pack_a(const Operand& A, int64_t i0, int64_t mb, int64_t k0, int64_t kc, float* Ap) {
  if (A.dtype == kF32) pack_a_t<kF32>(A, i0, mb, k0, kc, Ap);
  else if (A.dtype == kBF16) pack_a_t<kBF16>(A, i0, mb, k0, kc, Ap);
  else pack_a_t<kF16>(A, i0, mb, k0, kc, Ap);
}

void pack_b(const Operand& B, int64_t k0, int64_t kc, int64_t j0, int64_t nb, float* Bp) {
  if (B.dtype == kF32) pack_b_t<kF32>(B, k0, kc, j0, nb, Bp);
  else if (B.dtype == kBF16) pack_b_t<kBF16>(B, k0, kc, j0, nb, Bp);
  else pack_b_t<kF16>(B, k0, kc, j0, nb, Bp);
}

// The accumulators never have their address taken inside the loop, so the compiler keeps them in vector
// registers (4 x 8 floats = 8 SSE or NEON registers).
__attribute__((always_inline)) inline void ukr(int64_t kc, const float* __restrict a, const float* __restrict b,
                                               float* __restrict c, int64_t ldc, int mr, int nr, float alpha,
                                               float beta) {
  float acc[MR][NR] = {};
  for (int64_t k = 0; k < kc; ++k) {
#pragma GCC unroll 4
    for (int i = 0; i < MR; ++i) {
      const float av = a[i];
#pragma GCC unroll 8
      for (int j = 0; j < NR; ++j) acc[i][j] += av * b[j];
    }
    a += MR;
    b += NR;
  }
  float t[MR * NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) t[i * NR + j] = acc[i][j];
  store_tile_scalar(t, NR, c, ldc, mr, nr, alpha, beta);
}

struct Skinny;
void skinny_dot(const Skinny& sk, int64_t l0, int64_t l1);
void skinny_axpy(const Skinny& sk, int64_t l0, int64_t l1);
bool skinny_tn(const GemmCall& g, int threads);
void fma_peak_thread(double ms, int64_t* flops);
uint64_t read_sum(const uint8_t* p, int64_t bytes);

}  // namespace

#include "gemm_driver.h"

namespace {
// No kernel of its own here: few rows over a long K stay on the blocked path (see gemm_one).
bool skinny_tn(const GemmCall&, int) { return false; }
}  // namespace

namespace {

// Dot products of one X row with one W row, 8 partial sums so the loop vectorizes without reassociation flags.
template <int DT>
float dot_row(const float* x, const void* W, int64_t base, int64_t K) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t k = 0;
  for (; k + 8 <= K; k += 8)
    for (int u = 0; u < 8; ++u) acc[u] += x[k + u] * load1<DT>(W, base + k + u);
  for (; k < K; ++k) acc[0] += x[k] * load1<DT>(W, base + k);
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

template <int DT>
void skinny_dot_t(const Skinny& sk, int64_t l0, int64_t l1) {
  for (int64_t l = l0; l < l1; ++l) {
    for (int64_t s = 0; s < sk.S; ++s) {
      float* o = sk.O + s * sk.ors + l * sk.ocs;
      const float d = sk.alpha * dot_row<DT>(sk.X + s * sk.ldx, sk.W.p, l * sk.W.rs, sk.K);
      *o = sk.beta == 0.0f ? d : d + sk.beta * *o;
    }
  }
}

void skinny_dot(const Skinny& sk, int64_t l0, int64_t l1) {
  if (sk.W.dtype == kF32) skinny_dot_t<kF32>(sk, l0, l1);
  else if (sk.W.dtype == kBF16) skinny_dot_t<kBF16>(sk, l0, l1);
  else skinny_dot_t<kF16>(sk, l0, l1);
}

template <int DT>
void skinny_axpy_t(const Skinny& sk, int64_t l0, int64_t l1) {
  constexpr int64_t LB = 64;
  float t[16 * LB];
  for (int64_t l = l0; l < l1; l += LB) {
    const int64_t nl = min64(LB, l1 - l);
    for (int64_t i = 0; i < sk.S * LB; ++i) t[i] = 0.0f;
    for (int64_t k = 0; k < sk.K; ++k) {
      const int64_t base = l + k * sk.W.cs;
      float w[LB];
      for (int64_t j = 0; j < nl; ++j) w[j] = load1<DT>(sk.W.p, base + j);
      for (int64_t s = 0; s < sk.S; ++s) {
        const float x = sk.X[s * sk.ldx + k];
        float* ts = t + s * LB;
        for (int64_t j = 0; j < nl; ++j) ts[j] += x * w[j];
      }
    }
    for (int64_t s = 0; s < sk.S; ++s) {
      for (int64_t j = 0; j < nl; ++j) {
        float* o = sk.O + s * sk.ors + (l + j) * sk.ocs;
        const float d = sk.alpha * t[s * LB + j];
        *o = sk.beta == 0.0f ? d : d + sk.beta * *o;
      }
    }
  }
}

void skinny_axpy(const Skinny& sk, int64_t l0, int64_t l1) {
  if (sk.W.dtype == kF32) skinny_axpy_t<kF32>(sk, l0, l1);
  else if (sk.W.dtype == kBF16) skinny_axpy_t<kBF16>(sk, l0, l1);
  else skinny_axpy_t<kF16>(sk, l0, l1);
}

void fma_peak_thread(double ms, int64_t* flops) {
  // Scalar code has no portable FMA peak to speak of; this measures 16 independent multiply-add chains.
  float acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = 1.0f + 0.001f * (float)i;
  int64_t iters = 0;
  const double t0 = now_seconds();
  do {
    for (int r = 0; r < 1024; ++r)
      for (int i = 0; i < 16; ++i) acc[i] = acc[i] * 0.9999999f + 1e-7f;
    iters += 1024;
  } while ((now_seconds() - t0) * 1e3 < ms);
  float s = 0.0f;
  for (int i = 0; i < 16; ++i) s += acc[i];
  volatile float sink = s;
  (void)sink;
  *flops = iters * 16 * 2;
}

uint64_t read_sum(const uint8_t* p, int64_t bytes) {
  const uint64_t* q = (const uint64_t*)p;
  const int64_t n = bytes / 8;
  uint64_t s = 0;
  for (int64_t i = 0; i < n; ++i) s += q[i];
  for (int64_t i = n * 8; i < bytes; ++i) s += p[i];
  return s;
}

const IsaImpl kImpl = {"generic", gemm_entry, gemm_batched_entry, fma_peak_entry, mem_bandwidth_entry, blocking_entry};

}  // namespace
}  // namespace generic

const IsaImpl* isa_generic() { return &generic::kImpl; }

}  // namespace lowrank
