// Instantiations: generic forward for fp32, fp16 and bf16 (causal and non-causal).
#include "fwd_generic_kernel.cuh"

namespace rollingq {
template const char* launch_fwd_generic<float>(const AttentionParams&, cudaStream_t);
template const char* launch_fwd_generic<__half>(const AttentionParams&, cudaStream_t);
template const char* launch_fwd_generic<__nv_bfloat16>(const AttentionParams&, cudaStream_t);
}  // namespace rollingq
