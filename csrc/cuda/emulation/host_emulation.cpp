// CPU emulation of the CUDA kernels' tile algorithm, for tests on machines without a GPU.
//
// Built with a plain host compiler (g++) into a small shared library that the tests load with
// ctypes. It fills the params struct with the binding's own functions (params_fill.h) and runs
// the forward and backward loops of the kernels with the same tile arithmetic (tile_math.h):
// the same tiles, masks, online-softmax update and final normalisation, plus a split-K mode that
// cuts each row's key tiles into chunks and combines them with merge_partials. Scalar loops
// stand in for the MMAs; float64 accumulation makes the comparison with the reference tight.
// (The tensor-core forward itself runs on the CPU through the SIMT executor: simt_runner.cpp.)
#include <cstdint>
#include <cstring>
#include <vector>

#include "../params_fill.h"
#include "../tile_math.h"

namespace rollingq {
namespace {

using tile::RowState;

template <typename A>
struct Partial {
  RowState<A> st;
  std::vector<A> acc;
  std::vector<A> mass;
  Partial(int dv, int m) : st{A(tile::neg_inf_f()), A(0)}, acc(dv, A(0)), mass(m, A(0)) {}
};

template <typename A>
const A* row_ptr(const void* base, int64_t bs, int64_t hs, int64_t rs, int64_t b, int64_t h,
                 int64_t i) {
  return static_cast<const A*>(base) + tile::row_offset(bs, hs, rs, b, h, i);
}

// Key tiles [nb_begin, nb_end) of query row i into one partial: what one lane-quad of the
// tensor-core kernel does for its row, tile by tile.
template <typename A>
void run_key_tiles(const AttentionParams& p, int64_t b, int64_t h, int64_t i, const A* qrow,
                   int64_t nb_begin, int64_t nb_end, int block_n, Partial<A>* part) {
  const int64_t D = p.head_dim, Dv = p.value_dim, Lk = p.seqlen_k;
  const bool* pad = p.key_padding == nullptr ? nullptr : p.key_padding + b * Lk;
  const int32_t* ids = p.key_modality == nullptr ? nullptr : p.key_modality + b * Lk;
  std::vector<A> s(block_n);
  std::vector<int> codes(block_n);
  for (int64_t nb = nb_begin; nb < nb_end; ++nb) {
    const int64_t n0 = nb * block_n;
    A tmax = A(tile::neg_inf_f());
    for (int c = 0; c < block_n; ++c) {
      const int64_t j = n0 + c;
      codes[c] = tile::key_code(j, Lk, pad, ids);
      s[c] = A(tile::neg_inf_f());
      if (tile::visible(i, j, codes[c], p.is_causal)) {
        const A* krow = row_ptr<A>(p.k, p.k_batch_stride, p.k_head_stride, p.k_row_stride, b, h, j);
        A dot = A(0);
        for (int64_t d = 0; d < D; ++d) dot += qrow[d] * krow[d];
        s[c] = dot * A(p.scale);
      }
      tmax = tile::max_acc(tmax, s[c]);
    }
    A factor;
    part->st.m = tile::update_max(part->st.m, tmax, &factor);
    part->st.l *= factor;
    for (auto& x : part->mass) x *= factor;
    for (auto& x : part->acc) x *= factor;
    for (int c = 0; c < block_n; ++c) {
      const A pr = tile::prob(s[c], part->st.m);
      if (pr == A(0)) continue;
      part->st.l += pr;
      if (codes[c] >= 0 && codes[c] < p.num_modalities) part->mass[codes[c]] += pr;
      const A* vrow =
          row_ptr<A>(p.v, p.v_batch_stride, p.v_head_stride, p.v_row_stride, b, h, n0 + c);
      for (int64_t e = 0; e < Dv; ++e) part->acc[e] += pr * vrow[e];
    }
  }
}

template <typename A>
void key_stats(const AttentionParams& p, int64_t b, int64_t h) {
  const int M = p.num_modalities;
  const int64_t D = p.head_dim, Lk = p.seqlen_k;
  const bool* pad = p.key_padding == nullptr ? nullptr : p.key_padding + b * Lk;
  const int32_t* ids = p.key_modality + b * Lk;
  A* key_sum = static_cast<A*>(p.key_sum) + (b * p.heads + h) * M * D;
  for (int64_t pair = 0; pair < (int64_t)M * D; ++pair) {
    const int m = static_cast<int>(pair / D);
    const int64_t d = pair % D;
    A s = A(0);
    for (int64_t j = 0; j < Lk; ++j) {
      if (tile::key_code(j, Lk, pad, ids) == m)
        s += row_ptr<A>(p.k, p.k_batch_stride, p.k_head_stride, p.k_row_stride, b, h, j)[d];
    }
    key_sum[pair] = s;
  }
  if (h == 0) {
    A* count = static_cast<A*>(p.key_count) + b * M;
    for (int m = 0; m < M; ++m) {
      A c = A(0);
      for (int64_t j = 0; j < Lk; ++j) c += tile::key_code(j, Lk, pad, ids) == m;
      count[m] = c;
    }
  }
}

template <typename A>
void forward(const AttentionParams& p, int block_m, int block_n, int splits) {
  const int64_t D = p.head_dim, Dv = p.value_dim, Lq = p.seqlen_q, Lk = p.seqlen_k;
  const int M = p.num_modalities;
  std::vector<A> qrow(D), qraw(D);
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t h = 0; h < p.heads; ++h) {
      for (int64_t m0 = 0; m0 < Lq; m0 += block_m) {
        const int64_t n_tiles = tile::num_key_tiles(m0, block_m, Lq, Lk, block_n, p.is_causal);
        for (int64_t i = m0; i < m0 + block_m && i < Lq; ++i) {
          // prologue: the row as the kernel holds it after the rotation
          const A* src =
              row_ptr<A>(p.q, p.q_batch_stride, p.q_head_stride, p.q_row_stride, b, h, i);
          std::memcpy(qraw.data(), src, sizeof(A) * D);  // (unit last stride)
          if (tile::row_is_rotated(p, b, i)) {
            const A* R = static_cast<const A*>(p.rotation) + h * D * D;
            auto qv = [&qraw](int c) { return qraw[c]; };
            for (int64_t a = 0; a < D; ++a) qrow[a] = tile::rotate_component(R, qv, (int)D, (int)a);
          } else {
            qrow = qraw;
          }
          // split-K: chunks of key tiles, each a fresh partial, merged left to right
          Partial<A> total((int)Dv, M);
          const int chunks = splits < 1 ? 1 : splits;
          for (int cidx = 0; cidx < chunks; ++cidx) {
            const int64_t lo = n_tiles * cidx / chunks, hi = n_tiles * (cidx + 1) / chunks;
            Partial<A> part((int)Dv, M);
            run_key_tiles<A>(p, b, h, i, qrow.data(), lo, hi, block_n, &part);
            tile::merge_partials(&total.st, total.acc.data(), total.mass.data(), part.st,
                                 part.acc.data(), part.mass.data(), (int)Dv, M);
          }
          const A inv = tile::inv_sum(total.st.l);
          A* orow = static_cast<A*>(p.out) +
                    tile::row_offset(p.out_batch_stride, p.out_head_stride, p.out_row_stride, b,
                                     h, i);
          for (int64_t e = 0; e < Dv; ++e) orow[e] = total.acc[e] * inv;
          const int64_t row = (b * p.heads + h) * Lq + i;
          static_cast<A*>(p.lse)[row] = tile::row_lse(total.st.m, total.st.l);
          for (int c = 0; c < M; ++c) static_cast<A*>(p.modality_mass)[row * M + c] = total.mass[c] * inv;
        }
      }
      if (M > 0) key_stats<A>(p, b, h);
    }
  }
}

