"""Batched LoRA branches equal the per-LoRA loop."""

from __future__ import annotations

import pytest
import torch

from models.fusion import branches as branches_module
from models.fusion.branches import LoraBranches


def _loras(d: int, k: int, ranks: list[int], seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(r, k, generator=gen), torch.randn(d, r, generator=gen)) for r in ranks]


@pytest.mark.parametrize("direct", [True, False])
def test_batched_outputs_equal_the_loop(direct: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not direct:  # LayerNorm statistics from z and the moments of B, as for large layers
        monkeypatch.setattr(branches_module, "DIRECT_STATS", 0)
    d, k = 20, 12
    loras = _loras(d, k, [4, 1, 7])
    h = torch.randn(9, k)
    br = LoraBranches(k, d)
    br.pack(loras, dtype=torch.float32, device=torch.device("cpu"))
    assert (br.count, br.rank) == (3, 7)
    outs = br.outputs(br.project(h))
    assert outs.shape == (3, 9, d)
    for i, (a, b) in enumerate(loras):
        torch.testing.assert_close(outs[i], h @ a.T @ b.T, rtol=1e-5, atol=1e-5)
    var, mean = torch.var_mean(outs, -1, correction=0, keepdim=True)
    stats = br.stats(br.project(h), 1e-5)
    if direct:
        assert stats is None  # small: the gate normalises the outputs itself
        monkeypatch.setattr(branches_module, "DIRECT_STATS", 0)
        stats = br.stats(br.project(h), 1e-5)
    got_rstd, got_shift = stats
    torch.testing.assert_close(got_rstd, (var + 1e-5).rsqrt(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_shift, -mean * got_rstd, rtol=1e-5, atol=1e-6)
    out = torch.empty(3, 9, d)
    assert br.outputs(br.project(h), out=out).data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, outs)
    want = sum(h @ a.T @ b.T for a, b in loras)
    torch.testing.assert_close(br.summed(br.project(h)), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(br.summed(br.project(h, 2), 2), want - h @ loras[2][0].T @ loras[2][1].T,
                               rtol=1e-5, atol=1e-5)


def test_repacking_reuses_buffers_and_clears_padding() -> None:
    d, k = 10, 6
    br = LoraBranches(k, d)
    cpu = torch.device("cpu")
    assert not br.pack(_loras(d, k, [5, 5]), dtype=torch.float32, device=cpu)
    ptr = br.a.data_ptr(), br.b.data_ptr()
    new = _loras(d, k, [5, 2], seed=3)  # same count and padded rank: filled in place
    assert br.pack(new, dtype=torch.float32, device=cpu)
    assert (br.a.data_ptr(), br.b.data_ptr()) == ptr
    h = torch.randn(4, k)
    outs = br.outputs(br.project(h))
    torch.testing.assert_close(outs[1], h @ new[1][0].T @ new[1][1].T)  # stale rows 2..4 were zeroed
    assert not br.pack(_loras(d, k, [3]), dtype=torch.float32, device=cpu)  # another count: new buffers
    with pytest.raises(ValueError):
        br.pack(_loras(d + 1, k, [2]), dtype=torch.float32, device=cpu)
