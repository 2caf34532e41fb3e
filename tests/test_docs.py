"""The documentation keeps to the code: README.md and docs/*.md are checked as a user reads them.

In their shell code blocks every `panet ...` command parses with the real `panet` parser (the
sub-command exists, every flag exists, required arguments are there; in-process, no
subprocess), `--set` keys and values load into the job config, `--config` names a shipped
config, every `make X` is a Makefile target, and every `python benchmarks/X.py --flag` names a
script with that flag. The `panet` commands are checked, and the README's dry runs run, from a
directory outside the checkout, as a user of the installed package types them. Every relative
link and image path resolves, and a `#fragment` names a heading.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHELL_LANGS = {"bash", "sh", "shell", "console"}  # output blocks are ```text
FENCE = re.compile(r"^ {0,3}```([\w+-]*)[^\n]*\n(.*?)^ {0,3}```", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REF_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)
IMG_SRC = re.compile(r"<img\b[^>]*\bsrc=\"([^\"]+)\"")
HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", re.M)
SEPARATORS = {"&&", "||", ";", "|", "&"}
# Placeholder keys for a `panet train` without --config: the data paths are only checked for
# existence by the run itself, not by loading the config.
NO_CONFIG_DATA = {"data.train": "shards/train", "data.val": "shards/val"}


README = REPO / "README.md"


def doc_files() -> list[Path]:
    return [README, *sorted((REPO / "docs").rglob("*.md"))]


def shell_commands(text: str) -> list[list[str]]:
    """Every command of the shell code blocks, as argv lists (continuations joined)."""
    out = []
    for lang, body in FENCE.findall(text):
        if lang.lower() not in SHELL_LANGS:
            continue
        for line in body.replace("\\\n", " ").splitlines():
            line = line.strip().removeprefix("$ ")
            if not line:
                continue
            lex = shlex.shlex(line, posix=True, punctuation_chars=";&|")
            lex.whitespace_split = True
            lex.commenters = "#"
            command: list[str] = []
            for token in lex:
                if token in SEPARATORS:
                    out.append(command)
                    command = []
                else:
                    command.append(token)
            out.append(command)
    return [c for c in out if c]


def entry_point(argv: list[str]) -> tuple[str, list[str]] | None:
    """("panet" | "demo" | "make" | "bench", the arguments after it), or None for other tools.

    Found anywhere in the command, so `ray job submit ... -- python -m pipeline.cli train ...`
    is checked too.
    """
    for i, token in enumerate(argv):
        rest = argv[i + 1 :]
        base = token.rsplit("/", 1)[-1]
        if token == "panet" or token.endswith("/bin/panet"):
            return "panet", rest
        if base.startswith("python") and rest[:2] == ["-m", "pipeline.cli"]:
            return "panet", rest[2:]
        if base.startswith("python") and rest[:2] == ["-m", "pipeline.demo"]:
            return "demo", rest[2:]
        if base.startswith("python") and rest and rest[0].startswith("benchmarks/"):
            return "bench", rest
        if i == 0 and token == "make":
            return "make", rest
    return None


def _parse(parser: argparse.ArgumentParser, args: list[str]) -> tuple[object, str]:
    """parse_args in-process: (namespace or the exit code, what argparse printed)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            return parser.parse_args(args), ""
        except SystemExit as exit_info:
            return exit_info.code, err.getvalue()


def _subcommands(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    return next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)


def subcommand_path(parser: argparse.ArgumentParser, args: list[str]) -> list[str]:
    """The leading arguments that name (nested) sub-commands, e.g. ["data", "convert", "coco"]."""
    path = []
    for arg in args:
        sub = _subcommands(parser)
        if sub is None or arg not in sub.choices:
            break
        path.append(arg)
        parser = sub.choices[arg]
    return path


def all_subcommand_paths(parser: argparse.ArgumentParser, prefix=()) -> list[list[str]]:
    sub = _subcommands(parser)
    if sub is None:
        return [list(prefix)]
    paths = [list(prefix)] if prefix else []
    for name, child in sub.choices.items():
        paths += all_subcommand_paths(child, (*prefix, name))
    return paths


def _job_config_problem(config: str | None, sets: list[str]) -> str | None:
    from pipeline.config import load_job_config, parse_set

    try:
        overrides = parse_set(sets)
        base = {} if config is not None else dict(NO_CONFIG_DATA)
        load_job_config(config, {**base, **overrides})
    except ValueError as err:
        return str(err)
    return None


def _sweep_problem(sweep: str, config: str | None) -> str | None:
    from pipeline.config import resolve_config
    from pipeline.tune.sweep import find_sweep

    try:
        find_sweep(sweep)
        if config is not None:
            resolve_config(config)
    except ValueError as err:
        return str(err)
    return None


