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
