// Fused row kernels: RMSNorm, RoPE, SwiGLU, softmax / log-softmax, cross-entropy, the DoRA weight norm.
// Rows are independent and run in parallel (static ranges); sums over a row are in f64 lanes, as the
// reference sums in f64; column sums over rows (the norm weight's gradient) are per-thread partials added in
// thread order, deterministic for a given thread count.

namespace {

// w (f32, bf16 or f16) as f32 values.
inline const float* weight_f32(const void* w, int wdt, int64_t n, Scratch& s) {
  if (wdt == kOpF32) return (const float*)w;
  float* d = s.get<float>((size_t)n);
  load_row(w, wdt, 0, n, d);
  return d;
}

thread_local Scratch tls_w;

// ---- RMSNorm ----------------------------------------------------------------------------------------------

void rmsnorm_fwd_k(const float* x, const void* w, int wdt, float* y, float* rstd, int64_t rows, int64_t dim,
                   double eps, int threads) {
  Scratch ws;
  const float* wf = weight_f32(w, wdt, dim, ws);
  par_ranges(rows, threads, dim >= 8192 ? 1 : 8192 / (dim + 1) + 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = x + r * dim;
      float* yr = y + r * dim;
      vdh a0 = vdset(0.0), a1 = a0;
      int64_t j = 0;
      for (; j + VW <= dim; j += VW) {
        const vf u = vload(xr + j);
        const vdh l = lo_d(u), h = hi_d(u);
        a0 += l * l;
        a1 += h * h;
      }
      double ss = hsumd(a0 + a1);
      for (; j < dim; ++j) ss += (double)xr[j] * (double)xr[j];
      // rstd rounded to f32 first: the saved value and the one used here agree exactly
      const float s = (float)(1.0 / sqrt(ss / (double)dim + eps));
      rstd[r] = s;
      const vf sv = vset(s);
      for (j = 0; j + VW <= dim; j += VW) {
        const vf t = vload(xr + j) * sv;
        vstore(yr + j, t * vload(wf + j));
      }
      for (; j < dim; ++j) {
        const float t = xr[j] * s;
        yr[j] = t * wf[j];
      }
    }
  });
}

void rmsnorm_bwd_k(const float* g, const float* x, const void* w, int wdt, const float* rstd, float* dx, float* dw,
                   int64_t rows, int64_t dim, int threads) {
  Scratch ws;
  const float* wf = weight_f32(w, wdt, dim, ws);
  int64_t T = threads;
  if ((double)rows * (double)dim < 32768.0) T = 1;
  if (T > rows) T = rows < 1 ? 1 : rows;
  double* part = nullptr;
  if (dw) {
    part = (double*)calloc((size_t)(T * dim), sizeof(double));
    if (!part) abort();
  }
  par_ranges(T, (int)T, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = split_range(rows, T, t), r1 = split_range(rows, T, t + 1);
      double* dwp = part ? part + t * dim : nullptr;
      for (int64_t r = r0; r < r1; ++r) {
        const float* gr = g + r * dim;
        const float* xr = x + r * dim;
        const double s = (double)rstd[r];
        if (dwp) {
          for (int64_t j = 0; j < dim; ++j) dwp[j] += (double)gr[j] * (double)xr[j] * s;
        }
        if (dx) {
          vdh a0 = vdset(0.0), a1 = a0;
          int64_t j = 0;
          for (; j + VW <= dim; j += VW) {
            const vf gv = vload(gr + j), wv = vload(wf + j), xv = vload(xr + j);
            a0 += lo_d(gv) * lo_d(wv) * lo_d(xv);
            a1 += hi_d(gv) * hi_d(wv) * hi_d(xv);
          }
          double dot = hsumd(a0 + a1);
          for (; j < dim; ++j) dot += (double)gr[j] * (double)wf[j] * (double)xr[j];
          const double c = (s * s * dot) / (double)dim;
          float* dr = dx + r * dim;
          const vdh sv = vdset(s), cv = vdset(c);
          for (j = 0; j + VW <= dim; j += VW) {
            const vf gv = vload(gr + j), wv = vload(wf + j), xv = vload(xr + j);
            const vdh lo = sv * (lo_d(gv) * lo_d(wv) - lo_d(xv) * cv);
            const vdh hi = sv * (hi_d(gv) * hi_d(wv) - hi_d(xv) * cv);
            vstore(dr + j, from_d(lo, hi));
          }
          for (; j < dim; ++j) dr[j] = (float)(s * ((double)gr[j] * (double)wf[j] - (double)xr[j] * c));
        }
      }
    }
  });
  if (dw) {
    for (int64_t j = 0; j < dim; ++j) {
      double a = 0.0;
      for (int64_t t = 0; t < T; ++t) a += part[t * dim + j];
      dw[j] = (float)a;
    }
    free(part);
  }
}

