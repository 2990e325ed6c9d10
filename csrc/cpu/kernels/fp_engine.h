// Fused RollingQ attention, forward and backward, with float arithmetic on vec.h / gemm.h.
// Runs float32 and float64 inputs in their own precision and bfloat16 inputs in float32 (the
// path for CPUs without bf16 dot products).
//
// Layout: the queries of a tile lie along SIMD lanes. The scores of a key block are computed
// transposed, S^T = scale * K Q^T (keys along rows; K read in place, Q^T packed once per query
// tile with the rotation applied; the scale multiplies the finished dot products, as in torch's
// SDPA, so that overflow to infinity happens where it happens there). The softmax statistics of
// a query (running max, row sum, modality mass) are then per-lane vectors that need no
// horizontal reduction. Every other product reads its B operand by rows: O = P V takes V's rows
// in place, the backward's dQ = dS K takes K's rows. Memory is O(tile).
//
// Forward task = (batch, head, query tile). Backward task = (batch, head, key chunk): it owns
// dK and dV of its keys, so no two tasks write the same element; with several chunks per head
// (when batch * heads is small) each chunk's partial dQ goes to its own slot and a second phase
// sums the slots in chunk order. The partition depends on the shape only: results are bitwise
// the same for any number of threads.
#pragma once

#include <cmath>
#include <type_traits>

#include "cpu/isa.h"
#include "cpu/kernels/namespace.h"
#include "cpu/kernels/gemm.h"
#include "cpu/kernels/masks.h"
#include "cpu/kernels/transpose.h"

ROLLINGQ_KERNELS_BEGIN

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

// Queries per tile (SIMD lanes of the score blocks): 64, or 256 for wide heads (D + Dv > 256),
// where every tile re-reads the head's K and V (and the backward sweeps its dK / dV
// accumulators) and larger tiles read them 4x less often, as torch's kernel does with its
// 256-row query blocks.
constexpr int64_t kQueryTile = 64;
constexpr int64_t kWideQueryTile = 256;
constexpr int64_t kMaxQueryTile = kWideQueryTile;
// A wide head: D + Dv > 256. Wide heads take larger query tiles, whole key blocks per product
// and (float products) B operands in panels.
inline bool wide_head(const AttentionParams& p) { return p.head_dim + p.value_dim > 256; }
// A call of at most kRowQueries<A> queries (decoding, a [CLS] row alone) takes its scores by
// rows (gemm.h row_dots): with queries along lanes such a tile would use one lane of W and K's
// products would do W times the work. The choice depends on the shape only (never on the thread
// count, which moves the tiles), so no result depends on the thread count.
template <typename A>
inline bool few_queries(const AttentionParams& p) {
  return p.seqlen_q <= kRowQueries<A>;
}
// Whether B operands are copied into panels: for wide heads, where each copy serves a tile of
// many queries; a few queries would pay a copy of V (or of K, in the backward) per head for one
// pass over it.
template <typename A>
inline bool use_panels(const AttentionParams& p) {
  return wide_head(p) && !few_queries<A>(p);
}
// Whether the forward packs K and V one key block at a time: with a few queries and no GQA group
// to share them, packed rows serve one pass, and a block's rows stay in L2 where a whole head of
// converted bf16 rows did not (0.77-0.99x the forward's time, bf16 decoding, one process).
template <typename A>
inline bool pack_per_block(const AttentionParams& p) {
  return few_queries<A>(p) && p.heads == p.heads_kv;
}
inline int64_t fp_query_tile(const AttentionParams& p) {
  return wide_head(p) ? kWideQueryTile : kQueryTile;
}
// The query tile of a forward: `base` queries, unless the (batch, head) pairs times the tiles
// of `base` are too few to keep every thread busy to the end: then the heads are cut into the
// smallest number of tiles (at least ceil(Lq / base)) that the threads share evenly, each
// rounded up to `align` lanes. A row's result does not depend on its tile (each lane's online
// softmax is its own and every product element sums in a fixed order), so neither does the
// output on the thread count.
inline int64_t balanced_query_tile(const AttentionParams& p, int64_t base, int64_t align,
                                   int64_t threads) {
  const int64_t Lq = imax<int64_t>(p.seqlen_q, 1), bh = imax<int64_t>(p.batch * p.heads, 1);
  const int64_t n = ceil_div(Lq, base);
  if (threads <= 1 || bh * n >= 4 * threads) return base;
  int64_t m = n;
  while ((bh * m) % threads != 0) ++m;  // at most threads - 1 steps
  return imin(base, imax(align, round_up(ceil_div(Lq, m), align)));
}

constexpr int64_t kKeyBlock = 128;  // keys per online-softmax step: S^T block of 32 KiB (fp32)
// Backward: heads are split into key chunks until there are kBwdTargetTasks tasks, chunks of at
// least kMinChunk keys; short sequences still make kBwdMinTasks tasks where key blocks allow
// (one (batch, head) of 197 keys was one task: one thread of the pool worked). The chunking
// depends on the shape only, never on the thread count (the chunks' dq sum in a fixed order).
constexpr int64_t kBwdTargetTasks = 16;
constexpr int64_t kMinChunk = 256;
constexpr int64_t kBwdMinTasks = 4;

template <typename T>
inline const T* ptr(const void* p) {
  return static_cast<const T*>(p);
}

// kv head read by query head h (grouped-query attention: heads / heads_kv query heads per kv head)
inline int64_t kv_head(const AttentionParams& p, int64_t h) {
  return h / (p.heads / p.heads_kv);
}

// ---- pieces shared by forward and backward ---------------------------------------------------

// Whether a forward writes its output rows with streaming stores (vec.h stream_row): the output
// has at least Plan::stream_bytes bytes (-1: never) and every row is whole 64-byte lines.
template <typename T>
bool stream_output(const AttentionParams& p, int64_t stream_bytes) {
  const int64_t E = sizeof(T);
  auto lines = [&](int64_t size, int64_t stride) { return size == 1 || (stride * E) % 64 == 0; };
  return kVecBytes >= 32 && stream_bytes >= 0 &&
         p.batch * p.heads * p.seqlen_q * p.value_dim * E >= stream_bytes &&
         reinterpret_cast<uintptr_t>(p.out) % 64 == 0 && (p.value_dim * E) % 64 == 0 &&
         lines(p.seqlen_q, p.out_row_stride) && lines(p.heads, p.out_head_stride) &&
         lines(p.batch, p.out_batch_stride);
}

// Per-modality key sums of one (batch, query head) over the non-padded keys it reads (its kv head
// under grouped-query attention); the key counts of the batch entry when count. Keys with id -1
// count nowhere. Keys j0 .. j1, in order (a call from key 0 starts the sums): from `rows` (keys
// j0 .. j1 already in type A, ld apart: the rows a forward's key block multiplies, so the sums
// take no pass of their own over K) or else from the tensor.
template <typename T, typename A>
void key_stats(const AttentionParams& p, int64_t b, int64_t h, bool count, int64_t j0 = 0,
               int64_t j1 = -1, const A* rows = nullptr, int64_t ld = 0) {
  const int64_t Lk = j1 < 0 ? p.seqlen_k : j1, D = p.head_dim;
  const int M = p.num_modalities;
  const T* k = ptr<T>(p.k) + b * p.k_batch_stride + kv_head(p, h) * p.k_head_stride;
  const int32_t* ids = p.key_modality + b * p.key_modality_batch_stride;
  const bool* pad = p.key_padding ? p.key_padding + b * p.key_padding_batch_stride : nullptr;
  A* ks = static_cast<A*>(p.key_sum) + (b * p.heads + h) * M * D;
  A* kc = static_cast<A*>(p.key_count) + b * M;
  if (j0 == 0) {
    fill(ks, M * D, A(0));
    if (count) fill(kc, M, A(0));
  }
  constexpr int64_t kChunk = 256;
  alignas(64) A row[kChunk];  // a bf16 key converted (load_row converts whole vectors)
  for (int64_t j = j0; j < Lk; ++j) {
    const int32_t id = ids[j];
    if (id < 0 || (pad && !pad[j])) continue;
    A* dst = ks + id * D;
    const T* kr = k + j * p.k_row_stride;
    if (rows != nullptr) {
      const A* src = rows + (j - j0) * ld;
      for (int64_t d = 0; d < D; ++d) dst[d] += src[d];
    } else if constexpr (same_type<T, A>::value) {
      for (int64_t d = 0; d < D; ++d) dst[d] += kr[d];
    } else {
      for (int64_t d0 = 0; d0 < D; d0 += kChunk) {
        const int64_t n = imin(kChunk, D - d0);
        load_row(row, kr + d0, n);
        for (int64_t d = 0; d < n; ++d) dst[d0 + d] += row[d];
      }
    }
    if (count) kc[id] += A(1);
  }
}

