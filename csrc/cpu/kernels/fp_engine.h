// Fused RollingQ attention, forward and backward, with float arithmetic on vec.h / gemm.h.
// Runs float32 and float64 inputs in their own precision and bfloat16 inputs in float32 (the
// path for CPUs without bf16 dot products; bf16_engine.h is the one with them).
//
// Layout: everything is computed transposed, keys along rows and the queries of a tile along
// SIMD lanes. The scores of a key block are S^T = scale * K Q^T (K read in place, Q^T packed
// once per query tile with the rotation applied; the scale multiplies the finished dot products,
// as in torch's SDPA, so that overflow to infinity happens where it happens there), so the softmax statistics of a
// query (running max, row sum, modality mass) are per-lane vectors and need no horizontal
// reduction, and the output accumulates as O^T = V^T P^T (V read in place). Memory is O(tile).
//
// Forward task = (batch, head, query tile). Backward task = (batch, head, key chunk): it owns
// dK and dV of its keys, so no two tasks write the same element; with several chunks per head
// (when batch * heads is small) each chunk's partial dQ goes to its own slot and a second phase
// sums the slots in chunk order. The partition depends on the shape only: results are bitwise
// the same for any number of threads.
#pragma once

#include "cpu/isa.h"
#include "cpu/kernels/namespace.h"
#include "cpu/kernels/gemm.h"

ROLLINGQ_KERNELS_BEGIN

template <typename X, typename Y>
struct same_type {
  static constexpr bool value = false;
};
template <typename X>
struct same_type<X, X> {
  static constexpr bool value = true;
};

inline float alog(float x) { return __builtin_logf(x); }
inline double alog(double x) { return __builtin_log(x); }

// Bump allocator over a 64-byte aligned workspace; with base == nullptr it only measures.
struct Carve {
  char* base;
  size_t used = 0;
  template <typename X>
  X* take(int64_t n) {
    X* r = base ? reinterpret_cast<X*>(base + used) : nullptr;
    used += size_t(round_up(imax<int64_t>(n, 1) * int64_t(sizeof(X)), 64));
    return r;
  }
};

constexpr int64_t kQueryTile = 64;  // lanes of a query tile
constexpr int64_t kKeyBlock = 128;  // keys per online-softmax step: S^T block of 32 KiB (fp32)
// Backward: heads are split into key chunks until there are this many tasks, chunks of at
// least kMinChunk keys.
constexpr int64_t kBwdTargetTasks = 16;
constexpr int64_t kMinChunk = 256;

template <typename T>
inline const T* ptr(const void* p) {
  return static_cast<const T*>(p);
}

// ---- pieces shared by forward and backward ---------------------------------------------------

// Per-modality key sums of one (batch, head) over non-padded keys; the key counts of the batch
// entry when count. Keys with id -1 count nowhere.
template <typename T, typename A>
void key_stats(const AttentionParams& p, int64_t b, int64_t h, bool count) {
  const int64_t Lk = p.seqlen_k, D = p.head_dim;
  const int M = p.num_modalities;
  const T* k = ptr<T>(p.k) + b * p.k_batch_stride + h * p.k_head_stride;
  const int32_t* ids = p.key_modality + b * Lk;
  const bool* pad = p.key_padding ? p.key_padding + b * Lk : nullptr;
  A* ks = static_cast<A*>(p.key_sum) + (b * p.heads + h) * M * D;
  for (int64_t i = 0; i < M * D; ++i) ks[i] = A(0);
  A* kc = static_cast<A*>(p.key_count) + b * M;
  if (count)
    for (int m = 0; m < M; ++m) kc[m] = A(0);
  for (int64_t j = 0; j < Lk; ++j) {
    const int32_t id = ids[j];
    if (id < 0 || (pad && !pad[j])) continue;
    A* dst = ks + id * D;
    const T* kr = k + j * p.k_row_stride;
    for (int64_t d = 0; d < D; ++d) dst[d] += to_acc<A>(kr[d]);
    if (count) kc[id] += A(1);
  }
}

