"""The retraining policy's thresholds (end to end with a registry and Dagster: tests/assets_defs/test_automation.py)."""

from pipelines.retrain_policy import PoolGrowth


def growth(new: int, trained_on: int | None, pool_size: int = 0) -> PoolGrowth:
    return PoolGrowth(base_model="b", pool_size=pool_size, new=new, trained_on=trained_on,
                      active_version=None if trained_on is None else "enc-1")


def test_retrain_once_the_pool_grew_by_a_share_and_a_minimum():
    assert not growth(19, 100).due(0.2, 8) and growth(20, 100).due(0.2, 8)
    assert not growth(7, 10).due(0.2, 8) and growth(8, 10).due(0.2, 8)  # small pools: the minimum count
    assert growth(19, 100).reason(0.2, 8) == "b: 19 new LoRA(s) since encoder enc-1 (trained on 100; retrain at 20)"


def test_a_first_encoder_once_the_base_holds_enough_loras():
    assert not growth(15, None, pool_size=15).due(first_pool=16)
    assert growth(16, None, pool_size=16).due(first_pool=16)
    assert growth(3, None, pool_size=3).reason(first_pool=16) == (
        "b: no encoder yet, 3 LoRA(s) in the pool (< 16 to train a first one)")


# ---- the registry's fusion gates (end to end with Dagster: tests/assets_defs/test_registry_gates_asset.py)

def gate_growth(new: int, trained_on: int | None, pool_size: int = 0, without_renders: int = 0):
    from pipelines.retrain_policy import GatePoolGrowth

    return GatePoolGrowth(base_model="b", pool_size=pool_size, new=new, trained_on=trained_on,
                          active_version=None if trained_on is None else "g-1", base="/p/base",
                          without_renders=without_renders)


def test_gates_are_retrained_at_the_encoders_thresholds_and_first_trained_at_two():
    from pipelines.retrain_policy import GATES_FIRST_POOL, MIN_GROWTH, MIN_NEW

    assert (MIN_GROWTH, MIN_NEW, GATES_FIRST_POOL) == (0.2, 8, 2)
    assert not gate_growth(19, 100).due() and gate_growth(20, 100).due()
    assert not gate_growth(7, 2).due() and gate_growth(8, 2).due()  # small pools: the minimum count
    assert not gate_growth(1, None, pool_size=1).due() and gate_growth(2, None, pool_size=2).due()
    assert gate_growth(19, 100, without_renders=3).reason() == (
        "b: 19 new LoRA(s) with sample renders since gates g-1 (trained on 100; retrain at 20); "
        "3 without sample renders do not count")
    assert gate_growth(1, None, pool_size=1).reason() == (
        "b: no gates for /p/base yet, 1 LoRA(s) with sample renders (< 2 to train the first ones)")
    assert gate_growth(5, None, pool_size=5).reason(first_pool=4).endswith("(≥ 4 to train the first ones)")


def _fake_gates(reg, name: str, base: str, pool: list[str], mtime: float) -> None:
    """A gate checkpoint header as ``train_gates`` writes it (the policy reads headers only)."""
    import os

    import torch

    from pipelines.fusion_methods.gated import GateSet
    from pipelines.train_gates import save_gates

    path = save_gates(reg.root / "gates" / f"gates-{name}.safetensors",
                      GateSet(state={"g": torch.zeros(1)}, version=name,
                              meta={"base": base, "pool": pool, "recipe": {"steps": 3, "seed": 1, "unknown": 1}}))
    os.utime(path, (mtime, mtime))


def test_gate_pool_growth_counts_loras_with_renders_against_the_newest_gates(micro_world, tmp_path):
    import shutil

    import pytest

    from pipelines.generate import BaseNotFound
    from pipelines.registry_gates import render_pairs
    from pipelines.retrain_policy import gate_pool_growth, gate_pool_hash
    from registry import BaseModel, Registry

    reg = Registry.open(tmp_path / "registry")
    reg.register_base(BaseModel.from_json((micro_world / "base_model.json").read_text()))
    bare = tmp_path / "bare"  # a LoRA without its card and renders does not count
    bare.mkdir()
    shutil.copy(micro_world / "heldout_loras" / "bg-plain.safetensors", bare)
    reg.add([micro_world / "loras", bare])
    rows = reg.rows(reg.loras, "true", len(reg))
    with_renders = sorted(r["lora_id"] for r in rows if render_pairs(reg, r))
    assert 2 <= len(with_renders) < len(rows)
    source = str((micro_world / "base").resolve())

    first = gate_pool_growth(reg, str(micro_world))  # the demo world stands for its base/
    assert (first.base, first.trained_on, first.active_version) == (source, None, None)
    assert first.pool_size == first.new == len(with_renders) and first.without_renders == len(rows) - len(with_renders)
    assert first.due() and first.next_version == gate_pool_hash(source, first.base_model, with_renders)

    base_id = f"{source}|{first.base_model}|32px"
    _fake_gates(reg, "old", base_id, with_renders[:1], 1_000)
    _fake_gates(reg, "newest", base_id, with_renders[:2], 2_000)
    _fake_gates(reg, "other-base", f"/elsewhere/base|{first.base_model}|32px", [], 3_000)
    _fake_gates(reg, "other-model", f"{source}|FLUX.1-dev|32px", [], 3_000)
    (reg.root / "gates" / "gates-junk.safetensors").write_bytes(b"not a checkpoint")
    growth = gate_pool_growth(reg, str(micro_world / "base"), first.base_model)
    assert (growth.active_version, growth.trained_on, growth.new) == ("newest", 2, len(with_renders) - 2)
    assert growth.recipe == {"steps": 3, "seed": 1} and growth.size == 32 and not growth.due()
    assert growth.next_version == first.next_version  # the same pool, whatever the gates

    narrowed = gate_pool_growth(reg, str(micro_world), where=f"lora_id = '{with_renders[0]}'")
    assert (narrowed.pool_size, narrowed.new, narrowed.where) == (1, 0, f"lora_id = '{with_renders[0]}'")
    assert narrowed.next_version != first.next_version
    with pytest.raises(ValueError, match="unknown base model 'sdxl'"):
        gate_pool_growth(reg, str(micro_world), "sdxl")
    with pytest.raises(BaseNotFound):
        gate_pool_growth(reg, str(tmp_path / "no-such-base"))
