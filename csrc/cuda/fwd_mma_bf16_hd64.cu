// Instantiation: tensor-core forward, bf16, head dim 64 (causal and non-causal).
#include "fwd_mma_kernel.cuh"

namespace rollingq {
template const char* launch_fwd_mma<__nv_bfloat16, 64>(const AttentionParams&, cudaStream_t);
}  // namespace rollingq
