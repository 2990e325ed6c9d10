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


_FAKE_TESTS = """
import os, signal, time, pytest
def test_a(): pass
def test_b(): os.kill(os.getpid(), signal.SIGSEGV)
@pytest.mark.parametrize("x", [1, 2])
def test_c(x): assert x == 1
def test_d(): pytest.skip("not here")
def test_e(): os.abort()
def test_f():
    if os.environ.get("FAKE_SLOW"): time.sleep(60)
"""


def _ignore_sigint():
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _isolated(tmp_path, env=None, sigint_ignored=False):
    # sigint_ignored: the runner starts with SIGINT ignored, as a background job of a script does
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_fake.py").write_text(_FAKE_TESTS)
    cmd = [sys.executable, os.path.join(ROOT, "bench", "pytest_isolated.py"), "--junitxml",
           str(tmp_path / "out.xml"), "--", "test_fake.py", "-p", "no:cacheprovider", "-q"]  # fmt: skip
    return subprocess.Popen(cmd, cwd=tmp_path, env=dict(os.environ, **(env or {})),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=_ignore_sigint if sigint_ignored else None)  # fmt: skip


def _outcomes(xml):
    import xml.etree.ElementTree as ET

    res = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        kids = [c for c in case]
        res[case.get("name")] = (kids[0].tag, kids[0].get("message")) if kids else ("passed", None)
    return res


def test_pytest_isolated_reports_crashes_and_runs_the_rest(tmp_path):
    # a test that kills the process (segfault, abort) is that test's error; the rest still run
    proc = _isolated(tmp_path)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1, out[-3000:]
    res = _outcomes(tmp_path / "out.xml")
    assert res["test_a"] == ("passed", None) and res["test_f"] == ("passed", None), res
    assert res["test_c[1]"][0] == "passed" and res["test_c[2]"][0] == "failure", res
    assert res["test_d"][0] == "skipped", res
    assert res["test_b"] == ("error", "crashed: the process died by signal 11"), res
    assert res["test_e"] == ("error", "crashed: the process died by signal 6"), res
    assert len(res) == 7, res
    assert "CRASHED: test_fake.py::test_b (signal 11)" in out, out[-3000:]


@pytest.mark.parametrize("sigint_ignored", [False, True], ids=["sigint", "sigint_ignored"])
def test_pytest_isolated_keeps_what_finished_when_interrupted(tmp_path, sigint_ignored):
    # gpu_check.sh stops a part with SIGINT: the outcomes so far still reach the junit file. A
    # runner started with SIGINT ignored still stops its pytest child (which would otherwise
    # inherit the ignoring, sleep through the signal and report test_f as passed).
    import signal
    import time

    proc = _isolated(tmp_path, {"FAKE_SLOW": "1"}, sigint_ignored)
    seen = []
    deadline = time.time() + 240
    for line in proc.stdout:
        seen.append(line)
        if "CRASHED: test_fake.py::test_e" in line:
            time.sleep(5.0)  # the last round has started, test_f is sleeping
            proc.send_signal(signal.SIGINT)
            break
        assert time.time() < deadline, "".join(seen)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, "".join(seen) + rest
    res = _outcomes(tmp_path / "out.xml")
    assert res["test_a"][0] == "passed" and res["test_c[2]"][0] == "failure", res
    assert res["test_b"][0] == "error" and res["test_e"][0] == "error", res
    assert "test_f" not in res or res["test_f"][0] != "passed", res


def test_summary_fails_a_part_whose_tests_crashed(tmp_path):
    # what gpu_check.sh leaves after a test killed its process: the part's junit file (the crash
    # as an error) and a ":crashes" row; the summary must fail both, naming the test
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import gpu_summary
    finally:
        sys.path.pop(0)
    (tmp_path / "parts.tsv").write_text(
        "tests:cuda\t1\t14\t\n"
        "tests:cuda:crashes\t1\t0\t1 test(s) crashed their process; toolchain probe: ok\n"
    )
    (tmp_path / "pytest_cuda.xml").write_text(
        '<?xml version="1.0"?><testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_cuda_gpu" name="test_ok"/>'
        '<testcase classname="tests.test_cuda_gpu" name="test_boom"><error message="crashed: '
        'the process died by signal 11"/></testcase></testsuite></testsuites>'
    )
    text, verdict = gpu_summary.build(str(tmp_path))
    assert not verdict and "**Overall: FAIL**" in text, text
    assert "| tests:cuda | FAIL" in text and "test_boom" in text, text
    assert "| tests:cuda:crashes | FAIL (exit 1) | 0 | 1 test(s) crashed" in text, text
