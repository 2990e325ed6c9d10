// The tensor-core forward (fwd_mma_kernel.cuh) run on the CPU by the SIMT executor, plus small
// probes of the pieces it is built from, behind a C interface for the Python tests (ctypes).
//
// Built with a host compiler together with simt_emulator.cpp. The kernel source is the one nvcc
// compiles; here its primitives (simt.cuh) are the executor's, its 16-bit types are the
// executor's bit-exact half / bfloat16, and the grid is run block after block.
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "../bwd_mma_kernel.cuh"
#include "../fwd_mma_kernel.cuh"
#include "../params_fill.h"
#include "simt_emulator.h"

namespace rollingq {
namespace {

std::vector<emu::SiteStats> g_stats;
std::string g_error;

int64_t extent_elems(const TensorDesc& t) {
  int64_t n = 1;
  for (int i = 0; i < 4; ++i) {
    if (t.sizes[i] == 0) return 0;
    n += (t.sizes[i] - 1) * t.strides[i];
  }
  return n;
}

template <typename T, int kD, bool kCausal, bool kStats>
std::string run_forward(const AttentionParams& p, const TensorDesc* qkvo) {
  using Cfg = MmaFwdConfig<kD>;
  std::vector<int8_t> ws_buf(mma_workspace_bytes(p) + 16);
  const MmaFwdWorkspace ws = mma_workspace(p, mma_workspace_bytes(p) ? ws_buf.data() : nullptr);
  const int64_t B = p.batch, H = p.heads, Lq = p.seqlen_q, Lk = p.seqlen_k, D = p.head_dim;
  const int64_t M = p.num_modalities;
  emu::clear_buffers();
  const char* names[4] = {"q", "k", "v", "out"};
  for (int i = 0; i < 4; ++i)
    emu::register_buffer(qkvo[i].ptr, extent_elems(qkvo[i]) * 2, i == 3, names[i]);
  emu::register_buffer(p.rotation, (size_t)(H * D * D) * 4, false, "rotation");
  emu::register_buffer(p.rotated_rows, (size_t)(B * Lq), false, "rotated_rows");
  emu::register_buffer(p.key_modality, (size_t)(B * Lk) * 4, false, "key_modality");
  emu::register_buffer(p.key_padding, (size_t)(B * Lk), false, "key_padding");
  emu::register_buffer(p.lse, (size_t)(B * H * Lq) * 4, true, "lse");
  if (M > 0) {
    emu::register_buffer(p.modality_mass, (size_t)(B * H * Lq * M) * 4, true, "modality_mass");
    emu::register_buffer(p.key_sum, (size_t)(B * H * M * D) * 4, true, "key_sum");
    emu::register_buffer(p.key_count, (size_t)(B * M) * 4, true, "key_count");
  }
  if (ws.codes != nullptr) {
    emu::register_buffer(ws.codes, mma_workspace_bytes(p), true, "key codes");
    std::string err = emu::launch(
        emu::Dim3{(int)B, 1, 1}, kCodesThreads, (kCodesThreads / 32) * kMmaMaxModalities * 4,
        [&](unsigned char* smem) { fwd_mma::key_codes_block<Cfg::kBlockN>(p, ws, smem); }, &g_stats);
    if (!err.empty()) return "key codes: " + err;
  }
  return emu::launch(
      emu::Dim3{(int)mma_query_blocks(p), (int)H, (int)B}, Cfg::kThreads, Cfg::smem_bytes(kStats),
      [&](unsigned char* smem) { fwd_mma::fwd_block<T, kD, kCausal, kStats>(p, ws, smem); },
      &g_stats);
}

template <typename T, int kD>
std::string dispatch_forward(const AttentionParams& p, const TensorDesc* qkvo) {
  const bool stats = p.num_modalities > 0;
  if (p.is_causal)
    return stats ? run_forward<T, kD, true, true>(p, qkvo) : run_forward<T, kD, true, false>(p, qkvo);
  return stats ? run_forward<T, kD, false, true>(p, qkvo) : run_forward<T, kD, false, false>(p, qkvo);
}

template <typename T, int kD, bool kCausal>
std::string run_backward(const AttentionBwdParams& p, const TensorDesc* descs) {
  using Cfg = MmaBwdConfig<kD>;
  const int64_t B = p.batch, H = p.heads, Lq = p.seqlen_q, Lk = p.seqlen_k, D = p.head_dim;
  emu::clear_buffers();
  // q, k, v, out, dout read; dq, dk, dv written
  const char* names[8] = {"q", "k", "v", "out", "dout", "dq", "dk", "dv"};
  for (int i = 0; i < 8; ++i)
    emu::register_buffer(descs[i].ptr, extent_elems(descs[i]) * 2, i >= 5, names[i]);
  emu::register_buffer(p.rotation, (size_t)(H * D * D) * 4, false, "rotation");
  emu::register_buffer(p.rotated_rows, (size_t)(B * Lq), false, "rotated_rows");
  emu::register_buffer(p.key_padding, (size_t)(B * Lk), false, "key_padding");
  emu::register_buffer(p.lse, (size_t)(B * H * Lq) * 4, false, "lse");
  emu::register_buffer(p.delta, (size_t)(B * H * Lq) * 4, true, "delta");
  emu::register_buffer(p.q_rot, (size_t)(B * H * Lq * D) * 4, true, "q_rot");
  uint16_t* q_rot = p.rotation != nullptr ? static_cast<uint16_t*>(p.q_rot) : nullptr;
  std::string err;
  if (Lq > 0) {
    err = emu::launch(
        emu::Dim3{(int)tile::ceil_div(Lq, kBwdPrepRows), (int)H, (int)B}, 128, 0,
        [&](unsigned char*) { bwd_mma::prep_block<T, kD>(p, q_rot); }, &g_stats);
    if (!err.empty()) return "prep: " + err;
    err = emu::launch(
        emu::Dim3{(int)tile::ceil_div(Lq, Cfg::kDqBlockM), (int)H, (int)B}, Cfg::kThreads,
        Cfg::kDqSmem,
        [&](unsigned char* smem) { bwd_mma::dq_block<T, kD, kCausal>(p, q_rot, smem); },
        &g_stats);
    if (!err.empty()) return "dq: " + err;
  }
  err = emu::launch(
      emu::Dim3{(int)tile::ceil_div(Lk, Cfg::kKvBlockN), (int)H, (int)B}, Cfg::kThreads,
      Cfg::kKvSmem,
      [&](unsigned char* smem) { bwd_mma::dkdv_block<T, kD, kCausal>(p, q_rot, smem); },
      &g_stats);
  return err.empty() ? err : "dkdv: " + err;
}

template <typename T, int kD>
std::string dispatch_backward(const AttentionBwdParams& p, const TensorDesc* descs) {
  return p.is_causal ? run_backward<T, kD, true>(p, descs) : run_backward<T, kD, false>(p, descs);
}

// ---- probes -----------------------------------------------------------------------------------
// One warp loads, from swizzled tiles whose element (r, c) holds the bits (r << 8) | c, the
// operands of one mma step exactly as the kernel addresses them, and returns the registers.
template <int kD>
std::string probe_fragments(uint32_t* out_a, uint32_t* out_k, uint32_t* out_v, int row0, int ks,
                            int np, int dp) {
  constexpr int kRows = 128;
  const size_t tile_bytes = (size_t)kRows * kD * 2;
  return emu::launch(emu::Dim3{}, 32, 3 * tile_bytes, [&](unsigned char* smem) {
    uint16_t* tiles[3];
    for (int k = 0; k < 3; ++k) tiles[k] = reinterpret_cast<uint16_t*>(smem + k * tile_bytes);
    const int lane = simt::thread_index();
    for (int k = 0; k < 3; ++k)
      for (int r = lane; r < kRows; r += 32)
        for (int c = 0; c < kD; ++c)
          simt::sts(tiles[k] + layout::swz<kD>(r, c), static_cast<uint16_t>((r << 8) | c));
    simt::sync_threads();
    uint32_t a[4], kb[4], vb[4];
    simt::ldmatrix_x4(a, tiles[0] + layout::swz<kD>(row0 + layout::ldsm_a_row(lane),
                                                   16 * ks + layout::ldsm_a_col(lane)));
    simt::ldmatrix_x4(kb, tiles[1] + layout::swz<kD>(16 * np + layout::ldsm_bnk_row(lane),
                                                    16 * ks + layout::ldsm_bnk_col(lane)));
    simt::ldmatrix_x4_trans(vb, tiles[2] + layout::swz<kD>(16 * np + layout::ldsm_bkn_row(lane),
                                                          16 * dp + layout::ldsm_bkn_col(lane)));
    for (int k = 0; k < 4; ++k) {
      out_a[lane * 4 + k] = a[k];
      out_k[lane * 4 + k] = kb[k];
      out_v[lane * 4 + k] = vb[k];
    }
  }, &g_stats);
}

float g_probe_src[256];

// Deliberately wrong (and one right) uses of the primitives: the executor must report each.
std::string probe_hazard(int which) {
  return emu::launch(emu::Dim3{}, 64, 1024, [which](unsigned char* smem) {
    float* src = g_probe_src;
    const int tid = simt::thread_index();
    auto* f = reinterpret_cast<float*>(smem);
    switch (which) {
      case 0:  // correct: copy, wait, barrier, read another thread's chunk
        simt::cp_async_16(f + 4 * tid, src + 4 * tid);
        simt::cp_async_commit();
        simt::cp_async_wait<0>();
        simt::sync_threads();
        (void)simt::lds(f + 4 * ((tid + 1) % 64));
        break;
      case 1:  // read before the copy was waited
        simt::cp_async_16(f + 4 * tid, src + 4 * tid);
        simt::cp_async_commit();
        (void)simt::lds(f + 4 * tid);
        simt::cp_async_wait<0>();
        break;
      case 2:  // waited, but another thread reads it with no barrier
        simt::cp_async_16(f + 4 * tid, src + 4 * tid);
        simt::cp_async_commit();
        simt::cp_async_wait<0>();
        (void)simt::lds(f + 4 * ((tid + 1) % 64));
        simt::sync_threads();
        break;
      case 3:  // write-after-read in one epoch
        (void)simt::lds(f + tid);
        simt::sts(f + (tid + 63) % 64, 1.f);  // the word the previous thread read
        break;
      case 4:  // a copy never waited
        simt::cp_async_16(f + 4 * tid, src + 4 * tid);
        simt::cp_async_commit();
        break;
      case 5:  // a shuffle in a divergent branch
        if (tid % 32 < 16) (void)simt::shfl_xor(1.f, 1);
        else (void)simt::shfl_xor(2.f, 1);
        break;
      case 6:  // a barrier not every thread reaches
        if (tid < 32) simt::sync_threads();
        break;
      case 7:  // an 8-way bank conflict (stride of 8 words), otherwise correct
        (void)simt::lds(f + 8 * (tid % 32));
        break;
      case 8:  // out of bounds in shared memory
        (void)simt::lds(f + 256 + tid);
        break;
      case 9:  // cp.async from memory outside every registered buffer
        simt::cp_async_16(f + 4 * tid, src + 4 * tid);
        simt::cp_async_commit();
        simt::cp_async_wait<0>();
        break;
      default:
        break;
    }
  }, &g_stats);
}

}  // namespace
}  // namespace rollingq