// qT[d][l] = (R q_i)[d] for rotated rows i = i0 + l, q_i[d] otherwise; lanes l >= qn are 0.
// tmp: D * lanes.
template <typename T, typename A>
void pack_queries(const AttentionParams& p, int64_t b, int64_t h, int64_t i0, int64_t qn,
                  int64_t lanes, A* qT, A* tmp) {
  constexpr int W = VT<A>::W;
  const int64_t D = p.head_dim;
  const T* q = ptr<T>(p.q) + b * p.q_batch_stride + h * p.q_head_stride + i0 * p.q_row_stride;
  for (int64_t i = 0; i < D * lanes; ++i) qT[i] = A(0);
  for (int64_t l = 0; l < qn; ++l) {
    const T* row = q + l * p.q_row_stride;
    for (int64_t d = 0; d < D; ++d) qT[d * lanes + l] = to_acc<A>(row[d]);
  }
  if (p.rotation == nullptr) return;
  const bool* sel = p.rotated_rows ? p.rotated_rows + b * p.seqlen_q + i0 : nullptr;
  bool any = sel == nullptr;
  for (int64_t l = 0; l < qn && !any; ++l) any = sel[l];
  if (!any) return;
  const A* R = ptr<A>(p.rotation) + h * D * D;
  // (R Q^T)[a][l] = sum_c R[a][c] Q^T[c][l]
  gemm<A>(D, lanes / W, D, R, D, 1, qT, lanes, tmp, lanes, Acc::kSet);
  for (int64_t l = 0; l < qn; ++l)
    if (sel == nullptr || sel[l])
      for (int64_t d = 0; d < D; ++d) qT[d * lanes + l] = tmp[d * lanes + l];
}

// K and V rows [j0, j0 + kn) of one head in the accumulation type: in place when the input
// already is, else converted into kbuf / vbuf.
template <typename T, typename A>
struct KeyValueBlock {
  const A* k;
  const A* v;
  int64_t ldk, ldv;
};

template <typename T, typename A>
KeyValueBlock<T, A> key_value_block(const AttentionParams& p, const T* k, const T* v, int64_t j0,
                                    int64_t kn, A* kbuf, A* vbuf) {
  if constexpr (same_type<T, A>::value) {
    return {k + j0 * p.k_row_stride, v + j0 * p.v_row_stride, p.k_row_stride, p.v_row_stride};
  } else {
    const int64_t D = p.head_dim, Dv = p.value_dim;
    for (int64_t j = 0; j < kn; ++j) {
      load_row(kbuf + j * D, k + (j0 + j) * p.k_row_stride, D);
      load_row(vbuf + j * Dv, v + (j0 + j) * p.v_row_stride, Dv);
    }
    return {kbuf, vbuf, D, Dv};
  }
}

// ---- forward ---------------------------------------------------------------------------------

template <typename A>
struct FwdWork {
  A *qT, *tmp, *S, *OT, *m, *l, *alpha, *mass, *kbuf, *vbuf;
};

template <typename T, typename A>
FwdWork<A> carve_fwd(char* base, const AttentionParams& p, size_t* bytes) {
  const int64_t D = p.head_dim, Dv = p.value_dim, QT = kQueryTile, KB = kKeyBlock;
  const bool convert = !same_type<T, A>::value;
  Carve c{base};
  FwdWork<A> w;
  w.qT = c.take<A>(D * QT);
  w.tmp = c.take<A>(D * QT);
  w.S = c.take<A>(KB * QT);
  w.OT = c.take<A>(Dv * QT);
  w.m = c.take<A>(QT);
  w.l = c.take<A>(QT);
  w.alpha = c.take<A>(QT);
  w.mass = c.take<A>(imax(p.num_modalities, 1) * QT);
  w.kbuf = c.take<A>(convert ? KB * D : 1);
  w.vbuf = c.take<A>(convert ? KB * Dv : 1);
  if (bytes) *bytes = c.used;
  return w;
}

template <typename T, typename A>
void fwd_plan_fp(const AttentionParams& p, Plan& plan) {
  const int64_t tiles = imax<int64_t>(1, ceil_div(p.seqlen_q, kQueryTile));
  plan.tasks = p.batch * p.heads * tiles;
  plan.flops_per_task = 2 * imin(kQueryTile, imax<int64_t>(p.seqlen_q, 1)) *
                        imax<int64_t>(p.seqlen_k, 1) * (p.head_dim + p.value_dim + 1);
  carve_fwd<T, A>(nullptr, p, &plan.workspace_bytes);
  plan.param[0] = tiles;
}

