// Entry points of the fused CPU kernels. They see only the plain params struct
// (csrc/rollingq_params.h); the torch binding that fills it lives in csrc/ops.cpp.
//
// The kernels are compiled several times, once per instruction set (csrc/cpu/isa/*.cpp with the
// flags of csrc/build_flags.txt); the variant that runs is chosen once, at the first call, from
// what the CPU reports (csrc/cpu/dispatch.cpp). ROLLINGQ_CPU_ISA=<name> overrides the choice.
#pragma once

#include "rollingq_params.h"

namespace rollingq {
namespace cpu {

enum class ElementType { kFloat32, kFloat64, kBFloat16, kFloat16 };

// Forward: out, lse and (num_modalities > 0) modality_mass, key_sum, key_count.
void attention_fwd(const AttentionParams& params, ElementType type);

// Backward: dq, dk, dv from dout, out and lse (probabilities recomputed from lse).
// delta, dq_accum and q_rot of the params are not used (the kernel keeps its own workspaces).
void attention_bwd(const AttentionBwdParams& params, ElementType type);

// Name of the kernel variant in use ("amx", "avx512", "avx2" or "generic").
const char* isa_name();

}  // namespace cpu
}  // namespace rollingq
