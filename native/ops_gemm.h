// The row-invariant GEMM behind Backend.gemm: one row of C comes out bit-identical whatever M is (how many
// rows share the call), so a sequence gives the same logits alone as in a mixed batch.
//
// The blocked GEMM (gemm_driver.h) computes every element of C as a chain of FMAs over k that restarts at
// each KC block: c = chain(0..KC); c = c + chain(KC..2KC); ... (alpha applied per block). Its skinny path
// (M <= 16 or N <= 16) instead sums k in vector lanes and reduces at the end, a different rounding, so a row
// computed with 3 others differed in the last bits from the same row computed with 30 others.
//
// Here: shapes with M > 16 and N > 16 go to the blocked GEMM (but for up to kPassRows rows against a B whose
// rows or columns are contiguous: rg_run's few-row passes); the others to rg_run below, which computes
// exactly the blocked GEMM's chains (same KC, read from the GEMM; the same FMA or, on the generic build,
// multiply-then-add) with small tiles. The blocked micro-kernel finishes full and partial tiles differently
// when alpha != 1 and a block is added to C, so before either path: beta not in {0, 1} is applied to C first
// (c = beta c, then beta = 1), and alpha != 1 is folded into B (b' = alpha b, rounded) whenever C
// accumulates (beta = 1 or more than one KC block). Every element then depends only on its own row of A,
// B, K and the ISA; test/backend/native-kernels.test.ts checks this bit for bit against M.

namespace {

constexpr int64_t kSkinnyMax = 16;  // the GEMM's skinny threshold (gemm_driver.h kSkinny)
constexpr int NJ = 2 * VW;          // columns per B panel
constexpr int RMAX = VW == 16 ? 12 : (VW == 8 ? 6 : 4);

int64_t blocked_kc() {
  int64_t o[3];
  LR_GEMM_IMPL()->blocking(0, 0, 0, o);
  return o[0];
}

// dst[t * dstride + jj] = M(row jj, k t) for jj < VW (0 for jj >= nr), t < kn; M row jj starts at
// p + base + jj * rstride (contiguous along k). Stores `lanes` lanes per t.
void load_block_t(const void* p, int dt, int64_t base, int64_t rstride, int64_t nr, int64_t kn, float* dst,
                  int64_t dstride, int lanes) {
#if defined(__AVX512F__) && LR_VW == 16
  __m512 r[16];
  const __mmask16 km = (__mmask16)(kn >= 16 ? 0xffff : (1u << kn) - 1);
  for (int i = 0; i < 16; ++i) {
    if (i >= nr) {
      r[i] = _mm512_setzero_ps();
      continue;
    }
    const int64_t at = base + i * rstride;
    if (dt == kOpF32) {
      r[i] = _mm512_maskz_loadu_ps(km, (const float*)p + at);
    } else {
      const __m256i h = _mm256_maskz_loadu_epi16(km, (const uint16_t*)p + at);
      r[i] = dt == kOpBF16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)) : _mm512_cvtph_ps(h);
    }
  }
  transpose16(r);
  const __mmask16 sm = (__mmask16)(lanes >= 16 ? 0xffff : (1u << lanes) - 1);
  for (int64_t i = 0; i < kn; ++i) _mm512_mask_storeu_ps(dst + i * dstride, sm, r[i]);
#elif defined(__AVX2__) && LR_VW == 8
  __m256 r[8];
  for (int i = 0; i < 8; ++i) {
    if (i >= nr) {
      r[i] = _mm256_setzero_ps();
      continue;
    }
    const int64_t at = base + i * rstride;
    alignas(32) float tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    if (dt == kOpF32 && kn == 8) {
      r[i] = _mm256_loadu_ps((const float*)p + at);
      continue;
    }
    if (dt == kOpF16 && kn == 8) {
      r[i] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)((const uint16_t*)p + at)));
      continue;
    }
    if (dt == kOpBF16 && kn == 8) {
      const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)((const uint16_t*)p + at)));
      r[i] = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
      continue;
    }
    for (int64_t k = 0; k < kn; ++k) tmp[k] = ld1dt(p, dt, at + k);
    r[i] = _mm256_load_ps(tmp);
  }
  __m256 o[8];
  transpose8x8(r, o);
  for (int64_t i = 0; i < kn; ++i) {
    if (lanes >= 8) {
      _mm256_storeu_ps(dst + i * dstride, o[i]);
    } else {
      alignas(32) float tmp[8];
      _mm256_store_ps(tmp, o[i]);
      for (int l = 0; l < lanes; ++l) dst[i * dstride + l] = tmp[l];
    }
  }
#else
  for (int64_t t = 0; t < kn; ++t)
    for (int jj = 0; jj < lanes; ++jj) dst[t * dstride + jj] = jj < nr ? ld1dt(p, dt, base + jj * rstride + t) : 0.0f;
#endif
}

struct RG {
  int64_t M, N, K;
  Operand A, B;  // A(i, k) at A.p[i * rs + k * cs]; B(k, j) likewise
  float* C;
  int64_t ldc;
  float alpha;  // != 1 only with a single KC block written (not added) to C
  bool add;     // C += A B (else C = alpha A B)
  // rows from the first of a K block to the first of the block the same thread likely reads next (0: unknown),
  // for the decoding layout's few-row products (gv_tiles)
  int64_t next_rows = 0;
};

// Bp[k * NJ + jj] = B(k0 + k, j0 + jj), zero past N.
void rg_pack_b(const RG& g, int64_t k0, int64_t kc, int64_t j0, float* Bp) {
  const int64_t ncols = g.N - j0 < NJ ? g.N - j0 : NJ;
  const Operand& B = g.B;
  if (B.cs == 1) {
    for (int64_t k = 0; k < kc; ++k) {
      float* d = Bp + k * NJ;
      load_row(B.p, B.dtype, (k0 + k) * B.rs + j0, ncols, d);
      for (int64_t jj = ncols; jj < NJ; ++jj) d[jj] = 0.0f;
    }
  } else if (B.rs == 1) {
    for (int v = 0; v < 2; ++v) {
      const int64_t nr = ncols - v * VW;
      for (int64_t kb = 0; kb < kc; kb += VW) {
        const int64_t kn = kc - kb < VW ? kc - kb : VW;
        if (nr <= 0) {
          for (int64_t t = 0; t < kn; ++t) vstore(Bp + (kb + t) * NJ + v * VW, vset(0.0f));
        } else {
          load_block_t(B.p, B.dtype, (j0 + v * VW) * B.cs + k0 + kb, B.cs, nr, kn, Bp + kb * NJ + v * VW, NJ, VW);
        }
      }
    }
  } else {
    for (int64_t k = 0; k < kc; ++k)
      for (int64_t jj = 0; jj < NJ; ++jj)
        Bp[k * NJ + jj] = jj < ncols ? ld1dt(B.p, B.dtype, (k0 + k) * B.rs + (j0 + jj) * B.cs) : 0.0f;
  }
}

// Ap[k * RMAX + r] = A(i0 + r, k0 + k) for r < rows (others 0).
void rg_pack_a(const RG& g, int64_t i0, int64_t rows, int64_t k0, int64_t kc, float* Ap) {
  const Operand& A = g.A;
  if (A.rs == 1) {
    for (int64_t k = 0; k < kc; ++k) {
      float* d = Ap + k * RMAX;
      load_row(A.p, A.dtype, (k0 + k) * A.cs + i0, rows, d);
      for (int64_t r = rows; r < RMAX; ++r) d[r] = 0.0f;
    }
  } else if (A.cs == 1) {
    for (int64_t kb = 0; kb < kc; kb += VW) {
      const int64_t kn = kc - kb < VW ? kc - kb : VW;
      load_block_t(A.p, A.dtype, i0 * A.rs + k0 + kb, A.rs, rows, kn, Ap + kb * RMAX, RMAX, RMAX);
    }
  } else {
    for (int64_t k = 0; k < kc; ++k)
      for (int64_t r = 0; r < RMAX; ++r)
        Ap[k * RMAX + r] = r < rows ? ld1dt(A.p, A.dtype, (i0 + r) * A.rs + (k0 + k) * A.cs) : 0.0f;
  }
}

