// The AVX-512 kernel variants (x86-64-v4 plus AVX512_BF16), 64-byte vectors. They differ in
// how bfloat16 is multiplied: "amx" on the AMX tile unit (where the CPU and the operating system
// provide it), "avx512" converted to float32 (the float engine: FMAs), "avx512_dot" with the
// bf16 dot-product instruction VDPBF16PS. Which of the last two is faster depends on the CPU
// (bench/tile_probe): on AMD's Zen 4 VDPBF16PS does twice the multiply-adds of an FMA per cycle,
// on the AMX Xeon it was measured on half; csrc/cpu/dispatch.cpp ranks them by vendor.
// float32 / float64 run the same code in all three.
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
const KernelTable table = Kernels<NoBf16>::table("avx512");
const KernelTable table_dot = Kernels<Bf16Dot>::table("avx512_dot");
const KernelTable table_amx = Kernels<Amx>::table("amx");
}
}  // namespace cpu
}  // namespace rollingq
