"""What this CPU's AMX tile unit gives attention-shaped work: bench/tile_probe.cpp, built here
with the system C++ compiler (no torch), run on one thread.

    python -m bench.tile_probe

Prints the tile unit's peak (TDPBF16PS on tiles in registers), the bf16 forward's softmax work
per 16 scores, whether the two overlap when interleaved, and the kernel's two product shapes
(S^T = K Q^T at head dim 64, O^T += V^T P^T over 256 keys) as a fraction of that peak. These are
the numbers that bound the bf16 forward on this machine (docs/performance.md). CPUs without
AMX-BF16 print that there is nothing to probe.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, Optional

SOURCE = Path(__file__).resolve().parent / "tile_probe.cpp"
BUILD_DIR = Path(__file__).resolve().parent.parent / "build"
FLAGS = [
    "-O2", "-std=c++17", "-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx512bf16",
    "-mamx-tile", "-mamx-bf16",
]  # fmt: skip
TILE_MACS = 16 * 16 * 32  # multiply-adds of one TDPBF16PS


def cpu_has_amx() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "amx_bf16" in flags and "amx_tile" in flags and "avx512_bf16" in flags


def build(out: Optional[Path] = None) -> Path:
    """Compile the probe (again only when the source is newer); returns the executable."""
    out = out or BUILD_DIR / "tile_probe"
    if out.exists() and out.stat().st_mtime >= SOURCE.stat().st_mtime:
        return out
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise RuntimeError("no C++ compiler (set CXX)")
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([cxx, *FLAGS, str(SOURCE), "-o", str(out)], check=True)
    return out


def run(exe: Optional[Path] = None) -> Dict[str, float]:
    """Run the probe; its measurements (ns) plus the derived rates."""
    exe = exe or build()
    text = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    r = {k: float(v) for k, v in (line.split() for line in text.splitlines() if line.strip())}
    dp, vec, k = r["dp_ns"], r["softmax_vector_ns"], r["softmax_vectors_per_dp"]
    r["peak_gflops"] = 2 * TILE_MACS / dp
    r["overlap"] = (dp + k * vec) / r["dp_with_softmax_ns"]
    r["qk_fraction_of_peak"] = 2 * dp / r["qk_ns_per_256_scores"]  # 2 dps per 256 scores
    r["pv_fraction_of_peak"] = 2 * dp / r["pv_ns_per_256_scores"]
    return r


def report(r: Dict[str, float]) -> str:
    per_tile = r["qk_ns_per_256_scores"] + r["pv_ns_per_256_scores"] + 16 * r["softmax_vector_ns"]
    return "\n".join(
        [
            "| measure (one thread) | value |",
            "|---|---|",
            f"| TDPBF16PS, tiles in registers | {r['dp_ns']:.1f} ns = "
            f"{r['peak_gflops']:.0f} GFLOP/s (the tile unit's peak) |",
            f"| softmax work per 16 scores (vector unit) | {r['softmax_vector_ns']:.2f} ns |",
            f"| one TDPBF16PS + {r['softmax_vectors_per_dp']:.0f} softmax vectors interleaved | "
            f"{r['dp_with_softmax_ns']:.1f} ns: overlap {r['overlap']:.2f} (1 = they take "
            "turns, 2 = the vector work hides behind the tile unit) |",
            f"| S^T = K Q^T block, head dim 64 | {r['qk_ns_per_256_scores']:.1f} ns per 256 "
            f"scores = {r['qk_fraction_of_peak']:.0%} of peak |",
            f"| O^T += V^T P^T block, 256 keys | {r['pv_ns_per_256_scores']:.1f} ns per 256 "
            f"scores = {r['pv_fraction_of_peak']:.0%} of peak |",
            f"| sum per 256 scores (products + softmax, taking turns) | {per_tile:.0f} ns = "
            f"{2 * 256 * 128 / per_tile:.0f} GFLOP/s per core at head dim 64 |",
        ]
    )


def main() -> int:
    if not cpu_has_amx():
        print("this CPU reports no AMX-BF16: nothing to probe")
        return 0
    print(report(run()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
