// N-API entry points of lowrank_native: argument checking, CPU dispatch, threads.
//
// Every array argument is checked so that the last element any kernel can touch lies inside it; on failure a
// JS RangeError (bad sizes, offsets, strides) or TypeError (wrong array type) is thrown before any kernel runs.
#include <napi.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <atomic>
#include <mutex>
#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#endif

#include "gemm_common.h"

namespace lowrank {
// The op kernels (ops_addon.cc) register their functions on the same exports.
void init_ops(Napi::Env env, Napi::Object exports, int (*get_isa)(), int (*get_threads)());
}  // namespace lowrank

using lowrank::IsaImpl;

namespace {

// ---- ISA selection ----------------------------------------------------------------------------------------

enum Isa { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };
const char* const kIsaNames[] = {"generic", "avx2", "avx512"};

std::atomic<int> g_isa{kGeneric};
int g_best = kGeneric;
std::atomic<int> g_threads{1};

int detect_best_isa() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  unsigned a = 0, b = 0, c = 0, d = 0;
  bool f16c = false;
  if (__get_cpuid(1, &a, &b, &c, &d)) f16c = (c & bit_F16C) != 0;
  // __builtin_cpu_supports also checks that the OS saves the wider registers (XCR0).
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && f16c;
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl");
  if (avx512) return kAvx512;
  if (avx2) return kAvx2;
#endif
  return kGeneric;
}

const IsaImpl* impl_of(int isa) {
#if defined(__x86_64__) || defined(_M_X64)
  if (isa == kAvx512) return lowrank::isa_avx512();
  if (isa == kAvx2) return lowrank::isa_avx2();
#endif
  return lowrank::isa_generic();
}

int isa_from_name(const std::string& s) {
  for (int i = 0; i < 3; ++i)
    if (s == kIsaNames[i]) return i;
  return -1;
}

// ---- argument checking ------------------------------------------------------------------------------------

[[noreturn]] void range_error(const Napi::Env& env, const std::string& msg) {
  throw Napi::RangeError::New(env, "lowrank_native: " + msg);
}
[[noreturn]] void type_error(const Napi::Env& env, const std::string& msg) {
  throw Napi::TypeError::New(env, "lowrank_native: " + msg);
}

constexpr double kMaxInt = 9007199254740991.0;  // 2^53 - 1

int64_t int_arg(const Napi::CallbackInfo& info, size_t i, const char* name, int64_t min) {
  if (i >= info.Length() || !info[i].IsNumber()) type_error(info.Env(), std::string(name) + " must be a number");
  const double v = info[i].As<Napi::Number>().DoubleValue();
  // Range first: converting a double beyond int64 to an integer is undefined behaviour.
  if (!(v >= (double)min && v <= kMaxInt) || v != (double)(int64_t)v)
    range_error(info.Env(), std::string(name) + " must be an integer >= " + std::to_string(min) + ", got " +
                                std::to_string(v));
  return (int64_t)v;
}

bool bool_arg(const Napi::CallbackInfo& info, size_t i, const char* name) {
  if (i < info.Length() && info[i].IsBoolean()) return info[i].As<Napi::Boolean>().Value();
  if (i < info.Length() && info[i].IsNumber()) {
    const double v = info[i].As<Napi::Number>().DoubleValue();
    if (v == 0.0 || v == 1.0) return v == 1.0;
  }
  type_error(info.Env(), std::string(name) + " must be a boolean (or 0/1)");
}

float float_arg(const Napi::CallbackInfo& info, size_t i, const char* name) {
  if (i >= info.Length() || !info[i].IsNumber()) type_error(info.Env(), std::string(name) + " must be a number");
  return (float)info[i].As<Napi::Number>().DoubleValue();
}

struct ArrayArg {
  void* data;
  int64_t length;  // elements
  int elsize;
};

ArrayArg array_arg(const Napi::CallbackInfo& info, size_t i, const char* name, int dtype) {
  const Napi::Env env = info.Env();
  if (i >= info.Length() || !info[i].IsTypedArray()) type_error(env, std::string(name) + " must be a typed array");
  Napi::TypedArray ta = info[i].As<Napi::TypedArray>();
  const napi_typedarray_type want = dtype == lowrank::kF32 ? napi_float32_array : napi_uint16_array;
  if (ta.TypedArrayType() != want)
    type_error(env, std::string(name) + (dtype == lowrank::kF32 ? " must be a Float32Array (f32)"
                                                                 : " must be a Uint16Array (bf16/f16 bits)"));
  ArrayArg a;
  a.elsize = dtype == lowrank::kF32 ? 4 : 2;
  a.length = (int64_t)ta.ElementLength();
  a.data = (uint8_t*)ta.ArrayBuffer().Data() + ta.ByteOffset();
  return a;
}

