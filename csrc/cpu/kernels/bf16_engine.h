// Fused RollingQ attention for bfloat16 inputs on bf16 hardware: every matrix product is a bf16
// dot product with float32 accumulation (bf16_gemm.h: VDPBF16PS or AMX tiles); the softmax, the
// statistics, the masks and dropout run in float32 on the same score blocks as the float engine
// (fp_engine.h), whose pieces are reused.
//
// Layout (queries of a tile along lanes, as in the float engine):
//   forward   S^T = scale K Q^T       A = K rows (in place)      B = Q^T in pairs of d
//             O^T += V^T P^T          A = V^T (packed per head)  B = P^T in pairs of keys
//   backward  dV  += (P Z)^T dO       A = P^T rows               B = dO in pairs of queries
//             dP^T = V dO^T           A = V rows (in place)      B = dO^T in pairs of dv
//             dK  += dS^T Q'          A = dS^T rows              B = Q' in pairs of queries
//             dQ'^T += K^T dS^T       A = K^T (packed per chunk) B = dS^T in pairs of keys
// The products are cut by shape only and reduce every element in a fixed order: results do not
// depend on the number of threads.
#pragma once

#include "cpu/kernels/bf16_gemm.h"
#include "cpu/kernels/fp_engine.h"

ROLLINGQ_KERNELS_BEGIN

// The bf16 engine needs even head dims (a bf16 pair is the unit of the dot products); the float
// engine takes the others, and calls of a few queries: its tiles are at least 32 lanes wide,
// where the float engine takes their scores by rows (few_queries).
inline bool bf16_engine_applies(const AttentionParams& p) {
  return p.head_dim % 2 == 0 && p.value_dim % 2 == 0 && !few_queries<float>(p);
}

inline int64_t bf16_lanes(int64_t qn) { return round_up(qn, 32); }

// Queries per tile of the bf16 forward: 128 (twice the float engine's: each tile re-reads the
// head's packed K and V^T, and the products' per-call overhead is spread over more lanes), 256
// for wide heads as in the float engine.
inline int64_t bf16_query_tile(const AttentionParams& p) {
  return wide_head(p) ? kWideQueryTile : 128;
}

// Keys per online-softmax step of the bf16 forward: the output accumulator O^T goes through
// memory once per step (the tile unit holds 8 tiles) and the tile unit drains between the
// products and the softmax, so steps are longer than the float engine's (256 measured ahead of
// 128).
constexpr int64_t kBf16KeyBlock = 256;

// ---- forward ---------------------------------------------------------------------------------

// The probabilities of keys j (even) and j + 1 for 16 lanes, rounded to bf16 and stored as 16
// pairs: dst[2 l] = even[l], dst[2 l + 1] = odd[l].
inline __m512i key_pair(__m512 even, __m512 odd) {
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9,
                                              24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17,
                                              1, 16, 0);
  const __m512bh both = _mm512_cvtne2ps_pbh(odd, even);
  return _mm512_permutexvar_epi16(interleave, (__m512i)both);
}
inline void store_key_pair(bf16* dst, __m512 even, __m512 odd) {
  _mm512_storeu_si512(dst, key_pair(even, odd));
}

// The softmax's probabilities straight into bf16 pairs of keys (the B operand of O^T += V^T P^T):
// pv[(j / 2) * 2 lanes + 2 lane + j % 2]; no float copy is stored.
template <bool Raw>
struct StorePairs {
  static constexpr bool kStoresF32 = false;
  static constexpr bool kCoarseExp = true;
  static constexpr bool kRawScores = Raw;
  static constexpr bool kLazyMax = true;
  bf16* pv;
  float* save;  // (1 + modalities) x kSoftmaxGroup vectors: softmax_cols' undo buffer
  int64_t lanes;
  float scale;
  __m512 prev[kSoftmaxGroup];
  float raw_scale() const { return scale; }
  template <int G>
  void row(float*, int64_t j, int64_t v0, const vec_t<float> (&e)[G]) {
    if ((j & 1) == 0) {
      for (int g = 0; g < G; ++g) prev[g] = (__m512)e[g];
      return;
    }
    store<G>(j - 1, v0, e);
  }
  template <int G>
  void store(int64_t j, int64_t v0, const vec_t<float> (&e)[G]) {
    bf16* dst = pv + (j / 2) * 2 * lanes + 2 * 16 * v0;
    for (int g = 0; g < G; ++g) store_key_pair(dst + 32 * g, prev[g], (__m512)e[g]);
  }
  template <int G>
  void finish(int64_t kn, int64_t v0) {
    if (kn & 1) {
      vec_t<float> zero[G];
      for (int g = 0; g < G; ++g) zero[g] = vec_t<float>{};
      store<G>(kn - 1, v0, zero);
    }
  }
};

// Q^T of the query tile i0 .. i0 + qn in bf16 pairs of d, the B operand of S^T = K Q^T:
// qv[(d / 2) * 2 lanes + 2 l + d % 2] = q_l[d], lanes >= qn zero. Two adjacent bf16 of a query
// row are one 32-bit word, so this is the transpose of the rows' words, with no conversion to
// float; rotated rows are rotated in float (rotate_selected) and rounded to bf16 as pack_vnni
// rounds. Rows that are not 4-byte aligned return false (the caller packs through float).
inline bool pack_query_pairs(const AttentionParams& p, int64_t b, int64_t h, int64_t i0,
                             int64_t qn, int64_t lanes, bf16* qv, float* tmp) {
  const int64_t D = p.head_dim, Dw = D / 2;
  const bf16* q = ptr<bf16>(p.q) + b * p.q_batch_stride + h * p.q_head_stride + i0 * p.q_row_stride;
  if ((reinterpret_cast<uintptr_t>(q) & 3) != 0 || (p.q_row_stride & 1) != 0) return false;
  word32* qw = reinterpret_cast<word32*>(qv);
  transpose(reinterpret_cast<const word32*>(q), p.q_row_stride / 2, qw, lanes, qn, Dw);
  for (int64_t c = 0; c < Dw; ++c)
    for (int64_t l = qn; l < lanes; ++l) qw[c * lanes + l] = 0;
  int64_t idx[kMaxQueryTile];
  const RotatedRows<float> rr = rotate_selected<float>(
      p, b, h, i0, qn,
      [&](int64_t l, float* dst, int64_t st) {
        const bf16* row = q + l * p.q_row_stride;
        for (int64_t d = 0; d < D; ++d) dst[d * st] = bf16_to_float(row[d]);
      },
      tmp, idx);
  alignas(64) float f[16];
  alignas(32) bf16 h16[16];
  for (int64_t c = 0; c < rr.cnt; ++c)
    for (int64_t d0 = 0; d0 < D; d0 += 16) {
      const int64_t n = imin<int64_t>(16, D - d0);
      for (int64_t d = 0; d < 16; ++d) f[d] = d < n ? rr.at(c, d0 + d) : 0.0f;
      _mm256_store_si256(reinterpret_cast<__m256i*>(h16),
                         (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(f)));
      for (int64_t d = 0; d < n; ++d)
        qv[((d0 + d) / 2) * 2 * lanes + 2 * idx[c] + (d0 + d) % 2] = h16[d];
    }
  return true;
}

