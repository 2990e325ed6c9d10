"""Does this machine's C++ toolchain build torch extensions that can raise an error with a number
in its message? A check that involves nothing from this package.

    python bench/toolchain_probe.py [--package-link-flags]

It builds a three-function torch extension with torch.utils.cpp_extension (the compiler that
building this package would use: $CXX, else c++) and, each in a fresh process, calls:
  text    formats "n=7" through std::ostringstream and returns it
  number  TORCH_CHECK(false, "n = ", n): must raise RuntimeError
  words   TORCH_CHECK(false, "not", " zero"): must raise RuntimeError
An extension whose C++ runtime cannot format numbers kills the process in the first two (seen
with a compiler that linked no libstdc++.so.6 into the extension: every error message of the
package's own libraries that carries a number then crashes the same way). Also prints which
C++ runtime the package's built libraries ask for (readelf, when present).

--package-link-flags links the probe with the linker flags the package's libraries get
(``link.elf`` of csrc/build_flags.txt on Linux), to check that they keep such a compiler's
extensions working.

Exit status 0 when all three behave, 1 when one crashes or misbehaves, 2 when the extension
does not build.
"""

import glob
import os
import shutil
import subprocess
import sys
import tempfile

SOURCE = r"""
#include <torch/extension.h>
#include <sstream>
std::string text(int64_t n) { std::ostringstream s; s << "n=" << n; return s.str(); }
void number(int64_t n) { TORCH_CHECK(n == 0, "n = ", n); }
void words(int64_t n) { TORCH_CHECK(n == 0, "not", " zero"); }
"""

CHILD = r"""
import sys
from torch.utils.cpp_extension import load_inline
m = load_inline(name="rq_toolchain_probe", cpp_sources=[sys.argv[3]],
                functions=["text", "number", "words"], build_directory=sys.argv[2],
                extra_ldflags=sys.argv[4].split())
which = sys.argv[1]
if which == "build":
    print("built")
elif which == "text":
    print("text ->", m.text(7))
else:
    try:
        getattr(m, which)(3)
        print(which, "returned without an error")
    except RuntimeError as exc:
        print(which, "raised RuntimeError:", str(exc).splitlines()[0])
"""

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _child(which, build_dir, timeout, ldflags):
    proc = subprocess.run([sys.executable, "-c", CHILD, which, build_dir, SOURCE, " ".join(ldflags)],
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip
    return proc.returncode, (proc.stdout + proc.stderr).strip()


def runtime_of_built_libraries():
    """(library, [C++ runtime libraries it lists as NEEDED]) for the package's built .so files."""
    readelf = shutil.which("readelf")
    if readelf is None:
        return None
    rows = []
    for so in sorted(glob.glob(os.path.join(ROOT, "rollingq_kernels", "_C*.so"))):
        out = subprocess.run([readelf, "-d", so], capture_output=True, text=True).stdout
        needed = [line.split("[")[-1].rstrip("]") for line in out.splitlines() if "NEEDED" in line]
        rows.append((os.path.basename(so), [n for n in needed if "stdc++" in n or "gcc_s" in n]))
    return rows


def package_link_flags():
    sys.path.insert(0, os.path.join(ROOT, "rollingq_kernels"))
    try:
        import _cuda_build  # by path: the package itself need not import (no torch build needed)
    finally:
        sys.path.pop(0)
    return _cuda_build.link_flags()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    ldflags = package_link_flags() if "--package-link-flags" in argv else []
    print(f"compiler: CXX={os.environ.get('CXX', '(unset: c++)')}; extra linker flags: "
          f"{' '.join(ldflags) or '(none)'}", flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="rq_probe_") as build_dir:
        rc, text = _child("build", build_dir, 600, ldflags)
        if rc != 0:
            print("the probe extension did not build:\n" + text[-2000:])
            return 2
        bad = []
        expect = {"text": "text -> n=7", "number": "number raised RuntimeError: n = 3",
                  "words": "words raised RuntimeError: not zero"}  # fmt: skip
        for which, want in expect.items():
            rc, text = _child(which, build_dir, 120, ldflags)
            last = text.splitlines()[-1] if text else ""
            if rc < 0:
                print(f"{which}: the process died by signal {-rc}")
                bad.append(which)
            elif want not in text:
                print(f"{which}: unexpected (exit {rc}): {last}")
                bad.append(which)
            else:
                print(f"{which}: ok ({want})")
    libs = runtime_of_built_libraries()
    if libs is None:
        print("readelf not found: the C++ runtime of the built libraries is not shown")
    for name, needed in libs or []:
        print(f"{name}: needs {', '.join(needed) if needed else 'no libstdc++ / libgcc_s'}")
    if bad:
        print("VERDICT: this toolchain's extensions crash or misbehave on " + ", ".join(bad)
              + "; crashes of the package's libraries on an error message come from the "
              "toolchain, not from the package")  # fmt: skip
        return 1
    print("VERDICT: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
