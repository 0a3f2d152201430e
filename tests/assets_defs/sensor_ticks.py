"""Ticking a Dagster sensor against a registry in a test, and reading why it skipped."""

from __future__ import annotations

import os

import dagster as dg

from assets_defs.resources import RegistryResource


def tick(sensor: dg.SensorDefinition, registry: str | os.PathLike, instance: dg.DagsterInstance) -> dg.SensorResult:
    """One evaluation of ``sensor`` with the registry resource at ``registry``; a skip as a SensorResult."""
    context = dg.build_sensor_context(instance=instance, resources={"registry": RegistryResource(path=str(registry))})
    result = sensor(context)
    return dg.SensorResult(skip_reason=result) if isinstance(result, dg.SkipReason) else result


def skipped(result: dg.SensorResult) -> str:
    """The skip message of a tick that requested nothing."""
    assert not result.run_requests and result.skip_reason is not None
    return result.skip_reason.skip_message
