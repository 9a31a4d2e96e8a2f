// Portable SIMD for the op kernels: GCC/Clang vector extensions of LR_VW floats, which each ISA translation
// unit maps to its registers (zmm for AVX-512, ymm for AVX2, xmm for the generic build). Included inside an
// ISA namespace by ops_isa.h; everything here has internal linkage.
//
// FMA: vfma() is a fused multiply-add on AVX2/AVX-512 and a separate multiply and add on the generic build,
// exactly as the GEMM micro-kernels of the same ISA compute, which the row-invariant GEMM relies on.

namespace {

constexpr int VW = LR_VW;
typedef float vf __attribute__((vector_size(VW * 4)));
typedef int32_t vi __attribute__((vector_size(VW * 4)));
typedef uint32_t vu __attribute__((vector_size(VW * 4)));
typedef float vfh __attribute__((vector_size(VW * 2)));   // half a vector of floats
typedef double vdh __attribute__((vector_size(VW * 4)));  // VW / 2 doubles

constexpr int VDW = VW / 2;

inline vf vload(const float* p) {
  vf v;
  memcpy(&v, p, sizeof v);
  return v;
}
inline void vstore(float* p, vf v) { memcpy(p, &v, sizeof v); }
// Broadcasts. x - 0 is x for every x (-0 included), so the compiler drops the subtraction and emits one
// broadcast; vf{} + x, as these were, cannot be dropped (-0 + 0 is +0) and cost an add per broadcast.
inline vf vset(float x) { return x - vf{}; }
inline vdh vdset(double x) { return x - vdh{}; }
inline vdh vdload(const double* p) {
  vdh v;
  memcpy(&v, p, sizeof v);
  return v;
}
inline void vdstore(double* p, vdh v) { memcpy(p, &v, sizeof v); }

// The first n (< VW) lanes; the others are 0 and nothing past p + n is read.
inline vf vload_n(const float* p, int64_t n) {
#if defined(__AVX512F__) && LR_VW == 16
  return (vf)_mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1), p);
#else
  vf v = {};
  for (int64_t i = 0; i < n; ++i) v[i] = p[i];
  return v;
#endif
}
inline void vstore_n(float* p, vf v, int64_t n) {
#if defined(__AVX512F__) && LR_VW == 16
  _mm512_mask_storeu_ps(p, (__mmask16)((1u << n) - 1), (__m512)v);
#else
  for (int64_t i = 0; i < n; ++i) p[i] = v[i];
#endif
}
inline vf vload_part(const float* p, int64_t n) { return n >= VW ? vload(p) : vload_n(p, n); }
inline void vstore_part(float* p, vf v, int64_t n) {
  if (n >= VW) vstore(p, v);
  else vstore_n(p, v, n);
}

inline vf vfma(vf a, vf b, vf c) {
#if defined(__AVX512F__) && LR_VW == 16
  return (vf)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif defined(__FMA__) && LR_VW == 8
  return (vf)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
  return a * b + c;
#endif
}

inline vf vmax(vf a, vf b) { return a > b ? a : b; }
inline vf vmin(vf a, vf b) { return a < b ? a : b; }

// Sum of the lanes in a fixed order (pairwise halves), the same on every call.
inline float hsum(vf v) {
#if defined(__AVX512F__) && LR_VW == 16
  return _mm512_reduce_add_ps((__m512)v);
#else
  float s[VW];
  memcpy(s, &v, sizeof v);
  for (int w = VW / 2; w >= 1; w /= 2)
    for (int i = 0; i < w; ++i) s[i] += s[i + w];
  return s[0];
#endif
}
inline double hsumd(vdh v) {
  double s[VDW];
  memcpy(s, &v, sizeof v);
  for (int w = VDW / 2; w >= 1; w /= 2)
    for (int i = 0; i < w; ++i) s[i] += s[i + w];
  return s[0];
}
// Largest lane (NaN lanes are not looked for: see hmax_nan).
inline float hmax(vf v) {
#if defined(__AVX512F__) && LR_VW == 16
  return _mm512_reduce_max_ps((__m512)v);
#else
  float s[VW];
  memcpy(s, &v, sizeof v);
  float m = s[0];
  for (int i = 1; i < VW; ++i) m = s[i] > m ? s[i] : m;
  return m;
#endif
}
// Largest lane, NaN if any lane is NaN.
inline float hmax_nan(vf v) {
  float s[VW];
  memcpy(s, &v, sizeof v);
  float m = s[0];
  for (int i = 1; i < VW; ++i)
    if (s[i] > m || s[i] != s[i]) m = s[i];
  return m;
}

