// The GEMM driver: cache blocking, packing, threading, the skinny (GEMV-like) path and batching.
//
// This file is included once by each ISA translation unit, inside that ISA's namespace, after the ISA has
// defined (all with internal linkage or inside its own namespace):
//   constexpr int MR, NR;                          micro-tile: MR rows of C (A broadcast), NR columns (B vectors)
//   int64_t g_kc, g_mb, g_nb;                      cache blocks: K depth, rows of A per packed block, columns of B
//   void pack_a(const Operand&, i0, mb, k0, kc, float* Ap)    MR-row slivers, k-major, zero padded
//   void pack_b(const Operand&, k0, kc, j0, nb, float* Bp)    NR-column slivers, k-major, zero padded
//   void ukr(kc, Ap, Bp, C, ldc, mr, nr, alpha, beta)          C tile = alpha * Ap.Bp + beta * C (beta 0: no read)
//   void skinny_dot(...) / skinny_axpy(...)                    see run_skinny below
//   double fma_peak_thread(double ms, int64_t* flops)
//   uint64_t read_sum(const uint8_t*, int64_t bytes)
//
// Loop order (BLIS, written for row-major C with the vector dimension along N):
//   per thread rectangle of C:  ic (MB rows, A block -> L2/L3)  ->  pc (KC)  -> pack A
//                               -> jc (NB columns, B block -> L2) -> pack B
//                               -> jr (MR slivers of A: one stays in L1) -> ir (NR slivers of B) -> micro-kernel
// Threads split C into a tm x tn grid of rectangles; each thread packs what its rectangle needs, so there is no
// barrier inside a GEMM. With 2 threads that packs one operand twice (once per thread); packing is a few
// percent of the time (perf, 2048^3 NT on Zen 4: pack A 3.5%, pack B 2.3%, micro-kernel the rest), so
// cooperative packing could save at most ~2% and would add a barrier per K block.

// The including TU has already included <stdlib.h>, <string.h>, <time.h> and (under _OPENMP) <omp.h> at global
// scope, and gemm_scalar.h inside its namespace.

#include "par.h"

