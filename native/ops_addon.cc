// N-API entry points of the op kernels (the GEMM's are in addon.cc, which calls init_ops from its Init).
//
// Each function checks that every element a kernel can touch lies inside its typed array (RangeError
// otherwise; TypeError for an array of the wrong type) before calling the kernels of the ISA addon.cc
// selected. Shapes and semantics are checked by the TypeScript side (src/backend/cpu/native.ts), which
// also raises the library's own errors (IndexError for a bad id or target) before calling in.
#include <napi.h>
#include <stdint.h>
#include <string.h>

#include <functional>
#include <string>
#include <vector>

#include "ops_common.h"

namespace lowrank {

namespace {

int (*g_get_isa)() = nullptr;
int (*g_get_threads)() = nullptr;

const OpsImpl* ops() {
  const int isa = g_get_isa ? g_get_isa() : 0;
#if defined(__x86_64__) || defined(_M_X64)
  if (isa == 2) return ops_avx512();
  if (isa == 1) return ops_avx2();
#endif
  (void)isa;
  return ops_generic();
}
int threads() {
  const int t = g_get_threads ? g_get_threads() : 1;
  return t < 1 ? 1 : t;
}

[[noreturn]] void range_error(const Napi::Env& env, const std::string& msg) {
  throw Napi::RangeError::New(env, "lowrank_native: " + msg);
}
[[noreturn]] void type_error(const Napi::Env& env, const std::string& msg) {
  throw Napi::TypeError::New(env, "lowrank_native: " + msg);
}

constexpr double kMaxInt = 9007199254740991.0;

// Argument reader: positional, with a name for messages.
struct Args {
  const Napi::CallbackInfo& info;
  const char* fn;
  size_t base = 0;   // where this op's arguments start in info (a plan's planAdd has two before them)
  int64_t dyn = 0;   // > 0: a plan's op whose KV position advances with the step's L (see planDynamic)
  Napi::Env env() const { return info.Env(); }
  Napi::Value arg(size_t i) const { return info[base + i]; }
  size_t nargs() const { return info.Length() > base ? info.Length() - base : 0; }