int dtype_arg(const Napi::CallbackInfo& info, size_t i, const char* name) {
  const int64_t d = int_arg(info, i, name, 0);
  if (d > 2) range_error(info.Env(), std::string(name) + " must be 0 (f32), 1 (bf16) or 2 (f16)");
  return (int)d;
}

int64_t mul_checked(const Napi::Env& env, int64_t a, int64_t b) {
  int64_t r;
  if (__builtin_mul_overflow(a, b, &r)) range_error(env, "size overflow");
  return r;
}
int64_t add_checked(const Napi::Env& env, int64_t a, int64_t b) {
  int64_t r;
  if (__builtin_add_overflow(a, b, &r)) range_error(env, "size overflow");
  return r;
}

// A stored matrix of rows x cols with leading dimension ld at element offset off, repeated `batch` times with
// `stride` elements between matrices. Checks ld and that every touched element is inside the array; returns
// the half-open element range [first, last + 1) touched (empty when nothing is).
struct Span {
  int64_t begin, end;
};

Span check_matrix(const Napi::Env& env, const char* name, const ArrayArg& arr, int64_t rows, int64_t cols,
                  int64_t ld, int64_t off, int64_t batch, int64_t stride) {
  if (ld < (cols > 1 ? cols : 1))
    range_error(env, std::string("leading dimension of ") + name + " (" + std::to_string(ld) + ") is less than its " +
                         std::to_string(cols) + " columns");
  if (rows == 0 || cols == 0 || batch == 0) return Span{0, 0};
  int64_t last = add_checked(env, mul_checked(env, rows - 1, ld), cols - 1);
  last = add_checked(env, last, mul_checked(env, batch - 1, stride));
  last = add_checked(env, last, off);
  if (last >= arr.length)
    range_error(env, std::string(name) + " is too short: the last element touched is " + std::to_string(last) +
                         " but it has " + std::to_string(arr.length) + " elements");
  return Span{off, last + 1};
}

bool overlaps(const ArrayArg& a, Span sa, const ArrayArg& b, Span sb) {
  if (sa.end <= sa.begin || sb.end <= sb.begin) return false;
  const uint8_t* a0 = (const uint8_t*)a.data + sa.begin * a.elsize;
  const uint8_t* a1 = (const uint8_t*)a.data + sa.end * a.elsize;
  const uint8_t* b0 = (const uint8_t*)b.data + sb.begin * b.elsize;
  const uint8_t* b1 = (const uint8_t*)b.data + sb.end * b.elsize;
  return a0 < b1 && b0 < a1;
}