// One key block of the online softmax for the query lanes of column vector v: masks, running
// max, exp, row sums, modality mass. S holds the scaled scores S^T[j][lane] on entry and the
// probabilities (relative to the new running max) on exit.
template <typename A>
inline void softmax_block(const AttentionParams& p, int64_t b, int64_t i0, int64_t j0, int64_t kn,
                          int64_t lanes, int64_t v, A* S, A* m, A* l, A* alpha, A* mass) {
  using V = vec_t<A>;
  constexpr int W = VT<A>::W;
  const A inf = std::numeric_limits<A>::infinity();
  const int M = p.num_modalities;
  const bool* pad = p.key_padding ? p.key_padding + b * p.seqlen_k : nullptr;
  const int32_t* ids = M > 0 ? p.key_modality + b * p.seqlen_k : nullptr;
  // top-left causal: key j visible from query i iff j <= i; needed when the block reaches past
  // the first query of the lanes
  const bool causal = p.is_causal && j0 + kn - 1 > i0 + v * W;
  const V qi = viota<A>() + A(i0 + v * W);
  const V ninf = vbcast(-inf);

  const V m_old = vload(m + v * W);
  V bm = ninf;
  for (int64_t j = 0; j < kn; ++j) {
    if (pad && !pad[j0 + j]) continue;
    V s = vload(S + j * lanes + v * W);
    if (causal) s = vbcast(A(j0 + j)) <= qi ? s : ninf;
    bm = vmax<A>(bm, s);
  }
  const V m_new = vmax<A>(m_old, bm);
  // a lane that has seen no key yet keeps max -inf: shift it by 0 so exp(-inf) = 0, not NaN
  const V m_safe = m_new == ninf ? V{} : m_new;
  // (x - m) * log2(e), not x * log2(e) - m * log2(e): a huge finite max must not overflow
  const V a = exp2v((m_old - m_safe) * log2e<A>());
  for (int mm = 0; mm < M; ++mm) vstore(mass + mm * lanes + v * W, vload(mass + mm * lanes + v * W) * a);

  V sum{}, run{};
  int32_t cur = -1;
  for (int64_t j = 0; j < kn; ++j) {
    A* sp = S + j * lanes + v * W;
    if (pad && !pad[j0 + j]) {
      vstore(sp, V{});
      continue;
    }
    V s = vload(sp);
    if (causal) s = vbcast(A(j0 + j)) <= qi ? s : ninf;
    const V e = exp2v((s - m_safe) * log2e<A>());
    vstore(sp, e);
    sum += e;
    if (M > 0) {
      const int32_t id = ids[j0 + j];
      if (id != cur) {
        if (cur >= 0) vstore(mass + cur * lanes + v * W, vload(mass + cur * lanes + v * W) + run);
        cur = id;
        run = V{};
      }
      run += e;
    }
  }
  if (cur >= 0) vstore(mass + cur * lanes + v * W, vload(mass + cur * lanes + v * W) + run);
  vstore(l + v * W, vload(l + v * W) * a + sum);
  vstore(m + v * W, m_new);
  vstore(alpha + v * W, a);
}

