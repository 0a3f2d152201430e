"""The Generator's render settings follow its base: FLUX.1-dev's for a FLUX.1-width transformer; sizes are checked."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest

from pipelines.generate import RenderSettings, check_size, size_multiple
from pipelines.world.sampling import CFG, STEPS
from pipelines.world.tiny_flux import build_tiny_flux


def test_render_settings_follow_the_base():
    flux1 = {"num_attention_heads": 24, "attention_head_dim": 128}  # FLUX.1-dev's transformer config.json
    assert RenderSettings.for_transformer(flux1) == RenderSettings(steps=28, size=1024, true_cfg=1.0, guidance=3.5)
    assert RenderSettings.for_base(SimpleNamespace(transformer=SimpleNamespace(config=flux1))).size == 1024
    assert RenderSettings.for_base(build_tiny_flux(0)) == RenderSettings(steps=STEPS, size=32, true_cfg=CFG)


def test_sizes_are_checked_against_the_base():
    vae = {"block_out_channels": [128, 256, 512, 512]}  # FLUX.1-dev's VAE: scale factor 8
    assert size_multiple(vae) == 16
    check_size(1024, 16, 1024)
    check_size(4096, 16, 1024)
    for size, says in ((1000, "multiple of 16, which this base needs (e.g. 992 or 1008)"), (0, "positive"), (4112, "at most 4096")):
        with pytest.raises(ValueError, match=re.escape(says)):
            check_size(size, 16, 1024)
