// Memory-safety driver for the CPU kernels, built with AddressSanitizer and UBSan by
// tests/test_cpu_kernel.py (no torch): every compiled variant's forward, backward and second
// backward phase on random problems (odd sizes, padded rows, GQA, masks of every kind, causal
// offsets, dropout, rotation, statistics) with buffers of exactly the sizes the kernels are
// given, workspaces included, so that any read or write past them is reported.
//
//   sanitize_driver SEED PROBLEMS
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>
#include <memory>
#include <new>
#include <sys/syscall.h>
#include <unistd.h>
#include "cpu/isa.h"
using namespace rollingq; using namespace rollingq::cpu;
template <class T> struct Buf { std::unique_ptr<T[]> p; size_t n; Buf(size_t n_) : p(new T[n_ ? n_ : 1]), n(n_) {} T* get() { return p.get(); } };
// 64-byte aligned, still exactly n bytes (the forward's streaming stores need aligned rows)
struct AlignedBuf { char* p; AlignedBuf(size_t n) : p(static_cast<char*>(::operator new(n ? n : 1, std::align_val_t(64)))) {} ~AlignedBuf() { ::operator delete(p, std::align_val_t(64)); } char* get() { return p; } };
int main(int argc, char** argv) {
#if defined(__linux__) && defined(SYS_arch_prctl)
  syscall(SYS_arch_prctl, 0x1023, 18);  // the AMX tile state (the dispatcher asks the same)
#endif
  std::mt19937 g(argc > 1 ? atoi(argv[1]) : 0);
  auto R = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(g); };
  std::vector<const KernelTable*> tables = {&isa_generic::table};
#ifdef ROLLINGQ_ISA_AVX2
  tables.push_back(&isa_avx2::table);
#endif
#ifdef ROLLINGQ_ISA_AVX512
  tables.push_back(&isa_avx512::table);
  if (argc > 3 && argv[3][0] == '1') tables.push_back(&isa_avx512::table_amx);  // AMX present
