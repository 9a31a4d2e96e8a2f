// Scalar building blocks shared by the ISA translation units: element loads with dtype conversion and
// the plain packing loops used for edges, unusual strides and the generic ISA.
// Included inside each ISA's namespace (internal linkage through the unnamed namespace).

namespace {

template <int DT>
inline float load1(const void* p, int64_t i) {
  if (DT == kF32) return ((const float*)p)[i];
  if (DT == kBF16) return bf16_to_f32(((const uint16_t*)p)[i]);
  return f16_to_f32_soft(((const uint16_t*)p)[i]);
}

// One MR-row sliver of A: dst[k * mrv + ii] = A(i0 + ii, k0 + k), rows ii >= rows are zero.
template <int DT>
void pack_a_sliver_scalar(const Operand& A, int64_t i0, int64_t rows, int64_t k0, int64_t kc, float* dst, int mrv) {
  for (int64_t ii = 0; ii < mrv; ++ii) {
    if (ii >= rows) {
      for (int64_t k = 0; k < kc; ++k) dst[k * mrv + ii] = 0.0f;
      continue;
    }
    const int64_t base = (i0 + ii) * A.rs + k0 * A.cs;
    for (int64_t k = 0; k < kc; ++k) dst[k * mrv + ii] = load1<DT>(A.p, base + k * A.cs);
  }
}

// One NR-column sliver of B: dst[k * nrv + jj] = B(k0 + k, j0 + jj), columns jj >= cols are zero.
template <int DT>
void pack_b_sliver_scalar(const Operand& B, int64_t k0, int64_t kc, int64_t j0, int64_t cols, float* dst, int nrv) {
  if (B.cs == 1) {
    for (int64_t k = 0; k < kc; ++k) {
      const int64_t base = (k0 + k) * B.rs + j0;
      float* d = dst + k * nrv;
      for (int64_t jj = 0; jj < cols; ++jj) d[jj] = load1<DT>(B.p, base + jj);
      for (int64_t jj = cols; jj < nrv; ++jj) d[jj] = 0.0f;
    }
    return;
  }
  for (int64_t jj = 0; jj < nrv; ++jj) {
    if (jj >= cols) {
      for (int64_t k = 0; k < kc; ++k) dst[k * nrv + jj] = 0.0f;
      continue;
    }
    const int64_t base = k0 * B.rs + (j0 + jj) * B.cs;
    for (int64_t k = 0; k < kc; ++k) dst[k * nrv + jj] = load1<DT>(B.p, base + k * B.rs);
  }
}

// Reference-style tile used by ISAs for partial tiles: C tile from a dense mr x nr f32 product `t` (row stride ts).
inline void store_tile_scalar(const float* t, int64_t ts, float* c, int64_t ldc, int mr, int nr, float alpha,
                              float beta) {
  for (int i = 0; i < mr; ++i) {
    float* crow = c + i * ldc;
    const float* trow = t + i * ts;
    if (beta == 0.0f) {
      for (int j = 0; j < nr; ++j) crow[j] = alpha * trow[j];
    } else {
      for (int j = 0; j < nr; ++j) crow[j] = alpha * trow[j] + beta * crow[j];
    }
  }
}

}  // namespace