// The rows of the query tile i0 .. i0 + qn of one (batch, head) that the rotation selects, rotated:
// q'_c = R q_c for the lanes idx[0 .. cnt). gather(l, dst, st) writes lane l's query, dst[d * st]
// for d < D. Element a of rotated row c is at r[c * rc + a * ra], in tmp (2 * D * lanes). Only the selected rows are multiplied (RollingQ rotates the [CLS] row alone;
// at D = 768 a whole tile would cost a fraction of the attention itself).
// The lanes of the query tile i0 .. i0 + qn that the rotation selects (all without a row mask).
inline int64_t selected_rows(const AttentionParams& p, int64_t b, int64_t i0, int64_t qn,
                             int64_t* idx) {
  const bool* sel = p.rotated_rows ? p.rotated_rows + b * p.rotated_rows_batch_stride + i0 : nullptr;
  int64_t cnt = 0;
  for (int64_t l = 0; l < qn; ++l)
    if (sel == nullptr || sel[l]) idx[cnt++] = l;
  return cnt;
}

template <typename A>
struct RotatedRows {
  int64_t cnt = 0, rc = 0, ra = 0;
  const A* r = nullptr;
  A at(int64_t c, int64_t a) const { return r[c * rc + a * ra]; }
};
// n query rows of head h rotated through one pass over R: the selected rows of a query tile, or
// those of many (batch, head) tasks of a few queries each (RollingQ's [CLS] row alone reads all
// of R, D x D, to rotate one row; a pass per task re-read a 768 x 768 R once per batch entry).
// gather(c, dst, st) writes row c, dst[d * st] for d < D. R by columns (a QR factor, a
// transposed view): q'_c = q_c R^T with R^T's rows contiguous and the rows as broadcast
// operand; otherwise (R Q^T)[a][c] with R as broadcast operand. Each element is one FMA chain in
// a fixed order, the same for any n, so how the tasks are grouped changes no bit.
// tmp: 2 * D * round_up(n, W).
template <typename A, typename Gather>
RotatedRows<A> rotate_rows(const AttentionParams& p, int64_t h, int64_t n, Gather gather, A* tmp) {
  constexpr int W = VT<A>::W;
  const int64_t D = p.head_dim, cw = round_up(n, W);
  const A* R = ptr<A>(p.rotation) + h * p.rotation_head_stride;
  const int64_t rs = p.rotation_row_stride, cs = p.rotation_col_stride;
  RotatedRows<A> rr;
  rr.cnt = n;
  A* g = tmp;
  A* r = tmp + D * cw;
  rr.r = r;
  if (rs == 1 && D % W == 0) {  // R's columns are whole vectors: q' = q R^T, rows by rows
    for (int64_t c = 0; c < n; ++c) gather(c, g + c * D, 1);
    gemm<A>(n, D / W, D, g, D, 1, R, cs, r, D, Acc::kSet);
    rr.rc = D;
    rr.ra = 1;
    return rr;
  }
  for (int64_t c = 0; c < cw; ++c) {  // (R Q^T)[a][c], R as broadcast operand
    if (c < n) {
      gather(c, g + c, cw);
    } else {
      for (int64_t d = 0; d < D; ++d) g[d * cw + c] = A(0);
    }
  }
  gemm<A>(D, cw / W, D, R, rs, cs, g, cw, r, cw, Acc::kSet);
  rr.rc = 1;
  rr.ra = cw;
  return rr;
}

template <typename A, typename Gather>
RotatedRows<A> rotate_selected(const AttentionParams& p, int64_t b, int64_t h, int64_t i0,
                               int64_t qn, Gather gather, A* tmp, int64_t* idx) {
  constexpr int W = VT<A>::W;
  const int64_t D = p.head_dim;
  RotatedRows<A> rr;
  if (p.rotation == nullptr) return rr;
  const int64_t cnt = selected_rows(p, b, i0, qn, idx);
  if (cnt == 0) return rr;
  const int64_t rs = p.rotation_row_stride, cs = p.rotation_col_stride;
  if (!(rs == 1 && D % W == 0) && cs == 1 && cnt * 4 <= W) {
    // R by rows, few rows (RollingQ's [CLS] row): a dot product per row of R
    const A* R = ptr<A>(p.rotation) + h * p.rotation_head_stride;
    A* g = tmp;
    A* r = tmp + D * cnt;
    for (int64_t c = 0; c < cnt; ++c) gather(idx[c], g + c * D, 1);
    for (int64_t c = 0; c < cnt; ++c)
      for (int64_t a = 0; a < D; ++a) r[c * D + a] = dot(R + a * rs, g + c * D, D);
    rr.cnt = cnt;
    rr.r = r;
    rr.rc = D;
    rr.ra = 1;
    return rr;
  }
  return rotate_rows<A>(
      p, h, cnt, [&](int64_t c, A* dst, int64_t st) { gather(idx[c], dst, st); }, tmp);
}

// The selected rows of the query tile i0 .. i0 + qn, rotated: already rotated at rot (rows of D,
// prerotate_queries) where rot is not null, else rotated here from the rows gather reads.
template <typename A, typename Gather>
RotatedRows<A> tile_rotated_rows(const AttentionParams& p, int64_t b, int64_t h, int64_t i0,
                                 int64_t qn, const A* rot, Gather gather, A* tmp, int64_t* idx) {
  if (rot == nullptr) return rotate_selected<A>(p, b, h, i0, qn, gather, tmp, idx);
  RotatedRows<A> rr;
  rr.cnt = selected_rows(p, b, i0, qn, idx);
  rr.r = rot;
  rr.rc = p.head_dim;
  rr.ra = 1;
  return rr;
}

// The query tile i0 .. i0 + qn of one (batch, head), rotated rows R q_i:
//   qT    [D][lanes]  transposed (lanes >= qn are 0)
//   qrows [lanes][Dp] by rows, when qrows is not null
// tmp: 2 * D * lanes.
// rot, where not null: the selected rows already rotated (prerotate_queries), rows of D.
template <typename T, typename A>
void pack_queries(const AttentionParams& p, int64_t b, int64_t h, int64_t i0, int64_t qn,
                  int64_t lanes, int64_t Dp, A* qT, A* qrows, A* tmp, const A* rot = nullptr) {
  const int64_t D = p.head_dim;
  const T* q = ptr<T>(p.q) + b * p.q_batch_stride + h * p.q_head_stride + i0 * p.q_row_stride;
  const A* src;
  int64_t ss;
  if (same_type<T, A>::value && qrows == nullptr) {
    src = reinterpret_cast<const A*>(q);
    ss = p.q_row_stride;
  } else {
    A* rows = qrows != nullptr ? qrows : tmp;  // tmp holds lanes * D as well
    const int64_t ld = qrows != nullptr ? Dp : D;
    for (int64_t l = 0; l < qn; ++l) {
      load_row(rows + l * ld, q + l * p.q_row_stride, D);
      fill(rows + l * ld + D, ld - D, A(0));
    }
    fill(rows + qn * ld, (lanes - qn) * ld, A(0));
    src = rows;
    ss = ld;
  }
  transpose(src, ss, qT, lanes, qn, D);
  for (int64_t d = 0; d < D; ++d) fill(qT + d * lanes + qn, lanes - qn, A(0));
  int64_t idx[kMaxQueryTile];
  const RotatedRows<A> rr = tile_rotated_rows<A>(
      p, b, h, i0, qn, rot,
      [&](int64_t l, A* dst, int64_t st) {
        for (int64_t d = 0; d < D; ++d) dst[d * st] = qT[d * lanes + l];
      },
      tmp, idx);
  // put back: lanes of Q^T and rows
  for (int64_t d = 0; d < D; ++d)
    for (int64_t c = 0; c < rr.cnt; ++c) qT[d * lanes + idx[c]] = rr.at(c, d);
  if (qrows != nullptr)
    for (int64_t c = 0; c < rr.cnt; ++c)
      for (int64_t d = 0; d < D; ++d) qrows[idx[c] * Dp + d] = rr.at(c, d);
}

// The forward's query rows when it takes the scores by rows (few_queries): qrows [qn][Dp], the
// selected rows rotated. row_dots reads these qn rows only and writes zeros to the other lanes,
// and no product of the forward reads Q^T, so neither padding rows nor the transpose are made
// (pack_queries makes both: they were a third of the time of a task of one query over 4 keys).
template <typename T, typename A>
void pack_query_rows(const AttentionParams& p, int64_t b, int64_t h, int64_t i0, int64_t qn,
                     int64_t Dp, A* qrows, A* tmp, const A* rot) {
  const int64_t D = p.head_dim;
  const T* q = ptr<T>(p.q) + b * p.q_batch_stride + h * p.q_head_stride + i0 * p.q_row_stride;
  for (int64_t l = 0; l < qn; ++l) {
    load_row(qrows + l * Dp, q + l * p.q_row_stride, D);
    fill(qrows + l * Dp + D, Dp - D, A(0));
  }
  int64_t idx[kMaxQueryTile];
  const RotatedRows<A> rr = tile_rotated_rows<A>(
      p, b, h, i0, qn, rot,
      [&](int64_t l, A* dst, int64_t st) {
        for (int64_t d = 0; d < D; ++d) dst[d * st] = qrows[l * Dp + d];
      },
      tmp, idx);
  for (int64_t c = 0; c < rr.cnt; ++c)
    for (int64_t d = 0; d < D; ++d) qrows[idx[c] * Dp + d] = rr.at(c, d);
}

