// The portable kernel variant: the baseline instruction set of the target (SSE2 on x86-64, NEON
// on aarch64), 16-byte vectors. Runs on every CPU the library loads on.
#define ROLLINGQ_ISA_NS isa_generic
#include "cpu/kernels/table.h"

namespace rollingq {
namespace cpu {
namespace isa_generic {
const KernelTable table = ROLLINGQ_TABLE("generic");
}
}  // namespace cpu
}  // namespace rollingq