// Parses (transA, transB, M, N, K, alpha, A, aOff, lda, [strideA,] aDtype, B, bOff, ldb, [strideB,] bDtype,
// beta, C, cOff, ldc [, strideC]) starting at argument `at`; batch == 0 means "not batched".
lowrank::BatchedCall parse_gemm(const Napi::CallbackInfo& info, size_t at, int64_t batch) {
  const Napi::Env env = info.Env();
  const bool batched = batch > 0;
  size_t i = at;
  const bool ta = bool_arg(info, i++, "transA");
  const bool tb = bool_arg(info, i++, "transB");
  const int64_t M = int_arg(info, i++, "M", 0);
  const int64_t N = int_arg(info, i++, "N", 0);
  const int64_t K = int_arg(info, i++, "K", 0);
  const float alpha = float_arg(info, i++, "alpha");
  const size_t iA = i++;
  const int64_t aOff = int_arg(info, i++, "aOff", 0);
  const int64_t lda = int_arg(info, i++, "lda", 1);
  const int64_t sA = batched ? int_arg(info, i++, "strideA", 0) : 0;
  const int aDtype = dtype_arg(info, i++, "aDtype");
  const size_t iB = i++;
  const int64_t bOff = int_arg(info, i++, "bOff", 0);
  const int64_t ldb = int_arg(info, i++, "ldb", 1);
  const int64_t sB = batched ? int_arg(info, i++, "strideB", 0) : 0;
  const int bDtype = dtype_arg(info, i++, "bDtype");
  const float beta = float_arg(info, i++, "beta");
  const size_t iC = i++;
  const int64_t cOff = int_arg(info, i++, "cOff", 0);
  const int64_t ldc = int_arg(info, i++, "ldc", 1);
  const int64_t sC = batched ? int_arg(info, i++, "strideC", 0) : 0;

  const ArrayArg A = array_arg(info, iA, "A", aDtype);
  const ArrayArg B = array_arg(info, iB, "B", bDtype);
  const ArrayArg C = array_arg(info, iC, "C", lowrank::kF32);
  const int64_t nb = batched ? batch : 1;
  // A and B are not read when alpha == 0 or K == 0, but are still checked: a bad call is a bug either way.
  const Span spA = check_matrix(env, "A", A, ta ? K : M, ta ? M : K, lda, aOff, nb, sA);
  const Span spB = check_matrix(env, "B", B, tb ? N : K, tb ? K : N, ldb, bOff, nb, sB);
  const Span spC = check_matrix(env, "C", C, M, N, ldc, cOff, nb, sC);
  if (nb > 1 && M > 0 && N > 0) {
    // The C matrices of a batch must not share elements (threads write them concurrently): either one after
    // the other, or interleaved within rows (e.g. attention output [T, heads, dim]).
    const bool sequential = sC >= (M - 1) * ldc + N;
    const bool interleaved = sC >= N && (nb - 1) * sC + N <= ldc;
    if (!sequential && !interleaved)
      range_error(env, "strideC " + std::to_string(sC) + " makes the C matrices of the batch overlap");
  }
  if (overlaps(C, spC, A, spA)) range_error(env, "C overlaps A in memory");
  if (overlaps(C, spC, B, spB)) range_error(env, "C overlaps B in memory");

  lowrank::BatchedCall bc;
  lowrank::GemmCall& g = bc.g;
  g.M = M;
  g.N = N;
  g.K = K;
  g.alpha = alpha;
  g.beta = beta;
  const uint8_t* a = (const uint8_t*)A.data + aOff * A.elsize;
  const uint8_t* b = (const uint8_t*)B.data + bOff * B.elsize;
  // A(i, k): row-major [M, K] (rs = lda, cs = 1) or, transposed, stored [K, M] (rs = 1, cs = lda).
  g.A = lowrank::Operand{a, aDtype, ta ? 1 : lda, ta ? lda : 1};
  // B(k, j): row-major [K, N] (rs = ldb, cs = 1) or, transposed, stored [N, K] (rs = 1, cs = ldb).
  g.B = lowrank::Operand{b, bDtype, tb ? 1 : ldb, tb ? ldb : 1};
  g.C = (float*)C.data + cOff;
  g.ldc = ldc;
  bc.batch = nb;
  bc.sa = sA;
  bc.sb = sB;
  bc.sc = sC;
  return bc;
}

// ---- exported functions -----------------------------------------------------------------------------------

Napi::Value Gemm(const Napi::CallbackInfo& info) {
  if (info.Length() != 18) type_error(info.Env(), "gemm takes 18 arguments, got " + std::to_string(info.Length()));
  const lowrank::BatchedCall bc = parse_gemm(info, 0, 0);
  impl_of(g_isa.load())->gemm(bc.g, g_threads.load());
  return info.Env().Undefined();
}

Napi::Value GemmBatched(const Napi::CallbackInfo& info) {
  if (info.Length() != 22)
    type_error(info.Env(), "gemmBatched takes 22 arguments, got " + std::to_string(info.Length()));
  const int64_t batch = int_arg(info, 0, "batch", 0);
  if (batch == 0) return info.Env().Undefined();
  const lowrank::BatchedCall bc = parse_gemm(info, 1, batch);
  impl_of(g_isa.load())->gemm_batched(bc, g_threads.load());
  return info.Env().Undefined();
}

Napi::Value SetThreads(const Napi::CallbackInfo& info) {
  const int64_t n = int_arg(info, 0, "threads", 1);
  if (n > 1024) range_error(info.Env(), "threads must be <= 1024");
  g_threads.store((int)n);
  return info.Env().Undefined();
}

Napi::Value GetThreads(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), g_threads.load()); }

Napi::Value IsaName(const Napi::CallbackInfo& info) { return Napi::String::New(info.Env(), kIsaNames[g_isa.load()]); }

Napi::Value BestIsa(const Napi::CallbackInfo& info) { return Napi::String::New(info.Env(), kIsaNames[g_best]); }

