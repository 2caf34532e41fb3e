"""Security: no secret in the repository, checkpoints loaded without pickle, servers bound to
localhost unless configured, logins on."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# Credentials in a recognisable format, wherever they appear.
TOKEN_PATTERNS = {
    "private key": re.compile(r"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----"),
    "AWS access key id": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,}\b"),
    "Slack token": re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"),
    "URL with a password": re.compile(r"[a-z+]+://[^/\s:@$]+:[^/\s:@$]{3,}@"),
}
# `password: hunter22`, `RAY_AUTH_TOKEN=abc...` in configuration files: a literal value where
# a reference (${VAR}, $VAR, a secretKeyRef) belongs.
SECRET_KEY = re.compile(
    r"""(?ix)^[\s\-]*["']?([A-Z0-9_.-]*(?:password|passwd|secret|token|api_key|access_key|
    secret_key)[A-Z0-9_.-]*)["']?\s*[:=]\s*["']?([^\s"'#]*)"""
)
# Kubernetes fields whose value names a Secret object: a reference, not a secret.
REFERENCE_KEYS = {"secretName"}
CONFIG_SUFFIXES = {".yaml", ".yml", ".ini", ".env", ".toml", ".json", ".cfg", ".conf", ".example"}


def literal_secret(value: str) -> bool:
    """A value that is itself a secret rather than a reference to one, or nothing."""
    if not value or value.startswith(("$", "{", "<")) or value in ("null", "~", "true", "false"):
        return False
    return len(value) >= 6


def secrets_in(path: Path, text: str) -> list[str]:
    """`file:line: what` for each credential-looking string in `text`."""
    found = []
    config = path.suffix in CONFIG_SUFFIXES or path.name.startswith((".env", "Dockerfile"))
    for n, line in enumerate(text.splitlines(), 1):
        for what, pattern in TOKEN_PATTERNS.items():
            if pattern.search(line):
                found.append(f"{path}:{n}: {what}")
        m = SECRET_KEY.match(line) if config else None
        if m and m.group(1) not in REFERENCE_KEYS and literal_secret(m.group(2)):
            found.append(f"{path}:{n}: a literal value for {m.group(1)}")
    return found


def tracked_files() -> list[Path]:
    out = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout.decode()
    return [REPO / name for name in out.split("\0") if name]


def test_no_secret_in_tracked_files() -> None:
    files = tracked_files()
    assert any(p.name == "raycluster.yaml" for p in files)  # the scan sees infra/
    found = []
    for path in files:
        if not path.is_file() or path == Path(__file__):
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue  # binary
        found += secrets_in(path.relative_to(REPO), text)
    assert found == []


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("infra/x.yaml", "          value: -----BEGIN RSA PRIVATE KEY-----"),
        ("README.md", "export AWS_ACCESS_KEY_ID=AKIAIOSFODNN7EXAMPLE"),
        ("notes.md", "GITHUB_TOKEN=ghp_" + "a1B2" * 9),
        ("infra/k8s/mlflow.yaml", "  --backend-store-uri postgresql://mlflow:hunter22@db/mlflow"),
        ("infra/docker/compose.yaml", "      POSTGRES_PASSWORD: hunter22"),
        ("infra/launcher/panet.env.example", "MLFLOW_TRACKING_PASSWORD=hunter22"),
        ("infra/k8s/ray/config.yaml", '  RAY_AUTH_TOKEN: "7c1e2f0a9b8d4e6f8a7b6c5d4e3f2a1b"'),
    ],
)
def test_the_scan_finds_a_planted_secret(name: str, text: str) -> None:
    assert secrets_in(Path(name), text), text


def test_references_to_secrets_are_not_secrets() -> None:
    for name, line in (
        ("c.yaml", "      POSTGRES_PASSWORD: ${POSTGRES_PASSWORD:?set it in .env}"),
        ("c.yaml", '  --backend-store-uri "postgresql://mlflow:$POSTGRES_PASSWORD@pg/mlflow"'),
        ("p.env.example", "MLFLOW_TRACKING_PASSWORD="),
        ("c.yaml", "  RAY_AUTH_MODE: token  # the token itself: Secret panet-ray-token"),
    ):
        assert secrets_in(Path(name), line) == [], line


# ------------------------------------------------------------------------------------------
# Checkpoints


def torch_load_calls() -> list[tuple[str, ast.Call]]:
    calls = []
    for path in tracked_files():
        rel = path.relative_to(REPO)
        if path.suffix != ".py" or rel.parts[0] not in ("pipeline", "panet_model", "jobs"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "load"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "torch"
            ):
                calls.append((f"{rel}:{node.lineno}", node))
    return calls


def test_every_torch_load_is_weights_only() -> None:
    calls = torch_load_calls()
    assert calls  # the checkpoint loader at least
    for where, call in calls:
        kw = {k.arg: k.value for k in call.keywords}
        assert "weights_only" in kw, where
        assert isinstance(kw["weights_only"], ast.Constant) and kw["weights_only"].value is True


class Payload:
    """Runs code when unpickled, the way a tampered checkpoint would."""

    ran = False

    def __reduce__(self):
        return (exec, ("Payload.ran = True",))


def test_a_checkpoint_with_code_in_it_is_refused(tmp_path) -> None:
    from pipeline.state_file import load_state

    path = tmp_path / "state.pt"
    torch.save({"model": {}, "step": 1, "extra": Payload()}, path)
    with pytest.raises(ValueError, match="cannot be read safely"):
        load_state(path)
    assert not Payload.ran


# ------------------------------------------------------------------------------------------
# Servers


def test_pipeline_never_opens_ray_or_mlflow_to_the_network() -> None:
    """Ray's dashboard/job server and MLflow bind to localhost by default; nothing in the
    package widens that (infra/ does it only behind a ClusterIP service with token auth)."""
    import inspect

    import ray

    assert inspect.signature(ray.init).parameters["dashboard_host"].default in (
        "127.0.0.1",
        "localhost",
    )
    for path in tracked_files():
        rel = path.relative_to(REPO)
        if path.suffix == ".py" and rel.parts[0] in ("pipeline", "panet_model", "jobs"):
            text = path.read_text()
            assert "0.0.0.0" not in text, rel
            for host in re.findall(r"""dashboard_host\s*=\s*["']([^"']*)["']""", text):
                assert host in ("127.0.0.1", "localhost"), (rel, host)