// One tile: R rows x NV vectors of columns over kc, written (first block, !add) or added to C. A(r, k) is read
// at Ap[r * ars + k * aks]: packed (ars 1, aks RMAX) or, for f32 A, where it lies.
template <int R, int NV>
void rg_tile(int64_t kc, const float* __restrict Ap, int64_t ars, int64_t aks, const float* __restrict Bp,
             float* C, int64_t ldc, int64_t ncols, bool write, float alpha) {
  vf acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = vset(0.0f);
  for (int64_t k = 0; k < kc; ++k) {
    vf b[NV];
    for (int v = 0; v < NV; ++v) b[v] = vload(Bp + k * NJ + v * VW);
    for (int r = 0; r < R; ++r) {
      const vf a = vset(Ap[r * ars + k * aks]);
      for (int v = 0; v < NV; ++v) acc[r][v] = vfma(a, b[v], acc[r][v]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < NV; ++v) {
      const int64_t cols = ncols - v * VW;
      if (cols <= 0) continue;
      float* c = C + r * ldc + v * VW;
      vf val = acc[r][v];
      if (write) {
        if (alpha != 1.0f) val = val * vset(alpha);
      } else {
        val = vload_part(c, cols) + val;
      }
      vstore_part(c, val, cols);
    }
  }
}

using RgTileFn = void (*)(int64_t, const float*, int64_t, int64_t, const float*, float*, int64_t, int64_t, bool,
                          float);
template <int NV, int... I>
constexpr std::array<RgTileFn, sizeof...(I)> rg_tiles(std::integer_sequence<int, I...>) {
  return {&rg_tile<I + 1, NV>...};
}
constexpr auto kRgTiles1 = rg_tiles<1>(std::make_integer_sequence<int, RMAX>{});
constexpr auto kRgTiles2 = rg_tiles<2>(std::make_integer_sequence<int, RMAX>{});

// rows (1..RMAX) x ncols (<= NJ; one vector when ncols <= VW, so no FMA is spent on absent columns).
void rg_tile_any(int64_t rows, int64_t kc, const float* Ap, int64_t ars, int64_t aks, const float* Bp, float* C,
                 int64_t ldc, int64_t ncols, bool write, float alpha) {
  if (rows < 1 || rows > RMAX) return;
  (ncols <= VW ? kRgTiles1 : kRgTiles2)[rows - 1](kc, Ap, ars, aks, Bp, C, ldc, ncols, write, alpha);
}

thread_local Scratch tls_rg_a, tls_rg_b, tls_rg_p;

// ---- few rows against B stored along j (decoding with a weight kept as [K, N]: see useDecodeLayout) -----
//
// The same chains as rg_tile (per element: FMAs over k in order, from 0 at each KC block, each block's chain
// written or added to C), but B is read where it lies, one row of k at a time, with the chains of a strip of
// columns kept in a small buffer: no packing, so decoding streams each weight once at memory speed.

// Rows of C the few-row paths take at once (this one and rg_rows below), the others in passes of as many: a
// serving batch of 5 to 8 sequences went to rg_run's packing, which read the 135m head at 7 GB/s against 40-45
// here with 1 to 4 rows.
constexpr int kGemvRows = 8;
// Rows of C (of a B along k or along j) taken in passes of kGemvRows rather than by the blocked GEMM or rg_run's
// tiles, which pack B each call: 135m bf16 DecodeSession, decoding layout, batches of 17 and 20: 50.9 and 51.0 ms
// a step blocked, 34.6 and 37.6 in passes; batch 24 59.1 against 51.3 (default layout 70.1 against 56.4).
constexpr int64_t kPassRows = 20;
constexpr int64_t kGemvStrip = 2048;  // columns per strip: M x 8 KiB of chains stays in L1/L2
constexpr int64_t kGemvWide = 8192;   // columns per strip where threads split K (wider rows go in strips)

// VW elements of B's row from p + i, converted to f32. Calls nothing where the ISA converts in registers: a
// call in gv_rows' loop (the SysV ABI keeps no vector register across one) made the compiler keep the loaded
// rows and broadcasts on the stack, and AVX-512's bf16 products ran at a third of AVX2's speed in cache.
template <int DT>
inline vf gv_load_full(const void* p, int64_t i) {
  constexpr int dt = DT;
  if (dt == kOpF32) return vload((const float*)p + i);
#if defined(__AVX512F__) && LR_VW == 16
  const __m256i h = _mm256_loadu_si256((const __m256i*)((const uint16_t*)p + i));
  return dt == kOpBF16 ? (vf)_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
                       : (vf)_mm512_cvtph_ps(h);
#elif defined(__AVX2__) && LR_VW == 8
  const __m128i h = _mm_loadu_si128((const __m128i*)((const uint16_t*)p + i));
  return dt == kOpBF16 ? (vf)_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
                       : (vf)_mm256_cvtph_ps(h);
#else
  alignas(64) float tmp[VW];
  load_row(p, dt, i, VW, tmp);
  return vload(tmp);
#endif
}

// Prefetches a line ahead of element i of B (the address formed as an integer: past B's end it is never
// dereferenced, and the instruction does not fault). The hardware's stream prefetchers stop at 4 KiB pages.
// Q rows a pass: eight rows (strips of long rows: eight streams) prefetch kGemvPrefetch bytes ahead of each; one
// row at a time (whole rows of a K block, a single stream) kGemvStreamPrefetch bytes ahead, as far as a single
// stream needs to keep enough lines in flight when the memory is fast. On Zen 5 (2 vCPUs) the 135m preset's
// decode-layout products of a step took 7.7-7.9 against 8.3 ms/token at 2 KiB rather than none (bf16,
// alternating in-process rounds; 1-3 KiB alike). A 9216 x 3072 bf16 product (one stream a task) read 51-55
// GB/s at 8 KiB against 39-42 at 2 KiB whenever the machine's bandwidth was high (read probe 70-80 GB/s; 16
// KiB alike, 4 KiB 45-48) and 33-35 against 31-34 when it was shared (probe 40-45); the 49152-wide head's
// eight-row strips were slower at 8 KiB (36 against 45 GB/s). Decoding at 8 against 2 KiB: bf16 8.38 against
// 8.57 ms/token (mean of 40 alternating rounds, 27 faster), f32 15.2 against 16.8 (16 rounds, 11 faster).
constexpr int64_t kGemvPrefetch = 2048;
constexpr int64_t kGemvStreamPrefetch = 8192;
template <int DT, int Q>
inline void gv_prefetch(const void* p, int64_t i) {
#if defined(__SSE__)
  constexpr int64_t ahead = Q == 1 ? kGemvStreamPrefetch : kGemvPrefetch;
  _mm_prefetch((const char*)((uintptr_t)p + (uintptr_t)(i * (DT == kOpF32 ? 4 : 2) + ahead)), _MM_HINT_T0);
#else
  (void)p;
  (void)i;
#endif
}

// The first n (< VW) elements of B's row from p + i, converted to f32, the rest 0.
template <int DT>
inline vf gv_load_part(const void* p, int64_t i, int64_t n) {
  if (DT == kOpF32) return vload_part((const float*)p + i, n);
  alignas(64) float tmp[VW];
  load_row(p, DT, i, n, tmp);
  return vload_n(tmp, n);
}

// Whether bf16 rows are widened 16 columns at a time by interleaving with zeros (AVX2: one load and two
// unpacks instead of two widening loads and two shifts), which leaves the chains of each block of 16 columns
// in the order (0-3, 8-11), (4-7, 12-15) until C is written.
template <int DT>
constexpr bool gv_interleaved() {
#if defined(__AVX2__) && LR_VW == 8
  return DT == kOpBF16;
#else
  return false;
#endif
}

// Whether R rows of C go by gv_tiles (below) rather than gv_rows: three or more with AVX-512's 32 registers (with
// AVX2's 16 and the generic build's, Zen 5 measured them no faster: AVX2 bf16 within noise, f32 and the generic
// build's 8 rows 10-20% slower, so those keep gv_rows).
constexpr bool gv_tiled_rows(int64_t rows) { return rows >= 3 && VW == 16; }
template <int R>
constexpr bool gv_tiled() {
  return gv_tiled_rows(R);
}

// Q rows of B (k .. k + Q - 1, from element row on, then row + B.rs, ...) into the chains t of R rows of C:
// c = fma(a_k, b_k, c) in k order. Columns below np16 are in the interleaved order (gv_interleaved).
template <int R, int DT, int Q>
inline void gv_rows(const RG& g, const float* Ap, int64_t k, int64_t row, int64_t n, int64_t np16, float* t,
                    int64_t ts) {
  const Operand B = g.B;  // a copy: t's stores (memcpy) could alias g, and B.p was loaded again every vector
  vf av[R][Q];
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < Q; ++q) av[r][q] = vset(Ap[r * g.K + k + q]);
  int64_t jv = 0;
  // the chains of two vectors of columns, j and j + VW (t's order), against Q rows b0 and b1
  [[maybe_unused]] auto step2 = [&](int64_t j, const vf (&b0)[Q], const vf (&b1)[Q]) {
    for (int r = 0; r < R; ++r) {
      float* tp = t + r * ts + j;
      vf c0 = vload(tp), c1 = vload(tp + VW);
      for (int q = 0; q < Q; ++q) {
        c0 = vfma(av[r][q], b0[q], c0);
        c1 = vfma(av[r][q], b1[q], c1);
      }
      vstore(tp, c0);
      vstore(tp + VW, c1);
    }
  };
#if defined(__AVX2__) && LR_VW == 8
  if constexpr (gv_interleaved<DT>()) {
    const __m256i z = _mm256_setzero_si256();
    // 16 columns (32 bytes) a pass, a prefetch every other pass (a line each)
    auto pass = [&](int64_t j, bool pf) {
      vf lo[Q], hi[Q];
      for (int q = 0; q < Q; ++q) {
        if (pf) gv_prefetch<DT, Q>(B.p, row + q * B.rs + j);
        const __m256i h = _mm256_loadu_si256((const __m256i*)((const uint16_t*)B.p + row + q * B.rs + j));
        lo[q] = (vf)_mm256_castsi256_ps(_mm256_unpacklo_epi16(z, h));
        hi[q] = (vf)_mm256_castsi256_ps(_mm256_unpackhi_epi16(z, h));
      }
      step2(j, lo, hi);
    };
    for (; jv + 32 <= np16; jv += 32) {
      pass(jv, true);
      pass(jv + 16, false);
    }
    for (; jv < np16; jv += 16) pass(jv, true);
  }
#endif
  // whole vectors, then the part of one left (its own loop: see gv_load_full)
  auto step = [&](int64_t j, const vf (&b)[Q]) {
    for (int r = 0; r < R; ++r) {
      float* tp = t + r * ts + j;
      vf c = vload(tp);
      for (int q = 0; q < Q; ++q) c = vfma(av[r][q], b[q], c);
      vstore(tp, c);
    }
  };
  // U whole vectors (a 64-byte line) a pass, one prefetch a line: bf16 on AVX-512 prefetched every 32 bytes had
  // a 576 x 576 product from L2 take 11.1-19.4 against 10.1-15.6 us (one thread, alternating), and a bf16 135m
  // decoding step 11.3 -> 10.2 ms/token (median, 8 of 10 alternating rounds faster, a busy hour)
  constexpr int64_t U = 64 / (VW * (DT == kOpF32 ? 4 : 2)) > 1 ? 64 / (VW * (DT == kOpF32 ? 4 : 2)) : 1;
  for (; jv + U * VW <= n; jv += U * VW) {
    for (int q = 0; q < Q; ++q) gv_prefetch<DT, Q>(B.p, row + q * B.rs + jv);
    if constexpr (Q > 1 && U == 2 && R >= 3) {
      // three rows of C or more (where not gv_tiled): both vectors of the line at once, each a_r,q (spilled to the
      // stack when R x Q is large) read once for two FMAs (135m bf16 DecodeSession on AVX-512, batches of 8 and
      // 16: 24.0 -> 22.9 and 40.4 -> 35.4 ms a step, medians of 12 alternating rounds)
      vf b0[Q], b1[Q];
      for (int q = 0; q < Q; ++q) {
        b0[q] = gv_load_full<DT>(B.p, row + q * B.rs + jv);
        b1[q] = gv_load_full<DT>(B.p, row + q * B.rs + jv + VW);
      }
      step2(jv, b0, b1);
      continue;
    }
    for (int64_t u = 0; u < U; ++u) {
      vf b[Q];
      for (int q = 0; q < Q; ++q) b[q] = gv_load_full<DT>(B.p, row + q * B.rs + jv + u * VW);
      step(jv + u * VW, b);
    }
  }
  for (; jv + VW <= n; jv += VW) {
    vf b[Q];
    for (int q = 0; q < Q; ++q) {
      gv_prefetch<DT, Q>(B.p, row + q * B.rs + jv);
      b[q] = gv_load_full<DT>(B.p, row + q * B.rs + jv);
    }
    step(jv, b);
  }
  if (jv < n) {
    vf b[Q];
    for (int q = 0; q < Q; ++q) b[q] = gv_load_part<DT>(B.p, row + q * B.rs + jv, n - jv);
    step(jv, b);
  }
}