// ---- RoPE -------------------------------------------------------------------------------------------------

// out = x rotated by sign * angle; angles f32(pos * invFreq[j]) as HF computes them, cos/sin and the rotation
// in f64 as the reference.
//
// A training step rotates q and k of every layer, forward and backward, over the same positions: the cos/sin
// of a call over many positions are kept (per calling thread) and reused while the positions and frequencies
// are the same, which spares the step 4 x layers - 1 of its 4 x layers tables of libm sincos (most of the op).
// Decoding's few positions keep a table of their own (so a prefill's stays), reused by q and k of every layer.
struct RopeTable {
  std::vector<int32_t> pos;
  std::vector<float> freq;
  std::vector<double> cs, sn;  // [t][half]: cos and sin (unsigned) of position t's angles
};
thread_local RopeTable tls_rope, tls_rope_few;

inline void rope_angles(float p, const float* inv_freq, int64_t half, double* cs, double* sn) {
  for (int64_t j = 0; j < half; ++j) {
    const float a = p * inv_freq[j];
    sincos((double)a, &sn[j], &cs[j]);
  }
}

void rope_k(const float* x, const int32_t* pos, const float* inv_freq, int64_t half, float* out, int64_t bt, int64_t H,
            int64_t D, int sign, int threads) {
  const bool in_place = x == out;
  RopeTable& tab = bt >= 64 ? tls_rope : tls_rope_few;
  if (!((int64_t)tab.pos.size() == bt && (int64_t)tab.freq.size() == half &&
                  memcmp(tab.pos.data(), pos, (size_t)bt * 4) == 0 &&
                  memcmp(tab.freq.data(), inv_freq, (size_t)half * 4) == 0)) {
    tab.pos.assign(pos, pos + bt);
    tab.freq.assign(inv_freq, inv_freq + half);
    tab.cs.resize((size_t)(bt * half));
    tab.sn.resize((size_t)(bt * half));
    double* cs = tab.cs.data();
    double* sn = tab.sn.data();
    par_ranges(bt, threads, 16, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) rope_angles((float)pos[t], inv_freq, half, cs + t * half, sn + t * half);
    });
  }
  const double sg = (double)sign;
  par_ranges(bt, threads, 4, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const double* c0 = tab.cs.data() + t * half;
      const double* s0 = tab.sn.data() + t * half;
      for (int64_t h = 0; h < H; ++h) {
        const float* xi = x + (t * H + h) * D;
        float* oi = out + (t * H + h) * D;
        int64_t j = 0;
        for (; j + VDW <= half; j += VDW) {
          vdh x1, x2;
          for (int l = 0; l < VDW; ++l) {
            x1[l] = xi[j + l];
            x2[l] = xi[j + half + l];
          }
          const vdh c = vdload(c0 + j), s = vdload(s0 + j) * sg;
          const vdh y1 = x1 * c - x2 * s, y2 = x2 * c + x1 * s;
          for (int l = 0; l < VDW; ++l) {
            oi[j + l] = (float)y1[l];
            oi[j + half + l] = (float)y2[l];
          }
        }
        for (; j < half; ++j) {
          const double x1 = xi[j], x2 = xi[j + half], s = sg * s0[j];
          oi[j] = (float)(x1 * c0[j] - x2 * s);
          oi[j + half] = (float)(x2 * c0[j] + x1 * s);
        }
        if (!in_place)
          for (int64_t d = 2 * half; d < D; ++d) oi[d] = xi[d];
      }
    }
  });
}

// ---- SwiGLU -----------------------------------------------------------------------------------------------

void swiglu_fwd_k(const float* gate, const float* up, float* out, int64_t n, int threads) {
  par_ranges(n, threads, 16384, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; i += VW) {
      const int64_t m = i1 - i < VW ? i1 - i : VW;
      const vf v = vload_part(gate + i, m), u = vload_part(up + i, m);
      vstore_part(out + i, v * sigmoid_v(v) * u, m);
    }
  });
}

void swiglu_bwd_k(const float* g, const float* gate, const float* up, float* dgate, float* dup, int64_t n,
                  int threads) {
  par_ranges(n, threads, 16384, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; i += VW) {
      const int64_t m = i1 - i < VW ? i1 - i : VW;
      const vf v = vload_part(gate + i, m), gi = vload_part(g + i, m);
      vf s, oms;
      sigmoid2_v(v, s, oms);
      if (dgate) {
        const vf u = vload_part(up + i, m);
        vstore_part(dgate + i, gi * u * s * (vset(1.0f) + v * oms), m);
      }
      if (dup) vstore_part(dup + i, gi * v * s, m);
    }
  });
}

// ---- softmax / log-softmax --------------------------------------------------------------------------------