def check_panet(args: list[str]) -> str | None:
    from pipeline.cli import build_parser

    parser = build_parser()
    parsed, err = _parse(parser, args)
    if isinstance(parsed, argparse.Namespace):
        command = getattr(parsed, "command", None)
        if command == "train":
            return _job_config_problem(parsed.config, parsed.set)
        if command == "tune":
            return _sweep_problem(parsed.sweep, parsed.config)
        if command == "eval" and getattr(parsed, "set", None):  # a trained model's keys only
            not_model = [s for s in parsed.set if not s.startswith("model.")]
            return (
                f"eval --set takes model.* keys, not {not_model}"
                if not_model
                else (_job_config_problem(None, parsed.set))
            )
        return None
    if parsed == 0 and ("--help" in args or "-h" in args):
        return None
    return f"does not parse: {err.strip().splitlines()[-1] if err.strip() else parsed}"


def check_demo(args: list[str]) -> str | None:
    from pipeline.demo import CONFIG

    sets = args[1::2]
    if args[0::2] != ["--set"] * len(sets):
        return "python -m pipeline.demo takes only --set KEY=VALUE pairs"
    return _job_config_problem(str(CONFIG), sets)


def make_targets() -> set[str]:
    text = (REPO / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z][\w.-]*)\s*:(?!=)", text, re.M))


def check_make(args: list[str]) -> str | None:
    missing = [a for a in args if "=" not in a and not a.startswith("-")]
    missing = [a for a in missing if a not in make_targets()]
    return f"no Makefile target {missing}" if missing else None


def check_bench(args: list[str]) -> str | None:
    script = REPO / args[0]
    if not script.is_file():
        return f"{args[0]} does not exist"
    source = script.read_text()
    flags = [a.split("=", 1)[0] for a in args[1:] if a.startswith("--")]
    unknown = [f for f in flags if f'"{f}"' not in source]
    return f"{args[0]} has no option {unknown}" if unknown else None


CHECKS = {"panet": check_panet, "demo": check_demo, "make": check_make, "bench": check_bench}


def command_problems(text: str) -> list[str]:
    problems = []
    for argv in shell_commands(text):
        found = entry_point(argv)
        if found is None:
            continue
        kind, args = found
        if not args and kind in ("panet", "bench"):
            continue
        problem = CHECKS[kind](args)
        if problem:
            problems.append(f"`{shlex.join(argv)}`: {problem}")
    return problems


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in HEADING.findall(FENCE.sub("", text)):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def link_problems(text: str, path: Path) -> list[str]:
    """Relative links and image paths of a markdown file that do not resolve."""
    prose = INLINE_CODE.sub("", FENCE.sub("", text))
    targets = LINK.findall(prose) + REF_LINK.findall(prose) + IMG_SRC.findall(prose)
    problems = []
    for target in targets:
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        file_part, _, fragment = target.partition("#")
        if not file_part:  # a heading of this file
            if fragment not in anchors(text):
                problems.append(f"{path.name}: link {target!r}: no heading #{fragment}")
            continue
        resolved = (path.parent / file_part).resolve()
        if not resolved.exists():
            problems.append(f"{path.name}: link {target!r} -> {resolved} does not exist")
        elif (
            fragment and resolved.suffix == ".md" and fragment not in anchors(resolved.read_text())
        ):
            problems.append(f"{path.name}: link {target!r}: no heading #{fragment}")
    return problems


# ---------------------------------------------------------------------------------------------
# The real documentation


@pytest.fixture
def elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory outside the checkout: a config path of the checkout resolves no more."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_commands_exist(doc: Path, elsewhere: Path) -> None:
    assert command_problems(doc.read_text()) == []


def test_the_readme_dry_runs_run_outside_the_checkout(elsewhere: Path, capsys) -> None:
    """Every `panet ... --dry-run` of the README that needs no data of its own runs as printed."""
    from pipeline.cli import main

    dry_runs = [
        args
        for kind, args in filter(None, map(entry_point, shell_commands(README.read_text())))
        if kind == "panet" and "--dry-run" in args and args[0] == "tune"
    ]
    assert dry_runs, "the README shows a sweep's dry run"
    for args in dry_runs:
        code = main(args)
        out = capsys.readouterr()
        assert code == 0, f"panet {shlex.join(args)}: {out.err}"
        assert "trial(s)" in out.out
    assert list(elsewhere.iterdir()) == []  # a dry run writes nothing


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_links_resolve(doc: Path) -> None:
    assert link_problems(doc.read_text(), doc) == []