  [[noreturn]] void fail_type(size_t i, const std::string& what) const {
    type_error(env(), std::string(fn) + ": argument " + std::to_string(i) + " " + what);
  }
  void count(size_t n) const {
    if (nargs() != n)
      type_error(env(), std::string(fn) + " takes " + std::to_string(n) + " arguments, got " +
                            std::to_string(nargs()));
  }
  double num(size_t i) const {
    if (i >= nargs() || !arg(i).IsNumber()) fail_type(i, "must be a number");
    return arg(i).As<Napi::Number>().DoubleValue();
  }
  int64_t integer(size_t i, int64_t min = 0) const {
    const double v = num(i);
    // range first: converting a double beyond int64 to an integer is undefined behaviour
    if (!(v >= (double)min && v <= kMaxInt) || v != (double)(int64_t)v)
      range_error(env(), std::string(fn) + ": argument " + std::to_string(i) + " must be an integer >= " +
                             std::to_string(min) + ", got " + std::to_string(v));
    return (int64_t)v;
  }
  bool flag(size_t i) const {
    if (i < nargs() && arg(i).IsBoolean()) return arg(i).As<Napi::Boolean>().Value();
    const double v = num(i);
    return v != 0.0;
  }
  bool is_null(size_t i) const { return i >= nargs() || arg(i).IsNull() || arg(i).IsUndefined(); }
  // A typed array of the given kind: 'f' Float32Array, 'h' Uint16Array, 'i' Int32Array, 'b' Uint8Array,
  // 'd' Float64Array. Returns its data and element count.
  void* array(size_t i, char kind, int64_t* length) const {
    if (i >= nargs() || !arg(i).IsTypedArray()) fail_type(i, "must be a typed array");
    Napi::TypedArray ta = arg(i).As<Napi::TypedArray>();
    napi_typedarray_type want = napi_float32_array;
    const char* name = "Float32Array";
    switch (kind) {
      case 'h': want = napi_uint16_array; name = "Uint16Array"; break;
      case 'i': want = napi_int32_array; name = "Int32Array"; break;
      case 'b': want = napi_uint8_array; name = "Uint8Array"; break;
      case 'd': want = napi_float64_array; name = "Float64Array"; break;
      default: break;
    }
    if (ta.TypedArrayType() != want) fail_type(i, std::string("must be a ") + name);
    *length = (int64_t)ta.ElementLength();
    return (uint8_t*)ta.ArrayBuffer().Data() + ta.ByteOffset();
  }
  static char kind_of(int dt) { return dt == kOpF32 ? 'f' : dt == kOpI32 ? 'i' : dt == kOpU8 ? 'b' : 'h'; }
  static int esize(int dt) { return dt == kOpF32 || dt == kOpI32 ? 4 : dt == kOpU8 ? 1 : 2; }
  int dtype(size_t i, int max = 2) const {
    const int64_t d = integer(i);
    if (d > max) range_error(env(), std::string(fn) + ": dtype code " + std::to_string(d) + " is not supported here");
    return (int)d;
  }
  // Pointer to element `off` of array i (of dtype dt) after checking that [off, off + n) lies inside it.
  void* span(size_t i, int dt, int64_t off, int64_t n) const {
    int64_t len = 0;
    void* p = array(i, kind_of(dt), &len);
    if (off < 0 || n < 0 || off > len || n > len - off)
      range_error(env(), std::string(fn) + ": argument " + std::to_string(i) + " has " + std::to_string(len) +
                             " elements, the kernel touches [" + std::to_string(off) + ", " + std::to_string(off + n) +
                             ")");
    return (uint8_t*)p + off * esize(dt);
  }
  float* f32(size_t i, int64_t off, int64_t n) const { return (float*)span(i, kOpF32, off, n); }
  float* f32_or_null(size_t i, int64_t off, int64_t n) const { return is_null(i) ? nullptr : f32(i, off, n); }
  int32_t* i32(size_t i, int64_t off, int64_t n) const { return (int32_t*)span(i, kOpI32, off, n); }
  const double* desc(size_t i, int64_t n) const {
    int64_t len = 0;
    const double* d = (const double*)array(i, 'd', &len);
    if (len < n) range_error(env(), std::string(fn) + ": descriptor too short");
    return d;
  }
};

int64_t to_i(const Args& a, double v, const char* what, int64_t min = 0) {
  if (!(v >= (double)min && v <= kMaxInt) || v != (double)(int64_t)v)
    range_error(a.env(), std::string(a.fn) + ": " + what + " must be an integer >= " + std::to_string(min));
  return (int64_t)v;
}

// A plan's step: its L (positions already in the KV cache) and key mask; ops that do not depend on them
// ignore it. Ops called directly run with L = 0 and no mask.
struct Dyn {
  Napi::Env env;
  int64_t L;
  const int32_t* mask;  // i32 [B, Tk] for a dynamic attention, or null
  int64_t mask_len;     // elements available at mask
};
// An op with its arguments checked and converted: run now (an entry point) or at every step (a plan).
using Thunk = std::function<void(const Dyn&)>;

Napi::Value run_now(const Args& a, const Thunk& t) {
  if (t) t(Dyn{a.env(), 0, nullptr, 0});
  return a.env().Undefined();
}

// A strided view (desc: ndim, shape[4], strides[4] at `at`): fills s, st; returns the touched range relative
// to the offset [lo, hi) (empty when the view is empty).
void strided(const Args& a, const double* d, int at_strides, Strided4& s, int64_t st[4], int64_t* lo, int64_t* hi) {
  s.ndim = (int)to_i(a, d[0], "ndim", 1);
  if (s.ndim > 4) range_error(a.env(), std::string(a.fn) + ": at most 4 dimensions");
  bool empty = false;
  for (int k = 0; k < s.ndim; ++k) {
    s.shape[k] = to_i(a, d[1 + k], "shape");
    if (s.shape[k] == 0) empty = true;
  }
  int64_t l = 0, h = 0;
  for (int k = 0; k < s.ndim; ++k) {
    const double v = d[at_strides + k];
    if (!(v >= -kMaxInt && v <= kMaxInt) || v != (double)(int64_t)v)
      range_error(a.env(), std::string(a.fn) + ": bad stride");
    st[k] = (int64_t)v;
    const int64_t ext = st[k] * (s.shape[k] > 0 ? s.shape[k] - 1 : 0);
    if (ext < 0) l += ext;
    else h += ext;
  }
  *lo = empty ? 0 : l;
  *hi = empty ? 0 : h + 1;
}

// ---- core -------------------------------------------------------------------------------------------------

// binary(op, a, aOff, b, bOff, out, outOff, desc[13] = ndim, shape[4], aStrides[4], bStrides[4])
Thunk prep_binary(const Args& a) {
  a.count(8);
  const int op = (int)a.integer(0);
  if (op > kEq) range_error(a.env(), "binary: unknown op");
  const double* d = a.desc(7, 13);
  Strided4 s;
  int64_t as[4], bs[4], alo, ahi, blo, bhi;
  strided(a, d, 5, s, as, &alo, &ahi);
  strided(a, d, 9, s, bs, &blo, &bhi);
  int64_t n = 1;
  for (int k = 0; k < s.ndim; ++k) n *= s.shape[k];
  const int64_t aOff = a.integer(2), bOff = a.integer(4), oOff = a.integer(6);
  if (n == 0) return nullptr;
  const float* pa = a.f32(1, aOff + alo, ahi - alo) - alo;
  const float* pb = a.f32(3, bOff + blo, bhi - blo) - blo;
  float* po = a.f32(5, oOff, n);
  return [=](const Dyn&) { ops()->binary(op, s, pa, as, pb, bs, po, threads()); };
}
Napi::Value Binary(const Napi::CallbackInfo& info) {
  Args a{info, "binary"};
  return run_now(a, prep_binary(a));
}

// unary(op, x, xOff, out, outOff, n, scalar)
Napi::Value Unary(const Napi::CallbackInfo& info) {
  Args a{info, "unary"};
  a.count(7);
  const int op = (int)a.integer(0);
  if (op >= kUnaryCount) range_error(a.env(), "unary: unknown op");
  const int64_t n = a.integer(5);
  const float* x = a.f32(1, a.integer(2), n);
  float* o = a.f32(3, a.integer(4), n);
  ops()->unary(op, x, o, n, a.num(6), threads());
  return a.env().Undefined();
}

// reduce(op, x, xOff, out, outOff, outer, n, inner)
Napi::Value Reduce(const Napi::CallbackInfo& info) {
  Args a{info, "reduce"};
  a.count(8);
  const int op = (int)a.integer(0);
  if (op > kRMin) range_error(a.env(), "reduce: unknown op");
  const int64_t outer = a.integer(5), n = a.integer(6), inner = a.integer(7);
  const float* x = a.f32(1, a.integer(2), outer * n * inner);
  float* o = a.f32(3, a.integer(4), outer * inner);
  ops()->reduce(op, x, o, outer, n, inner, threads());
  return a.env().Undefined();
}

// copy(src, srcOff, srcDtype, dst, dstOff, dstDtype, desc[13] = ndim, shape[4], srcStrides[4], dstStrides[4])
Thunk prep_copy(const Args& a) {
  a.count(7);
  const int sdt = a.dtype(2, 4), ddt = a.dtype(5, 4);
  if (sdt != ddt && (sdt > 2 || ddt > 2)) range_error(a.env(), "copy: integer dtypes copy only to themselves");
  const double* d = a.desc(6, 13);
  Strided4 s;
  int64_t ss[4], ds[4], slo, shi, dlo, dhi;
  strided(a, d, 5, s, ss, &slo, &shi);
  strided(a, d, 9, s, ds, &dlo, &dhi);
  if (shi == 0) return nullptr;
  const int se = Args::esize(sdt), de = Args::esize(ddt);
  const char* ps = (const char*)a.span(0, sdt, a.integer(1) + slo, shi - slo) - slo * se;
  char* pd = (char*)a.span(3, ddt, a.integer(4) + dlo, dhi - dlo) - dlo * de;
  // a plan's write into the KV cache: L * step elements further at each step, inside the array
  const int64_t step = a.dyn;
  int64_t room = 0;
  if (step > 0) {
    int64_t len = 0;
    a.array(3, Args::kind_of(ddt), &len);
    room = len - (a.integer(4) + dhi);
  }
  const char* fn = a.fn;
  return [=](const Dyn& y) {
    char* to = pd;
    if (step > 0) {
      if (y.L < 0 || y.L > room / step) range_error(y.env, std::string(fn) + ": position beyond the cache");
      to += y.L * step * de;
    }
    ops()->copy(s, ps, sdt, ss, to, ddt, ds, threads());
  };
}
Napi::Value Copy(const Napi::CallbackInfo& info) {
  Args a{info, "copy"};
  return run_now(a, prep_copy(a));
}

// fill(dst, off, n, dtype, value): f32 value, or the raw bits for bf16/f16
Napi::Value Fill(const Napi::CallbackInfo& info) {
  Args a{info, "fill"};
  a.count(5);
  const int dt = a.dtype(3);
  const int64_t n = a.integer(2);
  void* p = a.span(0, dt, a.integer(1), n);
  ops()->fill(p, dt, n, a.num(4), threads());
  return a.env().Undefined();
}

// Checks ids in [0, rows); returns the position of the first bad one or -1.
int64_t bad_index(const int32_t* idx, int64_t n, int64_t rows, int32_t skip) {
  for (int64_t i = 0; i < n; ++i)
    if (idx[i] != skip && (idx[i] < 0 || idx[i] >= rows)) return i;
  return -1;
}

// gatherRows(x, xOff, xDtype, xRows, idx, idxOff, count, cols, out, outOff, outDtype)
Napi::Value GatherRows(const Napi::CallbackInfo& info) {
  Args a{info, "gatherRows"};
  a.count(11);
  const int xdt = a.dtype(2, 4), odt = a.dtype(10, 4);
  if (xdt != odt && (xdt > 2 || odt > 2)) range_error(a.env(), "gatherRows: integer dtypes copy only to themselves");
  const int64_t rows = a.integer(3), count = a.integer(6), cols = a.integer(7);
  const void* x = a.span(0, xdt, a.integer(1), rows * cols);
  const int32_t* idx = a.i32(4, a.integer(5), count);
  void* o = a.span(8, odt, a.integer(9), count * cols);
  if (bad_index(idx, count, rows, INT32_MIN) >= 0) range_error(a.env(), "gatherRows: index out of range");
  ops()->gather_rows(x, xdt, idx, count, cols, o, odt, threads());
  return a.env().Undefined();
}

// scatterAddRows(g, gOff, idx, idxOff, count, cols, out, outOff, outRows, skip)
Napi::Value ScatterAddRows(const Napi::CallbackInfo& info) {
  Args a{info, "scatterAddRows"};
  a.count(10);
  const int64_t count = a.integer(4), cols = a.integer(5), rows = a.integer(8);
  const float* g = a.f32(0, a.integer(1), count * cols);
  const int32_t* idx = a.i32(2, a.integer(3), count);
  float* o = a.f32(6, a.integer(7), rows * cols);
  const double sk = a.num(9);
  const int32_t skip = sk < -2147483648.0 || sk > 2147483647.0 ? INT32_MIN : (int32_t)sk;
  if (bad_index(idx, count, rows, skip) >= 0) range_error(a.env(), "scatterAddRows: index out of range");
  ops()->scatter_add_rows(g, idx, count, cols, o, skip, threads());
  return a.env().Undefined();
}

// ---- GEMM -------------------------------------------------------------------------------------------------

int64_t mul_ck(const Napi::Env& env, int64_t x, int64_t y) {
  int64_t r;
  if (__builtin_mul_overflow(x, y, &r)) range_error(env, "size overflow");
  return r;
}

// A matrix rows x cols (leading dim ld) at off, repeated batch times `stride` apart: checks it fits, returns
// the byte range touched.
void check_mat(const Args& a, size_t arg, int dt, int64_t rows, int64_t cols, int64_t ld, int64_t off, int64_t batch,
               int64_t stride, const char* name, const uint8_t** b0, const uint8_t** b1, const void** base) {
  if (ld < (cols > 1 ? cols : 1))
    range_error(a.env(), std::string("gemmRows: leading dimension of ") + name + " is less than its columns");
  *b0 = *b1 = nullptr;
  if (rows == 0 || cols == 0 || batch == 0) {
    *base = a.span(arg, dt, 0, 0);
    return;
  }
  const int64_t last = mul_ck(a.env(), rows - 1, ld) + (cols - 1) + mul_ck(a.env(), batch - 1, stride);
  const uint8_t* p = (const uint8_t*)a.span(arg, dt, off, last + 1);
  *base = p;
  *b0 = p;
  *b1 = p + (last + 1) * Args::esize(dt);
}

// gemmRows: the arguments of gemmBatched (native-addon.ts), with the row-invariant semantics of ops_gemm.h.
Thunk prep_gemm_rows(const Args& a) {
  a.count(22);
  const int64_t batch = a.integer(0);
  const bool ta = a.flag(1), tb = a.flag(2);
  const int64_t M = a.integer(3), N = a.integer(4), K = a.integer(5);
  const float alpha = (float)a.num(6);
  const int64_t aOff = a.integer(8), lda = a.integer(9, 1), sA = a.integer(10);
  const int adt = a.dtype(11);
  const int64_t bOff = a.integer(13), ldb = a.integer(14, 1), sB = a.integer(15);
  const int bdt = a.dtype(16);
  const float beta = (float)a.num(17);
  const int64_t cOff = a.integer(19), ldc = a.integer(20, 1), sC = a.integer(21);
  if (batch == 0) return nullptr;
  const uint8_t *a0, *a1, *b0, *b1, *c0, *c1;
  const void *pa, *pb, *pc;
  check_mat(a, 7, adt, ta ? K : M, ta ? M : K, lda, aOff, batch, sA, "A", &a0, &a1, &pa);
  check_mat(a, 12, bdt, tb ? N : K, tb ? K : N, ldb, bOff, batch, sB, "B", &b0, &b1, &pb);
  check_mat(a, 18, kOpF32, M, N, ldc, cOff, batch, sC, "C", &c0, &c1, &pc);
  if (batch > 1 && M > 0 && N > 0) {
    const bool sequential = sC >= (M - 1) * ldc + N;
    const bool interleaved = sC >= N && (batch - 1) * sC + N <= ldc;
    if (!sequential && !interleaved) range_error(a.env(), "gemmRows: strideC makes the C matrices overlap");
  }
  if (c0 && a0 && c0 < a1 && a0 < c1) range_error(a.env(), "gemmRows: C overlaps A in memory");
  if (c0 && b0 && c0 < b1 && b0 < c1) range_error(a.env(), "gemmRows: C overlaps B in memory");
  RowGemm r;
  r.g.M = M;
  r.g.N = N;
  r.g.K = K;
  r.g.alpha = alpha;
  r.g.beta = beta;
  r.g.A = Operand{pa, adt, ta ? 1 : lda, ta ? lda : 1};
  r.g.B = Operand{pb, bdt, tb ? 1 : ldb, tb ? ldb : 1};
  r.g.C = (float*)pc;
  r.g.ldc = ldc;
  r.batch = batch;
  r.sa = sA;
  r.sb = sB;
  r.sc = sC;
  return [=](const Dyn&) { ops()->gemm_rows(r, threads()); };
}
Napi::Value GemmRows(const Napi::CallbackInfo& info) {
  Args a{info, "gemmRows"};
  return run_now(a, prep_gemm_rows(a));
}

// ---- norm, rope, activations, softmax ---------------------------------------------------------------------

// rmsNormForward(x, xOff, w, wOff, wDtype, y, yOff, rstd, rOff, rows, dim, eps)
Thunk prep_rmsnorm_fwd(const Args& a) {
  a.count(12);
  const int64_t rows = a.integer(9), dim = a.integer(10);
  const int wdt = a.dtype(4);
  const float* x = a.f32(0, a.integer(1), rows * dim);
  const void* w = a.span(2, wdt, a.integer(3), dim);
  float* y = a.f32(5, a.integer(6), rows * dim);
  float* rs = a.f32(7, a.integer(8), rows);
  const double eps = a.num(11);
  return [=](const Dyn&) { ops()->rmsnorm_fwd(x, w, wdt, y, rs, rows, dim, eps, threads()); };
}
Napi::Value RmsNormForward(const Napi::CallbackInfo& info) {
  Args a{info, "rmsNormForward"};
  return run_now(a, prep_rmsnorm_fwd(a));
}

// rmsNormBackward(g, gOff, x, xOff, w, wOff, wDtype, rstd, rOff, dx|null, dxOff, dw|null, dwOff, rows, dim)
Napi::Value RmsNormBackward(const Napi::CallbackInfo& info) {
  Args a{info, "rmsNormBackward"};
  a.count(15);
  const int64_t rows = a.integer(13), dim = a.integer(14);
  const int wdt = a.dtype(6);
  const float* g = a.f32(0, a.integer(1), rows * dim);
  const float* x = a.f32(2, a.integer(3), rows * dim);
  const void* w = a.span(4, wdt, a.integer(5), dim);
  const float* rs = a.f32(7, a.integer(8), rows);
  float* dx = a.f32_or_null(9, a.integer(10), rows * dim);
  float* dw = a.f32_or_null(11, a.integer(12), dim);
  ops()->rmsnorm_bwd(g, x, w, wdt, rs, dx, dw, rows, dim, threads());
  return a.env().Undefined();
}

// rope(x, xOff, pos, posOff, invFreq, fOff, half, out, outOff, bt, H, D, sign)
Thunk prep_rope(const Args& a) {
  a.count(13);
  const int64_t half = a.integer(6), bt = a.integer(9), H = a.integer(10), D = a.integer(11);
  if (2 * half > D) range_error(a.env(), "rope: rotary dims exceed the head dim");
  const float* x = a.f32(0, a.integer(1), bt * H * D);
  const int32_t* pos = a.i32(2, a.integer(3), bt);
  const float* f = a.f32(4, a.integer(5), half);
  float* o = a.f32(7, a.integer(8), bt * H * D);
  const int sign = a.num(12) < 0 ? -1 : 1;
  return [=](const Dyn&) { ops()->rope(x, pos, f, half, o, bt, H, D, sign, threads()); };
}
Napi::Value Rope(const Napi::CallbackInfo& info) {
  Args a{info, "rope"};
  return run_now(a, prep_rope(a));
}

// swigluForward(gate, gOff, up, uOff, out, oOff, n)
Thunk prep_swiglu_fwd(const Args& a) {
  a.count(7);
  const int64_t n = a.integer(6);
  const float* g = a.f32(0, a.integer(1), n);
  const float* u = a.f32(2, a.integer(3), n);
  float* o = a.f32(4, a.integer(5), n);
  return [=](const Dyn&) { ops()->swiglu_fwd(g, u, o, n, threads()); };
}
Napi::Value SwigluForward(const Napi::CallbackInfo& info) {
  Args a{info, "swigluForward"};
  return run_now(a, prep_swiglu_fwd(a));
}

// swigluBackward(g, gOff, gate, gaOff, up, uOff, dGate|null, dgOff, dUp|null, duOff, n)
Napi::Value SwigluBackward(const Napi::CallbackInfo& info) {
  Args a{info, "swigluBackward"};
  a.count(11);
  const int64_t n = a.integer(10);
  ops()->swiglu_bwd(a.f32(0, a.integer(1), n), a.f32(2, a.integer(3), n), a.f32(4, a.integer(5), n),
                    a.f32_or_null(6, a.integer(7), n), a.f32_or_null(8, a.integer(9), n), n, threads());
  return a.env().Undefined();
}

// softmaxForward(x, xOff, out, oOff, rows, cols, log)
Napi::Value SoftmaxForward(const Napi::CallbackInfo& info) {
  Args a{info, "softmaxForward"};
  a.count(7);
  const int64_t rows = a.integer(4), cols = a.integer(5);
  ops()->softmax_fwd(a.f32(0, a.integer(1), rows * cols), a.f32(2, a.integer(3), rows * cols), rows, cols,
                     a.flag(6) ? 1 : 0, threads());
  return a.env().Undefined();
}

// softmaxBackward(g, gOff, y, yOff, dx, dOff, rows, cols, log)
Napi::Value SoftmaxBackward(const Napi::CallbackInfo& info) {
  Args a{info, "softmaxBackward"};
  a.count(9);
  const int64_t rows = a.integer(6), cols = a.integer(7);
  ops()->softmax_bwd(a.f32(0, a.integer(1), rows * cols), a.f32(2, a.integer(3), rows * cols),
                     a.f32(4, a.integer(5), rows * cols), rows, cols, a.flag(8) ? 1 : 0, threads());
  return a.env().Undefined();
}

// ---- attention --------------------------------------------------------------------------------------------

// desc: B, Tq, Tk, Hq, Hkv, D, qOff, qs[3], kOff, ks[3], vOff, vs[3], scale, maskOff, seqOff, window
void parse_attn(const Args& a, size_t at, AttnArgs& r, const double* d) {
  r.B = to_i(a, d[0], "B");
  r.Tq = to_i(a, d[1], "Tq");
  r.Tk = to_i(a, d[2], "Tk");
  r.Hq = to_i(a, d[3], "Hq", 1);
  r.Hkv = to_i(a, d[4], "Hkv", 1);
  r.D = to_i(a, d[5], "D", 1);
  if (r.Hq % r.Hkv) range_error(a.env(), "attention: Hq must be a multiple of Hkv");
  if (r.Tq > r.Tk) range_error(a.env(), "attention: Tq > Tk");
  const void* arrs[3];
  int dts[3];
  int64_t* strides[3] = {r.qs, r.ks, r.vs};
  const int64_t T[3] = {r.Tq, r.Tk, r.Tk};
  const int64_t H[3] = {r.Hq, r.Hkv, r.Hkv};
  for (int t = 0; t < 3; ++t) {
    dts[t] = a.dtype(at + 2 * t + 1);
    const int64_t off = to_i(a, d[6 + 4 * t], "offset");
    int64_t last = 0;
    for (int k = 0; k < 3; ++k) {
      strides[t][k] = to_i(a, d[7 + 4 * t + k], "stride");
      const int64_t ext = k == 0 ? r.B : k == 1 ? T[t] : H[t];
      if (ext == 0) last = -1;
      if (last >= 0) last += (ext - 1) * strides[t][k];
    }
    const int64_t n = r.B == 0 || T[t] == 0 ? 0 : last + r.D;
    arrs[t] = (const char*)a.span(at + 2 * t, dts[t], off, n);
  }
  r.q = arrs[0];
  r.qdt = dts[0];
  r.k = arrs[1];
  r.kdt = dts[1];
  r.v = arrs[2];
  r.vdt = dts[2];
  r.scale = (float)d[18];
  r.window = to_i(a, d[21], "window");
  const size_t im = at + 6;
  r.key_mask = nullptr;
  r.mask_i32 = a.flag(im + 1) ? 1 : 0;
  if (!a.is_null(im)) r.key_mask = a.span(im, r.mask_i32 ? kOpI32 : kOpU8, to_i(a, d[19], "maskOff"), r.B * r.Tk);
  r.seq_ids = a.is_null(im + 2) ? nullptr : a.i32(im + 2, to_i(a, d[20], "seqOff"), r.B * r.Tk);
}

// attentionForward(q, qdt, k, kdt, v, vdt, mask|null, maskI32, seq|null, out, outOff, lse, lseOff, desc)
Thunk prep_attn_fwd(const Args& a) {
  a.count(14);
  AttnArgs r;
  const double* d = a.desc(13, 22);
  parse_attn(a, 0, r, d);
  float* out = a.f32(9, a.integer(10), r.B * r.Tq * r.Hq * r.D);
  float* lse = a.f32(11, a.integer(12), r.B * r.Hq * r.Tq);
  if (a.dyn <= 0) return [=](const Dyn&) { ops()->attn_fwd(r, out, lse, threads()); };
  // a plan's attention over the KV cache: Tk = (the recorded Tk) + L, the key mask the step's
  if (r.key_mask || r.seq_ids) range_error(a.env(), "planAdd: a dynamic attention takes its key mask from planRun");
  int64_t room[2];
  for (int t = 0; t < 2; ++t) {
    int64_t len = 0;
    a.array(2 + 2 * t, Args::kind_of(t ? r.vdt : r.kdt), &len);
    room[t] = len - to_i(a, d[10 + 4 * t], "offset");
  }
  const char* fn = a.fn;
  return [=](const Dyn& y) {
    AttnArgs q = r;
    if (y.L < 0) range_error(y.env, std::string(fn) + ": negative position");
    q.Tk = r.Tk + y.L;
    for (int t = 0; t < 2; ++t) {
      const int64_t* st = t ? q.vs : q.ks;
      const int64_t last = (q.B - 1) * st[0] + (q.Tk - 1) * st[1] + (q.Hkv - 1) * st[2] + q.D;
      if (q.B > 0 && last > room[t]) range_error(y.env, std::string(fn) + ": keys beyond the cache");
    }
    if (y.mask) {
      if (y.mask_len < q.B * q.Tk) range_error(y.env, std::string(fn) + ": key mask shorter than B x Tk");
      q.key_mask = y.mask;
      q.mask_i32 = 1;
    }
    ops()->attn_fwd(q, out, lse, threads());
  };
}
Napi::Value AttentionForward(const Napi::CallbackInfo& info) {
  Args a{info, "attentionForward"};
  return run_now(a, prep_attn_fwd(a));
}

// attentionBackward(q, qdt, k, kdt, v, vdt, mask|null, maskI32, seq|null, out, outOff, lse, lseOff, gOut, gOff,
//                   dq|null, dqOff, dk|null, dkOff, dv|null, dvOff, desc)
Napi::Value AttentionBackward(const Napi::CallbackInfo& info) {
  Args a{info, "attentionBackward"};
  a.count(22);
  AttnArgs r;
  parse_attn(a, 0, r, a.desc(21, 22));
  const int64_t nq = r.B * r.Tq * r.Hq * r.D, nk = r.B * r.Tk * r.Hkv * r.D;
  const float* out = a.f32(9, a.integer(10), nq);
  const float* lse = a.f32(11, a.integer(12), r.B * r.Hq * r.Tq);
  const float* g = a.f32(13, a.integer(14), nq);
  float* dq = a.f32_or_null(15, a.integer(16), nq);
  float* dk = a.f32_or_null(17, a.integer(18), nk);
  float* dv = a.f32_or_null(19, a.integer(20), nk);
  ops()->attn_bwd(r, out, lse, g, dq, dk, dv, threads());
  return a.env().Undefined();
}

// ---- loss, optimizer, dropout, lora -----------------------------------------------------------------------

// crossEntropyForward(logits, lOff, targets, tOff, lse, lseOff, rowLoss|null, rlOff, rows, vocab, ignore) -> sum
Napi::Value CrossEntropyForward(const Napi::CallbackInfo& info) {
  Args a{info, "crossEntropyForward"};
  a.count(11);
  const int64_t rows = a.integer(8), vocab = a.integer(9);
  const float* x = a.f32(0, a.integer(1), rows * vocab);
  const int32_t* t = a.i32(2, a.integer(3), rows);
  float* lse = a.f32(4, a.integer(5), rows);
  float* rl = a.f32_or_null(6, a.integer(7), rows);
  const int32_t ignore = (int32_t)a.num(10);
  for (int64_t r = 0; r < rows; ++r)
    if (t[r] != ignore && (t[r] < 0 || t[r] >= vocab)) range_error(a.env(), "crossEntropyForward: target out of range");
  return Napi::Number::New(a.env(), ops()->ce_fwd(x, t, lse, rl, rows, vocab, ignore, threads()));
}

// crossEntropyBackward(gradRows|null, grOff, sharedScale, logits, lOff, targets, tOff, lse, lseOff, dlogits, dOff,
//                      rows, vocab, ignore)
Napi::Value CrossEntropyBackward(const Napi::CallbackInfo& info) {
  Args a{info, "crossEntropyBackward"};
  a.count(14);
  const int64_t rows = a.integer(11), vocab = a.integer(12);
  const float* gr = a.f32_or_null(0, a.integer(1), rows);
  const float* x = a.f32(3, a.integer(4), rows * vocab);
  const int32_t* t = a.i32(5, a.integer(6), rows);
  const float* lse = a.f32(7, a.integer(8), rows);
  float* dl = a.f32(9, a.integer(10), rows * vocab);
  const int32_t ignore = (int32_t)a.num(13);
  for (int64_t r = 0; r < rows; ++r)
    if (t[r] != ignore && (t[r] < 0 || t[r] >= vocab)) range_error(a.env(), "crossEntropyBackward: target out of range");
  ops()->ce_bwd(gr, (float)a.num(2), x, t, lse, dl, rows, vocab, ignore, threads());
  return a.env().Undefined();
}

// adamwStep(p, pOff, g, gOff, m, mOff, v, vOff, n, desc[9])
Napi::Value AdamwStep(const Napi::CallbackInfo& info) {
  Args a{info, "adamwStep"};
  a.count(10);
  const int64_t n = a.integer(8);
  const double* d = a.desc(9, 9);
  AdamWScalars s{d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7], d[8]};
  ops()->adamw(a.f32(0, a.integer(1), n), a.f32(2, a.integer(3), n), a.f32(4, a.integer(5), n),
               a.f32(6, a.integer(7), n), n, s, threads());
  return a.env().Undefined();
}

// sumSquares(x, off, n) -> number
Napi::Value SumSquares(const Napi::CallbackInfo& info) {
  Args a{info, "sumSquares"};
  a.count(3);
  const int64_t n = a.integer(2);
  return Napi::Number::New(a.env(), ops()->sum_squares(a.f32(0, a.integer(1), n), n, threads()));
}

// argmax(x, xOff, n): the first index of the largest of n floats (0 when none exceeds -inf)
Napi::Value Argmax(const Napi::CallbackInfo& info) {
  Args a{info, "argmax"};
  a.count(3);
  const int64_t n = a.integer(2);
  return Napi::Number::New(a.env(), (double)ops()->argmax(a.f32(0, a.integer(1), n), n));
}

// dropout(x, xOff, out, oOff, n, threshold, scale, key0, key1)
Napi::Value Dropout(const Napi::CallbackInfo& info) {
  Args a{info, "dropout"};
  a.count(9);
  const int64_t n = a.integer(4);
  const int64_t thr = a.integer(5);
  ops()->dropout(a.f32(0, a.integer(1), n), a.f32(2, a.integer(3), n), n, thr, a.num(6), (uint32_t)a.integer(7),
                 (uint32_t)a.integer(8), threads());
  return a.env().Undefined();
}

// loraWeightNorm(w, wOff, wDtype, a, aOff, b, bOff, scale, out, oOff, outF, inF, r, transposed)
Napi::Value LoraWeightNorm(const Napi::CallbackInfo& info) {
  Args a{info, "loraWeightNorm"};
  a.count(14);
  const int64_t outF = a.integer(10), inF = a.integer(11), r = a.integer(12);
  const int wdt = a.dtype(2);
  const void* w = a.span(0, wdt, a.integer(1), outF * inF);
  ops()->lora_weight_norm(w, wdt, a.f32(3, a.integer(4), r * inF), a.f32(5, a.integer(6), outF * r), (float)a.num(7),
                          a.f32(8, a.integer(9), outF), outF, inF, r, a.flag(13) ? 1 : 0, threads());
  return a.env().Undefined();
}

// loraRows(x, xOff, out, oOff, rows, inF, outF, rowGroup, rgOff, desc, ngroups, ...buffers): the weights live in
// the ArrayBuffers passed last (each once; plain arguments, as reading them out of an array costs more than the
// kernel on small models). desc[8 * ngroups] per group: aBuffer, aOff, bBuffer, bOff, r, scale, biasBuffer (-1:
// none), biasOff, with buffers as argument indexes from 0 and offsets in floats from the buffer's start;
// rowGroup[i] in [-1, ngroups).
Napi::Value LoraRows(const Napi::CallbackInfo& info) {
  Args a{info, "loraRows"};
  if (info.Length() < 11) a.count(11);
  const int64_t rows = a.integer(4), inF = a.integer(5), outF = a.integer(6), ng = a.integer(10);
  const float* x = a.f32(0, a.integer(1), mul_ck(a.env(), rows, inF));
  float* out = a.f32(2, a.integer(3), mul_ck(a.env(), rows, outF));
  const int32_t* rg = a.i32(7, a.integer(8), rows);
  const double* d = a.desc(9, mul_ck(a.env(), ng, 8));
  const napi_env env = a.env();
  const size_t nbuf = info.Length() - 11;
  constexpr size_t kStack = 256;
  const float* ptr_s[kStack];
  int64_t len_s[kStack];
  std::vector<const float*> ptr_v;
  std::vector<int64_t> len_v;
  const float** ptr = ptr_s;
  int64_t* len = len_s;
  if (nbuf > kStack) {
    ptr_v.resize(nbuf);
    len_v.resize(nbuf);
    ptr = ptr_v.data();
    len = len_v.data();
  }
  for (size_t k = 0; k < nbuf; ++k) {
    void* data = nullptr;
    size_t bytes = 0;
    bool is_ab = false;
    if (napi_is_arraybuffer(env, info[11 + k], &is_ab) != napi_ok || !is_ab ||
        napi_get_arraybuffer_info(env, info[11 + k], &data, &bytes) != napi_ok)
      a.fail_type(11 + k, "must be an ArrayBuffer");
    ptr[k] = (const float*)data;
    len[k] = (int64_t)(bytes / 4);
  }
  std::vector<LoraRowsGroup> groups((size_t)ng);
  auto span = [&](double which, double off, int64_t n, const char* what) -> const float* {
    if (!(which >= 0 && which < (double)nbuf && off >= 0 && off <= kMaxInt) || which != (double)(int64_t)which ||
        off != (double)(int64_t)off)
      range_error(a.env(), std::string("loraRows: ") + what + ": bad buffer index or offset");
    const int64_t k = (int64_t)which, o = (int64_t)off;
    if (o > len[k] || n > len[k] - o)
      range_error(a.env(), std::string("loraRows: ") + what + " has " + std::to_string(len[k]) +
                               " floats, the kernel touches [" + std::to_string(o) + ", " + std::to_string(o + n) + ")");
    return ptr[k] + o;
  };
  for (int64_t g = 0; g < ng; ++g) {
    const double* e = d + 8 * g;
    LoraRowsGroup& G = groups[g];
    if (!(e[4] >= 0 && e[4] <= 1e9) || e[4] != (double)(int64_t)e[4]) range_error(a.env(), "loraRows: bad rank");
    G.r = (int64_t)e[4];
    G.packed = e[2] < 0;  // lora_A's buffer holds loraPack's output
    if (G.packed) {
      G.a = span(e[0], e[1], ops()->lora_packed_floats(G.r, inF, outF), "packed lora weights");
      G.b = nullptr;
    } else {
      G.a = span(e[0], e[1], mul_ck(a.env(), G.r, inF), "lora_A");
      G.b = span(e[2], e[3], mul_ck(a.env(), outF, G.r), "lora_B");
    }
    G.lb = e[6] < 0 ? nullptr : span(e[6], e[7], outF, "lora_B bias");
    G.scale = e[5];
  }
  for (int64_t i = 0; i < rows; ++i)
    if (rg[i] < -1 || rg[i] >= ng) range_error(a.env(), "loraRows: row group out of range");
  ops()->lora_rows(x, out, rg, rows, inF, outF, groups.data(), ng, threads());
  return a.env().Undefined();
}

// loraPackedFloats(r, inF, outF): the size of one adapter's packed weights for loraRows, in this ISA's layout.
Napi::Value LoraPackedFloats(const Napi::CallbackInfo& info) {
  Args a{info, "loraPackedFloats"};
  a.count(3);
  const int64_t r = a.integer(0), inF = a.integer(1), outF = a.integer(2);
  mul_ck(a.env(), r, inF);
  mul_ck(a.env(), r, outF);
  return Napi::Number::New(a.env(), (double)ops()->lora_packed_floats(r, inF, outF));
}

// loraPack(a, aOff, b, bOff, r, inF, outF, out, outOff): lora_A [r, inF] and lora_B [outF, r] packed into out
// (loraPackedFloats floats), for loraRows groups whose lora_B buffer index is -1.
Napi::Value LoraPack(const Napi::CallbackInfo& info) {
  Args a{info, "loraPack"};
  a.count(9);
  const int64_t r = a.integer(4), inF = a.integer(5), outF = a.integer(6);
  const float* A = a.f32(0, a.integer(1), mul_ck(a.env(), r, inF));
  const float* B = a.f32(2, a.integer(3), mul_ck(a.env(), outF, r));
  float* out = a.f32(7, a.integer(8), ops()->lora_packed_floats(r, inF, outF));
  ops()->lora_pack(A, B, r, inF, outF, out);
  return a.env().Undefined();
}

// ---- 4-bit ------------------------------------------------------------------------------------------------

// A 4-bit weight from 11 arguments at `at`: code, codeOff, packed, pOff, absmax, aOff, absmaxU8, nestedAbsmax|null,
// naOff, nestedCode|null, desc[6] = rows, cols, blocksize, nestedBlocksize, offset, ncOff
W4Args parse_w4(const Args& a, size_t at) {
  const double* d = a.desc(at + 10, 6);
  W4Args w;
  w.rows = to_i(a, d[0], "rows");
  w.cols = to_i(a, d[1], "cols");
  w.bs = to_i(a, d[2], "blocksize", 2);
  w.nbs = to_i(a, d[3], "nestedBlocksize");
  w.offset = d[4];
  const int64_t n = mul_ck(a.env(), w.rows, w.cols);
  const int64_t nblocks = (n + w.bs - 1) / w.bs;
  w.code = a.f32(at, a.integer(at + 1), 16);
  w.packed = (const uint8_t*)a.span(at + 2, kOpU8, a.integer(at + 3), (n + 1) / 2);
  const bool u8 = a.flag(at + 6);
  w.absmax = nullptr;
  w.qabs = nullptr;
  w.nested_absmax = nullptr;
  w.nested_code = nullptr;
  if (u8) {
    if (w.nbs < 1 || a.is_null(at + 7) || a.is_null(at + 9))
      range_error(a.env(), "4-bit weight: double quantization needs nested absmax and code");
    w.qabs = (const uint8_t*)a.span(at + 4, kOpU8, a.integer(at + 5), nblocks);
    w.nested_absmax = a.f32(at + 7, a.integer(at + 8), (nblocks + w.nbs - 1) / w.nbs);
    w.nested_code = a.f32(at + 9, to_i(a, d[5], "ncOff"), 256);
  } else {
    w.absmax = a.f32(at + 4, a.integer(at + 5), nblocks);
  }
  return w;
}

// gemm4bit(x, xOff, <w: 11>, bias|null, bOff, bDtype, y, yOff, m)
Napi::Value Gemm4bit(const Napi::CallbackInfo& info) {
  Args a{info, "gemm4bit"};
  a.count(19);
  const W4Args w = parse_w4(a, 2);
  const int64_t m = a.integer(18);
  const float* x = a.f32(0, a.integer(1), m * w.cols);
  const int bdt = a.dtype(15);
  const void* bias = a.is_null(13) ? nullptr : a.span(13, bdt, a.integer(14), w.rows);
  float* y = a.f32(16, a.integer(17), m * w.rows);
  ops()->gemm4bit(x, w, bias, bdt, y, m, threads());
  return a.env().Undefined();
}

// gemm4bitBackwardInput(g, gOff, <w: 11>, dx, dxOff, m)
Napi::Value Gemm4bitBackwardInput(const Napi::CallbackInfo& info) {
  Args a{info, "gemm4bitBackwardInput"};
  a.count(16);
  const W4Args w = parse_w4(a, 2);
  const int64_t m = a.integer(15);
  ops()->gemm4bit_bwd(a.f32(0, a.integer(1), m * w.rows), w, a.f32(13, a.integer(14), m * w.cols), m, threads());
  return a.env().Undefined();
}

// dequantize4bitRows(<w: 11>, row0, count, out, oOff)
Napi::Value Dequantize4bitRows(const Napi::CallbackInfo& info) {
  Args a{info, "dequantize4bitRows"};
  a.count(15);
  const W4Args w = parse_w4(a, 0);
  const int64_t row0 = a.integer(11), count = a.integer(12);
  if (row0 + count > w.rows) range_error(a.env(), "dequantize4bitRows: rows out of range");
  ops()->dequant4bit(w, row0, count, a.f32(13, a.integer(14), count * w.cols), threads());
  return a.env().Undefined();
}

Napi::Value OpsIsa(const Napi::CallbackInfo& info) { return Napi::String::New(info.Env(), ops()->name); }

// _readAhead(bytes): tuning hook for the read-ahead of streamed weights (-1 keeps it); returns the value in use.
Napi::Value ReadAheadBytes(const Napi::CallbackInfo& info) {
  const double v = info.Length() > 0 && info[0].IsNumber() ? info[0].As<Napi::Number>().DoubleValue() : -1.0;
  return Napi::Number::New(info.Env(), (double)stream_read_ahead_bytes(v >= 0 ? (int64_t)v : -1));
}

// allocStreamed(bytes): a zeroed ArrayBuffer for weights streamed whole on every decoding step, in huge pages
// where the system allows and registered for read-ahead (gemm_common.h); freed with its ArrayBuffer.
Napi::Value AllocStreamed(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() != 1 || !info[0].IsNumber()) range_error(env, "allocStreamed: expected a byte count");
  const double v = info[0].As<Napi::Number>().DoubleValue();
  if (!(v >= 0 && v <= 281474976710656.0) || v != (double)(int64_t)v)
    range_error(env, "allocStreamed: the byte count must be an integer >= 0");
  const size_t n = (size_t)v;
  void* p = stream_alloc(n > 0 ? n : 1);
  if (!p) range_error(env, "allocStreamed: out of memory");
  Napi::MemoryManagement::AdjustExternalMemory(env, (int64_t)n);
  return Napi::ArrayBuffer::New(
      env, p, n,
      [](Napi::Env e, void* data, size_t* bytes) {
        stream_free(data, *bytes > 0 ? *bytes : 1);
        Napi::MemoryManagement::AdjustExternalMemory(e, -(int64_t)*bytes);
        delete bytes;
      },
      new size_t(n));
}

