"""What this CPU's AMX tile unit gives attention-shaped work: bench/tile_probe.cpp, built here
with the system C++ compiler (no torch), run on one thread.

    python -m bench.tile_probe

Prints the vector unit's bf16 dot-product and float32 FMA rates (which one multiplies faster
decides the bf16 path of the avx512 variants), whether the softmax runs beside the vector unit's
own dot products or takes turns with them (the avx512_dot forward's bound), and on CPUs with AMX-BF16 the tile unit's peak
(TDPBF16PS on tiles in registers), the bf16 forward's softmax work per 16 scores, whether the two
overlap when interleaved, and the kernel's two product shapes (S^T = K Q^T at head dim 64,
O^T += V^T P^T over 256 keys) as a fraction of that peak: the numbers that bound the bf16 forward
on such a machine (docs/performance.md). Two variants of them say where the products lose time:
S^T without storing the scores, O^T with its operands in a tile-blocked layout. CPUs without AVX512_BF16 have nothing to probe.
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


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return set()


def cpu_has_bf16_dot() -> bool:
    return {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_bf16"} <= _cpu_flags()


def cpu_has_amx() -> bool:
    return cpu_has_bf16_dot() and {"amx_bf16", "amx_tile"} <= _cpu_flags()


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


def run(exe: Optional[Path] = None, *, tiles: bool = True) -> Dict[str, float]:
    """Run the probe (the AMX part only with ``tiles``); its measurements (ns) plus the derived
    rates."""
    exe = exe or build()
    args = [str(exe)] + ([] if tiles else ["vector"])
    text = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    r = {k: float(v) for k, v in (line.split() for line in text.splitlines() if line.strip())}
    r["dot_over_fma_macs"] = (32 / r["vdpbf16ps_ns"]) / (16 / r["vfmadd231ps_ns"])
    d32, sm, both = r["vec_dp32_ns"], r["vec_softmax_ns"], r["vec_dp32_softmax_ns"]
    r["vec_overlap"] = (d32 + sm) / both
    # the avx512_dot forward per 16 scores at head dim 64: S^T's 32 dot products interleaved with
    # the softmax, then O^T's 32 (4 * 16 * 64 flops)
    r["vec_forward_bound_gflops"] = 4 * 16 * 64 / (both + d32)
    r["vec_products_only_gflops"] = 4 * 16 * 64 / (2 * d32)
    if not tiles:
        return r
    dp, vec, k = r["dp_ns"], r["softmax_vector_ns"], r["softmax_vectors_per_dp"]
    r["peak_gflops"] = 2 * TILE_MACS / dp
    r["overlap"] = (dp + k * vec) / r["dp_with_softmax_ns"]
    r["qk_fraction_of_peak"] = 2 * dp / r["qk_ns_per_256_scores"]  # 2 dps per 256 scores
    r["pv_fraction_of_peak"] = 2 * dp / r["pv_ns_per_256_scores"]
    r["qk_nostore_fraction_of_peak"] = 2 * dp / r["qk_nostore_ns_per_256_scores"]
    r["pv_blocked_fraction_of_peak"] = 2 * dp / r["pv_blocked_ns_per_256_scores"]
    return r


def report(r: Dict[str, float]) -> str:
    rows = [
        "| measure (one thread) | value |",
        "|---|---|",
        f"| VDPBF16PS (32 bf16 multiply-adds) | {r['vdpbf16ps_ns']:.3f} ns |",
        f"| VFMADD231PS (16 float32 multiply-adds) | {r['vfmadd231ps_ns']:.3f} ns |",
        f"| bf16 dot products / float32 FMAs, multiply-adds per second | "
        f"{r['dot_over_fma_macs']:.2f} (above 1: VDPBF16PS multiplies faster; below 1: float32 FMAs) |",
        f"| 32 VDPBF16PS (16 scores at head dim 64) / one softmax vector / both in one loop | "
        f"{r['vec_dp32_ns']:.2f} / {r['vec_softmax_ns']:.2f} / {r['vec_dp32_softmax_ns']:.2f} ns: "
        f"overlap {r['vec_overlap']:.2f} (1 = they take turns, 2 = the softmax hides) |",
        f"| avx512_dot forward at head dim 64 from these (S^T with the softmax, then O^T) | "
        f"{r['vec_forward_bound_gflops']:.0f} GFLOP/s per core (products alone "
        f"{r['vec_products_only_gflops']:.0f}) |",
    ]
    if "dp_ns" not in r:
        return "\n".join(rows)
    per_tile = r["qk_ns_per_256_scores"] + r["pv_ns_per_256_scores"] + 16 * r["softmax_vector_ns"]
    return "\n".join(
        rows
        + [
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
            f"| the S^T block without storing the scores | "
            f"{r['qk_nostore_ns_per_256_scores']:.1f} ns = "
            f"{r['qk_nostore_fraction_of_peak']:.0%} of peak (the rest of the above is the "
            "stores of 128 KiB of scores) |",
            f"| the O^T block with tile-blocked operands (1 KiB per tile) | "
            f"{r['pv_blocked_ns_per_256_scores']:.1f} ns = "
            f"{r['pv_blocked_fraction_of_peak']:.0%} of peak |",
            f"| sum per 256 scores (products + softmax, taking turns) | {per_tile:.0f} ns = "
            f"{2 * 256 * 128 / per_tile:.0f} GFLOP/s per core at head dim 64 |",
        ]
    )


def main() -> int:
    if not cpu_has_bf16_dot():
        print("this CPU reports no AVX512_BF16: nothing to probe")
        return 0
    print(report(run(tiles=cpu_has_amx())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
