// Mixed-adapter LoRA rows in one call (Punica's SGMV on the CPU): every row i of a batch whose row_group[i] = g
// >= 0 gets out[i] += s_g (x[i] A_g^T) B_g^T (+ s_g b_g, lora_B's bias), all groups of one projection at once.
//
// The result is bit-identical to the two row-invariant GEMMs a row takes alone (src/peft/lora/ops.ts
// loraLinear: u = x A^T with beta 0, then out += s u B^T with beta 1), so it reproduces their arithmetic
// (ops_gemm.h): every element is a chain of vfma over k starting from 0 that restarts at each KC block (KC
// read from this ISA's GEMM blocking), the first block of u written and later ones added (u = u + chain), and
// for the expand alpha folded into B (b' = alpha b rounded to f32, alpha = (float)s, skipped when alpha is 1)
// and every block added to out (out = out + chain); alpha 0 leaves out alone. The bias term is the unary scale
// op's (float)((double)b * s) added to out before the expand.
//
// Lanes run over the outputs (the rank for the shrink, the output features for the expand), so each lane's
// chain stays sequential in k; A^T and the folded B^T of a group are packed (transposed) once per chunk of rows,
// and the shrinks of up to 4 rows run together (independent chains).

namespace {

int64_t lora_kc() {
  int64_t o[3];
  LR_GEMM_IMPL()->blocking(0, 0, 0, o);
  return o[0];
}

inline int64_t lora_round_vw(int64_t n) { return (n + VW - 1) / VW * VW; }

thread_local Scratch tls_lora_meta, tls_lora_pack, tls_lora_u, tls_lora_at;

// dst[c * ldd + r] = src[r * lds + c] (times alpha, an f32 product, with SCALE) for r < nr, c < nc, both
// at most 8: one block of a transpose.
template <bool SCALE>
__attribute__((always_inline)) inline void lora_t8(const float* src, int64_t lds, int64_t nr, int64_t nc, float* dst,
                                                   int64_t ldd, float alpha) {
#if defined(__AVX2__)
  if (nr == 8 && nc == 8) {
    __m256 r[8];
    for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * lds);
    __m256 o[8];
    transpose8x8(r, o);
    const __m256 av = _mm256_set1_ps(alpha);
    for (int c = 0; c < 8; ++c) _mm256_storeu_ps(dst + c * ldd, SCALE ? _mm256_mul_ps(o[c], av) : o[c]);
    return;
  }
#endif
  for (int64_t c = 0; c < nc; ++c)
    for (int64_t i = 0; i < nr; ++i) dst[c * ldd + i] = SCALE ? alpha * src[i * lds + c] : src[i * lds + c];
}

// dst [cols, ldd] = src^T (times alpha with SCALE) for src [rows, cols] (lds), columns rows..ldd of dst zeroed.
template <bool SCALE>
void lora_transpose(const float* src, int64_t rows, int64_t cols, int64_t lds, float* dst, int64_t ldd, float alpha) {
  for (int64_t c0 = 0; c0 < cols; c0 += 8) {
    const int64_t nc = cols - c0 < 8 ? cols - c0 : 8;
    for (int64_t r0 = 0; r0 < rows; r0 += 8)
      lora_t8<SCALE>(src + r0 * lds + c0, lds, rows - r0 < 8 ? rows - r0 : 8, nc, dst + c0 * ldd + r0, ldd, alpha);
    for (int64_t c = c0; c < c0 + nc; ++c)
      for (int64_t i = rows; i < ldd; ++i) dst[c * ldd + i] = 0.0f;
  }
}

// u[0, rp) = x A^T for one row (lanes past r hold zeros): at = A^T packed [inF, rp].
void lora_shrink_row(const float* x, const float* at, int64_t inF, int64_t rp, int64_t KC, float* u) {
  constexpr int NV = 4;
  for (int64_t j0 = 0; j0 < rp; j0 += NV * VW) {
    const int nv = (int)((rp - j0) / VW < NV ? (rp - j0) / VW : NV);
    vf tot[NV];
    for (int q = 0; q < NV; ++q) tot[q] = vset(0.0f);
    for (int64_t k0 = 0; k0 < inF; k0 += KC) {
      const int64_t k1 = inF - k0 < KC ? inF : k0 + KC;
      vf acc[NV];
      for (int q = 0; q < NV; ++q) acc[q] = vset(0.0f);
      if (nv == NV) {
        for (int64_t k = k0; k < k1; ++k) {
          const vf xv = vset(x[k]);
          const float* p = at + k * rp + j0;
          for (int q = 0; q < NV; ++q) acc[q] = vfma(xv, vload(p + q * VW), acc[q]);
        }
      } else {
        for (int64_t k = k0; k < k1; ++k) {
          const vf xv = vset(x[k]);
          const float* p = at + k * rp + j0;
          for (int q = 0; q < nv; ++q) acc[q] = vfma(xv, vload(p + q * VW), acc[q]);
        }
      }
      for (int q = 0; q < nv; ++q) tot[q] = k0 == 0 ? acc[q] : tot[q] + acc[q];
    }
    for (int q = 0; q < nv; ++q) vstore(u + j0 + q * VW, tot[q]);
  }
}

