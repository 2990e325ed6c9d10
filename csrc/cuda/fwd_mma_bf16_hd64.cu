// Instantiation: tensor-core forward, bf16, head dim 64 (causal or not, with or without
// statistics: four kernels).
#include "fwd_mma_kernel.cuh"

namespace rollingq {
template const char* launch_fwd_mma<__nv_bfloat16, 64>(const AttentionParams&, void*, cudaStream_t);
}  // namespace rollingq
