// Instantiation: tensor-core backward, fp16, head dim 64 (prep, dq and dkdv kernels, causal or
// not).
#include "bwd_mma_kernel.cuh"

namespace rollingq {
template const char* launch_bwd_mma<__half, 64>(const AttentionBwdParams&, cudaStream_t);
}  // namespace rollingq
