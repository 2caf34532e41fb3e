"""Tests for `pipeline.tracking.pictures`: files, sizes, and that what should be drawn is drawn.

Images are uniform gray, so any saturated pixel in a panel was drawn there: a mask overlay, its
outline, a box or a label background (titles and the "nothing to show" note are gray levels).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.tracking.pictures import (
    MARGIN,
    PANEL_WIDTH,
    TITLE_HEIGHT,
    category_color,
    level_share_figure,
    loss_curve_figure,
    prediction_figure,
    prediction_figure_size,
)

H, W = 60, 80
NAMES = {1: "person", 2: "car"}


def _gray() -> np.ndarray:
    return np.full((H, W, 3), 128, dtype=np.uint8)


def _instances(n: int, scores: list[float] | None = None) -> dict[str, np.ndarray]:
    masks = np.zeros((n, H, W), dtype=bool)
    boxes = np.zeros((n, 4), dtype=np.float32)
    for i in range(n):
        x1, y1 = 10 + 30 * i, 15
        masks[i, y1 : y1 + 25, x1 : x1 + 20] = True
        boxes[i] = (x1, y1, x1 + 20, y1 + 25)
    out = {"boxes": boxes, "labels": np.arange(1, n + 1) % 2 + 1, "masks": masks}
    if scores is not None:
        out["scores"] = np.asarray(scores, dtype=np.float32)
    return out


def _empty(scored: bool) -> dict[str, np.ndarray]:
    out = {
        "boxes": np.zeros((0, 4), np.float32),
        "labels": np.zeros(0, np.int64),
        "masks": np.zeros((0, H, W), bool),
    }
    if scored:
        out["scores"] = np.zeros(0, np.float32)
    return out


def _saturated(pixels: np.ndarray) -> int:
    """Number of pixels whose channels differ by more than 40 (i.e. not a shade of gray)."""
    pixels = pixels.astype(np.int16)
    return int(((pixels.max(-1) - pixels.min(-1)) > 40).sum())


def _panels(png: Path, row: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The pixels of the ground-truth and prediction image panels of a row (rows of equal H)."""
    pixels = np.asarray(Image.open(png).convert("RGB"))
    panel_h = round(PANEL_WIDTH * H / W)
    top = MARGIN + row * (TITLE_HEIGHT + panel_h + MARGIN) + TITLE_HEIGHT
    rows = slice(top + 2, top + panel_h - 2)
    left = pixels[rows, MARGIN + 2 : MARGIN + PANEL_WIDTH - 2]
    x0 = 2 * MARGIN + PANEL_WIDTH
    right = pixels[rows, x0 + 2 : x0 + PANEL_WIDTH - 2]
    return left, right


def test_prediction_figure_png_of_expected_size(tmp_path: Path) -> None:
    images = [_gray(), np.full((90, 40, 3), 200, np.uint8)]
    gt = [_instances(2), _empty(scored=False)]
    gt[1]["masks"] = np.zeros((0, 90, 40), bool)
    preds = [_instances(2, [0.9, 0.8]), _empty(scored=True)]
    preds[1]["masks"] = np.zeros((0, 90, 40), bool)
    out = prediction_figure(images, preds, gt, NAMES, path=tmp_path / "sub" / "p.png")
    assert out == tmp_path / "sub" / "p.png"
    with Image.open(out) as img:
        assert img.format == "PNG"
        assert img.size == prediction_figure_size(images)
    width, height = prediction_figure_size(images)
    assert width == 2 * PANEL_WIDTH + 3 * MARGIN
    assert height == MARGIN + sum(TITLE_HEIGHT + p + MARGIN for p in (480, 1280))


def test_masks_are_drawn_where_instances_are(tmp_path: Path) -> None:
    gt = _instances(2)
    preds = _instances(2, [0.95, 0.3])  # the second is below the threshold
    out = prediction_figure([_gray()], [preds], [gt], NAMES, path=tmp_path / "p.png")
    left, right = _panels(out)
    scale = PANEL_WIDTH / W
    for panel in (left, right):
        # Inside the first instance's mask (rows 15..40, cols 10..30 of the image): tinted.
        inside = panel[int(20 * scale) : int(35 * scale), int(14 * scale) : int(26 * scale)]
        assert _saturated(inside) > 0.9 * inside.shape[0] * inside.shape[1]
        # Bottom strip, where no instance is: the gray image untouched.
        outside = panel[int(50 * scale) :, :]
        assert _saturated(outside) == 0
    # The second instance (cols 40..60) is in the ground truth, and filtered from predictions.
    second = (slice(int(20 * scale), int(35 * scale)), slice(int(44 * scale), int(56 * scale)))
    assert _saturated(left[second]) > 0
    assert _saturated(right[second]) == 0
    # Same category, same color on both sides.
    color = np.array(category_color(gt["labels"][0])) * 255
    blended = 0.55 * 128 + 0.45 * color
    center = (int(27 * scale), int(20 * scale))
    for panel in (left, right):
        assert np.abs(panel[center].astype(float) - blended).max() < 6


