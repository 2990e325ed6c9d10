// The KernelTable of one variant: routes each element type to its engine (float16 and, without
// bf16 hardware, bfloat16 run the float engine on float32 rows). Included once, by
// csrc/cpu/isa/<name>.cpp, after it has defined ROLLINGQ_ISA_NS (and, for variants with bf16
// hardware, included bf16_engine.h).
#pragma once

#include "cpu/isa.h"
#include "cpu/kernels/fp_engine.h"

ROLLINGQ_KERNELS_BEGIN

struct NoBf16 {};  // bfloat16 through the float engine

// The bfloat16 engine over the products G (bf16_engine.h, variants with bf16 hardware only).
template <typename G>
struct Bf16Engine;

// G: the bf16 matrix products (Bf16Dot, Amx) or NoBf16.
template <typename G>
struct Kernels {
  static constexpr bool kBf16 = !same_type<G, NoBf16>::value;

  static void fwd_plan(const AttentionParams& p, ElementType t, Plan& plan) {
    switch (t) {
      case ElementType::kFloat32:
        return fwd_plan_fp<float, float>(p, plan);
      case ElementType::kFloat64:
        return fwd_plan_fp<double, double>(p, plan);
      case ElementType::kBFloat16:
        if constexpr (kBf16) {
          if (Bf16Engine<G>::applies(p)) return Bf16Engine<G>::fwd_plan(p, plan);
        }
        return fwd_plan_fp<bf16, float>(p, plan);
      case ElementType::kFloat16:
        return fwd_plan_fp<f16, float>(p, plan);
    }
  }

  static void fwd_run(const AttentionParams& p, ElementType t, const Plan& plan, int64_t begin,
                      int64_t end, void* ws) {
    switch (t) {
      case ElementType::kFloat32:
        return fwd_run_fp<float, float>(p, plan, begin, end, ws);
      case ElementType::kFloat64:
        return fwd_run_fp<double, double>(p, plan, begin, end, ws);
      case ElementType::kBFloat16:
        if constexpr (kBf16) {
          if (Bf16Engine<G>::applies(p)) return Bf16Engine<G>::fwd_run(p, plan, begin, end, ws);
        }
        return fwd_run_fp<bf16, float>(p, plan, begin, end, ws);
      case ElementType::kFloat16:
        return fwd_run_fp<f16, float>(p, plan, begin, end, ws);
    }
  }

  static void bwd_plan(const AttentionBwdParams& p, ElementType t, Plan& plan) {
    switch (t) {
      case ElementType::kFloat32:
        return bwd_plan_fp<float, float>(p, plan);
      case ElementType::kFloat64:
        return bwd_plan_fp<double, double>(p, plan);
      case ElementType::kBFloat16:
        if constexpr (kBf16) {
          if (Bf16Engine<G>::applies(p)) return Bf16Engine<G>::bwd_plan(p, plan);
        }
        return bwd_plan_fp<bf16, float>(p, plan);
      case ElementType::kFloat16:
        return bwd_plan_fp<f16, float>(p, plan);
    }
  }

  static void bwd_run(const AttentionBwdParams& p, ElementType t, const Plan& plan, int64_t begin,
                      int64_t end, void* ws, void* shared) {
    switch (t) {
      case ElementType::kFloat32:
        return bwd_run_fp<float, float>(p, plan, begin, end, ws, shared);
      case ElementType::kFloat64:
        return bwd_run_fp<double, double>(p, plan, begin, end, ws, shared);
      case ElementType::kBFloat16:
        if constexpr (kBf16) {
          if (Bf16Engine<G>::applies(p))
            return Bf16Engine<G>::bwd_run(p, plan, begin, end, ws, shared);
        }
        return bwd_run_fp<bf16, float>(p, plan, begin, end, ws, shared);
      case ElementType::kFloat16:
        return bwd_run_fp<f16, float>(p, plan, begin, end, ws, shared);
    }
  }

  // The second phase (sums of the key chunks' dq) is the float engine's for every type.
  static void bwd_reduce(const AttentionBwdParams& p, ElementType t, const Plan& plan,
                         int64_t begin, int64_t end, void* ws, void* shared) {
    switch (t) {
      case ElementType::kFloat32:
        return bwd_reduce_fp<float, float>(p, plan, begin, end, ws, shared);
      case ElementType::kFloat64:
        return bwd_reduce_fp<double, double>(p, plan, begin, end, ws, shared);
      case ElementType::kBFloat16:
        return bwd_reduce_fp<bf16, float>(p, plan, begin, end, ws, shared);
      case ElementType::kFloat16:
        return bwd_reduce_fp<f16, float>(p, plan, begin, end, ws, shared);
    }
  }

  static void from_float(const float* src, uint16_t* dst, int64_t n) {
    static_assert(sizeof(bf16) == sizeof(uint16_t));
    store_row(reinterpret_cast<bf16*>(dst), src, n);
  }
  static void to_float(const uint16_t* src, float* dst, int64_t n) {
    load_row(dst, reinterpret_cast<const bf16*>(src), n);
  }

  static constexpr KernelTable table(const char* name) {
    return {name, &fwd_plan, &fwd_run, &bwd_plan, &bwd_run, &bwd_reduce, &from_float, &to_float};
  }
};

ROLLINGQ_KERNELS_END