namespace {

double now_seconds() {
#ifdef _OPENMP
  return omp_get_wtime();
#else
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
#endif
}

// Per-thread packing buffers, grown on demand and kept (OpenMP threads persist between calls).
struct Workspace {
  float* a = nullptr;
  float* b = nullptr;
  int64_t a_cap = 0, b_cap = 0;
  ~Workspace() {
    free(a);
    free(b);
  }
};
thread_local Workspace tls_ws;

float* grow(float*& p, int64_t& cap, int64_t need) {
  if (need > cap) {
    free(p);
    int64_t bytes = round_up(need * (int64_t)sizeof(float) + 256, 64);
    p = (float*)aligned_alloc(64, (size_t)bytes);
    cap = p ? need : 0;
  }
  return p;
}

// C = beta * C for the whole M x N block (K == 0 or alpha == 0).
void scale_c(const GemmCall& g) {
  for (int64_t i = 0; i < g.M; ++i) {
    float* c = g.C + i * g.ldc;
    if (g.beta == 0.0f) {
      for (int64_t j = 0; j < g.N; ++j) c[j] = 0.0f;
    } else if (g.beta != 1.0f) {
      for (int64_t j = 0; j < g.N; ++j) c[j] *= g.beta;
    }
  }
}

// The blocked GEMM over the rows [m0, m1) and columns [n0, n1) of C, on one thread.
void gemm_rect(const GemmCall& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  if (m1 <= m0 || n1 <= n0) return;
  const int64_t KC = g_kc, MB = g_mb, NB = g_nb;
  Workspace& ws = tls_ws;
  float* Ap = grow(ws.a, ws.a_cap, round_up(min64(MB, m1 - m0), MR) * KC + 64);
  float* Bp = grow(ws.b, ws.b_cap, round_up(min64(NB, n1 - n0), NR) * KC + 64);
  if (!Ap || !Bp) abort();  // out of memory for a few MB of buffers: nothing sensible left to do
  for (int64_t ic = m0; ic < m1; ic += MB) {
    const int64_t mb = min64(MB, m1 - ic);
    for (int64_t pc = 0; pc < g.K; pc += KC) {
      const int64_t kc = min64(KC, g.K - pc);
      const float beta = pc == 0 ? g.beta : 1.0f;
      pack_a(g.A, ic, mb, pc, kc, Ap);
      for (int64_t jc = n0; jc < n1; jc += NB) {
        const int64_t nb = min64(NB, n1 - jc);
        pack_b(g.B, pc, kc, jc, nb, Bp);
        for (int64_t jr = 0; jr < mb; jr += MR) {
          const float* a = Ap + (jr / MR) * MR * kc;
          const int mr = (int)min64(MR, mb - jr);
          float* crow = g.C + (ic + jr) * g.ldc + jc;
          for (int64_t ir = 0; ir < nb; ir += NR) {
            ukr(kc, a, Bp + (ir / NR) * NR * kc, crow + ir, g.ldc, mr, (int)min64(NR, nb - ir), g.alpha, beta);
          }
        }
      }
    }
  }
}

// Splits `n` units into `parts` near-equal ranges; returns the start of range `i`.
int64_t split_at(int64_t n, int64_t parts, int64_t i) { return (n / parts) * i + min64(i, n % parts); }

void gemm_blocked(const GemmCall& g, int threads) {
  const int64_t ms = ceil_div(g.M, MR), ns = ceil_div(g.N, NR);
  int T = (int)min64(threads, ms * ns);
  if (T <= 1) {
    gemm_rect(g, 0, g.M, 0, g.N);
    return;
  }
  // Grid tm x tn == T minimising (critical-path multiply time + packing per thread), in rough cycles.
  int best_tm = 1;
  double best_cost = 1e300;
  for (int tm = 1; tm <= T; ++tm) {
    if (T % tm) continue;
    const int tn = T / tm;
    if (tm > ms || tn > ns) continue;
    const double rows = (double)ceil_div(ms, tm) * MR, cols = (double)ceil_div(ns, tn) * NR;
    const double cost = rows * cols * (double)g.K / 16.0 + (rows + cols) * (double)g.K;
    if (cost < best_cost) {
      best_cost = cost;
      best_tm = tm;
    }
  }
  const int tm = best_tm, tn = T / tm;
  par_tasks_n(T, [&](int q) {
    const int r = q / tn, c = q % tn;
    const int64_t i0 = split_at(ms, tm, r) * MR, i1 = min64(split_at(ms, tm, r + 1) * MR, g.M);
    const int64_t j0 = split_at(ns, tn, c) * NR, j1 = min64(split_at(ns, tn, c + 1) * NR, g.N);
    gemm_rect(g, i0, i1, j0, j1);
  });
}

// Skinny products: S (<= kSkinny) rows of a small operand X against L rows of a large one W, streamed once.
//   out(s, l) = alpha * sum_k X(s, k) W(l, k) + beta * out(s, l),   out(s, l) at O[s * ors + l * ocs]
// X is packed to f32 rows of ldx (K rounded up to 16, zero padded). W is read in place: skinny_dot when it is
// contiguous along k (the Linear weight layout [N, K]), skinny_axpy when contiguous along l.
constexpr int64_t kSkinny = 16;
constexpr int64_t kSkinnyLongK = 512;  // see gemm_one

struct Skinny {
  int64_t S, L, K;
  float alpha, beta;
  const float* X;
  int64_t ldx;
  Operand W;  // (l, k)
  float* O;
  int64_t ors, ocs;
};

void pack_x(const Operand& X, int64_t S, int64_t K, float* Xp, int64_t ldx) {
  for (int64_t s = 0; s < S; ++s) {
    float* dst = Xp + s * ldx;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t idx = s * X.rs + k * X.cs;
      float v;
      if (X.dtype == kF32) {
        v = ((const float*)X.p)[idx];
      } else if (X.dtype == kBF16) {
        v = bf16_to_f32(((const uint16_t*)X.p)[idx]);
      } else {
        v = f16_to_f32_soft(((const uint16_t*)X.p)[idx]);
      }
      dst[k] = v;
    }
    for (int64_t k = K; k < ldx; ++k) dst[k] = 0.0f;
  }
}

