"""The code a reader copies first: README's "Use" block and the training loops of docs/rollingq.md,
executed as written (the loops with small stand-ins for the names they leave to the reader: a
loader of random backbone outputs, a head, an optimizer), and their results checked against the
reference. A change of the API that breaks one of them fails here instead of in a user's hands."""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F

import rollingq_kernels as rk

ROOT = Path(__file__).resolve().parents[1]


def python_blocks(doc: str):
    """The ```python blocks of ``doc``, in order."""
    return re.findall(r"```python\n(.*?)```", (ROOT / doc).read_text(), re.S)


def test_readme_use_block_runs_and_means_what_its_comments_say():
    block = python_blocks("README.md")[0]
    assert "rk.rolling_attention(" in block
    torch.manual_seed(0)
    ns: dict = {}
    exec(compile(block, "README.md (Use)", "exec"), ns)
    q, k, v, out, stats = ns["q"], ns["k"], ns["v"], ns["out"], ns["stats"]
    B, H, L, D = q.shape
    assert (B, H, L, D) == (8, 12, 1 + 196 + 77, 64)
    assert ns["ids"].tolist() == [-1] + [0] * 196 + [1] * 77  # "[-1, 0..., 1...]"
    ref_out, ref_stats = rk.rolling_attention_reference(
        q.double(), k.double(), v.double(), rotation=ns["R"].double(),
        rotated_queries=ns["cls_row"], key_modality=ns["ids"], return_stats=True,
    )  # fmt: skip
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)
    assert out.stride() == q.stride()  # the (B, L, H, D) layout in is the layout out
    mass = stats.modality_mass[:, :, 0]
    assert mass.shape == (B, H, 2)  # "(B, H, 2): how much the [CLS] row attends to each modality"
    torch.testing.assert_close(mass.double(), ref_stats.modality_mass[:, :, 0], atol=1e-5, rtol=0)
    # the rest of the [CLS] row's mass is on its own key, id -1
    assert bool(((mass.sum(-1) > 0.5) & (mass.sum(-1) <= 1 + 1e-5)).all())
    cos = rk.modality_cosine(q, stats)[:, 0]
    assert cos.shape == (B, 2) and bool(((cos >= -1 - 1e-6) & (cos <= 1 + 1e-6)).all())


def _loader(batches=2, B=4, La=6, Lv=5, E=768, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(B, La, E, generator=g) + 0.5,  # modality 0 favoured: keys near the query
            torch.randn(B, Lv, E, generator=g),
            torch.randint(0, classes, (B,), generator=g),
        )
        for _ in range(batches)
    ]


def _run(block: str, name: str, ns: dict) -> dict:
    exec(compile(block, name, "exec"), ns)
    return ns


def _check_one_rotation(fusion, report, epochs):
    assert math.isfinite(report.air)
    # beta = 0 and one rotation: the first epoch's step rotated, the last one did not
    assert not report.rotated and len(fusion.attn.air_history) == epochs
    assert int(fusion.attn.num_rotations) == 1
    R = fusion.attn.rotation.double()
    eye = torch.eye(R.shape[0], dtype=R.dtype)
    assert not torch.allclose(R, eye)
    torch.testing.assert_close(R @ R.T, eye, atol=1e-5, rtol=0)


def test_rollingq_md_training_loop_runs_as_written():
    block = python_blocks("docs/rollingq.md")[0]
    assert re.search(r"^rq = rk.RollingQ\(fusion\).*$", block, re.M) and "opt.step()" in block
    torch.manual_seed(0)
    head = torch.nn.Linear(768, 3)
    ns = {"F": F, "loader": _loader(), "head": head, "epochs": 2}
    # the optimizer the loop calls `opt`, over the fusion's and the head's parameters, made
    # once the block has built the fusion
    opt = "opt = torch.optim.SGD([*fusion.parameters(), *head.parameters()], lr=0.01)"
    block = re.sub(r"^(rq = rk.RollingQ\(fusion\).*)$", r"\1\n" + opt, block, flags=re.M)
    ns = _run("import torch\n" + block, "docs/rollingq.md (the loop)", ns)
    _check_one_rotation(ns["fusion"], ns["report"], epochs=2)


def test_rollingq_md_paper_recipe_loop_runs_as_written():
    block = python_blocks("docs/rollingq.md")[1]
    assert 'recipe="paper"' in block and "rq.estimate(" in block
    torch.manual_seed(0)
    loader = _loader(batches=3, B=3)
    ns = {"rk": rk, "train_loader": loader, "encode": lambda batch: list(batch[:2])}
    # `model` is whatever holds the fusion; here the fusion itself, once the block has built it
    block = block.replace("    model.", "    fusion.")
    ns = _run(block, "docs/rollingq.md (recipe='paper')", ns)
    _check_one_rotation(ns["fusion"], ns["report"], epochs=30)
