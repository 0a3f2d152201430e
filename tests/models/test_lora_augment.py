"""LoRA augmentations: exact math on factors."""

import torch

from models.lora_augment import augment, drop_layers, reparametrise, rescale, truncate_rank


def factors(r, d=12, k=9, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(r, k, generator=gen, dtype=dtype), torch.randn(d, r, generator=gen, dtype=dtype)


def test_reparametrise_keeps_the_product_and_changes_the_factors():
    a, b = factors(5)
    a2, b2 = reparametrise(a, b, torch.Generator().manual_seed(1))
    torch.testing.assert_close(b2 @ a2, b @ a, atol=1e-10, rtol=1e-10)
    assert (b2 - b).abs().max() > 0.1
    a32, b32 = factors(5, dtype=torch.float32)
    a3, b3 = reparametrise(a32, b32, torch.Generator().manual_seed(2))
    assert a3.dtype == torch.float32
    torch.testing.assert_close(b3 @ a3, b32 @ a32, atol=1e-4, rtol=1e-4)


def test_truncate_rank_equals_svd_truncation_of_the_explicit_product():
    a, b = factors(6, d=15, k=11, seed=3)
    product = b @ a
    u, s, vh = torch.linalg.svd(product)
    for r in (1, 3, 5):
        a_r, b_r = truncate_rank(a, b, r)
        assert a_r.shape == (r, 11) and b_r.shape == (15, r)
        expected = (u[:, :r] * s[:r]) @ vh[:r]
        torch.testing.assert_close(b_r @ a_r, expected, atol=1e-9, rtol=1e-9)
    a_same, b_same = truncate_rank(a, b, 6)
    torch.testing.assert_close(b_same @ a_same, product)


def test_drop_layers_keeps_a_fraction_and_at_least_one():
    lora = {f"l{i}": factors(2, seed=i) for i in range(10)}
    gen = torch.Generator().manual_seed(0)
    kept = drop_layers(lora, 0.3, gen)
    assert len(kept) == 3 and all(kept[n] is lora[n] for n in kept)
    assert len(drop_layers(lora, 0.0, gen)) == 1
    assert drop_layers(lora, 0.5, torch.Generator().manual_seed(5)).keys() == \
        drop_layers(lora, 0.5, torch.Generator().manual_seed(5)).keys()


def test_rescale_scales_the_product():
    lora = {"x": factors(3)}
    (a, b), = rescale(lora, 0.5).values()
    torch.testing.assert_close(b @ a, 0.5 * (lora["x"][1] @ lora["x"][0]))


def test_augment_is_seeded_and_each_layer_is_a_scaled_truncation_of_the_original():
    lora = {f"l{i}": factors(4, seed=i) for i in range(6)}
    out1 = augment(lora, torch.Generator().manual_seed(9), p_truncate=0.0, p_drop=1.0)
    out2 = augment(lora, torch.Generator().manual_seed(9), p_truncate=0.0, p_drop=1.0)
    assert out1.keys() == out2.keys() and 3 <= len(out1) <= 6
    scales = set()
    for name, (a, b) in out1.items():
        torch.testing.assert_close(out2[name][0], a)
        ref = lora[name][1] @ lora[name][0]
        ratio = ((b @ a) * ref).sum() / (ref * ref).sum()
        torch.testing.assert_close(b @ a, ratio * ref, atol=1e-9, rtol=1e-9)
        scales.add(round(float(ratio), 9))
    assert len(scales) == 1 and 0.5 <= scales.pop() <= 2.0
    truncated = augment(lora, torch.Generator().manual_seed(0), p_truncate=1.0, p_drop=0.0,
                        scale_range=(1.0, 1.0))
    ranks = {a.shape[0] for a, _ in truncated.values()}
    assert len(ranks) == 1 and 1 <= ranks.pop() < 4
