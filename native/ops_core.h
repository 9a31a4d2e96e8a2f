// Core elementwise kernels: binary (contiguous and broadcast views), unary (the activations' derivatives
// included), reductions, copy/cast between dtypes, fill, row gather and scatter-add, dropout, AdamW and the
// squared norm. Semantics follow src/backend/cpu/js-core.ts exactly (NaN and signed zeros included); where
// the reference computes in f64 (scalars, sums, transcendentals other than exp) so do these kernels.

namespace {

// ---- binary -----------------------------------------------------------------------------------------------

template <int OP>
inline vf bin_v(vf x, vf y) {
  if (OP == kAdd) return x + y;
  if (OP == kSub) return x - y;
  if (OP == kMul) return x * y;
  if (OP == kDiv) return x / y;
  if (OP == kEq) return x == y ? vset(1.0f) : vset(0.0f);
  // Math.max / Math.min: NaN if either is NaN; max(+0, -0) = +0, min(+0, -0) = -0.
  vf r = OP == kMax ? (x > y ? x : y) : (x < y ? x : y);
  const vi same = x == y;
  const vf z = OP == kMax ? (vf)((vi)x & (vi)y) : (vf)((vi)x | (vi)y);
  r = same ? z : r;
  const vi nan = (x != x) | (y != y);
  return nan ? x + y : r;
}
template <int OP>
inline float bin_s(float x, float y) {
  vf r = bin_v<OP>(vset(x), vset(y));
  return r[0];
}

template <int OP>
void bin_inner(const float* a, int64_t sa, const float* b, int64_t sb, float* o, int64_t n) {
  int64_t i = 0;
  if (sa == 1 && sb == 1) {
    for (; i + VW <= n; i += VW) vstore(o + i, bin_v<OP>(vload(a + i), vload(b + i)));
    if (i < n) vstore_n(o + i, bin_v<OP>(vload_n(a + i, n - i), vload_n(b + i, n - i)), n - i);
  } else if (sa == 1 && sb == 0) {
    const vf bv = vset(*b);
    for (; i + VW <= n; i += VW) vstore(o + i, bin_v<OP>(vload(a + i), bv));
    if (i < n) vstore_n(o + i, bin_v<OP>(vload_n(a + i, n - i), bv), n - i);
  } else if (sa == 0 && sb == 1) {
    const vf av = vset(*a);
    for (; i + VW <= n; i += VW) vstore(o + i, bin_v<OP>(av, vload(b + i)));
    if (i < n) vstore_n(o + i, bin_v<OP>(av, vload_n(b + i, n - i)), n - i);
  } else {
    for (; i < n; ++i) o[i] = bin_s<OP>(a[i * sa], b[i * sb]);
  }
}

// Element offsets of outer index `row` (over dims 0 .. nd-2) for strides st.
inline int64_t outer_offset(const Strided4& s, const int64_t* st, int64_t row) {
  int64_t off = 0;
  for (int d = s.ndim - 2; d >= 0; --d) {
    off += (row % s.shape[d]) * st[d];
    row /= s.shape[d];
  }
  return off;
}

template <int OP>
void binary_t(const Strided4& s, const float* a, const int64_t* as, const float* b, const int64_t* bs, float* out,
              int threads) {
  const int64_t inner = s.shape[s.ndim - 1];
  int64_t rows = 1;
  for (int d = 0; d + 1 < s.ndim; ++d) rows *= s.shape[d];
  const int64_t chunk = 16384;
  const int64_t nch = (inner + chunk - 1) / chunk;
  const int64_t sa = as[s.ndim - 1], sb = bs[s.ndim - 1];
  par_ranges(rows * nch, threads, (32768 + chunk - 1) / (inner < chunk ? (inner > 0 ? inner : 1) : chunk),
             [&](int64_t u0, int64_t u1) {
               for (int64_t u = u0; u < u1; ++u) {
                 const int64_t row = u / nch, c0 = (u % nch) * chunk;
                 const int64_t n = inner - c0 < chunk ? inner - c0 : chunk;
                 const float* pa = a + outer_offset(s, as, row) + c0 * sa;
                 const float* pb = b + outer_offset(s, bs, row) + c0 * sb;
                 bin_inner<OP>(pa, sa, pb, sb, out + row * inner + c0, n);
               }
             });
}

void binary_k(int op, const Strided4& s, const float* a, const int64_t* as, const float* b, const int64_t* bs,
              float* out, int threads) {
  switch (op) {
    case kAdd: binary_t<kAdd>(s, a, as, b, bs, out, threads); break;
    case kSub: binary_t<kSub>(s, a, as, b, bs, out, threads); break;
    case kMul: binary_t<kMul>(s, a, as, b, bs, out, threads); break;
    case kDiv: binary_t<kDiv>(s, a, as, b, bs, out, threads); break;
    case kMax: binary_t<kMax>(s, a, as, b, bs, out, threads); break;
    case kMin: binary_t<kMin>(s, a, as, b, bs, out, threads); break;
    default: binary_t<kEq>(s, a, as, b, bs, out, threads); break;
  }
}

// ---- unary ------------------------------------------------------------------------------------------------

// Through e = exp(-|x|) in (0, 1] (vexp_neg: the exponential's cheaper half): r = 1 / (1 + e) is the sigmoid of
// |x|, e r that of -|x|.
inline vf exp_neg_abs(vf x) { return vexp_neg((vf)((vi)x | (vi{} + (int32_t)0x80000000))); }
inline vf sigmoid_v(vf x) {
  const vf e = exp_neg_abs(x);
  const vf r = vset(1.0f) / (vset(1.0f) + e);
  return x >= vset(0.0f) ? r : e * r;
}
// sigmoid(x) and 1 - sigmoid(x), each without cancellation (the smaller one is e r).
inline void sigmoid2_v(vf x, vf& s, vf& oms) {
  const vf e = exp_neg_abs(x);
  const vf r = vset(1.0f) / (vset(1.0f) + e);
  const vf q = e * r;
  const vi pos = x >= vset(0.0f);
  s = pos ? r : q;
  oms = pos ? q : r;
}

// Ops computed in f32 vectors (exact where the reference's f64 result rounds to the same f32: +-*/, sqrt).
template <int OP>
inline vf un_v(vf x) {
  if (OP == kNeg) return -x;
  if (OP == kAbs) return (vf)((vi)x & (vi{} + 0x7fffffff));
  if (OP == kSquare) return x * x;
  if (OP == kRecip) return vset(1.0f) / x;
  if (OP == kSqrt) {
    vf r;
    for (int i = 0; i < VW; ++i) r[i] = __builtin_sqrtf(x[i]);
    return r;
  }
  if (OP == kRelu) return (x != x) ? x : (x > vset(0.0f) ? x : vset(0.0f));
  if (OP == kReluGrad) return x > vset(0.0f) ? vset(1.0f) : vset(0.0f);
  if (OP == kSign) return x > vset(0.0f) ? vset(1.0f) : (x < vset(0.0f) ? vset(-1.0f) : x);
  if (OP == kExp) return vexp(x);
  if (OP == kSigmoid) return sigmoid_v(x);
  if (OP == kSilu) return x * sigmoid_v(x);
  vf s, oms;
  sigmoid2_v(x, s, oms);
  if (OP == kSigmoidGrad) return s * oms;
  return s * (vset(1.0f) + x * oms);  // kSiluGrad
}

template <int OP>
void unary_vec(const float* x, float* out, int64_t n, int threads) {
  par_ranges(n, threads, 32768, [&](int64_t i0, int64_t i1) {
    int64_t i = i0;
    for (; i + VW <= i1; i += VW) vstore(out + i, un_v<OP>(vload(x + i)));
    if (i < i1) vstore_n(out + i, un_v<OP>(vload_n(x + i, i1 - i)), i1 - i);
  });
}

// Ops computed in f64 as the reference does, rounded once to f32.
template <int OP>
inline double un_d(double v, double s) {
  switch (OP) {
    case kLog: return log(v);
    case kRsqrt: return 1.0 / sqrt(v);
    case kTanh: return tanh(v);
    case kGeluTanh: return 0.5 * v * (1.0 + tanh(0.7978845608028654 * (v + 0.044715 * v * v * v)));
    case kPow: return pow(v, s);
    case kScale: return v * s;
    case kAddScalar: return v + s;
    default: {  // kTanhGrad
      const double t = tanh(v);
      return 1.0 - t * t;
    }
  }
}

template <int OP>
void unary_dbl(const float* x, float* out, int64_t n, double s, int threads) {
  par_ranges(n, threads, OP == kScale || OP == kAddScalar || OP == kRsqrt ? 32768 : 4096, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) out[i] = (float)un_d<OP>((double)x[i], s);
  });
}

