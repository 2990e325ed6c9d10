// Tiling, shared-memory layout and launch configuration of the tensor-core forward.
//
// Host and device, free of torch and CUDA headers: the launcher, the binding (workspace size)
// and the CPU emulation all read the same numbers from here.
//
// Tiling: a block of 4 warps owns 128 query rows of one (batch, head); warp w owns rows
// 32 w .. 32 w + 31 as two m16 tiles, so every K / V fragment an ldmatrix brings into registers
// feeds two mma.sync. Keys are walked in tiles of 64 (D = 64) or 32 (D = 128). Shared memory holds the Q tile, one K tile,
// one V tile (K of tile n + 1 streams in while P V of tile n runs; V of tile n streams in while
// S = Q K^T of tile n runs), two 80-byte key-code records and, with statistics, the per-modality
// key sums of the block that computes them. Rows are 128 or 256 bytes, stored with the 16-byte
// chunk index XOR-ed with (row % 8), which makes every ldmatrix and cp.async conflict-free.
#pragma once

#include <cstddef>
#include <cstdint>

#include "../rollingq_params.h"
#include "smem_layout.h"
#include "tile_math.h"

namespace rollingq {

// Up to 8 modalities: their one-hot columns fill one n8 tile of mma.sync.
constexpr int kMmaMaxModalities = 8;
// Query rows per block of the tensor-core forward.
constexpr int kMmaBlockM = 128;
// Keys per tile: 64 for D = 64; 32 for D = 128, where the accumulators of 32 rows x 128 columns
// (128 registers per thread) leave no room for a 64-key score tile.
RQ_HD int mma_block_n(int64_t head_dim) { return head_dim <= 64 ? 64 : 32; }
// Per key tile of BN keys, the record of key codes the kernel reads: bytes [0, BN) the code of
// each key (modality id >= 0, -1 counted nowhere, -2 invisible: padding or past the end), byte
// BN + h = 1 when the 32 keys of half h are all visible, zeros up to BN + 16.
RQ_HD int code_record_bytes(int block_n) { return block_n + 16; }
// Threads of the block that writes the key codes (one block per batch row).
constexpr int kCodesThreads = 512;

template <int kD>
struct MmaFwdConfig {
  static_assert(kD == 64 || kD == 128, "the tensor-core forward handles head dims 64 and 128");
  static constexpr int kBlockM = kMmaBlockM;
  static constexpr int kBlockN = kD <= 64 ? 64 : 32;
  static constexpr int kCodeBytes = kBlockN + 16;
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kRowsPerWarp = kBlockM / kWarps;  // 32
  static constexpr int kMTiles = kRowsPerWarp / 16;      // 2
  // D = 64: the Q fragments (2 x 4 x 4 registers) stay in registers for the whole loop;
  // D = 128 would need 64 more registers, so they are re-read with ldmatrix per key tile.
  static constexpr bool kQInRegs = kD <= 64;
  static constexpr int kKeySumPitch = kD + 8;
  // Register cap (__maxnreg__) of each variant for the architecture it is compiled for: 255,
  // which lets 2 blocks of 128 threads share an SM, lowered where ptxas (nvcc 13.0) would
  // otherwise spill a few bytes. Near 255 its allocation is erratic (a lower cap makes it hoist
  // fewer fragment loads); tests/test_cuda_compile.py fails on any spill, so a compiler that
  // behaves differently is noticed, and bench/cuda_cost_table.py shows the counts.
  template <bool kCausal, bool kStats>
  static constexpr int max_registers(int arch) {
    return (arch >= 900 && kD == 128 && !kStats) ? (kCausal ? 224 : 232) : 255;
  }  // floats; 8-byte accesses stay conflict-free

  static constexpr size_t kQOffset = 0;
  static constexpr size_t kKOffset = kQOffset + (size_t)kBlockM * kD * 2;
  static constexpr size_t kVOffset = kKOffset + (size_t)kBlockN * kD * 2;
  static constexpr size_t kCodesOffset = kVOffset + (size_t)kBlockN * kD * 2;
  static constexpr size_t kKeySumOffset = kCodesOffset + 2 * kCodeBytes;
  static constexpr size_t smem_bytes(bool stats) {
    return kKeySumOffset + (stats ? (size_t)kMmaMaxModalities * kKeySumPitch * 4 : 0);
  }
};

// The key-code records of one launch: (B, key_tiles, record_bytes) bytes, or none when there is
// neither padding nor a statistic to take (then a key is visible iff it exists).
struct MmaFwdWorkspace {
  int8_t* codes = nullptr;
  int64_t codes_batch_stride = 0;  // bytes
  int64_t key_tiles = 0;
  int block_n = 0;
  int record_bytes = 0;
};

inline int64_t mma_key_tiles(const AttentionParams& p) {
  const int bn = mma_block_n(p.head_dim);
  return (p.seqlen_k + bn - 1) / bn;
}

inline bool mma_needs_codes(const AttentionParams& p) {
  return p.num_modalities > 0 || p.key_padding != nullptr;
}

inline size_t mma_workspace_bytes(const AttentionParams& p) {
  if (!mma_needs_codes(p)) return 0;
  return (size_t)p.batch * (size_t)mma_key_tiles(p) * code_record_bytes(mma_block_n(p.head_dim));
}

inline MmaFwdWorkspace mma_workspace(const AttentionParams& p, void* buffer) {
  MmaFwdWorkspace ws;
  ws.key_tiles = mma_key_tiles(p);
  ws.block_n = mma_block_n(p.head_dim);
  ws.record_bytes = code_record_bytes(ws.block_n);
  if (mma_needs_codes(p)) {
    ws.codes = static_cast<int8_t*>(buffer);
    ws.codes_batch_stride = ws.key_tiles * ws.record_bytes;
  }
  return ws;
}

// Grid of the main kernel: (query blocks, heads, batch); at least one query block, because the
// block that sums the keys is owed even when Lq == 0.
inline int64_t mma_query_blocks(const AttentionParams& p) {
  const int64_t n = (p.seqlen_q + kMmaBlockM - 1) / kMmaBlockM;
  return n < 1 ? 1 : n;
}

}  // namespace rollingq
