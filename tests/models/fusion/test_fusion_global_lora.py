"""The global LoRA is the SVD truncation of the explicit sum Σ B_i A_i."""

from __future__ import annotations

import pytest
import torch

from models.fusion.global_lora import global_lora, truncate_sum


def _loras(d: int, k: int, ranks: list[int], seed: int = 0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(r, k, generator=gen, dtype=dtype), torch.randn(d, r, generator=gen, dtype=dtype))
            for r in ranks]


@pytest.mark.parametrize("d,k,ranks,rank", [(40, 30, [4, 8, 2], 4), (12, 50, [3, 16], 5), (64, 64, [16], 4)])
def test_equals_truncated_svd_of_the_sum(d: int, k: int, ranks: list[int], rank: int) -> None:
    loras = _loras(d, k, ranks)
    total = sum(b @ a for a, b in loras)
    u, s, vh = torch.linalg.svd(total)
    want = (u[:, :rank] * s[:rank]) @ vh[:rank]
    a_g, b_g = global_lora(loras, rank)
    assert a_g.shape == (rank, k) and b_g.shape == (d, rank)
    torch.testing.assert_close(b_g @ a_g, want, rtol=1e-9, atol=1e-9)
    # the error is the tail of the spectrum (Eckart-Young), i.e. it is the best rank-r approximation
    err = torch.linalg.matrix_norm(total - b_g @ a_g)
    torch.testing.assert_close(err, s[rank:].square().sum().sqrt())


def test_full_rank_reproduces_the_sum_and_float32() -> None:
    loras = _loras(48, 36, [2, 3], seed=1, dtype=torch.float32)
    a_g, b_g = global_lora(loras, 16)
    assert a_g.shape == (5, 36) and a_g.dtype == torch.float32  # capped at Σr
    torch.testing.assert_close(b_g @ a_g, sum(b @ a for a, b in loras), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError):
        global_lora([], 4)


def test_batched_truncation_equals_one_at_a_time() -> None:
    sets = [_loras(30, 20, [4, 6], seed=s) for s in range(3)]
    b_s = torch.stack([torch.cat([b for _, b in lo], 1) for lo in sets])
    a_s = torch.stack([torch.cat([a for a, _ in lo], 0) for lo in sets])
    a_g, b_g = truncate_sum(b_s, a_s, 3)
    assert a_g.shape == (3, 3, 20) and b_g.shape == (3, 30, 3)
    for i, lo in enumerate(sets):
        a1, b1 = global_lora(lo, 3)
        torch.testing.assert_close(b_g[i] @ a_g[i], b1 @ a1, rtol=1e-9, atol=1e-9)


def test_rank_deficient_stack() -> None:
    """The same LoRA twice (and a zero LoRA): the stacked factors are rank-deficient."""
    (a, b), = _loras(40, 30, [6], seed=2)
    total = 2 * b @ a
    u, s, vh = torch.linalg.svd(total)
    a_g, b_g = global_lora([(a, b), (a, b), (torch.zeros(3, 30, dtype=a.dtype), torch.zeros(40, 3, dtype=a.dtype))], 4)
    torch.testing.assert_close(b_g @ a_g, (u[:, :4] * s[:4]) @ vh[:4], rtol=1e-8, atol=1e-8)


def test_nearly_rank_deficient_stack_in_a_batch_of_well_conditioned_ones() -> None:
    """A LoRA and a copy of it disturbed by 1e-9 (Cholesky of their Gram matrix succeeds, with a
    tiny pivot) batched with well-conditioned stacks: every truncation is still the SVD's."""
    (a, b), = _loras(40, 30, [6], seed=3)
    near = [(a, b), (a + 1e-9 * torch.randn_like(a), b + 1e-9 * torch.randn_like(b))]
    sets = [near, _loras(40, 30, [6, 6], seed=4)]
    b_s = torch.stack([torch.cat([bb for _, bb in lo], 1) for lo in sets])
    a_s = torch.stack([torch.cat([aa for aa, _ in lo], 0) for lo in sets])
    a_g, b_g = truncate_sum(b_s, a_s, 4)
    for i, lo in enumerate(sets):
        u, s, vh = torch.linalg.svd(sum(bb @ aa for aa, bb in lo))
        torch.testing.assert_close(b_g[i] @ a_g[i], (u[:, :4] * s[:4]) @ vh[:4], rtol=1e-7, atol=1e-7)
