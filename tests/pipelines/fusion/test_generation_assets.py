"""The Dagster gate asset materialises on a micro world, records its version and is cached."""

from __future__ import annotations

import shutil

import dagster as dg

from assets_defs.generation import fusion_gates



def test_fusion_gates_asset(micro_world, tmp_path):
    world = tmp_path / "micro-seed0"
    shutil.copytree(micro_world, world, ignore=shutil.ignore_patterns("gates", "hub"))
    config = {"ops": {"fusion_gates": {"config": {"world": str(world), "steps": 3}}}}
    first = dg.materialize([fusion_gates], run_config=config)
    assert first.success
    meta = first.asset_materializations_for_node("fusion_gates")[0].metadata
    assert meta["cached"].value is False and meta["pool_size"].value == 6
    assert (world / "gates" / f"gates-{meta['version'].value}.safetensors").is_file()
    assert "data:image/png;base64," in meta["loss_curve"].value
    again = dg.materialize([fusion_gates], run_config=config).asset_materializations_for_node("fusion_gates")[0]
    assert again.metadata["cached"].value is True and again.metadata["version"].value == meta["version"].value
