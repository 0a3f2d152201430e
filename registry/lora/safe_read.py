"""Strict reader for LoRA weight files that never unpickles anything.

Only ``.safetensors`` files are accepted. The header is parsed and validated by hand first
(sizes, dtypes, shapes, offsets, exact tiling of the data section, metadata) so that every
problem gets its own stable :class:`~registry.lora.errors.RejectedFile` code; only then is the data
section memory-mapped (privately: writes to a tensor never reach the file) and each tensor viewed
at the offsets the header check accepted. Nothing is ever unpickled.
"""

from __future__ import annotations

import io
import json
import math
import mmap
import os
import pickletools
import struct
from collections import Counter
from pathlib import Path

import torch

from registry.lora.errors import RejectedFile

MAX_HEADER_BYTES: int = 100 * 1024 * 1024
MAX_TENSORS: int = 20_000
ALLOWED_DTYPES: set[str] = {"F64", "F32", "F16", "BF16"}

_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
_TORCH_DTYPE = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                "BF16": torch.bfloat16}
_NOT_LORA_DTYPES = {  # valid safetensors dtypes that we refuse for LoRA weights
    "BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64", "C64",
    "F8_E4M3", "F8_E5M2", "F8_E8M0", "F6_E2M3", "F6_E3M2", "F4",
}
_KIND_WORDS = {
    "pickle": "a Python pickle (e.g. a legacy torch.save checkpoint)",
    "zip": "a PyTorch zip/pickle checkpoint (torch.save format)",
    "safetensors": "safetensors data under the wrong extension",
    "empty": "an empty file",
    "unknown": "an unrecognised format",
}


def _kind_of(head: bytes) -> str:
    """Classify a file from its first (up to 9) bytes."""
    if not head:
        return "empty"
    if len(head) >= 9 and head[8:9] == b"{":  # u64 header length, then the JSON object
        return "safetensors"
    if head[0] == 0x80:  # pickle PROTO opcode (protocol >= 2)
        return "pickle"
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    return "unknown"


_SNIFF_BYTES = 64 * 1024
_TEXT_BYTES = frozenset(range(0x20, 0x7F)) | frozenset(b"\t\n\r")


def _is_pickle(data: bytes) -> bool:
    """Whether ``data`` reads as a pickle of any protocol (protocol 0/1 ones have no marker
    byte): a whole one, up to STOP with a consistent stack and memo (:func:`pickletools.dis`), or,
    where ``data`` was cut off at the sniff limit, at least 64 opcodes. :mod:`pickletools` only
    decodes opcodes and their arguments; nothing is built or imported."""
    try:
        pickletools.dis(io.BytesIO(data), out=io.StringIO())
        return True
    except Exception:  # noqa: BLE001 - any failure on hostile bytes just means "not a pickle"
        pass
    if len(data) < _SNIFF_BYTES:
        return False
    stream, count = io.BytesIO(data), 0
    try:
        for _ in pickletools.genops(stream):
            count += 1
    except Exception:  # noqa: BLE001 - an unknown opcode, or the data ran out
        pass
    return count >= 64 and stream.tell() >= len(data)


def _refuse_other_kind(path: Path, head: bytes) -> None:
    """Refuse a ``.safetensors`` file that is a protocol 0/1 pickle or text (its first 8 bytes,
    read as a header length, are absurd): a clearer reason than the length's."""
    if _is_pickle(head):
        raise _reject("pickle", path, "named .safetensors but is a Python pickle (protocol 0 or "
                      "1); refusing to unpickle it")
    if head[:8] and all(c in _TEXT_BYTES for c in head[:8]):
        raise _reject("not_safetensors", path, f"not a safetensors file: it starts with text "
                      f"({head[:40].decode('ascii', 'replace')!r}), not an 8-byte header length")


def sniff_kind(path: str | os.PathLike) -> str:
    """Return "safetensors" | "pickle" | "zip" | "empty" | "unknown" from the first bytes only."""
    with open(path, "rb") as f:
        return _kind_of(f.read(9))


def _reject(code: str, path: Path, reason: str) -> RejectedFile:
    return RejectedFile(code, f"{path.name}: {reason}")


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        dupes = [k for k, c in Counter(k for k, _ in pairs).items() if c > 1]
        raise ValueError(f"duplicate keys {dupes[:5]}")
    return out


