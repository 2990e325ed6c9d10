"""Two gloo processes on localhost: the all-reduced controller rotates like one process would.

The ranks see different numbers of batches of different sizes, so a mean of per-rank means would
give a different answer from the sums the controller reduces.
"""

import os
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import assert_close

from rollingq_kernels import RollingQ, RollingQFusion

E, H = 16, 2
SIZES = (3, 5, 2, 4, 1)  # batch sizes; rank r takes batches r, r + 2, ...
TIMEOUT_S = 90


def _model():
    torch.manual_seed(2024)
    fusion = RollingQFusion(E, H, dtype=torch.float64)
    with torch.no_grad():
        fusion.attn.in_proj_bias.normal_()
    return fusion


def _data(seed):
    g = torch.Generator().manual_seed(seed)
    offset = torch.randn(E, dtype=torch.float64, generator=g)
    return [
        [
            torch.randn(B, 6, E, dtype=torch.float64, generator=g) + offset,
            torch.randn(B, 9, E, dtype=torch.float64, generator=g),
        ]
        for B in SIZES
    ]


def _paper_controller(fusion, **kw):
    # method="plane": the SVD's completion outside span(q, t) changes with the last bit of its
    # input, and one process sums in another order than the all-reduce
    return RollingQ(fusion, recipe="paper", method="plane", **kw)


def _worker(rank, world, port, seed, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    try:
        fusion = _model()
        rq = RollingQ(fusion, sigma=0.5)
        for tokens in _data(seed)[rank::world]:
            rq.observe(fusion(tokens, need_stats=True)[1])
        report = rq.step()
        # the official recipe: the AIR of each rank's last training batch, the target from a pass
        paper = _model()
        rq_p = _paper_controller(paper)
        mine = _data(seed)[rank::world]
        for tokens in mine:
            rq_p.observe(paper(tokens, need_stats=True)[1])
        rq_p.estimate(mine, lambda tokens: paper(tokens, need_stats=True))
        report_p = rq_p.step()
        torch.save(
            {
                "rotation": fusion.attn.rotation,
                "air": report.air,
                "n": report.num_samples,
                "paper_rotation": paper.attn.rotation,
                "paper_air": report_p.air,
                "paper_n": report_p.num_samples,
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_process_gloo_rotation_equals_single_process(tmp_path):
    seed = int(time.time()) % 100_000  # fresh data each run; printed on failure below
    ctx = mp.spawn(_worker, args=(2, _free_port(), seed, str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"distributed workers did not finish in {TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    fusion = _model()
    rq = RollingQ(fusion, sigma=0.5, distributed=False)
    for tokens in _data(seed):
        rq.observe(fusion(tokens, need_stats=True)[1])
    report = rq.step()
    assert report.rotated
    assert not torch.allclose(fusion.attn.rotation, torch.eye(E, dtype=torch.float64))
    for r, got in enumerate(ranks):
        assert got["n"] == sum(SIZES), f"seed {seed}: rank {r} saw {got['n']} samples"
        assert got["air"] == pytest.approx(report.air, rel=1e-10), f"seed {seed}, rank {r}"
        assert_close(
            got["rotation"], fusion.attn.rotation, rel=1e-10, name=f"seed {seed}: rank {r} R"
        )
    assert torch.equal(ranks[0]["rotation"], ranks[1]["rotation"])

    # paper recipe: the AIR over the union of the ranks' last batches (rank 0 ends with batch 4,
    # rank 1 with batch 3), the target from the mean of every rank's per-batch means
    data = _data(seed)
    last = [data[3], data[4]]
    air_model = _model()
    rq_air = _paper_controller(air_model, air_source="pass", max_rotations=0)
    rq_air.estimate(last, lambda tokens: air_model(tokens, need_stats=True))
    want_air = rq_air.step()
    paper = _model()
    rq_p = _paper_controller(paper, air_source="pass", distributed=False)
    rq_p.estimate(data, lambda tokens: paper(tokens, need_stats=True))
    assert rq_p.step().rotated  # sigma = 0: alpha = 1/2 whatever the AIR, so the same target
    for r, got in enumerate(ranks):
        assert got["paper_n"] == SIZES[3] + SIZES[4]
        assert got["paper_air"] == pytest.approx(want_air.air, rel=1e-10), f"seed {seed}, rank {r}"
        assert_close(
            got["paper_rotation"], paper.attn.rotation, rel=1e-10, name=f"seed {seed}: rank {r} R"
        )