inline vdh lo_d(vf v) {
  vfh h;
  memcpy(&h, &v, sizeof h);
  return __builtin_convertvector(h, vdh);
}
inline vdh hi_d(vf v) {
  vfh h;
  memcpy(&h, (const char*)&v + sizeof h, sizeof h);
  return __builtin_convertvector(h, vdh);
}
inline vf from_d(vdh lo, vdh hi) {
  vfh a = __builtin_convertvector(lo, vfh), b = __builtin_convertvector(hi, vfh);
  vf v;
  memcpy(&v, &a, sizeof a);
  memcpy((char*)&v + sizeof a, &b, sizeof b);
  return v;
}

// 2^n for integer lanes n in [-126, 127].
inline vf pow2i(vi n) {
  vi b = (n + 127) << 23;
  vf f;
  memcpy(&f, &b, sizeof f);
  return f;
}

// exp(r) for |r| <= ln2 / 2: degree-7 Taylor polynomial (truncation < 2^-27 relative).
inline vf exp_poly(vf r) {
  vf p = vset(1.0f / 5040.0f);
  p = vfma(p, r, vset(1.0f / 720.0f));
  p = vfma(p, r, vset(1.0f / 120.0f));
  p = vfma(p, r, vset(1.0f / 24.0f));
  p = vfma(p, r, vset(1.0f / 6.0f));
  p = vfma(p, r, vset(0.5f));
  p = vfma(p, r, vset(1.0f));
  return vfma(p, r, vset(1.0f));
}

// 2^n * p for n in [-159, 128] (two factors, so that neither over- nor underflows on its own).
inline vf scale2(vf p, vf n) {
  const vi ni = __builtin_convertvector(n, vi);
  const vi h = ni >> 1;
  return p * pow2i(h) * pow2i(ni - h);
}

