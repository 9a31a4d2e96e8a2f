// 4-bit (bitsandbytes NF4/FP4) weight kernels. A product with a 4-bit weight is computed with the same
// per-element arithmetic as the row-invariant GEMM applied to the dequantized weight (value = code[nibble] *
// absmax, rounded to f32, exactly as bitsandbytes and the reference dequantize), so a row's output does not
// depend on how many rows share the call either:
//   m > 16 (prefill, training): tiles of weight rows are unpacked into a small f32 scratch and multiplied by
//     the blocked GEMM (compute-bound; the unpacking is amortised over m rows);
//   m <= 16 (decoding): on AVX-512, a fused kernel reads the packed weight once: 16 weight rows at a time,
//     4 bytes (8 codes) of each gathered per step, codes looked up in a 16-entry register table, scaled per
//     block and accumulated in the GEMM's KC-block FMA chains. The weight streams from memory at 0.5 byte per
//     element instead of 4 (f32) or 2 (bf16).
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
// m <= 16 rows of x against 16 weight rows [n0, n0 + 16) (rows past N repeat row N - 1 and are not stored).
template <int M>
void gemv4_tile(const float* x, const W4Args& w, float* y, int64_t n0, int64_t KC, const __m512 lut) {
  const int64_t N = w.rows, K = w.cols, bs = w.bs, bpr = K / bs;
  alignas(64) int32_t rowoff[16];
  int64_t rowsel[16];
  for (int i = 0; i < 16; ++i) {
    rowsel[i] = n0 + i < N ? n0 + i : N - 1;
    rowoff[i] = (int32_t)((rowsel[i] - n0) * (K / 2));
  }
  const __m512i vrow = _mm512_load_si512((const void*)rowoff);
  const uint8_t* base = w.packed + n0 * (K / 2);
  const __mmask16 store_mask = (__mmask16)(N - n0 >= 16 ? 0xffff : (1u << (N - n0)) - 1);
  const __m512i m15 = _mm512_set1_epi32(15);
  alignas(64) float sc[16];
  for (int64_t k0 = 0; k0 < K; k0 += KC) {
    const int64_t k1 = K - k0 < KC ? K : k0 + KC;
    __m512 acc[M];
    for (int i = 0; i < M; ++i) acc[i] = _mm512_setzero_ps();
    int64_t k = k0;
    while (k < k1) {
      const int64_t blk = k / bs;
      const int64_t kend = (blk + 1) * bs < k1 ? (blk + 1) * bs : k1;
      for (int i = 0; i < 16; ++i) sc[i] = block_scale(w, rowsel[i] * bpr + blk);
      const __m512 sv = _mm512_load_ps(sc);
      for (; k < kend; k += 8) {
        const __m512i wd = _mm512_i32gather_epi32(_mm512_add_epi32(vrow, _mm512_set1_epi32((int)(k / 2))), base, 1);
#define LR_STEP(t, sh)                                                                                   \
  {                                                                                                      \
    const __m512 wv = _mm512_mul_ps(                                                                     \
        _mm512_permutexvar_ps(_mm512_and_si512(_mm512_srli_epi32(wd, sh), m15), lut), sv);               \
    for (int i = 0; i < M; ++i) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(x[i * K + k + t]), wv, acc[i]); \
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
    for (int i = 0; i < M; ++i) {
      float* yo = y + i * N + n0;
      __m512 v = acc[i];
      if (k0 > 0) v = _mm512_add_ps(_mm512_maskz_loadu_ps(store_mask, yo), v);
      _mm512_mask_storeu_ps(yo, store_mask, v);
    }
  }
}

template <int M>
void gemv4_run(const float* x, const W4Args& w, float* y, int threads) {
  const int64_t KC = blocked_kc();
  const __m512 lut = _mm512_loadu_ps(w.code);
  const int64_t tiles = (w.rows + 15) / 16;
  par_ranges(tiles, (double)w.rows * (double)w.cols < 65536.0 ? 1 : threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) gemv4_tile<M>(x, w, y, t * 16, KC, lut);
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
