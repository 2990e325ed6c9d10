"""Static cost of every CUDA kernel: registers, spills, stack, shared memory, SASS instruction mix.

    python -m bench.cuda_cost_table [--arch sm_80 --arch sm_90a] [--src DIR] [--markdown]

No GPU needed. Each kernel file of csrc/cuda is compiled with the extension's flags to a cubin
per architecture; ptxas reports registers, spills, stack frame and static shared memory, the
launch configuration (fwd_mma_config.h, compiled with the host compiler) gives the dynamic shared
memory, and the disassembly (cuobjdump, from CUDA_HOME, PATH or the triton wheel) gives the
instruction mix of each kernel's main loop: the loop (a backward branch and its body) holding the
most HMMA, else the longest one. The counts are static instructions in that loop body: for the
tensor-core forward the body is one key tile, so they are the per-key-tile mix of a warp, where
a branch taken in some tiles only (masking, key sums) counts in full.

``--src DIR`` analyses another checkout's csrc/cuda (e.g. an older commit, for a before/after
table). Prints a table, or markdown with ``--markdown``.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from rollingq_kernels import _cuda_build  # noqa: E402

ARCHS = {"sm_80": "arch=compute_80,code=sm_80", "sm_90a": "arch=compute_90a,code=sm_90a"}
MIX = ["HMMA", "LDSM", "LDGSTS", "LDS", "STS", "LDG", "STG", "FFMA", "FMUL", "FADD", "FMNMX",
       "MUFU", "F2FP", "SHFL", "BAR"]  # fmt: skip


def find_tool(name: str) -> Optional[str]:
    """A CUDA binary tool: CUDA_HOME/bin, PATH, then the copy in the triton wheel."""
    home = _cuda_build.find_cuda_home()
    if home and os.path.exists(os.path.join(home, "bin", name)):
        return os.path.join(home, "bin", name)
    if shutil.which(name):
        return shutil.which(name)
    try:
        import triton

        cand = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        if os.path.exists(cand):
            return cand
    except ImportError:
        pass
    return None


def demangle(names: List[str]) -> Dict[str, str]:
    tool = shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout
    return dict(zip(names, out.splitlines()))


def short_name(demangled: str) -> str:
    """'void rollingq::fwd_mma_kernel<__nv_bfloat16, 64, false, true>(...)' -> compact form."""
    m = re.search(r"rollingq::(\w+)<([^()]*)>", demangled)
    if not m:
        m2 = re.search(r"rollingq::(\w+)\(", demangled)
        return m2.group(1) if m2 else demangled
    name, args = m.group(1), [a.strip() for a in m.group(2).split(",")]
    args = [{"__nv_bfloat16": "bf16", "__half": "fp16", "float": "fp32"}.get(a, a) for a in args]
    if name == "fwd_mma_kernel" and len(args) == 4:
        return (
            f"fwd_mma {args[0]} D{args[1]}"
            + (" causal" if args[2] == "true" else "")
            + (" stats" if args[3] == "true" else "")
        )
    return f"{name}<{','.join(args)}>"


def compile_cubin(src: str, arch: str, out: str, csrc: str) -> str:
    nvcc = _cuda_build.find_nvcc()
    cmd = [nvcc, "-cubin", *_cuda_build.NVCC_FLAGS, *_cuda_build.TORCH_STYLE_DEFINES,
           f"-gencode={ARCHS[arch]}", "-Xptxas=-v", f"-I{csrc}", src, "-o", out]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"nvcc failed on {src} for {arch}:\n{res.stderr}")
    return res.stdout + res.stderr


def parse_ptxas(text: str) -> Dict[str, dict]:
    info: Dict[str, dict] = {}
    cur = None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            cur = info.setdefault(m.group(1), {})
            continue
        if cur is None:
            continue
        m = re.search(
            r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line
        )
        if m:
            cur.update(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["regs"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            cur["static_smem"] = int(s.group(1)) if s else 0
    return info


_INSTR = re.compile(
    r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(\.[A-Z0-9_.]+)?\s*([^;]*);"
)


def parse_sass(text: str) -> Dict[str, List[tuple]]:
    """function -> [(address, opcode, full opcode, operands)]."""
    funcs: Dict[str, List[tuple]] = {}
    cur = None
    for line in text.splitlines():
        m = re.search(r"Function : (\w+)", line)
        if m:
            cur = funcs.setdefault(m.group(1), [])
            continue
        if cur is None:
            continue
        m = _INSTR.search(line)
        if m and (m.group(2) or "").strip() != "@!PT":  # '@!PT': never executed (padding)
            op = m.group(3)
            cur.append((int(m.group(1), 16), op, op + (m.group(4) or ""), m.group(5)))
    return funcs


def main_loop(instrs: List[tuple]) -> List[tuple]:
    """Body of the loop with the most HMMA (else the longest): instructions from a backward
    branch's target to the branch."""
    best, best_key = [], (-1, -1)
    for addr, op, _, operands in instrs:
        if op not in ("BRA", "JMP"):
            continue
        m = re.match(r"\s*(0x[0-9a-f]+)", operands) or re.search(r"(0x[0-9a-f]+)", operands)
        if not m:
            continue
        target = int(m.group(1), 16)
        if target >= addr:
            continue
        body = [i for i in instrs if target <= i[0] <= addr]
        key = (sum(1 for i in body if i[1] == "HMMA"), len(body))
        if key > best_key:
            best, best_key = body, key
    return best


