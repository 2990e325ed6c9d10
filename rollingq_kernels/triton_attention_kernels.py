"""Triton kernels of rolling attention: forward (rotation prologue, online softmax, statistics),
the split-K merge, the backward (FlashAttention-2 style) and the row rotation.

Only ``@triton.jit`` code lives here; launchers, configs and the torch op are in
``triton_attention.py``. Conventions shared by every kernel:

* q, k, v and dO are read through their strides (b, h, l, d); every tensor a kernel writes is
  contiguous and allocated by the launcher.
* Scores are kept in log2 units: ``s2 = (q . k) * scale * log2(e)``, so ``exp2`` replaces ``exp``;
  lse is stored in natural-log units, as the stats contract says.
* A head dim up to 256 is held in registers whole (``D_CHUNKS == 1``, padded to a power of two
  and masked). Larger head dims (the paper's D = 768) are walked in chunks of ``BLOCK_D``:
  scores are accumulated chunk by chunk and each program owns one chunk of the output. Chunk
  loops are ``range`` loops, not ``static_range``: unrolled, every chunk's operands would get
  their own shared-memory buffers (400 KiB at D = 768).
* ``_mm`` is the single place a ``tl.dot`` is issued, so the precision policy (3xTF32, TF32 or
  IEEE for float32 operands) and the interpreter work-around (bfloat16 dots computed in float32)
  are decided once.
* Statistics stay off the main loop's critical path: the loop only adds its row sums to the mass
  of a tile's modality when every visible key of the tile has one id; tiles with mixed ids are
  recomputed after the loop (``_mass_of_mixed_tiles``) and key sums are a separate pass
  (``_key_sum_tiles``) spread over the query tiles.
"""

