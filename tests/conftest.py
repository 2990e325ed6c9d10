"""Test session set-up.

Without a GPU, Triton kernels run in Triton's CPU interpreter. The interpreter is chosen when a
kernel is decorated, so TRITON_INTERPRET must be set before anything imports triton: here, the
first file pytest loads.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _fixed_threads():
    # Kernels must give the same answer whatever the thread count; tests that vary it restore it.
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