// The same for R rows of rank <= NV * VW at once (R * NV independent chains, for the FMA pipeline): u[q][0, rp)
// with rp = NV * VW.
template <int R, int NV>
void lora_shrink_tile(const float* const* x, const float* const* at, int64_t inF, int64_t KC, float* const* u) {
  constexpr int64_t rp = NV * VW;
  vf tot[R][NV];
  for (int q = 0; q < R; ++q)
    for (int v = 0; v < NV; ++v) tot[q][v] = vset(0.0f);
  for (int64_t k0 = 0; k0 < inF; k0 += KC) {
    const int64_t k1 = inF - k0 < KC ? inF : k0 + KC;
    vf acc[R][NV];
    for (int q = 0; q < R; ++q)
      for (int v = 0; v < NV; ++v) acc[q][v] = vset(0.0f);
    for (int64_t k = k0; k < k1; ++k)
      for (int q = 0; q < R; ++q) {
        const vf xv = vset(x[q][k]);
        for (int v = 0; v < NV; ++v) acc[q][v] = vfma(xv, vload(at[q] + k * rp + v * VW), acc[q][v]);
      }
    for (int q = 0; q < R; ++q)
      for (int v = 0; v < NV; ++v) tot[q][v] = k0 == 0 ? acc[q][v] : tot[q][v] + acc[q][v];
  }
  for (int q = 0; q < R; ++q)
    for (int v = 0; v < NV; ++v) vstore(u[q] + v * VW, tot[q][v]);
}

template <bool SCALE>
void lora_expand_rows_t(const float* u, const float* bt, int64_t r, int64_t outF, int64_t ldb, int64_t KC,
                        float alpha, float* out) {
  const vf av = vset(alpha);
  (void)av;
  constexpr int NV = 4;
  for (int64_t o0 = 0; o0 < outF; o0 += NV * VW) {
    const int64_t cols = outF - o0 < NV * VW ? outF - o0 : NV * VW;
    const int nv = (int)((cols + VW - 1) / VW);
    for (int64_t k0 = 0; k0 < r; k0 += KC) {
      const int64_t k1 = r - k0 < KC ? r : k0 + KC;
      vf acc[NV];
      for (int q = 0; q < NV; ++q) acc[q] = vset(0.0f);
      if (nv == NV) {
        for (int64_t k = k0; k < k1; ++k) {
          const vf uv = vset(u[k]);
          const float* p = bt + k * ldb + o0;
          for (int q = 0; q < NV; ++q) acc[q] = vfma(uv, SCALE ? av * vload(p + q * VW) : vload(p + q * VW), acc[q]);
        }
      } else {
        for (int64_t k = k0; k < k1; ++k) {
          const vf uv = vset(u[k]);
          const float* p = bt + k * ldb + o0;
          for (int q = 0; q < nv; ++q) acc[q] = vfma(uv, SCALE ? av * vload(p + q * VW) : vload(p + q * VW), acc[q]);
        }
      }
      for (int q = 0; q < nv; ++q) {
        const int64_t n = cols - q * VW;
        float* c = out + o0 + q * VW;
        vstore_part(c, vload_part(c, n) + acc[q], n);
      }
    }
  }
}

// out[0, outF) += u B'^T for one row, every KC block of the rank added: bt = B^T packed [r, ldb], B' = alpha B
// (bt already holds B' when alpha is 1).
void lora_expand_row(const float* u, const float* bt, int64_t r, int64_t outF, int64_t ldb, int64_t KC, float alpha,
                     float* out) {
  if (alpha != 1.0f) {
    lora_expand_rows_t<true>(u, bt, r, outF, ldb, KC, alpha, out);
  } else {
    lora_expand_rows_t<false>(u, bt, r, outF, ldb, KC, 1.0f, out);
  }
}