// exp(x), about 2 ulp; exp(-inf) = 0, exp(+inf) = inf, NaN stays NaN.
inline vf vexp(vf x) {
  x = x > vset(89.0f) ? vset(89.0f) : x;
  x = x < vset(-110.0f) ? vset(-110.0f) : x;
#if defined(__AVX512F__) && LR_VW == 16
  // round and scale in one instruction each (vscalefps handles the subnormal and overflow range exactly)
  const vf n = (vf)_mm512_roundscale_ps((__m512)(x * vset(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
  const vf r = (x - n * vset(0.693359375f)) - n * vset(-2.12194440e-4f);
  return (vf)_mm512_scalef_ps((__m512)exp_poly(r), (__m512)n);
#else
  const vf magic = vset(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const vf n = (x * vset(1.44269504088896341f) + magic) - magic;
  // Cody-Waite: ln2 = C1 + C2 with C1 short, so n * C1 is exact
  const vf r = (x - n * vset(0.693359375f)) - n * vset(-2.12194440e-4f);
  return scale2(exp_poly(r), n);
#endif
}

// 2^x, the same accuracy; 2^-inf = 0.
inline vf vexp2(vf x) {
  x = x > vset(128.0f) ? vset(128.0f) : x;
  x = x < vset(-159.0f) ? vset(-159.0f) : x;
#if defined(__AVX512F__) && LR_VW == 16
  const vf n = (vf)_mm512_roundscale_ps((__m512)x, _MM_FROUND_TO_NEAREST_INT);
  return (vf)_mm512_scalef_ps((__m512)exp_poly((x - n) * vset(0.693147180559945309f)), (__m512)n);
#else
  const vf magic = vset(12582912.0f);
  const vf n = (x + magic) - magic;
  return scale2(exp_poly((x - n) * vset(0.693147180559945309f)), n);
#endif
}

// exp(x) for x <= 0 (x - max, x - logsumexp: softmax and cross-entropy), as vexp with one scaling: 2^n is a
// normal float for n in [-126, 0]; results below 2^-126 (subnormal in vexp) are 0. -inf gives 0.
inline vf vexp_neg(vf x) {
  const vi tiny = x < vset(-87.33654475f);  // ln 2^-126
  const vf xc = tiny ? vset(-87.33654475f) : x;
  const vf magic = vset(12582912.0f);
  const vf n = (xc * vset(1.44269504088896341f) + magic) - magic;
  const vf r = (xc - n * vset(0.693359375f)) - n * vset(-2.12194440e-4f);
  const vf e = exp_poly(r) * pow2i(__builtin_convertvector(n, vi));
  return tiny ? vset(0.0f) : e;
}

// 2^x for x <= 0 (softmax's x - max; -inf gives 0, NaN stays NaN): vexp2's polynomial with one scaling, as 2^n
// is a normal float for n in [-126, 0]; results below 2^-126 (subnormal in vexp2) are 0.
inline vf vexp2_neg(vf x) {
  const vi tiny = x < vset(-126.0f);
  const vf xc = tiny ? vset(-126.0f) : x;
  const vf magic = vset(12582912.0f);
  const vf n = (xc + magic) - magic;
  const vf r = exp_poly((xc - n) * vset(0.693147180559945309f)) * pow2i(__builtin_convertvector(n, vi));
  return tiny ? vset(0.0f) : r;
}

inline float sexp(float x) {
  vf v = vexp(vset(x));
  return v[0];
}

// ---- 16-bit float conversions ----------------------------------------------------------------------------

inline float bf16_f32(uint16_t h) { return bf16_to_f32(h); }
inline float f16_f32(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  return f16_to_f32_soft(h);
#endif
}

// f32 -> bf16, round to nearest even; NaN stays a quiet NaN (as src/core/dtype.ts f32ToBf16).
inline uint16_t f32_bf16(float x) {
  uint32_t u;
  memcpy(&u, &x, 4);
  if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x7fffffu) != 0) return (uint16_t)(((u >> 16) | 0x40u) & 0xffffu);
  return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// f32 -> f16, round to nearest even, overflow to infinity, NaN -> sign | 0x7e00 (as f32ToF16).
inline uint16_t f32_f16(float x) {
  uint32_t u;
  memcpy(&u, &x, 4);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t exp = (u >> 23) & 0xffu;
  uint32_t mant = u & 0x7fffffu;
  if (exp == 0xffu) return (uint16_t)(sign | 0x7c00u | (mant ? 0x200u : 0u));
  int e = (int)exp - 127 + 15;
  if (e >= 31) return (uint16_t)(sign | 0x7c00u);
  if (e <= 0) {
    if (e < -10) return (uint16_t)sign;
    mant |= 0x800000u;
    const int shift = 14 - e;
    const uint32_t half = 1u << (shift - 1);
    uint32_t r = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1);
    if (rem > half || (rem == half && (r & 1u))) r++;
    return (uint16_t)(sign | r);
  }
  uint32_t r = mant >> 13;
  const uint32_t rem = mant & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) {
    r++;
    if (r == 0x400u) {
      r = 0;
      e++;
      if (e >= 31) return (uint16_t)(sign | 0x7c00u);
    }
  }
  return (uint16_t)(sign | ((uint32_t)e << 10) | r);
}

template <int DT>
inline float ld1(const void* p, int64_t i) {
  if (DT == kOpF32) return ((const float*)p)[i];
  if (DT == kOpBF16) return bf16_f32(((const uint16_t*)p)[i]);
  return f16_f32(((const uint16_t*)p)[i]);
}
inline float ld1dt(const void* p, int dt, int64_t i) {
  if (dt == kOpF32) return ((const float*)p)[i];
  if (dt == kOpBF16) return bf16_f32(((const uint16_t*)p)[i]);
  return f16_f32(((const uint16_t*)p)[i]);
}

// n floats of dtype dt from p + i into dst (f32), vectorised where the ISA converts in hardware.
__attribute__((always_inline)) inline void load_row(const void* p, int dt, int64_t i, int64_t n, float* dst) {
  if (dt == kOpF32) {
    const float* s = (const float*)p + i;
    if (n > 256) {
      memcpy(dst, s, (size_t)n * 4);
      return;
    }
    // short rows (attention's query and key rows) inline: a libc call per row cost attention 5-7%
    int64_t k = 0;
    for (; k + VW <= n; k += VW) vstore(dst + k, vload(s + k));
    for (; k < n; ++k) dst[k] = s[k];
    return;
  }
  const uint16_t* h = (const uint16_t*)p + i;
  int64_t k = 0;
  if (dt == kOpBF16) {
    for (; k < n; ++k) {
      const uint32_t b = (uint32_t)h[k] << 16;
      memcpy(dst + k, &b, 4);
    }
    return;
  }
#if defined(__AVX512F__) && LR_VW == 16
  for (; k + 16 <= n; k += 16) _mm512_storeu_ps(dst + k, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(h + k))));
