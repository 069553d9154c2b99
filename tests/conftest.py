"""Shared test setup: GPU tests skip without CUDA; kernel tests pick their device."""
from __future__ import annotations

import os

# bitsandbytes compiles its CPU fallbacks with torch.compile, which costs seconds per
# shape on a 2-core CI machine; the eager code computes the same values.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def kernel_device() -> str:
    """Where Triton kernels can run here: the GPU, or the CPU under TRITON_INTERPRET=1."""
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "cpu"
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1")
