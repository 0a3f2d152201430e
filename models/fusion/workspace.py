"""Scratch buffers reused by every wrapped layer of one transformer (inference only).

On CPU a fresh tensor of hundreds of MB costs its page faults on every call (glibc returns large
blocks to the OS): measured, a [4, 1024, 12288] float32 ``bmm`` takes 290 ms into a new tensor and
84 ms into a reused one.  Layers run one after another, so one buffer per slot serves them all.
"""

from __future__ import annotations

import math

import torch


class Workspace:
    """Named flat buffers, grown to the largest request; ``get`` returns a view of the right shape."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, slot: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A [shape] view of slot ``slot``'s buffer (contents undefined; valid until the next ``get``)."""
        size = math.prod(shape)
        buf = self._buffers.get(slot)
        if buf is None or buf.numel() < size or buf.dtype != dtype or buf.device != device:
            with torch.inference_mode(False):  # writable under no_grad as well as inference_mode
                buf = torch.empty(size, dtype=dtype, device=device)
            self._buffers[slot] = buf
        return buf[:size].view(shape)

    def clear(self) -> None:
        """Free the buffers."""
        self._buffers.clear()
