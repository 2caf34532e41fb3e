"""Pictures logged with a run: predictions beside ground truth, and paper Figure 3.

Drawn with matplotlib's Agg canvas on an explicit `Figure` (no pyplot, no display, no global
figure registry to leak in a long-lived Ray worker). Layouts are placed in pixels, so a
picture's size depends only on its inputs: `prediction_figure_size` tells it in advance.
"""

from __future__ import annotations

import colorsys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import PercentFormatter

DPI = 100
PANEL_WIDTH = 640  # px of one image panel
TITLE_HEIGHT = 44  # px above each panel for its two-line title
MARGIN = 12  # px around and between panels
MASK_ALPHA = 0.45
# Figure 3 bar colors for source levels 1..L (matplotlib's tab10, colorblind-friendly order).
LEVEL_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")


def category_color(category: int) -> tuple[float, float, float]:
    """A fixed, saturated RGB color in [0, 1] for a category id.

    Hues step by the golden ratio, so neighbouring ids get far-apart hues and the color of a
    category is the same in every picture of every run.
    """
    hue = (int(category) * 0.618033988749895 + 0.08) % 1.0
    return colorsys.hsv_to_rgb(hue, 0.85, 0.95)


def _text_color(rgb: Sequence[float]) -> str:
    luminance = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return "black" if luminance > 0.6 else "white"


def _panel_height(image: np.ndarray, panel_width: int) -> int:
    h, w = image.shape[:2]
    # Very tall or very wide images keep a usable panel; imshow letterboxes inside it.
    return int(round(panel_width * min(max(h / max(w, 1), 0.25), 2.0)))


def prediction_figure_size(
    images: Sequence[np.ndarray], panel_width: int = PANEL_WIDTH
) -> tuple[int, int]:
    """(width, height) in pixels of `prediction_figure` for these images."""
    if not images:
        return 2 * panel_width + 3 * MARGIN, TITLE_HEIGHT + 120
    width = 2 * panel_width + 3 * MARGIN
    height = MARGIN + sum(TITLE_HEIGHT + _panel_height(i, panel_width) + MARGIN for i in images)
    return width, height


def _as_bool_masks(masks: Any, count: int, shape: tuple[int, int]) -> np.ndarray | None:
    """(N, H, W) bool masks, probabilities thresholded at 0.5; None if absent or of another size."""
    if masks is None:
        return None
    masks = np.asarray(masks)
    if masks.ndim == 4:  # (N, 1, H, W) as torchvision returns them
        masks = masks[:, 0]
    if masks.shape[0] != count or masks.shape[1:] != shape:
        return None
    return masks if masks.dtype == bool else masks > 0.5


