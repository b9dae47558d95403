"""The one device resolver of both stages: `--device` -> torch.device.

Valid names: auto (cuda when torch sees a GPU, else cpu), cpu, cuda, cuda:N, mps. Anything
else, a GPU torch does not see, or a GPU index past its count is a ValueError (one line, the
valid names or the fix in it). torch is imported only when a name is resolved.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")  # what --device accepts
_VALID = re.compile(r"auto|cpu|mps|cuda(:[0-9]+)?")  # DEVICES, N a GPU index
_LIST = f"{', '.join(DEVICES[:-1])} or {DEVICES[-1]}"


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda when torch sees a GPU, else cpu; refuses any other name than
    DEVICES, cuda without a GPU, a GPU index torch does not see, and mps without an Apple GPU."""
    if not isinstance(device, str) or not _VALID.fullmatch(device):
        if isinstance(device, str) and device.startswith("cuda"):
            raise ValueError(f"--device '{device}' is not a device; use {_LIST}")
        raise ValueError(f"--device must be {_LIST}, not {device!r}")
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: torch sees no GPU here; use --device cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"--device {device}: torch sees {torch.cuda.device_count()} GPU(s) "
                f"(cuda:0 to cuda:{torch.cuda.device_count() - 1}); pick one of those"
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: torch sees no Apple GPU here; use --device cpu")
    return dev