// ---- plans ------------------------------------------------------------------------------------------------
//
// A fixed list of op calls, checked and converted once, run by one call per step: a decoding step of the
// 135m shape is ~400 small kernels, and calling each from JavaScript cost about as much as the kernels
// besides the products (src/models/decode-plan.ts). planAdd(plan, name, ...the op's own arguments) records
// a call as the entry point of that name would make it; the plan keeps every array it was given alive. The
// op after planDynamic(plan, step) depends on the step's L: a copy writes L * step elements further on (the
// new position of a KV cache), an attention sees L more keys and the step's key mask.

struct Plan {
  std::vector<Thunk> ops;
  std::vector<Napi::Reference<Napi::Value>> keep;
  int64_t dyn = 0;
  bool freed = false;
};

Plan* plan_of(const Napi::CallbackInfo& info, const char* fn, bool freed_ok = false) {
  if (info.Length() < 1 || !info[0].IsExternal()) type_error(info.Env(), std::string(fn) + ": argument 0 must be a plan");
  Plan* p = info[0].As<Napi::External<Plan>>().Data();
  if (!p || (p->freed && !freed_ok)) range_error(info.Env(), std::string(fn) + ": the plan was freed");
  return p;
}

Napi::Value PlanCreate(const Napi::CallbackInfo& info) {
  return Napi::External<Plan>::New(info.Env(), new Plan(), [](Napi::Env, Plan* p) { delete p; });
}