void unary_k(int op, const float* x, float* out, int64_t n, double s, int threads) {
  switch (op) {
    case kNeg: unary_vec<kNeg>(x, out, n, threads); break;
    case kExp: unary_vec<kExp>(x, out, n, threads); break;
    case kLog: unary_dbl<kLog>(x, out, n, s, threads); break;
    case kSqrt: unary_vec<kSqrt>(x, out, n, threads); break;
    case kRsqrt: unary_dbl<kRsqrt>(x, out, n, s, threads); break;
    case kAbs: unary_vec<kAbs>(x, out, n, threads); break;
    case kSquare: unary_vec<kSquare>(x, out, n, threads); break;
    case kRecip: unary_vec<kRecip>(x, out, n, threads); break;
    case kSigmoid: unary_vec<kSigmoid>(x, out, n, threads); break;
    case kTanh: unary_dbl<kTanh>(x, out, n, s, threads); break;
    case kRelu: unary_vec<kRelu>(x, out, n, threads); break;
    case kSilu: unary_vec<kSilu>(x, out, n, threads); break;
    case kGeluTanh: unary_dbl<kGeluTanh>(x, out, n, s, threads); break;
    case kPow: unary_dbl<kPow>(x, out, n, s, threads); break;
    case kScale: unary_dbl<kScale>(x, out, n, s, threads); break;
    case kAddScalar: unary_dbl<kAddScalar>(x, out, n, s, threads); break;
    case kSign: unary_vec<kSign>(x, out, n, threads); break;
    case kSigmoidGrad: unary_vec<kSigmoidGrad>(x, out, n, threads); break;
    case kTanhGrad: unary_dbl<kTanhGrad>(x, out, n, s, threads); break;
    case kReluGrad: unary_vec<kReluGrad>(x, out, n, threads); break;
    default: unary_vec<kSiluGrad>(x, out, n, threads); break;
  }
}

