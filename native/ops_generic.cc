// The op kernels compiled for generic (flags in binding.gyp: none); see ops_isa.h.
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
namespace opsk_generic {

#define LR_VW 4
#define LR_ISA_NAME "generic"
#define LR_GEMM_IMPL isa_generic
#include "ops_isa.h"
#undef LR_VW
#undef LR_ISA_NAME
#undef LR_GEMM_IMPL

}  // namespace opsk_generic

const OpsImpl* ops_generic() { return &opsk_generic::kOps; }

}  // namespace lowrank
