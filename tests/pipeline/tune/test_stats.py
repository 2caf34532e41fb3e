"""Repeated seeds: each row's mean, sd and 95% interval, Welch's test against the first row, the
paper's gaps judged by them, and the results and pictures that show them."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pytest
from scipy import stats as scipy_stats

from pipeline.tune.results import Row, write_results
from pipeline.tune.stats import Summary, row_stats, to_markdown, welch_p


def welch_by_hand(a: list[float], b: list[float]) -> float:
    """Welch's t and the Welch-Satterthwaite degrees of freedom, written out."""
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    t = (statistics.fmean(a) - statistics.fmean(b)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return 2 * scipy_stats.t.sf(abs(t), df)


def test_summary_interval_and_welch() -> None:
    s = Summary("a", 3, (0.30, 0.32, 0.34))
    assert s.mean == pytest.approx(0.32) and s.sd == pytest.approx(0.02)
    assert s.half_width == pytest.approx(4.302653 * 0.02 / math.sqrt(3), rel=1e-6)  # t(.975, 2)
    a, b = [0.30, 0.32, 0.35], [0.20, 0.21, 0.25, 0.22]
    assert welch_p(tuple(a), tuple(b)) == pytest.approx(welch_by_hand(a, b), rel=1e-9)
    assert math.isnan(welch_p((0.3,), (0.2, 0.25)))  # one run: nothing to test
    assert math.isnan(welch_p((0.3, 0.3), (0.2, 0.2)))  # no variance on either side
    one = Summary("b", 1, (0.3,))
    assert math.isnan(one.sd) and math.isnan(one.half_width)


def scores(row: str, values: list[float], paper: float | None = None, status: str = "finished"):
    p = {} if paper is None else {"segm_AP": paper}
    return [(row, status, {"segm_AP": v, "bbox_AP": v + 0.02}, p) for v in values]


def test_rows_against_the_baseline_and_the_papers_gaps() -> None:
    rows = row_stats(
        scores("rbl", [0.30, 0.31, 0.29], 33.4)
        + scores("better", [0.40, 0.41, 0.39], 35.3)  # clearly above: supported
        + scores("same", [0.28, 0.33, 0.31], 35.7)  # within the noise: not significant
        + scores("worse", [0.20, 0.21, 0.19], 36.4)  # clearly below: the opposite of the paper
        + scores("once", [0.35], 36.0)
        + scores("failed", [0.50], status="failed")
    )
    assert [r.row for r in rows] == ["rbl", "better", "same", "worse", "once", "failed"]
    assert rows[0].comparisons == {}
    better = rows[1].comparisons["segm_AP"]
    assert better.diff == pytest.approx(0.10) and better.significant
    assert better.paper_diff == pytest.approx(1.9)
    assert rows[2].comparisons["segm_AP"].significant is False
    assert rows[5].summaries["segm_AP"].n == 0 and rows[5].summaries["segm_AP"].runs == 1
    md = to_markdown(rows)
    assert "| rbl | segm AP | 3/3 | 30.0 ± 1.0 | 27.5 – 32.5 |  | baseline |  |" in md
    line = next(x for x in md.splitlines() if x.startswith("| better | segm AP"))
    assert "+10.0" in line and " yes |" in line and "+1.9: supported" in line
    assert "not significant" in next(x for x in md.splitlines() if x.startswith("| same | segm"))
    assert "+3.0: opposite" in next(x for x in md.splitlines() if x.startswith("| worse | segm"))
    once = next(x for x in md.splitlines() if x.startswith("| once | segm AP"))
    assert once == "| once | segm AP | 1/1 | 35.0 | n/a | +5.0 | n/a | +2.6: n/a |"


def test_results_of_a_repeated_sweep(tmp_path: Path) -> None:
    rows = []
    for seed in range(3):
        for name, lr, ap in (("a", 0.003, 0.30), ("b", 0.001, 0.20)):
            ap += 0.01 * seed
            rows.append(Row(f"{name}-s{seed}", {"solver.base_lr": lr, "seed": seed}, 6,
                            ap + 0.02, ap, "finished", {}, ap, name))  # fmt: skip
    search = {"solver.base_lr": {"loguniform": [0.0005, 0.005]}, "seed": {"grid": [0, 1, 2]}}
    paths = write_results(rows, tmp_path, "sweep t: COCO AP per trial", {}, search, "segm_AP")
    md = paths["md"].read_text()
    assert md.startswith("Per row over up to 3 seeds")
    assert "| b | segm AP | 3/3 | 21.0 ± 1.0 |" in md and "| a-s2 |" in md.split("Per trial")[1]
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths["search"] == tmp_path / "search.png" and paths["search"].stat().st_size > 10_000
    assert "row" in paths["csv"].read_text().splitlines()[0]
    # Without repeats there are no statistics, and without searched keys no search picture.
    single = write_results(rows[:2], tmp_path / "one", "t", {})
    assert single["md"].read_text().startswith("| trial |") and "search" not in single