// ---- reduce -----------------------------------------------------------------------------------------------

// Sum of n contiguous floats in f64 lanes (fixed order).
inline double sum_d(const float* x, int64_t n) {
  vdh a0 = vdset(0.0), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 2 * VW <= n; i += 2 * VW) {
    const vf u = vload(x + i), w = vload(x + i + VW);
    a0 += lo_d(u);
    a1 += hi_d(u);
    a2 += lo_d(w);
    a3 += hi_d(w);
  }
  for (; i + VW <= n; i += VW) {
    const vf u = vload(x + i);
    a0 += lo_d(u);
    a1 += hi_d(u);
  }
  if (i < n) {
    const vf u = vload_n(x + i, n - i);
    a2 += lo_d(u);
    a3 += hi_d(u);
  }
  return hsumd((a0 + a1) + (a2 + a3));
}

// The reference's max/min step: m = v when v beats m, NaN sticks.
template <bool MAX>
inline float mm_step(float m, float v) {
  if (MAX ? v > m : v < m) return v;
  if (v != v) return v;
  return m;
}

template <int OP>
void reduce_t(const float* x, float* out, int64_t outer, int64_t n, int64_t inner, int threads) {
  if (inner == 1) {
    par_ranges(outer, threads, n >= 32768 ? 1 : 32768 / (n + 1) + 1, [&](int64_t a0, int64_t a1) {
      for (int64_t a = a0; a < a1; ++a) {
        const float* r = x + a * n;
        if (OP == kRSum) {
          out[a] = (float)sum_d(r, n);
        } else {
          float m = OP == kRMax ? -INFINITY : INFINITY;
          for (int64_t j = 0; j < n; ++j) m = mm_step<OP == kRMax>(m, r[j]);
          out[a] = m;
        }
      }
    });
    return;
  }
  // [outer, n, inner]: every output sums its column in order (exactly the reference's f64 order).
  const int64_t cb = 512;
  const int64_t ncb = (inner + cb - 1) / cb;
  par_ranges(outer * ncb, threads, 1, [&](int64_t u0, int64_t u1) {
    double acc[512];
    float mm[512];
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t a = u / ncb, c0 = (u % ncb) * cb;
      const int64_t w = inner - c0 < cb ? inner - c0 : cb;
      const float* base = x + a * n * inner + c0;
      if (OP == kRSum) {
        for (int64_t c = 0; c < w; ++c) acc[c] = 0.0;
        for (int64_t j = 0; j < n; ++j) {
          const float* r = base + j * inner;
          for (int64_t c = 0; c < w; ++c) acc[c] += (double)r[c];
        }
        for (int64_t c = 0; c < w; ++c) out[a * inner + c0 + c] = (float)acc[c];
      } else {
        for (int64_t c = 0; c < w; ++c) mm[c] = OP == kRMax ? -INFINITY : INFINITY;
        for (int64_t j = 0; j < n; ++j) {
          const float* r = base + j * inner;
          for (int64_t c = 0; c < w; ++c) mm[c] = mm_step<OP == kRMax>(mm[c], r[c]);
        }
        for (int64_t c = 0; c < w; ++c) out[a * inner + c0 + c] = mm[c];
      }
    }
  });
}