// Rows of K and V of one head prepared for the products, packed once per head (forward) or per
// key chunk (backward) and reused by every query tile (and every query head of a GQA group):
// copied into contiguous rows padded to the vector width (converted when the input is not of
// type A). In place, rows of a (B, L, H, D) layout lie H * D apart, a power of two that maps a
// block's rows to a few L1 cache sets; packed, the broadcast operand of S^T = K Q^T ran 15 %
// faster at D = 64. V as broadcast operand (backward dP = V dO^T) is read in place.
template <typename T, typename A>
struct HeadRows {
  A* kbuf;  // rows x Dp: K converted (T != A) or packed as vector operand
  A* vbuf;  // rows x Dvp: V converted / packed
  A* vpanels = nullptr;  // V's rows also in panels (B of O += P V), panel stride vps, if set
  int64_t vps = 0;
  int64_t key = -1, first = 0, end = 0;  // (b, h) packed, rows [first, end) of it
  // Rows of type A and whole vectors are read in place at any row stride, not only at D: where
  // the scores are taken by rows (few_queries) a strided row is no worse than a packed one.
  bool any_stride = false;
  // Row `first` of K and V for the products and their row strides: the packed buffers, or the
  // tensors themselves where their rows are already contiguous, padded and of type A.
  const A* k0 = nullptr;
  const A* v0 = nullptr;
  int64_t kld = 0, vld = 0;
  bool k_packed = true, v_packed = true;

  // The next ensure() packs from its first row into the start of the buffers.
  void restart() { key = -1; }
  // Make rows [j0, j1) available, packing what is missing (rows must be asked in order).
  void ensure(const AttentionParams& p, const T* k, const T* v, int64_t bh, int64_t j0,
              int64_t j1, int64_t Dp, int64_t Dvp, bool want_v) {
    const int64_t D = p.head_dim, Dv = p.value_dim;
    if (key != bh) {
      key = bh;
      first = end = j0;
      constexpr bool same = same_type<T, A>::value;
      k_packed = !(same && D == Dp && (any_stride || p.k_row_stride == D));
      v_packed = !(same && Dv == Dvp && (any_stride || p.v_row_stride == Dv));
      k0 = k_packed ? kbuf : reinterpret_cast<const A*>(k) + j0 * p.k_row_stride;
      kld = k_packed ? Dp : p.k_row_stride;
      v0 = v_packed ? vbuf : reinterpret_cast<const A*>(v) + j0 * p.v_row_stride;
      vld = v_packed ? Dvp : p.v_row_stride;
    }
    const RowsAhead<T> k_ahead(k, p.k_row_stride, p.seqlen_k, D),
        v_ahead(v, p.v_row_stride, p.seqlen_k, Dv);
    for (int64_t j = end; j < j1; ++j) {
      if (k_packed) {
        k_ahead.at(j);
        A* dst = kbuf + (j - first) * kld;
        load_row(dst, k + j * p.k_row_stride, D);
        fill(dst + D, kld - D, A(0));
      }
      if ((want_v || !same_type<T, A>::value) && v_packed) {
        v_ahead.at(j);
        A* dst = vbuf + (j - first) * vld;
        load_row(dst, v + j * p.v_row_stride, Dv);
        fill(dst + Dv, vld - Dv, A(0));
      }
    }
    if (vpanels != nullptr && j1 > end)
      pack_panels<A>(v0, vld, end - first, j1 - first, Dvp / VT<A>::W, vpanels, vps);
    end = imax(end, j1);
  }
  // K of row j as broadcast operand and its row stride
  const A* kA(int64_t j, int64_t* ld) const {
    *ld = kld;
    return k0 + (j - first) * kld;
  }
  const A* vA(const AttentionParams& p, const T* v, int64_t j, int64_t Dvp, int64_t* ld) const {
    if constexpr (same_type<T, A>::value) {
      *ld = p.v_row_stride;
      return v + j * p.v_row_stride;
    } else {
      *ld = Dvp;
      return vbuf + (j - first) * Dvp;
    }
  }
  // V of row j by padded rows (Dvp values, zeros past Dv; want_v packs them where needed)
  const A* vR(int64_t j, int64_t* ld) const {
    *ld = vld;
    return v0 + (j - first) * vld;
  }
  // K of row j as vector operand and its row stride; V from row j as B of O += P V (in panels
  // where vpanels is set)
  const A* kB(int64_t j, int64_t* ld) const { return kA(j, ld); }
  BOperand<A> vB(int64_t j) const {
    if (vpanels != nullptr) return BOperand<A>{vpanels + (j - first) * kPanel<A>, kPanel<A>, vps};
    return BOperand<A>{v0 + (j - first) * vld, vld};
  }
};

// Products over a key block (O += P V, dQ' += dS K) in slices of kSliceKeys keys, so that the
// slice of both operands stays in L1 while it is reused by every row block of C. Wide heads take
// the whole block: there C (256 query rows x Dv, 768 KiB at Dv = 768) is read and written once
// per slice and that traffic dominates (halving it measured 7-10 % faster with two threads at
// D = 768; 32-key slices were 20 % slower). A few queries (few_queries) make C a few rows: wide
// heads then take 8 keys, whose rows (24 KiB at D = 768) stay in L1 while the register blocks
// take their panels one after another instead of each streaming the block's rows 3 KiB apart
// (float32 forward at D = 768, Lq = 1..8: 0.85-0.96x the time). The sums are the same either way:
// every C element accumulates its keys in order, through memory between slices.
constexpr int64_t kSliceKeys = 64;
constexpr int64_t kFewWideSliceKeys = 8;
template <typename A>
inline int64_t slice_keys(const AttentionParams& p) {
  if (wide_head(p)) return few_queries<A>(p) ? kFewWideSliceKeys : kKeyBlock;
  return kSliceKeys;
}

// ---- forward ---------------------------------------------------------------------------------

// Wide heads (D + Dv > 256) read B operands whose rows span several panels from copies in
// panels (gemm.h): at D = 768 the products' B rows are 3 KiB apart and a register block streams
// hundreds of them, a new line each step and a new page every few (one thread, AVX2 build, all
// five backward products at about 61 % of the FMA peak before). The copies made rows padded one
// vector longer (which had kept such rows off a few L1 sets) no faster, so rows are not padded.

// B from row k on (either layout: in panels ldb is the panel's row length).
template <typename A>
inline BOperand<A> from_row(BOperand<A> B, int64_t k) {
  return BOperand<A>{B.b + k * B.ldb, B.ldb, B.bps};
}

template <typename A>
struct FwdWork {
  A *qT, *tmp, *S, *O, *m, *l, *alpha, *mass, *kbuf, *vbuf, *mbuf;
  A *qTp, *vpan;  // Q^T and V in panels (use_panels)
  A* qrows;       // the queries by rows, padded to Dp (few_queries)
  A *rot, *rtmp;  // a slice of tasks' rotated rows and rotate_rows' buffer (prerotates)
};

// Tasks whose selected rows one pass over R rotates (a few queries with a rotation).
constexpr int64_t kRotateSlice = 16;

template <typename A>
inline bool prerotates(const AttentionParams& p) {
  return few_queries<A>(p) && p.rotation != nullptr;
}

// The rows of one task a forward may rotate: its query tile, at most Lq.
inline int64_t task_rows(const AttentionParams& p, int64_t qt) {
  return imax<int64_t>(1, imin(qt, p.seqlen_q));
}

template <typename T, typename A>
FwdWork<A> carve_fwd(char* base, const AttentionParams& p, int64_t QT, size_t* bytes) {
  constexpr int W = VT<A>::W;
  const int64_t D = p.head_dim, KB = kKeyBlock;
  const int64_t Dp = round_up(D, W), Dvp = round_up(p.value_dim, W);
  Carve c{base};
  FwdWork<A> w;
  w.qT = c.take<A>(D * QT);
  w.tmp = c.take<A>(2 * D * QT);
  w.S = c.take<A>(KB * QT);
  w.O = c.take<A>(QT * Dvp);
  w.m = c.take<A>(QT);
  w.l = c.take<A>(QT);
  w.alpha = c.take<A>(QT);
  w.mass = c.take<A>(imax(p.num_modalities, 1) * QT);
  const int64_t keys = imax<int64_t>(p.seqlen_k, 1);
  const int64_t rows = pack_per_block<A>(p) ? imin(keys, kKeyBlock) : keys;  // K / V rows packed
  w.kbuf = c.take<A>(rows * Dp);
  w.vbuf = c.take<A>(rows * Dvp);
  w.mbuf = c.take<A>(p.attn_mask_kind != AttentionParams::kMaskNone ? mask_buffer_elems(QT, KB) : 1);
  const bool panels = use_panels<A>(p);
  w.qTp = c.take<A>(panels ? panel_elems<A>(D, ceil_div(QT, W)) : 1);
  w.vpan = c.take<A>(panels ? panel_elems<A>(rows, Dvp / W) : 1);
  w.qrows = c.take<A>(few_queries<A>(p) ? QT * Dp : 1);
  const int64_t rrows = prerotates<A>(p) ? kRotateSlice * task_rows(p, QT) : 0;
  w.rot = c.take<A>(imax<int64_t>(1, rrows * D));
  w.rtmp = c.take<A>(imax<int64_t>(1, 2 * D * round_up(rrows, W)));
  if (bytes) *bytes = c.used;
  return w;
}

