"""The package's shape: no import cycle in pipeline/, no module over 500 lines, no long function,
imports at the top but where deferring one keeps `panet --help` light (or a reason is written).

The import graph is read from the source with `ast` (no module is imported): an edge A -> B for
every `import B` / `from B import x` in A, wherever it stands (inside functions too, since a
lazy import still ties the two modules together), except under `if TYPE_CHECKING:`. `from P
import m` counts as an edge to the module P.m when m is one. A package's `__init__` importing
its own submodules is the package's interface, not a cycle.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_LINES = 500
MAX_FUNCTION_LINES = 60
# Functions of pipeline/ over MAX_FUNCTION_LINES (docstring included), each with the reason it
# stays long; the same reason is written beside it in the code. A new one fails the test.
LONG_FUNCTIONS: dict[str, str] = {
    "pipeline.data.cli.add_parser": "one flat argparse block per sub-command, in --help order",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(root: str = "pipeline") -> dict[str, Path]:
    return {module_name(p): p for p in sorted((REPO / root).rglob("*.py"))}


def _type_checking_only(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def imports(path: Path, known: set[str], *, in_functions: bool = True) -> set[str]:
    """The modules of `known` that the module at `path` imports; when not `in_functions`, those
    that importing it runs: its top level only, a package's own modules included."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if not in_functions and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return
        if isinstance(node, ast.If) and _type_checking_only(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    found = {m for m in found if m in known and m != name}
    # A package's interface re-exports its own modules: no edge in the graph of cycles.
    if in_functions and path.name == "__init__.py":
        found = {m for m in found if not m.startswith(name + ".")}
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(path, set(mods)) for name, path in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return sorted(found)


def test_the_graph_sees_imports_of_every_kind() -> None:
    graph = import_graph()
    assert "pipeline.data.manifest" in graph["pipeline.data.reader"]  # at the top
    assert "pipeline.data.inspect" in graph["pipeline.data.cli"]  # inside a function
    assert "pipeline.tracking.store" in graph["pipeline.tracking.runs"]
    assert "pipeline.tracking" in graph["pipeline.tracking.samples"]  # `from pipeline import x`
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle() -> None:
    assert cycles(import_graph()) == []


def test_no_long_module() -> None:
    lines = {
        name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in modules().items()
    }
    assert {name: n for name, n in lines.items() if n > MAX_LINES} == {}


def long_functions(source: str, module: str) -> dict[str, int]:
    """`module.function` (or `module.Class.method`) -> lines, for those over MAX_FUNCTION_LINES."""
    found: dict[str, int] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}.{child.name}"
                n = child.end_lineno - child.lineno + 1
                if not isinstance(child, ast.ClassDef) and n > MAX_FUNCTION_LINES:
                    found[name] = n
                visit(child, name)

    visit(ast.parse(source), module)
    return found


def test_no_long_function_without_its_reason() -> None:
    found: dict[str, int] = {}
    for name, path in modules().items():
        found.update(long_functions(path.read_text(encoding="utf-8"), name))
    assert sorted(found) == sorted(LONG_FUNCTIONS), found
    body = "x = 1\n" * (MAX_FUNCTION_LINES - 1)
    method = "".join(" " * 8 + line for line in body.splitlines(True))
    function = "".join(" " * 4 + line for line in body.splitlines(True))
    probe = f"class C:\n    def ok(self):\n{method}\ndef f():\n{function}    return x\n"
    assert long_functions(probe, "m") == {"m.f": MAX_FUNCTION_LINES + 1}


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module `start` imports, directly or through others."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        for m in graph[todo.pop()] - seen:
            seen.add(m)
            todo.append(m)
    return seen


def test_panet_eval_and_prediction_reach_nothing_of_training() -> None:
    """`panet eval` and `panet predict` run a trained model: no module of pipeline/train/."""
    graph = import_graph()
    assert "pipeline.evaluate.job" in reachable(graph, "pipeline.evaluate.cli")
    for command in ("pipeline.evaluate.cli", "pipeline.predict.cli"):
        train = sorted(m for m in reachable(graph, command) if m.startswith("pipeline.train"))
        assert train == [], command
    assert reachable({"a": {"b"}, "b": {"c"}, "c": set()}, "a") == {"b", "c"}


def test_nothing_imports_the_command_registry() -> None:
    """`pipeline/cli.py` only lists the parts' sub-commands: a part, a job entrypoint or
    `panet submit`'s check builds its parser from the parts' own `add_parser`."""
    graph = import_graph()
    assert "pipeline.cli" in graph and "pipeline.train.cli" in graph["pipeline.cli"]
    importers = sorted(name for name, deps in graph.items() if "pipeline.cli" in deps)
    known = set(modules())
    entrypoints = sorted((REPO / "jobs").glob("*.py"))
    assert "pipeline.train.cli" in imports(REPO / "jobs" / "train.py", known)
    jobs = [p.name for p in entrypoints if "pipeline.cli" in imports(p, known)]
    assert importers == [] and jobs == []
    checked = reachable(graph, "pipeline.submit.check")
    parts = ("data", "train", "evaluate", "tune", "predict")
    assert {f"pipeline.{part}.cli" for part in parts} <= checked


# docs/design.md's "A switch's path": the files a model switch crosses from each command.
SWITCH_HEADING = "### A switch's path"
MAX_SWITCH_FILES = 4  # from the command's cli.py to the first file of panet_model, both counted


def switch_paths(text: str) -> dict[str, list[str]]:
    """{label: [file, ...]} of the section's list items (`panet eval`, inside the model)."""
    section = text.split(SWITCH_HEADING, 1)[1].split("\n#", 1)[0]
    items = re.split(r"^- ", section, flags=re.M)[1:]
    paths = {}
    for item in items:
        label, _, rest = item.partition(":")
        paths[label.strip("` ")] = re.findall(r"`([\w/]+\.py)`", rest)
    return paths


