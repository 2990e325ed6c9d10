// What hides or scales a score of one (query tile, key block), for every engine: key padding,
// the causal band, attn_mask, and dropout. Scores are held transposed, S^T[j][lane] for key
// j0 + j and query i0 + lane.
//
// Everything boolean replaces the hidden score by -inf (never adds to it): a NaN at a hidden
// position is ignored, as in the reference, and a row that sees no key gives zeros. A float
// attn_mask is added to the scaled score, so a NaN or +inf in it poisons its row, as in SDPA.
#pragma once

#include "cpu/isa.h"
#include "cpu/kernels/namespace.h"
#include "cpu/kernels/transpose.h"
#include "cpu/kernels/vec.h"

ROLLINGQ_KERNELS_BEGIN

template <typename A>
inline void fill(A* x, int64_t n, A value) {
  for (int64_t i = 0; i < n; ++i) x[i] = value;
}

// Key j visible from query row i iff j <= i + causal_offset (when is_causal). The number of keys
// the rows [i0, i0 + qn) can see at most: [0, causal_end).
inline int64_t causal_end(const AttentionParams& p, int64_t i0, int64_t qn) {
  if (!p.is_causal) return p.seqlen_k;
  return imax<int64_t>(0, imin<int64_t>(p.seqlen_k, i0 + qn + p.causal_offset));
}

// Whether row i of (b, h) has a key that no boolean mask hides (key padding, the causal band, a
// bool attn_mask). Asked only for a row whose softmax sum is 0: a row that sees no key gives zeros
// whatever the values of its hidden keys hold, while a row whose visible scores are all -inf keeps
// its 0 * value products (NaN for a NaN value, as in SDPA).
inline bool row_sees_a_key(const AttentionParams& p, int64_t b, int64_t h, int64_t i) {
  const int64_t end = causal_end(p, i, 1);
  const bool* pad = p.key_padding ? p.key_padding + b * p.key_padding_batch_stride : nullptr;
  const bool* m = nullptr;
  if (p.attn_mask_kind == AttentionParams::kMaskBool)
    m = static_cast<const bool*>(p.attn_mask) + b * p.mask_batch_stride +
        h * p.mask_head_stride + i * p.mask_row_stride;
  for (int64_t j = 0; j < end; ++j) {
    if (pad != nullptr && !pad[j]) continue;
    if (m != nullptr && !m[j * p.mask_col_stride]) continue;
    return true;
  }
  return false;
}

// Whether every one of x[0, n) is `value` (bools are bytes 0 / 1: eight at a time, stopping at
// the first word that differs).
inline bool all_bools(const bool* x, int64_t n, bool value) {
  const uint64_t want = value ? 0x0101010101010101ull : 0;
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    uint64_t word;
    std::memcpy(&word, x + j, 8);
    if (word != want) return false;
  }
  for (; j < n; ++j)
    if (x[j] != value) return false;
  return true;
}

// Whether a boolean mask can hide whole blocks of keys: key padding or a bool attn_mask.
inline bool may_hide_blocks(const AttentionParams& p) {
  return p.key_padding != nullptr || p.attn_mask_kind == AttentionParams::kMaskBool;
}

// Whether keys [j0, j0 + kn) are hidden from every row of [i0, i0 + qn) of (b, h) by the key
// padding alone or by a bool attn_mask alone (the causal band ends the keys at causal_end). Such
// a block adds nothing to a row but 0 * v where v holds NaN or inf (docs/numerics.md: the
// reference does not add that either), so the products skip it: a padded batch's tail, the
// upper triangle of a causal bool mask. Costs a read of the block's mask bytes at most, and
// stops at the first key that takes part.
inline bool block_hidden(const AttentionParams& p, int64_t b, int64_t h, int64_t i0, int64_t qn,
                         int64_t j0, int64_t kn) {
  if (p.key_padding != nullptr &&
      all_bools(p.key_padding + b * p.key_padding_batch_stride + j0, kn, false))
    return true;
  if (p.attn_mask_kind != AttentionParams::kMaskBool || p.mask_col_stride != 1) return false;
  const bool* m = static_cast<const bool*>(p.attn_mask) + b * p.mask_batch_stride +
                  h * p.mask_head_stride + i0 * p.mask_row_stride + j0;
  const int64_t rows = p.mask_row_stride == 0 ? 1 : qn;
  for (int64_t l = 0; l < rows; ++l)
    if (!all_bools(m + l * p.mask_row_stride, kn, false)) return false;
  return true;
}

inline bool has_masks(const AttentionParams& p) {
  return p.key_padding != nullptr || p.is_causal || p.attn_mask_kind != AttentionParams::kMaskNone;
}

// Work buffer of apply_masks: rows x keys of the mask, and its transpose.
inline int64_t mask_buffer_elems(int64_t qt, int64_t kb) { return 2 * qt * kb; }