// Block kb's chains (tb[r * ts + j], columns j0 .. j0 + n) written or added to C, or, with P, written to
// P + kb * R * N (the block's own chains, to be added to C in block order by the caller).
template <int R, int DT>
void gv_emit(const RG& g, int64_t kb, const float* tb, int64_t j0, int64_t n, int64_t ts, float* P) {
  const bool write = P || (kb == 0 && !g.add);
  const float alpha = P ? 1.0f : g.alpha;
  [[maybe_unused]] const int64_t np16 = gv_interleaved<DT>() && !gv_tiled<R>() ? n / 16 * 16 : 0;
  for (int r = 0; r < R; ++r) {
    float* c = P ? P + (kb * R + r) * g.N + j0 : g.C + r * g.ldc + j0;
    for (int64_t jv = 0; jv < n; jv += VW) {
      const int64_t cols = n - jv < VW ? n - jv : VW;
      vf val = vload(tb + r * ts + jv);
#if defined(__AVX2__) && LR_VW == 8
      if (jv < np16) {  // back from the interleaved order: (0-3, 8-11), (4-7, 12-15) -> 0-7, 8-15
        const __m256 lo = (__m256)vload(tb + r * ts + (jv & ~(int64_t)15));
        const __m256 hi = (__m256)vload(tb + r * ts + (jv & ~(int64_t)15) + VW);
        val = (vf)((jv & 15) ? _mm256_permute2f128_ps(lo, hi, 0x31) : _mm256_permute2f128_ps(lo, hi, 0x20));
      }
#endif
      if (write) {
        if (alpha != 1.0f) val = val * vset(alpha);
      } else {
        val = vload_part(c + jv, cols) + val;
      }
      vstore_part(c + jv, val, cols);
    }
  }
}

// Whether B's rows are short (under 4 KiB): a strip of their columns is read one row at a time too, as whole
// rows are; eight rows a pass over such pieces are eight short streams, which the prefetcher follows worse (f32's
// 576- and 960-wide rows of the 135m preset measured 21.6 -> 20.1 ms/token against a 2 KiB bound).
inline bool gv_short_rows(const RG& g) { return g.N * (g.B.dtype == kOpF32 ? 4 : 2) < 4096; }

