"""The registry resource: only ingest and sync create a registry; every other asset fails with
one message on a path that holds none (a mistyped AUTOLORA_REGISTRY creates nothing)."""

from __future__ import annotations

import dagster as dg
import pytest

from assets_defs.maintenance import registry_indexes
from assets_defs.models import weight_embeddings
from assets_defs.resources import RegistryResource


@pytest.mark.parametrize("asset", [registry_indexes, weight_embeddings])
def test_an_asset_on_a_missing_registry_fails_and_creates_nothing(tmp_path, asset):
    typo = tmp_path / "typo-registry"
    result = dg.materialize([asset], resources={"registry": RegistryResource(path=str(typo))},
                            instance=dg.DagsterInstance.ephemeral(), raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE)
    message = failure.step_failure_data.error.message
    assert "holds no autolora registry" in message and "AUTOLORA_REGISTRY" in message
    assert not typo.exists()


def test_open_creates_only_when_asked(tmp_path):
    resource = RegistryResource(path=str(tmp_path / "new"))
    with pytest.raises(dg.Failure, match="holds no autolora registry"):
        resource.open()
    assert len(resource.open(create=True)) == 0 and resource.open() is not None
