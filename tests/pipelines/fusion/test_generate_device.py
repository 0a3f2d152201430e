"""Where the base runs: ``Generator`` / ``autolora generate`` / registry gate training take a device
and a precision (a GPU in bfloat16 by default when torch sees one), the fusion methods follow the
base there, and a device this machine lacks is a one-line usage error before any work.

The bfloat16 checks run on the CPU (bfloat16 works there), so CI proves the precision path without a
GPU; the CUDA checks run where torch sees one (skipped elsewhere)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.cli import main
from pipelines.fusion_methods import GatedSession, get
from pipelines.generate import Generator, RenderSettings, load_base, stored_dtype
from pipelines.train_gates import GateRecipe, load_gates, train_gates, world_pool
from pipelines.world.sampling import generate
from registry.lora.inspect import load_canonical

FAST = RenderSettings(steps=3, size=32, true_cfg=1.5)
METHODS = ("none", "gated", "linear", "ties", "klora")  # the base, ours, diffusers' adapters, PEFT merge, selection
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _world_loras(world: Path) -> tuple[list, str]:
    """Three of the world's training LoRAs and a prompt with their trigger words."""
    entries = [e for e in json.loads((world / "world.json").read_text())["loras"] if e["split"] == "train"][:3]
    prompt = ", ".join([*(e["trigger"] for e in entries), "a circle"])
    return [load_canonical(world / e["file"])[0].layers for e in entries], prompt


def _renders(pipe, world: Path) -> dict[str, np.ndarray]:
    """One render per method with the three LoRAs fused (``Generator.render``'s work, without a registry)."""
    loras, prompt = _world_loras(world)
    out = {}
    for method in METHODS:
        with get(method).apply(pipe, loras, gates=None):
            out[method] = generate(pipe, [prompt], 0, steps=FAST.steps, cfg=FAST.true_cfg, size=FAST.size)
    return out


@pytest.fixture(scope="module")
def float32_images(micro_world):
    """The reference: three LoRAs fused by each kind of method on the CPU in float32."""
    torch.set_num_threads(1)
    pipe = load_base(micro_world, device="cpu", dtype="float32")
    assert pipe.transformer.dtype == torch.float32 and pipe.device.type == "cpu"
    return _renders(pipe, micro_world)


def _close(images: np.ndarray, reference: np.ndarray) -> float:
    """Mean absolute difference in uint8 levels."""
    return float(np.abs(images.astype(np.int16) - reference.astype(np.int16)).mean())


def test_the_cpu_in_float32_is_the_default_here(micro_world):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU: auto picks it")
    pipe = load_base(micro_world)
    assert pipe.device.type == "cpu" and pipe.transformer.dtype == torch.float32


def _check_close(got: dict[str, np.ndarray], reference: dict[str, np.ndarray], tolerance: float | None) -> None:
    """Every method renders; the LoRAs move the render from the base's by about as much as in the
    float32 reference (measured there: 8.0 (klora) to 27.3 (gated, linear) uint8 levels); and, given a
    ``tolerance``, each render is that close to the reference's."""
    for method in METHODS:
        assert got[method].shape == reference[method].shape
        if tolerance is not None:
            assert _close(got[method], reference[method]) < tolerance, method
        if method != "none":
            effect, expected = _close(got[method], got["none"]), _close(reference[method], reference["none"])
            assert expected > 5.0 and abs(effect - expected) < 0.25 * expected, method


def test_a_bfloat16_base_renders_every_method_with_the_loras_acting_as_in_float32(micro_world, float32_images):
    """Not pixel-close: the demo base (trained in float32, 3 steps here) rendered 0.27-0.40 uint8
    levels from float32 in bfloat16 under torch 2.13 but 12.9 under torch 2.11 (CPU and H200 alike,
    each component's relative error the same, ~0.5 %); so ``auto`` keeps it in float32."""
    pipe = load_base(micro_world, device="cpu", dtype="bfloat16")
    assert {p.dtype for p in pipe.transformer.parameters()} == {torch.bfloat16}
    _check_close(_renders(pipe, micro_world), float32_images, None)


def test_auto_keeps_a_base_in_the_precision_it_is_stored_in(micro_world):
    assert stored_dtype(micro_world / "base") == torch.float32
    assert stored_dtype("black-forest-labs/FLUX.1-dev") is None  # a Hub id: bfloat16 on a GPU


def test_a_bfloat16_generator_keeps_its_gates_in_bfloat16(micro_registry, micro_world):
    ids = micro_registry.lora_ids()[:3]
    with Generator(micro_registry, micro_world, render=FAST, device="cpu", dtype="bfloat16") as gen:
        assert gen.generate("a circle", lora_ids=ids).images.shape == (1, 32, 32, 3)
        assert {p.dtype for p in gen._session.fusion.gate_parameters()} == {torch.bfloat16}


