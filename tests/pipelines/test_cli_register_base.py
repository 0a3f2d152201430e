"""``autolora register-base``: a pipeline folder, a demo world or a base_model.json; anything else
is a one-line usage error (exit 2, nothing written), and a name already taken by another base is
refused."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "registry"))
from flux_fixtures import tiny_flux_base  # noqa: E402

from pipelines.cli import main  # noqa: E402


def register(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["register-base", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def usage_error(capsys, registry: Path, *args: str) -> str:
    code, out, err = register(capsys, *args, "--registry", str(registry))
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, (code, out, err)
    assert err.startswith("autolora register-base: "), err
    return err


def test_a_demo_world_folder_and_the_folder_holding_it_register_the_worlds_base(micro_world, capsys, tmp_path):
    described = json.loads((micro_world / "base_model.json").read_text())
    for i, given in enumerate((micro_world, micro_world.parent)):
        code, out, err = register(capsys, str(given), "--registry", str(tmp_path / f"r{i}"), "--json")
        assert code == 0, err
        assert json.loads(out)["name"] == described["name"]
        assert json.loads(out)["layers"] == len(described["layer_shapes"])


@pytest.mark.parametrize("content", [
    None,  # an empty folder
    {"name": "neon", "trigger_words": ["n30n"], "description": "a LoRA card"},
    {"architecture": "flux", "layer_shapes": {}},
    {"name": "x", "architecture": "flux", "layer_shapes": {}},
    {"name": "x", "architecture": "flux", "layer_shapes": {"proj": [4]}},
    ["not", "an", "object"],
    b"\x00\x01 not JSON at all",
])
def test_what_is_no_base_is_a_one_line_usage_error_and_nothing_is_written(content, capsys, tmp_path):
    given = tmp_path / "given"
    if content is None:
        given.mkdir()
    elif isinstance(content, bytes):
        given.write_bytes(content)
    else:
        given.write_text(json.dumps(content))
    err = usage_error(capsys, tmp_path / "registry", str(given))
    assert ("pipeline folder" in err) if content is None else ("base_model.json" in err)
    assert not (tmp_path / "registry").exists()


def test_a_name_taken_by_another_base_is_refused_and_the_same_base_again_is_a_no_op(micro_world, capsys, tmp_path):
    from registry import Registry
    from registry.lora.base_models import BaseModel, flux1_dev

    registry = tmp_path / "registry"
    err = usage_error(capsys, registry, str(micro_world), "--name", "FLUX.1-dev")
    assert "FLUX.1-dev" in err and "--name" in err
    assert not registry.exists()  # refused before the registry is made
    same_as_builtin = tmp_path / "dev.json"
    same_as_builtin.write_text(flux1_dev().to_json())
    assert register(capsys, str(same_as_builtin), "--registry", str(registry))[0] == 0
    tiny = tmp_path / "tiny.json"
    tiny.write_text(tiny_flux_base().to_json())
    assert register(capsys, str(tiny), "--registry", str(registry))[0] == 0
    assert register(capsys, str(tiny), "--registry", str(registry), "--json")[0] == 0  # again: nothing to do
    err = usage_error(capsys, registry, str(micro_world / "base_model.json"), "--name", "tiny-flux")
    assert "tiny-flux" in err and "--name" in err
    bases = Registry.open(registry, create=False).bases()
    assert [b.name for b in bases] == ["FLUX.1-dev", "FLUX.1-schnell", "tiny-flux"]
    assert bases[-1] == tiny_flux_base() and bases[0] == flux1_dev()
    assert isinstance(bases[-1], BaseModel)


def test_name_is_honoured_for_a_base_model_json(micro_world, capsys, tmp_path):
    registry = tmp_path / "registry"
    code, out, err = register(capsys, str(micro_world / "base_model.json"), "--name", "my-base",
                              "--registry", str(registry), "--json")
    assert code == 0, err
    assert json.loads(out)["name"] == "my-base"
    from registry import Registry

    assert "my-base" in Registry.open(registry, create=False).base_names()