template <typename T, typename A>
void fwd_plan_fp(const AttentionParams& p, Plan& plan) {
  const int64_t qt = balanced_query_tile(p, fp_query_tile(p), 16, plan.threads);
  const int64_t tiles = imax<int64_t>(1, ceil_div(p.seqlen_q, qt));
  plan.tasks = p.batch * p.heads * tiles;
  plan.flops_per_task = 2 * imin(qt, imax<int64_t>(p.seqlen_q, 1)) *
                        imax<int64_t>(p.seqlen_k, 1) * (p.head_dim + p.value_dim + 1);
  carve_fwd<T, A>(nullptr, p, qt, &plan.workspace_bytes);
  plan.param[0] = tiles;
  plan.task_group = tiles;
  if (prerotates<A>(p))  // chunks of up to a slice, so that R is read once per slice
    plan.task_group = imax(tiles, imin(kRotateSlice, ceil_div(plan.tasks, plan.threads)) / tiles * tiles);
  plan.param[1] = qt;
}

// Headroom of the lazy running max (Out::kLazyMax), in powers of two.
constexpr float kLazyMaxLog2 = 8.0f;

// The largest |running max| or |lse| (natural log) for which the bf16 paths may form an exponent
// from unrounded products: the scale applied inside the softmax (raw scores, s * scale - m in
// one FMA) or the offset folded into one FMA (s * c - m * log2(e)). The row's largest term then
// gets 2^t with t off zero by half an ulp of m (2^-13 at 2048: 1e-4 relative, far below the bf16
// step); at |m| = 1e10 it was off by thousands and the probability came out 0 or inf. Beyond the
// limit the scores are scaled and rounded first and the exponent is (x - m) * log2(e), exact at
// the row's max, as in the float engine.
constexpr float kFoldLimit = 2048.0f;
inline bool within_fold_limit(float m) { return m >= -kFoldLimit && m <= kFoldLimit; }
// Whether each of m[0, n) is -inf (a row that has seen no key) or within kFoldLimit.
inline bool all_within_fold_limit(const float* m, int64_t n) {
  bool ok = true;
  for (int64_t i = 0; i < n; ++i)
    ok &= within_fold_limit(m[i]) || m[i] == -std::numeric_limits<float>::infinity();
  return ok;
}

// Where the softmax puts the probabilities of a block: back into S (float), by default.
template <typename A>
struct StoreProbabilities {
  static constexpr bool kStoresF32 = true;
  static constexpr bool kCoarseExp = false;  // exp2v_coarse (bf16 consumers only)
  // S holds unscaled dot products and raw_scale() > 0 multiplies them inside the softmax (the
  // scale folds into the exponent's FMA instead of a pass over S); false: S is scaled already.
  static constexpr bool kRawScores = false;
  A raw_scale() const { return A(1); }
  // The running max moves only when a block's max exceeds it by more than kLazyMaxLog2 / log2(e)
  // (probabilities then stay below 2^kLazyMaxLog2): once it settles, O is no longer rescaled.
  static constexpr bool kLazyMax = false;
  template <int G>
  void row(A* sp, int64_t, int64_t, const vec_t<A> (&e)[G]) {
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g) vstore(sp + g * VT<A>::W, e[g]);
  }
  template <int G>
  void finish(int64_t, int64_t) {}
};

// One key block of the online softmax for the query lanes of column vectors v0 .. v0 + G - 1:
// running max, exp, row sums, modality mass. S holds the masked, scaled scores S^T[j][lane] on
// entry (hidden ones -inf); the probabilities (relative to the new running max) go to `out`. G
// columns at once keep G independent dependency chains in flight. Returns whether the running
// max of any lane moved (else alpha is 1 everywhere).
//
// With a lazy running max (Out::kLazyMax) a block usually leaves the max where it is: once every
// lane has a finite one, the block is first tried in a single pass against the old max, its own
// max taken on the way; only if that max would move it (rare once the max settles) are the row
// sums put back and the block done again in two passes. Both give the same bits.
template <typename A, int G, typename Out>
inline bool softmax_cols(const AttentionParams& p, int64_t b, int64_t j0, int64_t kn,
                         int64_t lanes, int64_t v0, A* S, A* m, A* l, A* alpha, A* mass,
                         Out& out) {
  using V = vec_t<A>;
  constexpr int W = VT<A>::W;
  const int M = p.num_modalities;
  const int32_t* ids = M > 0 ? p.key_modality + b * p.key_modality_batch_stride + j0 : nullptr;
  const V ninf = vbcast(-std::numeric_limits<A>::infinity());
  A* S0 = S + v0 * W;
  // raw scores: rounding is monotone, so max(fl(scale s)) = fl(scale max(s)) for scale > 0
  const V vscale = vbcast(out.raw_scale());
  V bm[G], m_safe[G], run[G];

  // Keys come in runs of one modality id: the sum of a run goes to the row sum and to its
  // modality's mass (ids -1 to the row sum only). Hidden keys have probability 0. With Track,
  // the block's max is taken as well (bm). With Fold, the exponent is one FMA,
  // s * (scale log2(e)) - m log2(e) (run_exp_pass says where).
  V c_mul, c_sub[G];
  auto exp_pass = [&](auto track, auto folded) {
    constexpr bool Track = decltype(track)::value, Fold = decltype(folded)::value;
    int32_t cur = -1;
    auto flush = [&]() {
#pragma GCC unroll 4
      for (int g = 0; g < G; ++g) {
        A* lp = l + (v0 + g) * W;
        vstore(lp, vload(lp) + run[g]);
        if (cur >= 0) {
          A* mp = mass + cur * lanes + (v0 + g) * W;
          vstore(mp, vload(mp) + run[g]);
        }
        run[g] = V{};
      }
    };
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g) run[g] = V{};
    for (int64_t j = 0; j < kn; ++j) {
      if (M > 0 && ids[j] != cur) {
        flush();
        cur = ids[j];
      }
      A* sp = S0 + j * lanes;
      V e[G];
#pragma GCC unroll 4
      for (int g = 0; g < G; ++g) {
        const V s = vload(sp + g * W);
        if constexpr (Track) bm[g] = vmax<A>(bm[g], s);
        V t;
        if constexpr (Fold)
          t = s * c_mul - c_sub[g];
        else if constexpr (Out::kRawScores)  // scale s - m in one FMA (exact product, one rounding)
          t = (s * vscale - m_safe[g]) * log2e<A>();
        else
          t = (s - m_safe[g]) * log2e<A>();
        if constexpr (Out::kCoarseExp)
          e[g] = exp2v_coarse(t);
        else
          e[g] = exp2v(t);
        run[g] += e[g];
      }
      out.template row<G>(sp, j, v0, e);
    }
    flush();
  };
  // Where the probabilities are rounded to bf16 next (kCoarseExp), the exponent is folded into
  // one FMA when m log2(e) is finite: the roundings of the two constants move it by a few
  // float32 ulps, far below the bf16 step. Elsewhere (x - m) * log2(e) as in move_max.
  auto run_exp_pass = [&](auto track) {
    if constexpr (Out::kCoarseExp) {
      c_mul = vbcast(Out::kRawScores ? out.raw_scale() * log2e<A>() : log2e<A>());
      bool fold = std::isfinite(c_mul[0]) && c_mul[0] != A(0);
      const V limit = vbcast(A(kFoldLimit));
#pragma GCC unroll 4
      for (int g = 0; g < G; ++g) {
        c_sub[g] = m_safe[g] * log2e<A>();
        const V ms = m_safe[g];
        fold &= !any_lane((ms < -limit) | (ms > limit) | (ms != ms));
      }
      if (fold) return exp_pass(track, std::true_type{});
    }
    exp_pass(track, std::false_type{});
  };
  // Column g's running max m_old -> m_new, the row sum and masses rescaled by alpha. A lane that
  // has seen no key yet keeps max -inf: shift it by 0 so exp(-inf) = 0, not NaN. The exponent is
  // (x - m) * log2(e), not x * log2(e) - m * log2(e): a huge finite max must not overflow.
  auto move_max = [&](int g, V m_old, V m_new) {
    m_safe[g] = m_new == ninf ? V{} : m_new;
    const V a = exp2v((m_old - m_safe[g]) * log2e<A>());
    const bool moved = any_lane(a != vbcast(A(1)));
    vstore(m + (v0 + g) * W, m_new);
    vstore(alpha + (v0 + g) * W, a);
    vstore(l + (v0 + g) * W, vload(l + (v0 + g) * W) * a);
    for (int mm = 0; mm < M; ++mm)
      vstore(mass + mm * lanes + (v0 + g) * W, vload(mass + mm * lanes + (v0 + g) * W) * a);
    return moved;
  };
  const A lazy = A(kLazyMaxLog2 / kLog2e);

  if constexpr (Out::kLazyMax) {
    bool settled = true;
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g) {
      const V m_old = vload(m + (v0 + g) * W);
      // finite: a max of +inf (an overflowed score) rescales by inf - inf = NaN every step
      settled &= !any_lane(not_finite<A>(m_old));
      m_safe[g] = m_old;
      bm[g] = ninf;
    }
    if (settled) {
      A* save = out.save;  // the row sums and masses this pass adds to, in case it is undone
#pragma GCC unroll 4
      for (int g = 0; g < G; ++g) {
        vstore(save + g * W, vload(l + (v0 + g) * W));
        for (int mm = 0; mm < M; ++mm)
          vstore(save + ((1 + mm) * G + g) * W, vload(mass + mm * lanes + (v0 + g) * W));
      }
      run_exp_pass(std::true_type{});
      bool stays = true;
#pragma GCC unroll 4
      for (int g = 0; g < G; ++g) {
        if constexpr (Out::kRawScores) bm[g] = bm[g] * vscale;
        stays &= !any_lane(bm[g] > m_safe[g] + lazy);
      }
      if (stays) {
#pragma GCC unroll 4
        for (int g = 0; g < G; ++g) vstore(alpha + (v0 + g) * W, vbcast(A(1)));
        out.template finish<G>(kn, v0);
        return false;
      }
#pragma GCC unroll 4
      for (int g = 0; g < G; ++g) {
        vstore(l + (v0 + g) * W, vload(save + g * W));
        for (int mm = 0; mm < M; ++mm)
          vstore(mass + mm * lanes + (v0 + g) * W, vload(save + ((1 + mm) * G + g) * W));
      }
    }
  }