def _draw_instances(
    ax: Any,
    image: np.ndarray,
    instances: Mapping[str, Any],
    keep: np.ndarray,
    category_names: Mapping[int, str],
    show_scores: bool,
    empty_text: str,
) -> None:
    """Image, then translucent masks with outlines, boxes and "name score" labels."""
    h, w = image.shape[:2]
    # Pixel (r, c) covers [c, c + 1] x [r, r + 1], the convention of x1y1x2y2 boxes, so boxes
    # and mask outlines line up on the same pixel edges.
    extent = (0, w, h, 0)
    ax.imshow(image, interpolation="nearest", extent=extent)
    labels = np.asarray(instances.get("labels", np.zeros(0)), dtype=np.int64).reshape(-1)
    boxes = np.asarray(instances.get("boxes", np.zeros((0, 4))), dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(instances.get("scores", np.ones(len(labels))), dtype=np.float64)
    masks = _as_bool_masks(instances.get("masks"), len(labels), (h, w))
    order = [i for i in np.argsort(-scores, kind="stable") if keep[i]]
    if masks is not None:
        _draw_masks(ax, masks, labels, order, extent)
    _draw_boxes(ax, boxes, labels, scores, order, category_names, show_scores)
    if not order:
        ax.text(
            0.5,
            0.5,
            empty_text,
            transform=ax.transAxes,
            ha="center",
            va="center",
            fontsize=11,
            color="white",
            bbox={"facecolor": "0.2", "alpha": 0.6, "pad": 4},
        )
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_xticks([])
    ax.set_yticks([])


def _draw_masks(
    ax: Any,
    masks: np.ndarray,
    labels: np.ndarray,
    order: list[int],
    extent: tuple[int, int, int, int],
) -> None:
    """Translucent masks with outlines in their category's colour; masks (N, H, W) bool."""
    h, w = masks.shape[1:]
    # One RGBA layer for all masks; the highest-scoring instance is painted last, on top.
    overlay = np.zeros((h, w, 4), dtype=np.float32)
    for i in reversed(order):
        overlay[masks[i]] = (*category_color(labels[i]), MASK_ALPHA)
    ax.imshow(overlay, interpolation="nearest", extent=extent)
    centers_x, centers_y = np.arange(w) + 0.5, np.arange(h) + 0.5
    for i in order:
        if masks[i].any():
            ax.contour(
                centers_x,
                centers_y,
                masks[i].astype(np.float32),
                levels=[0.5],
                colors=[category_color(labels[i])],
                linewidths=1.5,
            )


def _draw_boxes(
    ax: Any,
    boxes: np.ndarray,
    labels: np.ndarray,
    scores: np.ndarray,
    order: list[int],
    category_names: Mapping[int, str],
    show_scores: bool,
) -> None:
    """Box outlines with "name score" labels on their category's colour."""
    for i in order:
        color = category_color(labels[i])
        x1, y1, x2, y2 = boxes[i]
        ax.add_patch(
            Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color, linewidth=1.5)
        )
        name = category_names.get(int(labels[i]), f"class {int(labels[i])}")
        text = f"{name} {scores[i]:.2f}" if show_scores else name
        ax.text(
            max(x1, 0),
            max(y1, 0),
            text,
            fontsize=9,
            color=_text_color(color),
            va="bottom" if y1 > 14 else "top",
            ha="left",
            bbox={"facecolor": color, "edgecolor": "none", "alpha": 0.85, "pad": 1.5},
            clip_on=True,
        )


def _save(fig: Any, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=DPI, format="png")
    return path


def prediction_figure(
    images: Sequence[np.ndarray],
    predictions: Sequence[Mapping[str, Any]],
    ground_truth: Sequence[Mapping[str, Any]],
    category_names: Mapping[int, str],
    score_threshold: float = 0.5,
    path: Path | str = "predictions.png",
    panel_width: int = PANEL_WIDTH,
    max_shown: int = 30,
) -> Path:
    """A PNG grid: one row per image, ground truth on the left, predictions on the right.

    Masks are translucent overlays with outlines in their category's color (`category_color`),
    boxes carry "name" (ground truth) or "name score" labels; predictions below the threshold
    are left out, and the titles count what is shown.

    Args:
        images: (H, W, 3) uint8 RGB images.
        predictions: per image, numpy "boxes" (N, 4) x1y1x2y2, "labels" (N,), "scores" (N,),
            "masks" (N, H, W) bool or probabilities (optional).
        ground_truth: per image, the same without "scores".
        category_names: {label: name}; unknown labels are drawn as "class <label>".
        score_threshold: the lowest score drawn.
        path: the PNG to write.
        panel_width: pixels per image panel; the size is `prediction_figure_size(...)`.
        max_shown: at most this many predictions per image, the highest-scoring (an untrained
            model's 100 overlapping detections would hide the image).

    Returns:
        `path`.
    """
    if not len(images) == len(predictions) == len(ground_truth):
        raise ValueError(
            f"need one prediction and one ground truth per image, got {len(images)} images, "
            f"{len(predictions)} predictions, {len(ground_truth)} ground truths"
        )
    width, height = prediction_figure_size(images, panel_width)
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, facecolor="white")
    if not images:
        fig.text(0.5, 0.5, "no images to show", ha="center", va="center", fontsize=14)
        return _save(fig, Path(path))
    top = height - MARGIN  # px from the bottom edge, matplotlib's origin
    for index, (image, pred, gt) in enumerate(zip(images, predictions, ground_truth)):
        image = np.asarray(image)
        if image.ndim == 2:
            image = np.stack([image] * 3, axis=-1)
        panel_h = _panel_height(image, panel_width)
        bottom = top - TITLE_HEIGHT - panel_h
        for column, panel in enumerate(
            _row_panels(index, image, pred, gt, score_threshold, max_shown)
        ):
            instances, keep, show_scores, empty, title = panel
            left = MARGIN + column * (panel_width + MARGIN)
            ax = fig.add_axes(
                (left / width, bottom / height, panel_width / width, panel_h / height)
            )
            _draw_instances(ax, image, instances, keep, category_names, show_scores, empty)
            ax.set_title(title, fontsize=10, pad=4)
        top = bottom - MARGIN
    return _save(fig, Path(path))


