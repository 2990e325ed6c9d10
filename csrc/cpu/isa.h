// The interface between the dispatcher (csrc/cpu/dispatch.cpp, compiled for the baseline
// instruction set) and the kernel variants (csrc/cpu/isa/*.cpp, each compiled for one
// instruction set). Plain C++ only: the variant files include no torch header, so that no
// inline function compiled for a wider instruction set can be merged into code that runs on a
// CPU without it.
//
// A kernel call is planned by the variant (tile sizes, task count, workspace sizes), then run
// by the dispatcher as tasks [begin, end) on torch's thread pool. The partition of the work into
// tasks depends on the problem's shape only, never on the number of threads, and every output
// element is reduced in a fixed order inside one task: results are bitwise identical for any
// thread count.
#pragma once

#include <cstddef>
#include <cstdint>

#include "cpu/attention_cpu.h"

namespace rollingq {
namespace cpu {

struct Plan {
  int64_t threads = 1;          // input: the threads the tasks will be spread over
  int64_t stream_bytes = -1;    // input: outputs of at least this many bytes are written with
                                // streaming stores where their rows allow it (-1: never)
  int64_t tasks = 0;            // tasks of the main phase
  int64_t flops_per_task = 1;   // to run small problems on the calling thread
  int64_t task_group = 1;       // consecutive tasks that share packed rows (a head's query tiles):
                                // threads take tasks in chunks of whole groups where those
                                // balance the threads (chunk_tasks, dispatch.cpp)
  size_t workspace_bytes = 0;   // per thread, 64-byte aligned
  size_t shared_bytes = 0;      // one buffer for all tasks (backward: partial dq sums)
  int64_t reduce_tasks = 0;     // backward: tasks of the second phase (0 = none)
  int64_t param[6] = {};        // private to the variant (tile sizes, chunking)
};

struct KernelTable {
  const char* name;
  void (*fwd_plan)(const AttentionParams& p, ElementType t, Plan& plan);
  void (*fwd_run)(const AttentionParams& p, ElementType t, const Plan& plan, int64_t begin,
                  int64_t end, void* workspace);
  void (*bwd_plan)(const AttentionBwdParams& p, ElementType t, Plan& plan);
  void (*bwd_run)(const AttentionBwdParams& p, ElementType t, const Plan& plan, int64_t begin,
                  int64_t end, void* workspace, void* shared);
  void (*bwd_reduce)(const AttentionBwdParams& p, ElementType t, const Plan& plan,
                     int64_t begin, int64_t end, void* workspace, void* shared);
  // The conversions every kernel reads and writes bf16 rows with: n float32 to bf16 (round to
  // nearest even, NaN kept quiet), or n bf16 (as uint16) to float32. For tests.
  void (*bf16_from_float)(const float* src, uint16_t* dst, int64_t n);
  void (*bf16_to_float)(const uint16_t* src, float* dst, int64_t n);
};

// One table per compiled variant (defined in csrc/cpu/isa/<name>.cpp). The AMX and bf16-dot
// tables live in the avx512 file: they share that file's code and differ in the bf16 products.
namespace isa_generic {
extern const KernelTable table;
}
namespace isa_avx2 {
extern const KernelTable table;
}
namespace isa_avx512 {
extern const KernelTable table;
extern const KernelTable table_dot;
extern const KernelTable table_amx;
}

}  // namespace cpu
}  // namespace rollingq
