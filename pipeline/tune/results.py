"""A sweep's results: one row a trial, as a markdown table, a CSV file and a bar chart; with
repeated seeds, the rows' statistics first (`pipeline/tune/stats.py`); with searched keys, the
searched values against the metric."""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.tune import figures, stats

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
    group: str = ""  # the row of a repeated trial (seeds > 1); "" = its own


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
        + ["status", "row"]
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
                r.group or r.trial,
            ]
        )
    return out.getvalue()


def row_stats(rows: list[Row]) -> list[stats.RowStats]:
    """The trials' rows (a row: one variant / configuration over its seeds), with statistics."""
    scores = [
        (r.group or r.trial, r.status, {"segm_AP": r.segm_AP, "bbox_AP": r.bbox_AP}, r.paper)
        for r in rows
    ]
    return stats.row_stats(scores)


def write_results(
    rows: list[Row],
    directory: Path,
    title: str,
    common: dict[str, Any],
    search: dict[str, dict[str, list[Any]]] | None = None,
    metric: str = "segm_AP",
) -> dict[str, Path]:
    """results.md, results.csv and results.png in `directory`, and search.png for a sweep with
    searched keys; returns their paths. With repeated rows (seeds > 1) results.md starts with
    each row's statistics and results.png shows them."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {
        "md": directory / "results.md",
        "csv": directory / "results.csv",
        "png": directory / "results.png",
    }
    table = to_markdown(rows, common)
    grouped = row_stats(rows)
    if len(grouped) < len(rows):
        n = max(s.summaries["segm_AP"].runs for s in grouped)
        head = (
            f"Per row over up to {n} seeds (AP in %; mean ± sd, the mean's 95% t interval, "
            "Welch's t-test against the first row):\n\n"
        )
        table = head + stats.to_markdown(grouped) + "\nPer trial:\n\n" + table
        figures.row_chart(grouped, paths["png"], title.replace("per trial", "per row, over seeds"))
    else:
        figures.bar_chart(rows, paths["png"], title)
    paths["md"].write_text(table)
    paths["csv"].write_text(to_csv(rows))
    picture = figures.search_figure(
        rows,
        search or {},
        metric,
        directory / "search.png",
        f"{title.split(':')[0]}: searched values",
    )
    if picture is not None:
        paths["search"] = picture
    return paths
