// Tile arithmetic shared by the CUDA kernels and the CPU emulation that tests them.
//
// Everything here is a small inline function marked RQ_HD: __host__ __device__ under nvcc,
// plain inline under a host compiler. The kernels call exactly these functions for the
// online-softmax update, the split-K merge, masks and tile bounds, so a host program that runs
// the same tile loop with them (csrc/cuda/emulation/host_emulation.cpp) checks the algorithm on
// the CPU.
#pragma once

#include <cstdint>

#include "../rollingq_params.h"

#include <cmath>

#if defined(__CUDACC__)
#define RQ_HD __host__ __device__ __forceinline__
#else
#define RQ_HD inline
#endif
// INFINITY expands to a compiler builtin that both the host compiler and nvcc's device side fold.
#define RQ_NEG_INF (-INFINITY)

namespace rollingq {
namespace tile {

// ---- key codes ---------------------------------------------------------------------------------
// Each key of a tile is summarised by one int: its modality id (>= 0), kNoModality (attended but
// counted nowhere), or kInvisible (padding, or past the end of the sequence).
constexpr int kNoModality = -1;
constexpr int kInvisible = -2;

RQ_HD int key_code(int64_t j, int64_t seqlen_k, const bool* key_padding_row,
                   const int32_t* key_modality_row) {
  if (j >= seqlen_k) return kInvisible;
  if (key_padding_row != nullptr && !key_padding_row[j]) return kInvisible;
  if (key_modality_row == nullptr) return kNoModality;
  const int id = key_modality_row[j];
  return id < 0 ? kNoModality : id;
}

// Top-left aligned causal mask (SDPA): key j is visible to row i when j <= i.
RQ_HD bool causal_visible(int64_t i, int64_t j, bool causal) { return !causal || j <= i; }

RQ_HD bool visible(int64_t i, int64_t j, int code, bool causal) {
  return code != kInvisible && causal_visible(i, j, causal);
}

// ---- tile bounds -------------------------------------------------------------------------------
RQ_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Number of key tiles the query tile [m0, m0 + block_m) has to visit. With a causal mask the
// last row of the tile sees keys up to m0 + block_m - 1, so later tiles are skipped.
RQ_HD int64_t num_key_tiles(int64_t m0, int64_t block_m, int64_t seqlen_q, int64_t seqlen_k,
                            int64_t block_n, bool causal) {
  int64_t end = seqlen_k;
  if (causal) {
    int64_t last_row = m0 + block_m - 1;
    if (last_row > seqlen_q - 1) last_row = seqlen_q - 1;
    end = last_row + 1 < seqlen_k ? last_row + 1 : seqlen_k;
  }
  return end <= 0 ? 0 : ceil_div(end, block_n);
}

// First query row that can see key j (dK/dV pass over query rows).
RQ_HD int64_t first_row_seeing_key(int64_t j, bool causal) { return causal ? j : 0; }

// Element offset of row i of (b, h) in a (B, H, L, D) tensor with the given strides.
RQ_HD int64_t row_offset(int64_t batch_stride, int64_t head_stride, int64_t row_stride, int64_t b,
                         int64_t h, int64_t i) {
  return b * batch_stride + h * head_stride + i * row_stride;
}

// ---- online softmax ----------------------------------------------------------------------------
// Running state of one query row: max score m and sum of exp(s - m) l. The output accumulator
// and the per-modality masses carry the same scale exp(-m) and are rescaled with l.
template <typename A>
struct RowState {
  A m;
  A l;
};

RQ_HD float neg_inf_f() { return RQ_NEG_INF; }

RQ_HD float exp_acc(float x) {
#if defined(__CUDA_ARCH__)
  return __expf(x);
#else
  return std::exp(x);
#endif
}
RQ_HD double exp_acc(double x) {
#if defined(__CUDA_ARCH__)
  return ::exp(x);
#else
  return std::exp(x);
#endif
}
RQ_HD float log_acc(float x) {
#if defined(__CUDA_ARCH__)
  return __logf(x);
#else
  return std::log(x);
#endif
}
RQ_HD double log_acc(double x) {
#if defined(__CUDA_ARCH__)
  return ::log(x);
#else
  return std::log(x);
#endif
}

template <typename A>
RQ_HD A max_acc(A a, A b) {
  return a > b ? a : b;
}

// Factor that moves quantities kept relative to m_old onto m_new (m_new >= m_old). Both -inf
// means nothing has been seen yet: the quantities are zero and any finite factor will do.
template <typename A>
RQ_HD A rescale_factor(A m_old, A m_new) {
  if (m_old == m_new) return A(1);
  return exp_acc(m_old - m_new);
}

// exp(s - m) for a visible score s; an invisible key (s = -inf) gives exactly 0, also when the
// row has seen nothing yet (m = -inf), where s - m would be NaN.
template <typename A>
RQ_HD A prob(A s, A m) {
  if (s == A(RQ_NEG_INF)) return A(0);
  return exp_acc(s - m);
}

// After a tile whose (unnormalised) row maximum is tile_max: new running max, and the factor
// old accumulators must be multiplied by.
template <typename A>
RQ_HD A update_max(A m_old, A tile_max, A* factor) {
  const A m_new = max_acc(m_old, tile_max);
  *factor = rescale_factor(m_old, m_new);
  return m_new;
}

// 1 / l for the final normalisation; 0 for a row that saw no key (its output is zero).
template <typename A>
RQ_HD A inv_sum(A l) {
  return l > A(0) ? A(1) / l : A(0);
}

// Natural-log log-sum-exp of a finished row; -inf for a row that saw no key.
template <typename A>
RQ_HD A row_lse(A m, A l) {
  return l > A(0) ? m + log_acc(l) : A(RQ_NEG_INF);
}

// Split-K merge: combine two partial results of one row computed over disjoint key ranges.
// Each partial is (m, l, acc[0..dv), mass[0..M)) with acc and mass relative to exp(-m). The
// result (in a) is the partial of the union; merging is associative and commutative, so any
// split of the keys followed by merges equals one pass.
template <typename A>
RQ_HD void merge_partials(RowState<A>* a, A* acc_a, A* mass_a, const RowState<A>& b,
                          const A* acc_b, const A* mass_b, int dv, int num_modalities) {
  const A m = max_acc(a->m, b.m);
  const A fa = rescale_factor(a->m, m);
  const A fb = rescale_factor(b.m, m);
  a->m = m;
  a->l = a->l * fa + b.l * fb;
  for (int e = 0; e < dv; ++e) acc_a[e] = acc_a[e] * fa + acc_b[e] * fb;
  for (int c = 0; c < num_modalities; ++c) mass_a[c] = mass_a[c] * fa + mass_b[c] * fb;
}

// ---- rotation ----------------------------------------------------------------------------------
// q'[a] = sum_b R[a][b] q[b] (R row-major D x D): one component of the forward rotation of a
// row. `q(b)` returns element b of the row in the accumulation type (a lambda, so the row may sit
// in shared memory in the input dtype).
template <typename A, typename Row>
RQ_HD A rotate_component(const A* R, const Row& q, int d, int a) {
  A s = A(0);
  for (int b = 0; b < d; ++b) s += R[(int64_t)a * d + b] * q(b);
  return s;
}

// dq[b] = sum_a dq_rot[a] R[a][b]: the gradient through the rotation (dq = dq_rot @ R).
template <typename A>
RQ_HD A unrotate_component(const A* R, const A* dq_rot, int d, int b) {
  A s = A(0);
  for (int a = 0; a < d; ++a) s += dq_rot[a] * R[(int64_t)a * d + b];
  return s;
}

RQ_HD bool row_is_rotated(const AttentionParams& p, int64_t b, int64_t i) {
  if (p.rotation == nullptr) return false;
  return p.rotated_rows == nullptr || p.rotated_rows[b * p.seqlen_q + i];
}

}  // namespace tile
}  // namespace rollingq