def test_a_switch_reaches_the_model_as_the_design_says() -> None:
    """Each command's path in docs/design.md: real files, each importing the next, the command's
    own cli.py first, at most MAX_SWITCH_FILES to panet_model, and the model's `if` at the end."""
    mods = {**modules("pipeline"), **modules("panet_model")}
    graph = {name: imports(path, set(mods)) for name, path in mods.items()}
    paths = switch_paths((REPO / "docs" / "design.md").read_text(encoding="utf-8"))
    commands = {label: files for label, files in paths.items() if label.startswith("panet ")}
    assert {label.split()[1] for label in commands} == {"train", "eval", "predict"}
    for label, files in paths.items():
        assert len(files) >= 2, label
        for file in files:
            assert (REPO / file).is_file(), f"{label}: {file}"
        for a, b in zip(files, files[1:]):
            importer, imported = module_name(REPO / a), module_name(REPO / b)
            # `from panet_model import build_panet`: the package's interface stands for its module
            package = imported.rpartition(".")[0]
            via_package = package in graph[importer] and f"from {imported} import" in (
                mods[package].read_text(encoding="utf-8")
            )
            assert imported in graph[importer] or via_package, f"{label}: {a} -> {b}"
    for label, files in commands.items():
        cli = REPO / files[0]
        assert cli.name == "cli.py" and f'"{label.split()[1]}"' in cli.read_text(), label
        first = next(i for i, f in enumerate(files) if f.startswith("panet_model/"))
        assert first + 1 <= MAX_SWITCH_FILES, label
        assert files[first] == paths["inside the model"][0], label
    assert "test.flip" in (REPO / paths["inside the model"][-1]).read_text()
    # Where the switch is typed and checked, as the paragraph says.
    assert "pipeline.config" in graph["pipeline.train.cli"]
    for reader in ("pipeline.evaluate.job", "pipeline.predict.predictor"):
        assert "pipeline.state_file" in graph[reader], reader


def test_the_design_notes_name_every_module() -> None:
    """docs/design.md's module map names each module of pipeline/ (a new one must be added)."""
    design = (REPO / "docs" / "design.md").read_text(encoding="utf-8")
    block = design.split("## Module map", 1)[1].split("```", 2)[1]
    named = set(re.findall(r"[a-z_]+", block))
    unnamed = [m for m in modules() if m.rpartition(".")[2] not in named]
    assert unnamed == [], f"docs/design.md's module map does not name {unnamed}"


# In-function imports. The modules `panet --help` loads (pipeline.cli and what it imports at the
# top, transitively) defer their heavy third-party imports, each with a "# deferred:" comment;
# every other module imports at the top, but for these, whose reason is written beside the import.
DEFERRING: dict[str, str] = {
    "pipeline.storage": "Ray, only to probe every node; the data tools use storage without Ray",
    "pipeline.ray_session": "Ray's private KubeRay modules, only on a KubeRay head",
}
HEAVY = ("torch", "ray", "pyarrow", "PIL", "mlflow", "pycocotools", "matplotlib")


def help_modules() -> set[str]:
    """pipeline.cli and the modules (with their packages) it imports at the top, transitively."""
    mods = modules()
    known = set(mods)
    seen: set[str] = set()
    todo = ["pipeline.cli"]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for m in imports(mods[name], known, in_functions=False):
            parts = m.split(".")
            todo += [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return seen & known


def function_imports(source: str, known: set[str]) -> list[str]:
    """The module of every import inside a function: `import a.b` -> a.b, `from a import b` -> a,
    or a.b when that is a module of `known`."""
    found = []
    for fn in ast.walk(ast.parse(source)):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom):
                    base = node.module or "."
                    subs = [f"{base}.{a.name}" for a in node.names]
                    found += [m for m in subs if m in known] or [base]
                elif isinstance(node, ast.Import):
                    found += [a.name for a in node.names]
    return found


def test_imports_are_at_the_top_unless_deferring_saves_something() -> None:
    """An in-function import only in a module `panet --help` loads or in DEFERRING, never of the
    standard library or of a module `panet --help` loads anyway, and its reason written."""
    light = help_modules()
    assert {"pipeline.config", "pipeline.train.cli", "pipeline.tracking"} <= light
    assert "pipeline.train.driver" not in light
    bad = []
    for name, path in modules().items():
        source = path.read_text(encoding="utf-8")
        inner = function_imports(source, set(modules()))
        if not inner:
            continue
        if name not in light and name not in DEFERRING:
            bad.append(f"{name}: {inner}")
        for m in inner:
            if m.split(".")[0] in sys.stdlib_module_names or m in light:
                bad.append(f"{name}: {m} saves nothing")
        if "# deferred:" not in source:
            bad.append(f"{name}: no '# deferred:' reason")
    assert bad == []
    probe = "import a\ndef f():\n    from b.c import d\n    from b import c\n    import e\n"
    assert function_imports(probe, {"b.c"}) == ["b.c", "b.c", "e"]


def test_panet_help_loads_no_heavy_dependency() -> None:
    """Building `panet`'s parser (every sub-command's) loads exactly `help_modules()` of pipeline/
    and none of HEAVY."""
    probe = (
        "import sys, pipeline.cli; pipeline.cli.build_parser(); "
        "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in ('pipeline', *h))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", f"h = {HEAVY!r}; {probe}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert [m for m in out if m.split(".")[0] in HEAVY] == []
    assert set(out) == help_modules()
