import sys
from pathlib import Path

# `pytest bench/` from the repository root: make `bench` importable as a package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
