// The op kernels compiled for avx2 (flags in binding.gyp: -mavx2 -mfma -mf16c); see ops_isa.h.
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "ops_common.h"

namespace lowrank {
namespace opsk_avx2 {

#define LR_VW 8
#define LR_ISA_NAME "avx2"
#define LR_GEMM_IMPL isa_avx2
#include "ops_isa.h"
#undef LR_VW
#undef LR_ISA_NAME
#undef LR_GEMM_IMPL

}  // namespace opsk_avx2

const OpsImpl* ops_avx2() { return &opsk_avx2::kOps; }

}  // namespace lowrank
