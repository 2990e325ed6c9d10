"""One-page summary of a bench/gpu_check.sh run: pass/fail per part and the TFLOP/s table.

    python bench/gpu_summary.py OUT_DIR [--parts parts.tsv]

Reads what the parts left in OUT_DIR (smoke.json, the pytest junit files, gpu_bench.json) and
the part log ``parts.tsv`` that gpu_check.sh appends to (name, exit code, seconds, note), and
writes OUT_DIR/summary.md, also printed. Parts that were cut by their time limit still report
what they finished: each writes its results as it goes.
"""

import json
import os
import sys
import xml.etree.ElementTree as ET

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)


def _junit(path):
    """(passed, failed, errors, skipped, failing test names) of a junit xml file, or None."""
    if not os.path.exists(path):
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError:
        return None
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failing = []
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        kinds = {child.tag for child in case}
        if "failure" in kinds:
            counts["failed"] += 1
            failing.append(name)
        elif "error" in kinds:
            counts["errors"] += 1
            failing.append(name)
        elif "skipped" in kinds:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return counts, failing


def _parts(path):
    rows = []
    if os.path.exists(path):
        with open(path) as fh:
            for line in fh:
                bits = line.rstrip("\n").split("\t")
                if len(bits) >= 3:
                    rows.append((bits[0], bits[1], bits[2], bits[3] if len(bits) > 3 else ""))
    return rows


def _rc_text(rc):
    return {"0": "ok", "124": "time limit", "130": "time limit (SIGINT)", "skip": "skipped"}.get(
        rc, f"exit {rc}"
    )


def build(out_dir, parts_file=None):
    lines = ["# GPU check summary", ""]
    env = os.path.join(out_dir, "environment.txt")
    if os.path.exists(env):
        with open(env) as fh:
            lines += ["```", fh.read().strip(), "```", ""]
    lines += ["| part | result | time (s) | detail |", "|---|---|---|---|"]
    verdict = True
    for name, rc, secs, note in _parts(parts_file or os.path.join(out_dir, "parts.tsv")):
        detail = note
        ok = rc in ("0", "skip")
        if name.endswith(":crashes"):
            ok = False  # tests that killed their process (bench/pytest_isolated.py)
        elif name == "smoke":
            p = os.path.join(out_dir, "smoke.json")
            if os.path.exists(p):
                with open(p) as fh:
                    sm = json.load(fh)
                bad = [c["name"] for c in sm["checks"] if c["counts"] and c["status"] != "PASS"]
                base = [f"{c['name']}: {c['status']}" for c in sm["checks"] if not c["counts"]]
                detail = f"verdict {sm['verdict']}" + (
                    f"; failing: {', '.join(bad)}" if bad else ""
                )
                if base:
                    detail += "; " + "; ".join(base)
                ok = sm["verdict"] == "PASS"
            else:
                detail = "no smoke.json"
                ok = False
        elif name.startswith("tests"):
            tag = name.split(":", 1)[1] if ":" in name else "triton"
            j = _junit(os.path.join(out_dir, f"pytest_{tag}.xml"))
            if j is None:
                detail = "no junit xml"
                ok = False
            else:
                c, failing = j
                detail = (f"{c['passed']} passed, {c['failed']} failed, {c['errors']} errors, "
                          f"{c['skipped']} skipped")  # fmt: skip
                if failing:
                    detail += "; failing: " + ", ".join(failing[:8])
                ok = c["failed"] == 0 and c["errors"] == 0 and c["passed"] > 0
                if rc in ("124", "130"):
                    detail += " (cut by the time limit: the rest did not run)"
        elif name == "bench":
            p = os.path.join(out_dir, "gpu_bench.json")
            if os.path.exists(p):
                with open(p) as fh:
                    brows = json.load(fh)["rows"]
                n_ok = sum(r.get("status") == "ok" for r in brows)
                bad = [
                    f"{r['case']} {r['mode']} {r['provider']}: {r['status']}"
                    for r in brows
                    if r.get("status") != "ok" and not str(r.get("status")).startswith("skipped")
                ]
                detail = f"{n_ok} timed rows checked ok" + (
                    f"; {'; '.join(bad[:6])}" if bad else ""
                )
                ok = ok and not any(b.split(":")[0].split()[-1].startswith("triton") for b in bad)
            else:
                detail, ok = "no gpu_bench.json", False
        if rc != "skip":
            verdict &= ok
        lines.append(f"| {name} | {'PASS' if ok else 'FAIL'} ({_rc_text(rc)}) | {secs} | "
                     f"{detail.replace('|', '/')} |")  # fmt: skip
    lines += ["", f"**Overall: {'PASS' if verdict else 'FAIL'}**", ""]
    bj = os.path.join(out_dir, "gpu_bench.json")
    if os.path.exists(bj):
        import gpu_bench  # noqa: E402

        with open(bj) as fh:
            data = json.load(fh)
        rows = data["rows"]
        gpu_bench._add_ratios(rows)
        e = data["environment"]
        lines += [
            f"## Throughput ({e['device']}, torch {e['torch']}, triton {e['triton']}, {e['date']})",
            "",
            "TFLOP/s, bf16; triton/sdpa and rs/sdpa: speed relative to SDPA's flash backend "
            "(> 1 is faster); rs = rotation + statistics; stats cost = rs vs rotation only."
            + ("" if data.get("complete") else " (incomplete: the benchmark was cut short)"),
            "",
            gpu_bench.summary_table(rows),
            "",
        ]
        tuned = [r for r in rows if r.get("tuning")]
        if tuned:
            lines += ["Autotuned configs (warm-up wall time includes compiling and tuning):", ""]
            for r in tuned:
                t = "; ".join(f"{k}: {v['config']}" for k, v in r["tuning"].items())
                lines.append(f"- {r['case']} {r['mode']} {r['provider']}: warm-up "
                             f"{r['warmup_s']:.1f} s; {t}")  # fmt: skip
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "summary.md"), "w") as fh:
        fh.write(text)
    return text, verdict


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(__doc__)
        return 2
    parts = None
    if "--parts" in argv:
        parts = argv[argv.index("--parts") + 1]
    text, verdict = build(argv[0], parts)
    print(text)
    return 0 if verdict else 1


if __name__ == "__main__":
    sys.exit(main())