void reduce_k(int op, const float* x, float* out, int64_t outer, int64_t n, int64_t inner, int threads) {
  if (op == kRSum) reduce_t<kRSum>(x, out, outer, n, inner, threads);
  else if (op == kRMax) reduce_t<kRMax>(x, out, outer, n, inner, threads);
  else reduce_t<kRMin>(x, out, outer, n, inner, threads);
}

// ---- copy / cast ------------------------------------------------------------------------------------------

inline int elsize(int dt) { return dt == kOpF32 || dt == kOpI32 ? 4 : dt == kOpU8 ? 1 : 2; }

inline void f32_to_f16_row(const float* s, uint16_t* d, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(s + i);
    if (_mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q))) {
      for (int k = 0; k < 8; ++k) d[i + k] = f32_f16(s[i + k]);  // NaN payloads as the reference
    } else {
      _mm_storeu_si128((__m128i*)(d + i), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    }
  }
#endif
  for (; i < n; ++i) d[i] = f32_f16(s[i]);
}

// n elements with strides ss (source) and ds (destination), converting SDT -> DDT (floats only when they differ).
void copy_inner(const void* src, int sdt, int64_t ss, void* dst, int ddt, int64_t ds, int64_t n) {
  if (sdt == ddt) {
    const int es = elsize(sdt);
    if (ss == 1 && ds == 1) {
      memcpy(dst, src, (size_t)(n * es));
    } else if (es == 4) {
      for (int64_t i = 0; i < n; ++i) ((uint32_t*)dst)[i * ds] = ((const uint32_t*)src)[i * ss];
    } else if (es == 2) {
      for (int64_t i = 0; i < n; ++i) ((uint16_t*)dst)[i * ds] = ((const uint16_t*)src)[i * ss];
    } else {
      for (int64_t i = 0; i < n; ++i) ((uint8_t*)dst)[i * ds] = ((const uint8_t*)src)[i * ss];
    }
    return;
  }
  float buf[1024];
  for (int64_t i0 = 0; i0 < n; i0 += 1024) {
    const int64_t m = n - i0 < 1024 ? n - i0 : 1024;
    if (ss == 1) {
      load_row(src, sdt, i0, m, buf);
    } else {
      for (int64_t i = 0; i < m; ++i) buf[i] = ld1dt(src, sdt, (i0 + i) * ss);
    }
    if (ddt == kOpF32) {
      float* d = (float*)dst;
      if (ds == 1) memcpy(d + i0, buf, (size_t)m * 4);
      else for (int64_t i = 0; i < m; ++i) d[(i0 + i) * ds] = buf[i];
    } else if (ddt == kOpBF16) {
      uint16_t* d = (uint16_t*)dst;
      for (int64_t i = 0; i < m; ++i) d[(i0 + i) * ds] = f32_bf16(buf[i]);
    } else {
      uint16_t* d = (uint16_t*)dst;
      if (ds == 1) f32_to_f16_row(buf, d + i0, m);
      else for (int64_t i = 0; i < m; ++i) d[(i0 + i) * ds] = f32_f16(buf[i]);
    }
  }
}

// dst[i * ds0 + j] = src[i + j * ss1] for i < R, j < C (a transpose): by 64 x 64 tiles, so both sides move a
// cache line at a time rather than one side an element per line.
template <typename T>
void transpose_tiles(const T* src, int64_t ss1, T* dst, int64_t ds0, int64_t R, int64_t C, int threads) {
  constexpr int64_t TB = 64;
  const int64_t nr = (R + TB - 1) / TB, nc = (C + TB - 1) / TB;
  par_ranges(nr * nc, threads, 16, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t i0 = (u / nc) * TB, j0 = (u % nc) * TB;
      const int64_t i1 = R - i0 < TB ? R : i0 + TB, j1 = C - j0 < TB ? C : j0 + TB;
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t j = j0; j < j1; ++j) dst[i * ds0 + j] = src[i + j * ss1];
    }
  });
}