template <typename T, typename A>
void fwd_task_fp(const AttentionParams& p, int64_t task, int64_t tiles, FwdWork<A>& w) {
  constexpr int W = VT<A>::W;
  const int64_t H = p.heads, Lq = p.seqlen_q, Lk = p.seqlen_k, D = p.head_dim, Dv = p.value_dim;
  const int M = p.num_modalities;
  const int64_t tile = task % tiles, bh = task / tiles, h = bh % H, b = bh / H;
  if (M > 0 && tile == 0) key_stats<T, A>(p, b, h, h == 0);
  const int64_t i0 = tile * kQueryTile, qn = imin(kQueryTile, Lq - i0);
  if (qn <= 0) return;
  const int64_t nv = ceil_div(qn, W), lanes = nv * W;
  const A inf = std::numeric_limits<A>::infinity();

  pack_queries<T, A>(p, b, h, i0, qn, lanes, w.qT, w.tmp);
  for (int64_t i = 0; i < Dv * lanes; ++i) w.OT[i] = A(0);
  for (int64_t i = 0; i < lanes; ++i) {
    w.m[i] = -inf;
    w.l[i] = A(0);
  }
  for (int64_t i = 0; i < M * lanes; ++i) w.mass[i] = A(0);

  const T* k = ptr<T>(p.k) + b * p.k_batch_stride + h * p.k_head_stride;
  const T* v = ptr<T>(p.v) + b * p.v_batch_stride + h * p.v_head_stride;
  const int64_t k_end = p.is_causal ? imin(Lk, i0 + qn) : Lk;
  for (int64_t j0 = 0; j0 < k_end; j0 += kKeyBlock) {
    const int64_t kn = imin(kKeyBlock, k_end - j0);
    const auto kv = key_value_block<T, A>(p, k, v, j0, kn, w.kbuf, w.vbuf);
    gemm<A>(kn, nv, D, kv.k, kv.ldk, 1, w.qT, lanes, w.S, lanes, Acc::kSet, nullptr,
            A(p.scale));
    for (int64_t c = 0; c < nv; ++c)
      softmax_block<A>(p, b, i0, j0, kn, lanes, c, w.S, w.m, w.l, w.alpha, w.mass);
    // O^T = O^T * alpha + V^T P^T
    gemm<A>(Dv, nv, kn, kv.v, 1, kv.ldv, w.S, lanes, w.OT, lanes, Acc::kScaleAdd, w.alpha);
  }

  // epilogue: normalise, write out, lse, mass. A row that saw no key has l = 0: zeros, lse =
  // -inf, zero mass. A NaN row sum (NaN in the row's scores, or an infinite score) gives NaN.
  T* out = static_cast<T*>(p.out) + b * p.out_batch_stride + h * p.out_head_stride +
           i0 * p.out_row_stride;
  const int64_t row0 = (b * H + h) * Lq + i0;
  A* lse = static_cast<A*>(p.lse) + row0;
  A* mass_out = M > 0 ? static_cast<A*>(p.modality_mass) + row0 * M : nullptr;
  for (int64_t i = 0; i < qn; ++i) {
    const A L = w.l[i];
    const A inv = L == A(0) ? A(0) : A(1) / L;
    T* orow = out + i * p.out_row_stride;
    for (int64_t d = 0; d < Dv; ++d) orow[d] = from_acc<T>(w.OT[d * lanes + i] * inv);
    lse[i] = L == A(0) ? -inf : w.m[i] + alog(L);
    for (int mm = 0; mm < M; ++mm) mass_out[i * M + mm] = w.mass[mm * lanes + i] * inv;
  }
}

template <typename T, typename A>
void fwd_run_fp(const AttentionParams& p, const Plan& plan, int64_t begin, int64_t end,
                void* ws) {
  FwdWork<A> w = carve_fwd<T, A>(static_cast<char*>(ws), p, nullptr);
  for (int64_t t = begin; t < end; ++t) fwd_task_fp<T, A>(p, t, plan.param[0], w);
}

// ---- backward --------------------------------------------------------------------------------

template <typename A>
struct BwdWork {
  A *qT, *tmp, *qrows, *doT, *dorows, *delta, *lse, *S, *dP, *dQT, *dK, *dV, *kbuf, *vbuf;
};

struct BwdShape {
  int64_t tiles, nc, chunk, Dp, Dvp;
};

template <typename A>
BwdShape bwd_shape(const AttentionBwdParams& p) {
  constexpr int W = VT<A>::W;
  BwdShape s;
  s.tiles = ceil_div(p.seqlen_q, kQueryTile);
  const int64_t bh = p.batch * p.heads, Lk = p.seqlen_k;
  int64_t nc = 1;
  if (bh < kBwdTargetTasks) nc = imin(ceil_div(kBwdTargetTasks, bh), ceil_div(Lk, kMinChunk));
  nc = imax<int64_t>(nc, 1);
  s.chunk = round_up(imax<int64_t>(ceil_div(Lk, nc), 1), kKeyBlock);
  s.nc = imax<int64_t>(1, ceil_div(Lk, s.chunk));
  s.Dp = round_up(p.head_dim, W);
  s.Dvp = round_up(p.value_dim, W);
  return s;
}

