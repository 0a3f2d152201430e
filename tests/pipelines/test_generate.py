"""The Generator's render settings follow its base: FLUX.1-dev's for a FLUX.1-width transformer."""

from __future__ import annotations

from types import SimpleNamespace

from pipelines.generate import RenderSettings
from pipelines.world.sampling import CFG, STEPS
from pipelines.world.tiny_flux import build_tiny_flux


def test_render_settings_follow_the_base():
    flux1 = SimpleNamespace(transformer=SimpleNamespace(config=SimpleNamespace(
        num_attention_heads=24, attention_head_dim=128)))  # FLUX.1-dev's transformer config
    assert RenderSettings.for_base(flux1) == RenderSettings(steps=28, size=1024, true_cfg=1.0, guidance=3.5)
    assert RenderSettings.for_base(build_tiny_flux(0)) == RenderSettings(steps=STEPS, size=32, true_cfg=CFG)