Napi::Value PlanAdd(const Napi::CallbackInfo& info) {
  Plan* p = plan_of(info, "planAdd");
  if (info.Length() < 2 || !info[1].IsString()) type_error(info.Env(), "planAdd: argument 1 must be an op name");
  const std::string name = info[1].As<Napi::String>().Utf8Value();
  struct Prep {
    const char* name;
    Thunk (*prep)(const Args&);
  };
  static const Prep preps[] = {
      {"binary", prep_binary},       {"copy", prep_copy},         {"gemmRows", prep_gemm_rows},
      {"rmsNormForward", prep_rmsnorm_fwd}, {"rope", prep_rope}, {"swigluForward", prep_swiglu_fwd},
      {"attentionForward", prep_attn_fwd},
  };
  for (const Prep& q : preps) {
    if (name != q.name) continue;
    Args a{info, q.name, 2, p->dyn};
    p->dyn = 0;
    Thunk t = q.prep(a);
    if (t) p->ops.push_back(std::move(t));
    for (size_t i = 2; i < info.Length(); ++i)
      if (info[i].IsTypedArray()) p->keep.push_back(Napi::Persistent(info[i]));
    return info.Env().Undefined();
  }
  range_error(info.Env(), "planAdd: " + name + " cannot be part of a plan");
}

