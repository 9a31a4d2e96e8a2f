// 4-bit (bitsandbytes NF4/FP4) weight kernels. A product with a 4-bit weight is computed with the same
// per-element arithmetic as the row-invariant GEMM applied to the dequantized weight (value = code[nibble] *
// absmax, rounded to f32, exactly as bitsandbytes and the reference dequantize), so a row's output does not
// depend on how many rows share the call either:
//   m > 16 (prefill, training): tiles of weight rows are unpacked into a small f32 scratch and multiplied by
//     the blocked GEMM (compute-bound; the unpacking is amortised over m rows);
//   m <= 16 (decoding): on AVX-512, a fused kernel reads the packed weight once: up to 64 weight rows at a
//     time (copied as one sequential stream, then their 4-byte words transposed per K block so one step is
//     one 64-byte load of 8 codes x 16 rows), codes looked up in a 16-entry register table (vpermps), scaled
//     per block and accumulated in the GEMM's KC-block FMA chains. The weight streams from memory at 0.5 byte
//     per element instead of 4 (f32) or 2 (bf16): measured 4.1-4.3x faster than the f32 GEMV on 4096x4096 and
//     8192x2048 (bench/ops.ts).
// The input gradient dx = g W unpacks slabs of KC weight rows (so the K blocks are the GEMM's own) by column
// chunks; no full-precision copy of the weight ever exists.

