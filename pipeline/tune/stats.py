"""A sweep's rows over repeated seeds: mean, standard deviation, 95% interval, and whether each
row differs from the first (the baseline) by Welch's t-test.

A row is the trials of one variant / drawn configuration (`Trial.group`); only its finished
trials count (an early-stopped or failed trial has no final score). The interval is the mean's
two-sided 95% interval from Student's t with n-1 degrees of freedom; the test is Welch's
unequal-variance t-test of the row against the baseline row, two-sided, significant at
p < 0.05. Any of them needs at least two runs on each side: with fewer the table says "n/a".
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from scipy import stats

ALPHA = 0.05  # two-sided significance level of the test and 1 - the interval's coverage
METRICS = ("segm_AP", "bbox_AP")


@dataclass(frozen=True)
class Summary:
    """One row's scores (as fractions, COCOeval's) over its finished seeds."""

    row: str
    runs: int  # trials of the row
    values: tuple[float, ...]  # finished trials' scores
    paper: float | None = None  # the paper's number for the row (percent), if any

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else math.nan

    @property
    def sd(self) -> float:
        return statistics.stdev(self.values) if self.n > 1 else math.nan

    @property
    def half_width(self) -> float:
        """Half the 95% interval of the mean: t(0.975, n-1) x sd / sqrt(n)."""
        if self.n < 2:
            return math.nan
        return float(stats.t.ppf(1 - ALPHA / 2, self.n - 1)) * self.sd / math.sqrt(self.n)


@dataclass(frozen=True)
class Comparison:
    """A row against the baseline row."""

    diff: float  # mean - baseline mean (fraction)
    p: float  # Welch's two-sided p-value; NaN: not testable (n < 2 on a side, no variance)
    paper_diff: float | None = None  # the paper's row - baseline (percent), if both given

    @property
    def significant(self) -> bool | None:
        return None if math.isnan(self.p) else self.p < ALPHA


@dataclass(frozen=True)
class RowStats:
    """A row's summary per metric and its comparison with the baseline (None for the baseline)."""

    row: str
    summaries: dict[str, Summary] = field(default_factory=dict)
    comparisons: dict[str, Comparison | None] = field(default_factory=dict)


def welch_p(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Welch's two-sided p-value, NaN with fewer than 2 values on a side or no variance."""
    if len(a) < 2 or len(b) < 2 or (statistics.pvariance(a) == 0 and statistics.pvariance(b) == 0):
        return math.nan
    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def row_stats(scores: list[tuple[str, str, dict[str, float], dict[str, float]]]) -> list[RowStats]:
    """Rows in first-seen order, each compared with the first.

    Args:
        scores: one (row, status, {metric: score}, the paper's {metric: percent}) a trial.
    """
    order: dict[str, list[tuple[str, dict[str, float], dict[str, float]]]] = {}
    for row, status, values, paper in scores:
        order.setdefault(row, []).append((status, values, paper))
    out: list[RowStats] = []
    for row, trials in order.items():
        summaries = {}
        for m in METRICS:
            kept = tuple(
                v[m] for s, v, _ in trials if s == "finished" and math.isfinite(v.get(m, math.nan))
            )
            summaries[m] = Summary(row, len(trials), kept, trials[0][2].get(m))
        out.append(RowStats(row, summaries, {}))
    if not out:
        return out
    base = out[0].summaries
    for r in out[1:]:
        for m in METRICS:
            s, b = r.summaries[m], base[m]
            paper = None if s.paper is None or b.paper is None else s.paper - b.paper
            r.comparisons[m] = Comparison(s.mean - b.mean, welch_p(s.values, b.values), paper)
    return out


def _pct(x: float, sign: bool = False) -> str:
    return "n/a" if not math.isfinite(x) else f"{100 * x:{'+' if sign else ''}.1f}"


def _test(c: Comparison | None) -> str:
    if c is None:
        return "baseline"
    if c.significant is None:
        return "n/a"
    return f"p={c.p:.3f} {'yes' if c.significant else 'no'}"


def _paper_gap(c: Comparison | None) -> str:
    """The paper's gap to its baseline row, and whether our runs support it."""
    if c is None or c.paper_diff is None:
        return ""
    verdict = "n/a"
    if c.significant is not None:
        same = (c.diff > 0) == (c.paper_diff > 0)
        verdict = "not significant" if not c.significant else "supported" if same else "opposite"
    return f"{c.paper_diff:+.1f}: {verdict}"


def to_markdown(rows: list[RowStats]) -> str:
    """Per row and metric: n, mean ± sd, 95% interval, the difference to the first row with
    Welch's test, the paper's difference and whether ours supports it (AP in %)."""
    head = "| row | metric | n | mean ± sd | 95% interval | Δ to first | Welch p < 0.05 | paper Δ |"
    lines = [head, "|---|---|---:|---:|---:|---:|---|---|"]
    for r in rows:
        for m in METRICS:
            s, c = r.summaries[m], r.comparisons.get(m)
            sd = f"{_pct(s.mean)} ± {_pct(s.sd)}" if s.n > 1 else _pct(s.mean)
            lo, hi = s.mean - s.half_width, s.mean + s.half_width
            ci = f"{_pct(lo)} – {_pct(hi)}" if s.n > 1 else "n/a"
            diff = "" if c is None else _pct(c.diff, sign=True)
            name = m.replace("_AP", " AP")
            cells = [r.row, name, f"{s.n}/{s.runs}", sd, ci, diff, _test(c), _paper_gap(c)]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