template <typename A>
void backward(const AttentionBwdParams& p) {
  const int64_t D = p.head_dim, Dv = p.value_dim, Lq = p.seqlen_q, Lk = p.seqlen_k;
  const A scale = A(p.scale);
  A* qrot_ws = static_cast<A*>(p.q_rot);
  A* delta = static_cast<A*>(p.delta);
  const A* lse = static_cast<const A*>(p.lse);
  std::vector<A> qraw(D), acc(D), acc_v(Dv);
  for (int64_t b = 0; b < p.batch; ++b) {
    const bool* pad = p.key_padding == nullptr ? nullptr : p.key_padding + b * Lk;
    for (int64_t h = 0; h < p.heads; ++h) {
      const int64_t base = (b * p.heads + h) * Lq;
      const A* R = p.rotation == nullptr ? nullptr : static_cast<const A*>(p.rotation) + h * D * D;
      // 1. prep
      for (int64_t i = 0; i < Lq; ++i) {
        const A* q = row_ptr<A>(p.q, p.q_batch_stride, p.q_head_stride, p.q_row_stride, b, h, i);
        std::memcpy(qraw.data(), q, sizeof(A) * D);
        A* qr = qrot_ws + (base + i) * D;
        auto qv = [&qraw](int c) { return qraw[c]; };
        for (int64_t a = 0; a < D; ++a)
          qr[a] = tile::row_is_rotated(p, b, i) ? tile::rotate_component(R, qv, (int)D, (int)a)
                                                : qraw[a];
        const A* o = row_ptr<A>(p.out, p.out_batch_stride, p.out_head_stride, p.out_row_stride,
                                b, h, i);
        const A* go = row_ptr<A>(p.dout, p.dout_batch_stride, p.dout_head_stride,
                                 p.dout_row_stride, b, h, i);
        A s = A(0);
        for (int64_t e = 0; e < Dv; ++e) s += o[e] * go[e];
        delta[base + i] = s;
      }
      // 2. dq, one query row at a time
      for (int64_t i = 0; i < Lq; ++i) {
        const A lse_i = lse[base + i], delta_i = delta[base + i];
        const A* qr = qrot_ws + (base + i) * D;
        const A* go = row_ptr<A>(p.dout, p.dout_batch_stride, p.dout_head_stride,
                                 p.dout_row_stride, b, h, i);
        std::fill(acc.begin(), acc.end(), A(0));
        const int64_t n_end =
            lse_i == A(tile::neg_inf_f()) ? 0 : (p.is_causal ? (i + 1 < Lk ? i + 1 : Lk) : Lk);
        for (int64_t j = 0; j < n_end; ++j) {
          const int code = tile::key_code(j, Lk, pad, nullptr);
          if (!tile::visible(i, j, code, p.is_causal)) continue;
          const A* k = row_ptr<A>(p.k, p.k_batch_stride, p.k_head_stride, p.k_row_stride, b, h, j);
          const A* v = row_ptr<A>(p.v, p.v_batch_stride, p.v_head_stride, p.v_row_stride, b, h, j);
          A dot = A(0), dp = A(0);
          for (int64_t d = 0; d < D; ++d) dot += qr[d] * k[d];
          for (int64_t e = 0; e < Dv; ++e) dp += go[e] * v[e];
          const A ds = tile::prob(dot * scale, lse_i) * (dp - delta_i);
          for (int64_t d = 0; d < D; ++d) acc[d] += ds * k[d];
        }
        A* dq = static_cast<A*>(p.dq) +
                tile::row_offset(p.dq_batch_stride, p.dq_head_stride, p.dq_row_stride, b, h, i);
        for (int64_t c = 0; c < D; ++c)
          dq[c] = scale * (tile::row_is_rotated(p, b, i)
                               ? tile::unrotate_component(R, acc.data(), (int)D, (int)c)
                               : acc[c]);
      }
      // 3. dk, dv, one key at a time
      for (int64_t j = 0; j < Lk; ++j) {
        const int code = tile::key_code(j, Lk, pad, nullptr);
        const A* k = row_ptr<A>(p.k, p.k_batch_stride, p.k_head_stride, p.k_row_stride, b, h, j);
        const A* v = row_ptr<A>(p.v, p.v_batch_stride, p.v_head_stride, p.v_row_stride, b, h, j);
        std::fill(acc.begin(), acc.end(), A(0));
        std::fill(acc_v.begin(), acc_v.end(), A(0));
        const int64_t i_begin =
            code == tile::kInvisible ? Lq : tile::first_row_seeing_key(j, p.is_causal);
        for (int64_t i = i_begin; i < Lq; ++i) {
          if (!tile::visible(i, j, code, p.is_causal) || lse[base + i] == A(tile::neg_inf_f()))
            continue;
          const A* qr = qrot_ws + (base + i) * D;
          const A* go = row_ptr<A>(p.dout, p.dout_batch_stride, p.dout_head_stride,
                                   p.dout_row_stride, b, h, i);
          A dot = A(0), dp = A(0);
          for (int64_t d = 0; d < D; ++d) dot += qr[d] * k[d];
          for (int64_t e = 0; e < Dv; ++e) dp += go[e] * v[e];
          const A pr = tile::prob(dot * scale, lse[base + i]);
          const A ds = pr * (dp - delta[base + i]);
          for (int64_t e = 0; e < Dv; ++e) acc_v[e] += pr * go[e];
          for (int64_t d = 0; d < D; ++d) acc[d] += ds * qr[d];
        }
        A* dk = static_cast<A*>(p.dk) +
                tile::row_offset(p.dk_batch_stride, p.dk_head_stride, p.dk_row_stride, b, h, j);
        A* dv = static_cast<A*>(p.dv) +
                tile::row_offset(p.dv_batch_stride, p.dv_head_stride, p.dv_row_stride, b, h, j);
        for (int64_t d = 0; d < D; ++d) dk[d] = scale * acc[d];
        for (int64_t e = 0; e < Dv; ++e) dv[e] = acc_v[e];
      }
    }
  }
}

}  // namespace
}  // namespace rollingq

