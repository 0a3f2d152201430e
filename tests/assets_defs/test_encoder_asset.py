"""The ``lora_weight_encoder`` asset: a config left at its defaults re-makes the base's active
encoder (its pool and recipe, so a cache hit), an explicit value overrides it, and bad input fails
the run with one line."""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg
import pytest
from asset_runs import materialize, micro_registry

from assets_defs.models import lora_weight_encoder
from registry import BaseModel, Registry
from registry.store.store import quote


def _registry(micro_world: Path, path: Path) -> tuple[Registry, str]:
    """A registry of the micro world's training and held-out LoRAs, and their base model's name."""
    reg = micro_registry(micro_world, path, micro_world / "loras", micro_world / "heldout_loras")
    return reg, BaseModel.from_json((micro_world / "base_model.json").read_text()).name


def _materialize(registry: Path, **config) -> dict:
    return materialize(lora_weight_encoder, registry, **config)


def _active(registry: Path) -> str:
    (active,) = [r.version for r in Registry.open(registry, create=False).encoder_versions() if r.active]
    return active


def test_the_defaults_are_the_active_encoders_pool_and_recipe(micro_world, tmp_path):
    registry = tmp_path / "registry"
    reg, base = _registry(micro_world, registry)
    pool = f"source_path LIKE {quote(os.path.realpath(micro_world / 'loras') + os.sep + '%')}"
    recipe = {"steps": 20, "batch_size": 8, "seed": 1}
    first = _materialize(registry, base_model=base, where=pool, **recipe)
    assert first["trained"] and first["pool_size"] < len(reg)

    again = _materialize(registry, base_model=base)  # the launchpad's defaults: the same pool and recipe
    assert (again["version"], again["trained"], _active(registry)) == (first["version"], False, first["version"])
    assert again["where"] == first["where"] == pool and again["recipe"] == first["recipe"]

    every = _materialize(registry, base_model=base, where="")  # explicit: every LoRA of the base, same recipe
    assert every["trained"] and every["pool_size"] == len(reg) and every["where"] == ""
    assert {k: every["recipe"][k] for k in recipe} == recipe and _active(registry) == every["version"]


def test_bad_input_fails_the_run_with_one_line(micro_world, tmp_path):
    registry = tmp_path / "registry"
    reg, base = _registry(micro_world, registry)
    one = reg.column_rows(reg.loras, ["lora_id"])[0]["lora_id"]
    for config, says in (({"where": "no_such_col = 1"},
                          "the filter (where) 'no_such_col = 1' is not valid SQL for the registry: "),
                         ({"where": f"lora_id = {quote(one)}"}, "training needs at least 2"),
                         ({"base_model": "sdxl"}, "unknown base model 'sdxl'")):
        with pytest.raises(dg.Failure) as failure:
            _materialize(registry, **{"base_model": base, "steps": 2, **config})
        assert says in failure.value.description and "\n" not in failure.value.description, config
    assert not reg.encoder_versions()