Napi::Value SetIsa(const Napi::CallbackInfo& info) {
  const Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsString()) type_error(env, "setIsa takes 'avx512', 'avx2', 'generic' or 'auto'");
  const std::string name = info[0].As<Napi::String>().Utf8Value();
  if (name == "auto") {
    g_isa.store(g_best);
    return env.Undefined();
  }
  const int isa = isa_from_name(name);
  if (isa < 0) range_error(env, "unknown ISA '" + name + "' (avx512, avx2, generic or auto)");
  if (isa > g_best) range_error(env, "this CPU does not support " + name + " (best: " + kIsaNames[g_best] + ")");
  g_isa.store(isa);
  return env.Undefined();
}

Napi::Value FmaPeak(const Napi::CallbackInfo& info) {
  const int64_t threads = int_arg(info, 0, "threads", 1);
  const int64_t ms = int_arg(info, 1, "ms", 1);
  if (threads > 1024 || ms > 60000) range_error(info.Env(), "fmaPeak: threads <= 1024 and ms <= 60000");
  // The physical limit of this CPU: always measured with the widest ISA it has, whatever setIsa chose.
  return Napi::Number::New(info.Env(), impl_of(g_best)->fma_peak((int)threads, (double)ms));
}

Napi::Value MemBandwidthJs(const Napi::CallbackInfo& info) {
  const int64_t bytes = int_arg(info, 0, "bytes", 1);
  const int64_t threads = int_arg(info, 1, "threads", 1);
  if (threads > 1024 || bytes > ((int64_t)1 << 36)) range_error(info.Env(), "memBandwidth: bytes <= 64 GiB, threads <= 1024");
  const lowrank::MemBandwidth r = impl_of(g_best)->mem_bandwidth(bytes, (int)threads);
  if (r.read_gbs == 0.0) throw Napi::Error::New(info.Env(), "lowrank_native: memBandwidth could not allocate its buffer");
  Napi::Object o = Napi::Object::New(info.Env());
  o.Set("read", Napi::Number::New(info.Env(), r.read_gbs));
  o.Set("copy", Napi::Number::New(info.Env(), r.copy_gbs));
  return o;
}

// _blocking(kc, mb, nb): cache block sizes of the current ISA (0 keeps one); returns [kc, mb, nb]. For tuning.
Napi::Value Blocking(const Napi::CallbackInfo& info) {
  const int64_t kc = int_arg(info, 0, "kc", 0), mb = int_arg(info, 1, "mb", 0), nb = int_arg(info, 2, "nb", 0);
  if (kc > 8192 || mb > 65536 || nb > 65536) range_error(info.Env(), "_blocking: kc <= 8192, mb and nb <= 65536");
  int64_t out[3];
  impl_of(g_isa.load())->blocking(kc, mb, nb, out);
  Napi::Array a = Napi::Array::New(info.Env(), 3);
  for (uint32_t i = 0; i < 3; ++i) a.Set(i, Napi::Number::New(info.Env(), (double)out[i]));
  return a;
}

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  static std::once_flag once;  // once per process (the addon can be loaded by several worker threads)
  std::call_once(once, [] {
    g_best = detect_best_isa();
    int isa = g_best;
    const char* forced = getenv("LOWRANK_ISA");
    if (forced && *forced) {
      const int f = isa_from_name(forced);
      if (f >= 0 && f < isa) isa = f;  // only ever lowers the choice; unknown names are ignored
    }
    g_isa.store(isa);
#ifdef _OPENMP
    g_threads.store(omp_get_max_threads());
#endif
  });
  exports.Set("gemm", Napi::Function::New(env, Gemm, "gemm"));
  exports.Set("gemmBatched", Napi::Function::New(env, GemmBatched, "gemmBatched"));
  exports.Set("setThreads", Napi::Function::New(env, SetThreads, "setThreads"));
  exports.Set("getThreads", Napi::Function::New(env, GetThreads, "getThreads"));
  exports.Set("isa", Napi::Function::New(env, IsaName, "isa"));
  exports.Set("bestIsa", Napi::Function::New(env, BestIsa, "bestIsa"));
  exports.Set("setIsa", Napi::Function::New(env, SetIsa, "setIsa"));
  exports.Set("_blocking", Napi::Function::New(env, Blocking, "_blocking"));
  exports.Set("fmaPeak", Napi::Function::New(env, FmaPeak, "fmaPeak"));
  exports.Set("memBandwidth", Napi::Function::New(env, MemBandwidthJs, "memBandwidth"));
  lowrank::init_ops(env, exports, [] { return g_isa.load(); }, [] { return g_threads.load(); });
  return exports;
}

}  // namespace

NODE_API_MODULE(lowrank_native, Init)
