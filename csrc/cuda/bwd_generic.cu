// Instantiations: backward for fp32, fp16 and bf16 (causal and non-causal).
#include "bwd_generic_kernel.cuh"

namespace rollingq {
template const char* launch_bwd_generic<float>(const AttentionBwdParams&, cudaStream_t);
template const char* launch_bwd_generic<__half>(const AttentionBwdParams&, cudaStream_t);
template const char* launch_bwd_generic<__nv_bfloat16>(const AttentionBwdParams&, cudaStream_t);
}  // namespace rollingq