// ---- scores and softmax in registers (VDPBF16PS) ----------------------------------------------
//
// Where the products are VDPBF16PS (G::kFusedSoftmax), a key step with no mask or dropout whose
// lanes all have a finite running max does not store its scores: each register block of raw dot
// products (6 keys x 64 lanes) goes straight through softmax_cols' single pass against the
// settled max (the exponent folded into one FMA) into the bf16 pairs of P^T. The operations and
// their order are softmax_cols', so the probabilities' bits are those of the stored path; the
// exponent keeps subnormal results (exp2v_coarse_subnormal), which only the row sums see. If a
// probability exceeds the lazy max's headroom (the test is on the bf16 pairs, one integer max per
// two keys instead of a float max per key), its column group is done again the stored way. This
// saves the store and reload of the scores (128 KiB per 256-key step of 128 queries), and the two
// instructions saved per 16 scores made the forward 0.3-1.2 % faster. The first step of a tile
// runs so too, against a max seeded from key 0 (seed_running_max). Where it declines (a seed
// not finite or past kFoldLimit) the first step is stored and cut to kFirstStep keys: 128
// measured within 0.5 % of 64 in time, and with 64 the largest error at (4, 8, 1024, 64) was
// 1.55x SDPA's on average over six seeds against 1.31x for 128 and for whole 256-key steps.
constexpr int64_t kFirstStep = 128;

struct alignas(64) FusedSoftmax {
  __m512 c_sub[kSoftmaxGroup];  // running max * log2(e), per vector of lanes
  __m512 run[kSoftmaxGroup];    // sum of the current run of keys of one modality
  __m512i pm[kSoftmaxGroup];    // max of the bf16 probabilities (pairs of keys, as integers)
  __m512 c_mul;                 // scale * log2(e)
  float* l;                     // row sums and masses at the group's first lane
  float* mass;
  int64_t lanes;
  int32_t cur;  // modality of the current run (-1: none)
  template <int NV>
  void flush() {
    for (int v = 0; v < NV; ++v) {
      float* lp = l + 16 * v;
      _mm512_storeu_ps(lp, _mm512_add_ps(_mm512_loadu_ps(lp), run[v]));
      if (cur >= 0) {
        float* mp = mass + cur * lanes + 16 * v;
        _mm512_storeu_ps(mp, _mm512_add_ps(_mm512_loadu_ps(mp), run[v]));
      }
      run[v] = _mm512_setzero_ps();
    }
  }
};

// MR keys (rows of K from a) x NV vectors of lanes (Q^T pairs from b): the products as
// bf16_micro_kernel's, then the softmax of each key in order, its probabilities stored as
// StorePairs stores them (MR odd only for the last keys of all: the last one pairs with zero).
// Not the backward's bf16_block_epilogue: as an epilogue passed by value, the running max and
// sums went through stack copies and the forward took 1.05-1.16x the time (processes alternated).
template <int MR, int NV>
__attribute__((noinline)) void scores_softmax_kernel(int64_t K, const bf16* a, int64_t lda,
                                                     const bf16* b, int64_t ldb,
                                                     const int32_t* ids, bf16* pv, int64_t ldp,
                                                     FusedSoftmax& st) {
  using V = vec_t<float>;
  __m512 acc[MR][NV];
  bf16_dot_block_from_zero<MR, NV>(K, a, lda, b, ldb, acc);
  const V c_mul = (V)st.c_mul;
  __m512 prev[NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    if (ids != nullptr && ids[r] != st.cur) {
      st.flush<NV>();
      st.cur = ids[r];
    }
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      const V s = (V)acc[r][v];
      const V t = s * c_mul - (V)st.c_sub[v];
      const __m512 e = (__m512)exp2v_coarse_subnormal(t);
      st.run[v] = (__m512)((V)st.run[v] + (V)e);
      if (r % 2 == 0 && r + 1 < MR) {
        prev[v] = e;
        continue;
      }
      const __m512i pair = r % 2 == 1 ? key_pair(prev[v], e) : key_pair(e, _mm512_setzero_ps());
      st.pm[v] = _mm512_max_epu16(st.pm[v], pair);  // positive bf16 order as unsigned integers
      _mm512_storeu_si512(pv + (r / 2) * ldp + 32 * v, pair);
    }
  }
}

template <int NV, int R = 6>
inline void scores_softmax_rows(int64_t rem, int64_t K, const bf16* a, int64_t lda, const bf16* b,
                                int64_t ldb, const int32_t* ids, bf16* pv, int64_t ldp,
                                FusedSoftmax& st) {
  if constexpr (R > 0) {
    if (rem == R)
      scores_softmax_kernel<R, NV>(K, a, lda, b, ldb, ids, pv, ldp, st);
    else
      scores_softmax_rows<NV, R - 1>(rem, K, a, lda, b, ldb, ids, pv, ldp, st);
  }
}