template <typename MT, typename A>
inline A mask_value(const char* base, int64_t idx) {
  if constexpr (same_type<MT, bool>::value) {
    return reinterpret_cast<const bool*>(base)[idx] ? A(0)
                                                    : -std::numeric_limits<A>::infinity();
  } else {
    return to_acc<A>(reinterpret_cast<const MT*>(base)[idx]);
  }
}

// n contiguous bools as 0 (true: takes part) or -inf, a vector at a time (bytes widened to the
// lanes' integer width; a scalar loop with a select per element cost 1.7-2.1x the time of a
// float mask's whole forward).
template <typename A>
inline void bools_as_bias(A* dst, const bool* src, int64_t n) {
  using V = vec_t<A>;
  constexpr int W = VT<A>::W;
  typedef decltype(V{} < V{}) Mask;
  typedef uint8_t Bytes __attribute__((vector_size(W)));
  const V ninf = vbcast(-std::numeric_limits<A>::infinity());
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    Bytes bytes;
    std::memcpy(&bytes, src + j, W);
    const Mask keep = __builtin_convertvector(bytes, Mask) != Mask{};
    vstore(dst + j, keep ? V{} : ninf);
  }
  for (; j < n; ++j) dst[j] = src[j] ? A(0) : -std::numeric_limits<A>::infinity();
}

// attn_mask of query head h over the block: bool as 0 / -inf (then a select), float added.
template <typename MT, typename A>
void apply_attn_mask(const AttentionParams& p, int64_t b, int64_t h, int64_t i0, int64_t qn,
                     int64_t j0, int64_t kn, int64_t lanes, A* S, A* buf) {
  using V = vec_t<A>;
  constexpr int W = VT<A>::W;
  constexpr bool kBool = same_type<MT, bool>::value;
  const int64_t nv = lanes / W;
  const char* base = static_cast<const char*>(p.attn_mask) +
                     (b * p.mask_batch_stride + h * p.mask_head_stride) * int64_t(sizeof(MT));
  const int64_t rs = p.mask_row_stride, cs = p.mask_col_stride;
  const V ninf = vbcast(-std::numeric_limits<A>::infinity());
  if (rs == 0) {  // the same mask row for every query ((B, 1, 1, Lk) and the like): per key
    for (int64_t j = 0; j < kn; ++j) {
      const A m = mask_value<MT, A>(base, (j0 + j) * cs);
      A* row = S + j * lanes;
      for (int64_t v = 0; v < nv; ++v) {
        if constexpr (kBool)
          vstore(row + v * W, m == A(0) ? vload(row + v * W) : ninf);
        else
          vstore(row + v * W, vload(row + v * W) + m);
      }
    }
    return;
  }
  if constexpr (kBool) {  // a block the mask hides nothing of (below a causal mask's diagonal)
    if (cs == 1) {
      const bool* m = reinterpret_cast<const bool*>(base) + i0 * rs + j0;
      bool all = true;
      for (int64_t l = 0; l < qn && all; ++l) all = all_bools(m + l * rs, kn, true);
      if (all) return;
    }
  }
  // rows of the mask, transposed into buf[j][lane]
  A* T = buf;
  bool in_place = false;  // rows of the accumulation type with unit key stride: transposed as they are
  if constexpr (same_type<MT, A>::value) {
    if (cs == 1) {
      transpose(reinterpret_cast<const A*>(base) + i0 * rs + j0, rs, T, lanes, qn, kn);
      in_place = true;
    }
  }
  if (!in_place) {  // gathered into rows of A first
    A* rows = buf + kn * lanes;
    const MT* m = reinterpret_cast<const MT*>(base) + i0 * rs + j0 * cs;
    if (cs == 1) {  // rows converted a vector at a time
      for (int64_t l = 0; l < qn; ++l) {
        if constexpr (kBool)
          bools_as_bias(rows + l * kn, m + l * rs, kn);
        else
          load_row(rows + l * kn, m + l * rs, kn);
      }
    } else {
      for (int64_t l = 0; l < qn; ++l)
        for (int64_t j = 0; j < kn; ++j)
          rows[l * kn + j] = mask_value<MT, A>(base, (i0 + l) * rs + (j0 + j) * cs);
    }
    transpose(rows, kn, T, lanes, qn, kn);
  }
  for (int64_t j = 0; j < kn; ++j) {
    fill(T + j * lanes + qn, lanes - qn, A(0));
    A* row = S + j * lanes;
    const A* mrow = T + j * lanes;
    for (int64_t v = 0; v < nv; ++v) {
      const V m = vload(mrow + v * W);
      if constexpr (kBool)
        vstore(row + v * W, m == V{} ? vload(row + v * W) : ninf);
      else
        vstore(row + v * W, vload(row + v * W) + m);
    }
  }
}