// Three rows of C or more: rows k0 .. k0 + kc of B (one K block; columns j0 .. j0 + n) in sub-blocks of kGvSub
// rows, each walked by tiles of VT vectors of columns whose R x VT chains stay in registers over the sub-block's
// rows (loaded from t and stored back once a tile and sub-block); a k of a tile is one piece of a row of B,
// widened once for R rows, and A's value at (r, k) is broadcast from a transposed copy. Every element's chain
// is the same fma(a_k, b_k, c) in k order as gv_rows', so the bits are too (tested against the blocked GEMM at
// 3-17 rows). The tiles read B across rows, so the sub-block after the current one is prefetched in memory
// order, PL lines a k as the tiles consume them (the first one at once); during the last sub-block, where
// g.next_rows says which block the thread likely takes next, that block's first rows. Before, eight rows of B
// a pass updated chains in t (each chain's load and store serving eight FMAs, each a broadcast spilled to the
// stack). Zen 5, 2 threads, 135m bf16 in the decoding layout, 8 rows against 30 layers' weights from memory
// (GFLOPS, medians of alternating calls): gate_up 209 -> 293, down 220 -> 263, qkv 239 -> 268; DecodeSession,
// ms a step: batch 3 10.4 -> 9.5, 4 10.5 -> 9.7, 8 17.2 -> 14.1, 16 27.6 -> 23.7; f32 batch 4 19.7 -> 18.8, 8
// 23.7 -> 21.3 (medians of alternating rounds).
constexpr int64_t kGvSub = 16;
thread_local Scratch tls_gv_at;
template <int R, int DT>
void gv_tiles(const RG& g, const float* Ap, int64_t k0, int64_t kc, int64_t j0, int64_t n, float* t, int64_t ts) {
  // R x VT chains, VT vectors of B and a broadcast in registers (32 on AVX-512, 16 below)
  constexpr int VT = VW == 16 ? (R <= 4 ? 4 : 2) : (R <= 4 ? 2 : 1);
  constexpr int64_t S = kGvSub, es = DT == kOpF32 ? 4 : 2;
  constexpr int PL = VT * VW * es / 64 > 1 ? VT * VW * es / 64 : 1;  // lines of B a k of a tile reads
  float* at = tls_gv_at.get<float>((size_t)(kc * R));                // at[(k - k0) R + r] = A(r, k)
  for (int64_t k = 0; k < kc; ++k)
    for (int r = 0; r < R; ++r) at[k * R + r] = Ap[r * g.K + k0 + k];
  const int64_t pitch = g.B.rs * es, rowb = n * es;
  const char* base = (const char*)g.B.p + (k0 * g.B.rs + j0) * es;  // B(k0, j0)
  const bool linear = rowb == pitch;                                  // the rows' pieces are one run
  // The prefetch cursor: over one run, the next line lp (up to lend); over pieces, row pr (from k0), byte po.
  const char* lp = base;
  const char* lend = base;
  int64_t pr = 0, po = 0, plim = 0;
  auto prefetch = [&]() {
    if (linear) {
      if (lp < lend) {
        _mm_prefetch(lp, _MM_HINT_T0);
        lp += 64;
      }
    } else if (pr < plim) {
      _mm_prefetch(base + pr * pitch + po, _MM_HINT_T0);
      po += 64;
      if (po >= rowb) {
        po = 0;
        ++pr;
      }
    }
  };
  auto prefetch_rest = [&]() {
    if (linear)
      for (; lp < lend; lp += 64) _mm_prefetch(lp, _MM_HINT_T0);
    else
      while (pr < plim) prefetch();
  };
  lend = base + (S < kc ? S : kc) * pitch;
  plim = S < kc ? S : kc;
  prefetch_rest();
  for (int64_t ks = 0; ks < kc; ks += S) {
    const int64_t ke = ks + S < kc ? ks + S : kc;
    plim = ke + S < kc ? ke + S : kc;
    lend = base + plim * pitch;
    if (linear && ke == kc && g.next_rows > 0 && k0 + g.next_rows < g.K) {
      lp = base + g.next_rows * pitch;
      const int64_t rows = g.K - k0 - g.next_rows < S ? g.K - k0 - g.next_rows : S;
      lend = lp + rows * pitch;
    }
    int64_t jv = 0;
    for (; jv + VT * VW <= n; jv += VT * VW) {
      vf acc[R][VT];
      for (int r = 0; r < R; ++r)
        for (int v = 0; v < VT; ++v) acc[r][v] = vload(t + r * ts + jv + v * VW);
      const char* bp = base + ks * pitch + jv * es;
      const float* ak = at + ks * R;
      for (int64_t k = ks; k < ke; ++k, bp += pitch, ak += R) {
        vf b[VT];
        for (int v = 0; v < VT; ++v) b[v] = gv_load_full<DT>(bp, v * VW);
        for (int l = 0; l < PL; ++l) prefetch();
        for (int r = 0; r < R; ++r) {
          const vf a = vset(ak[r]);
          for (int v = 0; v < VT; ++v) acc[r][v] = vfma(a, b[v], acc[r][v]);
        }
      }
      for (int r = 0; r < R; ++r)
        for (int v = 0; v < VT; ++v) vstore(t + r * ts + jv + v * VW, acc[r][v]);
    }
    for (; jv < n; jv += VW) {  // the columns left, a vector (or part of one) at a time
      const int64_t cols = n - jv < VW ? n - jv : VW;
      vf acc[R];
      for (int r = 0; r < R; ++r) acc[r] = vload(t + r * ts + jv);
      for (int64_t k = ks; k < ke; ++k) {
        const char* bp = base + k * pitch + jv * es;
        const vf b = cols == VW ? gv_load_full<DT>(bp, 0) : gv_load_part<DT>(bp, 0, cols);
        for (int r = 0; r < R; ++r) acc[r] = vfma(vset(at[k * R + r]), b, acc[r]);
      }
      for (int r = 0; r < R; ++r) vstore(t + r * ts + jv, acc[r]);
    }
    prefetch_rest();
  }
}

// Columns j0 .. j0 + n of C over the K blocks kb0 .. kb1 - 1, each block's chains emitted (gv_emit) as it ends;
// t holds the chains of one block (R ts floats, ts = n rounded up to VW). Rows that are gv_tiled go by gv_tiles.
// Otherwise whole rows (a K block is one contiguous run of B) are read row after row as one stream, gv_prefetch
// ahead of it; a strip of long rows' columns, pieces far apart, eight rows a pass. Zen 5, 135m preset: the
// 3072-wide gate_up products of a step 3.25 -> 2.69 ms (bf16) and 5.14 -> 4.53 ms (f32) read one row at a time
// rather than eight; the strips of the 49152-wide head took 1.4x as long one at a time. (Two K blocks side by
// side, two streams a thread, read short rows 10-20% faster on Zen 3; on Zen 5 one stream with gv_prefetch
// reads them as fast: 8.05 and 8.59 ms the products of a bf16 step with pairs, 8.04 and 8.50 without.)
template <int R, int DT>
void gv_strip(const RG& g, const float* Ap, int64_t j0, int64_t n, int64_t KC, int64_t kb0, int64_t kb1, float* t,
              float* P) {
  const int64_t ts = (n + VW - 1) / VW * VW;  // t[r * ts + j]: the chains of row r
  const int64_t np16 = gv_interleaved<DT>() && !gv_tiled<R>() ? n / 16 * 16 : 0;
  // three rows or more read eight rows of B a pass even so: each chain's load and store in t then serves eight
  // rows, not one (135m bf16 DecodeSession, batches of 4, 6 and 8: 13.3, 18.9, 23.2 -> 12.1, 14.1, 17.4 ms a
  // step, medians of 6 alternating rounds; batches of 2 alike, and 1 slower, 8.6 against 7.7)
  const bool eight_rows = (!gv_short_rows(g) && n < g.N) || R >= 3;
  for (int64_t kb = kb0; kb < kb1; ++kb) {
    const int64_t k0 = kb * KC;
    const int64_t kc = g.K - k0 < KC ? g.K - k0 : KC;
    for (int64_t i = 0; i < R * ts; i += VW) vstore(t + i, vset(0.0f));
    if constexpr (gv_tiled<R>()) {
      gv_tiles<R, DT>(g, Ap, k0, kc, j0, n, t, ts);
    } else {
      int64_t k = k0;
      if (eight_rows)
        for (; k + 8 <= k0 + kc; k += 8) gv_rows<R, DT, 8>(g, Ap, k, k * g.B.rs + j0, n, np16, t, ts);
      for (; k < k0 + kc; ++k) gv_rows<R, DT, 1>(g, Ap, k, k * g.B.rs + j0, n, np16, t, ts);
    }
    gv_emit<R, DT>(g, kb, t, j0, n, ts, P);
  }
}

