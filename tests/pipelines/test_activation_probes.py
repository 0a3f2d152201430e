"""Probe directions from a layer's real inputs span the subspace those inputs live in."""

from __future__ import annotations

import torch
from torch import nn

from pipelines.activation_probes import activation_probes


def test_probes_span_the_inputs_subspace_and_hooks_are_removed() -> None:
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16), nn.Linear(16, 8))
    basis = torch.linalg.qr(torch.randn(32, 3, generator=gen))[0]  # inputs live in a 3-d subspace
    inputs = torch.randn(200, 3, generator=gen) * torch.tensor([5.0, 2.0, 1.0]) @ basis.T

    probes = activation_probes(model, ["0", "1"], 2, lambda: model(inputs))
    assert set(probes) == {"0", "1"}
    q = probes["0"]
    assert q.shape == (32, 2)
    torch.testing.assert_close(q.T @ q, torch.eye(2), atol=1e-5, rtol=0)
    # inside the input subspace, and the first probe is its main direction
    torch.testing.assert_close(basis @ (basis.T @ q), q, atol=1e-5, rtol=0)
    assert abs(float(q[:, 0] @ basis[:, 0])) > 0.99
    assert not model[0]._forward_pre_hooks and not model[1]._forward_pre_hooks


def test_a_layer_that_sees_no_input_gets_no_probes() -> None:
    model = nn.ModuleDict({"used": nn.Linear(8, 4), "idle": nn.Linear(8, 4)})
    probes = activation_probes(model, ["used", "idle"], 1, lambda: model["used"](torch.randn(10, 8)))
    assert set(probes) == {"used"}
