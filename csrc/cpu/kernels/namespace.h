// Every kernel header opens the namespace of the variant that includes it
// (rollingq::cpu::<ROLLINGQ_ISA_NS>) and an anonymous namespace inside it, so that nothing but
// the variant's KernelTable has external linkage: the linker can never pick a function compiled
// for one instruction set to serve another variant.
#pragma once

#ifndef ROLLINGQ_ISA_NS
#error "kernel headers are included by csrc/cpu/isa/<name>.cpp only (ROLLINGQ_ISA_NS undefined)"
#endif

#define ROLLINGQ_KERNELS_BEGIN   \
  namespace rollingq {           \
  namespace cpu {                \
  namespace ROLLINGQ_ISA_NS {    \
  namespace {
#define ROLLINGQ_KERNELS_END \
  }                          \
  }                          \
  }                          \
  }