// The few-row kernels by dtype (f32, bf16, f16) and rows of C (1 .. kGemvRows): K::run<R, DT>.
using GvFn = void (*)(const RG&, const float*, int64_t, int64_t, int64_t, int64_t, int64_t, float*, float*);
template <class K, int DT, int... I>
constexpr std::array<GvFn, sizeof...(I)> gv_by_rows(std::integer_sequence<int, I...>) {
  return {&K::template run<I + 1, DT>...};
}
template <class K>
constexpr std::array<std::array<GvFn, kGemvRows>, 3> gv_table() {
  return {gv_by_rows<K, kOpF32>(std::make_integer_sequence<int, kGemvRows>{}),
          gv_by_rows<K, kOpBF16>(std::make_integer_sequence<int, kGemvRows>{}),
          gv_by_rows<K, kOpF16>(std::make_integer_sequence<int, kGemvRows>{})};
}
struct GvStripK {
  template <int R, int DT>
  static void run(const RG& g, const float* Ap, int64_t j0, int64_t n, int64_t KC, int64_t kb0, int64_t kb1, float* t,
                  float* P) {
    gv_strip<R, DT>(g, Ap, j0, n, KC, kb0, kb1, t, P);
  }
};
constexpr auto kGvStrips = gv_table<GvStripK>();

// A's M rows as f32, M x K (this thread's scratch).
const float* rg_rows_f32(const RG& g) {
  float* Ap = tls_rg_a.get<float>((size_t)(g.M * g.K + VW));
  for (int64_t r = 0; r < g.M; ++r) {
    if (g.A.cs == 1) {
      load_row(g.A.p, g.A.dtype, r * g.A.rs, g.K, Ap + r * g.K);
    } else {
      for (int64_t k = 0; k < g.K; ++k) Ap[r * g.K + k] = ld1dt(g.A.p, g.A.dtype, r * g.A.rs + k * g.A.cs);
    }
  }
  return Ap;
}

void rg_gemv_run(const RG& g, int threads);

// C (M <= kGemvRows rows) from B with B.cs == 1. A B in streamed memory (the decoding layout) has the threads
// read ahead what follows it: a thread done with its share while the other still works, and the workers
// between products.
void rg_gemv(const RG& g, int threads) {
  const int es = g.B.dtype == kOpF32 ? 4 : 2;
  stream_read_ahead(g.B.p, (size_t)(((g.K - 1) * g.B.rs + g.N) * es));
  rg_gemv_run(g, threads);
}

// rg_gemv's product: threads take whole K blocks (rows of B) or ranges of columns.
constexpr int64_t kRgCombineMin = 32768;  // elements of P a thread adds at least when the combine is split (below)
void rg_gemv_run(const RG& g, int threads) {
  const int64_t KC = blocked_kc();
  const float* Ap = rg_rows_f32(g);
  const int64_t nV = (g.N + VW - 1) / VW, nKB = (g.K + KC - 1) / KC;
  const double bytes = (double)g.N * (double)g.K * (g.B.dtype == kOpF32 ? 4 : 2);
  const int T = bytes < 128.0 * 1024 ? 1 : threads;
  const int di = g.B.dtype == kOpF32 ? 0 : g.B.dtype == kOpBF16 ? 1 : 2;
  const GvFn strip = kGvStrips[di][g.M - 1];
  const int64_t q = g.K / KC / T;  // whole K blocks per thread
  if (T > 1 && g.N > kGemvWide && gv_tiled_rows(g.M)) {
    // Rows that go by gv_tiles against a B wider than kGemvWide (the head): strips of kGemvStrip columns, each a
    // task over every K block in turn, handed out as they finish, its chains emitted to C as each block ends (as
    // one thread would), rather than the K blocks below, whose partial sums go through P. Zen 5, the 135m head
    // (bf16, 576 x 49152) from memory, medians of alternating calls: 3 rows 2455 -> 2124 us, 4 2294 -> 1968, 8
    // 3103 -> 2254, 16 6079 -> 4427 (the combine alone had taken 350 us of 8 rows' 2400); DecodeSession, ms a
    // step (medians of alternating rounds): batch 4 12.3 -> 11.1, 6 11.6 -> 11.1, 8 15.3 -> 14.1 (after 256
    // positions 13.3 -> 14.3 and 14.7 -> 14.9, the head itself 2.3-2.5 -> 1.9-2.1 ms), 12 22.2 -> 21.2, 16 34.2
    // -> 29.4; f32 batch 8 22.0 -> 21.5. 1 and 2 rows (gv_rows) were slower so (1761 -> 1879, 1542 -> 2091 us),
    // and products narrower than kGemvWide too (8 rows of the 576-wide o and down: 1166 -> 1502 and 2821 -> 3887
    // at strips of 256 columns).
    RG gt = g;
    gt.next_rows = KC;  // a strip's blocks one after another
    const int64_t nS = (g.N + kGemvStrip - 1) / kGemvStrip;
    par_tasks(nS, T, [&](int64_t s) {
      float* tb = tls_rg_b.get<float>((size_t)(kGemvRows * kGemvStrip + VW));
      const int64_t j0 = s * kGemvStrip;
      strip(gt, Ap, j0, g.N - j0 < kGemvStrip ? g.N - j0 : kGemvStrip, KC, 0, nKB, tb, nullptr);
    });
    return;
  }
  if (T > 1 && q >= 1) {
    // The threads take whole K blocks (contiguous runs of B's rows), a block a task, handed out as they finish,
    // rather than ranges of columns, which the prefetcher followed at half the speed. Rows wider than kGemvWide
    // go a strip of that many columns a task (eight rows a pass: gv_strip), so that the chains stay in L1/L2: the
    // 135m preset's 49152-wide head, split by columns before, took 8.93 against 9.46 ms/token (bf16 decode, 8 of
    // 10 alternating rounds faster) and 16.02 against 16.44 (f32). The short last block is shared by columns.
    // Each block's chains go to P and are added to C in block order, as one thread would, so the bits do not
    // depend on which thread took which block; a thread held up by the machine leaves its blocks to the other
    // (bf16 decode on a busy Zen 5 host: median 15.2 -> 13.4 ms/token, 8 of 12 rounds faster, against each
    // thread taking a fixed half; the same within noise on a quiet one).
    float* P = tls_rg_p.get<float>((size_t)(nKB * g.M * g.N + VW));
    const int64_t whole = g.K / KC, nS = (g.N + kGemvWide - 1) / kGemvWide;
    const int64_t colUnit = 16, nU = (g.N + colUnit - 1) / colUnit;
    const int64_t pieces = whole < nKB ? T : 0;  // of the short block, by columns
    RG gt = g;
    gt.next_rows = T * KC;  // blocks go to the threads in turn, as they finish
    par_tasks(whole * nS + pieces, T, [&](int64_t i) {
      float* tb = tls_rg_b.get<float>((size_t)(kGemvRows * (kGemvWide + VW)));
      if (i < whole * nS) {
        const int64_t kb = i / nS, c0 = i % nS * kGemvWide;
        strip(gt, Ap, c0, g.N - c0 < kGemvWide ? g.N - c0 : kGemvWide, KC, kb, kb + 1, tb, P);
        return;
      }
      const int64_t p = i - whole * nS, u0 = nU * p / T, u1 = nU * (p + 1) / T;
      const int64_t j1 = u1 * colUnit < g.N ? u1 * colUnit : g.N;
      for (int64_t c = u0 * colUnit; c < j1; c += kGemvWide)
        strip(gt, Ap, c, j1 - c < kGemvWide ? j1 - c : kGemvWide, KC, whole, nKB, tb, P);
    });
    // The blocks' chains added to C in block order, split by columns across the threads once there are many
    // (rows of a batch; each element's sum the same either way). On one thread, 8 rows of the 135m gate_up
    // spent 12 of their 172 us here. DecodeSession 135m bf16, batch 8: 16.6 / 15.9 / 20.2 -> 16.1 / 14.7 / 17.7
    // ms a step (three runs, medians of alternating rounds); batch 16 within noise (26.5 / 31.1 / 30.7 against
    // 27.1 / 30.9 / 31.3). One row's combine (a few thousand elements) stays on the calling thread.
    const int64_t grain = (kRgCombineMin + g.M * nKB * VW - 1) / (g.M * nKB * VW);
    par_ranges(nV, T, grain, [&](int64_t v0, int64_t v1) {
      const int64_t j1 = v1 * VW < g.N ? v1 * VW : g.N;
      for (int64_t r = 0; r < g.M; ++r) {
        float* c = g.C + r * g.ldc;
        for (int64_t j = v0 * VW; j < j1; j += VW) {
          const int64_t cols = j1 - j < VW ? j1 - j : VW;
          vf val = vload_part(P + r * g.N + j, cols);
          if (g.add) val = vload_part(c + j, cols) + val;
          for (int64_t kb = 1; kb < nKB; ++kb) val = val + vload_part(P + (kb * g.M + r) * g.N + j, cols);
          vstore_part(c + j, val, cols);
        }
      }
    });
    return;
  }
  RG gt = g;
  gt.next_rows = KC;  // each thread's columns over every block in turn
  par_ranges(nV, T, 1, [&](int64_t v0, int64_t v1) {
    float* t = tls_rg_b.get<float>((size_t)(kGemvRows * kGemvStrip + VW));
    const int64_t j1 = v1 * VW < g.N ? v1 * VW : g.N;
    for (int64_t j0 = v0 * VW; j0 < j1; j0 += kGemvStrip) {
      const int64_t n = j1 - j0 < kGemvStrip ? j1 - j0 : kGemvStrip;
      strip(gt, Ap, j0, n, KC, 0, nKB, t, nullptr);
    }
  });
}