template <typename T, typename A>
BwdWork<A> carve_bwd(char* base, const AttentionBwdParams& p, const BwdShape& s, size_t* bytes) {
  const int64_t D = p.head_dim, Dv = p.value_dim, QT = kQueryTile, KB = kKeyBlock;
  const bool convert = !same_type<T, A>::value;
  const int64_t ck = imin(s.chunk, imax<int64_t>(p.seqlen_k, 1));
  Carve c{base};
  BwdWork<A> w;
  w.qT = c.take<A>(D * QT);
  w.tmp = c.take<A>(D * QT);
  w.qrows = c.take<A>(QT * s.Dp);
  w.doT = c.take<A>(Dv * QT);
  w.dorows = c.take<A>(QT * s.Dvp);
  w.delta = c.take<A>(QT);
  w.lse = c.take<A>(QT);
  w.S = c.take<A>(KB * QT);
  w.dP = c.take<A>(KB * QT);
  w.dQT = c.take<A>(D * QT);
  w.dK = c.take<A>(ck * s.Dp);
  w.dV = c.take<A>(ck * s.Dvp);
  w.kbuf = c.take<A>(convert ? KB * D : 1);
  w.vbuf = c.take<A>(convert ? KB * Dv : 1);
  if (bytes) *bytes = c.used;
  return w;
}

template <typename T, typename A>
void bwd_plan_fp(const AttentionBwdParams& p, Plan& plan) {
  const BwdShape s = bwd_shape<A>(p);
  plan.tasks = p.batch * p.heads * s.nc;
  plan.flops_per_task = 5 * imax<int64_t>(p.seqlen_q, 1) * imax<int64_t>(s.chunk, 1) *
                        (p.head_dim + p.value_dim);
  carve_bwd<T, A>(nullptr, p, s, &plan.workspace_bytes);
  plan.shared_bytes =
      s.nc > 1 ? size_t(p.batch * p.heads * s.nc * s.tiles * p.head_dim * kQueryTile) * sizeof(A)
               : 0;
  plan.reduce_tasks = s.nc > 1 ? p.batch * p.heads * s.tiles : 0;
}

// dq rows of one query tile from dQ'^T (D x lanes, unscaled): dq = scale * dQ', then through the
// rotation for rotated rows (q' = R q  =>  dq = R^T dq'), converted and written.
template <typename T, typename A>
void finish_dq(const AttentionBwdParams& p, int64_t b, int64_t h, int64_t i0, int64_t qn,
               int64_t lanes, A* dQT, A* tmp) {
  constexpr int W = VT<A>::W;
  const int64_t D = p.head_dim;
  const bool* sel = p.rotated_rows ? p.rotated_rows + b * p.seqlen_q + i0 : nullptr;
  bool any = p.rotation != nullptr && sel == nullptr;
  for (int64_t l = 0; l < qn && p.rotation != nullptr && !any; ++l) any = sel[l];
  if (any) {
    const A* R = ptr<A>(p.rotation) + h * D * D;
    // (R^T dQ'^T)[c][l] = sum_a R[a][c] dQ'^T[a][l]
    gemm<A>(D, lanes / W, D, R, 1, D, dQT, lanes, tmp, lanes, Acc::kSet);
    for (int64_t l = 0; l < qn; ++l)
      if (sel == nullptr || sel[l])
        for (int64_t d = 0; d < D; ++d) dQT[d * lanes + l] = tmp[d * lanes + l];
  }
  const A scale = A(p.scale);
  T* dq = static_cast<T*>(p.dq) + b * p.dq_batch_stride + h * p.dq_head_stride;
  for (int64_t l = 0; l < qn; ++l) {
    T* row = dq + (i0 + l) * p.dq_row_stride;
    for (int64_t d = 0; d < D; ++d) row[d] = from_acc<T>(scale * dQT[d * lanes + l]);
  }
}

