"""Run pytest so that a test which kills the process (a segfault in compiled code, an abort) is
reported as that test's error and the tests after it still run.

    python bench/pytest_isolated.py --junitxml OUT.xml [--max-crashes N] -- PYTEST_ARGS...

pytest runs in a child process with ``--verbosity=1``. When the child dies by a signal, the test it was
running (the last node id printed without an outcome) is recorded as crashed, and pytest runs
again with that test and every test that already has an outcome deselected. The junit file
written at the end holds every outcome of every round, each crash as an ``<error>`` whose message
names the signal. Lines ``CRASHED: <node id> (signal N)`` mark the crashes in the output.

SIGINT (bench/gpu_check.sh stops a part with it at its time limit) is passed to the running
pytest, which still reports what it finished; the merged junit file is written as usual.

Exit status: 0 when every test passed or was skipped and nothing crashed; 1 when a test failed or
crashed; pytest's own status for anything else (5: no tests collected); 130 after SIGINT.
"""

import argparse
import os
import re
import signal
import subprocess
import sys
import xml.etree.ElementTree as ET

# "tests/test_x.py::test_y[param] PASSED   [ 12%]" (pytest -v); node ids hold no spaces here
_LINE = re.compile(r"^(\S+\.py::\S+)(?:\s+(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b)?")


def _classname_and_name(nodeid):
    """The classname / name pair pytest's junit writer gives a node id."""
    path, _, rest = nodeid.partition("::")
    parts = rest.split("::")
    module = path[:-3] if path.endswith(".py") else path
    classname = ".".join([module.replace("/", ".").replace(os.sep, ".")] + parts[:-1])
    return classname, parts[-1]


def _default_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_round(pytest_args, deselect, xml, interrupted):
    """One pytest child; returns (returncode, {node id: outcome}, last node id seen)."""
    cmd = [sys.executable, "-m", "pytest", *pytest_args, "--verbosity=1", f"--junitxml={xml}"]
    cmd += [f"--deselect={d}" for d in sorted(deselect)]
    # The child takes SIGINT as pytest does even where this runner was started with SIGINT
    # ignored (a background job of a shell script, nohup): a forwarded SIGINT must stop it.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", bufsize=1, preexec_fn=_default_sigint)  # fmt: skip
    outcomes, last = {}, None

    def forward(signum, frame):
        interrupted.append(signum)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)

    previous = signal.signal(signal.SIGINT, forward)
    try:
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            m = _LINE.match(line)
            if m:
                last = m.group(1)
                if m.group(2):
                    outcomes[last] = m.group(2)
        rc = proc.wait()
    finally:
        signal.signal(signal.SIGINT, previous)
    return rc, outcomes, last


def _junit_case(nodeid, outcome, message=None):
    classname, name = _classname_and_name(nodeid)
    case = ET.Element("testcase", classname=classname, name=name, time="0")
    if outcome in ("FAILED", "XPASS"):
        ET.SubElement(case, "failure", message=message or "failed (see the log)")
    elif outcome == "ERROR":
        ET.SubElement(case, "error", message=message or "error (see the log)")
    elif outcome in ("SKIPPED", "XFAIL"):
        ET.SubElement(case, "skipped", message=message or outcome.lower())
    return case


def merge_junit(xml, earlier, crashed):
    """Rewrite ``xml`` (the last round's file, if any) with the outcomes of the earlier rounds and
    the crashes added as test cases."""
    root = None
    if os.path.exists(xml):
        try:
            root = ET.parse(xml).getroot()
        except ET.ParseError:
            root = None
    if root is None:
        root = ET.Element("testsuites")
    suite = root.find("testsuite") if root.tag == "testsuites" else root
    if suite is None:
        suite = ET.SubElement(root, "testsuite", name="pytest")
    for nodeid, outcome in earlier.items():
        suite.append(_junit_case(nodeid, outcome))
    for nodeid, sig in crashed.items():
        suite.append(_junit_case(nodeid, "ERROR", f"crashed: the process died by signal {sig}"))
    ET.ElementTree(root).write(xml, encoding="utf-8", xml_declaration=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--junitxml", required=True)
    ap.add_argument("--max-crashes", type=int, default=5)
    ap.add_argument("pytest_args", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    pytest_args = args.pytest_args[1:] if args.pytest_args[:1] == ["--"] else args.pytest_args
    earlier, crashed, interrupted = {}, {}, []
    while True:
        if os.path.exists(args.junitxml):
            os.remove(args.junitxml)
        rc, outcomes, last = run_round(pytest_args, set(earlier) | set(crashed), args.junitxml,
                                       interrupted)  # fmt: skip
        died = rc < 0 and -rc != signal.SIGINT
        if not died or interrupted:
            break
        # the process died: its outcomes so far come from the log, not from a junit file
        earlier.update(outcomes)
        if last is None or last in outcomes or last in crashed:
            print(f"CRASHED: pytest died by signal {-rc} outside a test", flush=True)
            crashed[last or "<collection>"] = -rc
            break
        crashed[last] = -rc
        print(f"CRASHED: {last} (signal {-rc}); running the remaining tests again", flush=True)
        if len(crashed) >= args.max_crashes:
            print(f"stopping after {len(crashed)} crashes", flush=True)
            break
    merge_junit(args.junitxml, earlier, crashed)
    if interrupted:
        return 130
    if crashed:
        return 1
    return rc if rc >= 0 else 1


if __name__ == "__main__":
    sys.exit(main())