// ---- C interface ---------------------------------------------------------------------------------
extern "C" {

struct RqMmaArgs {
  rollingq::TensorDesc q, k, v, out;
  const float* rotation;  // (H, D, D) float32 or null
  const bool* rotated_rows;
  const int32_t* key_modality;
  const bool* key_padding;
  float* lse;
  float* modality_mass;
  float* key_sum;
  float* key_count;
  double scale;
  int32_t num_modalities;
  int32_t is_causal;
  int32_t kind;  // ScalarKind: 1 float16, 2 bfloat16
};

// Runs the key-code pass and the tensor-core forward; 0 on success, else -1 with the message
// available from rq_simt_error (a race, a divergent collective, an out-of-bounds access, or a
// problem the tensor-core path does not take).
int rq_simt_forward(const RqMmaArgs* a) {
  using namespace rollingq;
  AttentionParams p;
  fill_forward_params(&p, a->q, a->k, a->v, a->out, a->scale, a->is_causal != 0);
  p.rotation = a->rotation;
  p.rotated_rows = a->rotated_rows;
  p.key_modality = a->key_modality;
  p.key_padding = a->key_padding;
  p.num_modalities = a->num_modalities;
  p.lse = a->lse;
  p.modality_mass = a->modality_mass;
  p.key_sum = a->key_sum;
  p.key_count = a->key_count;
  const ScalarKind kind = static_cast<ScalarKind>(a->kind);
  const FwdPath path = choose_forward_path(p, kind);
  const TensorDesc qkvo[4] = {a->q, a->k, a->v, a->out};
  g_stats.clear();
  if (path == FwdPath::kGeneric) {
    g_error = "these inputs take the generic path, not the tensor-core one";
    return -1;
  }
  const bool hd64 = path == FwdPath::kMma64;
  if (kind == ScalarKind::kFloat16)
    g_error = hd64 ? dispatch_forward<simt::fp16, 64>(p, qkvo) : dispatch_forward<simt::fp16, 128>(p, qkvo);
  else
    g_error = hd64 ? dispatch_forward<simt::bf16, 64>(p, qkvo) : dispatch_forward<simt::bf16, 128>(p, qkvo);
  return g_error.empty() ? 0 : -1;
}

struct RqMmaBwdArgs {
  RqMmaArgs fwd;  // out and lse are inputs here
  rollingq::TensorDesc dout, dq, dk, dv;
  float* delta;  // (B, H, Lq) workspace
  void* q_rot;   // (B, H, Lq, D) float32-sized workspace
};

// The tensor-core backward (prep, dq, dkdv kernels); 0 on success, else -1 (rq_simt_error).
int rq_simt_backward(const RqMmaBwdArgs* a) {
  using namespace rollingq;
  AttentionBwdParams p;
  fill_forward_params(&p, a->fwd.q, a->fwd.k, a->fwd.v, a->fwd.out, a->fwd.scale,
                      a->fwd.is_causal != 0);
  fill_backward_params(&p, a->dout, a->dq, a->dk, a->dv);
  p.rotation = a->fwd.rotation;
  p.rotated_rows = a->fwd.rotated_rows;
  p.key_padding = a->fwd.key_padding;
  p.lse = a->fwd.lse;
  p.delta = a->delta;
  p.q_rot = a->q_rot;
  const ScalarKind kind = static_cast<ScalarKind>(a->fwd.kind);
  const TensorDesc descs[8] = {a->fwd.q, a->fwd.k, a->fwd.v, a->fwd.out, a->dout, a->dq, a->dk, a->dv};
  g_stats.clear();
  const BwdPath path = choose_backward_path(p, kind);
  if (path == BwdPath::kGeneric) {
    g_error = "these inputs take the generic backward, not the tensor-core one";
    return -1;
  }
  const bool hd64 = path == BwdPath::kMma64;
  if (kind == ScalarKind::kFloat16)
    g_error = hd64 ? dispatch_backward<simt::fp16, 64>(p, descs) : dispatch_backward<simt::fp16, 128>(p, descs);
  else
    g_error = hd64 ? dispatch_backward<simt::bf16, 64>(p, descs) : dispatch_backward<simt::bf16, 128>(p, descs);
  return g_error.empty() ? 0 : -1;
}

// Operand registers of one mma step loaded the kernel's way (see probe_fragments): out_a is the A
// operand of rows row0..row0+15, k16 step ks; out_k the K-tile B operand of n-tiles 2np, 2np+1 at
// step ks; out_v the V-tile B operand of keys 16np.., columns 16dp... Each is [32 lanes][4].
int rq_simt_fragments(int d, int row0, int ks, int np, int dp, uint32_t* out_a, uint32_t* out_k,
                      uint32_t* out_v) {
  using namespace rollingq;
  g_stats.clear();
  emu::clear_buffers();
  g_error = d == 64 ? probe_fragments<64>(out_a, out_k, out_v, row0, ks, np, dp)
                    : probe_fragments<128>(out_a, out_k, out_v, row0, ks, np, dp);
  return g_error.empty() ? 0 : -1;
}

int rq_simt_hazard(int which) {
  using namespace rollingq;
  g_stats.clear();
  emu::clear_buffers();
  // the source array of the copies is a registered global buffer, except in probe 9
  if (which != 9) emu::register_buffer(g_probe_src, sizeof g_probe_src, false, "src");
  g_error = probe_hazard(which);
  return g_error.empty() ? 0 : -1;
}

// Element offset of (row, col) in a swizzled tile of d-element rows (d = 64 or 128).
int rq_swizzle(int d, int row, int col) {
  return d == 64 ? rollingq::layout::swz<64>(row, col) : rollingq::layout::swz<128>(row, col);
}

// Copies the last error message (empty: none) into buf; returns its full length.
int rq_simt_error(char* buf, int len) {
  if (len > 0) {
    std::strncpy(buf, rollingq::g_error.c_str(), len - 1);
    buf[len - 1] = '\0';
  }
  return static_cast<int>(rollingq::g_error.size());
}

// Site statistics of the last run, one line per site: "site\tinstructions\twavefronts\tmax_ways".
int rq_simt_report(char* buf, int len) {
  std::string out;
  for (const auto& s : rollingq::g_stats) {
    char line[512];
    std::snprintf(line, sizeof line, "%s\t%lld\t%lld\t%d\n", s.site.c_str(),
                  (long long)s.instructions, (long long)s.wavefronts, s.max_ways);
    out += line;
  }
  if (len > 0) {
    std::strncpy(buf, out.c_str(), len - 1);
    buf[len - 1] = '\0';
  }
  return static_cast<int>(out.size());
}

}  // extern "C"