#pragma GCC unroll 4
  for (int g = 0; g < G; ++g) bm[g] = ninf;
  for (int64_t j = 0; j < kn; ++j)
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g) bm[g] = vmax<A>(bm[g], vload(S0 + j * lanes + g * W));
  if constexpr (Out::kRawScores)
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g) bm[g] = bm[g] * vscale;
  bool moved = false;
#pragma GCC unroll 4
  for (int g = 0; g < G; ++g) {
    const V m_old = vload(m + (v0 + g) * W);
    V m_new;
    if constexpr (Out::kLazyMax)  // m_old = -inf moves to any block max but -inf
      m_new = bm[g] > m_old + lazy ? bm[g] : m_old;
    else
      m_new = vmax<A>(m_old, bm[g]);
    moved |= move_max(g, m_old, m_new);
  }
  run_exp_pass(std::false_type{});
  out.template finish<G>(kn, v0);
  return moved;
}

// Columns per softmax group: as many independent chains as the registers allow.
constexpr int kSoftmaxGroup = kVecBytes == 64 ? 4 : 2;

template <typename A, int G, typename Out>
inline bool softmax_tail(int64_t rem, const AttentionParams& p, int64_t b, int64_t j0, int64_t kn,
                         int64_t lanes, int64_t v0, A* S, A* m, A* l, A* alpha, A* mass,
                         Out& out) {
  if constexpr (G > 0) {
    if (rem == G) return softmax_cols<A, G>(p, b, j0, kn, lanes, v0, S, m, l, alpha, mass, out);
    return softmax_tail<A, G - 1>(rem, p, b, j0, kn, lanes, v0, S, m, l, alpha, mass, out);
  }
  return false;
}

template <typename A, typename Out = StoreProbabilities<A>>
inline bool softmax_block(const AttentionParams& p, int64_t b, int64_t j0, int64_t kn,
                          int64_t lanes, A* S, A* m, A* l, A* alpha, A* mass, Out out = Out{}) {
  const int64_t nv = lanes / VT<A>::W;
  int64_t v = 0;
  bool moved = false;
  for (; v + kSoftmaxGroup <= nv; v += kSoftmaxGroup)
    moved |= softmax_cols<A, kSoftmaxGroup>(p, b, j0, kn, lanes, v, S, m, l, alpha, mass, out);
  moved |= softmax_tail<A, kSoftmaxGroup - 1>(nv - v, p, b, j0, kn, lanes, v, S, m, l, alpha, mass,
                                              out);
  return moved;
}

template <typename T, typename A>
void fwd_task_fp(const AttentionParams& p, int64_t task, int64_t tiles, int64_t qt,
                 FwdWork<A>& w, HeadRows<T, A>& rows, bool stream, const A* rot = nullptr) {
  using V = vec_t<A>;
  constexpr int W = VT<A>::W;
  const int64_t H = p.heads, Lq = p.seqlen_q, D = p.head_dim, Dv = p.value_dim;
  const int64_t Dp = round_up(D, W), Dvp = round_up(Dv, W);
  const int M = p.num_modalities;
  const int64_t tile = task % tiles, bh = task / tiles, h = bh % H, b = bh / H;
  // the key sums are taken by the first tile, from the rows its key blocks multiply
  const bool sums = M > 0 && tile == 0;
  const int64_t i0 = tile * qt, qn = imin(qt, Lq - i0);
  if (qn <= 0) {
    if (sums) key_stats<T, A>(p, b, h, h == 0);
    return;
  }
  const int64_t nv = ceil_div(qn, W), lanes = nv * W;
  const A inf = std::numeric_limits<A>::infinity();

  const bool by_rows = few_queries<A>(p);
  BOperand<A> qB{};
  if (by_rows) {
    pack_query_rows<T, A>(p, b, h, i0, qn, Dp, w.qrows, w.tmp, rot);
  } else {
    pack_queries<T, A>(p, b, h, i0, qn, lanes, Dp, w.qT, nullptr, w.tmp, rot);
    qB = panels_of<A>(w.qT, lanes, D, nv, use_panels<A>(p), w.qTp);
  }
  fill(w.O, qn * Dvp, A(0));
  fill(w.m, lanes, -inf);
  fill(w.l, lanes, A(0));
  fill(w.mass, M * lanes, A(0));

  const int64_t hk = kv_head(p, h);
  const T* k = ptr<T>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride;
  const T* v = ptr<T>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride;
  const bool masked = has_masks(p), skip_hidden = may_hide_blocks(p);
  const int64_t k_end = causal_end(p, i0, qn);
  for (int64_t j0 = 0; j0 < k_end; j0 += kKeyBlock) {
    const int64_t kn = imin(kKeyBlock, k_end - j0);
    if (pack_per_block<A>(p)) rows.restart();  // this block into the start of the buffers
    rows.ensure(p, k, v, b * p.heads_kv + hk, j0, j0 + kn, Dp, Dvp, true);
    int64_t ldk;
    const A* kA = rows.kA(j0, &ldk);
    if (sums) key_stats<T, A>(p, b, h, h == 0, j0, j0 + kn, kA, ldk);
    if (skip_hidden && block_hidden(p, b, h, i0, qn, j0, kn)) continue;
    if (by_rows) {  // K's rows are padded to Dp with zeros (HeadRows), as are the query rows
      // V's rows that O += P V will read from the tensor are fetched while the scores are taken
      // (row_dots' prefetch), so that K and V stream in together
      int64_t ldv = 0;
      const A* vnext = rows.v_packed ? nullptr : rows.vR(j0, &ldv);
      row_dots<A>(kn, qn, Dp, kA, ldk, w.qrows, Dp, w.S, lanes, A(p.scale), vnext, ldv,
                  rows.k_packed ? 0 : k_end - j0);
    } else {
      gemm<A>(kn, nv, D, kA, ldk, 1, qB, w.S, lanes, Acc::kSet, nullptr, A(p.scale));
    }
    if (masked) apply_masks<T, A>(p, b, h, i0, qn, j0, kn, lanes, w.S, w.mbuf);
    softmax_block<A>(p, b, j0, kn, lanes, w.S, w.m, w.l, w.alpha, w.mass);
    // dropout on the probabilities, after the statistics took them
    if (p.dropout_p > 0.0) dropout_block<A>(p, b, h, i0, j0, kn, lanes, w.S, true);
    // O = O * alpha + P V  (P[i][j] = S[j][i])
    const int64_t SK = slice_keys<A>(p);
    for (int64_t s0 = 0; s0 < kn; s0 += SK)
      gemm<A>(qn, Dvp / W, imin(SK, kn - s0), w.S + s0 * lanes, 1, lanes, rows.vB(j0 + s0), w.O,
              Dvp, s0 == 0 ? Acc::kRowScaleAdd : Acc::kAdd, s0 == 0 ? w.alpha : nullptr);
  }
  if (sums) key_stats<T, A>(p, b, h, h == 0, k_end);  // keys past the tile's causal end

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
    A* orow = w.O + i * Dvp;
    const V vinv = vbcast(inv);
    if (L == A(0) && !row_sees_a_key(p, b, h, i0 + i)) {
      fill(orow, Dvp, A(0));  // no key: zeros, even where a hidden value is NaN
    } else {
      for (int64_t d = 0; d < Dvp; d += W) vstore(orow + d, vload(orow + d) * vinv);
    }
    if (stream)
      stream_row(out + i * p.out_row_stride, orow, Dv);
    else
      store_row(out + i * p.out_row_stride, orow, Dv);
    lse[i] = L == A(0) ? -inf : w.m[i] + alog(L);
    for (int mm = 0; mm < M; ++mm) mass_out[i * M + mm] = w.mass[mm * lanes + i] * inv;
  }
}

