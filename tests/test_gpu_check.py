"""The GPU check script, rehearsed without a GPU (GPU_CHECK_REHEARSAL=1: Triton's interpreter,
tiny shapes): every part runs, reports and lands in the one-page summary."""

import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.interpreter


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                    reason="needs bash and coreutils' timeout")  # fmt: skip
def test_gpu_check_rehearsal(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, GPU_CHECK_REHEARSAL="1", OUT=str(out), PYTHON=sys.executable)
    proc = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh")], env=env,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    log = proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, log
    summary = (out / "summary.md").read_text()
    assert "**Overall: PASS**" in summary, summary
    for part in ("| smoke | PASS", "| tests:triton | PASS", "| bench | PASS", "| cuda |"):
        assert part in summary, summary
    smoke = json.loads((out / "smoke.json").read_text())
    assert smoke["verdict"] == "PASS" and smoke["rehearsal"]
    names = [c["name"] for c in smoke["checks"]]
    assert any("split-K" in n for n in names) and any("D=768" in n for n in names)
    assert all(c["status"] == "PASS" for c in smoke["checks"]), smoke["checks"]
    bench = json.loads((out / "gpu_bench.json").read_text())
    timed = [r for r in bench["rows"] if "ms" in r]
    assert {r["provider"] for r in timed} >= {"sdpa", "triton", "triton+rot", "triton+rs"}
    for r in timed:
        assert r["status"] == "ok", r
        assert len(r["max_err"]) == (1 if r["mode"] == "fwd" else 3)
    assert (out / "pytest_triton.xml").exists()
    assert "TFLOP/s" in summary


def test_bench_isolates_a_crash_and_flags_a_wrong_output(tmp_path):
    env = dict(os.environ, GPU_BENCH_FAULT="crash:triton+rot,wrong:triton")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "gpu_bench.py"), "--dry-run", "--only",
         "d16", "--out", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-2000:]
    rows = json.loads((tmp_path / "gpu_bench.json").read_text())["rows"]
    by = {(r["mode"], r["provider"]): r["status"] for r in rows}
    for mode in ("fwd", "fwd+bwd"):
        assert by[(mode, "triton+rot")].startswith("crashed"), by
        assert by[(mode, "triton")] == "wrong", by
        # the providers after the crashed one still ran, in a new child process
        assert by[(mode, "triton+rs")] == "ok" and by[(mode, "reference")] == "ok", by
        assert by[(mode, "sdpa")] == "ok", by