def _row_panels(
    index: int,
    image: np.ndarray,
    pred: Mapping[str, Any],
    gt: Mapping[str, Any],
    score_threshold: float,
    max_shown: int,
) -> tuple[tuple[Any, np.ndarray, bool, str, str], ...]:
    """A row's two panels: (instances, kept (N,) bool, show scores, text when empty, title)."""
    h, w = image.shape[:2]
    n_gt = len(np.asarray(gt.get("labels", [])).reshape(-1))
    scores = np.asarray(pred.get("scores", []), dtype=np.float64).reshape(-1)
    keep_pred = _best_kept(scores, score_threshold, max_shown)
    titles = (
        f"image {index + 1} ({w}x{h}): ground truth\n{n_gt} instance{'s' * (n_gt != 1)}",
        f"prediction (score >= {score_threshold:g})\n"
        f"{int(keep_pred.sum())} shown of {len(scores)} detection{'s' * (len(scores) != 1)}",
    )
    return (
        (gt, np.ones(n_gt, dtype=bool), False, "no instances", titles[0]),
        (pred, keep_pred, True, f"no detection with score >= {score_threshold:g}", titles[1]),
    )


def _best_kept(scores: np.ndarray, score_threshold: float, max_shown: int) -> np.ndarray:
    """(N,) bool: the scores at or over the threshold, at most the best `max_shown` of them."""
    keep = scores >= score_threshold
    # (N,) rank of each score, 0 = best; drop all but the best `max_shown` kept ones.
    rank = np.empty(len(scores), dtype=np.int64)
    rank[np.argsort(-scores, kind="stable")] = np.arange(len(scores))
    return keep & (rank < max_shown)


def detection_figure(
    image: np.ndarray,
    prediction: Mapping[str, Any],
    category_names: Mapping[int, str],
    path: Path | str = "detections.png",
    title: str = "",
    panel_width: int = PANEL_WIDTH,
) -> Path:
    """A PNG of one image with its detections: masks, boxes and "name score" labels.

    Args:
        image: (H, W, 3) uint8 RGB (or (H, W) gray).
        prediction: numpy "boxes" (N, 4) x1y1x2y2, "labels" (N,), "scores" (N,), "masks"
            (N, H, W) bool or probabilities (optional); every detection is drawn.
        category_names: {label: name}; unknown labels are drawn as "class <label>".
        path: the PNG to write.
        title: the first title line; the second counts the detections.
        panel_width: pixels of the image panel.

    Returns:
        `path`.
    """
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    panel_h = _panel_height(image, panel_width)
    width, height = panel_width + 2 * MARGIN, TITLE_HEIGHT + panel_h + 2 * MARGIN
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, facecolor="white")
    ax = fig.add_axes((MARGIN / width, MARGIN / height, panel_width / width, panel_h / height))
    n = len(np.asarray(prediction.get("scores", [])).reshape(-1))
    _draw_instances(
        ax, image, prediction, np.ones(n, dtype=bool), category_names, True, "no detections"
    )
    h, w = image.shape[:2]
    ax.set_title(f"{title} ({w}x{h})\n{n} detection{'s' * (n != 1)}", fontsize=10, pad=4)
    return _save(fig, Path(path))


