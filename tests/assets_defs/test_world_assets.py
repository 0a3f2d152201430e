"""The assets that evaluate on a demo world (fusion gates, fusion / generation / retrieval reports)
take the world as its folder or the parent holding one (``AUTOLORA_WORLD=.autolora/world``, as the
CLI does), and a missing world fails the run with one message saying how to get one."""

from __future__ import annotations

import shutil

import dagster as dg
import pytest

from assets_defs.generation import fusion_gates, fusion_report, generation_report
from assets_defs.resources import RegistryResource
from assets_defs.retrieval_report import retrieval_report
from pipelines.evaluate.fusion_common import open_world
from pipelines.world.evaluate import WorldNotFound, resolve_world_root


def test_fusion_gates_take_the_world_parent_folder(micro_world, tmp_path):
    world = tmp_path / "micro-seed0"
    shutil.copytree(micro_world, world, ignore=shutil.ignore_patterns("gates", "hub"))
    assert open_world(tmp_path).root == world  # what the fusion and generation reports open
    config = {"ops": {"fusion_gates": {"config": {"world": str(tmp_path), "steps": 3}}}}
    result = dg.materialize([fusion_gates], run_config=config, instance=dg.DagsterInstance.ephemeral())
    version = result.asset_materializations_for_node("fusion_gates")[0].metadata["version"].value
    assert (world / "gates" / f"gates-{version}.safetensors").is_file()  # the world's own gates folder


@pytest.mark.parametrize("asset", [fusion_gates, fusion_report, generation_report, retrieval_report],
                         ids=lambda a: a.key.to_user_string())
def test_a_missing_world_fails_the_run_with_one_message(asset, tmp_path):
    name = asset.key.to_user_string()
    with pytest.raises(dg.Failure) as failure:
        dg.materialize([asset], run_config={"ops": {name: {"config": {"world": str(tmp_path / "nosuch")}}}},
                       resources={"registry": RegistryResource(path=str(tmp_path / "reg"))},
                       instance=dg.DagsterInstance.ephemeral())
    message = failure.value.description
    assert message.startswith(f"no demo world at {tmp_path / 'nosuch'}") and failure.value.allow_retries is False
    assert "autolora world build --out DIR" in message and "AUTOLORA_WORLD" in message
    assert not (tmp_path / "reg").exists()  # failed before opening the registry


def test_resolve_world_root_says_which_worlds_when_several(tmp_path):
    for name in ("a-seed0", "b-seed0"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "world.json").write_text("{}")
    with pytest.raises(WorldNotFound, match=r"2 demo worlds under .*: name one of \['a-seed0', 'b-seed0'\]"):
        resolve_world_root(tmp_path)
    assert resolve_world_root(tmp_path / "a-seed0") == tmp_path / "a-seed0"
