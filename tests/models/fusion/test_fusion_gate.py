"""The gate against a direct per-branch transcription of eq. 6-8."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.fusion.gate import FusionGate, timestep_features


def _reference(gate: FusionGate, x: torch.Tensor, branches: list[torch.Tensor], global_last: bool = False,
               time_feats: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 6-8 one branch at a time, in float64."""
    g = {k: v.double() for k, v in gate.state_dict().items()}
    d = x.shape[-1]
    x = x.double()
    b = g["b"]
    if time_feats is not None:
        b = b + (time_feats.double() @ g["time_proj.weight"].T).reshape(x.shape[0], *([1] * (x.dim() - 2)), d)
    xh = F.layer_norm(x, (d,), eps=1e-5)
    out = x.clone()
    for i, li in enumerate(branches):
        li = li.double()
        lh = F.layer_norm(li, (d,), eps=1e-5)
        gi = torch.sigmoid(xh * g["w_x"] + lh * g["w_l"] + xh * lh * g["w_c"] + b)
        scale = g["w_g"] if global_last and i == len(branches) - 1 else 1.0
        out = out + g["w_o"] * gi * li * scale
    return out


def _randomise(gate: FusionGate, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in gate.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("global_last", [False, True])
def test_gate_matches_the_equations(global_last: bool) -> None:
    torch.manual_seed(0)
    gate = FusionGate(24)
    _randomise(gate)
    x = torch.randn(2, 5, 24) * 3 + 1
    branches = torch.randn(3, 2, 5, 24) * torch.tensor([0.1, 1.0, 5.0]).view(3, 1, 1, 1)
    want = _reference(gate, x, list(branches), global_last)
    with torch.no_grad():  # the in-place inference path: overwrites its inputs, returns x
        xc, bc = x.clone(), branches.clone()
        got = gate(xc, bc, global_last=global_last, inplace=True)
        assert got.data_ptr() == xc.data_ptr()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    got_grad = gate(x, branches, global_last=global_last)  # the autograd path
    assert got_grad.requires_grad
    torch.testing.assert_close(got_grad.detach(), got, rtol=1e-6, atol=1e-6)
    # statistics handed in by the caller are used as given
    var, mean = torch.var_mean(branches, -1, correction=0, keepdim=True)
    rstd = (var + 1e-5).rsqrt()
    with torch.no_grad():
        given = gate(x, branches, global_last=global_last, stats=(rstd, -mean * rstd))
        shifted = gate(x, branches, global_last=global_last, stats=(rstd, (1 - mean) * rstd))
    torch.testing.assert_close(given, got, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(shifted, got)


def test_untrained_gate_is_plain_addition_bit_for_bit() -> None:
    gate = FusionGate(16)
    x = torch.randn(7, 16)
    branches = torch.randn(3, 7, 16)
    with torch.no_grad():
        assert torch.equal(gate(x, branches), x + branches.sum(0))
        assert torch.equal(gate(x.clone(), branches.clone(), inplace=True), x + branches.sum(0))
        # a global LoRA branch starts switched off (w_g = 0): still the plain sum of the LoRAs
        with_global = torch.cat([branches, torch.randn(1, 7, 16)])
        assert torch.equal(gate(x, with_global, global_last=True), x + branches.sum(0))


def test_gradients_reach_every_gate_parameter() -> None:
    gate = FusionGate(8, time_features=4)
    x, branches = torch.randn(2, 3, 8), torch.randn(2, 2, 3, 8)
    feats = timestep_features(torch.tensor([0.2, 0.9]), 4)
    gate(x, torch.cat([branches, torch.randn(1, 2, 3, 8)]), global_last=True, time_feats=feats).square().sum().backward()
    for name, p in gate.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_timestep_variant() -> None:
    gate = FusionGate(12, time_features=6)
    x, branches = torch.randn(2, 4, 12), torch.randn(2, 2, 4, 12)
    feats = timestep_features(torch.tensor([0.1, 0.8]), 6)
    assert feats.shape == (2, 6)
    with torch.no_grad():
        plain = FusionGate(12)(x, branches)
        assert torch.equal(gate(x, branches, time_feats=feats), plain)  # zero-initialised: the plain gate
        _randomise(gate, 1)
        got = gate(x, branches, time_feats=feats)
    torch.testing.assert_close(got.double(), _reference(gate, x, list(branches), time_feats=feats),
                               rtol=1e-5, atol=1e-5)
    # each sample's gate sees its own timestep
    with torch.no_grad():
        swapped = gate(x, branches, time_feats=feats.flip(0))
    assert not torch.allclose(swapped, got)
    with pytest.raises(ValueError):
        FusionGate(4, time_features=3)


def test_float32_gates_on_bfloat16_activations_compute_in_bfloat16_and_train_in_float32() -> None:
    """Gates are trained in float32 on a bfloat16 base (AdamW's steps vanish in bfloat16): the gate
    casts its parameters to the activations' precision, and the gradients reach the float32 ones."""
    gate = FusionGate(16, time_features=4)
    _randomise(gate, 3)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 16, generator=gen)
    branches = torch.randn(3, 2, 5, 16, generator=gen)
    feats = timestep_features(torch.tensor([0.2, 0.7]), 4)
    out = gate(x.bfloat16(), branches.bfloat16(), global_last=True, time_feats=feats)
    assert out.dtype == torch.bfloat16
    exact = _reference(gate, x, list(branches), True, feats)
    assert (out.double() - exact).abs().max() < 0.05 * exact.abs().max()
    out.float().square().sum().backward()
    assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
               and p.grad.abs().sum() > 0 for p in gate.parameters())
    with torch.no_grad():  # inference with the gate in bfloat16 too: no cast, same result
        same = FusionGate(16, time_features=4, dtype=torch.bfloat16)
        same.load_state_dict(gate.state_dict())
        again = same(x.bfloat16(), branches.bfloat16(), global_last=True, time_feats=feats)
    assert again.dtype == torch.bfloat16 and (again.double() - exact).abs().max() < 0.05 * exact.abs().max()
