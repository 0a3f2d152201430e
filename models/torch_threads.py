"""One torch intra-op thread for the small-tensor work of this project."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run torch ops on one intra-op thread, restoring the setting afterwards.

    LoRA inspection (thousands of ops on tensors of a few MB) and the demo world's tiny models
    gain little from splitting each op over OpenMP threads, and on a busy machine every op waits
    at a barrier for a worker that is not scheduled. Measured on 2 shared cores: inspecting a
    172 MB FLUX LoRA takes ~1.2 s on one thread and 5-70 s on two; a tiny-FLUX training step
    107 ms on one thread and 1222 ms on two. Parallelism comes from processes instead.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
