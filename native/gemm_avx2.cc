// AVX2 + FMA GEMM kernels (compiled with -mavx2 -mfma -mf16c): for x86-64 CPUs without AVX-512, and for
// tests that simulate one (setIsa('avx2')).
//
// Micro-kernel MR x NR = 6 x 16: 12 ymm accumulators, 2 ymm of B, one broadcast register (15 of 16).
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
namespace avx2 {

#include "gemm_scalar.h"

namespace {

constexpr int MR = 6;
constexpr int NV = 2;
constexpr int NR = 8 * NV;
// As for AVX-512: an A sliver in L1, a B block in L2, the A block in L3 (B packed once per K block).
// KC is also where every product's chains restart (decoding's few-row products must match), so it is chosen
// for them too: 144 splits a hidden size of 576 (the 135m preset) into four whole blocks, two per thread on two
// cores, which decoding reads side by side (ops_gemm.h gv_strip). Decoding the 135m preset in bf16 ran 5-7%
// faster than with 256; GEMMs from 256 to 1536 deep and training steps were unchanged within noise.
int64_t g_kc = 144, g_mb = 6 * 342, g_nb = 768;

template <int DT>
inline __m256 load8(const void* p, int64_t i) {
  if (DT == kF32) return _mm256_loadu_ps((const float*)p + i);
  const __m128i h = _mm_loadu_si128((const __m128i*)((const uint16_t*)p + i));
  if (DT == kBF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  return _mm256_cvtph_ps(h);
}

// First n (< 8) elements, the rest zero; reads nothing past element n - 1.
template <int DT>
inline __m256 load8n(const void* p, int64_t i, int64_t n) {
  alignas(32) float t[8];
  for (int64_t j = 0; j < 8; ++j) t[j] = j < n ? load1<DT>(p, i + j) : 0.0f;
  return _mm256_load_ps(t);
}

inline void transpose8(__m256 r[8]) {
  __m256 t[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  __m256 s[8];
  for (int i = 0; i < 8; i += 4) {
    s[i + 0] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    s[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    s[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    s[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  // s[4q + c] holds, in 128-bit lane L, rows 4q..4q+3 of column 4L + c.
  for (int c = 0; c < 4; ++c) {
    r[c] = _mm256_permute2f128_ps(s[c], s[4 + c], 0x20);
    r[4 + c] = _mm256_permute2f128_ps(s[c], s[4 + c], 0x31);
  }
}

// r[t] lane ii = M(row0 + ii, k + t) for a matrix contiguous along k; rows >= rows and k >= kn are zero.
template <int DT>
inline void load_transposed8(const void* p, int64_t base, int64_t rstride, int64_t rows, int64_t kn, __m256 r[8]) {
  for (int ii = 0; ii < 8; ++ii) {
    if (ii < rows) {
      r[ii] = kn >= 8 ? load8<DT>(p, base + ii * rstride) : load8n<DT>(p, base + ii * rstride, kn);
    } else {
      r[ii] = _mm256_setzero_ps();
    }
  }
  transpose8(r);
}

template <int DT>
void pack_a_t(const Operand& A, int64_t i0, int64_t mb, int64_t k0, int64_t kc, float* Ap) {
  for (int64_t is = 0; is < mb; is += MR) {
    const int64_t rows = min64(MR, mb - is);
    float* dst = Ap + is * kc;
    if (A.cs == 1) {
      const int64_t base = (i0 + is) * A.rs + k0;
      for (int64_t k = 0; k < kc; k += 8) {
        const int64_t kn = min64(8, kc - k);
        __m256 r[8];
        load_transposed8<DT>(A.p, base + k, A.rs, rows, kn, r);
        for (int64_t t = 0; t < kn; ++t) {
          alignas(32) float tmp[8];
          _mm256_store_ps(tmp, r[t]);
          memcpy(dst + (k + t) * MR, tmp, MR * sizeof(float));
        }
      }
    } else if (A.rs == 1) {
      // A stored along its rows (the transposed operand of a weight gradient): each k's MR values are adjacent
      const int64_t base = k0 * A.cs + i0 + is;
      const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
      const __m256i in = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)rows), lanes);  // lanes < rows (then zero)
      static_assert(MR == 6, "a sliver row is stored as 4 + 2 lanes");
      for (int64_t k = 0; k < kc; ++k) {
        const int64_t at = base + k * A.cs;
        const __m256 v = DT == kF32 ? _mm256_maskload_ps((const float*)A.p + at, in) : load8n<DT>(A.p, at, rows);
        // two plain stores: a masked store is microcoded on AMD (tens of cycles)
        _mm_storeu_ps(dst + k * MR, _mm256_castps256_ps128(v));
        _mm_storel_pi((__m64*)(dst + k * MR + 4), _mm256_extractf128_ps(v, 1));
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
    if (B.cs == 1 && cols == NR) {
      const int64_t base = k0 * B.rs + j0 + js;
      for (int64_t k = 0; k < kc; ++k)
        for (int v = 0; v < NV; ++v) _mm256_store_ps(dst + k * NR + 8 * v, load8<DT>(B.p, base + k * B.rs + 8 * v));
    } else if (B.rs == 1) {
      for (int v = 0; v < NV; ++v) {
        const int64_t vcols = min64(8, cols - 8 * v);
        const int64_t base = (j0 + js + 8 * v) * B.cs + k0;
        for (int64_t k = 0; k < kc; k += 8) {
          const int64_t kn = min64(8, kc - k);
          __m256 r[8];
          if (vcols > 0) {
            load_transposed8<DT>(B.p, base + k, B.cs, vcols, kn, r);
          } else {
            for (int t = 0; t < 8; ++t) r[t] = _mm256_setzero_ps();
          }
          for (int64_t t = 0; t < kn; ++t) _mm256_store_ps(dst + (k + t) * NR + 8 * v, r[t]);
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

// Always inlined into gemm_rect: called out of line (as GCC chose once pack_a grew) it ran at half speed.
__attribute__((always_inline)) inline void ukr(int64_t kc, const float* __restrict a, const float* __restrict b,
                                               float* __restrict c, int64_t ldc, int mr, int nr, float alpha,
                                               float beta) {
  __m256 acc[MR][NV];
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm256_setzero_ps();
  }
#pragma GCC unroll 2
  for (int64_t k = 0; k < kc; ++k) {
    __m256 bv[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) bv[v] = _mm256_load_ps(b + 8 * v);
#pragma GCC unroll 6
    for (int i = 0; i < MR; ++i) {
      const __m256 av = _mm256_broadcast_ss(a + i);
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm256_fmadd_ps(av, bv[v], acc[i][v]);
    }
    a += MR;
    b += NR;
  }
  if (mr == MR && nr == NR) {
    const __m256 va = _mm256_set1_ps(alpha), vb = _mm256_set1_ps(beta);
#pragma GCC unroll 6
    for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) {
        float* p = c + i * ldc + 8 * v;
        __m256 r = _mm256_mul_ps(acc[i][v], va);
        if (beta != 0.0f) r = _mm256_fmadd_ps(vb, _mm256_loadu_ps(p), r);
        _mm256_storeu_ps(p, r);
      }
    }
    return;
  }
  alignas(32) float t[MR * NR];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) _mm256_store_ps(t + i * NR + 8 * v, acc[i][v]);
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

// C (M <= 16 rows) = alpha A B + beta C with A(i, k) at A.p[i + k * A.cs] (A^T stored row-major) and B row-major,
// both f32: LoRA's weight gradients du^T x and (s u^T g), K = the batch's tokens. A and B are read in place
// (the blocked path packed all of B for these few rows of C): per block of 128 rows of B, each thread reads its
// columns of them once from memory, in order, and its 6 x 16 tiles of C take them from L2, the partial sums
// kept in a scratch. Inside LoRA training steps (alternating builds): 16 x 256 x 2048 27-33 -> 22 ms a step,
// 16 x 688 x 2048 21-24 -> 16-17, 16 x 576 x 1024 104-134 -> 79-80, 16 x 1536 x 1024 85-117 -> 58-70.
template <int R, bool FULL>
void tn_tile(const float* A, int64_t lda, const float* B, int64_t ldb, int64_t K, float* C, int64_t ldc, int64_t nc,
             float alpha, float beta) {
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i m0 = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)nc), lane);
  const __m256i m1 = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)nc - 8), lane);
  for (int64_t k = 0; k < K; ++k) {
    const float* b = B + k * ldb;
    const __m256 b0 = FULL ? _mm256_loadu_ps(b) : _mm256_maskload_ps(b, m0);
    const __m256 b1 = FULL ? _mm256_loadu_ps(b + 8) : _mm256_maskload_ps(b + 8, m1);
    const float* a = A + k * lda;
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const __m256 av = _mm256_broadcast_ss(a + r);
      acc[r][0] = _mm256_fmadd_ps(av, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(av, b1, acc[r][1]);
    }
  }
  const __m256 va = _mm256_set1_ps(alpha), vb = _mm256_set1_ps(beta);
  for (int r = 0; r < R; ++r) {
    float* c = C + r * ldc;
    __m256 v0 = _mm256_mul_ps(acc[r][0], va), v1 = _mm256_mul_ps(acc[r][1], va);
    if (FULL) {
      if (beta != 0.0f) {
        v0 = _mm256_fmadd_ps(vb, _mm256_loadu_ps(c), v0);
        v1 = _mm256_fmadd_ps(vb, _mm256_loadu_ps(c + 8), v1);
      }
      _mm256_storeu_ps(c, v0);
      _mm256_storeu_ps(c + 8, v1);
    } else {
      if (beta != 0.0f) {
        v0 = _mm256_fmadd_ps(vb, _mm256_maskload_ps(c, m0), v0);
        v1 = _mm256_fmadd_ps(vb, _mm256_maskload_ps(c + 8, m1), v1);
      }
      _mm256_maskstore_ps(c, m0, v0);
      _mm256_maskstore_ps(c + 8, m1, v1);
    }
  }
}

template <bool FULL>
void tn_rows(const float* A, int64_t lda, const float* B, int64_t ldb, int64_t K, float* C, int64_t ldc, int64_t M,
             int64_t nc, float alpha, float beta) {
  int64_t i = 0;
  for (; i + 6 <= M; i += 6) tn_tile<6, FULL>(A + i, lda, B, ldb, K, C + i * ldc, ldc, nc, alpha, beta);
  switch (M - i) {
    case 5: tn_tile<5, FULL>(A + i, lda, B, ldb, K, C + i * ldc, ldc, nc, alpha, beta); break;
    case 4: tn_tile<4, FULL>(A + i, lda, B, ldb, K, C + i * ldc, ldc, nc, alpha, beta); break;
    case 3: tn_tile<3, FULL>(A + i, lda, B, ldb, K, C + i * ldc, ldc, nc, alpha, beta); break;
    case 2: tn_tile<2, FULL>(A + i, lda, B, ldb, K, C + i * ldc, ldc, nc, alpha, beta); break;
    case 1: tn_tile<1, FULL>(A + i, lda, B, ldb, K, C + i * ldc, ldc, nc, alpha, beta); break;
    default: break;
  }
}

bool skinny_tn(const GemmCall& g, int threads) {
  if (g.M > 16 || g.A.dtype != kF32 || g.B.dtype != kF32 || g.A.rs != 1 || g.B.cs != 1) return false;
  const float* A = (const float*)g.A.p;
  const float* B = (const float*)g.B.p;
  const int64_t tiles = ceil_div(g.N, 16);
  const int T = (int)min64(threads, tiles);
  // k blocks of KB rows: each thread's column range of a block of B is read once from memory (whole rows of
  // it, in order) and then from L2 by the row groups; partial sums go to a scratch S [M, N], C at the end
  constexpr int64_t KB = 128;
  float* S = grow(tls_ws.b, tls_ws.b_cap, g.M * g.N + 64);
  if (!S) abort();
  par_tasks_n(T, [&](int t) {
    const int64_t j_lo = split_at(tiles, T, t), j_hi = split_at(tiles, T, t + 1);
    for (int64_t k0 = 0; k0 < g.K; k0 += KB) {
      const int64_t kb = min64(KB, g.K - k0);
      const float* Ak = A + k0 * g.A.cs;
      const float* Bk = B + k0 * g.B.rs;
      const float beta = k0 == 0 ? 0.0f : 1.0f;
      for (int64_t j = j_lo; j < j_hi; ++j) {
        const int64_t j0 = j * 16, nc = min64(16, g.N - j0);
        if (nc == 16) tn_rows<true>(Ak, g.A.cs, Bk + j0, g.B.rs, kb, S + j0, g.N, g.M, 16, 1.0f, beta);
        else tn_rows<false>(Ak, g.A.cs, Bk + j0, g.B.rs, kb, S + j0, g.N, g.M, nc, 1.0f, beta);
      }
    }
    for (int64_t i = 0; i < g.M; ++i)
      for (int64_t j = j_lo * 16; j < min64(j_hi * 16, g.N); ++j) {
        float* c = g.C + i * g.ldc + j;
        const float v = g.alpha * S[i * g.N + j];
        *c = g.beta == 0.0f ? v : v + g.beta * *c;
      }
  });
  return true;
}

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int DT, int SX, int LW>
inline void dot_tile(const Skinny& sk, int64_t s, int64_t l) {
  __m256 acc[SX][LW];
  for (int i = 0; i < SX; ++i)
    for (int u = 0; u < LW; ++u) acc[i][u] = _mm256_setzero_ps();
  const float* X = sk.X + s * sk.ldx;
  const int64_t K = sk.K, wrs = sk.W.rs;
  const void* W = sk.W.p;
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 w[LW];
    for (int u = 0; u < LW; ++u) w[u] = load8<DT>(W, (l + u) * wrs + k);
    for (int i = 0; i < SX; ++i) {
      const __m256 x = _mm256_load_ps(X + i * sk.ldx + k);
      for (int u = 0; u < LW; ++u) acc[i][u] = _mm256_fmadd_ps(x, w[u], acc[i][u]);
    }
  }
  if (k < K) {
    __m256 w[LW];
    for (int u = 0; u < LW; ++u) w[u] = load8n<DT>(W, (l + u) * wrs + k, K - k);
    for (int i = 0; i < SX; ++i) {
      const __m256 x = _mm256_load_ps(X + i * sk.ldx + k);
      for (int u = 0; u < LW; ++u) acc[i][u] = _mm256_fmadd_ps(x, w[u], acc[i][u]);
    }
  }
  for (int i = 0; i < SX; ++i) {
    for (int u = 0; u < LW; ++u) {
      float* o = sk.O + (s + i) * sk.ors + (l + u) * sk.ocs;
      const float d = sk.alpha * hsum8(acc[i][u]);
      *o = sk.beta == 0.0f ? d : d + sk.beta * *o;
    }
  }
}

template <int DT, int LW>
void dot_rows(const Skinny& sk, int64_t l) {
  int64_t s = 0;
  for (; s + 2 <= sk.S; s += 2) dot_tile<DT, 2, LW>(sk, s, l);  // 8 accumulators + 4 W + 1 X of 16 ymm
  if (s < sk.S) dot_tile<DT, 1, LW>(sk, s, l);
}

// One W row against SX rows of X, 4 vectors per step: W read as one sequential stream (see the AVX-512
// version for why this is the decoding path).
template <int DT, int SX>
inline void dot_stream(const Skinny& sk, int64_t l) {
  __m256 acc[SX][4];
  for (int i = 0; i < SX; ++i)
    for (int u = 0; u < 4; ++u) acc[i][u] = _mm256_setzero_ps();
  const int64_t K = sk.K, base = l * sk.W.rs;
  const void* W = sk.W.p;
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m256 w[4];
    for (int u = 0; u < 4; ++u) w[u] = load8<DT>(W, base + k + 8 * u);
    for (int i = 0; i < SX; ++i)
      for (int u = 0; u < 4; ++u)
        acc[i][u] = _mm256_fmadd_ps(_mm256_load_ps(sk.X + i * sk.ldx + k + 8 * u), w[u], acc[i][u]);
  }
  for (; k < K; k += 8) {
    const __m256 w = K - k >= 8 ? load8<DT>(W, base + k) : load8n<DT>(W, base + k, K - k);
    for (int i = 0; i < SX; ++i) acc[i][0] = _mm256_fmadd_ps(_mm256_load_ps(sk.X + i * sk.ldx + k), w, acc[i][0]);
  }
  for (int i = 0; i < SX; ++i) {
    float* o = sk.O + i * sk.ors + l * sk.ocs;
    const __m256 t = _mm256_add_ps(_mm256_add_ps(acc[i][0], acc[i][1]), _mm256_add_ps(acc[i][2], acc[i][3]));
    const float d = sk.alpha * hsum8(t);
    *o = sk.beta == 0.0f ? d : d + sk.beta * *o;
  }
}

template <int DT>
void skinny_dot_t(const Skinny& sk, int64_t l0, int64_t l1) {
  int64_t l = l0;
  if (sk.S <= 2) {
    for (; l < l1; ++l) {
      if (sk.S == 2) dot_stream<DT, 2>(sk, l);
      else dot_stream<DT, 1>(sk, l);
    }
    return;
  }
  for (; l + 4 <= l1; l += 4) dot_rows<DT, 4>(sk, l);
  for (; l < l1; ++l) dot_rows<DT, 1>(sk, l);
}

void skinny_dot(const Skinny& sk, int64_t l0, int64_t l1) {
  if (sk.W.dtype == kF32) skinny_dot_t<kF32>(sk, l0, l1);
  else if (sk.W.dtype == kBF16) skinny_dot_t<kBF16>(sk, l0, l1);
  else skinny_dot_t<kF16>(sk, l0, l1);
}

template <int DT, int SX>
inline void axpy_tile(const Skinny& sk, int64_t s, int64_t l, int64_t nl, int64_t k0, int64_t k1, float* t,
                      bool first) {
  __m256 acc[SX][4];
  for (int i = 0; i < SX; ++i)
    for (int v = 0; v < 4; ++v) acc[i][v] = first ? _mm256_setzero_ps() : _mm256_load_ps(t + (s + i) * 32 + 8 * v);
  const int64_t wcs = sk.W.cs;
  const void* W = sk.W.p;
  const float* X = sk.X + s * sk.ldx;
  for (int64_t k = k0; k < k1; ++k) {
    const int64_t base = l + k * wcs;
    __m256 w[4];
    if (nl == 32) {
      for (int v = 0; v < 4; ++v) w[v] = load8<DT>(W, base + 8 * v);
    } else {
      for (int v = 0; v < 4; ++v) {
        const int64_t n = nl - 8 * v;
        w[v] = n >= 8 ? load8<DT>(W, base + 8 * v) : n > 0 ? load8n<DT>(W, base + 8 * v, n) : _mm256_setzero_ps();
      }
    }
    for (int i = 0; i < SX; ++i) {
      const __m256 x = _mm256_broadcast_ss(X + i * sk.ldx + k);
      for (int v = 0; v < 4; ++v) acc[i][v] = _mm256_fmadd_ps(x, w[v], acc[i][v]);
    }
  }
  for (int i = 0; i < SX; ++i)
    for (int v = 0; v < 4; ++v) _mm256_store_ps(t + (s + i) * 32 + 8 * v, acc[i][v]);
}

template <int DT>
void skinny_axpy_t(const Skinny& sk, int64_t l0, int64_t l1) {
  alignas(32) float t[16 * 32];
  constexpr int64_t KB = 256;
  for (int64_t l = l0; l < l1; l += 32) {
    const int64_t nl = min64(32, l1 - l);
    for (int64_t k0 = 0; k0 < sk.K; k0 += KB) {
      const int64_t k1 = min64(sk.K, k0 + KB);
      const bool first = k0 == 0;
      int64_t s = 0;
      for (; s + 3 <= sk.S; s += 3) axpy_tile<DT, 3>(sk, s, l, nl, k0, k1, t, first);
      switch (sk.S - s) {
        case 2: axpy_tile<DT, 2>(sk, s, l, nl, k0, k1, t, first); break;
        case 1: axpy_tile<DT, 1>(sk, s, l, nl, k0, k1, t, first); break;
        default: break;
      }
    }
    for (int64_t s = 0; s < sk.S; ++s) {
      for (int64_t j = 0; j < nl; ++j) {
        float* o = sk.O + s * sk.ors + (l + j) * sk.ocs;
        const float d = sk.alpha * t[s * 32 + j];
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
  __m256 acc[12];
  for (int i = 0; i < 12; ++i) acc[i] = _mm256_set1_ps(1.0f + 0.001f * (float)i);
  const __m256 m = _mm256_set1_ps(0.9999999f), c = _mm256_set1_ps(1e-7f);
  int64_t iters = 0;
  const double t0 = now_seconds();
  do {
    for (int r = 0; r < 1024; ++r) {
#pragma GCC unroll 12
      for (int i = 0; i < 12; ++i) acc[i] = _mm256_fmadd_ps(acc[i], m, c);
    }
    iters += 1024;
  } while ((now_seconds() - t0) * 1e3 < ms);
  __m256 s = acc[0];
  for (int i = 1; i < 12; ++i) s = _mm256_add_ps(s, acc[i]);
  volatile float sink = hsum8(s);
  (void)sink;
  *flops = iters * 12 * 8 * 2;
}

uint64_t read_sum(const uint8_t* p, int64_t bytes) {
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 128 <= bytes; i += 128) {
    a0 = _mm256_add_epi64(a0, _mm256_load_si256((const __m256i*)(p + i)));
    a1 = _mm256_add_epi64(a1, _mm256_load_si256((const __m256i*)(p + i + 32)));
    a2 = _mm256_add_epi64(a2, _mm256_load_si256((const __m256i*)(p + i + 64)));
    a3 = _mm256_add_epi64(a3, _mm256_load_si256((const __m256i*)(p + i + 96)));
  }
  alignas(32) uint64_t t[4];
  _mm256_store_si256((__m256i*)t, _mm256_add_epi64(_mm256_add_epi64(a0, a1), _mm256_add_epi64(a2, a3)));
  uint64_t s = t[0] + t[1] + t[2] + t[3];
  for (; i < bytes; ++i) s += p[i];
  return s;
}

const IsaImpl kImpl = {"avx2", gemm_entry, gemm_batched_entry, fma_peak_entry, mem_bandwidth_entry, blocking_entry};

}  // namespace
}  // namespace avx2

const IsaImpl* isa_avx2() { return &avx2::kImpl; }

}  // namespace lowrank