// The column group of NV vectors of lanes from v0, keys j0 .. j0 + kn (K rows at krows) in
// registers. False, with the row sums and masses put back, when the exponent cannot be folded
// or the step's max would move the running max: the caller does the group the stored way.
template <int NV>
bool fused_scores_softmax(const AttentionParams& p, int64_t b, int64_t j0, int64_t kn,
                          int64_t lanes, int64_t v0, const bf16* krows, const bf16* qv, bf16* pv,
                          const float* m, float* l, float* alpha, float* mass, float* save) {
  using V = vec_t<float>;
  const int M = p.num_modalities;
  const float c_mul = float(p.scale) * log2e<float>();
  FusedSoftmax st;
  st.c_mul = _mm512_set1_ps(c_mul);
  bool fold = std::isfinite(c_mul) && c_mul != 0.0f;
  for (int v = 0; v < NV; ++v) {
    const V cs = vload(m + (v0 + v) * 16) * log2e<float>();
    fold &= !any_lane(not_finite<float>(cs));
    st.c_sub[v] = (__m512)cs;
    st.run[v] = _mm512_setzero_ps();
    st.pm[v] = _mm512_setzero_si512();
  }
  if (!fold) return false;
  st.l = l + v0 * 16;
  st.mass = mass + v0 * 16;
  st.lanes = lanes;
  st.cur = -1;
  for (int v = 0; v < NV; ++v) {
    vstore(save + v * 16, vload(st.l + v * 16));
    for (int mm = 0; mm < M; ++mm)
      vstore(save + ((1 + mm) * NV + v) * 16, vload(st.mass + mm * lanes + v * 16));
  }
  const int32_t* ids = M > 0 ? p.key_modality + b * p.key_modality_batch_stride + j0 : nullptr;
  const int64_t D = p.head_dim;
  for (int64_t r0 = 0; r0 < kn; r0 += 6)
    scores_softmax_rows<NV>(imin<int64_t>(6, kn - r0), D, krows + r0 * D, D, qv + 2 * 16 * v0,
                            2 * lanes, ids ? ids + r0 : nullptr,
                            pv + (r0 / 2) * 2 * lanes + 2 * 16 * v0, 2 * lanes, st);
  st.flush<NV>();
  // The lazy max stays where no probability exceeds 2^kLazyMaxLog2 (its bf16 bits, 0x4380 for
  // 256: NaN's bits are above it, so NaN goes the stored way too).
  static_assert(kLazyMaxLog2 == 8.0f, "the limit below is bf16(2^8)");
  const __m512i limit = _mm512_set1_epi32(0x4380), low = _mm512_set1_epi32(0xffff);
  bool stays = true;
  for (int v = 0; v < NV; ++v) {
    const __m512i both =
        _mm512_max_epu32(_mm512_and_si512(st.pm[v], low), _mm512_srli_epi32(st.pm[v], 16));
    stays &= _mm512_cmpgt_epu32_mask(both, limit) == 0;
  }
  if (stays) {
    for (int v = 0; v < NV; ++v) vstore(alpha + (v0 + v) * 16, vbcast(1.0f));
    return true;
  }
  for (int v = 0; v < NV; ++v) {
    vstore(st.l + v * 16, vload(save + v * 16));
    for (int mm = 0; mm < M; ++mm)
      vstore(st.mass + mm * lanes + v * 16, vload(save + ((1 + mm) * NV + v) * 16));
  }
  return false;
}

inline int64_t bf16_key_blocks(const AttentionParams& p) {
  return ceil_div(imax<int64_t>(p.seqlen_k, 1), kBf16KeyBlock);
}

// Whether the forward multiplies K's rows where they lie (row stride D) instead of a copy (kp).
inline bool bf16_k_in_place(const AttentionParams& p) { return p.k_row_stride == p.head_dim; }

struct Bf16FwdWork {
  float *qT, *tmp, *S, *OT, *orows, *m, *l, *alpha, *mass, *mbuf, *save;
  bf16 *qv, *pv, *kp, *vT;
  word32* pairs;
};

inline Bf16FwdWork carve_bf16_fwd(char* base, const AttentionParams& p, int64_t QT, size_t* bytes) {
  const int64_t D = p.head_dim, Dv = p.value_dim, KB = kBf16KeyBlock;
  const int64_t Dvp = round_up(Dv, 16), Lkp = bf16_key_blocks(p) * KB;
  Carve c{base};
  Bf16FwdWork w;
  w.qT = c.take<float>(D * QT);
  w.tmp = c.take<float>(2 * D * QT);
  w.S = c.take<float>(KB * QT);
  w.OT = c.take<float>(Dv * QT);
  w.orows = c.take<float>(QT * Dvp);
  w.m = c.take<float>(QT);
  w.l = c.take<float>(QT);
  w.alpha = c.take<float>(QT);
  w.mass = c.take<float>(imax(p.num_modalities, 1) * QT);
  w.save = c.take<float>((1 + p.num_modalities) * kSoftmaxGroup * 16);
  w.mbuf = c.take<float>(p.attn_mask_kind != AttentionParams::kMaskNone ? mask_buffer_elems(QT, KB) : 1);
  w.qv = c.take<bf16>(round_up(D, 2) * QT);
  w.pv = c.take<bf16>(round_up(KB, 32) * QT);
  w.kp = c.take<bf16>(bf16_k_in_place(p) ? 1 : p.head_dim * Lkp);
  w.vT = c.take<bf16>(Dv * bf16_key_blocks(p) * KB);
  w.pairs = c.take<word32>(16 * round_up(Dv, 32));
  if (bytes) *bytes = c.used;
  return w;
}

// K and V^T of one kv head, made ready lazily for the key range asked so far and reused by every
// query tile (and every query head of a GQA group):
//   K   rows with row stride D: read in place when the tensor has them so, else copied into kp
//       (in a (B, L, H, D) layout rows lie heads * D apart, a power of two that maps a key
//       block's rows onto a few L1 sets, and the tile loads missed);
//   vT  V^T in key blocks of kBf16KeyBlock: block c is Dv rows of kBf16KeyBlock keys (row stride
//       kBf16KeyBlock), contiguous; one long transposed row per d put all Dv rows of a block at
//       the same L1 sets for long sequences. Keys past Lk are zero. Built by transpose_pairs
//       (through `pairs`, 16 x round_up(Dv, 32) words), no conversion to float.
struct HeadPacked {
  bf16* kp;
  bf16* vT;
  word32* pairs;
  const bf16* krows = nullptr;  // K's rows for the products, row stride D
  int64_t key = -1, end = 0;
  void ensure(const AttentionParams& p, const bf16* k, const bf16* v, int64_t bk, int64_t j1) {
    const int64_t KB = kBf16KeyBlock, Dv = p.value_dim, D = p.head_dim, Lk = p.seqlen_k;
    const int64_t vs = p.v_row_stride;
    const bool k_in_place = bf16_k_in_place(p);
    if (key != bk) {
      key = bk;
      end = 0;
      krows = k_in_place ? k : kp;
      const int64_t last = (bf16_key_blocks(p) - 1) * KB;  // first key of the last block
      for (int64_t d = 0; d < Dv; ++d)
        std::memset(vT + last * Dv + d * KB + (Lk - last), 0, size_t(last + KB - Lk) * sizeof(bf16));
    }
    if (j1 <= end) return;
    if (!k_in_place) {
      const RowsAhead<bf16> k_ahead(k, p.k_row_stride, Lk, D);
      for (int64_t j = end; j < j1; ++j) {
        k_ahead.at(j);
        std::memcpy(kp + j * D, k + j * p.k_row_stride, size_t(D) * sizeof(bf16));
      }
    }
    while (end < j1) {  // block by block; `end` is even unless it is Lk
      const int64_t c0 = end / KB * KB, stop = imin(j1, c0 + KB);
      // stop is even unless it is Lk: only the last key of all lacks a partner
      word32* block = reinterpret_cast<word32*>(vT + c0 * Dv);
      transpose_pairs(v + end * vs, vs, stop - end, Dv, block + (end - c0) / 2, KB / 2, pairs,
                      Lk - end);
      end = stop;
    }
  }
  const bf16* vblock(const AttentionParams& p, int64_t j0) const { return vT + j0 * p.value_dim; }
};