def mix(body: List[tuple]) -> Dict[str, int]:
    counts = {k: 0 for k in MIX}
    for _, op, _, _ in body:
        if op in counts:
            counts[op] += 1
    counts["total"] = len(body)
    return counts


def dynamic_smem(csrc: str, tmp: str) -> Dict[str, int]:
    """Dynamic shared memory of each tensor-core kernel variant, from its config header."""
    fwd = os.path.exists(os.path.join(csrc, "cuda", "fwd_mma_config.h"))
    bwd = os.path.exists(os.path.join(csrc, "cuda", "bwd_mma_config.h"))
    if not fwd:
        return {}
    lines = ["#include <cstdio>", '#include "cuda/fwd_mma_config.h"']
    if bwd:
        lines.append('#include "cuda/bwd_mma_config.h"')
    lines += ["int main() {", "  using namespace rollingq;"]
    for d in (64, 128):
        lines.append(
            f'  std::printf("D{d} %zu\\nD{d} stats %zu\\n", MmaFwdConfig<{d}>::smem_bytes(false), '
            f"MmaFwdConfig<{d}>::smem_bytes(true));"
        )
        if bwd:
            lines.append(
                f'  std::printf("dq D{d} %zu\\ndkdv D{d} %zu\\n", MmaBwdConfig<{d}>::kDqSmem, '
                f"MmaBwdConfig<{d}>::kKvSmem);"
            )
    lines.append("}")
    prog = os.path.join(tmp, "smem.cpp")
    with open(prog, "w") as f:
        f.write("\n".join(lines) + "\n")
    exe = os.path.join(tmp, "smem")
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    subprocess.run([cxx, "-std=c++17", f"-I{csrc}", prog, "-o", exe], check=True)
    out = {}
    text = subprocess.run([exe], capture_output=True, text=True, check=True).stdout
    for line in text.splitlines():
        if line.strip():
            key, value = line.rsplit(" ", 1)
            out[key] = int(value)
    return out


