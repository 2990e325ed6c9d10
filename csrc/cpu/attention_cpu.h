// Entry points of the fused CPU kernels. They see only the plain params struct
// (csrc/rollingq_params.h); the torch binding that fills it lives in csrc/ops.cpp.
#pragma once

#include "rollingq_params.h"

namespace rollingq {
namespace cpu {

enum class ElementType { kFloat32, kFloat64, kBFloat16 };

// Forward: out, lse and (num_modalities > 0) modality_mass, key_sum, key_count.
void attention_fwd(const AttentionParams& params, ElementType type);

// Backward: dq, dk, dv from dout, out and lse (probabilities recomputed from lse).
// delta and dq_accum of the params are not used (the kernel keeps them per task).
void attention_bwd(const AttentionBwdParams& params, ElementType type);

}  // namespace cpu
}  // namespace rollingq