// ---- few rows against B stored along k (a weight [N, K] in its natural layout, B(k, j) at j * cs + k) -----
//
// The chains of rg_tile once more (per element of C: FMAs over k in order, from 0 at each KC block, the blocks'
// chains added in order), for a B whose columns are contiguous runs of k: the rows of an [out, in] weight that
// was not put in the decoding layout (decoding up to eight sequences with a model as it trains, or any model
// without useDecodeLayout). Threads take runs of panels (VW weight rows, next to each other in memory); each
// chunk of a panel (VW rows x VW k) is transposed in registers so that a vector holds one k of VW columns of C,
// and the chains stay in registers. Before, each call packed B for rg_tile (rg_run below). Zen 5, 2 threads,
// 135m preset in bf16 without the decoding layout, greedy decoding after a 256-token prompt: 54 against 17
// ms/token. From memory the rows of the head [49152, 576] read at 31 GB/s, as fast as the decoding layout's
// head in the same run (runs of 4 MiB; 17 GB/s in runs of 64 KiB, each thread's run a stream the prefetchers
// lose), the other products of a step at 24 against 34 (short runs, q, k, v, gate and up each its own).

// A chunk: the VW rows row0 .. row0 + VW - 1 of B's storage (each ld elements apart; rows past `rows` read as
// the last one) at elements k .. k + kn - 1 (kn <= VW), transposed: get(j) = element k + j of the VW rows as f32
// lanes in row order. The generic form goes through a buffer (load_block_t).
template <int DT>
struct GrChunk {
  alignas(64) float buf[VW * VW];
  __attribute__((always_inline)) inline void load(const void* p, int64_t ld, int64_t row0, int64_t rows, int64_t k,
                                                  int64_t kn) {
    load_block_t(p, DT, row0 * ld + k, ld, rows, kn, buf, VW, VW);
  }
  __attribute__((always_inline)) inline vf get(int j) const { return vload(buf + j * VW); }
};
#if defined(__AVX512F__) && LR_VW == 16
// The first kn (<= 16) lanes, and row i of a chunk's 16 (the last of `rows` for those past it).
inline __mmask16 gr_kmask(int64_t kn) { return (__mmask16)(kn >= 16 ? 0xffff : (1u << kn) - 1); }
inline int64_t gr_row(int64_t row0, int64_t i, int64_t rows) { return row0 + (i < rows ? i : rows - 1); }