namespace {

inline float block_scale(const W4Args& w, int64_t blk) {
  if (w.absmax) return w.absmax[blk];
  const float t = w.nested_code[w.qabs[blk]] * w.nested_absmax[blk / w.nbs];
  return (float)((double)t + w.offset);
}

// Unpacks flat elements [start, end) into out.
void decode_span(const W4Args& w, int64_t start, int64_t end, float* out) {
  int64_t i = start;
  float tbl[16];
  while (i < end) {
    const int64_t blk = i / w.bs;
    const float s = block_scale(w, blk);
    for (int j = 0; j < 16; ++j) tbl[j] = w.code[j] * s;
    const int64_t seg = end < (blk + 1) * w.bs ? end : (blk + 1) * w.bs;
    if ((i & 1) && i < seg) {
      *out++ = tbl[w.packed[i >> 1] & 15];
      ++i;
    }
    for (; i + 1 < seg; i += 2) {
      const uint8_t v = w.packed[i >> 1];
      *out++ = tbl[v >> 4];
      *out++ = tbl[v & 15];
    }
    if (i < seg) {
      *out++ = tbl[w.packed[i >> 1] >> 4];
      ++i;
    }
  }
}

void dequant4bit_k(const W4Args& w, int64_t row0, int64_t count, float* out, int threads) {
  const int64_t K = w.cols;
  par_ranges(count, threads, K >= 16384 ? 1 : 16384 / (K + 1) + 1, [&](int64_t r0, int64_t r1) {
    decode_span(w, (row0 + r0) * K, (row0 + r1) * K, out + r0 * K);
  });
}

thread_local Scratch tls_q;

// y[:, n0:n0+nt] = x W[n0:n0+nt]^T through an unpacked tile and the row-invariant GEMM.
void gemm4_tiles(const float* x, const W4Args& w, float* y, int64_t m, int threads) {
  const int64_t N = w.rows, K = w.cols;
  int64_t NT = (2 << 20) / (4 * (K > 0 ? K : 1));
  NT = NT < 32 ? 32 : NT / 32 * 32;
  if (NT > N) NT = N;
  float* tile = (float*)aligned_alloc(64, (size_t)((NT * K * 4 + 63) / 64 * 64 + 64));
  if (!tile) abort();
  for (int64_t n0 = 0; n0 < N; n0 += NT) {
    const int64_t nt = N - n0 < NT ? N - n0 : NT;
    W4Args ww = w;
    par_ranges(nt, threads, 8, [&](int64_t r0, int64_t r1) { decode_span(ww, (n0 + r0) * K, (n0 + r1) * K, tile + r0 * K); });
    RowGemm rg;
    rg.g.M = m;
    rg.g.N = nt;
    rg.g.K = K;
    rg.g.alpha = 1.0f;
    rg.g.beta = 0.0f;
    rg.g.A = Operand{x, kF32, K, 1};
    rg.g.B = Operand{tile, kF32, 1, K};
    rg.g.C = y + n0;
    rg.g.ldc = N;
    rg.batch = 1;
    rg.sa = rg.sb = rg.sc = 0;
    gemm_rows_k(rg, threads);
  }
  free(tile);
}

#if defined(__AVX512F__) && LR_VW == 16
// 16 weight rows [n0, n0 + 16) (rows past N repeat row N - 1 and are not stored).
struct Tile4 {
  int64_t n0;
  int64_t rowsel[16];
  __m512i vrb;  // first block index of each row
  __mmask16 mask;
};

inline void tile4_init(Tile4& t, const W4Args& w, int64_t n0) {
  const int64_t N = w.rows, K = w.cols, bpr = K / w.bs;
  alignas(64) int32_t rb[16];
  t.n0 = n0;
  for (int i = 0; i < 16; ++i) {
    t.rowsel[i] = n0 + i < N ? n0 + i : N - 1;
    rb[i] = (int32_t)(t.rowsel[i] * bpr);
  }
  t.vrb = _mm512_load_si512((const void*)rb);
  t.mask = (__mmask16)(N - n0 >= 16 ? 0xffff : (1u << (N - n0)) - 1);
}

// The 16 rows' scales of block blk, gathered (the u8 codes are gathered 4 bytes at a time, so not in the last
// 3 blocks, which take the scalar path).
inline __m512 tile4_scales(const Tile4& t, const W4Args& w, int64_t blk, int nbs_shift) {
  const int64_t bpr = w.cols / w.bs;
  const __m512i bi = _mm512_add_epi32(t.vrb, _mm512_set1_epi32((int)blk));
  if (w.absmax) return _mm512_i32gather_ps(bi, w.absmax, 4);
  if (nbs_shift >= 0 && t.rowsel[15] * bpr + blk + 3 < w.rows * bpr) {
    const __m512i q = _mm512_and_si512(_mm512_i32gather_epi32(bi, w.qabs, 1), _mm512_set1_epi32(255));
    const __m512 s = _mm512_mul_ps(_mm512_i32gather_ps(q, w.nested_code, 4),
                                   _mm512_i32gather_ps(_mm512_srli_epi32(bi, nbs_shift), w.nested_absmax, 4));
    const __m512d off = _mm512_set1_pd(w.offset);
    const __m256 lo = _mm512_cvtpd_ps(_mm512_add_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(s)), off));
    const __m256 hi =
        _mm512_cvtpd_ps(_mm512_add_pd(_mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(s), 1))), off));
    return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_castps256_ps512(lo)), _mm256_castps_pd(hi), 1));
  }
  alignas(64) float sc[16];
  for (int i = 0; i < 16; ++i) sc[i] = block_scale(w, t.rowsel[i] * bpr + blk);
  return _mm512_load_ps(sc);
}

