// The AVX-512 kernel variants (x86-64-v4 plus AVX512_BF16), 64-byte vectors: "avx512" multiplies
// bfloat16 with the bf16 dot-product instructions, "amx" with the AMX tile unit where the CPU
// and the operating system provide it. float32 / float64 run the same code in both.
#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VL__) || \
    !defined(__AVX512DQ__) || !defined(__AVX512BF16__) || !defined(__AMX_TILE__) ||   \
    !defined(__AMX_BF16__)
#error "csrc/cpu/isa/avx512.cpp needs the avx512 flags of csrc/build_flags.txt"
#endif
// GCC 12 reports the deliberately undefined operands inside its own AVX-512 intrinsics headers
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define ROLLINGQ_ISA_NS isa_avx512
#include "cpu/kernels/bf16_engine.h"
#include "cpu/kernels/table.h"

namespace rollingq {
namespace cpu {
namespace isa_avx512 {
const KernelTable table = Kernels<Bf16Dot>::table("avx512");
const KernelTable table_amx = Kernels<Amx>::table("amx");
}
}  // namespace cpu
}  // namespace rollingq
