"""CUDA tests of the hash-index kernels and the store: they need a GPU.

They run on the device machine via `make test-cuda`; CI has no GPU, so on a machine without
CUDA this directory is not collected at all (nothing in it is skipped or xfailed: it is simply
not part of the run there). With TRITON_INTERPRET=1 and Triton installed, the same tests run on
the CPU through Triton's interpreter (slowly), which is how they are checked without a GPU.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None

if not (torch.cuda.is_available() or INTERPRET):
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where the Triton kernels run: the GPU, or the CPU under the interpreter."""
    return torch.device("cpu" if INTERPRET else "cuda")


@pytest.fixture(scope="session")
def small() -> int:
    """log2 of the capacity of most test tables (smaller under the slow interpreter)."""
    return 9 if INTERPRET else 13


@pytest.fixture(scope="session")
def big() -> int:
    """log2 of the capacity of the large tables: big on a GPU, small under the interpreter."""
    return 10 if INTERPRET else 22