void run_skinny(const Skinny& sk, int threads, int64_t align) {
  // Each thread takes a contiguous range of W rows (multiples of `align` so vector tiles stay whole).
  const int64_t units = ceil_div(sk.L, align);
  int T = (int)min64(threads, units);
  if ((double)sk.S * (double)sk.L * (double)sk.K < 65536.0) T = 1;
  auto body = [&](int t) {
    const int64_t l0 = split_at(units, T, t) * align, l1 = min64(split_at(units, T, t + 1) * align, sk.L);
    if (l1 <= l0) return;
    if (sk.W.cs == 1) {
      skinny_dot(sk, l0, l1);
    } else {
      skinny_axpy(sk, l0, l1);
    }
  };
  if (T <= 1) {
    body(0);
    return;
  }
  par_tasks_n(T, [&](int q) { body(q); });
}

// Routes one GEMM: skinny when M or N is small, blocked otherwise. The skinny path packs X into the calling
// thread's workspace; the threads it starts only read it.
void gemm_one(const GemmCall& g, int threads) {
  if (g.M <= 0 || g.N <= 0) return;
  if (g.K <= 0 || g.alpha == 0.0f) {
    scale_c(g);
    return;
  }
  // Few rows over a long K (LoRA's dA = du^T x, K = the batch's tokens): the ISA's skinny_tn where it has one
  // (AVX2: A and B read in place), else the blocked kernel, which amortises its packing there: 16 x 688 x 2048
  // ran at 65 GFLOP/s skinny and 98 blocked (AVX2). Few columns stay skinny at any K (blocked was slower:
  // 60 -> 36 GFLOP/s for 256 x 16 x 2048).
  if (g.M <= kSkinny && g.M <= g.N && g.K >= kSkinnyLongK && skinny_tn(g, threads)) return;
  const bool small_m = g.M <= kSkinny && g.M <= g.N && g.K < kSkinnyLongK;
  const bool small_n = !small_m && g.N <= kSkinny;
  if (small_m || small_n) {
    Skinny sk;
    Operand X;
    if (small_m) {  // X = A (i, k); W(l = j, k) = B(k, j); out(i, j) = C[i * ldc + j]
      X = g.A;
      sk.W = Operand{g.B.p, g.B.dtype, g.B.cs, g.B.rs};
      sk.S = g.M;
      sk.L = g.N;
      sk.ors = g.ldc;
      sk.ocs = 1;
    } else {  // X(s = j, k) = B(k, j); W(l = i, k) = A(i, k); out(j, i) = C[i * ldc + j]
      X = Operand{g.B.p, g.B.dtype, g.B.cs, g.B.rs};
      sk.W = g.A;
      sk.S = g.N;
      sk.L = g.M;
      sk.ors = 1;
      sk.ocs = g.ldc;
    }
    if (sk.W.cs == 1 || sk.W.rs == 1) {
      sk.K = g.K;
      sk.alpha = g.alpha;
      sk.beta = g.beta;
      sk.ldx = round_up(g.K, 16);
      sk.O = g.C;
      Workspace& ws = tls_ws;
      float* Xp = grow(ws.a, ws.a_cap, sk.S * sk.ldx + 64);
      if (!Xp) abort();
      pack_x(X, sk.S, g.K, Xp, sk.ldx);
      sk.X = Xp;
      run_skinny(sk, threads, sk.W.cs == 1 ? 8 : 64);
      return;
    }
  }
  if (2.0 * (double)g.M * (double)g.N * (double)g.K < 2.0e6) threads = 1;
  gemm_blocked(g, threads);
}

void gemm_entry(const GemmCall& g, int threads) { gemm_one(g, threads < 1 ? 1 : threads); }

// Cache blocking, for tuning from the bench (values <= 0 keep the current one). Returns the values in use.
void blocking_entry(int64_t kc, int64_t mb, int64_t nb, int64_t out[3]) {
  if (kc > 0) g_kc = round_up(kc, 16);
  if (mb > 0) g_mb = round_up(mb, MR);
  if (nb > 0) g_nb = round_up(nb, NR);
  out[0] = g_kc;
  out[1] = g_mb;
  out[2] = g_nb;
}