// A^T [inF, rp] (zero lanes past r) and B'^T [r, ldb] (zero past outF), B' = alpha B, of one group at dst.
void lora_pack(const float* a, const float* b, int64_t r, float alpha, int64_t inF, int64_t outF, int64_t ldb,
               float* dst) {
  const int64_t rp = lora_round_vw(r);
  lora_transpose<false>(a, r, inF, inF, dst, rp, 1.0f);
  if (alpha != 1.0f) lora_transpose<true>(b, outF, r, r, dst + rp * inF, ldb, alpha);
  else lora_transpose<false>(b, outF, r, r, dst + rp * inF, ldb, 1.0f);
}

// The packed form kept by callers for frozen adapters (LoraRowsGroup::packed): B unscaled, the scale applied to
// B as it is read (the same f32 product as folding it).
int64_t lora_packed_floats_k(int64_t r, int64_t inF, int64_t outF) {
  return lora_round_vw(r) * inF + r * lora_round_vw(outF);
}
void lora_pack_k(const float* a, const float* b, int64_t r, int64_t inF, int64_t outF, float* dst) {
  lora_pack(a, b, r, 1.0f, inF, outF, lora_round_vw(outF), dst);
}

// Scratch floats a group needs packed in a call (none when the caller keeps it packed).
inline int64_t lora_packed_size(const LoraRowsGroup& G, int64_t inF, int64_t ldb) {
  return G.packed ? 0 : lora_round_vw(G.r) * inF + G.r * ldb;
}

// A piece of work: rows list[begin, end) of group g.
struct LoraPiece {
  int64_t g, begin, end;
};