// bf16: eight vectors Z[m] of two rows side by side (rows m and m + 4 for m < 4, m + 4 and m + 8 after), then
// unpacks of 16 and 32 bits and a 128-bit lane shuffle leave Y[j / 2] holding, in 64-bit halves, the 16 rows at
// k + j and k + j + 1 (rows in order); get() widens one half to f32 with an unpack against zero. 40 shuffles a
// chunk.
template <>
struct GrChunk<kOpBF16> {
  __m512i Y[8];
  __attribute__((always_inline)) inline void load(const void* p, int64_t ld, int64_t row0, int64_t rows, int64_t k,
                                                  int64_t kn) {
    const uint16_t* b = (const uint16_t*)p + k;
    auto row = [&](int64_t i) { return _mm256_maskz_loadu_epi16(gr_kmask(kn), b + gr_row(row0, i, rows) * ld); };
    __m512i Z[8], T[8];
    for (int m = 0; m < 8; ++m) {
      const int64_t lo = m < 4 ? m : m + 4;
      Z[m] = _mm512_inserti64x4(_mm512_castsi256_si512(row(lo)), row(lo + 4), 1);
    }
    for (int q = 0; q < 4; ++q) {
      T[2 * q] = _mm512_unpacklo_epi16(Z[2 * q], Z[2 * q + 1]);
      T[2 * q + 1] = _mm512_unpackhi_epi16(Z[2 * q], Z[2 * q + 1]);
    }
    for (int g = 0; g < 2; ++g)
      for (int h = 0; h < 2; ++h) {
        Z[(g * 2 + h) * 2] = _mm512_unpacklo_epi32(T[4 * g + h], T[4 * g + 2 + h]);
        Z[(g * 2 + h) * 2 + 1] = _mm512_unpackhi_epi32(T[4 * g + h], T[4 * g + 2 + h]);
      }
    for (int h = 0; h < 2; ++h)
      for (int lh = 0; lh < 2; ++lh) {
        Y[h * 2 + lh] = _mm512_shuffle_i64x2(Z[h * 2 + lh], Z[(2 + h) * 2 + lh], 0x88);
        Y[(2 + h) * 2 + lh] = _mm512_shuffle_i64x2(Z[h * 2 + lh], Z[(2 + h) * 2 + lh], 0xDD);
      }
  }
  __attribute__((always_inline)) inline vf get(int j) const {
    const __m512i z = _mm512_setzero_si512();
    return (vf)_mm512_castsi512_ps((j & 1) ? _mm512_unpackhi_epi16(z, Y[j >> 1]) : _mm512_unpacklo_epi16(z, Y[j >> 1]));
  }
};
template <>
struct GrChunk<kOpF32> {
  vf F[16];
  __attribute__((always_inline)) inline void load(const void* p, int64_t ld, int64_t row0, int64_t rows, int64_t k,
                                                  int64_t kn) {
    __m512 r[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_maskz_loadu_ps(gr_kmask(kn), (const float*)p + gr_row(row0, i, rows) * ld + k);
    transpose16(r);
    for (int i = 0; i < 16; ++i) F[i] = (vf)r[i];
  }
  __attribute__((always_inline)) inline vf get(int j) const { return F[j]; }
};
#endif

// acc[q][r] = fma(a_r(k + j), chunk q (j), acc[q][r]) for j = J... in order, the PG chunks' chains side by side.
template <int R, int PG, class Ch, int... J>
__attribute__((always_inline)) inline void gr_fmas(const Ch* ch, const float* Ap, int64_t K, int64_t k, vf (*acc)[R],
                                                   std::integer_sequence<int, J...>) {
  auto one = [&](int j) {
    vf a[R];
    for (int r = 0; r < R; ++r) a[r] = vset(Ap[r * K + k + j]);
    for (int q = 0; q < PG; ++q) {
      const vf b = ch[q].get(j);
      for (int r = 0; r < R; ++r) acc[q][r] = vfma(a[r], b, acc[q][r]);
    }
  };
  (one(J), ...);
}

// Panels p0 .. p0 + PG - 1 (columns p * VW .. of C, rows of B) for R rows of C: PG panels at a time, so that PG x
// R chains are in flight. As each chunk is read, as many lines of the PG panels after these are prefetched
// (T0; bf16 runs of a step's products measured without it at half the speed; further ahead or into L2 slower).
template <int R, int DT, int PG>
void gr_group(const RG& g, const float* Ap, int64_t KC, int64_t p0) {
  using Ch = GrChunk<DT>;
  constexpr int es = DT == kOpF32 ? 4 : 2;
  const int64_t ld = g.B.cs, K = g.K;
  int64_t j0[PG], rows[PG];
  for (int q = 0; q < PG; ++q) {
    j0[q] = (p0 + q) * VW;
    rows[q] = g.N - j0[q] < VW ? g.N - j0[q] : VW;
  }
  vf c[PG][R], acc[PG][R];
  for (int q = 0; q < PG; ++q)
    for (int r = 0; r < R; ++r) acc[q][r] = c[q][r] = vset(0.0f);
  // the panels' next PG (ahead of them in memory when rows are contiguous), a chunk's worth of lines per chunk
  const char* pf = (const char*)g.B.p + (j0[0] + PG * VW) * ld * es;
  constexpr int64_t chunk_bytes = (int64_t)VW * VW * es * PG;
  int64_t kb = 0, nb = KC < K ? KC : K;
  for (int64_t k = 0; k < K; k += VW) {
    const int64_t kn = K - k < VW ? K - k : VW;
#if defined(__SSE__)
    for (int64_t o = 0; o < chunk_bytes; o += 64)
      _mm_prefetch((const char*)((uintptr_t)pf + (uintptr_t)(k / VW * chunk_bytes + o)), _MM_HINT_T0);
#endif
    Ch ch[PG];
    for (int q = 0; q < PG; ++q) ch[q].load(g.B.p, ld, j0[q], rows[q], k, kn);
    if (kn == VW && nb - k > VW) {
      gr_fmas<R, PG>(ch, Ap, K, k, acc, std::make_integer_sequence<int, VW>{});
      continue;
    }
    // the last chunk, or one in which a KC block ends: element by element
    for (int j = 0; j < kn; ++j) {
      for (int q = 0; q < PG; ++q) {
        const vf b = ch[q].get(j);
        for (int r = 0; r < R; ++r) acc[q][r] = vfma(vset(Ap[r * K + k + j]), b, acc[q][r]);
      }
      if (k + j + 1 != nb) continue;
      for (int q = 0; q < PG; ++q)
        for (int r = 0; r < R; ++r) {
          if (kb > 0) {
            c[q][r] = c[q][r] + acc[q][r];
          } else if (g.add) {
            c[q][r] = vload_part(g.C + r * g.ldc + j0[q], rows[q]) + acc[q][r];
          } else {
            c[q][r] = g.alpha != 1.0f ? acc[q][r] * vset(g.alpha) : acc[q][r];
          }
          acc[q][r] = vset(0.0f);
        }
      ++kb;
      nb = nb + KC < K ? nb + KC : K;
    }
  }
  for (int q = 0; q < PG; ++q)
    for (int r = 0; r < R; ++r) vstore_part(g.C + r * g.ldc + j0[q], c[q][r], rows[q]);
}

// Panels per pass: chains enough to keep the FMAs busy (a chunk's FMAs wait on the chunk before), few enough
// that the chunks stay in registers.
template <int R, int DT>
constexpr int gr_pg() {
#if defined(__AVX512F__) && LR_VW == 16
  return DT == kOpBF16 && R == 1 ? 2 : 1;
#else
  return 1;
#endif
}

template <int R, int DT>
void gr_panels(const RG& g, const float* Ap, int64_t KC, int64_t p0, int64_t p1) {
  constexpr int PG = gr_pg<R, DT>();
  int64_t p = p0;
  for (; p + PG <= p1; p += PG) gr_group<R, DT, PG>(g, Ap, KC, p);
  for (; p < p1; ++p) gr_group<R, DT, 1>(g, Ap, KC, p);
}

struct GrPanelsK {
  template <int R, int DT>
  static void run(const RG& g, const float* Ap, int64_t KC, int64_t p0, int64_t p1) {
    gr_panels<R, DT>(g, Ap, KC, p0, p1);
  }
};
using GrFn = void (*)(const RG&, const float*, int64_t, int64_t, int64_t);
template <int DT, int... I>
constexpr std::array<GrFn, sizeof...(I)> gr_by_rows(std::integer_sequence<int, I...>) {
  return {&GrPanelsK::run<I + 1, DT>...};
}
constexpr std::array<std::array<GrFn, kGemvRows>, 3> kGrPanels = {
    gr_by_rows<kOpF32>(std::make_integer_sequence<int, kGemvRows>{}),
    gr_by_rows<kOpBF16>(std::make_integer_sequence<int, kGemvRows>{}),
    gr_by_rows<kOpF16>(std::make_integer_sequence<int, kGemvRows>{})};

// C (M <= kGemvRows rows) from B with B.rs == 1: threads take runs of panels as they finish (a thread held up by
// the machine leaves its share to the other).
void rg_rows(const RG& g, int threads) {
  const int es = g.B.dtype == kOpF32 ? 4 : 2;
  const int64_t KC = blocked_kc();
  const float* Ap = rg_rows_f32(g);
  const double bytes = (double)g.N * (double)g.K * es;
  const int T = bytes < 128.0 * 1024 ? 1 : threads;
  const GrFn fn = kGrPanels[g.B.dtype == kOpF32 ? 0 : g.B.dtype == kOpBF16 ? 1 : 2][g.M - 1];
  const int64_t nP = (g.N + VW - 1) / VW;
  // runs of panels: two a thread, of 64 KiB to 4 MiB, an even number of panels (gr_pg's passes of two leave
  // none over)
  int64_t rb = (int64_t)(bytes / (2.0 * T));
  rb = rb < (64 << 10) ? (64 << 10) : rb > (4 << 20) ? (4 << 20) : rb;
  int64_t run = rb / ((int64_t)VW * g.K * es) / 2 * 2;
  run = run < 2 ? 2 : run;
  par_tasks((nP + run - 1) / run, T, [&](int64_t i) { fn(g, Ap, KC, i * run, (i + 1) * run < nP ? (i + 1) * run : nP); });
}

// The blocked GEMM's arithmetic with small tiles (for M <= 16 or N <= 16). Threads split the column panels
// (few rows) or the row groups (few columns); each element's chain is the same either way.
void rg_run(const RG& g, int threads) {
  if (g.M <= 0 || g.N <= 0 || g.K <= 0) return;
  if (g.B.cs == 1 || g.B.rs == 1) {
    // few rows (up to kPassRows: a pass of the few-row path each kGemvRows, B read once a pass)
    if (g.M > kGemvRows && g.M <= kPassRows) {
      RG h = g;
      h.M = kGemvRows;
      rg_run(h, threads);
      h.M = g.M - kGemvRows;
      h.A.p = (const char*)g.A.p + kGemvRows * g.A.rs * (g.A.dtype == kOpF32 ? 4 : 2);
      h.C = g.C + kGemvRows * g.ldc;
      rg_run(h, threads);
      return;
    }
    if (g.M <= kGemvRows) {
      if (g.B.cs == 1)
        rg_gemv(g, threads);
      else
        rg_rows(g, threads);
      return;
    }
  }
  const int64_t KC = blocked_kc();
  const int64_t nJ = (g.N + NJ - 1) / NJ, nG = (g.M + RMAX - 1) / RMAX;
  const bool by_cols = nJ >= nG;
  const double flops = 2.0 * (double)g.M * (double)g.N * (double)g.K;
  int T = flops < 1.0e6 ? 1 : threads;
  if (by_cols) {
    // Few rows: A (M <= 16 rows) packed once per thread, whole K; threads take column panels.
    par_ranges(nJ, T, 1, [&](int64_t p0, int64_t p1) {
      float* Ap = tls_rg_a.get<float>((size_t)(nG * g.K * RMAX + VW));
      float* Bp = tls_rg_b.get<float>((size_t)(KC * NJ + VW));
      for (int64_t gi = 0; gi < nG; ++gi) {
        const int64_t rows = g.M - gi * RMAX < RMAX ? g.M - gi * RMAX : RMAX;
        rg_pack_a(g, gi * RMAX, rows, 0, g.K, Ap + gi * g.K * RMAX);
      }
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t j0 = p * NJ;
        const int64_t ncols = g.N - j0 < NJ ? g.N - j0 : NJ;
        for (int64_t k0 = 0; k0 < g.K; k0 += KC) {
          const int64_t kc = g.K - k0 < KC ? g.K - k0 : KC;
          rg_pack_b(g, k0, kc, j0, Bp);
          const bool write = k0 == 0 && !g.add;
          for (int64_t gi = 0; gi < nG; ++gi) {
            const int64_t rows = g.M - gi * RMAX < RMAX ? g.M - gi * RMAX : RMAX;
            rg_tile_any(rows, kc, Ap + gi * g.K * RMAX + k0 * RMAX, 1, RMAX, Bp, g.C + gi * RMAX * g.ldc + j0, g.ldc,
                        ncols, write, g.alpha);
          }
        }
      }
    });
    return;
  }
  // Few columns (N <= 32 here): threads take row groups; B panels are packed per thread and K block. An f32
  // A is read where it lies (each of its values is used for only NJ columns: packing it cost as much as the FMAs).
  const bool direct = g.A.dtype == kOpF32;
  par_ranges(nG, T, 1, [&](int64_t g0, int64_t g1) {
    float* Ap = tls_rg_a.get<float>((size_t)(KC * RMAX + VW));
    float* Bp = tls_rg_b.get<float>((size_t)(nJ * KC * NJ + VW));
    for (int64_t k0 = 0; k0 < g.K; k0 += KC) {
      const int64_t kc = g.K - k0 < KC ? g.K - k0 : KC;
      for (int64_t p = 0; p < nJ; ++p) rg_pack_b(g, k0, kc, p * NJ, Bp + p * KC * NJ);
      const bool write = k0 == 0 && !g.add;
      for (int64_t gi = g0; gi < g1; ++gi) {
        const int64_t rows = g.M - gi * RMAX < RMAX ? g.M - gi * RMAX : RMAX;
        const float* a = Ap;
        int64_t ars = 1, aks = RMAX;
        if (direct) {
          a = (const float*)g.A.p + gi * RMAX * g.A.rs + k0 * g.A.cs;
          ars = g.A.rs;
          aks = g.A.cs;
        } else {
          rg_pack_a(g, gi * RMAX, rows, k0, kc, Ap);
        }
        for (int64_t p = 0; p < nJ; ++p) {
          const int64_t ncols = g.N - p * NJ < NJ ? g.N - p * NJ : NJ;
          rg_tile_any(rows, kc, a, ars, aks, Bp + p * KC * NJ, g.C + gi * RMAX * g.ldc + p * NJ, g.ldc, ncols, write,
                      g.alpha);
        }
      }
    }
  });
}