#endif
  int iters = argc > 2 ? atoi(argv[2]) : 60;
  for (int it = 0; it < iters; ++it) {
    ElementType et = ElementType(R(0, 3));
    size_t es = et == ElementType::kFloat32 ? 4 : et == ElementType::kFloat64 ? 8 : 2;
    size_t as = et == ElementType::kFloat64 ? 8 : 4;
    int64_t B = R(1, 2), Hkv = R(1, 2), grp = R(1, 3), H = Hkv * grp, Lq = R(0, 150), Lk = R(0, 300);
    int64_t D = (R(0, 3) == 0) ? R(1, 40) : 2 * R(1, 48), Dv = (R(0, 3) == 0) ? R(1, 40) : 2 * R(1, 40);
    int M = R(0, 3);
    // layouts: (B, L, H, D) views with a row pad
    int64_t qpad = R(0, 3), kpad = R(0, 3);
    int64_t qrs = H * (D + qpad), krs = Hkv * (D + kpad), vrs = Hkv * (Dv + kpad);
    Buf<char> q(B * Lq * qrs * es), k(B * Lk * krs * es), v(B * Lk * vrs * es), out(B * H * Lq * Dv * es);
    for (size_t i = 0; i < q.n; ++i) q.get()[i] = char(R(0, 60)); for (size_t i = 0; i < k.n; ++i) k.get()[i] = char(R(0, 60)); for (size_t i = 0; i < v.n; ++i) v.get()[i] = char(R(0, 60));
    AttentionBwdParams p;
    p.batch = B; p.heads = H; p.heads_kv = Hkv; p.seqlen_q = Lq; p.seqlen_k = Lk; p.head_dim = D; p.value_dim = Dv;
    p.num_modalities = M; p.scale = 0.3;
    p.q = q.get(); p.q_batch_stride = Lq * qrs; p.q_head_stride = D + qpad; p.q_row_stride = qrs;
    p.k = k.get(); p.k_batch_stride = Lk * krs; p.k_head_stride = D + kpad; p.k_row_stride = krs;
    p.v = v.get(); p.v_batch_stride = Lk * vrs; p.v_head_stride = Dv + kpad; p.v_row_stride = vrs;
    Buf<char> rot(D * D * as); std::memset(rot.get(), 0, rot.n);
    Buf<bool> rows(B * Lq), pad(B * Lk); Buf<int32_t> ids(B * Lk);
    for (size_t i = 0; i < rows.n; ++i) rows.get()[i] = R(0, 3) == 0;
    for (size_t i = 0; i < pad.n; ++i) pad.get()[i] = R(0, 4) != 0;
    for (size_t i = 0; i < ids.n; ++i) ids.get()[i] = M > 0 ? R(-1, M - 1) : 0;
    if (R(0, 1)) { p.rotation = rot.get(); p.rotation_head_stride = 0; p.rotation_row_stride = R(0, 1) ? D : 1; p.rotation_col_stride = p.rotation_row_stride == D ? 1 : D; if (R(0, 1)) { p.rotated_rows = rows.get(); p.rotated_rows_batch_stride = Lq; } }
    if (R(0, 1)) { p.key_padding = pad.get(); p.key_padding_batch_stride = Lk; }
    p.key_modality = ids.get(); p.key_modality_batch_stride = Lk;
    p.is_causal = R(0, 1); p.causal_offset = p.is_causal ? R(-20, 20) : 0;
    int mk = R(0, 3);
    Buf<char> mask(std::max<int64_t>(1, Lq * Lk) * (mk == 1 ? 1 : mk == 2 ? 4 : es));
    for (size_t i = 0; i < mask.n; ++i) mask.get()[i] = mk == 1 ? char(R(0, 1)) : 0;
    if (mk) { p.attn_mask_kind = mk; p.attn_mask = mask.get(); p.mask_batch_stride = 0; p.mask_head_stride = 0;
      if (R(0, 1)) { p.mask_row_stride = Lk; p.mask_col_stride = 1; } else { p.mask_row_stride = 0; p.mask_col_stride = 1; } }
    if (R(0, 2) == 0) { p.dropout_p = 0.3; p.dropout_threshold = uint32_t(0.3 * 4294967296.0); p.dropout_seed = g(); p.dropout_offset = g(); }
    Buf<char> lse(B * H * Lq * as), mass(B * H * Lq * std::max(M, 1) * as), ks(B * H * std::max(M, 1) * D * as), kc(B * std::max(M, 1) * as);
    AlignedBuf out64(B * H * Lq * Dv * es);
    p.out = R(0, 1) ? out64.get() : out.get(); p.out_batch_stride = H * Lq * Dv; p.out_head_stride = Lq * Dv; p.out_row_stride = Dv;
    p.lse = lse.get(); if (M > 0) { p.modality_mass = mass.get(); p.key_sum = ks.get(); p.key_count = kc.get(); }
    Buf<char> dout(B * H * Lq * Dv * es), dq(B * H * Lq * D * es), dk(B * Hkv * Lk * D * es), dv(B * Hkv * Lk * Dv * es);
    std::memset(dout.get(), 0, dout.n);
    p.dout = dout.get(); p.dout_batch_stride = H * Lq * Dv; p.dout_head_stride = Lq * Dv; p.dout_row_stride = Dv;
    p.dq = dq.get(); p.dq_batch_stride = H * Lq * D; p.dq_head_stride = Lq * D; p.dq_row_stride = D;
    p.dk = dk.get(); p.dk_batch_stride = Hkv * Lk * D; p.dk_head_stride = Lk * D; p.dk_row_stride = D;
    p.dv = dv.get(); p.dv_batch_stride = Hkv * Lk * Dv; p.dv_head_stride = Lk * Dv; p.dv_row_stride = Dv;
    for (const KernelTable* t : tables) {
      if (B * H == 0) continue;
      Plan plan; plan.stream_bytes = R(0, 1) ? 0 : -1; t->fwd_plan(p, et, plan);
      { Buf<char> ws(plan.workspace_bytes); t->fwd_run(p, et, plan, 0, plan.tasks, ws.get()); }
      // the forward wrote lse; feed zeros as grad
      Plan bp; t->bwd_plan(p, et, bp);
      Buf<char> ws(bp.workspace_bytes), sh(bp.shared_bytes);
      t->bwd_run(p, et, bp, 0, bp.tasks, ws.get(), sh.get());
      t->bwd_reduce(p, et, bp, 0, bp.reduce_tasks, ws.get(), sh.get());
    }
  }
  printf("ok\n");
}
