"""The examples run: the official training recipe for one tiny epoch of each run (fast)."""

import importlib.util
import math
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = [
    "--epochs", "1", "--train", "96", "--test", "40", "--batch", "32", "--dim", "16",
    "--audio-len", "5", "--visual-len", "6", "--d-in", "8", "--classes", "3", "--threads", "0",
]  # fmt: skip


def test_paper_recipe_one_tiny_epoch(tmp_path):
    pr = _load("paper_recipe")
    args = pr.parse_args(TINY)  # dropout 0.2, the official recipe
    lines = []
    histories = pr.run_all(args, log=lines.append)
    assert list(histories) == ["baseline", "paper", "default"]
    for run, hist in histories.items():
        assert [r["epoch"] for r in hist] == [0, 1], run
        for r in hist:
            for key in ("air", "mass_audio", "mass_visual", "acc", "acc_audio_probe"):
                assert math.isfinite(r[key]), (run, key)
            assert 0.0 <= r["acc"] <= 1.0 and 0.0 < r["mass_audio"] < 1.0
            # the fusion's own [CLS] key takes the rest of the mass
            assert r["mass_audio"] + r["mass_visual"] < 1.0
    # same initialisation and data order: the first epoch is the same for every run ...
    losses = {run: hist[1]["loss"] for run, hist in histories.items()}
    assert losses["paper"] == pytest.approx(losses["baseline"], rel=1e-6)
    assert losses["default"] == pytest.approx(losses["baseline"], rel=1e-6)
    # ... and at its end (beta = 0, one rotation) both controllers rotate, the baseline does not
    assert not histories["baseline"][1]["rotated"]
    assert histories["paper"][1]["rotated"] and histories["default"][1]["rotated"]
    assert histories["paper"][1]["angle"] > 0 and math.isfinite(histories["paper"][1]["alpha"])
    assert any(line.startswith("paper") for line in lines)
    path = tmp_path / "plot.png"
    pr.plot(histories, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_paper_recipe_full_setting_flag():
    pr = _load("paper_recipe")
    args = pr.parse_args(["--full"])
    assert (args.dim, args.audio_len, args.visual_len, args.epochs) == (768, 512, 588, 30)
    assert (args.lr, args.momentum, args.weight_decay, args.batch, args.dropout) == (
        1e-3,
        0.9,
        1e-4,
        64,
        0.2,
    )
