// Fused attention, flash style: no Tq x Tk matrix exists, only a tile of scores per (query block, key block).
//
// Forward: one task per (batch, kv head, query block); the query block holds Bq positions x the G query heads
// that share the kv head (GQA: every K/V block is converted once and used by all G heads). Per key block:
// S = Q K^T (scores pre-multiplied by scale * log2 e, so exp is exp2), masked, online softmax (running max m,
// sum l, output O rescaled by 2^(m_old - m_new)), O += P V. The output is O / l, lse = m ln 2 + ln l. Scores
// read K rows as they are (s_rows_dot: no transposed copy, which had cost decoding's few rows more than the
// scores themselves), and each score's arithmetic depends on its query row and key row alone.
//
// Invariance: query blocks are aligned to the end of Tq and key blocks to the last position of their query
// block, so the arithmetic of a row depends only on the keys it sees relative to its own position. A
// sequence right-aligned in a padded batch (serve/kv.ts) therefore gets bit-identical outputs to the same
// sequence alone: the extra blocks of padding are fully masked (a no-op), the partial block holds the same
// keys in the same slots. Masked key slots have their K and V zeroed, so garbage in padding never leaks.
//
// Backward (FlashAttention-2 order, recomputing P = exp2(S - lse) from the saved lse): one task per (batch,
// kv head), so dK, dV and dQ of a task are written by that task alone (no atomics, any thread count gives
// the same bits). Per key block: dV += P^T dO, dP = dO V^T, dS = P (dP - rowsum(dO O)), dK += dS^T Q,
// dQ += dS K.