void copy_k(const Strided4& s, const void* src, int sdt, const int64_t* ss, void* dst, int ddt, const int64_t* ds,
            int threads) {
  if (s.ndim == 2 && sdt == ddt && ss[0] == 1 && ss[1] != 1 && ds[1] == 1 && elsize(sdt) != 1) {
    // a matrix stored transposed into a row-major one (the decoding layout's weights)
    if (elsize(sdt) == 4)
      transpose_tiles((const uint32_t*)src, ss[1], (uint32_t*)dst, ds[0], s.shape[0], s.shape[1], threads);
    else
      transpose_tiles((const uint16_t*)src, ss[1], (uint16_t*)dst, ds[0], s.shape[0], s.shape[1], threads);
    return;
  }
  const int64_t inner = s.shape[s.ndim - 1];
  int64_t rows = 1;
  for (int d = 0; d + 1 < s.ndim; ++d) rows *= s.shape[d];
  const int64_t chunk = 32768;
  const int64_t nch = (inner + chunk - 1) / chunk;
  const int se = elsize(sdt), de = elsize(ddt);
  par_ranges(rows * nch, threads, (65536 + chunk - 1) / (inner < chunk ? (inner > 0 ? inner : 1) : chunk),
             [&](int64_t u0, int64_t u1) {
               for (int64_t u = u0; u < u1; ++u) {
                 const int64_t row = u / nch, c0 = (u % nch) * chunk;
                 const int64_t n = inner - c0 < chunk ? inner - c0 : chunk;
                 const char* ps = (const char*)src + (outer_offset(s, ss, row) + c0 * ss[s.ndim - 1]) * se;
                 char* pd = (char*)dst + (outer_offset(s, ds, row) + c0 * ds[s.ndim - 1]) * de;
                 copy_inner(ps, sdt, ss[s.ndim - 1], pd, ddt, ds[s.ndim - 1], n);
               }
             });
}

void fill_k(void* dst, int dt, int64_t n, double value, int threads) {
  par_ranges(n, threads, 65536, [&](int64_t i0, int64_t i1) {
    if (dt == kOpF32) {
      float* d = (float*)dst;
      const float v = (float)value;
      for (int64_t i = i0; i < i1; ++i) d[i] = v;
    } else {
      uint16_t* d = (uint16_t*)dst;
      const uint16_t v = (uint16_t)value;
      for (int64_t i = i0; i < i1; ++i) d[i] = v;
    }
  });
}

// ---- rows: gather, scatter-add ----------------------------------------------------------------------------

void gather_rows_k(const void* x, int xdt, const int32_t* idx, int64_t count, int64_t cols, void* out, int odt,
                   int threads) {
  const int xe = elsize(xdt), oe = elsize(odt);
  par_ranges(count, threads, cols >= 16384 ? 1 : 16384 / (cols + 1) + 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i)
      copy_inner((const char*)x + (int64_t)idx[i] * cols * xe, xdt, 1, (char*)out + i * cols * oe, odt, 1, cols);
  });
}

// out[idx[i], :] += g[i, :] in increasing i (skipping idx == skip). Thread t owns the destination rows with
// idx % T == t, so every row is updated by one thread in the reference's order: the result is bit-identical
// to a sequential pass whatever the thread count.
void scatter_add_rows_k(const float* g, const int32_t* idx, int64_t count, int64_t cols, float* out, int32_t skip,
                        int threads) {
  int T = threads;
  if ((double)count * (double)cols < 65536.0) T = 1;
  auto body = [&](int t, int nt) {
    for (int64_t i = 0; i < count; ++i) {
      const int32_t r = idx[i];
      if (r == skip || (nt > 1 && r % nt != t)) continue;
      float* d = out + (int64_t)r * cols;
      const float* s = g + i * cols;
      int64_t j = 0;
      for (; j + VW <= cols; j += VW) vstore(d + j, vload(d + j) + vload(s + j));
      for (; j < cols; ++j) d[j] += s[j];
    }
  };
  if (T <= 1) {
    body(0, 1);
    return;
  }
  par_tasks_n(T, [&](int t) { body(t, T); });
}

// ---- dropout ----------------------------------------------------------------------------------------------

inline vu fmix32v(vu h) {
  h ^= h >> 16;
  h *= 0x85ebca6bu;
  h ^= h >> 13;
  h *= 0xc2b2ae35u;
  h ^= h >> 16;
  return h;
}

