// The KernelTable of one variant: routes each element type to its engine. Included once, by
// csrc/cpu/isa/<name>.cpp, after it has defined ROLLINGQ_ISA_NS.
#pragma once

#include "cpu/isa.h"
#include "cpu/kernels/fp_engine.h"

ROLLINGQ_KERNELS_BEGIN

void fwd_plan(const AttentionParams& p, ElementType t, Plan& plan) {
  switch (t) {
    case ElementType::kFloat32:
      return fwd_plan_fp<float, float>(p, plan);
    case ElementType::kFloat64:
      return fwd_plan_fp<double, double>(p, plan);
    case ElementType::kBFloat16:
      return fwd_plan_fp<bf16, float>(p, plan);
  }
}

void fwd_run(const AttentionParams& p, ElementType t, const Plan& plan, int64_t begin,
             int64_t end, void* ws) {
  switch (t) {
    case ElementType::kFloat32:
      return fwd_run_fp<float, float>(p, plan, begin, end, ws);
    case ElementType::kFloat64:
      return fwd_run_fp<double, double>(p, plan, begin, end, ws);
    case ElementType::kBFloat16:
      return fwd_run_fp<bf16, float>(p, plan, begin, end, ws);
  }
}

void bwd_plan(const AttentionBwdParams& p, ElementType t, Plan& plan) {
  switch (t) {
    case ElementType::kFloat32:
      return bwd_plan_fp<float, float>(p, plan);
    case ElementType::kFloat64:
      return bwd_plan_fp<double, double>(p, plan);
    case ElementType::kBFloat16:
      return bwd_plan_fp<bf16, float>(p, plan);
  }
}

void bwd_run(const AttentionBwdParams& p, ElementType t, const Plan& plan, int64_t begin,
             int64_t end, void* ws, void* shared) {
  switch (t) {
    case ElementType::kFloat32:
      return bwd_run_fp<float, float>(p, plan, begin, end, ws, shared);
    case ElementType::kFloat64:
      return bwd_run_fp<double, double>(p, plan, begin, end, ws, shared);
    case ElementType::kBFloat16:
      return bwd_run_fp<bf16, float>(p, plan, begin, end, ws, shared);
  }
}

void bwd_reduce(const AttentionBwdParams& p, ElementType t, const Plan& plan, int64_t begin,
                int64_t end, void* ws, void* shared) {
  switch (t) {
    case ElementType::kFloat32:
      return bwd_reduce_fp<float, float>(p, plan, begin, end, ws, shared);
    case ElementType::kFloat64:
      return bwd_reduce_fp<double, double>(p, plan, begin, end, ws, shared);
    case ElementType::kBFloat16:
      return bwd_reduce_fp<bf16, float>(p, plan, begin, end, ws, shared);
  }
}

ROLLINGQ_KERNELS_END

#define ROLLINGQ_TABLE(NAME) \
  {NAME, &fwd_plan, &fwd_run, &bwd_plan, &bwd_run, &bwd_reduce}
