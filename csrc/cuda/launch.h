// Entry points of the CUDA kernels, free of torch and CUDA headers (the binding includes this).
//
// Every function returns nullptr on success or a static message naming what went wrong (a CUDA
// launch error, or a size the kernels do not handle); the binding turns it into a TORCH_CHECK.
#pragma once

#include "../rollingq_params.h"
#include "params_fill.h"

namespace rollingq {

// out, lse and (when num_modalities > 0) modality_mass, key_sum, key_count are all written.
// `workspace`: forward_workspace_bytes(p, kind) bytes of device memory (params_fill.h), which the
// caller allocates on the stream's device; nullptr when that is 0.
const char* run_attention_fwd(const AttentionParams& p, ScalarKind kind, void* stream,
                              void* workspace);

// dq, dk, dv are written; delta ((B, H, Lq) float32) and q_rot are workspaces the caller
// allocates: q_rot is (B, H, Lq, D) float32 on the generic path (choose_backward_path), the same
// shape in the input dtype on the tensor-core path when there is a rotation, else unused
// ((B, H, Lq) and (B, H, Lq, D), float32, contiguous).
const char* run_attention_bwd(const AttentionBwdParams& p, ScalarKind kind, void* stream);

}  // namespace rollingq