import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # host side: folded into the softmax scale
# kernels may only read globals that are constexpr
_LN2 = tl.constexpr(0.6931471805599453)
_LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _mm(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # PRECISION: "none" for 16-bit operands (tensor cores, float32 accumulation); "tf32x3"
    # (three TF32 products: about float32 accuracy), "tf32" or "ieee" for float32 operands. UPCAST: compute in float32 (Triton's CPU interpreter has no
    # bfloat16 matmul).
    if UPCAST:
        r = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif PRECISION == "none":
        r = tl.dot(a, b)
    else:
        r = tl.dot(a, b, input_precision=PRECISION)
    return r


# Philox4x32-10 constants (rollingq_kernels/dropout.py is the specification)
_PHILOX_M0 = tl.constexpr(0xD2511F53)
_PHILOX_M1 = tl.constexpr(0xCD9E8D57)
_PHILOX_W0 = tl.constexpr(0x9E3779B9)
_PHILOX_W1 = tl.constexpr(0xBB67AE85)


@triton.jit
def _philox4x32(c0, c1, c2, c3, k0, k1):
    # ten rounds on uint32 counters (tensors) and key (scalars), as dropout.philox4x32
    for _ in tl.static_range(10):
        a0 = c0
        a2 = c2
        c0 = tl.umulhi(a2, _PHILOX_M1) ^ c1 ^ k0
        c2 = tl.umulhi(a0, _PHILOX_M0) ^ c3 ^ k1
        c1 = a2 * _PHILOX_M1
        c3 = a0 * _PHILOX_M0
        k0 = k0 + _PHILOX_W0
        k1 = k1 + _PHILOX_W1
    return c0, c1, c2, c3


@triton.jit
def _keep_tile(row_g, start_n, seed_lo, seed_hi, off_lo, off_hi, drop_thr,
               BLOCK_N: tl.constexpr):  # fmt: skip
    """Dropout keep-mask (bool [rows, BLOCK_N]) of keys start_n .. start_n + BLOCK_N - 1 (start_n
    a multiple of 4) for rows whose first 4-key group has the counter ``row_g`` (int64):
    element (row, j) is kept when word j % 4 of Philox4x32-10 with counter (g lo, g hi, offset lo,
    offset hi), g = row_g + j // 4, and key (seed lo, seed hi) is >= drop_thr. One Philox call per
    four keys; the four words are interleaved back into key order."""
    g = row_g[:, None] + (start_n // 4 + tl.arange(0, BLOCK_N // 4))[None, :]
    c0 = g.to(tl.uint32)  # the low 32 bits
    c1 = (g >> 32).to(tl.uint32)
    z = tl.zeros_like(c0)
    w0, w1, w2, w3 = _philox4x32(
        c0,
        c1,
        z + off_lo.to(tl.uint32, bitcast=True),
        z + off_hi.to(tl.uint32, bitcast=True),
        seed_lo.to(tl.uint32, bitcast=True),
        seed_hi.to(tl.uint32, bitcast=True),
    )
    w = tl.interleave(tl.interleave(w0, w2), tl.interleave(w1, w3))
    return w >= drop_thr.to(tl.uint32, bitcast=True)


@triton.jit
def _mask_tile(mask_base, smq, smk, offs_m, m_valid, offs_n, n_valid, TRANS: tl.constexpr):
    """The attn_mask tile of rows offs_m and keys offs_n, read in place through its strides
    ([rows, keys]; [keys, rows] with TRANS); 0 outside the valid rows and keys."""
    if TRANS:
        mt = tl.load(
            mask_base + offs_m[None, :] * smq + offs_n[:, None] * smk,
            mask=m_valid[None, :] & n_valid[:, None],
            other=0,
        )
    else:
        mt = tl.load(
            mask_base + offs_m[:, None] * smq + offs_n[None, :] * smk,
            mask=m_valid[:, None] & n_valid[None, :],
            other=0,
        )
    return mt


@triton.jit
def _mask_bias(mt):
    """A float attn_mask tile in log2 units. A finite value below -1e37 (torch.finfo(dtype).min
    marks hidden keys in many models) is held at -1e37 so that the log2 scaling cannot overflow it
    to -inf: a row whose keys all carry it still attends to all of them (as in SDPA), while -inf
    hides a key; NaN and +inf pass through."""
    m = mt.to(tl.float32)
    m = tl.where((m < -1.0e37) & (m != float("-inf")), -1.0e37, m)
    return m * _LOG2E


@triton.jit
def _key_sum_tiles(
    k_base,
    IDS,
    PAD,
    ids_row,
    skl,
    skd,
    first,
    hi,
    step,
    offs_d,
    d_valid,
    offs_mod,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    M_PAD: tl.constexpr,
    HAS_PAD: tl.constexpr,
    MASS_DOT: tl.constexpr,
    UPCAST: tl.constexpr,
):
    # Transposed per-modality key sums (BLOCK_D, M_PAD), float32, of the key tiles starting at
    # first, first + step, ... below hi. Few modalities: one register reduction per modality;
    # many: a float32 product with the one-hot ids.
    acc = tl.zeros([BLOCK_D, M_PAD], dtype=tl.float32)
    for start_n in range(first, hi, step):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < hi
        if HAS_PAD:
            n_valid = n_valid & (tl.load(PAD + ids_row + offs_n, mask=n_valid, other=0) != 0)
        ids = tl.load(IDS + ids_row + offs_n, mask=n_valid, other=-1)
        kt = tl.load(
            k_base + offs_n[None, :] * skl + offs_d[:, None] * skd,
            mask=n_valid[None, :] & d_valid[:, None],
            other=0.0,
        ).to(tl.float32)
        if MASS_DOT:
            onehot = (ids[:, None] == offs_mod[None, :]).to(tl.float32)
            acc += _mm(kt, onehot, "ieee", UPCAST)
        else:
            for m in tl.static_range(M_PAD):
                col = tl.sum(tl.where(ids[None, :] == m, kt, 0.0), axis=1)
                acc += tl.where(offs_mod[None, :] == m, col[:, None], 0.0)
    return acc


@triton.jit
def _scores(q, q_base, k_base, sql, sqd, skl, skd, offs_m, m_valid, offs_n, n_valid, offs_d,
            d_valid, D, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
            D_CHUNKS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):  # fmt: skip
    # q . k of a (query tile, key tile), float32, unscaled; returns the key tile too (D_CHUNKS=1)
    if D_CHUNKS == 1:
        kt = tl.load(
            k_base + offs_n[None, :] * skl + offs_d[:, None] * skd,
            mask=n_valid[None, :] & d_valid[:, None],
            other=0.0,
        )
        s = _mm(q, kt, PRECISION, UPCAST)
    else:
        s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for c in range(D_CHUNKS):
            offs_c = c * BLOCK_D + tl.arange(0, BLOCK_D)
            c_valid = offs_c < D
            qc = tl.load(
                q_base + offs_m[:, None] * sql + offs_c[None, :] * sqd,
                mask=m_valid[:, None] & c_valid[None, :],
                other=0.0,
            )
            kc = tl.load(
                k_base + offs_n[None, :] * skl + offs_c[:, None] * skd,
                mask=n_valid[None, :] & c_valid[:, None],
                other=0.0,
            )
            s += _mm(qc, kc, PRECISION, UPCAST)
    return s


@triton.jit
def _mass_of_mixed_tiles(
    mass, m_i, q, q_base, k_base, IDS, PAD, ids_row, sql, sqd, skl, skd, lo, vis_hi, offs_m,
    m_valid, offs_d, d_valid, offs_mod, qk_scale, D, causal_off, mask_base, smq, smk,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, D_CHUNKS: tl.constexpr,
    M_PAD: tl.constexpr, HAS_PAD: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
    MASS_DOT: tl.constexpr, UPCAST: tl.constexpr, HAS_MASK: tl.constexpr,
    MASK_BOOL: tl.constexpr,
):  # fmt: skip
    """The mass of the key tiles whose visible keys carry more than one id (the main loop took
    the others): their probabilities are recomputed against the final row max m_i, so the result
    is in the units of the main loop's accumulators. Only the ids of other tiles are read."""
    m_use = tl.where(m_i == float("-inf"), 0.0, m_i)
    for start_n in range(lo, vis_hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < vis_hi
        key_ok = n_valid
        if HAS_PAD:
            key_ok = key_ok & (tl.load(PAD + ids_row + offs_n, mask=n_valid, other=0) != 0)
        ids = tl.load(IDS + ids_row + offs_n, mask=key_ok, other=-1)
        id_lo = tl.min(tl.where(key_ok, ids, M_PAD), axis=0)
        id_hi = tl.max(tl.where(key_ok, ids, -1), axis=0)
        if id_lo < id_hi:
            s = _scores(q, q_base, k_base, sql, sqd, skl, skd, offs_m, m_valid, offs_n, n_valid,
                        offs_d, d_valid, D, BLOCK_M, BLOCK_N, BLOCK_D, D_CHUNKS, PRECISION,
                        UPCAST)  # fmt: skip
            vis = key_ok[None, :]
            if CAUSAL:
                vis = vis & (offs_n[None, :] <= offs_m[:, None] + causal_off)
            s = s * qk_scale
            if HAS_MASK:
                mt = _mask_tile(mask_base, smq, smk, offs_m, m_valid, offs_n, n_valid, False)
                if MASK_BOOL:
                    vis = vis & (mt != 0)
                else:
                    s = s + _mask_bias(mt)
            p = tl.exp2(tl.where(vis, s, float("-inf")) - m_use[:, None])
            if MASS_DOT:
                onehot = ids[:, None] == offs_mod[None, :]
                if PRECISION == "none":
                    # probabilities lie in [0, 1]: float16 holds them with 11 significant bits
                    mass += _mm(p.to(tl.float16), onehot.to(tl.float16), "none", UPCAST)
                else:  # float32 inputs: the same precision as their other products
                    mass += _mm(p, onehot.to(tl.float32), PRECISION, UPCAST)
            else:
                for mm in tl.static_range(M_PAD):
                    col = tl.sum(tl.where(ids[None, :] == mm, p, 0.0), axis=1)
                    mass += tl.where(offs_mod[None, :] == mm, col[:, None], 0.0)
    return mass


@triton.jit
def _fwd_inner(
    acc, l_i, m_i, mass, q, q_base, k_base, v_base, IDS, PAD, ids_row,
    sql, sqd, skl, skd, svl, svd, start, end, vis_hi, offs_m, m_valid, offs_d, d_valid,
    offs_dv, dv_valid, offs_mod, qk_scale, D, causal_off, mask_base, smq, smk, row_g, seed_lo,
    seed_hi, off_lo, off_hi, drop_thr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, D_CHUNKS: tl.constexpr,
    BOUNDARY: tl.constexpr, HAS_PAD: tl.constexpr, CAUSAL: tl.constexpr, STATS: tl.constexpr,
    PRECISION: tl.constexpr, MASS_DOT: tl.constexpr, M_PAD: tl.constexpr, UPCAST: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, DROPOUT: tl.constexpr,
):  # fmt: skip
    """Key tiles [start, end) of the forward's online softmax; returns the updated accumulators.

    BOUNDARY tiles mask keys at or past ``vis_hi`` and, when causal, keys past each row; interior
    tiles only mask padded keys and the attn_mask (nothing at all without either). Dropout
    applies to the probabilities that reach the output only: the row sums (l, lse) and the
    modality mass are taken before it.
    """
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < vis_hi
        s = _scores(
            q,
            q_base,
            k_base,
            sql,
            sqd,
            skl,
            skd,
            offs_m,
            m_valid,
            offs_n,
            n_valid,
            offs_d,
            d_valid,
            D,
            BLOCK_M,
            BLOCK_N,
            BLOCK_D,
            D_CHUNKS,
            PRECISION,
            UPCAST,
        )
        key_ok = n_valid
        if HAS_PAD:
            key_ok = key_ok & (tl.load(PAD + ids_row + offs_n, mask=n_valid, other=0) != 0)
        if BOUNDARY or HAS_PAD or HAS_MASK:
            # rows past Lq need no mask: they read zeros, stay finite and are never stored
            vis = key_ok[None, :]
            if CAUSAL and BOUNDARY:
                vis = vis & (offs_n[None, :] <= offs_m[:, None] + causal_off)
            s = s * qk_scale
            if HAS_MASK:
                mt = _mask_tile(mask_base, smq, smk, offs_m, m_valid, offs_n, n_valid, False)
                if MASK_BOOL:
                    vis = vis & (mt != 0)
                else:
                    s = s + _mask_bias(mt)
            s = tl.where(vis, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            # a row that has seen no key yet keeps m = -inf; shift it by 0 so exp2 gives 0
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            s = s * qk_scale
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_use = m_new
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        row_p = tl.sum(p, axis=1)
        l_i = l_i * alpha + row_p
        vt = tl.load(
            v_base + offs_n[:, None] * svl + offs_dv[None, :] * svd,
            mask=n_valid[:, None] & dv_valid[None, :],
            other=0.0,
        )
        if DROPOUT:
            keep = _keep_tile(row_g, start_n, seed_lo, seed_hi, off_lo, off_hi, drop_thr, BLOCK_N)
            p_out = tl.where(keep, p, 0.0)
        else:
            p_out = p
        acc = acc * alpha[:, None] + _mm(p_out.to(v_base.dtype.element_ty), vt, PRECISION, UPCAST)
        if STATS:
            # Attention mass per modality, main-loop part: a tile whose visible keys all carry
            # one id (keys laid out in runs per modality: all but a few tiles) adds the row sums
            # already computed for l. Mixed tiles are left to _mass_of_mixed_tiles after the
            # loop, so the loop carries no per-modality work. (Padded keys count as any id.)
            ids = tl.load(IDS + ids_row + offs_n, mask=key_ok, other=-1)
            id_lo = tl.min(tl.where(key_ok, ids, M_PAD), axis=0)
            id_hi = tl.max(tl.where(key_ok, ids, -1), axis=0)
            take = (offs_mod[None, :] == id_lo) & (id_lo >= id_hi)
            mass = mass * alpha[:, None] + tl.where(take, row_p[:, None], 0.0)
        m_i = m_new

    return acc, l_i, m_i, mass


_RNG_ARGS = ["seed_lo", "seed_hi", "off_lo", "off_hi", "drop_thr"]


@triton.jit(do_not_specialize=_RNG_ARGS)
def _rolling_attn_fwd_kernel(
    Q,
    K,
    V,
    R,
    ROWS,
    IDS,
    PAD,
    O,
    LSE,
    MASS,
    KSUM,
    MASK,  # attn_mask (B, H, Lq, Lk) read through its strides: uint8 (bool) or float
    sqb,
    sqh,
    sql,
    sqd,
    skb,
    skh,
    skl,
    skd,
    svb,
    svh,
    svl,
    svd,
    smb,
    smh,
    smq,
    smk,
    H,
    Lq,
    Lk,
    D,
    Dv,
    M,
    GROUP,  # query heads per key/value head (grouped-query attention; 1 otherwise)
    CAUSAL_OFF,  # causal: key j is visible from row i iff j <= i + CAUSAL_OFF
    keys_per_split,
    KS_SLOTS,
    qk_scale,
    KEY_GROUPS,  # dropout: ceil(Lk / 4), the counters of one row
    seed_lo,  # dropout seed and offset, 32-bit halves (as int32), and threshold (floor(p 2^32))
    seed_hi,
    off_lo,
    off_hi,
    drop_thr,
    drop_scale,  # 1 / (1 - p)
    LQ_KEY,  # autotuning keys only (bucketed Lq, Lk)
    LK_KEY,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    D_CHUNKS: tl.constexpr,
    DV_CHUNKS: tl.constexpr,
    ROT_CHUNK: tl.constexpr,
    M_PAD: tl.constexpr,
    ROTATE: tl.constexpr,
    HAS_ROWS: tl.constexpr,
    HAS_PAD: tl.constexpr,
    CAUSAL: tl.constexpr,
    STATS: tl.constexpr,
    PRECISION: tl.constexpr,
    ROT_PRECISION: tl.constexpr,
    MASS_DOT: tl.constexpr,
    UPCAST: tl.constexpr,
    HAS_MASK: tl.constexpr,
    MASK_BOOL: tl.constexpr,
    DROPOUT: tl.constexpr,
):
    """One (query tile, batch*head, split*Dv-chunk) program.

    Writes rows ``split * B*H*Lq + bh*Lq + i`` of O (Dv wide), LSE (natural log) and MASS (M wide);
    without split-K there is one split and these are the final outputs. Per-modality key sums of
    the split's key range are computed after the main loop by the programs of Dv chunk 0 and query
    tiles below KS_SLOTS (the launcher picks KS_SLOTS <= the number of query tiles of any config):
    slot s sums key tiles s, s + KS_SLOTS, ... into KSUM[split, bh, s] (M, D), so every key is
    counted once per (split, b, h), the work is spread evenly and the main loop carries no key-sum
    registers; the launcher adds the slots (and the splits).
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_z = tl.program_id(2)
    split = pid_z // DV_CHUNKS
    dvc = pid_z % DV_CHUNKS
    BH = tl.num_programs(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    hk = h // GROUP
    q_base = Q + b * sqb + h * sqh
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    ids_row = b * Lk
    mask_base = MASK + b * smb + h * smh

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_valid = offs_m < Lq
    # dropout counter of each row's first 4-key group (the query head h counts, not the kv head)
    row_g = (pid_bh.to(tl.int64) * Lq + offs_m) * KEY_GROUPS
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < D
    offs_dv = dvc * BLOCK_DV + tl.arange(0, BLOCK_DV)
    dv_valid = offs_dv < Dv
    offs_mod = tl.arange(0, M_PAD)

    lo = split * keys_per_split
    hi = tl.minimum(lo + keys_per_split, Lk)
    vis_hi = hi
    if CAUSAL:
        # row i sees keys j <= i + CAUSAL_OFF; the tile's last row is (pid_m + 1) * BLOCK_M - 1
        vis_hi = tl.maximum(tl.minimum(hi, (pid_m + 1) * BLOCK_M + CAUSAL_OFF), lo)

    if D_CHUNKS == 1:
        q = tl.load(
            q_base + offs_m[:, None] * sql + offs_d[None, :] * sqd,
            mask=m_valid[:, None] & d_valid[None, :],
            other=0.0,
        )
        if ROTATE:
            # q_i <- R q_i, in row form q @ R^T, float32. With a row subset only tiles that hold
            # a selected row pay for the product (the paper rotates the [CLS] row alone).
            q32 = q.to(tl.float32)
            if HAS_ROWS:
                sel = tl.load(ROWS + b * Lq + offs_m, mask=m_valid, other=0) != 0
                n_sel = tl.sum(sel.to(tl.int32), axis=0)
            else:
                n_sel = 1
            if n_sel > 0:
                rot = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
                r_base = R + h * D * D
                for c in tl.static_range(BLOCK_D // ROT_CHUNK):
                    offs_c = c * ROT_CHUNK + tl.arange(0, ROT_CHUNK)
                    c_valid = offs_c < D
                    qc = tl.load(
                        q_base + offs_m[:, None] * sql + offs_c[None, :] * sqd,
                        mask=m_valid[:, None] & c_valid[None, :],
                        other=0.0,
                    ).to(tl.float32)
                    # W[j, i] = R[i, j]
                    w = tl.load(
                        r_base + offs_d[None, :] * D + offs_c[:, None],
                        mask=c_valid[:, None] & d_valid[None, :],
                        other=0.0,
                    )
                    rot += _mm(qc, w, ROT_PRECISION, UPCAST)
                if HAS_ROWS:
                    q32 = tl.where(sel[:, None], rot, q32)
                else:
                    q32 = rot
            q = q32.to(Q.dtype.element_ty)
    else:
        q = 0  # the chunked path loads query chunks per key tile instead

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    mass = tl.zeros([BLOCK_M, M_PAD], dtype=tl.float32)

    # Interior tiles (every key in range, all visible to every row when causal) skip the score
    # mask unless there is key padding; the boundary tiles after them apply it.
    interior_hi = lo + ((vis_hi - lo) // BLOCK_N) * BLOCK_N
    if CAUSAL:
        # tile [s, s + BLOCK_N) is fully visible when its last key <= first row + CAUSAL_OFF
        first_row = pid_m * BLOCK_M
        causal_hi = lo + tl.maximum(first_row + CAUSAL_OFF + 1 - lo, 0) // BLOCK_N * BLOCK_N
        interior_hi = tl.minimum(interior_hi, causal_hi)
    acc, l_i, m_i, mass = _fwd_inner(
        acc, l_i, m_i, mass, q, q_base, k_base, v_base, IDS, PAD, ids_row,
        sql, sqd, skl, skd, svl, svd, lo, interior_hi, vis_hi, offs_m, m_valid, offs_d, d_valid,
        offs_dv, dv_valid, offs_mod, qk_scale, D, CAUSAL_OFF, mask_base, smq, smk, row_g,
        seed_lo, seed_hi, off_lo, off_hi, drop_thr,
        BLOCK_M, BLOCK_N, BLOCK_D, D_CHUNKS, False, HAS_PAD, CAUSAL, STATS, PRECISION,
        MASS_DOT, M_PAD, UPCAST, HAS_MASK, MASK_BOOL, DROPOUT,
    )  # fmt: skip
    acc, l_i, m_i, mass = _fwd_inner(
        acc, l_i, m_i, mass, q, q_base, k_base, v_base, IDS, PAD, ids_row,
        sql, sqd, skl, skd, svl, svd, interior_hi, vis_hi, vis_hi, offs_m, m_valid, offs_d,
        d_valid, offs_dv, dv_valid, offs_mod, qk_scale, D, CAUSAL_OFF, mask_base, smq, smk,
        row_g, seed_lo, seed_hi, off_lo, off_hi, drop_thr,
        BLOCK_M, BLOCK_N, BLOCK_D, D_CHUNKS, True, HAS_PAD, CAUSAL, STATS, PRECISION,
        MASS_DOT, M_PAD, UPCAST, HAS_MASK, MASK_BOOL, DROPOUT,
    )  # fmt: skip

    row = (split * BH + pid_bh).to(tl.int64) * Lq + offs_m
    l_use = tl.where(l_i == 0.0, 1.0, l_i)  # 0: a row that saw no key; NaN stays NaN
    out = acc / l_use[:, None]
    if DROPOUT:
        out = out * drop_scale
    tl.store(
        O + row[:, None] * Dv + offs_dv[None, :],
        out.to(O.dtype.element_ty),
        mask=m_valid[:, None] & dv_valid[None, :],
    )
    if dvc == 0:
        # a row that saw no key: -inf; a NaN score (e.g. from a NaN in a float mask): NaN
        lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log2(l_use)) * _LN2)
        tl.store(LSE + row, lse, mask=m_valid)
        if STATS:
            # after the output is stored, so the accumulator is dead during this pass
            mass = _mass_of_mixed_tiles(
                mass, m_i, q, q_base, k_base, IDS, PAD, ids_row, sql, sqd, skl, skd, lo, vis_hi,
                offs_m, m_valid, offs_d, d_valid, offs_mod, qk_scale, D, CAUSAL_OFF, mask_base,
                smq, smk, BLOCK_M, BLOCK_N, BLOCK_D, D_CHUNKS, M_PAD, HAS_PAD, CAUSAL, PRECISION,
                MASS_DOT, UPCAST, HAS_MASK, MASK_BOOL,
            )  # fmt: skip
            tl.store(
                MASS + row[:, None] * M + offs_mod[None, :],
                mass / l_use[:, None],
                mask=m_valid[:, None] & (offs_mod[None, :] < M),
            )
    if STATS:
        if (dvc == 0) & (pid_m < KS_SLOTS):
            ks_base = KSUM + ((split * BH + pid_bh) * KS_SLOTS + pid_m).to(tl.int64) * M * D
            first = lo + pid_m * BLOCK_N
            step = KS_SLOTS * BLOCK_N
            for c in range(D_CHUNKS):
                offs_c = c * BLOCK_D + tl.arange(0, BLOCK_D)
                c_valid = offs_c < D
                ks = _key_sum_tiles(
                    k_base, IDS, PAD, ids_row, skl, skd, first, hi, step, offs_c, c_valid,
                    offs_mod, BLOCK_N, BLOCK_D, M_PAD, HAS_PAD, MASS_DOT, UPCAST,
                )  # fmt: skip
                tl.store(
                    ks_base + offs_mod[None, :] * D + offs_c[:, None],
                    ks,
                    mask=c_valid[:, None] & (offs_mod[None, :] < M),
                )


@triton.jit
def _rolling_attn_merge_kernel(
    OP,
    LSEP,
    MASSP,
    O,
    LSE,
    MASS,
    S,
    ROWS_TOTAL,
    Dv,
    M,
    BLOCK_S: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    DV_CHUNKS: tl.constexpr,
    M_PAD: tl.constexpr,
    STATS: tl.constexpr,
):
    """Flash-decoding merge: combine the S partial results of one row, weighted by exp(lse_s).

    Partials are normalised per split (out_s, mass_s sum to that split's mass), so the merged
    value is sum_s w_s * x_s with w_s = exp(lse_s - lse). A row no split saw stays 0, lse -inf.
    """
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    s_valid = offs_s < S
    lse_s = tl.load(LSEP + offs_s * ROWS_TOTAL + row, mask=s_valid, other=float("-inf"))
    mx = tl.max(lse_s, axis=0)
    mx_use = tl.where(mx == float("-inf"), 0.0, mx)
    w = tl.exp(lse_s - mx_use)
    total = tl.sum(w, axis=0)
    # total is 0 when no split saw a key (row of zeros, lse -inf) and NaN when one saw a NaN
    # score, which then reaches the row's output and lse
    inv = tl.where(total == 0.0, 0.0, 1.0 / tl.where(total == 0.0, 1.0, total))
    w = w * inv
    lse = tl.where(total == 0.0, float("-inf"), mx_use + tl.log(tl.where(total == 0.0, 1.0, total)))
    tl.store(LSE + row, lse)
    for c in tl.static_range(DV_CHUNKS):
        offs_dv = c * BLOCK_DV + tl.arange(0, BLOCK_DV)
        dv_valid = offs_dv < Dv
        part = tl.load(
            OP + (offs_s[:, None] * ROWS_TOTAL + row) * Dv + offs_dv[None, :],
            mask=s_valid[:, None] & dv_valid[None, :],
            other=0.0,
        )
        out = tl.sum(part * w[:, None], axis=0)
        tl.store(O + row * Dv + offs_dv, out.to(O.dtype.element_ty), mask=dv_valid)
    if STATS:
        offs_mod = tl.arange(0, M_PAD)
        mod_valid = offs_mod < M
        part = tl.load(
            MASSP + (offs_s[:, None] * ROWS_TOTAL + row) * M + offs_mod[None, :],
            mask=s_valid[:, None] & mod_valid[None, :],
            other=0.0,
        )
        tl.store(MASS + row * M + offs_mod, tl.sum(part * w[:, None], axis=0), mask=mod_valid)


@triton.jit
def _rotate_rows_kernel(
    X,
    R,
    ROWS,
    Y,
    sxb,
    sxh,
    sxl,
    sxd,
    H,
    L,
    D,
    stride_rj,
    stride_ri,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_C: tl.constexpr,
    HAS_ROWS: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """y_i = sum_j x_j R[h][i, j] (stride_rj=1, stride_ri=D: q @ R^T, the forward rotation) or
    sum_j x_j R[h][j, i] (stride_rj=D, stride_ri=1: dq_rot @ R, its gradient) on the selected rows;
    other rows are copied. One (row tile, batch*head, output chunk) per program; Y contiguous."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_o = tl.program_id(2)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    x_base = X + b * sxb + h * sxh
    r_base = R + h * D * D
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_valid = offs_m < L
    offs_o = pid_o * BLOCK_D + tl.arange(0, BLOCK_D)
    o_valid = offs_o < D
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_c in range(0, D, BLOCK_C):
        offs_c = start_c + tl.arange(0, BLOCK_C)
        c_valid = offs_c < D
        x = tl.load(
            x_base + offs_m[:, None] * sxl + offs_c[None, :] * sxd,
            mask=m_valid[:, None] & c_valid[None, :],
            other=0.0,
        ).to(tl.float32)
        w = tl.load(
            r_base + offs_c[:, None] * stride_rj + offs_o[None, :] * stride_ri,
            mask=c_valid[:, None] & o_valid[None, :],
            other=0.0,
        )
        acc += _mm(x, w, PRECISION, UPCAST)
    if HAS_ROWS:
        sel = tl.load(ROWS + b * L + offs_m, mask=m_valid, other=0) != 0
        x = tl.load(
            x_base + offs_m[:, None] * sxl + offs_o[None, :] * sxd,
            mask=m_valid[:, None] & o_valid[None, :],
            other=0.0,
        ).to(tl.float32)
        acc = tl.where(sel[:, None], acc, x)
    row = pid_bh.to(tl.int64) * L + offs_m
    tl.store(
        Y + row[:, None] * D + offs_o[None, :],
        acc.to(Y.dtype.element_ty),
        mask=m_valid[:, None] & o_valid[None, :],
    )


@triton.jit
def _rolling_attn_bwd_preprocess_kernel(
    O,
    DO,
    DELTA,
    sdb,
    sdh,
    sdl,
    sdd,
    H,
    Lq,
    Dv,
    BLOCK_M: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    DV_CHUNKS: tl.constexpr,
):
    """delta_i = sum_d dO_id * O_id (float32); O is contiguous, dO any strides."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_valid = offs_m < Lq
    row = pid_bh.to(tl.int64) * Lq + offs_m
    delta = tl.zeros([BLOCK_M], dtype=tl.float32)
    for c in tl.static_range(DV_CHUNKS):
        offs_dv = c * BLOCK_DV + tl.arange(0, BLOCK_DV)
        mask = m_valid[:, None] & (offs_dv[None, :] < Dv)
        o = tl.load(O + row[:, None] * Dv + offs_dv[None, :], mask=mask, other=0.0)
        do = tl.load(
            DO + b * sdb + h * sdh + offs_m[:, None] * sdl + offs_dv[None, :] * sdd,
            mask=mask,
            other=0.0,
        )
        delta += tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + row, delta, mask=m_valid)


@triton.jit(do_not_specialize=_RNG_ARGS)
def _rolling_attn_bwd_dkdv_kernel(
    Q,
    K,
    V,
    PAD,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
    MASK,
    sqb,
    sqh,
    sql,
    sqd,
    skb,
    skh,
    skl,
    skd,
    svb,
    svh,
    svl,
    svd,
    sdb,
    sdh,
    sdl,
    sdd,
    smb,
    smh,
    smq,
    smk,
    H,
    Lq,
    Lk,
    D,
    Dv,
    GROUP,
    CAUSAL_OFF,
    scale,
    qk_scale,
    KEY_GROUPS,
    seed_lo,
    seed_hi,
    off_lo,
    off_hi,
    drop_thr,
    drop_scale,
    LQ_KEY,
    LK_KEY,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    D_CHUNKS: tl.constexpr,
    DV_CHUNKS: tl.constexpr,
    HAS_PAD: tl.constexpr,
    CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    HAS_MASK: tl.constexpr,
    MASK_BOOL: tl.constexpr,
    DROPOUT: tl.constexpr,
):
    """dK, dV of one key tile, streaming the query tiles that can see it (Q is the rotated q).

    Program axis 2 is the head-dim chunk c this program writes (of dK and of dV); with head dims
    up to 256 there is one. Scores and dP are recomputed over the full head dims either way.
    Works in the transposed form (keys along rows): sT = K Q^T, pT = exp(sT - lse).
    """
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)  # (batch, key/value head)
    c = tl.program_id(2)
    HKV = H // GROUP
    b = (pid_bh // HKV).to(tl.int64)
    hk = (pid_bh % HKV).to(tl.int64)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_valid = offs_n < Lk
    key_ok = n_valid
    if HAS_PAD:
        key_ok = key_ok & (tl.load(PAD + b * Lk + offs_n, mask=n_valid, other=0) != 0)
    offs_d0 = tl.arange(0, BLOCK_D)
    offs_dv0 = tl.arange(0, BLOCK_DV)
    # the chunk this program owns; with one chunk it is the whole (padded) head dim
    offs_dk = c * BLOCK_D + offs_d0
    dk_valid = offs_dk < D
    offs_dvc = c * BLOCK_DV + offs_dv0
    dvc_valid = offs_dvc < Dv
    if D_CHUNKS == 1:
        k = tl.load(
            k_base + offs_n[:, None] * skl + offs_d0[None, :] * skd,
            mask=n_valid[:, None] & (offs_d0[None, :] < D),
            other=0.0,
        )
    if DV_CHUNKS == 1:
        v = tl.load(
            v_base + offs_n[:, None] * svl + offs_dv0[None, :] * svd,
            mask=n_valid[:, None] & (offs_dv0[None, :] < Dv),
            other=0.0,
        )

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    m_lo = 0
    if CAUSAL:
        # the first row that sees the tile's first key: i >= j - CAUSAL_OFF
        m_lo = (tl.maximum(pid_n * BLOCK_N - CAUSAL_OFF, 0) // BLOCK_M) * BLOCK_M
    # grouped-query attention: dK, dV of this key/value head sum over its GROUP query heads
    for g in range(GROUP):
        h = hk * GROUP + g
        q_base = Q + b * sqb + h * sqh
        do_base = DO + b * sdb + h * sdh
        mask_base = MASK + b * smb + h * smh
        row0 = (b * H + h) * Lq
        for start_m in range(m_lo, Lq, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_valid = offs_m < Lq
            if D_CHUNKS == 1:
                qt = tl.load(
                    q_base + offs_m[None, :] * sql + offs_d0[:, None] * sqd,
                    mask=m_valid[None, :] & (offs_d0[:, None] < D),
                    other=0.0,
                )
                st = _mm(k, qt, PRECISION, UPCAST)
            else:
                st = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
                for cc in range(D_CHUNKS):
                    offs_c = cc * BLOCK_D + offs_d0
                    c_valid = offs_c < D
                    kc = tl.load(
                        k_base + offs_n[:, None] * skl + offs_c[None, :] * skd,
                        mask=n_valid[:, None] & c_valid[None, :],
                        other=0.0,
                    )
                    qc = tl.load(
                        q_base + offs_m[None, :] * sql + offs_c[:, None] * sqd,
                        mask=m_valid[None, :] & c_valid[:, None],
                        other=0.0,
                    )
                    st += _mm(kc, qc, PRECISION, UPCAST)
                qt = tl.load(
                    q_base + offs_m[None, :] * sql + offs_dk[:, None] * sqd,
                    mask=m_valid[None, :] & dk_valid[:, None],
                    other=0.0,
                )
            lse = tl.load(LSE + row0 + offs_m, mask=m_valid, other=0.0)
            lse2 = tl.where(lse == float("-inf"), 0.0, lse * _LOG2E)
            vis = key_ok[:, None] & m_valid[None, :]
            if CAUSAL:
                vis = vis & (offs_m[None, :] + CAUSAL_OFF >= offs_n[:, None])
            st = st * qk_scale
            if HAS_MASK:
                mt = _mask_tile(mask_base, smq, smk, offs_m, m_valid, offs_n, n_valid, True)
                if MASK_BOOL:
                    vis = vis & (mt != 0)
                else:
                    st = st + _mask_bias(mt)
            pt = tl.where(vis, tl.exp2(st - lse2[None, :]), 0.0)
            if DROPOUT:
                # the forward's keep-mask, regenerated (rows of this query head, this key tile)
                keep_t = tl.trans(
                    _keep_tile((row0 + offs_m) * KEY_GROUPS, pid_n * BLOCK_N, seed_lo, seed_hi,
                               off_lo, off_hi, drop_thr, BLOCK_N)
                )  # fmt: skip
                pt_out = tl.where(keep_t, pt, 0.0)  # dV takes 1 / (1 - p) after the loop
            else:
                pt_out = pt
            # dO^T: the whole (padded) Dv when it fits, else this program's chunk
            if DV_CHUNKS == 1:
                dot_ = tl.load(
                    do_base + offs_m[None, :] * sdl + offs_dv0[:, None] * sdd,
                    mask=m_valid[None, :] & (offs_dv0[:, None] < Dv),
                    other=0.0,
                )
            else:
                dot_ = tl.load(
                    do_base + offs_m[None, :] * sdl + offs_dvc[:, None] * sdd,
                    mask=m_valid[None, :] & dvc_valid[:, None],
                    other=0.0,
                )
            dv += _mm(pt_out.to(DO.dtype.element_ty), tl.trans(dot_), PRECISION, UPCAST)
            if DV_CHUNKS == 1:
                dpt = _mm(v, dot_, PRECISION, UPCAST)
            else:
                dpt = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
                for cc in range(DV_CHUNKS):
                    offs_c = cc * BLOCK_DV + offs_dv0
                    c_valid = offs_c < Dv
                    vc = tl.load(
                        v_base + offs_n[:, None] * svl + offs_c[None, :] * svd,
                        mask=n_valid[:, None] & c_valid[None, :],
                        other=0.0,
                    )
                    doc = tl.load(
                        do_base + offs_m[None, :] * sdl + offs_c[:, None] * sdd,
                        mask=m_valid[None, :] & c_valid[:, None],
                        other=0.0,
                    )
                    dpt += _mm(vc, doc, PRECISION, UPCAST)
            if DROPOUT:
                dpt = tl.where(keep_t, dpt * drop_scale, 0.0)
            delta = tl.load(DELTA + row0 + offs_m, mask=m_valid, other=0.0)
            dst = pt * (dpt - delta[None, :])
            dk += _mm(dst.to(Q.dtype.element_ty), tl.trans(qt), PRECISION, UPCAST)

    dk = dk * scale
    if DROPOUT:
        dv = dv * drop_scale
    krow = pid_bh.to(tl.int64) * Lk + offs_n
    tl.store(
        DK + krow[:, None] * D + offs_dk[None, :],
        dk.to(DK.dtype.element_ty),
        mask=n_valid[:, None] & dk_valid[None, :],
    )
    tl.store(
        DV + krow[:, None] * Dv + offs_dvc[None, :],
        dv.to(DV.dtype.element_ty),
        mask=n_valid[:, None] & dvc_valid[None, :],
    )


@triton.jit(do_not_specialize=_RNG_ARGS)
def _rolling_attn_bwd_dq_kernel(
    Q,
    K,
    V,
    PAD,
    DO,
    LSE,
    DELTA,
    DQ,
    MASK,
    sqb,
    sqh,
    sql,
    sqd,
    skb,
    skh,
    skl,
    skd,
    svb,
    svh,
    svl,
    svd,
    sdb,
    sdh,
    sdl,
    sdd,
    smb,
    smh,
    smq,
    smk,
    H,
    Lq,
    Lk,
    D,
    Dv,
    GROUP,
    CAUSAL_OFF,
    scale,
    qk_scale,
    KEY_GROUPS,
    seed_lo,
    seed_hi,
    off_lo,
    off_hi,
    drop_thr,
    drop_scale,
    LQ_KEY,
    LK_KEY,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    D_CHUNKS: tl.constexpr,
    DV_CHUNKS: tl.constexpr,
    HAS_PAD: tl.constexpr,
    CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    HAS_MASK: tl.constexpr,
    MASK_BOOL: tl.constexpr,
    DROPOUT: tl.constexpr,
):
    """dQ (of the rotated queries) of one query tile, streaming the key tiles it sees.

    Program axis 2 is the head-dim chunk of dQ this program writes. DQ is contiguous; the
    launcher applies the rotation's transpose afterwards when there is a rotation.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    c = tl.program_id(2)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    hk = h // GROUP
    q_base = Q + b * sqb + h * sqh
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    do_base = DO + b * sdb + h * sdh
    mask_base = MASK + b * smb + h * smh
    row = pid_bh.to(tl.int64) * Lq + tl.arange(0, BLOCK_M) + pid_m * BLOCK_M
    row_g = row * KEY_GROUPS  # dropout counters of each row's first 4-key group

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_valid = offs_m < Lq
    offs_d0 = tl.arange(0, BLOCK_D)
    offs_dv0 = tl.arange(0, BLOCK_DV)
    offs_dq = c * BLOCK_D + offs_d0
    dq_valid = offs_dq < D
    if D_CHUNKS == 1:
        q = tl.load(
            q_base + offs_m[:, None] * sql + offs_d0[None, :] * sqd,
            mask=m_valid[:, None] & (offs_d0[None, :] < D),
            other=0.0,
        )
    if DV_CHUNKS == 1:
        do = tl.load(
            do_base + offs_m[:, None] * sdl + offs_dv0[None, :] * sdd,
            mask=m_valid[:, None] & (offs_dv0[None, :] < Dv),
            other=0.0,
        )
    lse = tl.load(LSE + row, mask=m_valid, other=0.0)
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * _LOG2E)
    delta = tl.load(DELTA + row, mask=m_valid, other=0.0)

    hi = Lk
    if CAUSAL:
        hi = tl.maximum(tl.minimum(Lk, (pid_m + 1) * BLOCK_M + CAUSAL_OFF), 0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < hi
        if D_CHUNKS == 1:
            kt = tl.load(
                k_base + offs_n[None, :] * skl + offs_d0[:, None] * skd,
                mask=n_valid[None, :] & (offs_d0[:, None] < D),
                other=0.0,
            )
            s = _mm(q, kt, PRECISION, UPCAST)
        else:
            s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for cc in range(D_CHUNKS):
                offs_c = cc * BLOCK_D + offs_d0
                c_valid = offs_c < D
                qc = tl.load(
                    q_base + offs_m[:, None] * sql + offs_c[None, :] * sqd,
                    mask=m_valid[:, None] & c_valid[None, :],
                    other=0.0,
                )
                kc = tl.load(
                    k_base + offs_n[None, :] * skl + offs_c[:, None] * skd,
                    mask=n_valid[None, :] & c_valid[:, None],
                    other=0.0,
                )
                s += _mm(qc, kc, PRECISION, UPCAST)
            kt = tl.load(
                k_base + offs_n[None, :] * skl + offs_dq[:, None] * skd,
                mask=n_valid[None, :] & dq_valid[:, None],
                other=0.0,
            )
        key_ok = n_valid
        if HAS_PAD:
            key_ok = key_ok & (tl.load(PAD + b * Lk + offs_n, mask=n_valid, other=0) != 0)
        vis = key_ok[None, :] & m_valid[:, None]
        if CAUSAL:
            vis = vis & (offs_n[None, :] <= offs_m[:, None] + CAUSAL_OFF)
        s = s * qk_scale
        if HAS_MASK:
            mt = _mask_tile(mask_base, smq, smk, offs_m, m_valid, offs_n, n_valid, False)
            if MASK_BOOL:
                vis = vis & (mt != 0)
            else:
                s = s + _mask_bias(mt)
        p = tl.where(vis, tl.exp2(s - lse2[:, None]), 0.0)
        if DV_CHUNKS == 1:
            vt = tl.load(
                v_base + offs_n[None, :] * svl + offs_dv0[:, None] * svd,
                mask=n_valid[None, :] & (offs_dv0[:, None] < Dv),
                other=0.0,
            )
            dp = _mm(do, vt, PRECISION, UPCAST)
        else:
            dp = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for cc in range(DV_CHUNKS):
                offs_c = cc * BLOCK_DV + offs_dv0
                c_valid = offs_c < Dv
                doc = tl.load(
                    do_base + offs_m[:, None] * sdl + offs_c[None, :] * sdd,
                    mask=m_valid[:, None] & c_valid[None, :],
                    other=0.0,
                )
                vc = tl.load(
                    v_base + offs_n[None, :] * svl + offs_c[:, None] * svd,
                    mask=n_valid[None, :] & c_valid[:, None],
                    other=0.0,
                )
                dp += _mm(doc, vc, PRECISION, UPCAST)
        if DROPOUT:
            keep = _keep_tile(row_g, start_n, seed_lo, seed_hi, off_lo, off_hi, drop_thr, BLOCK_N)
            dp = tl.where(keep, dp * drop_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq += _mm(ds.to(K.dtype.element_ty), tl.trans(kt), PRECISION, UPCAST)

    dq = dq * scale
    tl.store(
        DQ + row[:, None] * D + offs_dq[None, :],
        dq.to(DQ.dtype.element_ty),
        mask=m_valid[:, None] & dq_valid[None, :],
    )
