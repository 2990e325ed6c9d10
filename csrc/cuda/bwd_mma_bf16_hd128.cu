// Instantiation: tensor-core backward, bf16, head dim 128 (prep, dq and dkdv kernels, causal or
// not).
#include "bwd_mma_kernel.cuh"

namespace rollingq {
template const char* launch_bwd_mma<__nv_bfloat16, 128>(const AttentionBwdParams&, cudaStream_t);
}  // namespace rollingq
