// A deterministic SIMT executor for CUDA thread blocks on the CPU, for tests without a GPU.
//
// The tensor-core kernels are written against the small primitive layer of simt.cuh (thread
// indices, barriers, shuffles, ldmatrix, mma.sync, cp.async, shared and global loads/stores).
// Under nvcc those are single PTX instructions; compiled with a host compiler they call this
// executor, which runs every thread of a block as a fiber on one OS thread and switches at each
// barrier and warp-collective instruction. The kernel source is therefore the same code on both
// sides, and the executor checks what a GPU would not report:
//
//   * races in shared memory, by barrier epochs: a location written by one thread and touched by
//     another before the next __syncthreads, a read of bytes an un-waited cp.async is still
//     writing, a cp.async into bytes another thread read in the same epoch, copies never waited;
//   * divergent warp collectives (lanes of a warp at different shuffles / ldmatrix / mma) and
//     barriers that not every thread reaches (deadlock);
//   * out-of-bounds global and shared accesses (only registered buffers may be touched), and any
//     output byte written twice in one launch;
//   * shared-memory bank conflicts, per instruction site (file:line), with the hardware's rule:
//     accesses of up to 4 bytes form one wavefront per warp, 8-byte accesses one per half-warp,
//     16-byte accesses (and each 8x8 matrix of ldmatrix) one per quarter-warp; within a
//     wavefront, distinct 4-byte words in one of the 32 banks are serialised.
//
// Fragment layouts follow the PTX ISA (mma.m16n8k16, ldmatrix.m8n8 with and without .trans).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

namespace rollingq {
namespace emu {

// ---- 16-bit floating-point storage types (bit-exact round-to-nearest-even conversions) ----------
struct half_t {
  uint16_t bits;
};
struct bf16_t {
  uint16_t bits;
};

float half_to_float(uint16_t h);
uint16_t float_to_half(float f);
inline float bf16_to_float(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
uint16_t float_to_bf16(float f);

// ---- launch ------------------------------------------------------------------------------------
struct Dim3 {
  int x = 1, y = 1, z = 1;
};

// Per instruction site statistics over one launch (or accumulated over several).
struct SiteStats {
  std::string site;         // "file:line kind"
  int64_t instructions = 0; // warp-level instructions executed
  int64_t wavefronts = 0;   // shared-memory wavefronts they needed
  int max_ways = 0;         // worst bank-conflict degree seen (1 = conflict-free)
};

// Buffers the kernel may touch in global memory; everything else is an out-of-bounds access.
void clear_buffers();
void register_buffer(const void* ptr, size_t bytes, bool writable, const char* name);

// Runs body() once per thread of every block of the grid (blocks one after the other, threads of
// a block as fibers). Returns "" on success, else the first error found. Site statistics of the
// launch are appended to *stats when stats != nullptr.
std::string launch(Dim3 grid, int threads_per_block, size_t smem_bytes,
                   const std::function<void(unsigned char* smem)>& body,
                   std::vector<SiteStats>* stats = nullptr);

// ---- primitives, called from inside body() -------------------------------------------------------
int thread_index();
int block_index(int axis);
int grid_size(int axis);
void sync_threads(const char* file, int line);
float shfl_xor(float v, int lane_mask, const char* file, int line);
uint32_t ballot(bool pred, const char* file, int line);
// ldmatrix.sync.aligned.m8n8.x4(.trans).shared.b16: `row_addr` is this lane's row address.
void ldmatrix_x4(uint32_t* r, const void* row_addr, bool trans, const char* file, int line);
// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32, c += a b.
void mma_16816(float* c, const uint32_t* a, uint32_t b0, uint32_t b1, bool bf16, const char* file,
               int line);
// cp.async.cg.shared.global, 16 bytes; the copy lands when a cp.async.wait_group covers it.
void cp_async_16(void* smem_dst, const void* gmem_src, const char* file, int line);
void cp_async_commit();
void cp_async_wait(int newest_pending_groups_allowed, const char* file, int line);
// Plain shared / global accesses of `bytes` bytes (1, 2, 4, 8 or 16).
void shared_load(void* reg, const void* smem, int bytes, const char* file, int line);
void shared_store(void* smem, const void* reg, int bytes, const char* file, int line);
void global_load(void* reg, const void* gmem, int bytes, const char* file, int line);
void global_store(void* gmem, const void* reg, int bytes, const char* file, int line);

}  // namespace emu
}  // namespace rollingq
