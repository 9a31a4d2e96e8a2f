// AVX-512 GEMM kernels (compiled with -mavx512f -mavx512bw -mavx512vl -mfma -mf16c; used only when the CPU
// reports all of them, see addon.cc).
//
// Micro-kernel MR x NR = 14 x 32: 28 zmm accumulators, 2 zmm of B, A broadcast from memory by the FMA itself
// (embedded broadcast). Per k: 2 vector loads + 14 broadcasts for 28 FMAs, so the two FMA ports (or the
// double-pumped 512-bit FMA of AMD Zen 4) stay the bottleneck, not the load ports.
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "gemm_common.h"

namespace lowrank {
namespace avx512 {

#include "gemm_scalar.h"

namespace {

constexpr int MR = 14;
constexpr int NV = 2;
constexpr int NR = 16 * NV;
// Cache blocks for the 32 KB L1d / 1 MB L2 per core of the target CPUs (Cascade Lake, Zen 4):
// KC: an A sliver (14 x 384 f32 = 21 KB) is reused from L1 across all B slivers of a block;
// NB: a packed B block (384 x 512 f32 = 768 KB) stays in L2; MB: rows of A packed per block (up to 2058 x 384
// f32 = 3 MB, L3), large enough that B is packed once per K block for typical M. Measured on Zen 4, one
// thread: KC 256..512 and NB 256..768 are all within 3% of each other (87-92% of the FMA peak).
// KC is also where decoding's few-row products restart their chains (see gemm_avx2.cc): 144, as there, gives the
// 135m preset's 576-deep products four whole blocks, two per thread. On Zen 5 (2 vCPUs) the decode-layout bf16
// products of a 135m step took 7.9 ms against 9.8 with 384 (one whole block: the threads split columns), and
// GEMMs from 256x576x1536 to 2048^3 moved within -7%..+4% (382-412 GFLOP/s either way).
int64_t g_kc = 144, g_mb = 14 * 147, g_nb = 512;

// Prefetches the line at byte offset `bytes` from p. Addresses past the end of an array are fine for the
// instruction (it never faults); the address is formed as an integer so no out-of-bounds pointer exists.
inline void prefetch_at(const void* p, int64_t bytes) {
  _mm_prefetch((const char*)((uintptr_t)p + (uintptr_t)bytes), _MM_HINT_T0);
}

inline __mmask16 lanes(int64_t n) { return n >= 16 ? (__mmask16)0xffff : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1); }

template <int DT>
inline __m512 load16(const void* p, int64_t i) {
  if (DT == kF32) return _mm512_loadu_ps((const float*)p + i);
  const __m256i h = _mm256_loadu_si256((const __m256i*)((const uint16_t*)p + i));
  if (DT == kBF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  return _mm512_cvtph_ps(h);
}

// Masked lanes are not read (no fault past the end of an array) and come back as 0.
template <int DT>
inline __m512 load16m(const void* p, int64_t i, __mmask16 m) {
  if (DT == kF32) return _mm512_maskz_loadu_ps(m, (const float*)p + i);
  const __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t*)p + i);
  if (DT == kBF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  return _mm512_cvtph_ps(h);
}

#include "transpose16.h"

// Loads a 16-row x 16-k block of a matrix stored contiguously along k (rows >= rows are zero, k >= kn masked)
// and returns it transposed: r[t] lane ii = M(row0 + ii, k + t).
template <int DT>
inline void load_transposed(const void* p, int64_t base, int64_t rstride, int64_t rows, int64_t kn, __m512 r[16]) {
  const __mmask16 km = lanes(kn);
  for (int ii = 0; ii < 16; ++ii) {
    if (ii < rows) {
      r[ii] = kn >= 16 ? load16<DT>(p, base + ii * rstride) : load16m<DT>(p, base + ii * rstride, km);
    } else {
      r[ii] = _mm512_setzero_ps();
    }
  }
  transpose16(r);
}

template <int DT>
void pack_a_t(const Operand& A, int64_t i0, int64_t mb, int64_t k0, int64_t kc, float* Ap) {
  const __mmask16 mrmask = lanes(MR);
  for (int64_t is = 0; is < mb; is += MR) {
    const int64_t rows = min64(MR, mb - is);
    float* dst = Ap + is * kc;
    if (A.cs == 1) {  // row-major A (activations x[M, K]): transpose 16 x 16 blocks
      const int64_t base = (i0 + is) * A.rs + k0;
      for (int64_t k = 0; k < kc; k += 16) {
        const int64_t kn = min64(16, kc - k);
        __m512 r[16];
        load_transposed<DT>(A.p, base + k, A.rs, rows, kn, r);
        for (int64_t t = 0; t < kn; ++t) _mm512_mask_storeu_ps(dst + (k + t) * MR, mrmask, r[t]);
      }
    } else if (A.rs == 1) {  // A stored transposed [K, M]: MR contiguous values per k
      const __mmask16 m = lanes(rows);
      for (int64_t k = 0; k < kc; ++k) {
        const __m512 v = load16m<DT>(A.p, (k0 + k) * A.cs + i0 + is, m);
        _mm512_mask_storeu_ps(dst + k * MR, mrmask, v);
      }
    } else {
      pack_a_sliver_scalar<DT>(A, i0 + is, rows, k0, kc, dst, MR);
    }
  }
}

template <int DT>
void pack_b_t(const Operand& B, int64_t k0, int64_t kc, int64_t j0, int64_t nb, float* Bp) {
  for (int64_t js = 0; js < nb; js += NR) {
    const int64_t cols = min64(NR, nb - js);
    float* dst = Bp + js * kc;
    if (B.cs == 1) {  // row-major B [K, N]
      const int64_t base = k0 * B.rs + j0 + js;
      if (cols == NR) {
        for (int64_t k = 0; k < kc; ++k) {
          for (int v = 0; v < NV; ++v) _mm512_store_ps(dst + k * NR + 16 * v, load16<DT>(B.p, base + k * B.rs + 16 * v));
        }
      } else {
        __mmask16 m[NV];
        for (int v = 0; v < NV; ++v) m[v] = lanes(cols - 16 * v);
        for (int64_t k = 0; k < kc; ++k) {
          for (int v = 0; v < NV; ++v)
            _mm512_store_ps(dst + k * NR + 16 * v, load16m<DT>(B.p, base + k * B.rs + 16 * v, m[v]));
        }
      }
    } else if (B.rs == 1) {  // B = W^T with W [N, K] row-major (the Linear layout): transpose 16 x 16 blocks
      for (int v = 0; v < NV; ++v) {
        const int64_t vcols = min64(16, cols - 16 * v);
        const int64_t base = (j0 + js + 16 * v) * B.cs + k0;
        for (int64_t k = 0; k < kc; k += 16) {
          const int64_t kn = min64(16, kc - k);
          __m512 r[16];
          if (vcols > 0) {
            load_transposed<DT>(B.p, base + k, B.cs, vcols, kn, r);
          } else {
            for (int t = 0; t < 16; ++t) r[t] = _mm512_setzero_ps();
          }
          for (int64_t t = 0; t < kn; ++t) _mm512_store_ps(dst + (k + t) * NR + 16 * v, r[t]);
        }
      }
    } else {
      pack_b_sliver_scalar<DT>(B, k0, kc, j0 + js, cols, dst, NR);
    }
  }
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

// C[0:mr, 0:nr] = alpha * sum_k a[k*MR + i] * b[k*NR + j] + beta * C (C not read when beta == 0).
__attribute__((always_inline)) inline void ukr(int64_t kc, const float* __restrict a, const float* __restrict b,
                                               float* __restrict c, int64_t ldc, int mr, int nr, float alpha,
                                               float beta) {
  __m512 acc[MR][NV];
#pragma GCC unroll 14
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_setzero_ps();
  }
  for (int i = 0; i < mr; ++i) _mm_prefetch((const char*)(c + i * ldc), _MM_HINT_T0);
#pragma GCC unroll 2
  for (int64_t k = 0; k < kc; ++k) {
    __m512 bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = _mm512_load_ps(b + 16 * v);
#pragma GCC unroll 14
    for (int i = 0; i < MR; ++i) {
      const __m512 av = _mm512_set1_ps(a[i]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_fmadd_ps(av, bv[v], acc[i][v]);
    }
    a += MR;
    b += NR;
  }
  const __m512 va = _mm512_set1_ps(alpha);
  if (mr == MR && nr == NR) {
    if (beta == 0.0f) {
#pragma GCC unroll 14
      for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) _mm512_storeu_ps(c + i * ldc + 16 * v, _mm512_mul_ps(acc[i][v], va));
      }
    } else if (beta == 1.0f) {
#pragma GCC unroll 14
      for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) {
          float* p = c + i * ldc + 16 * v;
          _mm512_storeu_ps(p, _mm512_fmadd_ps(acc[i][v], va, _mm512_loadu_ps(p)));
        }
      }
    } else {
      const __m512 vb = _mm512_set1_ps(beta);
#pragma GCC unroll 14
      for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) {
          float* p = c + i * ldc + 16 * v;
          _mm512_storeu_ps(p, _mm512_fmadd_ps(acc[i][v], va, _mm512_mul_ps(vb, _mm512_loadu_ps(p))));
        }
      }
    }
    return;
  }
  __mmask16 m[NV];
  for (int v = 0; v < NV; ++v) m[v] = lanes(nr - 16 * v);
  const __m512 vb = _mm512_set1_ps(beta);
