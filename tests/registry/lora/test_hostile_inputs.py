"""Hostile LoRA files (review r10a D1, D2, D7, D8): each is refused with a clear reason or accepted
as intended; none crashes or hangs (every test here runs under a timeout)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from bad_files import PickleBomb, entry, write_raw_safetensors
from flux_fixtures import flux_lora, max_delta_error, partial_names
from safetensors.torch import save_file

from registry.lora import conversion
from registry.lora.canonical import canonicalise, fingerprint
from registry.lora.errors import RejectedFile
from registry.lora.finite import check_inspected
from registry.lora.formats import to_format
from registry.lora.inspect import load_canonical
from registry.lora.safe_read import read_header, read_safetensors

pytestmark = pytest.mark.timeout(180)  # a hang (D1: diffusers' endless loop) fails, never blocks

BLOCK0 = partial_names((0,), (), attention_only=True)
BLOCK1 = partial_names((1,), (), attention_only=True)
PROJ = "lora_unet_double_blocks_0_img_attn_proj"


def reject(state: dict[str, torch.Tensor], code: str, metadata: dict[str, str] | None = None) -> RejectedFile:
    with pytest.raises(RejectedFile) as info:
        canonicalise(state, metadata or {})
    assert info.value.code == code, info.value
    return info.value


def save(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    return path


# --- D1: negative alphas ---------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["kohya", "comfyui", "onetrainer", "diffusers"])
def test_a_negative_alpha_is_accepted_alike_in_every_format(fmt):
    layers = flux_lora(BLOCK0, 4, seed=11)
    reference = fingerprint(canonicalise(to_format(layers, "diffusers"), {}))
    lora = canonicalise(to_format(layers, fmt, alpha=-4.0), {})  # B is negated to keep ΔW
    assert max_delta_error(layers, lora.layers) < 1e-6
    assert fingerprint(lora) == reference
    assert any("alpha <= 0" in n for n in lora.notes)


@pytest.mark.parametrize("alpha", [-4.0, 0.0])
def test_modules_with_alpha_at_most_zero_are_left_out_of_the_diffusers_check(monkeypatch, alpha):
    layers = flux_lora(BLOCK0, 4, seed=12)
    state = to_format(layers, "kohya")
    state[f"{PROJ}.alpha"] = torch.tensor(alpha)
    fed = []
    real = conversion._via_diffusers
    monkeypatch.setattr(conversion, "_via_diffusers", lambda t: fed.append(set(t)) or real(t))
    lora = canonicalise(state, {})
    assert len(fed) == 1 and fed[0] and not any(k.startswith(PROJ) for k in fed[0])
    expected = dict(layers)
    if alpha == 0:  # alpha 0: that layer's update is zero, so it is dropped
        del expected["transformer_blocks.0.attn.to_out.0"]
    else:
        a, b = layers["transformer_blocks.0.attn.to_out.0"]
        expected["transformer_blocks.0.attn.to_out.0"] = (a, -b)
    assert max_delta_error(expected, lora.layers) < 1e-6


def test_diffusers_never_converts_a_whole_file_holding_a_negative_alpha(monkeypatch):
    state = {"foo." + k: v for k, v in to_format(flux_lora(BLOCK0, 4, seed=13), "kohya").items()}
    state[f"foo.{PROJ}.alpha"] = torch.tensor(-4.0)

    def never(_):
        raise AssertionError("diffusers was given a negative alpha")

    monkeypatch.setattr(conversion, "_via_diffusers", never)
    error = reject(state, "unsupported_layers")
    assert "unrecognised LoRA modules" in error.reason and "not run" in error.reason


# --- D2: a header dtype that is no string, a PEFT config of wrong types or values -------------
@pytest.mark.parametrize("dtype", [["F32"], {"F32": 1}, 4, None])
def test_a_dtype_that_is_no_string_is_a_bad_dtype(tmp_path, dtype):
    header = {f"{PROJ}.alpha": {**entry("F32", []), "dtype": dtype}}
    path = write_raw_safetensors(tmp_path / "d.safetensors", header, b"\0" * 4)
    with pytest.raises(RejectedFile) as info:
        read_header(path)
    assert info.value.code == "bad_dtype" and "not a string" in info.value.reason


BAD_CONFIGS = {
    "r_zero": ({"r": 0, "lora_alpha": 8}, "r is 0"),
    "r_string": ({"r": "4", "lora_alpha": 8}, "r is '4'"),
    "r_dict": ({"r": {"a": 1}, "lora_alpha": 8}, "r is"),
    "r_bool": ({"r": True, "lora_alpha": 8}, "r is"),
    "r_huge_int": ({"r": 10**400, "lora_alpha": 8}, "r is"),
    "alpha_string": ({"r": 4, "lora_alpha": "eight"}, "lora_alpha is 'eight'"),
    "alpha_nan": ({"r": 4, "lora_alpha": float("nan")}, "lora_alpha is nan"),
    "alpha_inf": ({"r": 4, "lora_alpha": float("inf")}, "lora_alpha is inf"),
    "bad_regex": ({"r": 4, "lora_alpha": 8, "alpha_pattern": {"(": 2}}, "not a valid regular"),
    # backtracks exponentially on a module name: Python's re takes minutes on a FLUX name
    "backtracking": ({"r": 4, "lora_alpha": 8, "alpha_pattern": {r"(.|\w)*[^a-z_.0-9]": 2}}, "takes over"),
    "pattern_list": ({"r": 4, "lora_alpha": 8, "rank_pattern": [1, 2]}, "rank_pattern is a JSON list"),
    "pattern_value": ({"r": 4, "lora_alpha": 8, "rank_pattern": {"to_q": "x"}}, "rank_pattern["),
    "rslora_negative_r": ({"r": -4, "lora_alpha": 8, "use_rslora": True}, "r is -4"),
    "rslora_string": ({"r": 4, "lora_alpha": 8, "use_rslora": "yes"}, "use_rslora"),
    "not_an_object": ([4, 8], "not an object"),
    "too_many_patterns": ({"r": 4, "lora_alpha": 8, "rank_pattern": {f"x{i}": 4 for i in range(5000)}},
                          "over the limit"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_a_bad_peft_config_is_invalid_metadata(case):
    config, words = BAD_CONFIGS[case]
    state = to_format(flux_lora(BLOCK0, 4, seed=14), "diffusers")
    error = reject(state, "invalid_metadata", {"lora_adapter_metadata": json.dumps(config)})
    assert words in error.reason and "lora_adapter_metadata" in error.reason


@pytest.mark.parametrize("raw", ["{not json", "[" * 100_000])
def test_peft_config_that_is_not_json_is_invalid_metadata(raw):
    state = to_format(flux_lora(BLOCK0, 4, seed=14), "diffusers")
    assert "not valid JSON" in reject(state, "invalid_metadata", {"lora_adapter_metadata": raw}).reason


def test_a_valid_peft_config_with_patterns_and_rslora_scales_as_peft_does():
    layers = flux_lora(BLOCK0, 4, seed=15)
    config = {"r": 4, "lora_alpha": 8, "use_rslora": True, "rank_pattern": {"to_k": 4},
              "alpha_pattern": {"attn.to_q": -2}}
    lora = canonicalise(to_format(layers, "diffusers"), {"lora_adapter_metadata": json.dumps(config)})
    scale = {n: (-2 if n.endswith("to_q") else 8) / 2.0 for n in layers}  # alpha / sqrt(4)
    expected = {n: (a, b * scale[n]) for n, (a, b) in layers.items()}
    assert max_delta_error(expected, lora.layers) < 1e-6


def test_a_nan_peft_alpha_in_a_file_is_not_called_an_overflow(tmp_path):
    meta = {"lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": float("nan")})}
    path = save(tmp_path / "n.safetensors", to_format(flux_lora(BLOCK0, 4, seed=16), "diffusers"), meta)
    with pytest.raises(RejectedFile) as info:
        load_canonical(path)
    assert info.value.code == "invalid_metadata" and "overflow" not in info.value.reason


def test_a_nan_made_by_a_scale_is_nan_inf_not_an_overflow(tmp_path):
    state = to_format(flux_lora(BLOCK0, 4, seed=17), "diffusers")
    path = save(tmp_path / "s.safetensors", state)
    tensors, _ = read_safetensors(path, check_finite=False)
    lora = canonicalise(tensors, {})
    name = next(iter(lora.factors))
    a, b = lora.factors[name]
    lora.factors[name] = (a, b.float() * float("nan"))  # as a NaN scale would make it
    lora._projections = None
    with pytest.raises(RejectedFile) as info:
        check_inspected(path, tensors, lora)
    assert info.value.code == "nan_inf" and "overflow" not in info.value.reason and name in info.value.reason


# --- D7: unrecognised modules, protocol 0/1 pickles and text ----------------------------------
def test_unrecognised_modules_are_unsupported_layers_not_a_zero_lora():
    state = {"foo." + k: v for k, v in to_format(flux_lora(BLOCK0, 4, seed=18), "kohya").items()}
    error = reject(state, "unsupported_layers")
    assert "4 unrecognised LoRA modules, e.g. ['foo.lora_unet_double_blocks_0_" in error.reason


def test_diffusers_missing_modules_of_a_file_our_map_cannot_convert_is_unsupported(monkeypatch):
    state = to_format(flux_lora(BLOCK0, 4, seed=19), "kohya")
    state["lora_unet_double_blocks_0_img_attn_foo.lora_down.weight"] = torch.ones(4, 3072)
    state["lora_unet_double_blocks_0_img_attn_foo.lora_up.weight"] = torch.ones(3072, 4)
    stand_in = flux_lora(["transformer_blocks.5.attn.to_q"], 2, seed=9)  # drops all but one
    monkeypatch.setattr(conversion, "_via_diffusers", lambda t: stand_in)
    error = reject(state, "unsupported_layers")
    assert "unrecognised LoRA modules" in error.reason and "converted only 1 layers" in error.reason


@pytest.mark.parametrize("protocol", [0, 1])
def test_a_protocol_0_or_1_pickle_is_called_a_pickle(tmp_path, protocol):
    sentinel = tmp_path / "PWNED"
    small = tmp_path / "small.safetensors"
    small.write_bytes(pickle.dumps(PickleBomb(sentinel), protocol=protocol))
    big = tmp_path / "big.safetensors"  # longer than what is sniffed: no STOP in sight
    big.write_bytes(pickle.dumps([PickleBomb(sentinel), list(range(40_000))], protocol=protocol))
    for path in (small, big):
        with pytest.raises(RejectedFile) as info:
            read_safetensors(path)
        assert info.value.code == "pickle" and "refusing to unpickle" in info.value.reason
    assert not sentinel.exists()


def test_text_named_safetensors_is_not_a_safetensors_file(tmp_path):
    path = tmp_path / "t.safetensors"
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 12\n")
    with pytest.raises(RejectedFile) as info:
        read_safetensors(path)
    assert info.value.code == "not_safetensors" and "starts with text ('version" in info.value.reason


def test_binary_with_an_absurd_length_is_still_a_huge_header(tmp_path):
    path = write_raw_safetensors(tmp_path / "h.safetensors", {}, length=2**62 + 7)
    with pytest.raises(RejectedFile) as info:
        read_safetensors(path)
    assert info.value.code == "header_too_large"


# --- D8: the same layer given twice -----------------------------------------------------------
def test_the_same_layers_twice_with_different_weights_are_rejected():
    a, b = flux_lora(BLOCK0, 4, seed=19), flux_lora(BLOCK0, 4, seed=20)
    error = reject({**to_format(a, "kohya"), **to_format(b, "diffusers")}, "duplicate_layer")
    assert "layer transformer_blocks.0.attn." in error.reason and "different weights" in error.reason


def test_the_same_layers_twice_with_the_same_weights_are_kept_once():
    a = flux_lora(BLOCK0, 4, seed=21)
    lora = canonicalise({**to_format(a, "kohya"), **to_format(a, "diffusers")}, {})
    assert max_delta_error(a, lora.layers) < 1e-6 and lora.shapes().keys() == a.keys()
    assert any("given twice with the same weights" in n for n in lora.notes)


def test_two_formats_for_different_layers_are_accepted():
    a, b = flux_lora(BLOCK0, 4, seed=22), flux_lora(BLOCK1, 4, seed=23)
    lora = canonicalise({**to_format(a, "kohya"), **to_format(b, "diffusers")}, {})
    assert max_delta_error({**a, **b}, lora.layers) < 1e-6
