"""A sweep's results: one row a trial, as a markdown table, a CSV file and a bar chart."""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STATUSES = ("finished", "early-stopped", "failed", "unfinished")


@dataclass(frozen=True)
class Row:
    """One trial's outcome."""

    trial: str
    overrides: dict[str, Any]
    steps: int  # the step of its last evaluation seen by Tune, 0 if none
    bbox_AP: float  # COCO AP of that evaluation, NaN if none
    segm_AP: float
    status: str  # one of STATUSES
    paper: dict[str, float] = field(default_factory=dict)  # the paper's numbers for the row
    metric: float = math.nan  # the sweep's metric


def status_of(error: bool, terminated: bool, step: int, max_steps: int) -> str:
    """A trial's status: failed, unfinished (interrupted), finished, or early-stopped."""
    if error:
        return "failed"
    if not terminated:
        return "unfinished"
    return "finished" if step >= max_steps else "early-stopped"


def best_row(rows: list[Row], mode: str) -> Row | None:
    """The best trial by the sweep's metric among the ones that did not fail."""
    scored = [r for r in rows if r.status != "failed" and math.isfinite(r.metric)]
    if not scored:
        return None
    return (max if mode == "max" else min)(scored, key=lambda r: r.metric)


def _ap(value: float) -> str:
    return "" if not math.isfinite(value) else f"{100 * value:.1f}"


def _paper(row: Row, key: str) -> str:
    return f"{row.paper[key]:.1f}" if key in row.paper else ""


def _overrides(row: Row, common: dict[str, Any]) -> str:
    own = {k: v for k, v in row.overrides.items() if k not in common or common[k] != v}
    return " ".join(f"{k}={json.dumps(v)}" for k, v in own.items())


def to_markdown(rows: list[Row], common: dict[str, Any] | None = None) -> str:
    """The table: trial, its own overrides, steps, bbox/segm AP (%), the paper's, status."""
    common = common or {}
    head = "| trial | overrides | steps | bbox AP | segm AP | paper bbox | paper segm | status |"
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        cells = [
            r.trial,
            _overrides(r, common).replace("|", "\\|") or "(base)",
            str(r.steps),
            _ap(r.bbox_AP),
            _ap(r.segm_AP),
            _paper(r, "bbox_AP"),
            _paper(r, "segm_AP"),
            r.status,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_csv(rows: list[Row]) -> str:
    """The table as CSV; APs as fractions (COCOeval's), the paper's in percent as printed."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(
        ["trial", "overrides", "steps", "bbox_AP", "segm_AP", "paper_bbox_AP", "paper_segm_AP"]
        + ["status"]
    )
    for r in rows:
        writer.writerow(
            [
                r.trial,
                json.dumps(r.overrides, sort_keys=True),
                r.steps,
                "" if not math.isfinite(r.bbox_AP) else f"{r.bbox_AP:.6f}",
                "" if not math.isfinite(r.segm_AP) else f"{r.segm_AP:.6f}",
                r.paper.get("bbox_AP", ""),
                r.paper.get("segm_AP", ""),
                r.status,
            ]
        )
    return out.getvalue()


def bar_chart(rows: list[Row], path: Path, title: str) -> Path:
    """Segm and bbox AP (%) per trial as grouped bars, the paper's numbers as hollow bars."""
    # deferred: matplotlib only for the optional chart; the Agg backend is set before pyplot
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_paper = any(r.paper for r in rows)
    n = len(rows)
    width = 0.2 if has_paper else 0.38
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * n + 2), 4.2))
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
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_results(rows: list[Row], directory: Path, title: str, common: dict[str, Any]) -> dict:
    """results.md, results.csv and results.png in `directory`; returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {
        "md": directory / "results.md",
        "csv": directory / "results.csv",
        "png": directory / "results.png",
    }
    paths["md"].write_text(to_markdown(rows, common))
    paths["csv"].write_text(to_csv(rows))
    bar_chart(rows, paths["png"], title)
    return paths