void gemm_batched_entry(const BatchedCall& b, int threads) {
  if (threads < 1) threads = 1;
  const GemmCall& g0 = b.g;
  const int elsA = g0.A.dtype == kF32 ? 4 : 2, elsB = g0.B.dtype == kF32 ? 4 : 2;
  auto nth = [&](int64_t i) {
    GemmCall g = g0;
    g.A.p = (const char*)g0.A.p + i * b.sa * elsA;
    g.B.p = (const char*)g0.B.p + i * b.sb * elsB;
    g.C = g0.C + i * b.sc;
    return g;
  };
  const double flops = 2.0 * (double)g0.M * (double)g0.N * (double)g0.K;
  // Many small GEMMs (attention heads): one whole GEMM per thread. Few or big ones: thread inside each.
  const bool across = threads > 1 && b.batch >= threads && (b.batch % threads == 0 || b.batch >= 4 * threads) &&
                      flops < 2.0 * 512.0 * 512.0 * 512.0;
  if (!across) {
    for (int64_t i = 0; i < b.batch; ++i) gemm_one(nth(i), threads);
    return;
  }
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t i = 0; i < b.batch; ++i) gemm_one(nth(i), 1);
}

double fma_peak_entry(int threads, double ms) {
  if (threads < 1) threads = 1;
  double total = 0.0;
  const double t0 = now_seconds();
#pragma omp parallel num_threads(threads) reduction(+ : total)
  {
    int64_t flops = 0;
    fma_peak_thread(ms, &flops);
    total += (double)flops;
  }
  const double dt = now_seconds() - t0;
  return total / dt * 1e-9;
}

MemBandwidth mem_bandwidth_entry(int64_t bytes, int threads) {
  MemBandwidth r{0.0, 0.0};
  if (threads < 1) threads = 1;
  bytes = round_up(max64(bytes, 2 << 20), 2 << 20);
  uint8_t* buf = (uint8_t*)aligned_alloc(2 << 20, (size_t)bytes);
  if (!buf) return r;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  // in huge pages where the system allows, as the decoding layout's weights are (emptyHuge): the bound then
  // is what the memory can stream, not what 4 KiB pages' TLB misses leave of it
  madvise(buf, (size_t)bytes, MADV_HUGEPAGE);
#endif
  const int64_t chunks = bytes / 4096;
  // First touch from the threads that will read, then a read pass and a copy pass (best of 3 each).
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t c = 0; c < chunks; ++c) memset(buf + c * 4096, (int)(c & 0x7f), 4096);
  volatile uint64_t sink = 0;
  for (int rep = 0; rep < 3; ++rep) {
    uint64_t acc = 0;
    const double t0 = now_seconds();
#pragma omp parallel num_threads(threads) reduction(+ : acc)
    {
#ifdef _OPENMP
      const int t = omp_get_thread_num(), n = omp_get_num_threads();
#else
      const int t = 0, n = 1;
#endif
      const int64_t c0 = split_at(chunks, n, t), c1 = split_at(chunks, n, t + 1);
      acc += read_sum(buf + c0 * 4096, (c1 - c0) * 4096);
    }
    const double dt = now_seconds() - t0;
    sink = sink + acc;
    const double gbs = (double)bytes / dt * 1e-9;
    if (gbs > r.read_gbs) r.read_gbs = gbs;
  }
  const int64_t half = chunks / 2;
  for (int rep = 0; rep < 3; ++rep) {
    const double t0 = now_seconds();
#pragma omp parallel num_threads(threads)
    {
#ifdef _OPENMP
      const int t = omp_get_thread_num(), n = omp_get_num_threads();
#else
      const int t = 0, n = 1;
#endif
      const int64_t c0 = split_at(half, n, t), c1 = split_at(half, n, t + 1);
      memcpy(buf + (half + c0) * 4096, buf + c0 * 4096, (size_t)(c1 - c0) * 4096);
    }
    const double dt = now_seconds() - t0;
    const double gbs = 2.0 * (double)(half * 4096) / dt * 1e-9;  // bytes read + bytes written, as STREAM
    if (gbs > r.copy_gbs) r.copy_gbs = gbs;
  }
  free(buf);
  return r;
}

}  // namespace
