"""Where a model runs and in what precision: ``--device`` / ``--dtype`` names to torch objects.

``auto`` picks the machine's accelerator when torch sees one (CUDA, then Apple's MPS), else the
CPU.  The precision follows the device and the weights: float32 on the CPU (bfloat16 matrix
products there are slower and less exact); on an accelerator, the precision the weights are
stored in (FLUX.1-dev's are bfloat16: 24 GB instead of 48; the demo base's float32, and it renders
visibly differently in bfloat16 under some torch builds), bfloat16 when that is unknown, and
float16 instead of bfloat16 on a CUDA card without bfloat16.
"""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICE_KINDS = ("cpu", "cuda", "mps")


def pick_device(name: str | torch.device | None = "auto") -> torch.device:
    """``auto`` (or None), ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` as a device torch can use here;
    an accelerator this torch cannot see is a ValueError that says so."""
    if isinstance(name, torch.device):
        name = str(name)  # checked like its name: a GPU this torch cannot see is refused here
    if name in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in DEVICE_KINDS:
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r}: this torch ({torch.__version__}) sees no CUDA GPU")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: only {torch.cuda.device_count()} CUDA GPU(s) here")
    if device.type == "mps" and not _mps_available():
        raise ValueError(f"device {name!r}: this torch ({torch.__version__}) has no MPS backend here")
    return device


def pick_dtype(name: str | torch.dtype | None, device: torch.device, stored: torch.dtype | None = None) -> torch.dtype:
    """``auto`` (or None): the precision ``device`` runs weights stored in ``stored`` in (see the
    module docstring); else ``float32``, ``bfloat16`` or ``float16``."""
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "auto"):
        if device.type == "cpu":
            return torch.float32
        chosen = stored if stored in DTYPES.values() else torch.bfloat16
        if chosen == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            return torch.float16
        return chosen
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}: use auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())
