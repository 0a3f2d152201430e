"""NaN/Inf found in the fingerprint's pass: any tensor of any format, same rejection as before."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from registry.lora.base_models import flux1_dev
from registry.lora.errors import RejectedFile
from registry.lora.finite import not_viewed
from registry.lora.formats import FORMATS, get, to_format
from registry.lora.inspect import inspect_file
from registry.lora.safe_read import read_safetensors
from registry.lora.canonical import canonicalise
from tests.registry.flux_fixtures import flux_lora, partial_names

BAD = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


def _state(fmt: str, alpha: float | None = None) -> dict[str, torch.Tensor]:
    """A LoRA on two blocks written as ``fmt``; the parts of a module the format fuses share one
    A, as in files trained on the fused model (others are written block-diagonally)."""
    names = partial_names((0,), (1,), attention_only=fmt == "xlabs")  # XLabs adapts attention only
    layers = flux_lora(names, rank=4, dtype=torch.bfloat16)
    for kind, table in (get(fmt).writer.fused or {}).items():
        prefix = "transformer_blocks" if kind == "double_blocks" else "single_transformer_blocks"
        for parts in table.values():
            group = [n for n in (f"{prefix}.{i}.{p}" for i in (0, 1) for p in parts) if n in layers]
            for i in (0, 1):
                mine = [n for n in group if n.startswith(f"{prefix}.{i}.")]
                for name in mine[1:]:
                    layers[name] = (layers[mine[0]][0], layers[name][1])
    return {k: v.contiguous() for k, v in to_format(layers, fmt, alpha=alpha).items()}


def _save(path: Path, state: dict[str, torch.Tensor]) -> Path:
    save_file({k: v.clone() for k, v in state.items()}, str(path))
    return path


def _poison(state: dict[str, torch.Tensor], key: str, value: float) -> None:
    t = state[key].clone()
    t.view(-1)[t.numel() // 2] = value
    state[key] = t


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("which", ["first", "last"])
@pytest.mark.parametrize("bad", sorted(BAD))
def test_a_nan_or_inf_in_any_factor_of_any_format_is_refused(tmp_path: Path, fmt: str,
                                                             which: str, bad: str) -> None:
    state = _state(fmt)
    keys = sorted(k for k, v in state.items() if v.ndim == 2)
    key = keys[0] if which == "first" else keys[-1]
    _poison(state, key, BAD[bad])
    with pytest.raises(RejectedFile) as err:
        inspect_file(_save(tmp_path / "x.safetensors", state), [flux1_dev()], sha256="x")
    assert err.value.code == "nan_inf" and repr(key) in err.value.reason


@pytest.mark.parametrize("fmt", ["kohya", "onetrainer", "comfyui"])
def test_a_nan_alpha_is_refused(tmp_path: Path, fmt: str) -> None:
    state = _state(fmt, alpha=2.0)
    key = next(k for k in sorted(state) if k.endswith(".alpha"))
    state[key] = torch.tensor(float("nan"), dtype=state[key].dtype)
    with pytest.raises(RejectedFile) as err:
        inspect_file(_save(tmp_path / "x.safetensors", state), [flux1_dev()], sha256="x")
    assert err.value.code == "nan_inf" and repr(key) in err.value.reason


def test_a_nan_in_an_ignored_tensor_is_refused(tmp_path: Path) -> None:
    """A tensor no factor uses (an extra key) is still checked."""
    state = _state("diffusers")
    state["transformer.some_norm.weight"] = torch.tensor([1.0, float("inf")])
    with pytest.raises(RejectedFile) as err:
        inspect_file(_save(tmp_path / "x.safetensors", state), [flux1_dev()], sha256="x")
    assert err.value.code == "nan_inf" and "some_norm" in err.value.reason


def test_an_update_that_overflows_float32_is_refused_with_its_own_reason(tmp_path: Path) -> None:
    """Finite factors near the float limit: not called NaN/Inf, and no crash (the fingerprint
    used to raise ValueError on them, which stopped an ingest)."""
    state = _state("diffusers")
    key = next(k for k in sorted(state) if "lora_A" in k)
    state[key] = torch.full_like(state[key], 3e38)  # the sum of a row of A overflows float32
    with pytest.raises(RejectedFile) as err:
        inspect_file(_save(tmp_path / "x.safetensors", state), [flux1_dev()], sha256="x")
    assert err.value.code == "out_of_range" and "overflows" in err.value.reason


@pytest.mark.parametrize("fmt", FORMATS)
def test_factors_view_the_file_in_place_so_only_small_tensors_are_scanned(tmp_path: Path, fmt: str) -> None:
    """What the fingerprint's pass does not cover is small (alphas): no second pass over factors."""
    tensors, metadata = read_safetensors(_save(tmp_path / "x.safetensors", _state(fmt)), check_finite=False)
    left = not_viewed(tensors, canonicalise(tensors, metadata))
    assert all(t.numel() == 1 for t in left.values()), sorted(left)[:3]