// m (M <= 16) rows of x against TT tiles of 16 weight rows [n0, n0 + 16 TT) at once: TT independent FMA
// chains per x row, so a decode (M = 1) is not bound by the latency of one chain.
template <int M, int TT>
void gemv4_tiles(const float* x, const W4Args& w, float* y, int64_t n0, int64_t KC, const __m512 lut, int nbs_shift) {
  const int64_t N = w.rows, K = w.cols, bs = w.bs;
  Tile4 tl[TT];
  for (int u = 0; u < TT; ++u) tile4_init(tl[u], w, n0 + 16 * u);
  // The 16 TT rows are copied into an L2-resident buffer first (one sequential stream: rows are contiguous),
  // then, per K block, each tile's words are transposed so that the 4 bytes (8 codes) of its 16 rows for one
  // step are one contiguous 64-byte load: no gathers, and no 16 TT streams or pages touched per step.
  const int64_t rb = K / 2;
  const int64_t nrows = N - n0 < 16 * TT ? N - n0 : 16 * TT;
  const int64_t KCW = KC / 8;
  uint8_t* buf = tls_q.get<uint8_t>((size_t)(TT * 16 * rb + TT * KCW * 64 + 128));
  uint32_t* tw = (uint32_t*)(((uintptr_t)(buf + TT * 16 * rb) + 63) & ~(uintptr_t)63);
  memcpy(buf, w.packed + n0 * rb, (size_t)(nrows * rb));
  for (int64_t r = nrows; r < 16 * TT; ++r) memcpy(buf + r * rb, w.packed + (N - 1) * rb, (size_t)rb);
  for (int64_t k0 = 0; k0 < K; k0 += KC) {
    const int64_t k1 = K - k0 < KC ? K : k0 + KC;
    const int64_t nw = (k1 - k0) / 8;
    for (int u = 0; u < TT; ++u)
      for (int64_t wb = 0; wb < nw; wb += 16)
        load_block_t(buf, kOpF32, (u * 16 * rb + k0 / 2) / 4 + wb, rb / 4, 16, nw - wb < 16 ? nw - wb : 16,
                     (float*)(tw + (u * KCW + wb) * 16), 16, 16);
    __m512 acc[TT][M];
    for (int u = 0; u < TT; ++u)
      for (int i = 0; i < M; ++i) acc[u][i] = _mm512_setzero_ps();
    int64_t k = k0;
    while (k < k1) {
      const int64_t blk = k / bs;
      const int64_t kend = (blk + 1) * bs < k1 ? (blk + 1) * bs : k1;
      __m512 sv[TT];
      for (int u = 0; u < TT; ++u) sv[u] = tile4_scales(tl[u], w, blk, nbs_shift);
      for (; k < kend; k += 8) {
        __m512i wd[TT];
        for (int u = 0; u < TT; ++u) wd[u] = _mm512_load_si512((const void*)(tw + (u * KCW + (k - k0) / 8) * 16));
        // vpermps reads only the low 4 bits of each index: shifting the wanted nibble down is enough
#define LR_STEP(t, sh)                                                                                     \
  for (int u = 0; u < TT; ++u) {                                                                           \
    const __m512 wv = _mm512_mul_ps(_mm512_permutexvar_ps(sh ? _mm512_srli_epi32(wd[u], sh) : wd[u], lut), sv[u]); \
    for (int i = 0; i < M; ++i) acc[u][i] = _mm512_fmadd_ps(_mm512_set1_ps(x[i * K + k + t]), wv, acc[u][i]); \
  }
        LR_STEP(0, 4)
        LR_STEP(1, 0)
        LR_STEP(2, 12)
        LR_STEP(3, 8)
        LR_STEP(4, 20)
        LR_STEP(5, 16)
        LR_STEP(6, 28)
        LR_STEP(7, 24)
#undef LR_STEP
      }
    }
    for (int u = 0; u < TT; ++u)
      for (int i = 0; i < M; ++i) {
        float* yo = y + i * N + tl[u].n0;
        __m512 v = acc[u][i];
        if (k0 > 0) v = _mm512_add_ps(_mm512_maskz_loadu_ps(tl[u].mask, yo), v);
        _mm512_mask_storeu_ps(yo, tl[u].mask, v);
      }
  }
}

template <int M>
void gemv4_run(const float* x, const W4Args& w, float* y, int threads) {
  constexpr int TT = M <= 3 ? 4 : M <= 7 ? 2 : 1;
  const int64_t KC = blocked_kc();
  const __m512 lut = _mm512_loadu_ps(w.code);
  int nbs_shift = -1;
  for (int sh = 0; sh < 31; ++sh)
    if (((int64_t)1 << sh) == w.nbs) nbs_shift = sh;
  const int64_t tiles = (w.rows + 15) / 16;
  const int64_t groups = (tiles + TT - 1) / TT;
  par_ranges(groups, (double)w.rows * (double)w.cols < 65536.0 ? 1 : threads, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t t0 = g * TT;
      if (t0 + TT <= tiles) {
        gemv4_tiles<M, TT>(x, w, y, t0 * 16, KC, lut, nbs_shift);
      } else {
        for (int64_t t = t0; t < tiles; ++t) gemv4_tiles<M, 1>(x, w, y, t * 16, KC, lut, nbs_shift);
      }
    }
  });
}

