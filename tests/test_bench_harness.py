"""The benchmark harness's arithmetic (bench/harness.py): ratios taken within a round."""

import pytest
import torch

from bench.harness import GEMM_N, gemm_call, interleaved_rounds, roofline_in_rounds


def test_roofline_follows_the_machine_speed_round_by_round():
    # The machine runs at full speed for three rounds, then at half speed for four: the row and
    # the GEMM both take twice as long. The row reaches 40 % of the GEMM in every round.
    gemm_flops = 2.0 * GEMM_N**3
    flops = 1e9
    gemm_ms = [10.0] * 3 + [20.0] * 4
    row_ms = [flops / (0.4 * gemm_flops / g) for g in gemm_ms]
    r = roofline_in_rounds(flops, row_ms, gemm_ms)
    assert r["roofline"] == pytest.approx(0.4)
    assert r["gemm_gflops"] == pytest.approx(gemm_flops / 20e-3 / 1e9)
    # a GEMM timed once, in a fast round, would have put the row at 20 %
    assert flops / (sorted(row_ms)[3] * 1e-3) / (gemm_flops / 10e-3) == pytest.approx(0.2)


def test_roofline_is_the_median_of_the_per_round_fractions():
    gemm_flops = 2.0 * GEMM_N**3
    fractions = [0.5, 0.1, 0.3, 0.9, 0.2]
    gemm_ms = [10.0, 12.0, 9.0, 30.0, 11.0]
    row_ms = [1e9 / (f * gemm_flops / g) for f, g in zip(fractions, gemm_ms)]
    assert roofline_in_rounds(1e9, row_ms, gemm_ms)["roofline"] == pytest.approx(0.3)


def test_interleaved_rounds_calls_each_function_once_per_round_in_turn():
    calls = []
    fns = [lambda i=i: calls.append(i) for i in range(3)]
    times = interleaved_rounds(fns, warmup=2, reps=4)
    # warm-up in order, then an order rotated by one each round
    assert calls == [0, 1, 2] * 2 + [0, 1, 2, 1, 2, 0, 2, 0, 1, 0, 1, 2]
    assert [len(t) for t in times] == [4, 4, 4]
    assert all(x >= 0.0 for t in times for x in t)


def test_interleaved_rounds_lead_sweeps_first_and_each_function_follows_it_equally_often():
    calls = []
    fns = [lambda i=i: calls.append(i) for i in range(2)]
    times = interleaved_rounds(fns, warmup=0, reps=4, lead=[lambda: calls.append("gemm")])
    assert calls == ["gemm", 0, 1, "gemm", 1, 0, "gemm", 0, 1, "gemm", 1, 0]
    assert [len(t) for t in times] == [4, 4, 4]  # fns, then the lead


def test_gemm_call_multiplies():
    mm = gemm_call(torch.float32, n=64)
    out = mm()
    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 64, generator=g)
    b = torch.randn(64, 64, generator=g)
    torch.testing.assert_close(out, a @ b)


def test_tile_probe_builds_and_measures(tmp_path):
    from bench import tile_probe

    exe = tile_probe.build(tmp_path / "tile_probe")
    assert exe.exists()
    if not tile_probe.cpu_has_bf16_dot():
        pytest.skip("this CPU has no AVX512_BF16: the probe is built, not run")
    r = tile_probe.run(exe, tiles=False)
    assert 0.0 < r["vdpbf16ps_ns"] < 100 and 0.0 < r["vfmadd231ps_ns"] < 100
    for key in ("vec_dp32_ns", "vec_softmax_ns", "vec_dp32_softmax_ns"):
        assert 0.0 < r[key] < 1e4, key
    # one loop doing both does no less than either alone, and no more than the two in turn + slack
    assert 0.5 < r["vec_overlap"] <= 2.05
    assert r["vec_forward_bound_gflops"] <= r["vec_products_only_gflops"] * 1.05
    assert "float32 FMAs" in tile_probe.report(r) and "softmax hides" in tile_probe.report(r)
    if not tile_probe.cpu_has_amx():
        pytest.skip("this CPU has no AMX-BF16: the tile part is not run")
    r = tile_probe.run(exe)
    for key in ("dp_ns", "softmax_vector_ns", "dp_with_softmax_ns", "qk_ns_per_256_scores"):
        assert 0.0 < r[key] < 1e6, key
    # a product with loads and stores cannot beat the tile unit on tiles already in registers
    for key in ("qk", "pv", "qk_nostore", "pv_blocked"):
        assert 0.0 < r[f"{key}_fraction_of_peak"] <= 1.2, key
    assert 0.5 < r["overlap"] < 2.5
    assert "tile unit's peak" in tile_probe.report(r)