namespace {

constexpr int BK = 4 * VW;  // keys per block
constexpr int NVK = BK / VW;
constexpr int SR = VW == 16 ? 4 : 2;  // rows per P V micro-tile
constexpr int64_t RT = 64;            // rows (positions x heads) per query tile
constexpr float kLog2e = 1.44269504088896341f;
constexpr double kLn2 = 0.693147180559945309;

inline int64_t rup(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// VW elements of a K or V row read in place: f32 as they are, bf16 widened (exactly, as load_row and pack_n do)
typedef uint16_t vh __attribute__((vector_size(VW * 2)));
inline vf vload_kv(const float* p) { return vload(p); }
inline vf vload_kv(const uint16_t* p) {
  vh h;
  memcpy(&h, p, sizeof h);
  return (vf)(__builtin_convertvector(h, vu) << 16);
}
// the first n (< VW) of them, the other lanes 0
inline vf vload_kv_n(const float* p, int64_t n) { return vload_n(p, n); }
inline vf vload_kv_n(const uint16_t* p, int64_t n) {
  vu u = {};
  for (int64_t i = 0; i < n; ++i) u[i] = (uint32_t)p[i] << 16;
  return (vf)u;
}

// O[r][d0 : d0 + NDV VW] = O * scale_r + sum_jj P[r][jj] X[jj][...] for NR rows (scale_r = 1 when al null),
// over the block's keys jj from j0 on (X at key j0's row); O rows of stride DP, X rows (f32, or bf16 read in
// place) of stride ldx.
template <int NR, int NDV, class T>
inline void pv_tile(const float* P, const T* X, int64_t ldx, int64_t DP, int64_t d0, float* O, const float* al,
                    int j0) {
  vf acc[NR][NDV];
  for (int r = 0; r < NR; ++r) {
    const vf s = vset(al ? al[r] : 1.0f);
    for (int v = 0; v < NDV; ++v) {
      const vf o = vload(O + r * DP + d0 + v * VW);
      acc[r][v] = al ? o * s : o;
    }
  }
  for (int jj = j0; jj < BK; ++jj) {
    vf xv[NDV];
    for (int v = 0; v < NDV; ++v) xv[v] = vload_kv(X + (jj - j0) * ldx + d0 + v * VW);
    for (int r = 0; r < NR; ++r) {
      const vf a = vset(P[r * BK + jj]);
      for (int v = 0; v < NDV; ++v) acc[r][v] = vfma(a, xv[v], acc[r][v]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int v = 0; v < NDV; ++v) vstore(O + r * DP + d0 + v * VW, acc[r][v]);
}

template <int NR, class T>
void pv_rows_nr(const float* P, const T* X, int64_t ldx, int64_t DP, float* O, const float* al, int j0) {
  int64_t d0 = 0;
  for (; d0 + 4 * VW <= DP; d0 += 4 * VW) pv_tile<NR, 4>(P, X, ldx, DP, d0, O, al, j0);
  for (; d0 < DP; d0 += VW) pv_tile<NR, 1>(P, X, ldx, DP, d0, O, al, j0);
}

// pv_tile for R rows of P (stride BK), the block's keys from j0 on (0: all of them).
template <class T>
void pv_rows(const float* P, int64_t R, const T* X, int64_t ldx, int64_t DP, float* O, const float* al, int j0 = 0) {
  // three rows (decoding's G = 3 query heads of a kv head) in one tile: twelve chains in flight, not 8 then 4
  if (SR == 2 && R == 3) return pv_rows_nr<3>(P, X, ldx, DP, O, al, j0);
  int64_t r = 0;
  for (; r + SR <= R; r += SR) pv_rows_nr<SR>(P + r * BK, X, ldx, DP, O + r * DP, al ? al + r : nullptr, j0);
  const float* a = al ? al + r : nullptr;
  switch (R - r) {
    case 3: pv_rows_nr<3>(P + r * BK, X, ldx, DP, O + r * DP, a, j0); break;
    case 2: pv_rows_nr<2>(P + r * BK, X, ldx, DP, O + r * DP, a, j0); break;
    case 1: pv_rows_nr<1>(P + r * BK, X, ldx, DP, O + r * DP, a, j0); break;
    default: break;
  }
}

// Acc[jj][d0 : ...] += sum_r P[r][jj] Y[r][...] for keys jj in [j, j + NJK): the transposed products of the
// backward (dV += P^T dO, dK += dS^T Q).
template <int NJK, int NDV>
inline void at_tile(const float* P, int64_t R, const float* Y, int64_t DP, int64_t j, int64_t d0, float* Acc) {
  vf acc[NJK][NDV];
  for (int q = 0; q < NJK; ++q)
    for (int v = 0; v < NDV; ++v) acc[q][v] = vload(Acc + (j + q) * DP + d0 + v * VW);
  for (int64_t r = 0; r < R; ++r) {
    vf yv[NDV];
    for (int v = 0; v < NDV; ++v) yv[v] = vload(Y + r * DP + d0 + v * VW);
    for (int q = 0; q < NJK; ++q) {
      const vf a = vset(P[r * BK + j + q]);
      for (int v = 0; v < NDV; ++v) acc[q][v] = vfma(a, yv[v], acc[q][v]);
    }
  }
  for (int q = 0; q < NJK; ++q)
    for (int v = 0; v < NDV; ++v) vstore(Acc + (j + q) * DP + d0 + v * VW, acc[q][v]);
}

void at_rows(const float* P, int64_t R, const float* Y, int64_t DP, float* Acc) {
  constexpr int NJK = VW == 16 ? 4 : 2;
  for (int64_t j = 0; j < BK; j += NJK) {
    int64_t d0 = 0;
    for (; d0 + 4 * VW <= DP; d0 += 4 * VW) at_tile<NJK, 4>(P, R, Y, DP, j, d0, Acc);
    for (; d0 < DP; d0 += VW) at_tile<NJK, 1>(P, R, Y, DP, j, d0, Acc);
  }
}

inline bool key_valid(const AttnArgs& a, int64_t b, int64_t j) {
  if (j < 0 || j >= a.Tk) return false;
  if (a.key_mask) {
    const int64_t at = b * a.Tk + j;
    if (a.mask_i32 ? ((const int32_t*)a.key_mask)[at] == 0 : ((const uint8_t*)a.key_mask)[at] == 0) return false;
  }
  return true;
}

// Scores against K rows read as they lie. Each score is a chain of FMAs over the d-vectors of its key row and
// query row (lane l of the chain sums d = l, l + VW, ...), and then the VW lanes of VW keys' chains are summed
// together by a fixed tree of shuffles and adds (keys_combine): the same order whatever else shares the block,
// so a row's scores depend on its own query and keys alone.
constexpr int kDotNR = 4;  // rows per pass over a group of keys (their chains and trees stay in registers)

// The tree's levels. Level 1 combines two keys' vectors, level 2 two pairs, ...; after log2 VW levels lane l
// holds key l's sum. Within each 128-bit lane: level 1 [a0+a2, b0+b2, a1+a3, b1+b3], level 2 the four keys'
// sums of that lane; the 128-bit lanes are then summed pairwise (two levels for AVX-512, one for AVX2).
template <int N>
inline vf keys_combine(vf a, vf b) {
#if defined(__AVX512F__) && LR_VW == 16
  const __m512 x = (__m512)a, y = (__m512)b;
  if constexpr (N == 2) return (vf)_mm512_add_ps(_mm512_unpacklo_ps(x, y), _mm512_unpackhi_ps(x, y));
  if constexpr (N == 4) return (vf)_mm512_add_ps(_mm512_shuffle_ps(x, y, 0x44), _mm512_shuffle_ps(x, y, 0xEE));
  return (vf)_mm512_add_ps(_mm512_shuffle_f32x4(x, y, 0x88), _mm512_shuffle_f32x4(x, y, 0xDD));
#elif defined(__AVX2__) && LR_VW == 8
  const __m256 x = (__m256)a, y = (__m256)b;
  if constexpr (N == 2) return (vf)_mm256_add_ps(_mm256_unpacklo_ps(x, y), _mm256_unpackhi_ps(x, y));
  if constexpr (N == 4) return (vf)_mm256_add_ps(_mm256_shuffle_ps(x, y, 0x44), _mm256_shuffle_ps(x, y, 0xEE));
  return (vf)_mm256_add_ps(_mm256_permute2f128_ps(x, y, 0x20), _mm256_permute2f128_ps(x, y, 0x31));
#else
  static_assert(VW == 4, "the generic build has 4 lanes");
  if constexpr (N == 2) return __builtin_shuffle(a, b, vi{0, 4, 1, 5}) + __builtin_shuffle(a, b, vi{2, 6, 3, 7});
  return __builtin_shuffle(a, b, vi{0, 1, 4, 5}) + __builtin_shuffle(a, b, vi{2, 3, 6, 7});
#endif
}

template <int NR>
struct RowVecs {
  vf v[NR];
};

// Keys [S, S + N) of a group of VW, for NR rows: their chains (ND whole d-vectors, then `tail` more d's), with
// the tree's first log2 N levels applied.
template <int NR, int N, int S, int ND, class T>
inline RowVecs<NR> keys_tree(const T* const* kr, const float* Q, int64_t DP, int64_t nd, int64_t tail) {
  RowVecs<NR> o;
  if constexpr (N == 1) {
    const T* k = kr[S];
    for (int r = 0; r < NR; ++r) o.v[r] = vset(0.0f);
    const int64_t n = ND > 0 ? ND : nd;
    for (int64_t c = 0; c < n; ++c) {
      const vf kv = vload_kv(k + c * VW);
      for (int r = 0; r < NR; ++r) o.v[r] = vfma(kv, vload(Q + r * DP + c * VW), o.v[r]);
    }
    if (ND == 0 && tail) {
      const vf kv = vload_kv_n(k + n * VW, tail);
      for (int r = 0; r < NR; ++r) o.v[r] = vfma(kv, vload(Q + r * DP + n * VW), o.v[r]);
    }
  } else {
    const RowVecs<NR> x = keys_tree<NR, N / 2, S, ND, T>(kr, Q, DP, nd, tail);
    const RowVecs<NR> y = keys_tree<NR, N / 2, S + N / 2, ND, T>(kr, Q, DP, nd, tail);
    for (int r = 0; r < NR; ++r) o.v[r] = keys_combine<N>(x.v[r], y.v[r]);
  }
  return o;
}

// S[r][0:BK] = Q[r] . K[jj] for NR rows (Q rows of stride DP, zero past D); kr[jj]: key jj's row of D
// elements (f32, or bf16 read in place). ND: D / VW when D is a whole number of vectors known here, else 0
// (nd whole vectors and a tail, at run time).
template <int NR, int ND, class T>
inline void s_dot_tile(const float* Q, int64_t DP, int64_t D, const T* const* kr, float* S) {
  for (int g = 0; g < NVK; ++g) {
    const RowVecs<NR> s = keys_tree<NR, VW, 0, ND, T>(kr + g * VW, Q, DP, D / VW, D % VW);
    for (int r = 0; r < NR; ++r) vstore(S + r * BK + g * VW, s.v[r]);
  }
}

template <int ND, class T>
void s_rows_dot_nd(const float* Q, int64_t R, int64_t DP, int64_t D, const T* const* kr, float* S) {
  int64_t r = 0;
  for (; r + kDotNR <= R; r += kDotNR) s_dot_tile<kDotNR, ND>(Q + r * DP, DP, D, kr, S + r * BK);
  switch (R - r) {
    case 3: s_dot_tile<3, ND>(Q + r * DP, DP, D, kr, S + r * BK); break;
    case 2: s_dot_tile<2, ND>(Q + r * DP, DP, D, kr, S + r * BK); break;
    case 1: s_dot_tile<1, ND>(Q + r * DP, DP, D, kr, S + r * BK); break;
    default: break;
  }
}

// S [R][BK] of R rows against one block's keys (rows kr[0..BK), zero rows for invalid keys)
template <class T>
void s_rows_dot(const float* Q, int64_t R, int64_t DP, int64_t D, const T* const* kr, float* S) {
  if (D == 64) return s_rows_dot_nd<64 / VW>(Q, R, DP, D, kr, S);
  if (D == 128) return s_rows_dot_nd<128 / VW>(Q, R, DP, D, kr, S);
  s_rows_dot_nd<0>(Q, R, DP, D, kr, S);
}

// Xn[jj][0:DP] = X(key j0 + jj, 0:D) for one of k / v, zero-padded; invalid keys are zero rows.
void pack_n(const void* p, int dt, const int64_t* st, int64_t b, int64_t kvh, int64_t j0, int64_t D, int64_t DP,
            const bool* kval, float* Xn) {
  for (int64_t jj = 0; jj < BK; ++jj) {
    float* xr = Xn + jj * DP;
    int64_t d = 0;
    if (kval[jj]) {
      const int64_t at = b * st[0] + (j0 + jj) * st[1] + kvh * st[2];
      if (dt == kOpF32) {  // inline (load_row's call was 4% of the backward)
        const float* src = (const float*)p + at;
        for (; d + VW <= D; d += VW) vstore(xr + d, vload(src + d));
        for (; d < D; ++d) xr[d] = src[d];
      } else {
        load_row(p, dt, at, D, xr);
        d = D;
      }
    }
    for (; d < DP; ++d) xr[d] = 0.0f;
  }
}

// kval[jj]: whether key j0 + jj exists and is not masked out. Returns whether any is (*all: whether all are).
bool block_keys(const AttnArgs& a, int64_t b, int64_t j0, bool* kval, bool* all) {
  if (!a.key_mask) {  // every key in [0, Tk) exists: a range of the block (135m, batch 8 decoding, warm: 8
    // rather than 16 us of a call's tasks went to sorting out their blocks' keys)
    const int64_t lo = j0 < 0 ? -j0 : 0, hi = a.Tk - j0 < BK ? a.Tk - j0 : BK;
    for (int64_t jj = 0; jj < BK; ++jj) kval[jj] = jj >= lo && jj < hi;
    *all = lo == 0 && hi == BK;
    return lo < hi;
  }
  bool any = false;
  *all = true;
  for (int64_t jj = 0; jj < BK; ++jj) {
    kval[jj] = key_valid(a, b, j0 + jj);
    any = any || kval[jj];
    *all = *all && kval[jj];
  }
  return any;
}

// One key block [j0, j0 + BK) of kv head kvh: Kn, Vn [BK][DP] natural and zero-padded, invalid slots all
// zero, and kr, vr pointing at their rows. Returns whether any slot is valid.
bool pack_kv(const AttnArgs& a, int64_t b, int64_t kvh, int64_t j0, int64_t DP, bool* kval, float* Kn, float* Vn,
             const float** kr, const float** vr) {
  bool all;
  if (!block_keys(a, b, j0, kval, &all)) return false;
  pack_n(a.k, a.kdt, a.ks, b, kvh, j0, a.D, DP, kval, Kn);
  pack_n(a.v, a.vdt, a.vs, b, kvh, j0, a.D, DP, kval, Vn);
  for (int64_t jj = 0; jj < BK; ++jj) kr[jj] = Kn + jj * DP, vr[jj] = Vn + jj * DP;
  return true;
}

// Sets S[r][jj] = -inf where row r (position prow[r], sequence srow[r]) does not see key j0 + jj.
void mask_scores(const AttnArgs& a, int64_t b, int64_t j0, const bool* kval, const int64_t* prow, const int32_t* srow,
                 int64_t R, float* S) {
  const int32_t* seq = a.seq_ids ? a.seq_ids + b * a.Tk : nullptr;
  int64_t pmin = prow[0], pmax = prow[0];
  for (int64_t r = 1; r < R; ++r) {
    if (prow[r] < pmin) pmin = prow[r];
    if (prow[r] > pmax) pmax = prow[r];
  }
  bool full = j0 >= 0 && j0 + BK - 1 <= pmin && (a.window <= 0 || j0 > pmax - a.window);
  for (int64_t jj = 0; full && jj < BK; ++jj) full = kval[jj];
  if (full && seq) {
    const int32_t s0 = seq[j0];
    for (int64_t jj = 0; full && jj < BK; ++jj) full = seq[j0 + jj] == s0;
    for (int64_t r = 0; full && r < R; ++r) full = srow[r] == s0;
  }
  if (full) return;
  bool allk = true;
  for (int64_t jj = 0; allk && jj < BK; ++jj) allk = kval[jj];
  if (allk && !seq && a.window <= 0) {
    // causal only: row r sees slots jj <= p_r - j0
    vf iota;
    for (int l = 0; l < VW; ++l) iota[l] = (float)l;
    for (int64_t r = 0; r < R; ++r) {
      const vf lim = vset((float)(prow[r] - j0));
      float* s = S + r * BK;
      for (int v = 0; v < NVK; ++v) {
        const vf jj = iota + vset((float)(v * VW));
        vstore(s + v * VW, jj > lim ? vset(-INFINITY) : vload(s + v * VW));
      }
    }
    return;
  }
  for (int64_t r = 0; r < R; ++r) {
    const int64_t p = prow[r];
    float* s = S + r * BK;
    for (int64_t jj = 0; jj < BK; ++jj) {
      const int64_t j = j0 + jj;
      bool vis = kval[jj] && j <= p && (a.window <= 0 || j > p - a.window);
      if (vis && seq) vis = seq[j] == srow[r];
      if (!vis) s[jj] = -INFINITY;
    }
  }
}

// Reads a byte of every cache line of rows [j0, j1) of one kv head of K or V (in place, es-byte elements) before
// a decoding task computes on them. Those rows are cold: a step's weights stream through the caches between one
// token's attention and the next. Loads that nothing waits on keep many misses in flight at once, where the
// blocks' own reads (scores, then P V, a block at a time) had kept few. Zen 5, 2 threads, 135m bf16: 30 layers'
// caches of 300 positions read cold, 26 -> 15 us a layer; DecodeSession (medians of alternating rounds, ms a
// step) after 256-position prompts: batch 8 14.0 -> 13.0, 16.7 -> 15.3 and 16.5 -> 14.4 (three runs), batch 16
// 26.8 -> 25.7, batch 1 within noise (8.9 -> 8.3, 8.6 -> 8.6; f32 16.1 -> 16.2, batch 8 25.3 -> 24.3); after
// 1000 positions batch 1 9.1 -> 8.5, batch 4 16.2 -> 14.7. Prefetch instructions for the same lines gained less
// (batch 8 15.6 against 14.4), and so did prefetching, a share a block, the rows of the task a thread takes next
// while it computes on its own (batch 8 14.0 against 13.4, batch 16 30.8 against 27.5). Only a decoding task's
// rows are read so (one query tile: at most a chunk of kChunkBlocks blocks); a prefill tile's are many, and
// mostly in cache already.
void touch_rows(const void* x, int dt, const int64_t* st, int64_t b, int64_t kvh, int64_t j0, int64_t j1, int64_t D) {
  if (j0 >= j1) return;
  const int64_t es = dt == kOpF32 ? 4 : 2;
  const char* p = (const char*)x + (b * st[0] + j0 * st[1] + kvh * st[2]) * es;
  const int64_t row = D * es, rs = st[1] * es;
  if (st[1] == D) {  // the rows one after another: a single span
    for (const char* q = p; q < p + (j1 - j0) * row; q += 64) (void)*(const volatile char*)q;
    return;
  }
  for (int64_t j = j0; j < j1; ++j, p += rs) {
    for (int64_t o = 0; o < row; o += 64) (void)*(const volatile char*)(p + o);
    (void)*(const volatile char*)(p + row - 1);
  }
}

thread_local Scratch tls_attn, tls_attn_part;
// blocks of a decoding task's chunk of keys (attn_fwd_k): 192 keys rather than 128 since scores read K in place,
// 4-7% less time a call (1 x 290, 1 x 1000, 4 x 2048 keys, 9/3 heads; 40-45 of 57 alternating batches)
constexpr int64_t kChunkBlocks = 192 / BK;

void attn_fwd_k(const AttnArgs& a, float* out, float* lse, int threads) {
  const int64_t G = a.Hq / a.Hkv, D = a.D, DP = rup(D, VW);
  // positions per query tile: about RT rows, a multiple of the micro-tile rows when G allows
  int64_t Bq = G >= RT ? 1 : RT / G;
  while (Bq > 1 && (Bq * G) % SR) --Bq;
  const int64_t nqb = (a.Tq + Bq - 1) / Bq;
  const float qscale = a.scale * kLog2e;
  const int64_t off = a.Tk - a.Tq;
  // The V rows of a block whose keys all exist are read in place when they are f32 or bf16 and need no padding
  // (the same values as the packed copy, so the same arithmetic), by tiles of a few rows (decoding) only: a tile
  // of many rows reads them once per pair of rows, and packed they stay in L1 (training's attention forward ran
  // about 10% faster packed).
  const bool v_in_place = (a.vdt == kOpF32 || a.vdt == kOpBF16) && DP == D;
  constexpr int64_t kVInPlaceRows = 8;
  // One query tile per (batch, kv head) (decoding): its keys are split into chunks of kChunkBlocks blocks, each
  // chunk a task of its own, so that the few tasks of a step (3 kv heads of the 135m preset) keep every thread
  // busy; the chunks' (m, l, O) are then combined in order. The split depends on the shapes alone, never on the
  // thread count, and chunks are counted from the tile's last position like the blocks (the invariance above).
  const int64_t Rmax = (a.Tq < Bq ? a.Tq : Bq) * G;
  const int64_t jlo0 = a.window > 0 ? (off - a.window + 1 > 0 ? off - a.window + 1 : 0) : 0;
  const int64_t nch = nqb == 1 ? ((a.Tk - jlo0 + BK - 1) / BK + kChunkBlocks - 1) / kChunkBlocks : 1;
  const int64_t pstride = Rmax * (DP + 2);  // a chunk's partial result: m, l [R], O [R][DP]
  float* part = nch > 1 ? tls_attn_part.get<float>((size_t)(a.B * a.Hkv * nch * pstride)) : nullptr;
  par_tasks(a.B * a.Hkv * nqb * nch, threads, [&](int64_t task_c) {
    const int64_t task = task_c / nch, ch = task_c % nch;
    const int64_t b = task / (a.Hkv * nqb), kvh = (task / nqb) % a.Hkv, qb = task % nqb;
    const int64_t t1 = a.Tq - qb * Bq, t0 = t1 - Bq > 0 ? t1 - Bq : 0;
    const int64_t R = (t1 - t0) * G;
    // scratch: Qs, O [R][DP]; S [R][BK]; m, l, al [R]; Kn, Vn [BK][DP]; a zero key row [DP]; the block's key
    // rows [BK] (pointers, f32 and bf16)
    const size_t nfl = (size_t)(2 * R * DP + R * BK + 4 * R + 2 * BK * DP + DP + 4 * BK + 11 * VW);
    float* Qs = tls_attn.get<float>(nfl + (size_t)(R * 3 + BK));
    float* O = Qs + R * DP;
    float* S = O + R * DP;
    float* m = S + R * BK;
    float* l = m + R;
    float* al = l + R;
    float* mnew = al + R;
    float* Kn = mnew + R + VW;
    float* Vn = Kn + BK * DP;
    float* zrow = Vn + BK * DP + VW;
    const float** kr = (const float**)(((uintptr_t)(zrow + DP + VW) + 7) & ~(uintptr_t)7);
    const uint16_t** kh = (const uint16_t**)(kr + BK);
    int64_t* prow = (int64_t*)(kh + BK);
    int32_t* srow = (int32_t*)(prow + R);
    bool* kval = (bool*)(srow + R);
    for (int64_t r = 0; r < R; ++r) {
      const int64_t t = t0 + r / G, h = kvh * G + r % G;
      float* qr = Qs + r * DP;
      load_row(a.q, a.qdt, b * a.qs[0] + t * a.qs[1] + h * a.qs[2], D, qr);
      for (int64_t d = 0; d < D; ++d) qr[d] *= qscale;
      for (int64_t d = D; d < DP; ++d) qr[d] = 0.0f;
      for (int64_t d = 0; d < DP; ++d) O[r * DP + d] = 0.0f;
      if (r == 0)
        for (int64_t d = 0; d < DP; ++d) zrow[d] = 0.0f;
      m[r] = -INFINITY;
      l[r] = 0.0f;
      prow[r] = off + t;
      srow[r] = a.seq_ids ? a.seq_ids[b * a.Tk + off + t] : 0;
    }
    const int64_t pmin = off + t0, pmax = off + t1 - 1;
    const int64_t jlo = a.window > 0 ? (pmin - a.window + 1 > 0 ? pmin - a.window + 1 : 0) : 0;
    const int64_t nblk = (pmax + 1 - jlo + BK - 1) / BK;
    // this task's blocks: all, or its chunk's (block e ends BK e keys before the tile's last position)
    const int64_t e0 = nch > 1 ? ch * kChunkBlocks : 0;
    const int64_t e1 = nch > 1 ? (e0 + kChunkBlocks < nblk ? e0 + kChunkBlocks : nblk) : nblk;
    if (nqb == 1) {
      const int64_t ja = pmax + 1 - e1 * BK > jlo ? pmax + 1 - e1 * BK : jlo, jb = pmax + 1 - e0 * BK;
      touch_rows(a.k, a.kdt, a.ks, b, kvh, ja, jb, D);
      touch_rows(a.v, a.vdt, a.vs, b, kvh, ja, jb, D);
    }
    for (int64_t e = e1 - 1; e >= e0; --e) {
      const int64_t j0 = pmax + 1 - (e + 1) * BK;
      bool all;
      if (!block_keys(a, b, j0, kval, &all)) continue;
      // keys read once (one pass of rows) are read in place, f32 or bf16, an invalid one as a zero row; a tile of
      // more rows reads them again each pass, from a packed copy (in place, rows 2 KiB apart, 8 kv heads of 64,
      // kept falling out of L1: prefill attention 1.6x slower)
      const bool k_bf16 = a.kdt == kOpBF16 && R <= kDotNR;
      if (a.kdt == kOpF32 && R <= kDotNR) {
        const float* kb = (const float*)a.k + b * a.ks[0] + kvh * a.ks[2];
        for (int64_t jj = 0; jj < BK; ++jj) kr[jj] = kval[jj] ? kb + (j0 + jj) * a.ks[1] : zrow;
      } else if (k_bf16) {
        const uint16_t* kb = (const uint16_t*)a.k + b * a.ks[0] + kvh * a.ks[2];
        for (int64_t jj = 0; jj < BK; ++jj) kh[jj] = kval[jj] ? kb + (j0 + jj) * a.ks[1] : (const uint16_t*)zrow;
      } else {
        pack_n(a.k, a.kdt, a.ks, b, kvh, j0, D, DP, kval, Kn);
        for (int64_t jj = 0; jj < BK; ++jj) kr[jj] = Kn + jj * DP;
      }
      const void* Vb = Vn;
      int64_t ldv = DP;
      // Without a key mask, the keys a block lacks are those before position 0 (its keys end at the tile's last
      // position or earlier): V is then read in place from the first key that exists. The packed copy's zero rows
      // before it added nothing (P is 0 there, and the sums never hold -0), so the bits are the same. Decoding,
      // 135m, batch 8 after 256 positions: packing the oldest block took 8 of a call's 123 us (warm, summed over
      // the tasks), reading in place 2; DecodeSession 14.4 -> 14.1 ms a step.
      const int vlo = !all && !a.key_mask ? (int)-j0 : 0;
      const bool v_here = (all || vlo > 0) && v_in_place && R <= kVInPlaceRows;
      if (v_here) {
        Vb = (const char*)a.v + (b * a.vs[0] + (j0 + vlo) * a.vs[1] + kvh * a.vs[2]) * (a.vdt == kOpF32 ? 4 : 2);
        ldv = a.vs[1];
      } else {
        pack_n(a.v, a.vdt, a.vs, b, kvh, j0, D, DP, kval, Vn);
      }
      if (k_bf16)
        s_rows_dot(Qs, R, DP, D, kh, S);
      else
        s_rows_dot(Qs, R, DP, D, kr, S);
      mask_scores(a, b, j0, kval, prow, srow, R, S);
      // online softmax: block row maxima, then (vectorised over rows) the new maxima and the rescale factors
      // 2^(m_old - m_new), then P = 2^(S - m_new) and the row sums
      for (int64_t r = 0; r < R; ++r) {
        const float* sr = S + r * BK;
        vf mv = vload(sr);
        vi nan = mv != mv;
        for (int v = 1; v < NVK; ++v) {
          const vf x = vload(sr + v * VW);
          mv = vmax(mv, x);
          nan |= x != x;
        }
        float mb = hmax(mv);
        for (int l2 = 0; l2 < VW; ++l2)
          if (nan[l2]) mb = NAN;
        mnew[r] = mb;
      }
      for (int64_t r = 0; r < R; r += VW) {
        const int64_t c = R - r < VW ? R - r : VW;
        const vf mo = vload_part(m + r, c), mb = vload_part(mnew + r, c);
        const vf mn = (mb > mo) | (mb != mb) ? mb : mo;
        const vf e = vexp2_neg(mo - mn);
        vstore_part(al + r, mn == vset(-INFINITY) ? vset(1.0f) : e, c);
        vstore_part(mnew + r, mn, c);
      }
      for (int64_t r = 0; r < R; ++r) {
        float* sr = S + r * BK;
        const float mn = mnew[r];
        if (mn == -INFINITY) {
          for (int v = 0; v < NVK; ++v) vstore(sr + v * VW, vset(0.0f));
          continue;
        }
        vf sum = vset(0.0f);
        const vf mnv = vset(mn);
        for (int v = 0; v < NVK; ++v) {
          const vf p = vexp2_neg(vload(sr + v * VW) - mnv);
          vstore(sr + v * VW, p);
          sum += p;
        }
        l[r] = l[r] * al[r] + hsum(sum);
        m[r] = mn;
      }
      if (v_here && a.vdt == kOpBF16)
        pv_rows(S, R, (const uint16_t*)Vb, ldv, DP, O, al, vlo);
      else
        pv_rows(S, R, (const float*)Vb, ldv, DP, O, al, v_here ? vlo : 0);  // packed: from key 0
    }
    if (nch > 1) {
      float* pp = part + task_c * pstride;
      for (int64_t r = 0; r < R; ++r) {
        pp[r] = m[r];
        pp[Rmax + r] = l[r];
        for (int64_t d = 0; d < DP; ++d) pp[2 * Rmax + r * DP + d] = O[r * DP + d];
      }
      return;
    }
    for (int64_t r = 0; r < R; ++r) {
      const int64_t t = t0 + r / G, h = kvh * G + r % G;
      float* o = out + ((b * a.Tq + t) * a.Hq + h) * D;
      float* li = lse + (b * a.Hq + h) * a.Tq + t;
      if (l[r] > 0.0f) {
        const float* orow = O + r * DP;
        for (int64_t d = 0; d < D; ++d) o[d] = orow[d] / l[r];
        *li = (float)((double)m[r] * kLn2 + log((double)l[r]));
      } else {
        for (int64_t d = 0; d < D; ++d) o[d] = 0.0f;
        *li = -INFINITY;
      }
    }
  });
  if (nch <= 1) return;
  // the chunks of each (batch, kv head) combined, oldest first: m = max m_c, l = sum l_c 2^(m_c - m), likewise O
  for (int64_t task = 0; task < a.B * a.Hkv; ++task) {
    const int64_t b = task / a.Hkv, kvh = task % a.Hkv;
    for (int64_t r = 0; r < Rmax; ++r) {
      const int64_t t = r / G, h = kvh * G + r % G;
      float mx = -INFINITY;
      bool nan = false;
      for (int64_t c = 0; c < nch; ++c) {
        const float mc = part[(task * nch + c) * pstride + r];
        nan = nan || mc != mc;
        if (mc > mx) mx = mc;
      }
      float* o = out + ((b * a.Tq + t) * a.Hq + h) * D;
      float* li = lse + (b * a.Hq + h) * a.Tq + t;
      float L = 0.0f;
      for (int64_t d = 0; d < D; ++d) o[d] = 0.0f;
      for (int64_t c = nch - 1; c >= 0 && !nan; --c) {
        const float* pp = part + (task * nch + c) * pstride;
        if (pp[r] == -INFINITY) continue;  // a chunk with no key seen
        const float w = exp2f(pp[r] - mx);
        L += pp[Rmax + r] * w;
        for (int64_t d = 0; d < D; ++d) o[d] += pp[2 * Rmax + r * DP + d] * w;
      }
      if (L > 0.0f) {
        for (int64_t d = 0; d < D; ++d) o[d] /= L;
        *li = (float)((double)mx * kLn2 + log((double)L));
      } else {
        for (int64_t d = 0; d < D; ++d) o[d] = 0.0f;  // no key seen (or a NaN score), as unsplit
        *li = -INFINITY;
      }
    }
  }
}

void attn_bwd_k(const AttnArgs& a, const float* out, const float* lse, const float* gout, float* dq, float* dk,
                float* dv, int threads) {
  const int64_t G = a.Hq / a.Hkv, D = a.D, DP = rup(D, VW);
  const int64_t Bq = G >= RT ? 1 : RT / G;
  const float qscale = a.scale * kLog2e;
  const int64_t off = a.Tk - a.Tq;
  const int64_t Rall = a.Tq * G;
  par_tasks(a.B * a.Hkv, threads, [&](int64_t task) {
    const int64_t b = task / a.Hkv, kvh = task % a.Hkv;
    // scratch: Qs, dO, dQ [Rall][DP]; Dd, L2 [Rall]; S, dP [RT'][BK]; Kn, Vn, dK, dV [BK][DP]; the block's key
    // and value rows [BK] (pointers)
    const int64_t Rt = Bq * G;
    const size_t nfl = (size_t)(3 * Rall * DP + 2 * Rall + 2 * Rt * BK + 4 * BK * DP + 4 * BK + 8 * VW);
    float* Qs = tls_attn.get<float>(nfl + (size_t)(3 * Rt + BK));
    float* dO = Qs + Rall * DP;
    float* dQ = dO + Rall * DP;
    float* Dd = dQ + Rall * DP;
    float* L2 = Dd + Rall;
    float* S = L2 + Rall;
    float* dP = S + Rt * BK;
    float* Kn = dP + Rt * BK;
    float* Vn = Kn + BK * DP;
    float* dK = Vn + BK * DP;
    float* dV = dK + BK * DP;
    const float** kr = (const float**)(((uintptr_t)(dV + BK * DP + VW) + 7) & ~(uintptr_t)7);
    const float** vr = kr + BK;
    int64_t* prow = (int64_t*)(vr + BK);
    int32_t* srow = (int32_t*)(prow + Rt);
    bool* kval = (bool*)(srow + Rt);
    for (int64_t r = 0; r < Rall; ++r) {
      const int64_t t = r / G, h = kvh * G + r % G;
      float* qr = Qs + r * DP;
      load_row(a.q, a.qdt, b * a.qs[0] + t * a.qs[1] + h * a.qs[2], D, qr);
      for (int64_t d = 0; d < D; ++d) qr[d] *= qscale;
      const int64_t oi = ((b * a.Tq + t) * a.Hq + h) * D;
      float* gr = dO + r * DP;
      double dot = 0.0;
      for (int64_t d = 0; d < D; ++d) {
        gr[d] = gout[oi + d];
        dot += (double)gout[oi + d] * (double)out[oi + d];
      }
      for (int64_t d = D; d < DP; ++d) qr[d] = gr[d] = 0.0f;
      for (int64_t d = 0; d < DP; ++d) dQ[r * DP + d] = 0.0f;
      Dd[r] = (float)dot;
      const float L = lse[(b * a.Hq + h) * a.Tq + t];
      L2[r] = L == -INFINITY ? -INFINITY : L * kLog2e;
    }
    const int64_t nkb = (a.Tk + BK - 1) / BK;
    for (int64_t kb = 0; kb < nkb; ++kb) {
      const int64_t j0 = kb * BK, j1 = j0 + BK < a.Tk ? j0 + BK : a.Tk;
      // query positions that may see a key of this block
      int64_t tlo = j0 - off > 0 ? j0 - off : 0;
      int64_t thi = a.Tq;
      if (a.window > 0) {
        const int64_t lim = j1 - 1 + a.window - 1 - off + 1;  // p <= j1 - 2 + window
        if (lim < thi) thi = lim;
      }
      if (tlo >= thi) continue;
      if (!pack_kv(a, b, kvh, j0, DP, kval, Kn, Vn, kr, vr)) continue;
      for (int64_t i = 0; i < BK * DP; ++i) dK[i] = dV[i] = 0.0f;
      for (int64_t tq0 = tlo; tq0 < thi; tq0 += Bq) {
        const int64_t tq1 = tq0 + Bq < thi ? tq0 + Bq : thi;
        const int64_t R = (tq1 - tq0) * G;
        const int64_t r0 = tq0 * G;
        for (int64_t r = 0; r < R; ++r) {
          prow[r] = off + tq0 + r / G;
          srow[r] = a.seq_ids ? a.seq_ids[b * a.Tk + prow[r]] : 0;
        }
        s_rows_dot(Qs + r0 * DP, R, DP, D, kr, S);  // the forward's scores, bit for bit
        mask_scores(a, b, j0, kval, prow, srow, R, S);
        s_rows_dot(dO + r0 * DP, R, DP, D, vr, dP);
        for (int64_t r = 0; r < R; ++r) {
          float* sr = S + r * BK;
          float* dr = dP + r * BK;
          const float L = L2[r0 + r];
          if (L == -INFINITY) {
            for (int v = 0; v < NVK; ++v) vstore(sr + v * VW, vset(0.0f)), vstore(dr + v * VW, vset(0.0f));
            continue;
          }
          const vf Lv = vset(L), Dv = vset(Dd[r0 + r]);
          for (int v = 0; v < NVK; ++v) {
            const vf p = vexp2_neg(vload(sr + v * VW) - Lv);
            vstore(sr + v * VW, p);
            vstore(dr + v * VW, p * (vload(dr + v * VW) - Dv));
          }
        }
        at_rows(S, R, dO + r0 * DP, DP, dV);   // dV += P^T dO
        at_rows(dP, R, Qs + r0 * DP, DP, dK);  // dK += dS^T Qs
        pv_rows(dP, R, Kn, DP, DP, dQ + r0 * DP, nullptr);  // dQ += dS K
      }
      for (int64_t jj = 0; jj < j1 - j0; ++jj) {
        const int64_t o = ((b * a.Tk + j0 + jj) * a.Hkv + kvh) * D;
        if (dk)
          for (int64_t d = 0; d < D; ++d) dk[o + d] = (float)((double)dK[jj * DP + d] * kLn2);
        if (dv)
          for (int64_t d = 0; d < D; ++d) dv[o + d] = dV[jj * DP + d];
      }
    }
    // key blocks never visited leave zeros
    for (int64_t kb = 0; kb < nkb; ++kb) {
      const int64_t j0 = kb * BK, j1 = j0 + BK < a.Tk ? j0 + BK : a.Tk;
      int64_t tlo = j0 - off > 0 ? j0 - off : 0;
      int64_t thi = a.Tq;
      if (a.window > 0) {
        const int64_t lim = j1 - 1 + a.window - 1 - off + 1;
        if (lim < thi) thi = lim;
      }
      bool any = false;
      for (int64_t j = j0; j < j1 && !any; ++j) any = key_valid(a, b, j);
      if (tlo < thi && any) continue;
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t o = ((b * a.Tk + j) * a.Hkv + kvh) * D;
        if (dk)
          for (int64_t d = 0; d < D; ++d) dk[o + d] = 0.0f;
        if (dv)
          for (int64_t d = 0; d < D; ++d) dv[o + d] = 0.0f;
      }
    }
    if (dq) {
      for (int64_t r = 0; r < Rall; ++r) {
        const int64_t t = r / G, h = kvh * G + r % G;
        float* o = dq + ((b * a.Tq + t) * a.Hq + h) * D;
        for (int64_t d = 0; d < D; ++d) o[d] = a.scale * dQ[r * DP + d];
      }
    }
  });
}

}  // namespace