def test_gates_train_in_float32_on_a_bfloat16_base_and_load_into_it(micro_world, tmp_path):
    pipe = load_base(micro_world, device="cpu", dtype="bfloat16")
    pool = world_pool(micro_world, images_per_lora=4)[:3]
    result = train_gates(pipe, pool, tmp_path, base_id="bf16", recipe=GateRecipe(steps=3, batch_size=2))
    assert len(result.losses) == 3 and all(np.isfinite(result.losses))
    assert {v.dtype for v in result.gates.state.values()} == {torch.float32}
    assert any(not torch.allclose(v, torch.full_like(v, 2.0)) for k, v in result.gates.state.items()
               if k.endswith(".w_o"))  # they moved: steps of 1e-3 would vanish in bfloat16 around 2.0
    assert {p.dtype for p in pipe.transformer.parameters()} == {torch.bfloat16}  # the base left as found
    assert load_gates(result.path).version == result.version


def _generate(capsys, registry, *args: str) -> tuple[int, str, str]:
    code = main(["generate", "a circle", "--registry", str(registry.root), "--json", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_device_and_dtype(micro_registry, micro_world, capsys, tmp_path):
    lora = micro_registry.lora_ids()[0]
    common = ["--base", str(micro_world), "--lora", lora, "--fusion", "linear", "--steps", "1", "--size", "16"]
    code, out, _ = _generate(capsys, micro_registry, *common, "--dtype", "bfloat16", "--device", "cpu",
                             "-o", str(tmp_path / "bf16.png"))
    assert code == 0 and json.loads(out)["loras"] == [lora] and (tmp_path / "bf16.png").is_file()
    code, _, err = _generate(capsys, micro_registry, *common, "--dtype", "float8", "-o", str(tmp_path / "x.png"))
    assert code == 2 and "unknown dtype 'float8'" in err and err.count("\n") == 1
    code, _, err = _generate(capsys, micro_registry, *common, "--device", "gpu", "-o", str(tmp_path / "x.png"))
    assert code == 2 and "unknown device 'gpu'" in err and err.count("\n") == 1
    if not torch.cuda.is_available():
        code, _, err = _generate(capsys, micro_registry, *common, "--device", "cuda", "-o", str(tmp_path / "x.png"))
        assert code == 2 and "sees no CUDA GPU" in err and err.count("\n") == 1
    assert not (tmp_path / "x.png").exists()
    # a demo world's gates train on the cpu: --device belongs to registry training
    assert main(["train", "gates", "--world", str(micro_world), "--device", "cpu"]) == 2
    assert "give --registry" in capsys.readouterr().err


@CUDA
def test_on_a_cuda_gpu_every_method_renders_close_to_the_cpu(micro_world, float32_images):
    exact = load_base(micro_world)  # auto: the GPU, in the precision the demo base is stored in (float32)
    assert exact.device.type == "cuda" and exact.transformer.dtype == torch.float32
    _check_close(_renders(exact, micro_world), float32_images, 1.0)
    del exact
    half = load_base(micro_world, dtype="bfloat16")
    assert half.device.type == "cuda" and half.transformer.dtype == torch.bfloat16
    _check_close(_renders(half, micro_world), float32_images, None)
    with GatedSession(half) as session, session.activate(_world_loras(micro_world)[0]):
        assert {(p.device.type, p.dtype) for p in session.fusion.gate_parameters()} == {("cuda", torch.bfloat16)}


@CUDA
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_on_a_cuda_gpu_gates_train(micro_world, tmp_path, dtype):
    """(In bfloat16 cuDNN's attention backward returned NaN from the second step: training leaves it out.)"""
    pipe = load_base(micro_world, device="cuda", dtype=dtype)
    pool = world_pool(micro_world, images_per_lora=4)[:3]
    result = train_gates(pipe, pool, tmp_path, base_id="cuda", recipe=GateRecipe(steps=4, batch_size=2))
    assert len(result.losses) == 4 and all(np.isfinite(result.losses))
    assert {(v.dtype, v.device.type) for v in result.gates.state.values()} == {(torch.float32, "cuda")}


def test_a_loaded_pipeline_stays_where_it_is_unless_told(micro_world, capfd):
    pipe = load_base(micro_world, device="cpu")
    assert load_base(pipe) is pipe and pipe.transformer.dtype == torch.float32
    assert load_base(pipe, dtype="auto") is pipe and pipe.transformer.dtype == torch.float32  # as stored: as is
    assert load_base(pipe, dtype="bfloat16") is pipe
    assert {p.dtype for p in pipe.transformer.parameters()} == {torch.bfloat16} and pipe.device.type == "cpu"
    assert "should be kept in float32" not in capfd.readouterr().err  # quiet, as loading is


def test_a_gpu_too_small_is_a_one_line_usage_error(micro_registry, micro_world, capsys, tmp_path, monkeypatch):
    """(No small GPU here: the out-of-memory error torch raises is raised where the work would run out.)"""
    import pipelines.registry_gates as registry_gates

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 23.6 GiB total)")

    monkeypatch.setattr(Generator, "generate", out_of_memory)
    code, _, err = _generate(capsys, micro_registry, "--base", str(micro_world), "--lora", micro_registry.lora_ids()[0],
                             "--fusion", "linear", "-o", str(tmp_path / "x.png"))
    assert code == 2 and err.count("\n") == 1 and "does not fit on the GPU (CUDA out of memory. Tried" in err
    monkeypatch.setattr(registry_gates, "train_gates", out_of_memory)
    code = main(["train", "gates", "--registry", str(micro_registry.root), "--base", str(micro_world), "--device",
                 "cpu", "--steps", "1", "--out", str(tmp_path / "gates")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "does not fit on cpu" in err and "--device cpu" not in err
