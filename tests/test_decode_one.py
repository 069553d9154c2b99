"""benchmarks/decode_one.py (a single decode product for a profiler): its config strings, and
bad input refused before any GPU work."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import decode_one  # noqa: E402

from fastqlora.triton_kernels.nf4_configs import DecodeMmaConfig, GemvConfig  # noqa: E402


def test_config_strings():
    assert decode_one.parse_config("mma:8:1") == DecodeMmaConfig(8, 1)
    assert decode_one.parse_config("mma:2:4") == DecodeMmaConfig(2, 4)
    assert decode_one.parse_config("mma:8:1:cols") == DecodeMmaConfig(8, 1, cols=True)
    assert decode_one.parse_config("mma:g7:cols") == DecodeMmaConfig(0, cols=True, groups=7)
    assert decode_one.parse_config("mma:8:1:cols8") == DecodeMmaConfig(8, 1, cols=True, rows=8)
    assert decode_one.parse_config("gemv:8:2:4") == GemvConfig(8, 2, 4, cuda=True)
    assert decode_one.parse_config("bnb") == "bnb"
    for bad in ("mma:8", "mma:a:1", "mma:8:1:rows", "mma:x:1:cols", "mma:g7", "mma:gx:cols", "mma:7:cols", "mma:g7:cols8",
                "gemv:8:2", "bnb:1", "cublas", ""):
        with pytest.raises(ValueError, match="mma:SPLIT:KB"):
            decode_one.parse_config(bad)


def test_bad_rows_and_configs_are_refused_first():
    with pytest.raises(SystemExit, match="--m must be 1..16"):
        decode_one.main(["--m", "17"])
    with pytest.raises(ValueError, match="expected mma"):
        decode_one.main(["--config", "mma"])