// ---- C interface for ctypes ----------------------------------------------------------------------
extern "C" {

struct RqHostArgs {
  rollingq::TensorDesc q, k, v, out;
  const void* rotation;
  const bool* rotated_rows;
  const int32_t* key_modality;
  const bool* key_padding;
  void* lse;
  void* modality_mass;
  void* key_sum;
  void* key_count;
  double scale;
  int32_t num_modalities;
  int32_t is_causal;
  int32_t use_double;  // element and accumulation type: 1 = double, 0 = float
  int32_t block_m, block_n, splits;
};

struct RqHostBwdArgs {
  RqHostArgs fwd;  // out and lse are inputs here
  rollingq::TensorDesc dout, dq, dk, dv;
  void* delta;
  void* q_rot;
};

static void fill(rollingq::AttentionParams* p, const RqHostArgs& a) {
  rollingq::fill_forward_params(p, a.q, a.k, a.v, a.out, a.scale, a.is_causal != 0);
  p->rotation = a.rotation;
  p->rotated_rows = a.rotated_rows;
  p->key_modality = a.key_modality;
  p->key_padding = a.key_padding;
  p->num_modalities = a.num_modalities;
  p->lse = a.lse;
  p->modality_mass = a.modality_mass;
  p->key_sum = a.key_sum;
  p->key_count = a.key_count;
}

int rq_host_forward(const RqHostArgs* a) {
  rollingq::AttentionParams p;
  fill(&p, *a);
  if (a->use_double)
    rollingq::forward<double>(p, a->block_m, a->block_n, a->splits);
  else
    rollingq::forward<float>(p, a->block_m, a->block_n, a->splits);
  return 0;
}

int rq_host_backward(const RqHostBwdArgs* a) {
  rollingq::AttentionBwdParams p;
  fill(&p, a->fwd);
  rollingq::fill_backward_params(&p, a->dout, a->dq, a->dk, a->dv);
  p.delta = a->delta;
  p.q_rot = a->q_rot;
  if (a->fwd.use_double)
    rollingq::backward<double>(p);
  else
    rollingq::backward<float>(p);
  return 0;
}

// The kernel path the CUDA launcher would take for these tensors and element kind.
int rq_forward_path(const RqHostArgs* a, int kind) {
  rollingq::AttentionParams p;
  fill(&p, *a);
  return static_cast<int>(rollingq::choose_forward_path(p, static_cast<rollingq::ScalarKind>(kind)));
}

int64_t rq_num_key_tiles(int64_t m0, int64_t block_m, int64_t seqlen_q, int64_t seqlen_k,
                         int64_t block_n, int32_t causal) {
  return rollingq::tile::num_key_tiles(m0, block_m, seqlen_q, seqlen_k, block_n, causal != 0);
}

int32_t rq_generic_warps_per_block(int64_t smem_per_warp) {
  return rollingq::generic_warps_per_block(smem_per_warp);
}

}  // extern "C"