// The selected rows of tasks t0 .. t1 rotated into w.rot (task t's at (t - t0) * task_rows * D,
// in the order of their lanes), one pass over R per run of tasks that share it (every task when
// R is shared by the heads).
template <typename T, typename A>
void prerotate_queries(const AttentionParams& p, int64_t tiles, int64_t qt, int64_t t0, int64_t t1,
                       FwdWork<A>& w) {
  const int64_t D = p.head_dim, H = p.heads, rq = task_rows(p, qt);
  int64_t idx[kMaxQueryTile];
  const T* src[kRotateSlice * kRowQueries<A>];  // prerotates: Lq <= kRowQueries rows per task
  A* dst[kRotateSlice * kRowQueries<A>];
  for (int64_t r0 = t0; r0 < t1;) {
    const int64_t h0 = (r0 / tiles) % H;
    int64_t n = 0, r1 = r0;
    for (; r1 < t1; ++r1) {
      const int64_t tile = r1 % tiles, bh = r1 / tiles, h = bh % H, b = bh / H;
      if (r1 > r0 && h * p.rotation_head_stride != h0 * p.rotation_head_stride) break;
      const int64_t i0 = tile * qt, qn = imin(qt, p.seqlen_q - i0);
      const int64_t cnt = qn > 0 ? selected_rows(p, b, i0, qn, idx) : 0;
      const T* q = ptr<T>(p.q) + b * p.q_batch_stride + h * p.q_head_stride + i0 * p.q_row_stride;
      for (int64_t c = 0; c < cnt; ++c) {
        src[n] = q + idx[c] * p.q_row_stride;
        dst[n++] = w.rot + ((r1 - t0) * rq + c) * D;
      }
    }
    if (n > 0) {
      const RotatedRows<A> rr = rotate_rows<A>(
          p, h0, n,
          [&](int64_t c, A* d, int64_t st) {
            load_row(w.qT, src[c], D);  // w.qT: free until the tasks pack their queries
            for (int64_t e = 0; e < D; ++e) d[e * st] = w.qT[e];
          },
          w.rtmp);
      for (int64_t c = 0; c < n; ++c)
        for (int64_t e = 0; e < D; ++e) dst[c][e] = rr.at(c, e);
    }
    r0 = r1;
  }
}

template <typename T, typename A>
void fwd_run_fp(const AttentionParams& p, const Plan& plan, int64_t begin, int64_t end,
                void* ws) {
  const int64_t qt = plan.param[1];
  FwdWork<A> w = carve_fwd<T, A>(static_cast<char*>(ws), p, qt, nullptr);
  HeadRows<T, A> rows{w.kbuf, w.vbuf};
  rows.any_stride = few_queries<A>(p);
  if (use_panels<A>(p)) {
    rows.vpanels = w.vpan;
    rows.vps = imax<int64_t>(p.seqlen_k, 1) * kPanel<A>;
  }
  const bool stream = stream_output<T>(p, plan.stream_bytes);
  const int64_t tiles = plan.param[0];
  if (!prerotates<A>(p)) {
    for (int64_t t = begin; t < end; ++t) fwd_task_fp<T, A>(p, t, tiles, qt, w, rows, stream);
  } else {
    const int64_t rq = task_rows(p, qt);
    for (int64_t t0 = begin; t0 < end; t0 += kRotateSlice) {
      const int64_t t1 = imin(end, t0 + kRotateSlice);
      prerotate_queries<T, A>(p, tiles, qt, t0, t1, w);
      for (int64_t t = t0; t < t1; ++t)
        fwd_task_fp<T, A>(p, t, tiles, qt, w, rows, stream, w.rot + (t - t0) * rq * p.head_dim);
    }
  }
  if (stream) stream_fence();
}

// ---- backward --------------------------------------------------------------------------------

template <typename A>
struct BwdWork {
  A *qT, *tmp, *qrows, *dorows, *doT, *delta, *lse, *S, *dP, *Z, *PZ, *dQ, *dK, *dV, *kbuf,
      *vbuf, *rpad, *mbuf;
  A *qTp, *qrowsp, *dorowsp, *kpan;  // the B operands in panels (wide heads; doT is made so)
};

// Backward task = (batch, kv head, key chunk): it loops over the query heads that read the kv
// head and over the query tiles, so dK / dV of its keys are complete inside the task.
struct BwdShape {
  int64_t qt, tiles, nc, chunk, Dp, Dvp, group;
};

template <typename A>
BwdShape bwd_shape(const AttentionBwdParams& p, int64_t qt) {
  constexpr int W = VT<A>::W;
  BwdShape s;
  s.qt = qt;
  s.tiles = ceil_div(p.seqlen_q, qt);
  s.group = p.heads / p.heads_kv;
  const int64_t bh = p.batch * p.heads_kv, Lk = p.seqlen_k;
  int64_t nc = 1;
  if (bh < kBwdTargetTasks) nc = imin(ceil_div(kBwdTargetTasks, bh), ceil_div(Lk, kMinChunk));
  if (bh * nc < kBwdMinTasks) nc = imax(nc, imin(ceil_div(kBwdMinTasks, bh), ceil_div(Lk, kKeyBlock)));
  nc = imax<int64_t>(nc, 1);
  s.chunk = round_up(imax<int64_t>(ceil_div(Lk, nc), 1), kKeyBlock);
  s.nc = imax<int64_t>(1, ceil_div(Lk, s.chunk));
  s.Dp = round_up(p.head_dim, W);
  s.Dvp = round_up(p.value_dim, W);
  return s;
}

// The backward's row term delta = sum_d dO[d] O[d], a vector at a time (O converted into buf,
// Dv values, when its type is not A), instead of one dependent scalar FMA per value.
template <typename T, typename A>
inline A row_delta(const A* dorow, const T* orow, int64_t Dv, A* buf) {
  if constexpr (same_type<T, A>::value) {
    return dot(dorow, orow, Dv);
  } else {
    load_row(buf, orow, Dv);
    return dot(dorow, static_cast<const A*>(buf), Dv);
  }
}

template <typename T, typename A>
BwdWork<A> carve_bwd(char* base, const AttentionBwdParams& p, const BwdShape& s, size_t* bytes) {
  const int64_t D = p.head_dim, Dv = p.value_dim, QT = s.qt, KB = kKeyBlock;
  const int64_t ck = imin(s.chunk, imax<int64_t>(p.seqlen_k, 1));
  const bool dropout = p.dropout_p > 0.0;
  Carve c{base};
  BwdWork<A> w;
  w.qT = c.take<A>(D * QT);
  w.tmp = c.take<A>(2 * imax(D, Dv) * QT);
  w.qrows = c.take<A>(QT * s.Dp);
  w.dorows = c.take<A>(QT * s.Dvp);
  const bool panels = use_panels<A>(p);
  w.doT = c.take<A>(Dv * (panels ? round_up(QT, kPanel<A>) : QT));
  w.delta = c.take<A>(QT);
  w.lse = c.take<A>(QT);
  w.S = c.take<A>(KB * QT);
  w.dP = c.take<A>(KB * QT);
  w.Z = c.take<A>(dropout ? KB * QT : 1);
  w.PZ = c.take<A>(dropout ? KB * QT : 1);
  w.dQ = c.take<A>(QT * s.Dp);
  w.dK = c.take<A>(ck * s.Dp);
  w.dV = c.take<A>(ck * s.Dvp);
  w.kbuf = c.take<A>(ck * s.Dp);
  // V's rows packed: converted (T != A), or padded for row_dots (few_queries)
  w.vbuf = c.take<A>(same_type<T, A>::value && !few_queries<A>(p) ? 1 : ck * s.Dvp);
  w.rpad = c.take<A>(p.rotation != nullptr ? D * s.Dp : 1);
  w.mbuf = c.take<A>(p.attn_mask_kind != AttentionParams::kMaskNone ? mask_buffer_elems(QT, KB) : 1);
  constexpr int W = VT<A>::W;
  w.qTp = c.take<A>(panels ? panel_elems<A>(D, ceil_div(QT, W)) : 1);
  w.qrowsp = c.take<A>(panels ? panel_elems<A>(QT, s.Dp / W) : 1);
  w.dorowsp = c.take<A>(panels ? panel_elems<A>(QT, s.Dvp / W) : 1);
  w.kpan = c.take<A>(panels ? panel_elems<A>(ck, s.Dp / W) : 1);
  if (bytes) *bytes = c.used;
  return w;
}