def test_empty_predictions_and_ground_truth(tmp_path: Path) -> None:
    out = prediction_figure(
        [_gray()], [_empty(scored=True)], [_instances(1)], NAMES, path=tmp_path / "e.png"
    )
    left, right = _panels(out)
    assert _saturated(left) > 0
    assert _saturated(right) == 0  # nothing drawn, only the gray "nothing to show" note
    assert (right < 100).any(), "the empty panel carries a note"
    out = prediction_figure(
        [_gray()], [_empty(scored=True)], [_empty(scored=False)], NAMES, path=tmp_path / "n.png"
    )
    assert _saturated(np.concatenate(_panels(out))) == 0
    # Predictions without masks (boxes only) and unknown labels still draw.
    boxes_only = _instances(1, [0.9])
    del boxes_only["masks"]
    boxes_only["labels"] = np.array([42])
    out = prediction_figure([_gray()], [boxes_only], [_instances(1)], {}, path=tmp_path / "b.png")
    assert _saturated(_panels(out)[1]) > 0
    # No images at all: a placeholder picture rather than an error.
    out = prediction_figure([], [], [], NAMES, path=tmp_path / "none.png")
    with Image.open(out) as img:
        assert img.size == prediction_figure_size([])


def test_only_the_best_predictions_are_drawn(tmp_path: Path) -> None:
    preds = _instances(2, [0.6, 0.9])
    out = prediction_figure(
        [_gray()], [preds], [_instances(2)], NAMES, path=tmp_path / "m.png", max_shown=1
    )
    _, right = _panels(out)
    scale = PANEL_WIDTH / W
    rows = slice(int(20 * scale), int(35 * scale))
    assert _saturated(right[rows, int(14 * scale) : int(26 * scale)]) == 0  # score 0.6: dropped
    assert _saturated(right[rows, int(44 * scale) : int(56 * scale)]) > 0  # score 0.9: drawn


def test_mismatched_lengths_raise(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="one prediction"):
        prediction_figure([_gray()], [], [_instances(1)], NAMES, path=tmp_path / "x.png")


def test_category_colors_are_fixed_and_distinct() -> None:
    colors = [category_color(i) for i in range(1, 21)]
    assert colors == [category_color(i) for i in range(1, 21)]
    assert len({tuple(round(c, 3) for c in rgb) for rgb in colors}) == 20
    assert all(0.0 <= c <= 1.0 for rgb in colors for c in rgb)


def test_level_share_figure(tmp_path: Path) -> None:
    box = np.full((4, 4), 0.25)
    mask = np.array(
        [[0.7, 0.1, 0.1, 0.1], [0.4, 0.3, 0.2, 0.1], [0, 0, 0, 0], [0.1, 0.1, 0.1, 0.7]]
    )  # level 3 had no RoIs
    out = level_share_figure({"mask": mask, "box": box}, tmp_path / "fig3.png")
    with Image.open(out) as img:
        assert img.format == "PNG"
        assert img.size == (1280, 500)
        pixels = np.asarray(img.convert("RGB"))
    # All four level colors appear (bars and legend).
    for hex_color in ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"):
        rgb = np.array([int(hex_color[i : i + 2], 16) for i in (1, 3, 5)])
        assert (np.abs(pixels.astype(int) - rgb).max(-1) < 3).sum() > 100, hex_color
    with pytest.raises(ValueError, match="must be"):
        level_share_figure({"box": np.ones((2, 3))}, tmp_path / "bad.png")
    out = level_share_figure({}, tmp_path / "none.png")
    assert out.is_file()


def test_loss_curve_figure(tmp_path: Path) -> None:
    out = loss_curve_figure({"train/loss": [(0, 2.0), (10, 1.0)], "empty": []}, tmp_path / "l.png")
    with Image.open(out) as img:
        assert img.size == (800, 450)