bool gemv4_fast(const float* x, const W4Args& w, float* y, int64_t m, int threads) {
  const int64_t K = w.cols;
  if (K % 8 || w.bs % 8 || K % w.bs || blocked_kc() % 8 || w.rows < 1 || K < 8) return false;
  if ((double)w.rows * (double)(K / 2) > 2.0e9) return false;
  switch (m) {
#define LR_CASE(M) \
  case M: gemv4_run<M>(x, w, y, threads); return true;
    LR_CASE(1) LR_CASE(2) LR_CASE(3) LR_CASE(4) LR_CASE(5) LR_CASE(6) LR_CASE(7) LR_CASE(8)
    LR_CASE(9) LR_CASE(10) LR_CASE(11) LR_CASE(12) LR_CASE(13) LR_CASE(14) LR_CASE(15) LR_CASE(16)
#undef LR_CASE
    default: return false;
  }
}
#endif

void gemm4bit_k(const float* x, const W4Args& w, const void* bias, int bdt, float* y, int64_t m, int threads) {
  const int64_t N = w.rows, K = w.cols;
  if (m <= 0 || N <= 0) return;
  bool done = false;
  if (K == 0) {
    for (int64_t i = 0; i < m * N; ++i) y[i] = 0.0f;
    done = true;
  }
#if defined(__AVX512F__) && LR_VW == 16
  if (!done && m <= kSkinnyMax) done = gemv4_fast(x, w, y, m, threads);
#endif
  if (!done) gemm4_tiles(x, w, y, m, threads);
  if (bias) {
    Scratch bsc;
    float* bf = bsc.get<float>((size_t)N);
    load_row(bias, bdt, 0, N, bf);
    par_ranges(m, threads, 1 + 65536 / (N + 1), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t n = 0; n < N; ++n) y[i * N + n] += bf[n];
    });
  }
}

void gemm4bit_bwd_k(const float* g, const W4Args& w, float* dx, int64_t m, int threads) {
  const int64_t N = w.rows, K = w.cols;
  if (m <= 0 || K <= 0) return;
  if (N == 0) {
    for (int64_t i = 0; i < m * K; ++i) dx[i] = 0.0f;
    return;
  }
  const int64_t KC = blocked_kc();
  const int64_t CW = K < 1024 ? K : 1024;
  float* slab = (float*)aligned_alloc(64, (size_t)((KC * CW * 4 + 63) / 64 * 64 + 64));
  if (!slab) abort();
  for (int64_t c0 = 0; c0 < K; c0 += CW) {
    const int64_t cw = K - c0 < CW ? K - c0 : CW;
    for (int64_t n0 = 0; n0 < N; n0 += KC) {
      const int64_t kc = N - n0 < KC ? N - n0 : KC;
      par_ranges(kc, threads, 16, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) decode_span(w, (n0 + r) * K + c0, (n0 + r) * K + c0 + cw, slab + r * cw);
      });
      RowGemm rg;
      rg.g.M = m;
      rg.g.N = cw;
      rg.g.K = kc;
      rg.g.alpha = 1.0f;
      rg.g.beta = n0 == 0 ? 0.0f : 1.0f;
      rg.g.A = Operand{g + n0, kF32, N, 1};
      rg.g.B = Operand{slab, kF32, cw, 1};
      rg.g.C = dx + c0;
      rg.g.ldc = K;
      rg.batch = 1;
      rg.sa = rg.sb = rg.sc = 0;
      gemm_rows_k(rg, threads);
    }
  }
  free(slab);
}

}  // namespace
