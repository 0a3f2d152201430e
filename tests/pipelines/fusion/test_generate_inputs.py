"""What ``autolora generate`` and ``Generator`` make of a user's base, size and gates: usage errors
(exit 2, one line) instead of tracebacks or silently other output, and quiet loading."""

from __future__ import annotations

import json

import huggingface_hub.constants as hf_constants
import pytest
import torch
from diffusers import FluxPipeline

from pipelines.cli import main
from pipelines.generate import BaseNotFound, Generator, RenderSettings, load_base, resolve_base

HUB_ID = "black-forest-labs/FLUX.1-dev"
MISSING_ID = "autolora-tests/no-such-base"  # a valid Hub repo id that is in no cache


@pytest.fixture(scope="module")
def pipe(micro_world) -> FluxPipeline:
    torch.set_num_threads(1)
    return load_base(micro_world)


def _generate(capsys, registry, *args: str) -> tuple[int, str, str]:
    code = main(["generate", "a circle", "--registry", str(registry.root), "--json", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_base_sources_resolve_to_folders_or_hub_ids(micro_world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_base(micro_world) == str(micro_world / "base")  # a demo world: its base
    assert resolve_base(micro_world / "base") == str(micro_world / "base")
    assert resolve_base(HUB_ID) == HUB_ID  # a str for from_pretrained, not a Path
    with pytest.raises(FileNotFoundError, match="no such base pipeline"):
        resolve_base(tmp_path / "missing")
    with pytest.raises(BaseNotFound, match="no such base pipeline"):
        resolve_base("missing")
    with pytest.raises(BaseNotFound, match="no model_index.json"):
        resolve_base(tmp_path)


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)  # tests/conftest.py sets it; say so here


def test_a_hub_id_not_in_the_cache_while_offline_is_a_clear_base_not_found(offline, tmp_path, monkeypatch):
    """The real FluxPipeline.from_pretrained, offline, on a repo id in no cache. (Downloading a base by
    Hub id, and the Hub lacking it, run for real against a local Hub in ``test_generate_hub.py``.)"""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BaseNotFound) as caught:
        load_base(MISSING_ID)
    message = str(caught.value)
    assert message.startswith(f"cannot load the base {MISSING_ID!r}: no such folder, and as a Hub repo id it is "
                              "not in the local Hugging Face cache while HF_HUB_OFFLINE is on")
    assert "\n" not in message


def test_cli_bad_base_is_a_one_line_usage_error(offline, micro_registry, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = _generate(capsys, micro_registry, "--base", str(tmp_path / "missing"))
    assert code == 2 and err.startswith("autolora generate: no such base pipeline") and err.count("\n") == 1
    code, _, err = _generate(capsys, micro_registry, "--base", MISSING_ID)
    assert code == 2 and "cannot load the base" in err and "HF_HUB_OFFLINE=0" in err and err.count("\n") == 1


def test_sizes_must_fit_the_base(micro_registry, micro_world, pipe, capsys, tmp_path):
    step = 2 * pipe.vae_scale_factor
    with pytest.raises(ValueError, match=f"multiple of {step}"):
        Generator(micro_registry, pipe, method="none", render=RenderSettings(steps=1, size=step + 4, true_cfg=1.0))
    fits = RenderSettings(steps=1, size=3 * step, true_cfg=1.0)
    with Generator(micro_registry, pipe, method="none", render=fits) as gen:
        assert gen.generate("a circle", k=0).images.shape == (1, 3 * step, 3 * step, 3)
    code, _, err = _generate(capsys, micro_registry, "--base", str(micro_world), "--fusion", "none", "--size",
                             str(step + 4), "-o", str(tmp_path / "x.png"))
    assert code == 2 and f"multiple of {step}" in err and not (tmp_path / "x.png").exists()


def test_gated_fusion_without_gates_warns(micro_registry, micro_world, capsys, tmp_path):
    lora = micro_registry.lora_ids()[0]
    common = ["--base", str(micro_world), "--lora", lora, "--steps", "1", "--size", "16", "-o", str(tmp_path / "g.png")]
    code, out, err = _generate(capsys, micro_registry, *common)  # gated: the default
    assert code == 0 and json.loads(out)["gates"] is None
    assert "no gates given: gated fusion runs untrained gates" in err
    code, out, err = _generate(capsys, micro_registry, *common, "--fusion", "linear")
    assert code == 0 and "no gates given" not in err


def test_loading_is_quiet_unless_progress_is_asked_for(micro_world, capfd):
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    libraries = (diffusers_logging, transformers_logging)
    before = [m.is_progress_bar_enabled() for m in libraries]
    for module in libraries:  # as in a fresh process (building the world turned diffusers' bars off)
        module.enable_progress_bar()
    try:
        load_base(micro_world)
        assert "Loading" not in capfd.readouterr().err
        assert all(m.is_progress_bar_enabled() for m in libraries)  # restored
        for module in libraries:
            module.disable_progress_bar()
        load_base(micro_world, progress=True)
        assert "Loading pipeline components" in capfd.readouterr().err
    finally:
        for module, bar in zip(libraries, before):
            module.enable_progress_bar() if bar else module.disable_progress_bar()


def test_a_folder_that_is_no_whole_pipeline_is_base_not_found(micro_world, tmp_path):
    import shutil

    partial = tmp_path / "partial"
    shutil.copytree(micro_world / "base", partial)
    for weights in (partial / "vae").glob("*.safetensors"):
        weights.unlink()  # an interrupted download
    with pytest.raises(BaseNotFound, match=r"cannot load the base in the folder .*partial"):
        load_base(partial)
