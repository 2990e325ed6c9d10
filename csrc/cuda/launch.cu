// Host-side entry points: pick the kernel path and element type, then call the launcher.
#include "dispatch.h"
#include "launch.h"
#include "tile_math.h"

namespace rollingq {

namespace {
// Grid y and z carry heads and batch; x carries row blocks.
const char* check_grid(const AttentionParams& p) {
  if (p.heads > 65535 || p.batch > 65535)
    return "rollingq CUDA kernels: batch and heads must each be at most 65535";
  if (p.seqlen_q > (int64_t)1 << 36 || p.seqlen_k > (int64_t)1 << 36)
    return "rollingq CUDA kernels: sequence too long";
  return nullptr;
}
}  // namespace

const char* run_attention_fwd(const AttentionParams& p, ScalarKind kind, void* stream_ptr,
                              void* workspace) {
  if (const char* e = check_grid(p)) return e;
  if (p.batch == 0 || p.heads == 0) return nullptr;
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const FwdPath path = choose_forward_path(p, kind);
  if (path != FwdPath::kGeneric) {
    const bool hd64 = path == FwdPath::kMma64;
    if (forward_workspace_bytes(p, kind) > 0 && workspace == nullptr)
      return "rollingq CUDA forward: the key-code workspace is missing";
    if (kind == ScalarKind::kFloat16)
      return hd64 ? launch_fwd_mma<__half, 64>(p, workspace, stream)
                  : launch_fwd_mma<__half, 128>(p, workspace, stream);
    return hd64 ? launch_fwd_mma<__nv_bfloat16, 64>(p, workspace, stream)
                : launch_fwd_mma<__nv_bfloat16, 128>(p, workspace, stream);
  }
  return RQ_DTYPE_SWITCH(kind, T, [&]() -> const char* { return launch_fwd_generic<T>(p, stream); });
}

const char* run_attention_bwd(const AttentionBwdParams& p, ScalarKind kind, void* stream_ptr) {
  if (const char* e = check_grid(p)) return e;
  if (p.batch == 0 || p.heads == 0) return nullptr;
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const BwdPath path = choose_backward_path(p, kind);
  // (with no query row, the workspaces are empty and their pointers may be null)
  if (p.seqlen_q > 0 && p.delta == nullptr)
    return "rollingq CUDA backward: the delta workspace is required";
  if (p.seqlen_q > 0 && p.q_rot == nullptr && (path == BwdPath::kGeneric || p.rotation != nullptr))
    return "rollingq CUDA backward: the q_rot workspace is required";
  if (path != BwdPath::kGeneric) {
    const bool hd64 = path == BwdPath::kMma64;
    if (kind == ScalarKind::kFloat16)
      return hd64 ? launch_bwd_mma<__half, 64>(p, stream) : launch_bwd_mma<__half, 128>(p, stream);
    return hd64 ? launch_bwd_mma<__nv_bfloat16, 64>(p, stream)
                : launch_bwd_mma<__nv_bfloat16, 128>(p, stream);
  }
  return RQ_DTYPE_SWITCH(kind, T, [&]() -> const char* { return launch_bwd_generic<T>(p, stream); });
}

}  // namespace rollingq
