"""One measuring harness for every benchmark: timing, peak memory, FLOPs, machine description.

Rules (DESIGN.md section 6): baselines run in the same process on the same inputs, timings are
medians (with 20th/80th percentiles) after warm-up, and every saved row carries the machine, the
versions and the date.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def attention_flops(
    B: int,
    H: int,
    Lq: int,
    Lk: int,
    D: int,
    Dv: Optional[int] = None,
    *,
    causal: bool = False,
    mode: str = "fwd",
) -> float:
    """2 matmuls of 2*B*H*Lq*Lk*D each (4*B*H*Lq*Lk*D for D = Dv); backward is 2.5x forward."""
    Dv = D if Dv is None else Dv
    f = 2.0 * B * H * Lq * Lk * (D + Dv)
    if causal:
        f /= 2.0
    return {"fwd": f, "bwd": 2.5 * f, "fwd_bwd": 3.5 * f}[mode]


def time_fn(
    fn: Callable[[], object], *, warmup: int = 2, reps: int = 7, min_time: float = 0.0
) -> Dict[str, float]:
    """Median / p20 / p80 wall time in milliseconds after ``warmup`` calls."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    start_all = time.perf_counter()
    while len(times) < reps or (time.perf_counter() - start_all) < min_time:
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= 100:
            break
    times.sort()
    q = statistics.quantiles(times, n=5) if len(times) >= 2 else [times[0]] * 4
    return {
        "median_ms": statistics.median(times),
        "p20_ms": q[0],
        "p80_ms": q[3],
        "reps": len(times),
    }


def maxrss_mib() -> float:
    """The process's resident-set high-water mark in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def peak_memory_in_subprocess(snippet_setup: str, snippet_run: str, *, timeout: int = 600) -> float:
    """Peak resident memory (MiB) that ``snippet_run`` adds above the state after ``snippet_setup``.

    The CPU allocator keeps no high-water mark, so each measurement runs in a fresh interpreter:
    the RSS high-water mark is read after the inputs exist and again after one run; the difference
    is the run's peak working memory including its outputs. Large buffers are mmap-backed and go
    back to the system when freed, so the inputs' pages are the only baseline.
    """
    code = (
        "import resource, torch, sys\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})\n"
        f"{snippet_setup}\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        f"{snippet_run}\n"
        "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print((peak - base) / 1024.0)\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ),
    )
    if res.returncode != 0:
        raise RuntimeError(f"memory probe failed:\n{res.stderr[-2000:]}")
    return float(res.stdout.strip().splitlines()[-1])


def machine_info() -> Dict[str, str]:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = "not installed"
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def save_rows(name: str, rows: List[dict], extra: Optional[dict] = None) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    payload = {"machine": machine_info(), "command": " ".join(sys.argv), "rows": rows}
    if extra:
        payload.update(extra)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def format_table(rows: List[dict], columns: List[tuple]) -> str:
    """Markdown table; ``columns`` = [(header, key, format)], missing values shown as '-'."""
    head = "| " + " | ".join(h for h, _, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    lines = [head, sep]
    for r in rows:
        cells = []
        for _, key, fmt in columns:
            val = r.get(key)
            cells.append("-" if val is None else (fmt.format(val) if fmt else str(val)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