// All masks of query head h on S^T (kn keys from j0, queries i0 .. i0 + qn in `lanes` lanes).
// buf: mask_buffer_elems(lanes, kn).
template <typename T, typename A>
void apply_masks(const AttentionParams& p, int64_t b, int64_t h, int64_t i0, int64_t qn,
                 int64_t j0, int64_t kn, int64_t lanes, A* S, A* buf) {
  using V = vec_t<A>;
  constexpr int W = VT<A>::W;
  const int64_t nv = lanes / W;
  const V ninf = vbcast(-std::numeric_limits<A>::infinity());
  switch (p.attn_mask_kind) {
    case AttentionParams::kMaskBool:
      apply_attn_mask<bool, A>(p, b, h, i0, qn, j0, kn, lanes, S, buf);
      break;
    case AttentionParams::kMaskFloat32:
      apply_attn_mask<float, A>(p, b, h, i0, qn, j0, kn, lanes, S, buf);
      break;
    case AttentionParams::kMaskInput:
      apply_attn_mask<T, A>(p, b, h, i0, qn, j0, kn, lanes, S, buf);
      break;
    default:
      break;
  }
  if (p.key_padding != nullptr) {
    const bool* pad = p.key_padding + b * p.key_padding_batch_stride + j0;
    for (int64_t j = 0; j < kn; ++j)
      if (!pad[j]) fill(S + j * lanes, lanes, -std::numeric_limits<A>::infinity());
  }
  if (p.is_causal) {
    // lane l of column v hides key j0 + j when j0 + j > i0 + v W + l + offset
    for (int64_t v = 0; v < nv; ++v) {
      const int64_t first = i0 + v * W + p.causal_offset - j0;  // last key seen by lane 0
      if (first >= kn - 1) continue;
      const V limit = viota<A>() + A(first);
      for (int64_t j = imax<int64_t>(0, first + 1); j < kn; ++j) {
        A* sp = S + j * lanes + v * W;
        vstore(sp, vbcast(A(j)) <= limit ? vload(sp) : ninf);
      }
    }
  }
}

// ---- dropout ----------------------------------------------------------------------------------

// Z[j][lane] = 1 / (1 - p) where the keep-mask keeps element (b, h, i0 + lane, j0 + j) of
// rollingq_kernels/dropout.py, else 0; or, with in_place, P[j][lane] *= that. Counters run over
// the lanes of a vector (one query row each); the four words of a counter serve four keys.
template <typename A>
void dropout_block(const AttentionParams& p, int64_t b, int64_t h, int64_t i0, int64_t j0,
                   int64_t kn, int64_t lanes, A* Z, bool in_place) {
  using V = vec_t<A>;
  constexpr int W = VT<A>::W;
  using Ph = PhiloxLanes<W>;
  using U64 = typename Ph::u64;
  const int64_t nv = lanes / W;
  const uint64_t G = uint64_t(ceil_div(p.seqlen_k, 4));
  const uint32_t k0 = uint32_t(p.dropout_seed), k1 = uint32_t(p.dropout_seed >> 32);
  const uint32_t o0 = uint32_t(p.dropout_offset), o1 = uint32_t(p.dropout_offset >> 32);
  const A inv = A(1) / (A(1) - A(p.dropout_p));
  const uint32_t thr = p.dropout_threshold;
  U64 iota{};
  for (int l = 0; l < W; ++l) iota[l] = uint64_t(l);
  for (int64_t v = 0; v < nv; ++v) {
    const uint64_t row0 = uint64_t((b * p.heads + h) * p.seqlen_q + i0 + v * W);
    const U64 rows = (iota + row0) * G;
    for (int64_t jg = j0 / 4; jg * 4 < j0 + kn; ++jg) {
      const U64 g = rows + uint64_t(jg);
      typename Ph::u32 c[4] = {__builtin_convertvector(g, typename Ph::u32),
                               __builtin_convertvector(g >> 32, typename Ph::u32),
                               typename Ph::u32{} + o0, typename Ph::u32{} + o1};
      philox4x32_10<W>(c, k0, k1);
      for (int w = 0; w < 4; ++w) {
        const int64_t j = jg * 4 + w - j0;
        if (j < 0 || j >= kn) continue;
        // the comparison gives 32-bit lane masks; convertvector widens them for double lanes
        typedef decltype(V{} < V{}) Mask;
        const Mask m = __builtin_convertvector(c[w] >= thr, Mask);
        A* zp = Z + j * lanes + v * W;
        const V scale = vbcast(inv);
        if (in_place)
          vstore(zp, m ? vload(zp) * scale : V{});
        else
          vstore(zp, m ? scale : V{});
      }
    }
  }
}

ROLLINGQ_KERNELS_END