def _head_title(name: str) -> str:
    titles = {
        "box": "box branch (fc layers)",
        "mask": "mask branch (FCN)",
    }
    return titles.get(name, f"{name} branch")


def level_share_figure(
    shares: Mapping[str, np.ndarray], path: Path | str = "level_share.png"
) -> Path:
    """Paper Figure 3: under adaptive feature pooling, the share of features from each level.

    One grouped bar chart per head: groups on the x axis are the FPN level an RoI would have
    been assigned to (level 1 = P2 ... level L), the L bars of a group the share of its fused
    feature elements whose maximum came from each source level. A group with no RoIs is
    marked "no RoIs".

    Args:
        shares: {"box": (L, L), "mask": (L, L)} as `panet_model.diagnostics.level_share`
            returns them (numpy), row = assigned level, column = source level, rows sum to 1.
        path: the PNG to write.

    Returns:
        `path`.
    """
    order = [k for k in ("box", "mask") if k in shares] + sorted(
        k for k in shares if k not in ("box", "mask")
    )
    n = max(len(order), 1)
    fig = Figure(figsize=(6.4 * n, 5.0), dpi=DPI, facecolor="white")
    fig.suptitle(
        "Adaptive feature pooling: ratio of features pooled from each feature level (Fig. 3)",
        fontsize=12,
    )
    if not order:
        fig.text(0.5, 0.5, "no level shares recorded (AFP off or sum fusion)", ha="center")
        return _save(fig, Path(path))
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, name in zip(axes, order):
        _level_share_bars(ax, name, np.asarray(shares[name], dtype=np.float64))
    # One legend for all heads, above the charts, where no bar can hide under it.
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(
        handles,
        labels,
        loc="upper center",
        bbox_to_anchor=(0.5, 0.94),
        ncols=len(labels),
        fontsize=9,
        frameon=False,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    return _save(fig, Path(path))


def _level_share_bars(ax: Any, name: str, matrix: np.ndarray) -> None:
    """One head's grouped bars: a group per assigned level, a bar per source level."""
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"shares[{name!r}] must be (L, L), got {matrix.shape}")
    levels = matrix.shape[0]
    group = np.arange(levels)
    bar_w = 0.8 / levels
    for source in range(levels):
        x = group - 0.4 + bar_w * (source + 0.5)
        values = matrix[:, source]
        bars = ax.bar(
            x,
            values,
            bar_w * 0.92,
            color=LEVEL_COLORS[source % len(LEVEL_COLORS)],
            label=f"features from level {source + 1}",
        )
        labels = [f"{100 * v:.0f}%" if matrix[i].sum() > 0 else "" for i, v in enumerate(values)]
        ax.bar_label(bars, labels=labels, fontsize=8, padding=1.5)
    for i in range(levels):
        if matrix[i].sum() <= 0:
            ax.text(i, 0.05, "no RoIs", ha="center", fontsize=9, color="0.4")
    ax.set_xticks(group, [f"level {i + 1}" for i in group])
    ax.set_xlabel("level FPN assigns the RoI to")
    ax.set_ylim(0, 1.07)  # room for the label of a bar at 100%
    ax.set_yticks(np.linspace(0.0, 1.0, 6))
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_ylabel("share of pooled features")
    ax.set_title(_head_title(name), fontsize=11)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)


def loss_curve_figure(
    history: Mapping[str, Sequence[tuple[int, float]]], path: Path | str = "losses.png"
) -> Path:
    """Training curves, one line per series (MLflow's charts show the same interactively).

    Args:
        history: {name: [(step, value), ...]}.
        path: the PNG to write.

    Returns:
        `path`.
    """
    fig = Figure(figsize=(8, 4.5), dpi=DPI, facecolor="white")
    ax = fig.subplots()
    for name, points in sorted(history.items()):
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, label=name, linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("value")
    ax.grid(alpha=0.3)
    if history:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, Path(path))
