"""A progress bar for training: loss, learning rate, tokens/s and GPU memory."""
from __future__ import annotations

import sys

import torch


class Progress:
    def __init__(self, total: int, initial: int = 0, enabled: bool = True, device: torch.device | None = None) -> None:
        self.device = device
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True,
                            file=sys.stderr)

    def update(self, record: dict[str, float]) -> None:
        if self.bar is None:
            return
        info = {"loss": f"{record['loss']:.4f}", "lr": f"{record['lr']:.2e}",
                "tok/s": f"{record['tokens'] / max(record['seconds'], 1e-9):,.0f}"}
        if self.device is not None and self.device.type == "cuda":
            info["mem"] = f"{torch.cuda.max_memory_allocated(self.device) / 2**30:.1f}GiB"
        self.bar.set_postfix(info, refresh=False)
        self.bar.update(1)

    def write(self, line: str) -> None:
        """A line above the bar (or on stdout without one)."""
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
