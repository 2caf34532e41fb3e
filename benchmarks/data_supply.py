"""Can one CPU of decoding keep a training worker fed? Decode + augment against a train step.

Decode + augment on one CPU (`augment_table`, 16 records a call as in `map_batches`, one thread,
no Ray) side by side with the train step it must feed: `tiny` (batch 2 at the demo's 192..256 px
MST, 1 thread) and the R-50 `panet` preset (batch 2 at 512 and 800 px short side, 2 threads), on
synthetic COCO sets converted in a temp dir (removed at the end). Augment chunks and train steps
alternate, and each step is compared with the mean of the chunks just before and after it: the
machine is shared, so only ratios measured side by side mean much. supply ratio = decode
images/s on ONE CPU / images/s one training worker consumes (goal: >= 3).

    python benchmarks/data_supply.py [--quick] [--r50-steps N]

--quick: smaller sets and no R-50 train step (one takes 30 s to 2 min here, depending on the
load; `--r50-steps 1` adds a cold one). The full run: one warm-up and two timed R-50 steps. The
last line is one JSON object with the figures and ratios.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from data_bench import (  # benchmarks/ is on sys.path when run as a script
    GOAL,
    NODE_DECODE_CPUS,
    Records,
    Settings,
    SideBySide,
    converted_sets,
    figures,
    fmt_opt,
    log,
    main,
    rounded,
    run_r50,
    run_tiny,
)

QUICK_HELP = "small sets, no R-50 step"
# The JSON figures of each model's side-by-side run: property -> digits.
MODEL_FIGURES = {
    "tiny": {"aug_rate": 1, "aug_cpu_rate": 1, "step_s": 3, "train_rate": 3, "supply": 2},
    "r50": {"aug_rate": 2, "aug_cpu_rate": 2, "step_s": 2, "train_rate": 4, "supply": 1},
}
# ... under the names they have always had in the JSON: `{model}` is "tiny" or "r50".
FIGURE_NAMES = {
    "aug_rate": "aug_{model}_images_per_s_per_cpu",
    "aug_cpu_rate": "aug_{model}_images_per_cpu_s",
    "step_s": "{model}_train_s_per_step",
    "train_rate": "{model}_train_images_per_s",
    "supply": "supply_ratio_vs_{model}",
}


def print_supply(
    tiny: SideBySide, r50: SideBySide, r50_sizes: list[tuple[int, int]], s: Settings
) -> None:
    print(
        "\nDecode + augment on ONE CPU (augment_table, no Ray) vs what one training worker "
        "consumes, side by side"
    )
    header = (
        f"{'model':<6}{'augmentation':<31}{'aug img/s':>10}{'img/CPU-s':>10}"
        f"{'train s/step':>13}{'train img/s':>12}{'supply':>9}{'node':>9}"
    )
    print(header)
    print("-" * len(header))
    for name, label, x, node in (
        ("tiny", "MST 192..256, max 400", tiny, NODE_DECODE_CPUS["tiny"]),
        ("R-50", "paper MST 400..1200, max 1400", r50, NODE_DECODE_CPUS["r50"]),
    ):
        supply = x.supply
        node_supply = None if supply is None else supply * node
        print(
            f"{name:<6}{label:<31}{x.aug_rate:>10.1f}{x.aug_cpu_rate:>10.1f}"
            f"{fmt_opt(x.step_s, '.2f', 13)}{fmt_opt(x.train_rate, '.3f', 12)}"
            f"{fmt_opt(supply, '.1f', 9, 'x')}{fmt_opt(node_supply, '.1f', 9, 'x')}"
        )
    n_r50 = sum(len(st) for st in r50.steps)
    r50_note = (
        f"{n_r50} timed step(s) after {s.r50_warmup} warm-up"
        if n_r50
        else "no train step in this run (--r50-steps N adds N)"
    )
    print(
        f"tiny: preset 'tiny', batch 2, 1 thread, {len(tiny.steps)} rounds x {s.tiny_steps} steps "
        f"after 1 warm-up; supply in CPU time (both single-threaded): "
        f"{fmt_opt(tiny.supply_cpu, '.1f', 0, 'x')}\n"
        f"R-50: preset 'panet', batch 2 at {r50_sizes[0][0]}x{r50_sizes[0][1]} and "
        f"{r50_sizes[1][0]}x{r50_sizes[1][1]} px, 2 threads, {r50_note}; decode of 640..1024 px "
        "images\n"
        "supply = decode img/s on one CPU / train img/s of one worker; per round (the steps vs "
        f"the two chunks around them), median; goal >= {GOAL:g}x\n"
        f"node = supply x the CPUs a node gives the pipeline per training worker (assumed: tiny "
        f"{NODE_DECODE_CPUS['tiny']}; R-50 {NODE_DECODE_CPUS['r50']} = coco_panet_r50.yaml "
        "cpus_per_worker 6, minus 1 for the train loop)"
    )


def side_by_side_figures(model: str, x: SideBySide) -> dict[str, Any]:
    values = {name: getattr(x, name) for name in MODEL_FIGURES[model]}
    named = {FIGURE_NAMES[k].format(model=model): v for k, v in values.items()}
    digits = {FIGURE_NAMES[k].format(model=model): d for k, d in MODEL_FIGURES[model].items()}
    return figures("", named, digits)


def run(tmp: Path, s: Settings) -> dict[str, Any]:
    (_, small_dir), (_, large_dir) = converted_sets(tmp, s)
    log("tiny: augment chunks and train steps, side by side ...")
    tiny = run_tiny(Records(small_dir), s)
    log("R-50: augment chunks and train steps, side by side ...")
    r50, r50_sizes = run_r50(Records(large_dir), s)
    print_supply(tiny, r50, r50_sizes, s)
    r50_node = None if r50.supply is None else r50.supply * NODE_DECODE_CPUS["r50"]
    return {
        "cpus": os.cpu_count() or 1,
        **side_by_side_figures("tiny", tiny),
        **side_by_side_figures("r50", r50),
        "r50_train_steps": sum(len(st) for st in r50.steps),
        "r50_train_warmup_steps": s.r50_warmup if r50.steps else 0,
        "r50_train_image_sizes": r50_sizes,
        "supply_ratio_vs_tiny_cpu_time": rounded(tiny.supply_cpu, 2),
        "supply_ratio_vs_r50_node": rounded(r50_node, 1),
        "node_decode_cpus_per_worker": NODE_DECODE_CPUS,
        "supply_goal": GOAL,
        "meets_goal_tiny": tiny.supply is not None and tiny.supply >= GOAL,
        "meets_goal_r50": None if r50.supply is None else r50.supply >= GOAL,
    }


if __name__ == "__main__":
    main(__doc__, QUICK_HELP, run)
