"""--device / --dtype names: what ``auto`` picks here, and an accelerator this machine lacks said plainly."""

from __future__ import annotations

import pytest
import torch

from models.torch_device import pick_device, pick_dtype


def test_auto_is_the_gpu_in_bfloat16_if_there_is_one_else_the_cpu_in_float32():
    device = pick_device("auto")
    assert pick_device(None) == device
    if torch.cuda.is_available():
        assert device.type == "cuda"
        assert pick_dtype("auto", device) in (torch.bfloat16, torch.float16)
        assert pick_dtype("auto", device, stored=torch.float32) == torch.float32
    else:
        assert device.type in ("cpu", "mps")
    assert pick_dtype("auto", torch.device("cpu")) == torch.float32
    assert pick_dtype(None, torch.device("cpu")) == torch.float32


def test_auto_on_an_accelerator_keeps_the_stored_precision():
    mps = torch.device("mps")  # (a device object needs no hardware; no CUDA query is made for it)
    assert pick_dtype("auto", mps, stored=torch.float32) == torch.float32  # the demo base
    assert pick_dtype("auto", mps, stored=torch.bfloat16) == torch.bfloat16  # FLUX.1-dev
    assert pick_dtype("auto", mps, stored=torch.float16) == torch.float16
    assert pick_dtype("auto", mps) == torch.bfloat16  # unknown (a Hub id): FLUX.1's
    assert pick_dtype("auto", mps, stored=torch.float64) == torch.bfloat16
    assert pick_dtype("auto", torch.device("cpu"), stored=torch.bfloat16) == torch.float32
    assert pick_dtype("bfloat16", torch.device("cpu"), stored=torch.float32) == torch.bfloat16


def test_names_and_objects():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device(torch.device("cpu")) == torch.device("cpu")
    assert pick_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    assert pick_dtype("float16", torch.device("cpu")) == torch.float16
    assert pick_dtype(torch.float64, torch.device("cpu")) == torch.float64


@pytest.mark.parametrize("name", ["gpu", "tpu", "cuda:x", "", "meta"])
def test_unknown_devices_are_refused_with_the_choices(name):
    with pytest.raises(ValueError, match="use auto, cpu, cuda, cuda:N or mps"):
        pick_device(name)


def test_unknown_dtypes_are_refused_with_the_choices():
    with pytest.raises(ValueError, match="use auto, float32, bfloat16, float16"):
        pick_dtype("float8", torch.device("cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_cuda_on_a_machine_without_one_says_so():
    with pytest.raises(ValueError, match="sees no CUDA GPU"):
        pick_device("cuda")
    with pytest.raises(ValueError, match="sees no CUDA GPU"):
        pick_device("cuda:1")
    with pytest.raises(ValueError, match="sees no CUDA GPU"):  # a device object is checked as its name is
        pick_device(torch.device("cuda"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_gpu_index_past_the_last_says_how_many():
    with pytest.raises(ValueError, match="CUDA GPU"):
        pick_device(f"cuda:{torch.cuda.device_count()}")
    assert pick_device("cuda:0").type == "cuda"