// Row maximum (NaN if the row has one) and sum(exp(x - max)) in f64 lanes; exp values stored to e if non-null.
inline float row_max(const float* x, int64_t n) {
  vf m = vset(-INFINITY);
  vi nan = vi{};
  int64_t j = 0;
  for (; j + VW <= n; j += VW) {
    const vf v = vload(x + j);
    m = vmax(m, v);
    nan |= v != v;
  }
  float r = hmax_nan(m);
  for (int i = 0; i < VW; ++i)
    if (nan[i]) r = NAN;
  for (; j < n; ++j)
    if (x[j] > r || x[j] != x[j]) r = x[j];
  return r;
}

// sum(exp(x - m)) over a row: f32 partial sums over chunks of 16 vectors, added in f64 (the f32 error stays that
// of a 256-term sum); the exp values are stored to e when non-null.
inline double row_expsum(const float* x, int64_t n, float m, float* e) {
  vdh a0 = vdset(0.0), a1 = a0;
  const vf mv = vset(m);
  int64_t j = 0;
  while (j < n) {
    const int64_t end = n - j > 16 * VW ? j + 16 * VW : n;
    vf s0 = vset(0.0f), s1 = s0;
    for (; j + 2 * VW <= end; j += 2 * VW) {
      const vf v0 = vexp_neg(vload(x + j) - mv), v1 = vexp_neg(vload(x + j + VW) - mv);
      if (e) {
        vstore(e + j, v0);
        vstore(e + j + VW, v1);
      }
      s0 += v0;
      s1 += v1;
    }
    for (; j < end; j += VW) {
      const int64_t c = end - j < VW ? end - j : VW;
      vf v = vexp_neg(vload_part(x + j, c) - mv);
      if (c < VW)
        for (int64_t l = c; l < VW; ++l) v[l] = 0.0f;
      if (e) vstore_part(e + j, v, c);
      s0 += v;
    }
    const vf s = s0 + s1;
    a0 += lo_d(s);
    a1 += hi_d(s);
  }
  return hsumd(a0 + a1);
}

void softmax_fwd_k(const float* x, float* out, int64_t rows, int64_t cols, int log_, int threads) {
  par_ranges(rows, threads, cols >= 8192 ? 1 : 8192 / (cols + 1) + 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = x + r * cols;
      float* o = out + r * cols;
      const float m = row_max(xr, cols);
      if (m == -INFINITY) {
        const float fillv = log_ ? -INFINITY : 0.0f;
        for (int64_t j = 0; j < cols; ++j) o[j] = fillv;
        continue;
      }
      if (log_) {
        const double lse = (double)m + log(row_expsum(xr, cols, m, nullptr));
        for (int64_t j = 0; j < cols; ++j) o[j] = (float)((double)xr[j] - lse);
      } else {
        const double inv = 1.0 / row_expsum(xr, cols, m, o);
        const vdh iv = vdset(inv);
        int64_t j = 0;
        for (; j + VW <= cols; j += VW) {
          const vf e = vload(o + j);
          vstore(o + j, from_d(lo_d(e) * iv, hi_d(e) * iv));
        }
        for (; j < cols; ++j) o[j] = (float)((double)o[j] * inv);
      }
    }
  });
}

void softmax_bwd_k(const float* g, const float* y, float* dx, int64_t rows, int64_t cols, int log_, int threads) {
  par_ranges(rows, threads, cols >= 8192 ? 1 : 8192 / (cols + 1) + 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* gr = g + r * cols;
      const float* yr = y + r * cols;
      float* o = dx + r * cols;
      if (log_) {
        const double gs = sum_d(gr, cols);
        const vdh gsv = vdset(gs);
        for (int64_t j = 0; j < cols; j += VW) {
          const int64_t c = cols - j < VW ? cols - j : VW;
          const vf gv = vload_part(gr + j, c), e = vexp_neg(vload_part(yr + j, c));
          vstore_part(o + j, from_d(lo_d(gv) - lo_d(e) * gsv, hi_d(gv) - hi_d(e) * gsv), c);
        }
      } else {
        vdh a0 = vdset(0.0), a1 = a0;
        for (int64_t j = 0; j < cols; j += VW) {
          const int64_t c = cols - j < VW ? cols - j : VW;
          const vf gv = vload_part(gr + j, c), yv = vload_part(yr + j, c);
          a0 += lo_d(gv) * lo_d(yv);
          a1 += hi_d(gv) * hi_d(yv);
        }
        const vdh dot = vdset(hsumd(a0 + a1));
        for (int64_t j = 0; j < cols; j += VW) {
          const int64_t c = cols - j < VW ? cols - j : VW;
          const vf gv = vload_part(gr + j, c), yv = vload_part(yr + j, c);
          vstore_part(o + j, from_d(lo_d(yv) * (lo_d(gv) - dot), hi_d(yv) * (hi_d(gv) - dot)), c);
        }
      }
    }
  });
}