def _fake_rates(monkeypatch, rates):
    """gemm_gflops over a fake _gemm_rate: ``rates`` maps a dtype to its GFLOP/s; the (dtype, n)
    products timed are returned."""
    from bench import harness

    timed = []

    def rate(dtype, n, reps, best=False):
        timed.append((dtype, n))
        return rates[dtype]

    monkeypatch.setattr(harness, "_gemm_rate", rate)
    monkeypatch.setattr(harness, "_GEMM_CACHE", {})
    return timed


def test_a_dtype_without_a_hardware_gemm_is_probed_small_and_has_no_roofline(monkeypatch):
    # torch's bf16 GEMM on a CPU without bf16 instructions: 0.4 GFLOP/s, 43 s per 2048^3 product
    from bench import harness

    timed = _fake_rates(monkeypatch, {torch.float32: 170.0, torch.bfloat16: 0.4})
    assert harness.gemm_gflops(torch.bfloat16) == 0.4
    assert timed == [(torch.bfloat16, harness.GEMM_PROBE_N)]  # the full product is not timed
    assert not harness.gemm_has_hardware(torch.bfloat16)
    assert harness.roofline_lead(torch.bfloat16) == []
    r = harness.roofline_of(1e9, [1.0, 2.0], [], torch.bfloat16)
    assert r == {"roofline": None, "gemm_gflops": 0.4}
    assert "no hardware path" in harness.gemm_line(2)
    assert "float32 170.0 GFLOP/s" in harness.gemm_line(2)


def test_a_dtype_with_a_hardware_gemm_is_timed_full_size_in_every_round(monkeypatch):
    from bench import harness

    timed = _fake_rates(monkeypatch, {torch.float32: 170.0, torch.bfloat16: 400.0})
    assert harness.gemm_gflops(torch.bfloat16) == 400.0
    assert timed == [(torch.bfloat16, harness.GEMM_PROBE_N), (torch.bfloat16, GEMM_N)]
    assert harness.gemm_has_hardware(torch.bfloat16) and harness.gemm_has_hardware(torch.float32)
    assert len(harness.roofline_lead(torch.bfloat16)) == 1
    gemm_flops = 2.0 * GEMM_N**3
    r = harness.roofline_of(gemm_flops / 2, [10.0], [[10.0]], torch.bfloat16)
    assert r["roofline"] == pytest.approx(0.5)
    assert "no hardware path" not in harness.gemm_line(2)


def test_the_probe_is_not_fooled_by_one_slow_product(monkeypatch):
    # One 256^3 product lasts 0.1 ms at a hardware rate: a core preempted for a few milliseconds
    # during the only sample made a 390 GFLOP/s bf16 machine read as one without a hardware GEMM.
    from bench import harness

    monkeypatch.setattr(harness, "_GEMM_CACHE", {})
    ms_at_probe_size = {torch.float32: 0.2, torch.bfloat16: 0.086}  # 170 / 390 GFLOP/s
    sizes = []

    def rounds(fns, *, warmup, reps, **_):
        (product,) = fns
        c = product()  # the product's result tells its dtype and size
        sizes.append((c.dtype, c.shape[0]))
        ms = ms_at_probe_size[c.dtype] * (c.shape[0] / harness.GEMM_PROBE_N) ** 3
        return [[4.0] + [ms] * (reps - 1)]  # the first timed product met a 4 ms stall

    monkeypatch.setattr(harness, "interleaved_rounds", rounds)
    assert harness.gemm_has_hardware(torch.bfloat16)
    assert (torch.bfloat16, harness.GEMM_N) in sizes  # the full product was timed too
    assert harness.gemm_gflops(torch.bfloat16) == pytest.approx(390.0, rel=0.01)


def test_cpu_bench_pair_without_a_hardware_gemm_times_the_two_calls_only(monkeypatch):
    from bench import cpu_bench, harness

    _fake_rates(monkeypatch, {torch.float32: 170.0, torch.bfloat16: 0.4})
    calls = []
    row = cpu_bench._pair(
        "fwd", (1, 1, 8, 8), torch.bfloat16,
        lambda: calls.append("fused"), lambda: calls.append("sdpa"),
        flops=1e6, reps=3, warmup=1,
    )  # fmt: skip
    assert sorted(set(calls)) == ["fused", "sdpa"] and len(calls) == 8
    assert row["roofline"] is None and row["gemm_gflops"] == 0.4
    assert row["fused_ms"] >= 0.0 and row["speedup"] > 0.0
    assert harness.gemm_has_hardware(torch.float32)