// Zero pairs of P^T from key round_up(kn, 2) up to knp (the product runs over knp keys).
inline void zero_pair_rows(bf16* pv, int64_t kn, int64_t knp, int64_t lanes) {
  for (int64_t j = round_up(kn, 2); j < knp; j += 2)
    std::memset(pv + j * lanes, 0, size_t(2 * lanes) * sizeof(bf16));
}

// The softmax of a step whose scores are in w.S (masked, scaled unless raw): probabilities to
// w.pv in bf16 pairs of keys, zero pairs up to knp. Returns whether a running max moved.
inline bool stored_softmax_step(const AttentionParams& p, int64_t b, int64_t h, int64_t i0,
                                int64_t j0, int64_t kn, int64_t knp, int64_t lanes, bool raw,
                                Bf16FwdWork& w) {
  if (p.dropout_p > 0.0) {
    const bool moved = softmax_block<float>(p, b, j0, kn, lanes, w.S, w.m, w.l, w.alpha, w.mass);
    dropout_block<float>(p, b, h, i0, j0, kn, lanes, w.S, true);
    pack_vnni(w.S, lanes, kn, knp, lanes, w.pv);
    return moved;
  }
  const bool moved =
      raw ? softmax_block<float>(p, b, j0, kn, lanes, w.S, w.m, w.l, w.alpha, w.mass,
                                 StorePairs<true>{w.pv, w.save, lanes, float(p.scale), {}})
          : softmax_block<float>(p, b, j0, kn, lanes, w.S, w.m, w.l, w.alpha, w.mass,
                                 StorePairs<false>{w.pv, w.save, lanes, 1.0f, {}});
  zero_pair_rows(w.pv, kn, knp, lanes);
  return moved;
}

// One column group (NV vectors of lanes from v0) of a settled raw step: in registers, or, where
// that declines, its scores stored and softmax_cols run on them. Returns whether the group's
// running max moved.
template <typename G, int NV>
bool fused_group_step(const AttentionParams& p, int64_t b, int64_t j0, int64_t kn, int64_t lanes,
                      int64_t v0, const bf16* krows, Bf16FwdWork& w) {
  if (fused_scores_softmax<NV>(p, b, j0, kn, lanes, v0, krows, w.qv, w.pv, w.m, w.l, w.alpha,
                               w.mass, w.save))
    return false;
  G::gemm(kn, 16 * NV, p.head_dim, krows, p.head_dim, w.qv + 2 * 16 * v0, 2 * lanes,
          w.S + 16 * v0, lanes, Acc::kSet, 1.0f);
  StorePairs<true> out{w.pv, w.save, lanes, float(p.scale), {}};
  return softmax_cols<float, NV>(p, b, j0, kn, lanes, v0, w.S, w.m, w.l, w.alpha, w.mass, out);
}

// The running max of a tile's lanes before its first step, where the products are VDPBF16PS:
// key 0's scaled score + kSeedAbove (natural-log units). Every step, the first included, then
// takes its scores in registers (fused_group_step): a key up to kSeedAbove + 8 ln 2 = 45.5 above
// key 0 stays inside the lazy max's headroom, one further above moves the max the stored way.
// The offset costs no precision: key 0's own probability, e^-kSeedAbove, bounds the row's
// largest from below, and a probability that leaves the normal floats (below e^-87) is then
// under e^-47 of it. False (the max left at -inf) where a lane's seed is not finite (a NaN or
// inf in key 0 or the queries, a scale that overflows) or beyond kFoldLimit; the first step is
// then stored.
constexpr float kSeedAbove = 40.0f;

template <typename G>
bool seed_running_max(const AttentionParams& p, int64_t lanes, const bf16* krows, Bf16FwdWork& w) {
  G::gemm(1, lanes, p.head_dim, krows, p.head_dim, w.qv, 2 * lanes, w.S, lanes, Acc::kSet, 1.0f);
  const float scale = float(p.scale);
  bool finite = true;
  for (int64_t l = 0; l < lanes; ++l) {
    w.m[l] = w.S[l] * scale + kSeedAbove;
    finite &= within_fold_limit(w.m[l]);
  }
  if (!finite) fill(w.m, lanes, -std::numeric_limits<float>::infinity());
  return finite;
}