#elif defined(__F16C__)
  for (; k + 8 <= n; k += 8) _mm256_storeu_ps(dst + k, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(h + k))));
#endif
  for (; k < n; ++k) dst[k] = f16_f32(h[k]);
}

#if defined(__AVX512F__) && LR_VW == 16
#include "transpose16.h"
#endif

#if defined(__AVX2__)
// o[c] lane i = r[i] lane c: an 8 x 8 transpose in registers.
inline void transpose8x8(const __m256 r[8], __m256 o[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  o[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  o[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  o[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  o[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  o[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  o[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  o[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  o[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}
#endif

// ---- threads ----------------------------------------------------------------------------------------------

#include "par.h"

inline int64_t split_range(int64_t n, int64_t parts, int64_t i) { return (n / parts) * i + (i < n % parts ? i : n % parts); }

// f(i0, i1) over a static partition of [0, n) into at most `threads` ranges of at least `grain` items.
template <class F>
void par_ranges(int64_t n, int threads, int64_t grain, F&& f) {
  if (n <= 0) return;
  int64_t T = threads;
  if (grain < 1) grain = 1;
  if (T > n / grain) T = n / grain;
  if (T <= 1) {
    f((int64_t)0, n);
    return;
  }
  par_tasks_n((int)T, [&](int q) { f(split_range(n, T, q), split_range(n, T, q + 1)); });
}

// f(i) for i in [0, n), handed out dynamically (for tasks whose results do not depend on which thread runs them).
template <class F>
void par_tasks(int64_t n, int threads, F&& f) {
  if (n <= 0) return;
  const int T = (int)(threads < n ? threads : n);
  std::atomic<int64_t> next{0};
  par_tasks_n(T, [&](int) {
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < n;) f(i);
  });
}

// Scratch memory of one thread, grown on demand and kept.
struct Scratch {
  void* p = nullptr;
  size_t cap = 0;
  ~Scratch() { free(p); }
  template <class T>
  T* get(size_t count) {
    const size_t bytes = count * sizeof(T) + 64;
    if (bytes > cap) {
      free(p);
      const size_t rounded = (bytes + 4095) & ~(size_t)4095;
      p = aligned_alloc(64, rounded);
      if (!p) abort();
      cap = rounded;
    }
    return (T*)p;
  }
};

}  // namespace
