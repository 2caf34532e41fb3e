"""A sweep's pictures: AP per trial (or per row over seeds), and the searched values against the
sweep's metric. Drawn with matplotlib's object API (no pyplot, no global backend). `rows` are
`pipeline.tune.results.Row`s."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, NullFormatter

from pipeline.tune.stats import RowStats

DPI = 110
COLORS = {"segm_AP": "tab:blue", "bbox_AP": "tab:orange"}


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, format="png")
    return path


def bar_chart(rows: list[Any], path: Path, title: str) -> Path:
    """Segm and bbox AP (%) per trial as grouped bars, the paper's numbers as hollow bars."""
    has_paper = any(r.paper for r in rows)
    n = len(rows)
    width = 0.2 if has_paper else 0.38
    fig = Figure(figsize=(max(6.0, 0.9 * n + 2), 4.2))
    ax = fig.subplots()
    xs = list(range(n))

    def values(get: Any) -> list[float]:
        return [get(r) if math.isfinite(get(r)) else 0.0 for r in rows]

    series = [
        ("segm AP", values(lambda r: 100 * r.segm_AP), "tab:blue", None),
        ("bbox AP", values(lambda r: 100 * r.bbox_AP), "tab:orange", None),
    ]
    if has_paper:
        series += [
            ("paper segm AP", [r.paper.get("segm_AP", 0.0) for r in rows], "tab:blue", "//"),
            ("paper bbox AP", [r.paper.get("bbox_AP", 0.0) for r in rows], "tab:orange", "//"),
        ]
    offset = -(len(series) - 1) / 2 * width
    for i, (label, ys, color, hatch) in enumerate(series):
        pos = [x + offset + i * width for x in xs]
        if hatch:
            ax.bar(pos, ys, width, label=label, fill=False, edgecolor=color, hatch=hatch)
        else:
            ax.bar(pos, ys, width, label=label, color=color)
    ax.set_xticks(xs)
    labels = [r.trial + ("" if r.status == "finished" else f"\n({r.status})") for r in rows]
    ax.set_xticklabels(labels, rotation=30 if n > 5 else 0, ha="right" if n > 5 else "center")
    ax.set_ylabel("AP (%)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def row_chart(rows: list[RowStats], path: Path, title: str) -> Path:
    """Per row over its seeds: mean segm and bbox AP (%) as bars with the 95% interval, each
    finished seed as a dot, the paper's number as a hollow bar."""
    n = len(rows)
    fig = Figure(figsize=(max(6.0, 1.1 * n + 2), 4.4))
    ax = fig.subplots()
    metrics = list(COLORS)
    has_paper = any(r.summaries[m].paper is not None for r in rows for m in metrics)
    slots = [(m, False) for m in metrics] + ([(m, True) for m in metrics] if has_paper else [])
    width = 0.8 / len(slots)
    for i, (m, paper) in enumerate(slots):
        pos = [x - 0.4 + (i + 0.5) * width for x in range(n)]
        label = m.replace("_AP", " AP")
        if paper:
            ys = [r.summaries[m].paper or 0.0 for r in rows]
            ax.bar(
                pos, ys, width, fill=False, edgecolor=COLORS[m], hatch="//", label="paper " + label
            )
            continue
        summ = [r.summaries[m] for r in rows]
        means = [100 * s.mean if s.n else 0.0 for s in summ]
        errs = [100 * s.half_width if s.n > 1 else 0.0 for s in summ]
        ax.bar(pos, means, width, yerr=errs, capsize=3, color=COLORS[m], alpha=0.75,
               label=f"{label} (mean, 95% interval)")  # fmt: skip
        for x, s in zip(pos, summ):
            ax.plot([x] * s.n, [100 * v for v in s.values], "k.", markersize=4)
    ax.set_xticks(range(n))
    labels = [f"{r.row}\n(n={r.summaries['segm_AP'].n})" for r in rows]
    ax.set_xticklabels(labels, rotation=30 if n > 5 else 0, ha="right" if n > 5 else "center")
    ax.set_ylabel("AP (%)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _x_axis(ax: Any, kind: str, values: list[Any]) -> None:
    """A searched key's axis: its choices as labels, or its whole range with plain ticks."""
    if kind in ("choice", "grid"):
        labels = [str(v) for v in values]
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=20 if max(map(len, labels)) > 6 else 0, fontsize=8)
        ax.set_xlim(-0.5, len(labels) - 0.5)
        return
    lo, hi = float(values[0]), float(values[1])
    log = kind == "loguniform"
    if log:
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
    ticks = [lo * (hi / lo) ** (i / 3) if log else lo + (hi - lo) * i / 3 for i in range(4)]
    ax.set_xticks(ticks, [f"{t:.2g}" for t in ticks], fontsize=8)
    pad = (hi / lo) ** 0.05 if log else 0.05 * (hi - lo)
    ax.set_xlim(lo / pad, hi * pad) if log else ax.set_xlim(lo - pad, hi + pad)


def search_figure(
    rows: list[Any], search: dict[str, dict[str, list[Any]]], metric: str, path: Path, title: str
) -> Path | None:
    """One panel per searched key: each trial's value against the sweep's metric, coloured by
    the trial's order (Optuna's later trials use what the earlier ones scored); early-stopped
    trials as triangles. None if the sweep searches nothing or no trial has a score."""
    scored = [
        (i, r) for i, r in enumerate(rows) if r.status != "failed" and math.isfinite(r.metric)
    ]
    if not search or not scored:
        return None
    keys = list(search)
    cols = min(3, len(keys))
    rows_n = math.ceil(len(keys) / cols)
    fig = Figure(figsize=(4.2 * cols + 1, 3.4 * rows_n + 0.5), layout="constrained")
    axes = fig.subplots(rows_n, cols, squeeze=False).ravel()
    scale = 100 if metric.endswith("_AP") else 1
    ylabel = metric.replace("_AP", " AP (%)").replace("train_loss", "train loss")
    points = None
    for ax, key in zip(axes, keys):
        kind, values = next(iter(search[key].items()))
        categorical = kind in ("choice", "grid")
        labels = [str(v) for v in values]
        xs = [labels.index(str(r.overrides.get(key))) if categorical else r.overrides.get(key)
              for _, r in scored]  # fmt: skip
        ys = [scale * r.metric for _, r in scored]
        order = [i for i, _ in scored]
        for early, marker in ((False, "o"), (True, "v")):
            keep = [j for j, (_, r) in enumerate(scored) if (r.status != "finished") == early]
            points = ax.scatter(
                [xs[j] for j in keep], [ys[j] for j in keep], c=[order[j] for j in keep],
                cmap="viridis", vmin=0, vmax=max(len(rows) - 1, 1), s=40, marker=marker,
                edgecolors="k", linewidths=0.5,
            )  # fmt: skip
        _x_axis(ax, kind, values)
        ax.set_xlabel(key, fontsize=9)
        ax.set_ylabel(ylabel, fontsize=9)
    for ax in axes[len(keys) :]:
        ax.set_visible(False)
    if points is not None:
        bar = fig.colorbar(points, ax=list(axes[: len(keys)]), label="trial (in order)", shrink=0.8)
        bar.locator = MaxNLocator(integer=True)
        bar.update_ticks()
    early = any(r.status != "finished" for _, r in scored)
    fig.suptitle(title + (" (triangles: early-stopped)" if early else ""))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    return path
