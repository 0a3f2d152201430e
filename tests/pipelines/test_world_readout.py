"""Attribute read-out of world images: accuracy on clean and degraded renders, persistence."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipelines.world.readout import META, WEIGHTS, Readout, accuracy
from pipelines.world.scene import ATTRIBUTES
from pipelines.world.themes import broad_mix, make_themes, theme_images


@pytest.fixture(scope="module")
def readout() -> Readout:
    return Readout.train(seed=0)


@pytest.fixture(scope="module")
def fresh() -> tuple[np.ndarray, list[dict[str, str]]]:
    images, _, attrs = broad_mix(1500, seed=123)  # other seed and generator stream than training
    return images, attrs


def _blur_noise(images: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    x = images.astype(np.float32)
    pad = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    box = sum(pad[:, i : i + x.shape[1], j : j + x.shape[2]] for i in range(3) for j in range(3)) / 9
    noisy = 0.5 * x + 0.5 * box + np.random.default_rng(seed).normal(0, sigma, x.shape)
    return np.clip(noisy + 0.5, 0, 255).astype(np.uint8)


def test_clean_accuracy_at_least_95_percent(readout: Readout, fresh: tuple) -> None:
    images, attrs = fresh
    acc = accuracy(readout, images, attrs)
    print("clean accuracy", acc)
    assert set(acc) == set(ATTRIBUTES)
    assert all(v >= 0.95 for v in acc.values()), acc


def test_noisy_accuracy(readout: Readout, fresh: tuple) -> None:
    images, attrs = fresh
    acc = accuracy(readout, _blur_noise(images, sigma=20), attrs)
    print("blur + noise(sigma=20) accuracy", acc)
    assert all(v >= 0.9 for v in acc.values()), acc


def test_theme_attributes_are_read_back(readout: Readout) -> None:
    for theme in make_themes(0, 6, 3):
        images, _ = theme_images(theme, 40, seed=1)
        preds = readout.predict(images)
        for attr, value in theme.attrs.items():
            hits = np.mean([p[attr] == value for p in preds])
            assert hits >= 0.9, (theme.name, attr, hits)


def test_other_sizes_are_resized(readout: Readout) -> None:
    images, _, attrs = broad_mix(300, seed=77, size=48)
    acc = accuracy(readout, images, attrs)
    assert all(v >= 0.9 for v in acc.values()), acc


def test_predict_proba_shapes(readout: Readout, fresh: tuple) -> None:
    images, _ = fresh
    proba = readout.predict_proba(images[:7])
    for attr, values in ATTRIBUTES.items():
        assert proba[attr].shape == (7, len(values))
        np.testing.assert_allclose(proba[attr].sum(1), 1.0, atol=1e-5)
    single = readout.predict(images[0])
    assert len(single) == 1 and set(single[0]) == set(ATTRIBUTES)
    assert readout.predict(images[:0]) == []


def test_save_load_round_trip(readout: Readout, fresh: tuple, tmp_path: Path) -> None:
    images, _ = fresh
    readout.save(tmp_path / "ro")
    assert sorted(p.name for p in (tmp_path / "ro").iterdir()) == sorted([META, WEIGHTS])
    meta = json.loads((tmp_path / "ro" / META).read_text())
    assert meta["values"] == {a: list(v) for a, v in ATTRIBUTES.items()}
    loaded = Readout.load(tmp_path / "ro")
    a, b = readout.predict_proba(images[:50]), loaded.predict_proba(images[:50])
    for attr in ATTRIBUTES:
        np.testing.assert_allclose(a[attr], b[attr], atol=1e-6)
    meta["n_features"] = -1
    (tmp_path / "ro" / META).write_text(json.dumps(meta))
    with pytest.raises(ValueError):
        Readout.load(tmp_path / "ro")