def _check_entry(path: Path, name: str, entry: object) -> tuple[int, int]:
    """Validate one tensor entry; return its (begin, end) offsets."""
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise _reject("bad_entry", path, f"tensor {name!r} must be an object with exactly "
                      f"'dtype', 'shape' and 'data_offsets', got {str(entry)[:200]}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in ALLOWED_DTYPES:
        why = ("is not a string" if not isinstance(dtype, str)
               else "is not a floating-point type usable for LoRA weights"
               if dtype in _NOT_LORA_DTYPES else "is not a known safetensors dtype")
        raise _reject("bad_dtype", path, f"tensor {name!r} has dtype {str(dtype)[:100]!r}, which "
                      f"{why} (allowed: {', '.join(sorted(ALLOWED_DTYPES))})")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise _reject("bad_shape", path, f"tensor {name!r} has shape {str(shape)[:200]}; "
                      "expected a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))):
        raise _reject("bad_offsets", path, f"tensor {name!r} has data_offsets "
                      f"{str(offsets)[:200]}; expected [begin, end] integers")
    begin, end = offsets
    if begin < 0 or end < begin:
        raise _reject("bad_offsets", path, f"tensor {name!r} has invalid data_offsets "
                      f"[{begin}, {end}] (need 0 <= begin <= end)")
    expected = math.prod(shape) * _ITEMSIZE[dtype]
    if end - begin != expected:
        raise _reject("bad_offsets", path, f"tensor {name!r} spans {end - begin} bytes but "
                      f"shape {shape} of {dtype} needs {expected}")
    return begin, end


def _check_layout(path: Path, spans: list[tuple[int, int, str]], data_len: int) -> None:
    """Tensors must tile the data section exactly: no overlaps, holes or trailing bytes."""
    pos, prev = 0, None
    for begin, end, name in sorted(spans):
        if begin < pos:
            raise _reject("bad_offsets", path, f"tensor {name!r} [{begin}, {end}] overlaps "
                          f"tensor {prev!r}, which ends at byte {pos}")
        if begin > pos:
            if end > data_len:
                raise _reject("bad_offsets", path, f"tensor {name!r} offsets [{begin}, {end}] "
                              f"lie outside the {data_len}-byte data section")
            raise _reject("bad_offsets", path, f"unused hole in the data section at bytes "
                          f"[{pos}, {begin}) before tensor {name!r}")
        pos, prev = end, name
    if pos > data_len:
        raise _reject("truncated", path, f"data section has {data_len} bytes but the header "
                      f"describes {pos}; the file is truncated")
    if pos < data_len:
        raise _reject("bad_offsets", path, f"{data_len - pos} unused trailing bytes after the "
                      "last tensor")


def read_header(path: str | os.PathLike) -> tuple[dict[str, dict], dict[str, str], int]:
    """Parse + validate only the header: returns (tensor_entries, metadata, data_start_offset).

    Raises :class:`RejectedFile` for anything that is not a well-formed safetensors file.
    """
    p = Path(path)
    if p.suffix.lower() != ".safetensors":
        try:
            kind = f"looks like {_KIND_WORDS[sniff_kind(p)]}"
        except OSError:
            kind = "unreadable"
        raise _reject("unsupported_extension", p, f"only .safetensors files are accepted; "
                      f"'{p.suffix or '(none)'}' file {kind}; not loaded")
    if not p.is_file():
        raise _reject("not_a_file", p, "does not exist or is not a regular file")
    size = p.stat().st_size
    if size == 0:
        raise _reject("empty", p, "file is empty (0 bytes)")
    with open(p, "rb") as f:
        head = f.read(9)
        kind = _kind_of(head)
        if kind in ("pickle", "zip"):
            raise _reject("pickle", p, f"named .safetensors but is {_KIND_WORDS[kind]}; "
                          "refusing to unpickle it")
        if size < 8:
            raise _reject("truncated", p, f"only {size} bytes; too short for the 8-byte "
                          "header length")
        (n,) = struct.unpack("<Q", head[:8])
        if n > MAX_HEADER_BYTES or 8 + n > size:  # no safetensors length: maybe another kind
            f.seek(0)
            _refuse_other_kind(p, f.read(_SNIFF_BYTES))
        if n > MAX_HEADER_BYTES:
            raise _reject("header_too_large", p, f"header claims {n} bytes, over the "
                          f"{MAX_HEADER_BYTES}-byte cap")
        if 8 + n > size:
            raise _reject("header_past_eof", p, f"header claims {n} bytes but the file has "
                          f"only {size - 8} after the length prefix")
        f.seek(8)
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _reject("invalid_json", p, f"header is not valid UTF-8 JSON: {e}") from None
    if not isinstance(header, dict):
        raise _reject("invalid_json", p, f"header is a JSON {type(header).__name__}, "
                      "not an object")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _reject("invalid_metadata", p, "__metadata__ must be an object mapping strings "
                      f"to strings, got {str(metadata)[:200]}")
    if len(header) > MAX_TENSORS:
        raise _reject("too_many_tensors", p, f"{len(header)} tensors, over the limit of "
                      f"{MAX_TENSORS}")
    data_len = size - 8 - n
    spans = [(*_check_entry(p, k, v), k) for k, v in header.items()]
    _check_layout(p, spans, data_len)
    return header, metadata, 8 + n


def _map(path: Path, size: int) -> torch.Tensor:
    """The file's first ``size`` bytes as a flat uint8 tensor over a private (copy-on-write)
    memory map; ``size`` must still be the file's size (it may have changed since the header
    was checked)."""
    with open(path, "rb") as f:
        now = os.fstat(f.fileno()).st_size
        if now != size:
            raise ValueError(f"the file changed size while being read ({size} -> {now} bytes)")
        mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
    return torch.frombuffer(mm, dtype=torch.uint8)  # holds a reference to the map


def _view(flat: torch.Tensor, begin: int, end: int, dtype: str, shape: list[int]) -> torch.Tensor:
    raw = flat[begin:end]
    if begin % _ITEMSIZE[dtype]:  # unaligned in the file (a crafted header length): copy
        raw = raw.clone()
    return raw.view(_TORCH_DTYPE[dtype]).view(shape)


def _finite(t: torch.Tensor) -> bool:
    """No NaN/Inf (min/max propagate NaN and expose +-Inf: ~10x faster than an isfinite mask)."""
    return not t.numel() or bool(torch.isfinite(torch.stack(torch.aminmax(t))).all())


def _check_finite(path: Path, flat: torch.Tensor, start: int, entries: dict[str, dict],
                  tensors: dict[str, torch.Tensor]) -> None:
    """Refuse any NaN/Inf. Checked per run of same-dtype tensors lying back to back in the file
    (one pass, no per-tensor overhead; the layout check made the data section tile exactly),
    then per tensor only inside a run that fails, to name the tensor."""
    spans = sorted((e["data_offsets"][0], e["data_offsets"][1], e["dtype"], name)
                   for name, e in entries.items())
    runs: list[list[tuple[int, int, str, str]]] = []
    for span in spans:
        if runs and runs[-1][-1][2] == span[2]:
            runs[-1].append(span)
        else:
            runs.append([span])
    for run in runs:
        begin, end, dtype = start + run[0][0], start + run[-1][1], run[0][2]
        if begin % _ITEMSIZE[dtype] == 0 and _finite(flat[begin:end].view(_TORCH_DTYPE[dtype])):
            continue
        check_finite(path, {name: tensors[name] for *_, name in run})


def check_finite(path: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse ``tensors`` (some or all of a file's) if any holds a NaN/Inf, naming the first.
    Checked together first (one check for many scalar alphas), then one by one to name it."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors.values():
        by_dtype.setdefault(t.dtype, []).append(t.reshape(-1))
    if all(_finite(torch.cat(ts)) for ts in by_dtype.values()):
        return
    for name, t in tensors.items():
        if not _finite(t):
            nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            raise _reject("nan_inf", Path(path), f"tensor {name!r} contains {nan} NaN and {inf} "
                          "Inf values")


def read_safetensors(
    path: str | os.PathLike, *, check_finite: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Validate then load; returns (tensors, __metadata__ dict of str->str). Raises RejectedFile.

    Tensors keep their stored dtype and are views of a private memory map of the file. With
    ``check_finite`` any NaN/Inf value is refused.
    """
    p = Path(path)
    entries, metadata, start = read_header(p)
    size = start + max((e["data_offsets"][1] for e in entries.values()), default=0)
    try:  # the layout check made the tensors tile the data section: size is the file's size
        flat = _map(p, size)
    except (OSError, ValueError) as e:
        raise _reject("load_failed", p, f"could not map the file: {e}") from None
    tensors = {name: _view(flat, start + e["data_offsets"][0], start + e["data_offsets"][1],
                           e["dtype"], e["shape"]) for name, e in entries.items()}
    if check_finite:
        _check_finite(p, flat, start, entries, tensors)
    return tensors, metadata