inline int op_elsize(int dt) { return dt == kF32 ? 4 : 2; }

// C = beta C over the M x N window (beta 0 writes zeros: C is not read).
void scale_window(float* C, int64_t ldc, int64_t M, int64_t N, float beta) {
  for (int64_t i = 0; i < M; ++i) {
    float* c = C + i * ldc;
    if (beta == 0.0f) {
      for (int64_t j = 0; j < N; ++j) c[j] = 0.0f;
    } else {
      for (int64_t j = 0; j < N; ++j) c[j] *= beta;
    }
  }
}

// Routes one (batched) GEMM call with the row-invariant semantics described at the top of this file.
void gemm_rows_k(const RowGemm& rgm, int threads) {
  GemmCall g = rgm.g;
  const int64_t batch = rgm.batch;
  if (g.M <= 0 || g.N <= 0 || batch <= 0) return;
  auto cmat = [&](int64_t b) { return g.C + b * rgm.sc; };
  if (g.K <= 0 || g.alpha == 0.0f) {
    for (int64_t b = 0; b < batch; ++b) scale_window(cmat(b), g.ldc, g.M, g.N, g.beta == 0.0f ? 0.0f : g.beta);
    return;
  }
  if (g.beta != 0.0f && g.beta != 1.0f) {
    for (int64_t b = 0; b < batch; ++b) scale_window(cmat(b), g.ldc, g.M, g.N, g.beta);
    g.beta = 1.0f;
  }
  const int64_t KC = blocked_kc();
  int64_t sb = rgm.sb;
  float* folded = nullptr;
  if (g.alpha != 1.0f && (g.beta == 1.0f || g.K > KC)) {
    // b' = alpha b (rounded), dense [K, N] per distinct B matrix; then alpha = 1
    const int64_t nb = sb == 0 ? 1 : batch;
    folded = (float*)aligned_alloc(64, (size_t)(((nb * g.K * g.N * 4) + 63) / 64 * 64 + 64));
    if (!folded) abort();
    const float alpha = g.alpha;
    const Operand B0 = g.B;
    const int es = op_elsize(B0.dtype);
    par_ranges(nb * g.K, threads, 64, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / g.K, k = r % g.K;
        const void* bp = (const char*)B0.p + b * sb * es;
        float* d = folded + r * g.N;
        if (B0.cs == 1) {
          load_row(bp, B0.dtype, k * B0.rs, g.N, d);
        } else {
          for (int64_t j = 0; j < g.N; ++j) d[j] = ld1dt(bp, B0.dtype, k * B0.rs + j * B0.cs);
        }
        for (int64_t j = 0; j < g.N; ++j) d[j] = alpha * d[j];
      }
    });
    g.B = Operand{folded, kF32, g.N, 1};
    sb = sb == 0 ? 0 : g.K * g.N;
    g.alpha = 1.0f;
  }
  const bool passes = (g.B.cs == 1 || g.B.rs == 1) && g.M <= kPassRows;  // rg_run's few-row passes
  if (g.M > kSkinnyMax && g.N > kSkinnyMax && !passes) {
    BatchedCall bc;
    bc.g = g;
    bc.batch = batch;
    bc.sa = rgm.sa;
    bc.sb = sb;
    bc.sc = rgm.sc;
    LR_GEMM_IMPL()->gemm_batched(bc, threads);
  } else {
    const int esA = op_elsize(g.A.dtype), esB = op_elsize(g.B.dtype);
    auto one = [&](int64_t b, int th) {
      RG r;
      r.M = g.M;
      r.N = g.N;
      r.K = g.K;
      r.A = g.A;
      r.A.p = (const char*)g.A.p + b * rgm.sa * esA;
      r.B = g.B;
      r.B.p = (const char*)g.B.p + b * sb * esB;
      r.C = cmat(b);
      r.ldc = g.ldc;
      r.alpha = g.alpha;
      r.add = g.beta == 1.0f;
      rg_run(r, th);
    };
    const double flops = 2.0 * (double)g.M * (double)g.N * (double)g.K;
    if (batch >= threads && threads > 1 && flops < 4.0e7) {
      par_ranges(batch, threads, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) one(b, 1);
      });
    } else {
      for (int64_t b = 0; b < batch; ++b) one(b, threads);
    }
  }
  free(folded);
}

}  // namespace
