// The AVX2 kernel variant (x86-64-v3: AVX2, FMA, F16C, BMI1/2), 32-byte vectors. bfloat16 runs
// in float32 (these CPUs have no bf16 dot products).
#if !defined(__AVX2__) || !defined(__FMA__)
#error "csrc/cpu/isa/avx2.cpp needs the avx2 flags of csrc/build_flags.txt"
#endif
#define ROLLINGQ_ISA_NS isa_avx2
#include "cpu/kernels/table.h"

namespace rollingq {
namespace cpu {
namespace isa_avx2 {
const KernelTable table = Kernels<NoBf16>::table("avx2");
}
}  // namespace cpu
}  // namespace rollingq