// planDynamic(plan, step): the next op added depends on the step's L (see above)
Napi::Value PlanDynamic(const Napi::CallbackInfo& info) {
  Plan* p = plan_of(info, "planDynamic");
  Args a{info, "planDynamic", 1};
  p->dyn = a.integer(0, 1);
  return info.Env().Undefined();
}

// planRun(plan, L, mask|null, maskOff)
Napi::Value PlanRun(const Napi::CallbackInfo& info) {
  Plan* p = plan_of(info, "planRun");
  Args a{info, "planRun", 1};
  a.count(3);
  Dyn y{info.Env(), a.integer(0), nullptr, 0};
  if (!a.is_null(1)) {
    int64_t len = 0;
    const int32_t* m = (const int32_t*)a.array(1, 'i', &len);
    const int64_t off = a.integer(2);
    if (off > len) range_error(info.Env(), "planRun: mask offset beyond the mask");
    y.mask = m + off;
    y.mask_len = len - off;
  }
  for (const Thunk& t : p->ops) t(y);
  return info.Env().Undefined();
}

// planFree(plan): drops the ops and the arrays now, not when the handle is collected (idempotent)
Napi::Value PlanFree(const Napi::CallbackInfo& info) {
  Plan* p = plan_of(info, "planFree", true);
  p->freed = true;
  p->ops.clear();
  for (auto& r : p->keep) r.Reset();
  p->keep.clear();
  return info.Env().Undefined();
}

}  // namespace