template <typename T, typename A>
void bwd_task_fp(const AttentionBwdParams& p, const BwdShape& s, int64_t task, BwdWork<A>& w,
                 A* shared) {
  using V = vec_t<A>;
  constexpr int W = VT<A>::W;
  const int64_t H = p.heads, Lq = p.seqlen_q, Lk = p.seqlen_k, D = p.head_dim, Dv = p.value_dim;
  const int64_t c = task % s.nc, bh = task / s.nc, h = bh % H, b = bh / H;
  const int64_t c0 = imin(Lk, c * s.chunk), c1 = imin(Lk, c0 + s.chunk), ck = c1 - c0;
  const A inf = std::numeric_limits<A>::infinity();
  const A scale = A(p.scale);
  const bool* pad = p.key_padding ? p.key_padding + b * Lk : nullptr;

  const T* k = ptr<T>(p.k) + b * p.k_batch_stride + h * p.k_head_stride;
  const T* v = ptr<T>(p.v) + b * p.v_batch_stride + h * p.v_head_stride;
  const T* o = ptr<T>(p.out) + b * p.out_batch_stride + h * p.out_head_stride;
  const T* dout = ptr<T>(p.dout) + b * p.dout_batch_stride + h * p.dout_head_stride;
  const A* lse_bh = ptr<A>(p.lse) + bh * Lq;
  for (int64_t i = 0; i < ck * s.Dp; ++i) w.dK[i] = A(0);
  for (int64_t i = 0; i < ck * s.Dvp; ++i) w.dV[i] = A(0);

  for (int64_t tile = 0; tile < s.tiles; ++tile) {
    const int64_t i0 = tile * kQueryTile, qn = imin(kQueryTile, Lq - i0);
    const int64_t nv = ceil_div(qn, W), lanes = nv * W;
    A* dQT = s.nc > 1 ? shared + ((bh * s.nc + c) * s.tiles + tile) * D * kQueryTile : w.dQT;
    for (int64_t i = 0; i < D * lanes; ++i) dQT[i] = A(0);
    const int64_t k_hi = p.is_causal ? imin(c1, i0 + qn) : c1;
    if (k_hi > c0) {
      pack_queries<T, A>(p, b, h, i0, qn, lanes, w.qT, w.tmp);
      for (int64_t l = 0; l < lanes; ++l)
        for (int64_t d = 0; d < s.Dp; ++d)
          w.qrows[l * s.Dp + d] = d < D ? w.qT[d * lanes + l] : A(0);
      for (int64_t i = 0; i < Dv * lanes; ++i) w.doT[i] = A(0);
      for (int64_t i = 0; i < lanes * s.Dvp; ++i) w.dorows[i] = A(0);
      for (int64_t l = 0; l < lanes; ++l) {
        if (l >= qn) {  // padding lanes: no probability, no gradient
          w.delta[l] = A(0);
          w.lse[l] = inf;
          continue;
        }
        const T* dor = dout + (i0 + l) * p.dout_row_stride;
        const T* orow = o + (i0 + l) * p.out_row_stride;
        A sum = 0;
        for (int64_t d = 0; d < Dv; ++d) {
          const A g = to_acc<A>(dor[d]);
          w.doT[d * lanes + l] = g;
          w.dorows[l * s.Dvp + d] = g;
          sum += g * to_acc<A>(orow[d]);
        }
        w.delta[l] = sum;
        // a row that saw no key (lse = -inf) has no probability: exp(s - inf) = 0
        const A lse = lse_bh[i0 + l];
        w.lse[l] = lse == -inf ? inf : lse;
      }

      for (int64_t j0 = c0; j0 < k_hi; j0 += kKeyBlock) {
        const int64_t kn = imin(kKeyBlock, k_hi - j0);
        const auto kv = key_value_block<T, A>(p, k, v, j0, kn, w.kbuf, w.vbuf);
        gemm<A>(kn, nv, D, kv.k, kv.ldk, 1, w.qT, lanes, w.S, lanes, Acc::kSet, nullptr, scale);
        // P^T = exp(S^T - lse), with the forward's masks
        const bool causal = p.is_causal && j0 + kn - 1 > i0;
        for (int64_t cv = 0; cv < nv; ++cv) {
          const V qi = viota<A>() + A(i0 + cv * W);
          const V lse = vload(w.lse + cv * W);
          for (int64_t j = 0; j < kn; ++j) {
            A* sp = w.S + j * lanes + cv * W;
            if (pad && !pad[j0 + j]) {
              vstore(sp, V{});
              continue;
            }
            V sv = vload(sp);
            if (causal) sv = vbcast(A(j0 + j)) <= qi ? sv : vbcast(-inf);
            vstore(sp, exp2v((sv - lse) * log2e<A>()));
          }
        }
        // dV += P^T dO
        gemm<A>(kn, s.Dvp / W, qn, w.S, lanes, 1, w.dorows, s.Dvp, w.dV + (j0 - c0) * s.Dvp,
                s.Dvp, Acc::kAdd);
        // dP^T = V dO^T, then dS^T = P^T (dP^T - delta) in place
        gemm<A>(kn, nv, Dv, kv.v, kv.ldv, 1, w.doT, lanes, w.dP, lanes, Acc::kSet);
        for (int64_t j = 0; j < kn; ++j)
          for (int64_t cv = 0; cv < nv; ++cv) {
            A* dp = w.dP + j * lanes + cv * W;
            vstore(dp, vload(w.S + j * lanes + cv * W) * (vload(dp) - vload(w.delta + cv * W)));
          }
        // dK += dS^T Q' (scaled at the end) ; dQ'^T += K^T dS^T
        gemm<A>(kn, s.Dp / W, qn, w.dP, lanes, 1, w.qrows, s.Dp, w.dK + (j0 - c0) * s.Dp, s.Dp,
                Acc::kAdd);
        gemm<A>(D, nv, kn, kv.k, 1, kv.ldk, w.dP, lanes, dQT, lanes, Acc::kAdd);
      }
    }
    if (s.nc == 1) finish_dq<T, A>(p, b, h, i0, qn, lanes, dQT, w.tmp);
  }

  T* dk = static_cast<T*>(p.dk) + b * p.dk_batch_stride + h * p.dk_head_stride;
  T* dv = static_cast<T*>(p.dv) + b * p.dv_batch_stride + h * p.dv_head_stride;
  for (int64_t j = 0; j < ck; ++j) {
    T* dkr = dk + (c0 + j) * p.dk_row_stride;
    const A* src = w.dK + j * s.Dp;
    for (int64_t d = 0; d < D; ++d) dkr[d] = from_acc<T>(scale * src[d]);
    store_row(dv + (c0 + j) * p.dv_row_stride, w.dV + j * s.Dvp, Dv);
  }
}