def analyse(src_dir: str, archs: List[str], jobs: int) -> List[dict]:
    csrc = os.path.dirname(os.path.abspath(src_dir))
    cuobjdump = find_tool("cuobjdump")
    files = sorted(glob.glob(os.path.join(src_dir, "*.cu")))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        smem_dyn = dynamic_smem(csrc, tmp)
        tasks = [(f, a) for f in files for a in archs]

        def one(task):
            f, a = task
            cubin = os.path.join(tmp, f"{os.path.basename(f)}.{a}.cubin")
            ptxas = parse_ptxas(compile_cubin(f, a, cubin, csrc))
            sass = {}
            if cuobjdump:
                res = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True)
                sass = parse_sass(res.stdout)
            return f, a, ptxas, sass

        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            results = list(pool.map(one, tasks))
        names = demangle(sorted({fn for _, _, ptxas, _ in results for fn in ptxas}))
        for f, a, ptxas, sass in results:
            for fn, info in sorted(ptxas.items()):
                name = short_name(names.get(fn, fn))
                row = {"kernel": name, "file": os.path.basename(f), "arch": a, **info}
                key = None
                m = re.match(r"fwd_mma \w+ D(\d+)", name)
                if m:
                    key = f"D{m.group(1)}" + (" stats" if name.endswith("stats") else "")
                m = re.match(r"bwd_mma_(dq|dkdv)_kernel<\w+,(\d+),", name)
                if m:
                    key = f"{m.group(1)} D{m.group(2)}"
                row["dyn_smem"] = smem_dyn.get(key) if key else None
                if fn in sass:
                    row["loop"] = mix(main_loop(sass[fn]))
                    row["all"] = mix(sass[fn])
                rows.append(row)
    # one row per (kernel, arch): the key-code kernels are instantiated in several files
    unique = {}
    for r in rows:
        unique.setdefault((r["kernel"], r["arch"]), r)
    return [unique[k] for k in sorted(unique)]


def render(rows: List[dict], markdown: bool) -> str:
    head = ["kernel", "arch", "regs", "spill st/ld", "stack", "smem static+dyn"]
    head += [f"loop {k}" for k in ("HMMA", "LDSM", "LDGSTS", "LDS", "STS", "FFMA", "FMUL", "FADD",
                                   "MUFU", "SHFL", "BAR", "total")]  # fmt: skip
    lines = []
    if markdown:
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
    else:
        lines.append("\t".join(head))
    for r in rows:
        dyn = r.get("dyn_smem")
        smem = f"{r.get('static_smem', 0)}" + (f"+{dyn}" if dyn is not None else "")
        loop = r.get("loop") or {}
        cells = [
            r["kernel"],
            r["arch"],
            str(r.get("regs", "?")),
            f"{r.get('spill_st', '?')}/{r.get('spill_ld', '?')}",
            str(r.get("stack", "?")),
            smem,
        ]
        cells += [str(loop.get(k, "-")) for k in ("HMMA", "LDSM", "LDGSTS", "LDS", "STS", "FFMA",
                                                  "FMUL", "FADD", "MUFU", "SHFL", "BAR", "total")]  # fmt: skip
        lines.append(("| " + " | ".join(cells) + " |") if markdown else "\t".join(cells))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", action="append", choices=sorted(ARCHS), help="default: both")
    ap.add_argument("--src", default=_cuda_build.CUDA_DIR, help="a csrc/cuda directory")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument(
        "--jobs", type=int, default=int(os.environ.get("MAX_JOBS", os.cpu_count() or 2))
    )
    args = ap.parse_args(argv)
    if _cuda_build.find_nvcc() is None:
        print("nvcc not found (CUDA_HOME, CUDA_PATH, PATH)", file=sys.stderr)
        return 1
    rows = analyse(args.src, args.arch or list(ARCHS), args.jobs)
    nvcc_version = subprocess.run([_cuda_build.find_nvcc(), "--version"], capture_output=True,
                                  text=True).stdout.strip().splitlines()[-1]  # fmt: skip
    print(render(rows, args.markdown))
    print(f"\n{nvcc_version}; {datetime.date.today().isoformat()}; "
          f"cuobjdump: {find_tool('cuobjdump') or 'not found (no instruction mix)'}")  # fmt: skip
    return 1 if any(r.get("spill_st", 0) for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