template <typename T, typename A>
void bwd_plan_fp(const AttentionBwdParams& p, Plan& plan, int64_t qt = 0) {
  const BwdShape s = bwd_shape<A>(p, qt > 0 ? qt : fp_query_tile(p));
  plan.param[1] = s.qt;
  plan.tasks = p.batch * p.heads_kv * s.nc;
  plan.flops_per_task = 5 * s.group * imax<int64_t>(p.seqlen_q, 1) * imax<int64_t>(s.chunk, 1) *
                        (p.head_dim + p.value_dim);
  carve_bwd<T, A>(nullptr, p, s, &plan.workspace_bytes);
  plan.shared_bytes =
      s.nc > 1 ? size_t(p.batch * p.heads * s.nc * s.tiles * s.qt * s.Dp) * sizeof(A) : 0;
  plan.reduce_tasks = s.nc > 1 ? p.batch * p.heads * s.tiles : 0;
}

// dq rows of one query tile from dQ' (rows of Dp, unscaled): dq = scale * dQ', then through the
// rotation for rotated rows (q' = R q  =>  dq = R^T dq', as rows dq = dq' R), converted and
// written. rpad: D * Dp.
template <typename T, typename A>
void finish_dq(const AttentionBwdParams& p, const BwdShape& s, int64_t b, int64_t h, int64_t i0,
               int64_t qn, A* dQ, A* tmp, A* rpad) {
  constexpr int W = VT<A>::W;
  const int64_t D = p.head_dim, Dp = s.Dp;
  if (p.rotation != nullptr) {
    const bool* sel =
        p.rotated_rows ? p.rotated_rows + b * p.rotated_rows_batch_stride + i0 : nullptr;
    int64_t idx[kMaxQueryTile];
    int64_t cnt = 0;
    for (int64_t l = 0; l < qn; ++l)
      if (sel == nullptr || sel[l]) idx[cnt++] = l;
    if (cnt > 0) {
      const A* R = ptr<A>(p.rotation) + h * p.rotation_head_stride;
      const int64_t rs = p.rotation_row_stride, cs = p.rotation_col_stride;
      A* g = tmp;              // [cnt][Dp] the selected rows of dQ'
      A* r = tmp + cnt * Dp;   // [cnt][Dp] times R
      for (int64_t c = 0; c < cnt; ++c)
        for (int64_t d = 0; d < Dp; ++d) g[c * Dp + d] = dQ[idx[c] * Dp + d];
      const bool rows_in_place = cs == 1 && D == Dp;
      if (rs == 1 && !rows_in_place && cnt * 4 <= W) {
        // R by columns, few rows: (dQ' R)[l][c] = dot(dQ'[l], R[:, c]), each column contiguous
        for (int64_t c = 0; c < cnt; ++c)
          for (int64_t d = 0; d < D; ++d) r[c * Dp + d] = dot(R + d * cs, g + c * Dp, D);
      } else {
        // (dQ' R)[l][c] = sum_a dQ'[l][a] R[a][c]: R's rows are the vector operand, read in
        // place when they are whole contiguous vectors, else copied (padded to Dp)
        const A* Rb = R;
        int64_t ldr = rs;
        if (!rows_in_place) {
          for (int64_t a = 0; a < D; ++a) {
            for (int64_t c = 0; c < D; ++c) rpad[a * Dp + c] = R[a * rs + c * cs];
            fill(rpad + a * Dp + D, Dp - D, A(0));
          }
          Rb = rpad;
          ldr = Dp;
        }
        gemm<A>(cnt, Dp / W, D, g, Dp, 1, Rb, ldr, r, Dp, Acc::kSet);
      }
      for (int64_t c = 0; c < cnt; ++c)
        for (int64_t d = 0; d < D; ++d) dQ[idx[c] * Dp + d] = r[c * Dp + d];
    }
  }
  const A scale = A(p.scale);
  T* dq = static_cast<T*>(p.dq) + b * p.dq_batch_stride + h * p.dq_head_stride;
  for (int64_t l = 0; l < qn; ++l) {
    A* row = dQ + l * Dp;
    for (int64_t d = 0; d < D; ++d) row[d] *= scale;
    store_row(dq + (i0 + l) * p.dq_row_stride, row, D);
  }
}