#pragma GCC unroll 14
  for (int i = 0; i < MR; ++i) {
    if (i >= mr) break;
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      float* p = c + i * ldc + 16 * v;
      __m512 r = _mm512_mul_ps(acc[i][v], va);
      if (beta != 0.0f) r = _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(m[v], p), r);
      _mm512_mask_storeu_ps(p, m[v], r);
    }
  }
}

struct Skinny;
void skinny_dot(const Skinny& sk, int64_t l0, int64_t l1);
void skinny_axpy(const Skinny& sk, int64_t l0, int64_t l1);
bool skinny_tn(const GemmCall& g, int threads);

// Throughput of independent FMA chains (16 accumulators cover latency x ports on any AVX-512 core).
void fma_peak_thread(double ms, int64_t* flops);
uint64_t read_sum(const uint8_t* p, int64_t bytes);

}  // namespace

#include "gemm_driver.h"

namespace {
// No kernel of its own here: few rows over a long K stay on the blocked path (see gemm_one).
bool skinny_tn(const GemmCall&, int) { return false; }
}  // namespace

namespace {

// out tile for rows [s, s + SX) of X and rows [l, l + LW) of W (contiguous along k).
// With prefetch, the rows [pf, pf + LW) (the next tile's W) are requested while this tile computes: decoding
// reads each weight once, so the hardware prefetchers alone leave the short rows of small layers waiting.
template <int DT, int SX, int LW>
inline void dot_tile(const Skinny& sk, int64_t s, int64_t l, int64_t pf) {
  __m512 acc[SX][LW];
  for (int i = 0; i < SX; ++i)
    for (int u = 0; u < LW; ++u) acc[i][u] = _mm512_setzero_ps();
  const float* X = sk.X + s * sk.ldx;
  const int64_t K = sk.K, wrs = sk.W.rs;
  const void* W = sk.W.p;
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    if (pf >= 0 && (DT == kF32 || (k & 16) == 0)) {
      for (int u = 0; u < LW; ++u)
        prefetch_at(W, ((pf + u) * wrs + k) * (DT == kF32 ? 4 : 2));
    }
    __m512 w[LW];
    for (int u = 0; u < LW; ++u) w[u] = load16<DT>(W, (l + u) * wrs + k);
    for (int i = 0; i < SX; ++i) {
      const __m512 x = _mm512_load_ps(X + i * sk.ldx + k);
      for (int u = 0; u < LW; ++u) acc[i][u] = _mm512_fmadd_ps(x, w[u], acc[i][u]);
    }
  }
  if (k < K) {
    const __mmask16 m = lanes(K - k);
    __m512 w[LW];
    for (int u = 0; u < LW; ++u) w[u] = load16m<DT>(W, (l + u) * wrs + k, m);
    for (int i = 0; i < SX; ++i) {
      const __m512 x = _mm512_load_ps(X + i * sk.ldx + k);  // zero padded to ldx
      for (int u = 0; u < LW; ++u) acc[i][u] = _mm512_fmadd_ps(x, w[u], acc[i][u]);
    }
  }
  for (int i = 0; i < SX; ++i) {
    for (int u = 0; u < LW; ++u) {
      float* o = sk.O + (s + i) * sk.ors + (l + u) * sk.ocs;
      const float d = sk.alpha * _mm512_reduce_add_ps(acc[i][u]);
      *o = sk.beta == 0.0f ? d : d + sk.beta * *o;
    }
  }
}