void dropout_k(const float* x, float* out, int64_t n, int64_t threshold, double scale, uint32_t key0, uint32_t key1,
               int threads) {
  vu lane;
  for (int i = 0; i < VW; ++i) lane[i] = (uint32_t)i;
  const bool none = threshold > 0xffffffffLL;
  const uint32_t thr = none ? 0u : (uint32_t)threshold;
  const vdh sc = vdset(scale);
  par_ranges(n, threads, 32768, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; i += VW) {
      const int64_t m = i1 - i < VW ? i1 - i : VW;
      const vu idx = lane + (uint32_t)i;
      const vu u = fmix32v(fmix32v(idx ^ key0) ^ key1);
      const vi keep = none ? vi{} : (vi)(u >= thr);
      const vf xv = vload_part(x + i, m);
      const vf y = from_d(lo_d(xv) * sc, hi_d(xv) * sc);
      vstore_part(out + i, keep ? y : vset(0.0f), m);
    }
  });
}

// ---- optimizer --------------------------------------------------------------------------------------------

// AdamW in f64 per element, exactly the reference's expression order.
void adamw_k(float* p, const float* g, float* m, float* v, int64_t n, const AdamWScalars& s, int threads) {
  par_ranges(n, threads, 16384, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const double gi = (double)g[i] * s.grad_scale;
      const double mi = s.beta1 * (double)m[i] + s.one_minus_beta1 * gi;
      const double vi_ = s.beta2 * (double)v[i] + s.one_minus_beta2 * gi * gi;
      m[i] = (float)mi;
      v[i] = (float)vi_;
      const double denom = sqrt(vi_ / s.bc2) + s.eps;
      p[i] = (float)((double)p[i] * s.decay - (s.step_size * mi) / denom);
    }
  });
}

// The first index of the largest element (a greedy token's pick: src/models/sampling.ts argmax, whose semantics
// this keeps): lane j of the vectors keeps its own largest and where it first occurred, a later element
// replacing it only when strictly larger (NaN compares false, so it never does); the lanes are then merged,
// the smaller index winning a tie. Nothing above -inf (all -inf or NaN) gives 0.
int64_t argmax_k(const float* x, int64_t n) {
  const int64_t nv = n > 2147483647 - 2 * VW ? 0 : n;  // the lanes count in int32: past that, the scalar loop
  vf best = vset(-INFINITY);
  vi at = vi{} - 1;  // -1: nothing yet
  vi idx;
  for (int l = 0; l < VW; ++l) idx[l] = l;
  const vi step = vi{} + VW;
  int64_t i = 0;
  for (; i + VW <= nv; i += VW) {
    const vf v = vload(x + i);
    const vi gt = v > best;
    best = gt ? v : best;
    at = gt ? idx : at;
    idx += step;
  }
  float bv = -INFINITY;
  int64_t bi = -1;
  for (int l = 0; l < VW; ++l)
    if (at[l] >= 0 && (best[l] > bv || (best[l] == bv && at[l] < bi))) {
      bv = best[l];
      bi = at[l];
    }
  for (; i < n; ++i)
    if (x[i] > bv) {
      bv = x[i];
      bi = i;
    }
  return bi < 0 ? 0 : bi;
}

// Sum of squares in f64, over fixed chunks combined in order: the same result for any thread count.
double sum_squares_k(const float* x, int64_t n, int threads) {
  const int64_t chunk = 65536;
  const int64_t nch = (n + chunk - 1) / chunk;
  if (nch <= 0) return 0.0;
  double* part = (double*)malloc((size_t)nch * sizeof(double));
  if (!part) abort();
  par_ranges(nch, threads, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const float* p = x + c * chunk;
      const int64_t m = n - c * chunk < chunk ? n - c * chunk : chunk;
      vdh a0 = vdset(0.0), a1 = a0;
      int64_t i = 0;
      for (; i + VW <= m; i += VW) {
        const vf u = vload(p + i);
        const vdh l = lo_d(u), h = hi_d(u);
        a0 += l * l;
        a1 += h * h;
      }
      double s = hsumd(a0 + a1);
      for (; i < m; ++i) s += (double)p[i] * (double)p[i];
      part[c] = s;
    }
  });
  double s = 0.0;
  for (int64_t c = 0; c < nch; ++c) s += part[c];
  free(part);
  return s;
}

}  // namespace
