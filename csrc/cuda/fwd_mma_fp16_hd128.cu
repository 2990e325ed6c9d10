// Instantiation: tensor-core forward, fp16, head dim 128 (causal or not, with or without
// statistics: four kernels).
#include "fwd_mma_kernel.cuh"

namespace rollingq {
template const char* launch_fwd_mma<__half, 128>(const AttentionParams&, void*, cudaStream_t);
}  // namespace rollingq