// All S rows of X against W rows [l, l + LW); the first X tile prefetches the next W rows (pf, or -1).
template <int DT, int LW>
void dot_rows(const Skinny& sk, int64_t l, int64_t pf) {
  int64_t s = 0;
  constexpr int SXMAX = 4;
  for (; s + SXMAX <= sk.S; s += SXMAX, pf = -1) dot_tile<DT, SXMAX, LW>(sk, s, l, pf);
  switch (sk.S - s) {
    case 3: dot_tile<DT, 3, LW>(sk, s, l, pf); break;
    case 2: dot_tile<DT, 2, LW>(sk, s, l, pf); break;
    case 1: dot_tile<DT, 1, LW>(sk, s, l, pf); break;
    default: break;
  }
}

// One W row against SX rows of X, 4 chunks of 16 per step: W is read as one sequential stream.
template <int DT, int SX>
inline void dot_stream(const Skinny& sk, int64_t s, int64_t l) {
  __m512 acc[SX][4];
  for (int i = 0; i < SX; ++i)
    for (int u = 0; u < 4; ++u) acc[i][u] = _mm512_setzero_ps();
  const float* X = sk.X + s * sk.ldx;
  const int64_t K = sk.K;
  const int64_t base = l * sk.W.rs;
  const void* W = sk.W.p;
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    __m512 w[4];
    for (int u = 0; u < 4; ++u) w[u] = load16<DT>(W, base + k + 16 * u);
    for (int i = 0; i < SX; ++i)
      for (int u = 0; u < 4; ++u) acc[i][u] = _mm512_fmadd_ps(_mm512_load_ps(X + i * sk.ldx + k + 16 * u), w[u], acc[i][u]);
  }
  for (; k < K; k += 16) {
    const __m512 w = load16m<DT>(W, base + k, lanes(K - k));
    for (int i = 0; i < SX; ++i) acc[i][0] = _mm512_fmadd_ps(_mm512_load_ps(X + i * sk.ldx + k), w, acc[i][0]);
  }
  for (int i = 0; i < SX; ++i) {
    float* o = sk.O + (s + i) * sk.ors + l * sk.ocs;
    const __m512 t = _mm512_add_ps(_mm512_add_ps(acc[i][0], acc[i][1]), _mm512_add_ps(acc[i][2], acc[i][3]));
    const float d = sk.alpha * _mm512_reduce_add_ps(t);
    *o = sk.beta == 0.0f ? d : d + sk.beta * *o;
  }
}

