// The op kernels of one ISA: included by ops_avx512.cc, ops_avx2.cc and ops_generic.cc inside their own
// namespace, after defining LR_VW (floats per vector) and LR_GEMM_IMPL (that ISA's GEMM table, whose blocking
// the row-invariant GEMM reproduces). Defines kOps, the table ops_addon.cc dispatches to.

#include "ops_simd.h"
#include "ops_core.h"
#include "ops_gemm.h"
#include "ops_fused.h"
#include "ops_attention.h"
#include "ops_quant.h"
#include "ops_lora.h"

namespace {

const OpsImpl kOps = {
    LR_ISA_NAME,
    binary_k,
    unary_k,
    reduce_k,
    copy_k,
    fill_k,
    gather_rows_k,
    scatter_add_rows_k,
    gemm_rows_k,
    rmsnorm_fwd_k,
    rmsnorm_bwd_k,
    rope_k,
    attn_fwd_k,
    attn_bwd_k,
    swiglu_fwd_k,
    swiglu_bwd_k,
    softmax_fwd_k,
    softmax_bwd_k,
    ce_fwd_k,
    ce_bwd_k,
    adamw_k,
    sum_squares_k,
    argmax_k,
    dropout_k,
    lora_weight_norm_k,
    lora_rows_k,
    lora_packed_floats_k,
    lora_pack_k,
    gemm4bit_k,
    gemm4bit_bwd_k,
    dequant4bit_k,
};

}  // namespace