template <typename T, typename A>
void bwd_task_fp(const AttentionBwdParams& p, const BwdShape& s, int64_t task, BwdWork<A>& w,
                 A* shared) {
  using V = vec_t<A>;
  constexpr int W = VT<A>::W;
  const int64_t Hkv = p.heads_kv, Lq = p.seqlen_q, Lk = p.seqlen_k, D = p.head_dim;
  const int64_t Dv = p.value_dim, Dp = s.Dp, Dvp = s.Dvp;
  const int64_t c = task % s.nc, bk = task / s.nc, hk = bk % Hkv, b = bk / Hkv;
  const int64_t c0 = imin(Lk, c * s.chunk), c1 = imin(Lk, c0 + s.chunk), ck = c1 - c0;
  const A inf = std::numeric_limits<A>::infinity();
  const A scale = A(p.scale);
  const bool masked = has_masks(p), dropout = p.dropout_p > 0.0, skip_hidden = may_hide_blocks(p);

  const T* k = ptr<T>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride;
  const T* v = ptr<T>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride;
  // dK / dV of the chunk's keys: rows c0 .. set_end hold sums; a block's first product sets
  // the rows past set_end instead of adding to a zero-filled buffer (the same bits: the sums
  // start at +0 either way), and rows no query reaches are written as zeros at the end. Where
  // one (head, tile) visits every key (no GQA group, one tile) each block is final at once: it
  // is written out while it is in the cache or, where the gradients are of type A in rows of
  // whole vectors, the products write it in place (`direct`; dK's scale as the product's alpha,
  // the same rounding as scaling afterwards): 0.87-0.93x the time of forward + backward at
  // Lq = 1 and 40, bitwise the same.
  int64_t set_end = c0;
  const bool once = s.group == 1 && s.tiles == 1;
  const bool direct = once && same_type<T, A>::value && D == Dp && Dv == Dvp;
  const int64_t dk_at = b * p.dk_batch_stride + hk * p.dk_head_stride;
  const int64_t dv_at = b * p.dv_batch_stride + hk * p.dv_head_stride;
  T* dk = static_cast<T*>(p.dk) + dk_at;
  T* dv = static_cast<T*>(p.dv) + dv_at;
  A* dKc = direct ? static_cast<A*>(p.dk) + dk_at + c0 * p.dk_row_stride : w.dK;  // row c0
  A* dVc = direct ? static_cast<A*>(p.dv) + dv_at + c0 * p.dv_row_stride : w.dV;
  const int64_t ldK = direct ? p.dk_row_stride : Dp, ldV = direct ? p.dv_row_stride : Dvp;
  auto write_keys = [&](int64_t j1, int64_t j2) {  // rows j1 .. j2 of the chunk to dk, dv
    for (int64_t j = j1; j < j2; ++j) {
      if (direct) {  // only rows no block reached are left: zeros
        fill(dKc + (j - c0) * ldK, D, A(0));
        fill(dVc + (j - c0) * ldV, Dv, A(0));
        continue;
      }
      A* src = w.dK + (j - c0) * Dp;
      A* vsrc = w.dV + (j - c0) * Dvp;
      if (j >= set_end) {
        fill(src, D, A(0));
        fill(vsrc, Dv, A(0));
      }
      for (int64_t d = 0; d < D; ++d) src[d] *= scale;
      store_row(dk + j * p.dk_row_stride, src, D);
      store_row(dv + j * p.dv_row_stride, vsrc, Dv);
    }
  };
  // C rows j0 .. j0 + kn of a dK / dV product: those below set_end add, the others are set
  auto key_rows = [&](int64_t j0, int64_t kn, auto&& product) {
    const int64_t r = imin(kn, imax<int64_t>(0, set_end - j0));
    if (r > 0) product(int64_t(0), r, Acc::kAdd);
    if (r < kn) product(r, kn - r, Acc::kSet);
  };
  // the chunk's K (and V) rows, packed once for every query head and tile; V's rows padded as
  // well where the scores are taken by rows
  const bool by_rows = few_queries<A>(p);
  HeadRows<T, A> rows{w.kbuf, w.vbuf};
  rows.any_stride = by_rows;
  rows.ensure(p, k, v, bk, c0, c1, Dp, Dvp, by_rows);
  const bool wide = use_panels<A>(p);
  int64_t ldk0;
  const A* krows0 = rows.kB(c0, &ldk0);
  const BOperand<A> kP = panels_of<A>(krows0, ldk0, ck, Dp / W, wide, w.kpan);

  for (int64_t h = hk * s.group; h < (hk + 1) * s.group; ++h) {
    const int64_t bh = b * p.heads + h;
    const T* o = ptr<T>(p.out) + b * p.out_batch_stride + h * p.out_head_stride;
    const T* dout = ptr<T>(p.dout) + b * p.dout_batch_stride + h * p.dout_head_stride;
    const A* lse_bh = ptr<A>(p.lse) + bh * Lq;
    for (int64_t tile = 0; tile < s.tiles; ++tile) {
      const int64_t i0 = tile * s.qt, qn = imin(s.qt, Lq - i0);
      const int64_t nv = ceil_div(qn, W), lanes = nv * W;
      A* dQ = s.nc > 1 ? shared + ((bh * s.nc + c) * s.tiles + tile) * s.qt * Dp : w.dQ;
      fill(dQ, qn * Dp, A(0));
      const int64_t k_hi = imin(c1, causal_end(p, i0, qn));
      if (k_hi > c0) {
        pack_queries<T, A>(p, b, h, i0, qn, lanes, Dp, w.qT, w.qrows, w.tmp);
        for (int64_t l = 0; l < lanes; ++l) {
          A* dst = w.dorows + l * Dvp;
          if (l >= qn) {  // padding lanes: no probability, no gradient
            fill(dst, Dvp, A(0));
            w.delta[l] = A(0);
            w.lse[l] = inf;
            continue;
          }
          load_row(dst, dout + (i0 + l) * p.dout_row_stride, Dv);
          fill(dst + Dv, Dvp - Dv, A(0));
          w.delta[l] = row_delta(dst, o + (i0 + l) * p.out_row_stride, Dv, w.tmp);
          // a row that saw no key (lse = -inf) has no probability: exp(s - inf) = 0
          const A lse = lse_bh[i0 + l];
          w.lse[l] = lse == -inf ? inf : lse;
        }
        // dO^T (B of dP^T = V dO^T): transposed straight into panels where they are wanted
        const int64_t pw = wide && nv > kNV ? kPanel<A> : lanes;
        for (int64_t l0 = 0; l0 < lanes && !by_rows; l0 += pw)
          transpose(w.dorows + l0 * Dvp, Dvp, w.doT + l0 * Dv, pw, imin(pw, lanes - l0), Dv);
        const BOperand<A> doB{w.doT, pw, pw < lanes ? Dv * pw : 0};
        const BOperand<A> qB = panels_of<A>(w.qT, lanes, D, nv, wide, w.qTp);
        const BOperand<A> dorowsB = panels_of<A>(w.dorows, Dvp, qn, Dvp / W, wide, w.dorowsp);
        const BOperand<A> qrowsB = panels_of<A>(w.qrows, Dp, qn, Dp / W, wide, w.qrowsp);

        for (int64_t j0 = c0; j0 < k_hi; j0 += kKeyBlock) {
          const int64_t kn = imin(kKeyBlock, k_hi - j0);
          if (skip_hidden && block_hidden(p, b, h, i0, qn, j0, kn)) {
            // P = 0 for the whole tile: nothing to add. Rows no product has set yet are set to
            // zero here, so that the rows below set_end keep holding sums.
            for (int64_t j = imax(set_end, j0); j < j0 + kn; ++j) {
              fill(dKc + (j - c0) * ldK, Dp, A(0));
              fill(dVc + (j - c0) * ldV, Dvp, A(0));
            }
            set_end = imax(set_end, j0 + kn);
            if (once && !direct) write_keys(j0, j0 + kn);
            continue;
          }
          int64_t ldkA, ldvA;
          const A* kA = rows.kA(j0, &ldkA);
          const A* vA = by_rows ? rows.vR(j0, &ldvA) : rows.vA(p, v, j0, Dvp, &ldvA);
          if (by_rows)
            row_dots<A>(kn, qn, Dp, kA, ldkA, w.qrows, Dp, w.S, lanes, scale,
                        rows.v_packed ? nullptr : vA, ldvA,  // V for dP^T, as in the forward
                        rows.k_packed ? 0 : k_hi - j0);
          else
            gemm<A>(kn, nv, D, kA, ldkA, 1, qB, w.S, lanes, Acc::kSet, nullptr, scale);
          if (masked) apply_masks<T, A>(p, b, h, i0, qn, j0, kn, lanes, w.S, w.mbuf);
          // P^T = exp(S^T - lse)
          for (int64_t j = 0; j < kn; ++j)
            for (int64_t cv = 0; cv < nv; ++cv) {
              A* sp = w.S + j * lanes + cv * W;
              vstore(sp, exp2v((vload(sp) - vload(w.lse + cv * W)) * log2e<A>()));
            }
          // with dropout Z (0 or 1 / (1 - p)): the output used P Z, so dV = (P Z)^T dO and
          // dS = P (Z dP - delta), dP = dO V^T
          const A* PZ = w.S;
          if (dropout) {
            dropout_block<A>(p, b, h, i0, j0, kn, lanes, w.Z, false);
            for (int64_t i = 0; i < kn * lanes; i += W)
              vstore(w.PZ + i, vload(w.S + i) * vload(w.Z + i));
            PZ = w.PZ;
          }
          // dV += (P Z)^T dO
          key_rows(j0, kn, [&](int64_t r0, int64_t rn, Acc mode) {
            gemm<A>(rn, Dvp / W, qn, PZ + r0 * lanes, lanes, 1, dorowsB,
                    dVc + (j0 + r0 - c0) * ldV, ldV, mode);
          });
          // dP^T = V dO^T, then dS^T = P^T (Z dP^T - delta) in place
          if (by_rows)
            row_dots<A>(kn, qn, Dvp, vA, ldvA, w.dorows, Dvp, w.dP, lanes, A(1));
          else
            gemm<A>(kn, nv, Dv, vA, ldvA, 1, doB, w.dP, lanes, Acc::kSet);
          for (int64_t j = 0; j < kn; ++j)
            for (int64_t cv = 0; cv < nv; ++cv) {
              A* dp = w.dP + j * lanes + cv * W;
              V g = vload(dp);
              if (dropout) g *= vload(w.Z + j * lanes + cv * W);
              vstore(dp, vload(w.S + j * lanes + cv * W) * (g - vload(w.delta + cv * W)));
            }
          // dK += dS^T Q' (scaled at the end, or by alpha where direct) ; dQ' += dS K
          key_rows(j0, kn, [&](int64_t r0, int64_t rn, Acc mode) {
            gemm<A>(rn, Dp / W, qn, w.dP + r0 * lanes, lanes, 1, qrowsB,
                    dKc + (j0 + r0 - c0) * ldK, ldK, mode, nullptr, direct ? scale : A(1));
          });
          set_end = imax(set_end, j0 + kn);
          const int64_t SK = slice_keys<A>(p);
          for (int64_t s0 = 0; s0 < kn; s0 += SK)
            gemm<A>(qn, Dp / W, imin(SK, kn - s0), w.dP + s0 * lanes, 1, lanes,
                    from_row(kP, j0 + s0 - c0), dQ, Dp, Acc::kAdd);
          if (once && !direct) write_keys(j0, j0 + kn);
        }
      }
      if (s.nc == 1) finish_dq<T, A>(p, s, b, h, i0, qn, dQ, w.tmp, w.rpad);
    }
  }

  if (once)
    write_keys(set_end, c1);  // the keys no block reached (causal)
  else
    write_keys(c0, c1);
}

template <typename T, typename A>
void bwd_run_fp(const AttentionBwdParams& p, const Plan& plan, int64_t begin, int64_t end,
                void* ws, void* shared) {
  const BwdShape s = bwd_shape<A>(p, plan.param[1]);
  BwdWork<A> w = carve_bwd<T, A>(static_cast<char*>(ws), p, s, nullptr);
  for (int64_t t = begin; t < end; ++t) bwd_task_fp<T, A>(p, s, t, w, static_cast<A*>(shared));
}

// Second phase with several key chunks per head: task = (batch, head, query tile), sums the
// chunks' partial dQ' in chunk order.
template <typename T, typename A>
void bwd_reduce_fp(const AttentionBwdParams& p, const Plan& plan, int64_t begin, int64_t end,
                   void* ws, void* shared) {
  const BwdShape s = bwd_shape<A>(p, plan.param[1]);
  BwdWork<A> w = carve_bwd<T, A>(static_cast<char*>(ws), p, s, nullptr);
  const A* part = static_cast<const A*>(shared);
  const int64_t slot = s.qt * s.Dp;
  for (int64_t t = begin; t < end; ++t) {
    const int64_t tile = t % s.tiles, bh = t / s.tiles, h = bh % p.heads, b = bh / p.heads;
    const int64_t i0 = tile * s.qt, qn = imin(s.qt, p.seqlen_q - i0);
    const int64_t n = qn * s.Dp;
    fill(w.dQ, n, A(0));
    for (int64_t c = 0; c < s.nc; ++c) {
      const A* src = part + ((bh * s.nc + c) * s.tiles + tile) * slot;
      for (int64_t i = 0; i < n; ++i) w.dQ[i] += src[i];
    }
    finish_dq<T, A>(p, s, b, h, i0, qn, w.dQ, w.tmp, w.rpad);
  }
}

ROLLINGQ_KERNELS_END