// A query tile's key loop: O^T, m, l and the masses from zero over keys [0, k_end). With `raw`
// (no masks, no dropout, a positive scale) the softmax scales the dot products itself, one FMA
// per score it computes anyway, instead of a pass over the block; that holds only while every
// running max stays within kFoldLimit. Returns false as soon as one leaves it (scores that large
// come from inputs or scales far outside what attention meets): the caller then runs the loop
// again with raw = false, scaled and rounded scores.
template <typename G>
bool bf16_fwd_key_steps(const AttentionParams& p, int64_t b, int64_t h, int64_t i0, int64_t qn,
                        int64_t lanes, int64_t k_end, bool raw, Bf16FwdWork& w, HeadPacked& hp) {
  const int64_t D = p.head_dim, Dv = p.value_dim, hk = kv_head(p, h);
  const bf16* k = ptr<bf16>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride;
  const bf16* v = ptr<bf16>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride;
  const bool masked = has_masks(p), skip_hidden = may_hide_blocks(p);
  fill(w.OT, Dv * lanes, 0.0f);
  fill(w.m, lanes, -std::numeric_limits<float>::infinity());
  fill(w.l, lanes, 0.0f);
  fill(w.mass, p.num_modalities * lanes, 0.0f);
  // Steps end at the packed key blocks' ends. With fused steps the running max is seeded from
  // key 0 (seed_running_max); where that declines, the first step is stored and kFirstStep long.
  const bool fuse = G::kFusedSoftmax && raw;
  bool seeded = false;
  if (fuse && k_end > 0) {
    const int64_t first = round_up(imin(kBf16KeyBlock, k_end), 32);
    hp.ensure(p, k, v, b * p.heads_kv + hk, imin(p.seqlen_k, first));
    seeded = seed_running_max<G>(p, lanes, hp.krows, w);
  }
  for (int64_t j0 = 0, kn = 0; j0 < k_end; j0 += kn) {
    const int64_t off = j0 % kBf16KeyBlock;
    kn = imin(fuse && j0 == 0 && !seeded ? kFirstStep : kBf16KeyBlock - off, k_end - j0);
    const int64_t knp = round_up(kn, 32);
    hp.ensure(p, k, v, b * p.heads_kv + hk, imin(p.seqlen_k, j0 + knp));
    if (skip_hidden && block_hidden(p, b, h, i0, qn, j0, kn)) continue;
    bool moved = false;
    if (fuse && (j0 > 0 || seeded)) {
      const bf16* kr = hp.krows + j0 * D;
      const int64_t nv = lanes / 16;  // even: lanes is a multiple of 32
      for (int64_t v0 = 0; v0 < nv; v0 += kSoftmaxGroup)
        moved |= nv - v0 >= 4 ? fused_group_step<G, 4>(p, b, j0, kn, lanes, v0, kr, w)
                              : fused_group_step<G, 2>(p, b, j0, kn, lanes, v0, kr, w);
      zero_pair_rows(w.pv, kn, knp, lanes);
    } else {
      G::gemm(kn, lanes, D, hp.krows + j0 * D, D, w.qv, 2 * lanes, w.S, lanes, Acc::kSet,
              raw ? 1.0f : float(p.scale));
      if (masked) apply_masks<bf16, float>(p, b, h, i0, qn, j0, kn, lanes, w.S, w.mbuf);
      moved = stored_softmax_step(p, b, h, i0, j0, kn, knp, lanes, raw, w);
    }
    if (raw && !all_within_fold_limit(w.m, lanes)) return false;
    // O^T = O^T * alpha + V^T P^T (alpha is 1 everywhere once the running maxima settle)
    if (moved)
      for (int64_t d = 0; d < Dv; ++d)
        for (int64_t l = 0; l < lanes; l += 16)
          _mm512_storeu_ps(w.OT + d * lanes + l,
                           _mm512_mul_ps(_mm512_loadu_ps(w.OT + d * lanes + l),
                                         _mm512_loadu_ps(w.alpha + l)));
    G::gemm(Dv, lanes, knp, hp.vblock(p, j0 - off) + off, kBf16KeyBlock, w.pv, 2 * lanes, w.OT,
            lanes, Acc::kAdd);
  }
  return true;
}

template <typename G>
void bf16_fwd_task(const AttentionParams& p, int64_t task, int64_t tiles, int64_t qt,
                   Bf16FwdWork& w, HeadPacked& hp, bool stream) {
  const int64_t H = p.heads, Lq = p.seqlen_q, D = p.head_dim, Dv = p.value_dim;
  const int64_t Dvp = round_up(Dv, 16);
  const int M = p.num_modalities;
  const int64_t tile = task % tiles, bh = task / tiles, h = bh % H, b = bh / H;
  if (M > 0 && tile == 0) key_stats<bf16, float>(p, b, h, h == 0);
  const int64_t i0 = tile * qt, qn = imin(qt, Lq - i0);
  if (qn <= 0) return;
  const int64_t lanes = bf16_lanes(qn);
  const float inf = std::numeric_limits<float>::infinity();

  if (!pack_query_pairs(p, b, h, i0, qn, lanes, w.qv, w.tmp)) {
    pack_queries<bf16, float>(p, b, h, i0, qn, lanes, 0, w.qT, nullptr, w.tmp);
    pack_vnni(w.qT, lanes, D, round_up(D, 2), lanes, w.qv);
  }
  const bool raw = !has_masks(p) && p.dropout_p == 0.0 && p.scale > 0.0;
  const int64_t k_end = causal_end(p, i0, qn);
  if (!bf16_fwd_key_steps<G>(p, b, h, i0, qn, lanes, k_end, raw, w, hp))
    bf16_fwd_key_steps<G>(p, b, h, i0, qn, lanes, k_end, false, w, hp);

  bf16* out = static_cast<bf16*>(p.out) + b * p.out_batch_stride + h * p.out_head_stride +
              i0 * p.out_row_stride;
  const int64_t row0 = (b * H + h) * Lq + i0;
  float* lse = static_cast<float*>(p.lse) + row0;
  float* mass_out = M > 0 ? static_cast<float*>(p.modality_mass) + row0 * M : nullptr;
  transpose(w.OT, lanes, w.orows, Dvp, Dv, qn);
  for (int64_t i = 0; i < qn; ++i) {
    const float L = w.l[i];
    const float inv = L == 0.0f ? 0.0f : 1.0f / L;
    float* orow = w.orows + i * Dvp;
    if (L == 0.0f && !row_sees_a_key(p, b, h, i0 + i)) {
      fill(orow, Dv, 0.0f);  // no key: zeros, even where a hidden value is NaN
    } else {
      for (int64_t d = 0; d < Dv; ++d) orow[d] *= inv;
    }
    if (stream)
      stream_row(out + i * p.out_row_stride, orow, Dv);
    else
      store_row(out + i * p.out_row_stride, orow, Dv);
    lse[i] = L == 0.0f ? -inf : w.m[i] + alog(L);
    for (int mm = 0; mm < M; ++mm) mass_out[i * M + mm] = w.mass[mm * lanes + i] * inv;
  }
}

inline void bf16_fwd_plan(const AttentionParams& p, Plan& plan) {
  const int64_t qt = balanced_query_tile(p, bf16_query_tile(p), 32, plan.threads);
  const int64_t tiles = imax<int64_t>(1, ceil_div(p.seqlen_q, qt));
  plan.tasks = p.batch * p.heads * tiles;
  plan.flops_per_task = 2 * imin(qt, imax<int64_t>(p.seqlen_q, 1)) *
                        imax<int64_t>(p.seqlen_k, 1) * (p.head_dim + p.value_dim + 1);
  carve_bf16_fwd(nullptr, p, qt, &plan.workspace_bytes);
  plan.param[0] = tiles;
  plan.task_group = tiles;
  plan.param[1] = qt;
}

template <typename G>
void bf16_fwd_run(const AttentionParams& p, const Plan& plan, int64_t begin, int64_t end,
                  void* ws) {
  const int64_t qt = plan.param[1];
  Bf16FwdWork w = carve_bf16_fwd(static_cast<char*>(ws), p, qt, nullptr);
  HeadPacked hp{w.kp, w.vT, w.pairs};
  G::begin();
  const bool stream = stream_output<bf16>(p, plan.stream_bytes);
  for (int64_t t = begin; t < end; ++t) bf16_fwd_task<G>(p, t, plan.param[0], qt, w, hp, stream);
  if (stream) stream_fence();
  G::end();
}