JOB_SECTIONS = ("data", "solver", "scaling", "checkpoint", "eval", "tracking", "ray")
NOT_KEYS = ("ray.data", "ray.train", "ray.tune", "ray.init")  # Ray's modules, not config keys
DOTTED = re.compile(r"^\.?[a-z_][a-z0-9_]*(\.[a-z0-9_]+)+$")


def config_key_problems(text: str) -> list[str]:
    """Inline `section.key` spans (also `key=value`, `key: value`) that are no config key.

    Model keys may be written with or without `model.` (the switches table omits it).
    """
    from pipeline.config import JobConfig

    keys = set(JobConfig().flat()) | {"model.preset"}
    model_sections = {k.split(".")[1] for k in keys if k.startswith("model.")}
    problems = []
    for span in INLINE_CODE.findall(FENCE.sub("", text)):
        word = re.split(r"[=:\s]", span.strip("`"), maxsplit=1)[0]
        if not DOTTED.match(word) or word.startswith(NOT_KEYS):
            continue
        first = word.split(".")[0]
        if first == "model" or first in JOB_SECTIONS:
            key = word
        elif first in model_sections:
            key = f"model.{word}"
        else:
            continue
        if key not in keys:
            problems.append(f"`{span.strip('`')}`: no config key {key!r}")
    return problems


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_config_keys_exist(doc: Path) -> None:
    assert config_key_problems(doc.read_text()) == []


def test_readme_names_commands() -> None:
    """The checks above see the README's commands (a parsing slip would make them vacuous)."""
    found = [entry_point(c) for c in shell_commands(README.read_text())]
    kinds = {f[0] for f in found if f is not None}
    assert {"panet", "make"} <= kinds


def test_every_subcommand_has_help() -> None:
    from pipeline.cli import build_parser

    paths = all_subcommand_paths(build_parser())
    assert ["train"] in paths and ["data", "convert", "coco"] in paths
    for path in paths:
        code, _ = _parse(build_parser(), [*path, "--help"])
        assert code == 0, f"panet {' '.join(path)} --help exited with {code}"


def test_readme_evaluates_a_checkpoint_the_demo_writes() -> None:
    """`--checkpoint demo/runs/tiny-synth/step-N`: N is a step the demo checkpoints at."""
    import yaml

    from pipeline.demo import CONFIG

    raw = yaml.safe_load(CONFIG.read_text())
    last, every = raw["solver"]["max_steps"], raw["checkpoint"]["every_steps"]
    job_dir = f"{raw['checkpoint']['storage_path']}/{raw['name']}/"
    written = {f"{job_dir}step-{s:08d}" for s in [*range(every, last + 1, every), last]}
    named = [
        c[c.index("--checkpoint") + 1].rstrip("/")
        for c in shell_commands(README.read_text())
        if "--checkpoint" in c[:-1]
    ]
    assert any(n.startswith(job_dir) for n in named), "the README evaluates the demo's model"
    assert [n for n in named if n.startswith(job_dir) and n not in written] == []


# ---------------------------------------------------------------------------------------------
# The checks themselves find what they are for


def _block(*lines: str) -> str:
    return "```bash\n" + "\n".join(lines) + "\n```\n"


def test_a_wrong_flag_is_found(elsewhere: Path) -> None:
    good = "panet data inspect demo/shards/train --verify"
    assert command_problems(_block(good)) == []
    problems = command_problems(_block("panet data inspect demo/shards/train --verfy"))
    assert len(problems) == 1 and "--verfy" in problems[0]
    assert command_problems(_block("panet data convert mvd --root x --out y"))  # no --split
    assert command_problems(_block("panet evaluate --checkpoint x"))  # no such sub-command


def test_a_bad_set_key_or_value_is_found(elsewhere: Path) -> None:
    cmd = "panet train --config tiny_synth --set {}"
    assert command_problems(_block(cmd.format("model.afp.fusion=sum"))) == []
    (problem,) = command_problems(_block(cmd.format("model.afp.fuson=sum")))
    assert "model.afp.fuson" in problem
    assert command_problems(_block(cmd.format("model.afp.fusion=mean")))
    assert command_problems(_block("python -m pipeline.demo --set solver.max_step=650"))
    assert command_problems(_block("panet train --set scaling.num_worker=2"))
    ev = "panet eval --checkpoint x --data y --set {}"
    assert command_problems(_block(ev.format("model.test.flip=true"))) == []
    assert command_problems(_block(ev.format("model.test.flipp=true")))
    assert command_problems(_block(ev.format("solver.base_lr=0.1")))


def test_a_stale_config_key_in_prose_is_found() -> None:
    good = "Set `solver.amp: bf16`, `model.backbone.frozen_bn_eps=0.0` or `afp.fusion`; `ray.data`."
    assert config_key_problems(good) == []
    (problem,) = config_key_problems(good + " `data.decode_tasks`")
    assert "data.decode_tasks" in problem
    assert config_key_problems("`box_head.kind`")  # a model key without `model.`


