// The one place where runtime switches (dtype, head dim, causal) become template parameters,
// and the declarations of the launchers that the instantiation files define.
//
//   fwd_mma_{fp16,bf16}_hd{64,128}.cu   launch_fwd_mma<T, kD>      (causal, statistics inside)
//   fwd_generic.cu                      launch_fwd_generic<T>      (causal switched inside)
//   bwd_generic.cu                      launch_bwd_generic<T>
//   bwd_mma_{fp16,bf16}_hd{64,128}.cu   launch_bwd_mma<T, kD>      (causal switched inside)
//   launch.cu                           run_attention_fwd / run_attention_bwd: path + dtype switch
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../rollingq_params.h"
#include "params_fill.h"

// Calls the callable __VA_ARGS__ with `constexpr bool NAME` equal to COND.
#define RQ_BOOL_SWITCH(COND, NAME, ...)     \
  [&] {                                     \
    if (COND) {                             \
      constexpr bool NAME = true;           \
      return (__VA_ARGS__)();               \
    } else {                                \
      constexpr bool NAME = false;          \
      return (__VA_ARGS__)();               \
    }                                       \
  }()

// Calls __VA_ARGS__ with `using T = <element type of KIND>`; unknown kinds give an error message.
#define RQ_DTYPE_SWITCH(KIND, T, ...)                                  \
  [&]() -> const char* {                                               \
    switch (KIND) {                                                    \
      case ::rollingq::ScalarKind::kFloat32: {                         \
        using T = float;                                               \
        return (__VA_ARGS__)();                                        \
      }                                                                \
      case ::rollingq::ScalarKind::kFloat16: {                         \
        using T = __half;                                              \
        return (__VA_ARGS__)();                                        \
      }                                                                \
      case ::rollingq::ScalarKind::kBFloat16: {                        \
        using T = __nv_bfloat16;                                       \
        return (__VA_ARGS__)();                                        \
      }                                                                \
    }                                                                  \
    return "rollingq CUDA kernels: unsupported element type";          \
  }()

namespace rollingq {

// `workspace`: mma_workspace_bytes(p) bytes of device memory (fwd_mma_config.h), or nullptr when
// that is 0.
template <typename T, int kD>
const char* launch_fwd_mma(const AttentionParams& p, void* workspace, cudaStream_t stream);

template <typename T>
const char* launch_fwd_generic(const AttentionParams& p, cudaStream_t stream);

template <typename T>
const char* launch_bwd_generic(const AttentionBwdParams& p, cudaStream_t stream);

// p.q_rot: (B, H, Lq, D) contiguous in T when p.rotation is set (the rotated q), else unused.
template <typename T, int kD>
const char* launch_bwd_mma(const AttentionBwdParams& p, cudaStream_t stream);

}  // namespace rollingq