// ---- backward --------------------------------------------------------------------------------

// Where the products are VDPBF16PS (G::kFusedSoftmax) and there is no mask or dropout, the two
// products whose results the backward only transforms elementwise keep them in registers:
//   P   = 2^(s * scale * log2(e) - lse * log2(e))  from each register block of S^T = K Q^T (one
//         FMA folds scale and lse, as the forward folds its running max), stored once in float
//         (dS needs it) and once in bf16 rows (the A operand of dV += P^T dO);
//   dS  = P (dP - delta)                           from each block of dP^T = V dO^T, stored only
//         in bf16: as rows (dK += dS^T Q') and as pairs of keys (dQ'^T += K^T dS^T)
// (bf16_product_epilogue with ProbsEpilogue and DScoresEpilogue). This saves a store and a reload
// of both float blocks and the three passes that converted them: forward + backward 0.96x the
// time at head dim 64 (docs/performance.md). Masks and dropout take the stored path, which applies
// them between the product and the exponent.

// One register block of MR keys x NV vectors of lanes: the products as bf16_micro_kernel's, then
// epi.apply(r, v, acc) for every register in key order. The epilogue is a copy local to the
// block, so what it carries from key to key (a pair's first half) stays in registers.
template <int MR, int NV, typename Epi>
__attribute__((noinline)) void bf16_block_epilogue(int64_t K, const bf16* a, int64_t lda,
                                                   const bf16* b, int64_t ldb, Epi epi) {
  __m512 acc[MR][NV];
  bf16_dot_block_from_zero<MR, NV>(K, a, lda, b, ldb, acc);
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) epi.template apply<MR>(r, v, acc[r][v]);
}

template <int NV, typename Epi, int R = 6>
inline void bf16_rows_epilogue(int64_t rem, int64_t K, const bf16* a, int64_t lda, const bf16* b,
                               int64_t ldb, const Epi& epi) {
  if constexpr (R > 0) {
    if (rem == R)
      bf16_block_epilogue<R, NV>(K, a, lda, b, ldb, epi);
    else
      bf16_rows_epilogue<NV, Epi, R - 1>(rem, K, a, lda, b, ldb, epi);
  }
}

// C^T = A B for keys 0 .. kn (A's rows at a, row stride lda; B in pairs, row stride 2 lanes) and
// every lane (a multiple of 32), in 4- or 2-vector column groups of 6-key register blocks, each
// block handed to the epilogue epi.block(first key, first lane vector) returns.
template <typename Epi>
void bf16_product_epilogue(int64_t kn, int64_t lanes, int64_t K, const bf16* a, int64_t lda,
                           const bf16* b, const Epi& epi) {
  for (int64_t v0 = 0; v0 < lanes / 16; v0 += 4) {
    const bool four = lanes / 16 - v0 >= 4;
    for (int64_t r0 = 0; r0 < kn; r0 += 6) {
      const int64_t rem = imin<int64_t>(6, kn - r0);
      const Epi e = epi.block(r0, v0);
      if (four)
        bf16_rows_epilogue<4>(rem, K, a + r0 * lda, lda, b + 32 * v0, 2 * lanes, e);
      else
        bf16_rows_epilogue<2>(rem, K, a + r0 * lda, lda, b + 32 * v0, 2 * lanes, e);
    }
  }
}

// P = 2^(s c_mul - l2) of raw dot products s, l2 = lse * log2(e) per lane (+inf on padding lanes
// and rows without a visible key: P = 0 there): float rows to P, bf16 rows to pb (row stride ld).
struct ProbsEpilogue {
  __m512 c_mul;
  const float* l2;
  float* P;
  bf16* pb;
  int64_t ld;
  ProbsEpilogue block(int64_t r0, int64_t v0) const {
    return {c_mul, l2 + 16 * v0, P + r0 * ld + 16 * v0, pb + r0 * ld + 16 * v0, ld};
  }
  template <int MR>
  void apply(int r, int v, __m512 acc) {
    const __m512 t = _mm512_fmsub_ps(acc, c_mul, _mm512_loadu_ps(l2 + 16 * v));
    const __m512 e = (__m512)exp2v((vec_t<float>)t);
    _mm512_storeu_ps(P + r * ld + 16 * v, e);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(pb + r * ld + 16 * v),
                        (__m256i)_mm512_cvtneps_pbh(e));
  }
};

// dS = P (dP - delta) of the dot products dP: bf16 rows to dsb (row stride ld) and pairs of keys
// to dsv (pair-row stride 2 ld; an odd block only ends the keys of all: its last key pairs with
// zero).
struct DScoresEpilogue {
  const float* P;
  const float* delta;
  bf16* dsb;
  bf16* dsv;
  int64_t ld;
  __m512 prev[4];
  DScoresEpilogue block(int64_t r0, int64_t v0) const {
    return {P + r0 * ld + 16 * v0, delta + 16 * v0, dsb + r0 * ld + 16 * v0,
            dsv + r0 * ld + 32 * v0, ld, {}};  // pair row r0 / 2 (r0 even)
  }
  template <int MR>
  void apply(int r, int v, __m512 acc) {
    const __m512 ds = _mm512_mul_ps(_mm512_loadu_ps(P + r * ld + 16 * v),
                                    _mm512_sub_ps(acc, _mm512_loadu_ps(delta + 16 * v)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dsb + r * ld + 16 * v),
                        (__m256i)_mm512_cvtneps_pbh(ds));
    if (r % 2 == 0 && r + 1 < MR) {
      prev[v] = ds;
      return;
    }
    bf16* dst = dsv + (r / 2) * 2 * ld + 32 * v;
    if (r % 2 == 1)
      store_key_pair(dst, prev[v], ds);
    else
      store_key_pair(dst, ds, _mm512_setzero_ps());
  }
};

struct Bf16BwdWork {
  float *qT, *tmp, *qrows, *dorows, *doT, *delta, *lse, *S, *dP, *Z, *PZ, *dQT, *dK, *dV, *rpad,
      *mbuf;
  bf16 *kT, *qv, *qrv, *dov, *doTv, *pb, *dsb, *dsv;
  word32* pairs;
};