def test_a_missing_config_target_or_script_is_found(elsewhere: Path) -> None:
    assert command_problems(_block("panet train --config nope"))
    # A path into the checkout is no config outside it: the README names shipped configs.
    (problem,) = command_problems(_block("panet train --config jobs/configs/tiny_synth.yaml"))
    assert "tiny_synth" in problem and "does not exist" in problem
    assert command_problems(_block("panet tune --sweep table3 --config coco_panet_r50")) == []
    assert command_problems(_block("panet tune --sweep jobs/sweeps/table3.yaml"))
    assert command_problems(_block("panet tune --sweep table3 --config coco"))
    assert command_problems(_block("make demo && make bench")) == []
    assert command_problems(_block("make deploy"))
    assert command_problems(_block("python benchmarks/roi_align.py --reps 3")) == []
    assert command_problems(_block("python benchmarks/roi_align.py --repeats 3"))
    assert command_problems(_block("python benchmarks/nope.py"))


def test_continuations_comments_and_chains_are_read(elsewhere: Path) -> None:
    text = _block(
        "panet data inspect demo/shards/train \\",
        "    --verify  # a comment --nope",
        "cd x && panet train --dry-run --set solver.max_steps=abc",
    )
    (problem,) = command_problems(text)
    assert "solver.max_steps" in problem
    text = _block("ray job submit -- python -m pipeline.cli train --bogus")
    assert command_problems(text)


def test_a_dead_link_or_anchor_is_found(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(b"")
    (tmp_path / "other.md").write_text("# Other\n\n## Running on a cluster\n")
    doc = tmp_path / "doc.md"
    good = (
        "# Top\n![pic](images/a.png) [o](other.md#running-on-a-cluster) [t](#top) "
        '[w](https://example.com/x) <img src="images/a.png">\n'
    )
    assert link_problems(good, doc) == []
    for bad in (
        "[x](missing.md)",
        "![x](images/b.png)",
        "[x](other.md#nowhere)",
        "[x](#nowhere)",
        '<img src="images/c.png">',
    ):
        assert len(link_problems(good + bad, doc)) == 1, bad
    assert link_problems("`[x](missing.md)`\n```\n[x](missing.md)\n```\n", doc) == []


# ---------------------------------------------------------------------------------------------
# The README's picture can be re-made


def _make_images_module():  # noqa: ANN202
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_images", REPO / "docs" / "make_images.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_picture_renders_from_a_checkpoint(tmp_path: Path) -> None:
    import numpy as np
    import torch
    from PIL import Image

    from panet_model import build_panet
    from pipeline.config import load_job_config
    from pipeline.data.convert_coco import convert_coco
    from pipeline.data.manifest import load_manifest
    from pipeline.data.synth import write_synthetic
    from pipeline.demo import CONFIG
    from pipeline.state_file import save_state
    from pipeline.tracking.pictures import prediction_figure_size

    write_synthetic("coco", 1, 0, tmp_path / "raw", split="train")
    shards = tmp_path / "shards"
    convert_coco(
        tmp_path / "raw/annotations/instances_train.json",
        tmp_path / "raw/images/train",
        shards,
        workers=1,
        progress=False,
    )
    categories = {c["id"]: c["name"] for c in load_manifest(shards)["categories"]}
    sets = {"data.train": str(shards), "data.val": str(shards), "model.roi.detections_per_img": 5}
    job = load_job_config(CONFIG, sets)  # few detections: an untrained model's masks are slow
    torch.manual_seed(0)
    model = build_panet(job.model, num_classes=len(categories) + 1)
    step = tmp_path / "job" / "step-00000002"
    step.mkdir(parents=True)
    save_state(
        step,
        model=model.state_dict(),
        num_classes=len(categories) + 1,
        categories=categories,
        config=job.to_dict(),
    )
    images = _make_images_module()
    out = tmp_path / "picture.png"
    args = ["--checkpoint", str(tmp_path / "job"), "--data", str(shards), "--out", str(out)]
    assert images.main([*args, "--images", "1"]) == 0  # a job directory: its latest step
    samples = [np.zeros((int(r["height"]), int(r["width"]), 3)) for r in _rows(shards)]
    with Image.open(out) as picture:
        assert picture.size == prediction_figure_size(samples, images.PANEL_WIDTH)
        assert picture.mode == "P"  # stored with a palette
    assert images.main([*args[:1], str(tmp_path / "nothing"), *args[2:]]) == 2


def _rows(shards: Path) -> list[dict]:
    from pipeline.data.manifest import iter_records

    return list(iter_records(shards))