template <typename T, typename A>
void bwd_run_fp(const AttentionBwdParams& p, const Plan&, int64_t begin, int64_t end, void* ws,
                void* shared) {
  const BwdShape s = bwd_shape<A>(p);
  BwdWork<A> w = carve_bwd<T, A>(static_cast<char*>(ws), p, s, nullptr);
  for (int64_t t = begin; t < end; ++t) bwd_task_fp<T, A>(p, s, t, w, static_cast<A*>(shared));
}

// Second phase with several key chunks per head: task = (batch, head, query tile), sums the
// chunks' partial dQ'^T in chunk order.
template <typename T, typename A>
void bwd_reduce_fp(const AttentionBwdParams& p, const Plan&, int64_t begin, int64_t end, void* ws,
                   void* shared) {
  constexpr int W = VT<A>::W;
  const BwdShape s = bwd_shape<A>(p);
  BwdWork<A> w = carve_bwd<T, A>(static_cast<char*>(ws), p, s, nullptr);
  const A* part = static_cast<const A*>(shared);
  const int64_t D = p.head_dim, slot = D * kQueryTile;
  for (int64_t t = begin; t < end; ++t) {
    const int64_t tile = t % s.tiles, bh = t / s.tiles, h = bh % p.heads, b = bh / p.heads;
    const int64_t i0 = tile * kQueryTile, qn = imin(kQueryTile, p.seqlen_q - i0);
    const int64_t lanes = ceil_div(qn, W) * W;
    for (int64_t i = 0; i < D * lanes; ++i) w.dQT[i] = A(0);
    for (int64_t c = 0; c < s.nc; ++c) {
      const A* src = part + ((bh * s.nc + c) * s.tiles + tile) * slot;
      for (int64_t i = 0; i < D * lanes; ++i) w.dQT[i] += src[i];
    }
    finish_dq<T, A>(p, b, h, i0, qn, lanes, w.dQT, w.tmp);
  }
}

ROLLINGQ_KERNELS_END