// ---- cross-entropy ----------------------------------------------------------------------------------------

// Per row: lse (f32 out), the row loss (f64 in a scratch); returns the sum of the row losses in row order.
double ce_fwd_k(const float* logits, const int32_t* targets, float* lse, float* row_loss, int64_t rows, int64_t vocab,
                int32_t ignore, int threads) {
  double* loss = (double*)malloc((size_t)(rows > 0 ? rows : 1) * sizeof(double));
  if (!loss) abort();
  par_ranges(rows, threads, vocab >= 8192 ? 1 : 8192 / (vocab + 1) + 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int32_t t = targets[r];
      if (t == ignore) {
        lse[r] = 0.0f;
        loss[r] = 0.0;
        continue;
      }
      const float* x = logits + r * vocab;
      const float m = row_max(x, vocab);
      const double l = (double)m + log(row_expsum(x, vocab, m, nullptr));
      lse[r] = (float)l;
      loss[r] = l - (double)x[t];
    }
  });
  double total = 0.0;
  for (int64_t r = 0; r < rows; ++r) {
    total += loss[r];
    if (row_loss) row_loss[r] = (float)loss[r];
  }
  free(loss);
  return total;
}

// dlogits = (softmax - onehot) * scale_r; scale_r = grad_rows[r] when grad_rows, else shared_scale.
void ce_bwd_k(const float* grad_rows, float shared_scale, const float* logits, const int32_t* targets, const float* lse,
              float* dlogits, int64_t rows, int64_t vocab, int32_t ignore, int threads) {
  par_ranges(rows, threads, vocab >= 8192 ? 1 : 8192 / (vocab + 1) + 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int32_t t = targets[r];
      float* o = dlogits + r * vocab;
      if (t == ignore) {
        memset(o, 0, (size_t)vocab * 4);
        continue;
      }
      const float* x = logits + r * vocab;
      const float s = grad_rows ? grad_rows[r] : shared_scale;
      const vf lv = vset(lse[r]), sv = vset(s);
      int64_t j = 0;
      for (; j + VW <= vocab; j += VW) vstore(o + j, vexp_neg(vload(x + j) - lv) * sv);
      if (j < vocab) vstore_n(o + j, vexp_neg(vload_n(x + j, vocab - j) - lv) * sv, vocab - j);
      o[t] = (sexp(x[t] - lse[r]) - 1.0f) * s;
    }
  });
}

// ---- DoRA weight norm -------------------------------------------------------------------------------------

// out[o] = || W[o, :] + scale * B[o, :] A ||, f64 throughout. Rows in blocks of 8 (W read in whichever layout
// as contiguous runs).
void lora_weight_norm_k(const void* w, int wdt, const float* a, const float* b, float scale, float* out, int64_t outF,
                        int64_t inF, int64_t r, int transposed, int threads) {
  constexpr int OB = 8;
  const int64_t nblk = (outF + OB - 1) / OB;
  par_ranges(nblk, threads, 1, [&](int64_t b0, int64_t b1) {
    double* row = tls_w.get<double>((size_t)(OB * inF + VDW));
    float* tmp = (float*)nullptr;
    Scratch ts;
    tmp = ts.get<float>((size_t)(inF > OB ? inF : OB));
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t o0 = blk * OB;
      const int64_t no = outF - o0 < OB ? outF - o0 : OB;
      if (transposed) {
        for (int64_t i = 0; i < inF; ++i) {
          load_row(w, wdt, i * outF + o0, no, tmp);
          for (int64_t q = 0; q < no; ++q) row[q * inF + i] = (double)tmp[q];
        }
      } else {
        for (int64_t q = 0; q < no; ++q) {
          load_row(w, wdt, (o0 + q) * inF, inF, tmp);
          double* rq = row + q * inF;
          for (int64_t i = 0; i < inF; ++i) rq[i] = (double)tmp[i];
        }
      }
      for (int64_t q = 0; q < no; ++q) {
        double* rq = row + q * inF;
        for (int64_t j = 0; j < r; ++j) {
          const double bv = (double)scale * (double)b[(o0 + q) * r + j];
          if (bv == 0.0) continue;
          const float* aj = a + j * inF;
          for (int64_t i = 0; i < inF; ++i) rq[i] += bv * (double)aj[i];
        }
        double s = 0.0;
        vdh acc = vdset(0.0);
        int64_t i = 0;
        for (; i + VDW <= inF; i += VDW) {
          const vdh v = vdload(rq + i);
          acc += v * v;
        }
        s = hsumd(acc);
        for (; i < inF; ++i) s += rq[i] * rq[i];
        out[o0 + q] = (float)sqrt(s);
      }
    }
  });
}

}  // namespace
