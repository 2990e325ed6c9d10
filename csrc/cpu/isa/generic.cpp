// The portable kernel variant: the baseline instruction set of the target (SSE2 on x86-64, NEON
// on aarch64), 16-byte vectors. Runs on every CPU the library loads on.
#define ROLLINGQ_ISA_NS isa_generic
#include "cpu/kernels/table.h"

namespace rollingq {
namespace cpu {
namespace isa_generic {
const KernelTable table = Kernels<NoBf16>::table("generic");
}
}  // namespace cpu
}  // namespace rollingq
