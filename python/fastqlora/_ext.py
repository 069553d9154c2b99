"""Access to the compiled extension ``fastqlora._C`` with errors a user can act on.

The extension takes raw pointers, sizes and CUDA streams as integers; the helpers
here turn tensors into those integers and check what the extension cannot.
"""
from __future__ import annotations

import torch

try:
    from . import _C  # type: ignore[attr-defined]
except ImportError as exc:  # pragma: no cover - only when the package was not built
    _C = None
    _IMPORT_ERROR: ImportError | None = exc
else:
    _IMPORT_ERROR = None


def ext():
    """The compiled module; raises ImportError with the fix when it is missing."""
    if _C is None:
        raise ImportError(
            "fastqlora's compiled extension fastqlora._C is missing: install the package with "
            "`pip install .` from the source tree (running from a source checkout without "
            f"installing does not build it). Original error: {_IMPORT_ERROR}"
        )
    return _C


def built_with_cuda() -> bool:
    return _C is not None and bool(_C.built_with_cuda())


def require_cuda(what: str) -> None:
    """Raise a clear error when a CUDA op is asked of a build without CUDA."""
    if not built_with_cuda():
        raise RuntimeError(
            f"{what} needs the CUDA part of fastqlora._C, but this build has none: the "
            "extension was built without a CUDA compiler. Reinstall on a machine with nvcc "
            "(`pip install --no-build-isolation .`), or pass CPU tensors."
        )


def ptr(t: torch.Tensor | None) -> int:
    """Address of a tensor's first element (0 for None)."""
    return 0 if t is None else int(t.data_ptr())


_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def stream_of(t: torch.Tensor) -> int:
    """The current CUDA stream of the tensor's device, as an integer handle.

    torch's raw-stream getter where it exists (what Triton's launcher calls): it skips
    building a ``torch.cuda.Stream`` object at every launch (host time counts: a small
    model's training step is launch-bound)."""
    if _raw_stream is not None:
        return int(_raw_stream(t.device.index if t.device.index is not None else torch.cuda.current_device()))
    return int(torch.cuda.current_stream(t.device).cuda_stream)