inline Bf16BwdWork carve_bf16_bwd(char* base, const AttentionBwdParams& p, const BwdShape& s,
                                  size_t* bytes) {
  const int64_t D = p.head_dim, Dv = p.value_dim, QT = s.qt, KB = kKeyBlock;
  const int64_t ck = imin(s.chunk, imax<int64_t>(p.seqlen_k, 1)), ckp = round_up(ck, 32);
  const bool dropout = p.dropout_p > 0.0;
  Carve c{base};
  Bf16BwdWork w;
  w.qT = c.take<float>(D * QT);
  w.tmp = c.take<float>(2 * imax(D, Dv) * QT);
  w.qrows = c.take<float>(QT * s.Dp);
  w.dorows = c.take<float>(QT * s.Dvp);
  w.doT = c.take<float>(Dv * QT);
  w.delta = c.take<float>(QT);
  w.lse = c.take<float>(QT);
  w.S = c.take<float>(KB * QT);
  w.dP = c.take<float>(KB * QT);
  w.Z = c.take<float>(dropout ? KB * QT : 1);
  w.PZ = c.take<float>(dropout ? KB * QT : 1);
  w.dQT = c.take<float>(D * QT);
  w.dK = c.take<float>(ck * s.Dp);
  w.dV = c.take<float>(ck * s.Dvp);
  w.rpad = c.take<float>(p.rotation != nullptr ? D * s.Dp : 1);
  w.mbuf = c.take<float>(p.attn_mask_kind != AttentionParams::kMaskNone ? mask_buffer_elems(QT, KB) : 1);
  w.kT = c.take<bf16>(D * ckp);
  w.qv = c.take<bf16>(round_up(D, 2) * QT);
  w.qrv = c.take<bf16>(QT * s.Dp);
  w.dov = c.take<bf16>(QT * s.Dvp);
  w.doTv = c.take<bf16>(round_up(Dv, 2) * QT);
  w.pb = c.take<bf16>(KB * QT);
  w.dsb = c.take<bf16>(KB * QT);
  w.dsv = c.take<bf16>(round_up(KB, 32) * QT);
  w.pairs = c.take<word32>(16 * round_up(D, 32));
  if (bytes) *bytes = c.used;
  return w;
}

inline void bf16_bwd_plan(const AttentionBwdParams& p, Plan& plan) {
  // tasks and dq slots as the float engine's; its workspace serves the second phase
  bwd_plan_fp<bf16, float>(p, plan);
  size_t bytes = 0;
  carve_bf16_bwd(nullptr, p, bwd_shape<float>(p, plan.param[1]), &bytes);
  plan.workspace_bytes = imax(plan.workspace_bytes, bytes);
}

