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


def test_report_assets_show_the_baselines_beside_gated_and_where_the_report_is(micro_world, micro_registry, tmp_path):
    from assets_defs.generation import fusion_report, generation_report
    from assets_defs.resources import RegistryResource

    world = tmp_path / "micro-seed0"
    shutil.copytree(micro_world, world, ignore=shutil.ignore_patterns("hub"))
    small = {"world": str(world), "out": str(tmp_path / "reports"), "prompts": 1}
    config = {"ops": {"fusion_report": {"config": {**small, "sets": 1}}, "generation_report": {"config": small}}}
    result = dg.materialize([fusion_report, generation_report], run_config=config,
                            resources={"registry": RegistryResource(path=str(micro_registry.root))})
    assert result.success
    fusion = result.asset_materializations_for_node("fusion_report")[0].metadata
    for method in ("base", "single", "linear", "ties", "dare", "klora", "gated_paper", "gated"):
        assert 0.0 <= fusion[f"{method}_k2_accuracy"].value <= 1.0 and f"{method}_k3_accuracy" in fusion
    assert fusion["report_path"].value == str(tmp_path / "reports" / "fusion.md")
    generation = result.asset_materializations_for_node("generation_report")[0].metadata
    assert {f"{g}_{s}" for g in ("synonym", "canonical") for s in ("base", "top1", "top2", "top3")} <= set(generation)
    assert generation["report_path"].value == str(tmp_path / "reports" / "generation.md")