void lora_rows_k(const float* x, float* out, const int32_t* row_group, int64_t rows, int64_t inF, int64_t outF,
                 const LoraRowsGroup* groups, int64_t ngroups, int threads) {
  if (rows <= 0 || outF <= 0 || ngroups <= 0) return;
  const int64_t KC = lora_kc();
  const int64_t ldb = lora_round_vw(outF);
  // the rows of each group (counting sort: start[g] .. start[g + 1] in list)
  // (pieces and chunks: at most one per row)
  int64_t* start = tls_lora_meta.get<int64_t>((size_t)(2 * ngroups + 2 + 5 * rows + 2));
  int64_t* fill = start + ngroups + 1;
  int64_t* list = fill + ngroups + 1;
  LoraPiece* pieces = (LoraPiece*)(list + rows);
  int64_t* chunk_at = list + 4 * rows;
  int64_t npieces = 0, nchunks = 0;
  for (int64_t g = 0; g <= ngroups; ++g) start[g] = 0;
  double flops = 0.0;
  for (int64_t i = 0; i < rows; ++i) {
    const int32_t g = row_group[i];
    if (g < 0) continue;
    start[g + 1]++;
    flops += 2.0 * (double)groups[g].r * (double)(inF + outF);
  }
  for (int64_t g = 0; g < ngroups; ++g) start[g + 1] += start[g];
  if (start[ngroups] == 0) return;
  for (int64_t g = 0; g < ngroups; ++g) fill[g] = start[g];
  for (int64_t i = 0; i < rows; ++i)
    if (row_group[i] >= 0) list[fill[row_group[i]]++] = i;
  // Pieces of at most 32 rows of one group, in chunks whose packed weights stay small (in L1/L2 while their rows
  // run): a chunk packs the groups of its pieces, then runs their rows. Chunks are independent (threads).
  constexpr int64_t kPieceRows = 32, kChunkFloats = 64 * 1024, kChunkRows = 128;
  int64_t cf = 0, cr = 0;  // chunk_at[c]: the first piece of chunk c
  for (int64_t g = 0; g < ngroups; ++g) {
    const int64_t n = start[g + 1] - start[g];
    if (n == 0) continue;
    const int64_t sz = lora_packed_size(groups[g], inF, ldb);
    for (int64_t b = start[g]; b < start[g + 1]; b += kPieceRows) {
      const int64_t e = start[g + 1] - b < kPieceRows ? start[g + 1] : b + kPieceRows;
      if (nchunks == 0 || cf + sz > kChunkFloats || cr + (e - b) > kChunkRows) {
        chunk_at[nchunks++] = npieces;
        cf = 0;
        cr = 0;
      }
      pieces[npieces++] = LoraPiece{g, b, e};
      cf += sz;
      cr += e - b;
    }
  }
  chunk_at[nchunks] = npieces;
  int64_t rpmax = 0, szmax = 0;
  for (int64_t q = 0; q < npieces; ++q) {
    const LoraPiece& p = pieces[q];
    const int64_t rp = lora_round_vw(groups[p.g].r);
    rpmax = rp > rpmax ? rp : rpmax;
    const int64_t sz = lora_packed_size(groups[p.g], inF, ldb);
    szmax = sz > szmax ? sz : szmax;
  }
  const int64_t chunk_floats = kChunkFloats + szmax;  // a chunk ends after the piece that passes kChunkFloats
  const int T = flops < 1.0e6 ? 1 : threads;
  par_tasks(nchunks, T, [&](int64_t c) {
    constexpr int RT = 4;
    const int64_t p0 = chunk_at[c], p1 = chunk_at[c + 1];
    float* pack = tls_lora_pack.get<float>((size_t)(chunk_floats + VW));
    float* ubuf = tls_lora_u.get<float>((size_t)(RT * 2 * VW + rpmax + VW));
    // pack each group of the chunk once (a group's pieces are consecutive)
    const float** at = tls_lora_at.get<const float*>((size_t)(p1 - p0));
    int64_t used = 0;
    for (int64_t p = p0; p < p1; ++p) {
      if (p > p0 && pieces[p].g == pieces[p - 1].g) {
        at[p - p0] = at[p - p0 - 1];
        continue;
      }
      const LoraRowsGroup& G = groups[pieces[p].g];
      if (G.packed) {
        at[p - p0] = G.a;
        continue;
      }
      at[p - p0] = pack + used;
      lora_pack(G.a, G.b, G.r, (float)G.scale, inF, outF, ldb, pack + used);
      used += lora_packed_size(G, inF, ldb);
    }
    // rows of rank <= 2 VW wait in a tile of RT rows of one padded rank, whose shrinks run together
    int nt = 0;
    int64_t tile_rp = 0;
    int64_t tile[RT];
    const float* tile_w[RT];
    const LoraRowsGroup* tile_g[RT];
    auto expand = [&](int64_t i, const LoraRowsGroup& G, const float* w, const float* u) {
      lora_expand_row(u, w + lora_round_vw(G.r) * inF, G.r, outF, ldb, KC, G.packed ? (float)G.scale : 1.0f,
                      out + i * outF);
    };
    auto flush = [&]() {
      const float* xs[RT];
      float* us[RT];
      for (int q = 0; q < nt; ++q) {
        xs[q] = x + tile[q] * inF;
        us[q] = ubuf + q * 2 * VW;
      }
      const int kind = nt * 2 + (tile_rp == VW ? 0 : 1);
      switch (kind) {
        case 2: lora_shrink_tile<1, 1>(xs, tile_w, inF, KC, us); break;
        case 3: lora_shrink_tile<1, 2>(xs, tile_w, inF, KC, us); break;
        case 4: lora_shrink_tile<2, 1>(xs, tile_w, inF, KC, us); break;
        case 5: lora_shrink_tile<2, 2>(xs, tile_w, inF, KC, us); break;
        case 6: lora_shrink_tile<3, 1>(xs, tile_w, inF, KC, us); break;
        case 7: lora_shrink_tile<3, 2>(xs, tile_w, inF, KC, us); break;
        case 8: lora_shrink_tile<4, 1>(xs, tile_w, inF, KC, us); break;
        case 9: lora_shrink_tile<4, 2>(xs, tile_w, inF, KC, us); break;
        default: break;
      }
      for (int q = 0; q < nt; ++q) expand(tile[q], *tile_g[q], tile_w[q], us[q]);
      nt = 0;
    };
    float* u = ubuf + RT * 2 * VW;  // a row alone
    for (int64_t p = p0; p < p1; ++p) {
      const LoraRowsGroup& G = groups[pieces[p].g];
      const float* w = at[p - p0];
      const float alpha = (float)G.scale;
      const int64_t rp = lora_round_vw(G.r);
      for (int64_t li = pieces[p].begin; li < pieces[p].end; ++li) {
        const int64_t i = list[li];
        float* o = out + i * outF;
        if (G.lb) {
          for (int64_t q = 0; q < outF; ++q) o[q] = o[q] + (float)((double)G.lb[q] * G.scale);
        }
        if (G.r <= 0 || alpha == 0.0f) continue;
        if (inF == 0) {
          for (int64_t j = 0; j < rp; ++j) u[j] = 0.0f;
          expand(i, G, w, u);
        } else if (rp <= 2 * VW) {
          if (nt > 0 && rp != tile_rp) flush();
          tile_rp = rp;
          tile[nt] = i;
          tile_w[nt] = w;
          tile_g[nt] = &G;
          if (++nt == RT) flush();
        } else {
          lora_shrink_row(x + i * inF, w, inF, rp, KC, u);
          expand(i, G, w, u);
        }
      }
    }
    flush();
  });
}

}  // namespace