// S <= 2 (decoding): one W row at a time, so W is read as a single sequential stream that the hardware
// prefetchers follow. Measured on Zen 4 (2 threads, W streamed from memory): 26-32 GB/s, 90-108% of the
// streaming-read figure; reading 8 rows side by side (8 short streams) reached about half of that, and software
// prefetching ahead of the single stream lowered it by 10-30%.
// S >= 3: 4 W rows x up to 4 X rows per tile, so each loaded vector feeds several FMAs (the product turns
// compute-bound as S grows), prefetching the next 4 rows.
template <int DT>
void skinny_dot_t(const Skinny& sk, int64_t l0, int64_t l1) {
  int64_t l = l0;
  if (sk.S <= 2) {
    for (; l < l1; ++l) {
      if (sk.S == 2) dot_stream<DT, 2>(sk, 0, l);
      else dot_stream<DT, 1>(sk, 0, l);
    }
    return;
  }
  for (; l + 4 <= l1; l += 4) dot_rows<DT, 4>(sk, l, l + 8 <= l1 ? l + 4 : -1);
  for (; l < l1; ++l) dot_rows<DT, 1>(sk, l, -1);
}

void skinny_dot(const Skinny& sk, int64_t l0, int64_t l1) {
  if (sk.W.dtype == kF32) skinny_dot_t<kF32>(sk, l0, l1);
  else if (sk.W.dtype == kBF16) skinny_dot_t<kBF16>(sk, l0, l1);
  else skinny_dot_t<kF16>(sk, l0, l1);
}

