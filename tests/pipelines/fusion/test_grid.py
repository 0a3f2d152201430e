"""``save_grid``: labelled rows, an optional title, exact cell placement, ragged and empty inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.evaluate.fusion_common import GRID_PAD, LABEL_SIZE, _font, save_grid

H, W, SCALE = 8, 6, 3
WHITE = 255


def _images(n: int, seed: int) -> np.ndarray:
    """``n`` random (H, W, 3) uint8 images."""
    return np.random.default_rng(seed).integers(0, 256, (n, H, W, 3), dtype=np.uint8)


def _load(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _layout(png: np.ndarray, n_rows: int, n_cols: int, scale: int = SCALE) -> tuple[int, int]:
    """(left margin, title height) of a grid PNG: what is left around the image cells."""
    grid_h, grid_w = n_rows * (H + 2) * scale, n_cols * (W + 2) * scale
    return png.shape[1] - grid_w, png.shape[0] - grid_h


def _margin(tmp_path: Path, rows: dict, scale: int = SCALE) -> int:
    """The label margin of ``rows`` (a wide title adds white space right of the grid, so measure one without)."""
    png = _load(save_grid(tmp_path / "untitled.png", rows, scale=scale))
    return _layout(png, len(rows), max(len(a) for a in rows.values()), scale)[0]


def _cell(png: np.ndarray, left: int, top: int, r: int, c: int, scale: int = SCALE) -> np.ndarray:
    y, x = top + r * (H + 2) * scale, left + c * (W + 2) * scale
    return png[y: y + H * scale, x: x + W * scale]


def _scaled(image: np.ndarray, scale: int = SCALE) -> np.ndarray:
    return image.repeat(scale, axis=0).repeat(scale, axis=1)


def test_positional_call_still_works_and_returns_the_path(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "grid.png"
    assert save_grid(path, {"base": _images(2, 0)}) == path
    assert Image.open(path).format == "PNG"


def test_size_grows_by_label_margin_and_title(tmp_path: Path) -> None:
    rows = {"base": _images(3, 0), "gated": _images(3, 1)}
    plain = _load(save_grid(tmp_path / "plain.png", rows))
    left, top = _layout(plain, 2, 3)
    assert top == 0
    assert left >= _font(LABEL_SIZE).getlength("gated") + GRID_PAD
    titled = _load(save_grid(tmp_path / "titled.png", rows, title="a crimson disc"))
    assert titled.shape[1] >= plain.shape[1]
    assert _layout(titled, 2, 3)[1] >= LABEL_SIZE  # the title's band
    longer = _load(save_grid(tmp_path / "long.png", {"base": rows["base"], "single: speckled-engraved": rows["gated"]}))
    long_left = _layout(longer, 2, 3)[0]
    assert long_left > left and long_left >= _font(LABEL_SIZE).getlength("single: speckled-engraved") + GRID_PAD


@pytest.mark.parametrize("title", [None, "a crimson disc with a neon glow"])
@pytest.mark.parametrize("scale", [1, SCALE])
def test_cells_are_placed_exactly(tmp_path: Path, title: str | None, scale: int) -> None:
    rows = {"none": _images(4, 0), "linear": _images(4, 1), "single: jade-pyramid": _images(4, 2)}
    png = _load(save_grid(tmp_path / "grid.png", rows, scale=scale, title=title))
    left, top = _margin(tmp_path, rows, scale), _layout(png, 3, 4, scale)[1]
    for r, images in enumerate(rows.values()):
        for c, image in enumerate(images):
            np.testing.assert_array_equal(_cell(png, left, top, r, c, scale), _scaled(image, scale))
    gaps = png[top:, left:left + 4 * (W + 2) * scale].copy()
    for r in range(3):
        for c in range(4):
            y, x = r * (H + 2) * scale, c * (W + 2) * scale
            gaps[y: y + H * scale, x: x + W * scale] = WHITE
    assert (gaps == WHITE).all()  # nothing but the cells is drawn over the grid
    assert (png[top:, left + 4 * (W + 2) * scale:] == WHITE).all()  # nor right of it (a wide title)


def test_labels_and_title_are_drawn_without_touching_images(tmp_path: Path) -> None:
    rows = {"base": _images(2, 0), "gated_noglobal": _images(2, 1), "ties": _images(2, 2)}
    png = _load(save_grid(tmp_path / "grid.png", rows, scale=6, title="a crimson disc with a neon glow"))
    left, top = _margin(tmp_path, rows, 6), _layout(png, 3, 2, 6)[1]
    assert (png[:top] != WHITE).any()  # the title
    for r in range(3):
        band = png[top + r * (H + 2) * 6: top + (r + 1) * (H + 2) * 6, :left]
        assert (band != WHITE).any(), f"row {r} has no label"
    assert (png[top:, left - GRID_PAD // 2: left] == WHITE).all()  # white space between labels and images


def test_long_title_wraps_instead_of_widening_the_grid(tmp_path: Path) -> None:
    rows = {"base": _images(1, 0)}
    short = _load(save_grid(tmp_path / "short.png", rows, title="a disc"))
    long = _load(save_grid(tmp_path / "long.png", rows, title="a crimson disc with a neon glow " * 10))
    assert long.shape[1] <= 400  # wrapped to about 360 px, not one 2,000 px line
    assert _layout(long, 1, 1)[1] > 2 * _layout(short, 1, 1)[1]  # several lines


def test_ragged_rows_leave_missing_cells_white(tmp_path: Path) -> None:
    rows = {"one": _images(1, 0), "three": _images(3, 1), "none": _images(0, 2)}
    png = _load(save_grid(tmp_path / "grid.png", rows))
    left, top = _layout(png, 3, 3)  # as wide as the longest row
    assert top == 0
    for r, images in enumerate(rows.values()):
        for c in range(3):
            cell = _cell(png, left, top, r, c)
            if c < len(images):
                np.testing.assert_array_equal(cell, _scaled(images[c]))
            else:
                assert (cell == WHITE).all()
    empty_band = png[2 * (H + 2) * SCALE:, :left]
    assert (empty_band != WHITE).any()  # an empty row still has its label


def test_a_list_of_images_works_like_an_array(tmp_path: Path) -> None:
    images = _images(2, 0)
    a = _load(save_grid(tmp_path / "a.png", {"base": images}))
    b = _load(save_grid(tmp_path / "b.png", {"base": list(images)}))
    np.testing.assert_array_equal(a, b)


def test_no_rows_or_mixed_sizes_are_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no rows"):
        save_grid(tmp_path / "empty.png", {})
    mixed = {"small": _images(1, 0), "big": np.zeros((1, H + 1, W, 3), np.uint8)}
    with pytest.raises(ValueError, match="different sizes"):
        save_grid(tmp_path / "mixed.png", mixed)
    assert not list(tmp_path.iterdir())  # nothing written