// Registers the op kernels on the addon's exports; get_isa returns 0 generic, 1 avx2, 2 avx512.
void init_ops(Napi::Env env, Napi::Object exports, int (*get_isa)(), int (*get_threads)()) {
  g_get_isa = get_isa;
  g_get_threads = get_threads;
  struct Fn {
    const char* name;
    Napi::Value (*f)(const Napi::CallbackInfo&);
  };
  const Fn fns[] = {
      {"binary", Binary},
      {"unary", Unary},
      {"reduce", Reduce},
      {"copy", Copy},
      {"fill", Fill},
      {"gatherRows", GatherRows},
      {"scatterAddRows", ScatterAddRows},
      {"gemmRows", GemmRows},
      {"rmsNormForward", RmsNormForward},
      {"rmsNormBackward", RmsNormBackward},
      {"rope", Rope},
      {"swigluForward", SwigluForward},
      {"swigluBackward", SwigluBackward},
      {"softmaxForward", SoftmaxForward},
      {"softmaxBackward", SoftmaxBackward},
      {"attentionForward", AttentionForward},
      {"attentionBackward", AttentionBackward},
      {"crossEntropyForward", CrossEntropyForward},
      {"crossEntropyBackward", CrossEntropyBackward},
      {"adamwStep", AdamwStep},
      {"sumSquares", SumSquares},
      {"dropout", Dropout},
      {"loraWeightNorm", LoraWeightNorm},
      {"loraRows", LoraRows},
      {"loraPackedFloats", LoraPackedFloats},
      {"loraPack", LoraPack},
      {"gemm4bit", Gemm4bit},
      {"gemm4bitBackwardInput", Gemm4bitBackwardInput},
      {"dequantize4bitRows", Dequantize4bitRows},
      {"opsIsa", OpsIsa},
      {"allocStreamed", AllocStreamed},
      {"argmax", Argmax},
      {"_readAhead", ReadAheadBytes},
      {"planCreate", PlanCreate},
      {"planAdd", PlanAdd},
      {"planDynamic", PlanDynamic},
      {"planRun", PlanRun},
      {"planFree", PlanFree},
  };
  for (const Fn& f : fns) exports.Set(f.name, Napi::Function::New(env, f.f, f.name));
}

}  // namespace lowrank