// W contiguous along l: for 64 columns of out at a time, accumulate over k in blocks (tile in t[S][64]).
template <int DT, int SX>
inline void axpy_tile(const Skinny& sk, int64_t s, int64_t l, const __mmask16 m[4], int64_t k0, int64_t k1, float* t,
                      bool first) {
  __m512 acc[SX][4];
  for (int i = 0; i < SX; ++i)
    for (int v = 0; v < 4; ++v) acc[i][v] = first ? _mm512_setzero_ps() : _mm512_load_ps(t + (s + i) * 64 + 16 * v);
  const int64_t wcs = sk.W.cs;
  const void* W = sk.W.p;
  const float* X = sk.X + s * sk.ldx;
  for (int64_t k = k0; k < k1; ++k) {
    const int64_t base = l + k * wcs;
    prefetch_at(W, (base + 8 * wcs) * (DT == kF32 ? 4 : 2));
    __m512 w[4];
    for (int v = 0; v < 4; ++v) w[v] = load16m<DT>(W, base + 16 * v, m[v]);
    for (int i = 0; i < SX; ++i) {
      const __m512 x = _mm512_set1_ps(X[i * sk.ldx + k]);
      for (int v = 0; v < 4; ++v) acc[i][v] = _mm512_fmadd_ps(x, w[v], acc[i][v]);
    }
  }
  for (int i = 0; i < SX; ++i)
    for (int v = 0; v < 4; ++v) _mm512_store_ps(t + (s + i) * 64 + 16 * v, acc[i][v]);
}

template <int DT>
void skinny_axpy_t(const Skinny& sk, int64_t l0, int64_t l1) {
  alignas(64) float t[16 * 64];
  constexpr int64_t KB = 256;
  for (int64_t l = l0; l < l1; l += 64) {
    const int64_t nl = min64(64, l1 - l);
    __mmask16 m[4];
    for (int v = 0; v < 4; ++v) m[v] = lanes(nl - 16 * v);
    for (int64_t k0 = 0; k0 < sk.K; k0 += KB) {
      const int64_t k1 = min64(sk.K, k0 + KB);
      const bool first = k0 == 0;
      int64_t s = 0;
      for (; s + 6 <= sk.S; s += 6) axpy_tile<DT, 6>(sk, s, l, m, k0, k1, t, first);
      switch (sk.S - s) {
        case 5: axpy_tile<DT, 5>(sk, s, l, m, k0, k1, t, first); break;
        case 4: axpy_tile<DT, 4>(sk, s, l, m, k0, k1, t, first); break;
        case 3: axpy_tile<DT, 3>(sk, s, l, m, k0, k1, t, first); break;
        case 2: axpy_tile<DT, 2>(sk, s, l, m, k0, k1, t, first); break;
        case 1: axpy_tile<DT, 1>(sk, s, l, m, k0, k1, t, first); break;
        default: break;
      }
    }
    for (int64_t s = 0; s < sk.S; ++s) {
      for (int64_t j = 0; j < nl; ++j) {
        float* o = sk.O + s * sk.ors + (l + j) * sk.ocs;
        const float d = sk.alpha * t[s * 64 + j];
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
  __m512 acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_set1_ps(1.0f + 0.001f * (float)i);
  const __m512 m = _mm512_set1_ps(0.9999999f), c = _mm512_set1_ps(1e-7f);
  int64_t iters = 0;
  const double t0 = now_seconds();
  do {
    for (int r = 0; r < 1024; ++r) {
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) acc[i] = _mm512_fmadd_ps(acc[i], m, c);
    }
    iters += 1024;
  } while ((now_seconds() - t0) * 1e3 < ms);
  __m512 s = acc[0];
  for (int i = 1; i < 16; ++i) s = _mm512_add_ps(s, acc[i]);
  volatile float sink = _mm512_reduce_add_ps(s);
  (void)sink;
  *flops = iters * 16 * 16 * 2;
}

uint64_t read_sum(const uint8_t* p, int64_t bytes) {
  __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 256 <= bytes; i += 256) {
    a0 = _mm512_add_epi64(a0, _mm512_load_si512((const void*)(p + i)));
    a1 = _mm512_add_epi64(a1, _mm512_load_si512((const void*)(p + i + 64)));
    a2 = _mm512_add_epi64(a2, _mm512_load_si512((const void*)(p + i + 128)));
    a3 = _mm512_add_epi64(a3, _mm512_load_si512((const void*)(p + i + 192)));
  }
  uint64_t s = (uint64_t)_mm512_reduce_add_epi64(_mm512_add_epi64(_mm512_add_epi64(a0, a1), _mm512_add_epi64(a2, a3)));
  for (; i < bytes; ++i) s += p[i];
  return s;
}

const IsaImpl kImpl = {"avx512", gemm_entry, gemm_batched_entry, fma_peak_entry, mem_bandwidth_entry, blocking_entry};

}  // namespace
}  // namespace avx512

const IsaImpl* isa_avx512() { return &avx512::kImpl; }

}  // namespace lowrank