template <typename G>
void bf16_bwd_task(const AttentionBwdParams& p, const BwdShape& s, int64_t task, Bf16BwdWork& w,
                   float* shared) {
  const int64_t Hkv = p.heads_kv, Lq = p.seqlen_q, Lk = p.seqlen_k, D = p.head_dim;
  const int64_t Dv = p.value_dim, Dp = s.Dp, Dvp = s.Dvp;
  const int64_t c = task % s.nc, bk = task / s.nc, hk = bk % Hkv, b = bk / Hkv;
  const int64_t c0 = imin(Lk, c * s.chunk), c1 = imin(Lk, c0 + s.chunk), ck = c1 - c0;
  const int64_t ckp = round_up(imax<int64_t>(ck, 1), 32);
  const float inf = std::numeric_limits<float>::infinity();
  const float scale = float(p.scale);
  const bool masked = has_masks(p), dropout = p.dropout_p > 0.0, skip_hidden = may_hide_blocks(p);
  const float c_mul = scale * log2e<float>();
  const bool fuse = G::kFusedSoftmax && !masked && !dropout && std::isfinite(c_mul);

  const bf16* k = ptr<bf16>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride;
  const bf16* v = ptr<bf16>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride;
  fill(w.dK, ck * Dp, 0.0f);
  fill(w.dV, ck * Dvp, 0.0f);
  // K^T of the chunk, once for every query head and tile (zero columns past the chunk)
  transpose_pairs(k + c0 * p.k_row_stride, p.k_row_stride, ck, D, reinterpret_cast<word32*>(w.kT),
                  ckp / 2, w.pairs, ck);
  for (int64_t d = 0; d < D; ++d)
    std::memset(w.kT + d * ckp + ck, 0, size_t(ckp - ck) * sizeof(bf16));

  for (int64_t h = hk * s.group; h < (hk + 1) * s.group; ++h) {
    const int64_t bh = b * p.heads + h;
    const bf16* o = ptr<bf16>(p.out) + b * p.out_batch_stride + h * p.out_head_stride;
    const bf16* dout = ptr<bf16>(p.dout) + b * p.dout_batch_stride + h * p.dout_head_stride;
    const float* lse_bh = ptr<float>(p.lse) + bh * Lq;
    for (int64_t tile = 0; tile < s.tiles; ++tile) {
      const int64_t i0 = tile * s.qt, qn = imin(s.qt, Lq - i0);
      const int64_t lanes = bf16_lanes(qn);
      float* dQ = s.nc > 1 ? shared + ((bh * s.nc + c) * s.tiles + tile) * s.qt * Dp : w.qrows;
      const int64_t k_hi = imin(c1, causal_end(p, i0, qn));
      if (k_hi <= c0) {
        fill(dQ, qn * Dp, 0.0f);
        if (s.nc == 1) finish_dq<bf16, float>(p, s, b, h, i0, qn, dQ, w.tmp, w.rpad);
        continue;
      }
      // P from registers folds lse into the exponent: only while every |lse| is within
      // kFoldLimit (exact at the row's max, as the forward's raw scores); otherwise this tile
      // scales and rounds its scores first.
      const bool fold = fuse && all_within_fold_limit(lse_bh + i0, qn);
      pack_queries<bf16, float>(p, b, h, i0, qn, lanes, Dp, w.qT, w.qrows, w.tmp);
      pack_vnni(w.qT, lanes, D, round_up(D, 2), lanes, w.qv);
      pack_vnni(w.qrows, Dp, lanes, lanes, Dp, w.qrv);
      for (int64_t l = 0; l < lanes; ++l) {
        float* dst = w.dorows + l * Dvp;
        if (l >= qn) {  // padding lanes: no probability, no gradient
          fill(dst, Dvp, 0.0f);
          w.delta[l] = 0.0f;
          w.lse[l] = inf;
          continue;
        }
        load_row(dst, dout + (i0 + l) * p.dout_row_stride, Dv);
        fill(dst + Dv, Dvp - Dv, 0.0f);
        w.delta[l] = row_delta(dst, o + (i0 + l) * p.out_row_stride, Dv, w.tmp);
        const float lse = lse_bh[i0 + l];
        // fused: lse * log2(e), the exponent's offset folded into one FMA
        w.lse[l] = lse == -inf ? inf : (fold ? lse * log2e<float>() : lse);
      }
      pack_vnni(w.dorows, Dvp, lanes, lanes, Dvp, w.dov);
      transpose(w.dorows, Dvp, w.doT, lanes, lanes, Dv);
      pack_vnni(w.doT, lanes, Dv, round_up(Dv, 2), lanes, w.doTv);
      fill(w.dQT, D * lanes, 0.0f);

      for (int64_t j0 = c0; j0 < k_hi; j0 += kKeyBlock) {
        const int64_t kn = imin(kKeyBlock, k_hi - j0), knp = round_up(kn, 32);
        // a block hidden from the whole tile: P = 0 there, nothing to add (dK, dV start at 0)
        if (skip_hidden && block_hidden(p, b, h, i0, qn, j0, kn)) continue;
        // P^T = exp(S^T - lse), and its bf16 rows (with dropout: of P Z)
        const float* PZ = w.S;
        if (fold) {
          bf16_product_epilogue(kn, lanes, D, k + j0 * p.k_row_stride, p.k_row_stride, w.qv,
                                ProbsEpilogue{_mm512_set1_ps(c_mul), w.lse, w.S, w.pb, lanes});
        } else {
          G::gemm(kn, lanes, D, k + j0 * p.k_row_stride, p.k_row_stride, w.qv, 2 * lanes, w.S,
                  lanes, Acc::kSet, scale);
          if (masked) apply_masks<bf16, float>(p, b, h, i0, qn, j0, kn, lanes, w.S, w.mbuf);
          for (int64_t j = 0; j < kn; ++j)
            for (int64_t l = 0; l < lanes; l += 16) {
              float* sp = w.S + j * lanes + l;
              vstore(sp, exp2v((vload(sp) - vload(w.lse + l)) * log2e<float>()));
            }
          if (dropout) {
            dropout_block<float>(p, b, h, i0, j0, kn, lanes, w.Z, false);
            for (int64_t i = 0; i < kn * lanes; i += 16)
              vstore(w.PZ + i, vload(w.S + i) * vload(w.Z + i));
            PZ = w.PZ;
          }
          for (int64_t j = 0; j < kn; ++j) pack_row_bf16(PZ + j * lanes, w.pb + j * lanes, lanes);
        }
        // dV += (P Z)^T dO
        G::gemm(kn, Dvp, lanes, w.pb, lanes, w.dov, 2 * Dvp, w.dV + (j0 - c0) * Dvp, Dvp,
                Acc::kAdd);
        // dP^T = V dO^T ; dS^T = P^T (Z dP^T - delta), as bf16 rows and pairs of keys
        if (fold) {
          bf16_product_epilogue(kn, lanes, Dv, v + j0 * p.v_row_stride, p.v_row_stride, w.doTv,
                                DScoresEpilogue{w.S, w.delta, w.dsb, w.dsv, lanes, {}});
          zero_pair_rows(w.dsv, kn, knp, lanes);
        } else {
          G::gemm(kn, lanes, Dv, v + j0 * p.v_row_stride, p.v_row_stride, w.doTv, 2 * lanes,
                  w.dP, lanes, Acc::kSet);
          for (int64_t j = 0; j < kn; ++j)
            for (int64_t l = 0; l < lanes; l += 16) {
              float* dp = w.dP + j * lanes + l;
              vec_t<float> g = vload(dp);
              if (dropout) g *= vload(w.Z + j * lanes + l);
              vstore(dp, vload(w.S + j * lanes + l) * (g - vload(w.delta + l)));
            }
          for (int64_t j = 0; j < kn; ++j)
            pack_row_bf16(w.dP + j * lanes, w.dsb + j * lanes, lanes);
          pack_vnni(w.dP, lanes, kn, knp, lanes, w.dsv);
        }
        // dK += dS^T Q' (scaled at the end) ; dQ'^T += K^T dS^T
        G::gemm(kn, Dp, lanes, w.dsb, lanes, w.qrv, 2 * Dp, w.dK + (j0 - c0) * Dp, Dp, Acc::kAdd);
        G::gemm(D, lanes, knp, w.kT + (j0 - c0), ckp, w.dsv, 2 * lanes, w.dQT, lanes, Acc::kAdd);
      }
      // dQ' rows, then scale, rotation and store (or the chunk's slot)
      transpose(w.dQT, lanes, dQ, Dp, D, qn);
      for (int64_t l = 0; l < qn; ++l) fill(dQ + l * Dp + D, Dp - D, 0.0f);
      if (s.nc == 1) finish_dq<bf16, float>(p, s, b, h, i0, qn, dQ, w.tmp, w.rpad);
    }
  }

  bf16* dk = static_cast<bf16*>(p.dk) + b * p.dk_batch_stride + hk * p.dk_head_stride;
  bf16* dv = static_cast<bf16*>(p.dv) + b * p.dv_batch_stride + hk * p.dv_head_stride;
  for (int64_t j = 0; j < ck; ++j) {
    float* src = w.dK + j * Dp;
    for (int64_t d = 0; d < D; ++d) src[d] *= scale;
    store_row(dk + (c0 + j) * p.dk_row_stride, src, D);
    store_row(dv + (c0 + j) * p.dv_row_stride, w.dV + j * Dvp, Dv);
  }
}

template <typename G>
void bf16_bwd_run(const AttentionBwdParams& p, const Plan& plan, int64_t begin, int64_t end,
                  void* ws, void* shared) {
  const BwdShape s = bwd_shape<float>(p, plan.param[1]);
  Bf16BwdWork w = carve_bf16_bwd(static_cast<char*>(ws), p, s, nullptr);
  G::begin();
  for (int64_t t = begin; t < end; ++t) bf16_bwd_task<G>(p, s, t, w, static_cast<float*>(shared));
  G::end();
}

template <typename G>
struct Bf16Engine {
  static bool applies(const AttentionParams& p) { return bf16_engine_applies(p); }
  static void fwd_plan(const AttentionParams& p, Plan& plan) { bf16_fwd_plan(p, plan); }
  static void fwd_run(const AttentionParams& p, const Plan& plan, int64_t b, int64_t e, void* ws) {
    bf16_fwd_run<G>(p, plan, b, e, ws);
  }
  static void bwd_plan(const AttentionBwdParams& p, Plan& plan) { bf16_bwd_plan(p, plan); }
  static void bwd_run(const AttentionBwdParams& p, const Plan& plan, int64_t b, int64_t e,
                      void* ws, void* shared) {
    bf16_bwd_run<G>(p, plan, b, e, ws, shared);
  }
};

ROLLINGQ_KERNELS_END
