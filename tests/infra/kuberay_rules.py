"""The KubeRay operator's own spec rules, as far as they concern infra/k8s.

`kubectl apply` checks a RayCluster or RayJob only against the CRD schema. The operator then
runs its own checks when it reconciles the object, and when one fails it records a Warning
event and does nothing more: no pod starts, and a RayJob on that cluster waits for ever. These
functions port those checks from KubeRay v1.7.0 (tag v1.7.0 of ray-project/kuberay), file
ray-operator/controllers/ray/utils/validation.go unless another file is named; each rule cites
its function. Feature gates are taken at their v1.7.0 defaults (pkg/features/features.go).

Fields whose rules are not ported here (GCS fault tolerance, network policy, TLS, history
server, deletion strategy, sidecar submission) are refused outright, so a manifest that starts
using one fails here until its rules are added.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

KUBERAY = "KubeRay v1.7.0"
VALIDATION = "ray-operator/controllers/ray/utils/validation.go"

MAX_RAYCLUSTER_NAME = 53  # utils/constant.go MaxRayClusterNameLength
MAX_RAYJOB_NAME = MAX_RAYCLUSTER_NAME - 6  # utils/constant.go MaxRayJobNameLength
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")  # k8s.io/apimachinery IsDNS1035Label
QUALIFIED_NAME = re.compile(
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)  # IsQualifiedName
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")  # IsValidLabelValue

RAY_ENABLE_AUTOSCALER_V2 = "RAY_enable_autoscaler_v2"  # utils/constant.go
UNPORTED_CLUSTER_FIELDS = (
    "gcsFaultToleranceOptions",
    "networkPolicy",
    "tlsOptions",
    "historyServerOptions",
)
UNPORTED_JOB_FIELDS = ("deletionStrategy", "submitterConfig")


def _cite(function: str, file: str = VALIDATION) -> str:
    return f"[{KUBERAY} {file} {function}]"


def _version(text: str) -> tuple[int, ...] | None:
    """k8s.io/apimachinery version.ParseGeneric: `v`?, at least major.minor, digits only."""
    m = re.match(r"^\s*v?(\d+(?:\.\d+)+)", str(text))
    return tuple(int(p) for p in m[1].split(".")) if m else None


def _env(container: dict) -> dict[str, Any]:
    """A container's `env` by name (the operator reads only `env`, never `envFrom`)."""
    return {e["name"]: e.get("value") for e in container.get("env") or []}


def _containers(template: dict) -> list[dict]:
    return (template.get("spec") or {}).get("containers") or []


def _head_env(spec: dict) -> dict[str, Any]:
    containers = _containers(spec["headGroupSpec"].get("template") or {})
    return _env(containers[0]) if containers else {}


def autoscaling_enabled(spec: dict) -> bool:
    """utils/util.go IsAutoscalingEnabled."""
    return spec.get("enableInTreeAutoscaling") is True


def autoscaling_v2(spec: dict) -> bool:
    """utils/util.go IsAutoscalingV2Enabled: only `autoscalerOptions.version: v2` counts."""
    return (spec.get("autoscalerOptions") or {}).get("version") == "v2"


def auth_enabled(spec: dict) -> bool:
    """utils/util.go IsAuthEnabled."""
    return (spec.get("authOptions") or {}).get("mode") == "token"


def k8s_auth_enabled(auth: dict | None) -> bool:
    """utils/util.go IsK8sAuthEnabled."""
    return bool((auth or {}).get("enableK8sTokenAuth"))


def auth_secret(cluster: dict) -> tuple[str, str] | None:
    """(Secret name, key) the operator points RAY_AUTH_TOKEN at, or None without token auth.

    common/pod.go SetContainerTokenAuthEnvVars: `authOptions.secretName`, else the cluster's
    name (the Secret that raycluster_controller.go reconcileAuthSecret then generates); the key
    is always `auth_token` (utils/constant.go RAY_AUTH_TOKEN_SECRET_KEY).
    """
    spec = cluster["spec"]
    if not auth_enabled(spec) or k8s_auth_enabled(spec.get("authOptions")):
        return None
    return (spec["authOptions"].get("secretName") or cluster["metadata"]["name"], "auth_token")


def _group_resources(name: str, group: dict) -> list[str]:
    params = group.get("rayStartParams") or {}
    if any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")) and (
        group.get("resources")
    ):
        return [
            f"resource fields should not be set in both rayStartParams and Resources for "
            f"{name} group {_cite('validateRayGroupResources')}"
        ]
    return []


def _group_labels(name: str, group: dict) -> list[str]:
    errors = []
    if "labels" in (group.get("rayStartParams") or {}):
        errors.append(
            f"rayStartParams['labels'] is not supported for {name} group "
            f"{_cite('validateRayGroupLabels')}"
        )
    for key, value in (group.get("labels") or {}).items():
        if len(key.rsplit("/", 1)[-1]) > 63 or not QUALIFIED_NAME.match(key):
            errors.append(f"invalid label key for {name} group: {key!r}")
        if len(str(value)) > 63 or not LABEL_VALUE.match(str(value)):
            errors.append(f"invalid label value for key {key!r} in {name} group: {value!r}")
    return errors


def _needs_v2(spec: dict) -> bool:
    """Autoscaler v2 is on: `version: v2`, or the head's env var (KubeRay < 1.4 style)."""
    return autoscaling_v2(spec) or _head_env(spec).get(RAY_ENABLE_AUTOSCALER_V2) in ("1", "true")


def raycluster_metadata_errors(metadata: dict) -> list[str]:
    """ValidateRayClusterMetadata."""
    name = metadata.get("name", "")
    errors = []
    if len(name) > MAX_RAYCLUSTER_NAME:
        errors.append(f"RayCluster name should be no more than {MAX_RAYCLUSTER_NAME} characters")
    if not DNS1035.match(name) or len(name) > 63:
        errors.append(f"RayCluster name should be a valid DNS1035 label: {name!r}")
    return [f"{e} {_cite('ValidateRayClusterMetadata')}" for e in errors]


def raycluster_spec_errors(spec: dict, annotations: dict | None = None) -> list[str]:
    """ValidateRayClusterSpec, plus the webhook's unique group names and the upgrade strategy.

    The operator stops at the first error; every error is listed here.
    """
    annotations = annotations or {}
    errors: list[str] = []
    where = _cite("ValidateRayClusterSpec")
    errors += [
        f"spec.{f} is set: its rules are not ported here"
        for f in UNPORTED_CLUSTER_FIELDS
        if f in spec
    ]
    head = spec.get("headGroupSpec") or {}
    if not _containers(head.get("template") or {}):
        return [f"headGroupSpec should have at least one container {where}"]
    errors += _group_resources("Head", head)
    errors += _group_labels("Head", head)
    autoscaling = autoscaling_enabled(spec)
    names = set()
    for group in spec.get("workerGroupSpecs") or []:
        name = group.get("groupName", "")
        if name in names:  # pkg/webhooks/v1/raycluster_webhook.go validateWorkerGroups
            errors.append(f"worker group names must be unique: {name!r}")
        names.add(name)
        if not _containers(group.get("template") or {}):
            errors.append(f"workerGroupSpec should have at least one container {where}")
        low, high = group.get("minReplicas"), group.get("maxReplicas")
        if not autoscaling and (low is None or high is None):
            errors.append(
                f"worker group {name} must set both minReplicas and maxReplicas when "
                f"autoscaling is disabled {where}"
            )
        if low is not None and low < 0:
            errors.append(f"worker group {name} has negative minReplicas {low} {where}")
        if high is not None and high < 0:
            errors.append(f"worker group {name} has negative maxReplicas {high} {where}")
        if low is not None and high is not None and low > high:
            errors.append(
                f"worker group {name} has minReplicas {low} greater than maxReplicas {high} {where}"
            )
        errors += _group_resources(name, group)
        errors += _group_labels(name, group)
        idle = group.get("idleTimeoutSeconds")
        if idle is not None:
            if idle < 0:
                errors.append(f"worker group {name}: idleTimeoutSeconds must be non-negative")
            elif not _needs_v2(spec):
                errors.append(
                    f"worker group {name}: idleTimeoutSeconds is set, but autoscaler v2 is not "
                    f"enabled. Please set .spec.autoscalerOptions.version to 'v2' "
                    f"{_cite('validateWorkerGroupIdleTimeout')}"
                )
        priority = group.get("priority")
        if priority:
            version = _version(spec.get("rayVersion", ""))
            if version is None or version < (2, 56, 0):
                errors.append(
                    f"worker group {name}: priority needs Ray 2.56.0 or later "
                    f"{_cite('validateWorkerGroupPriority')}"
                )
            elif not _needs_v2(spec):
                errors.append(
                    f"worker group {name}: priority is set to {priority}, but autoscaler v2 is "
                    f"not enabled {_cite('validateWorkerGroupPriority')}"
                )
        # RayJobDeletionPolicy is on by default in v1.7.0, so only the autoscaler check bites.
        if group.get("suspend") and autoscaling:
            errors.append(f"worker group {name} cannot be suspended with Autoscaler enabled")
    head_env = _head_env(spec)
    ft = annotations.get("ray.io/ft-enabled", "").lower() == "true"
    if not ft and "RAY_REDIS_ADDRESS" in head_env:
        errors.append(f"RAY_REDIS_ADDRESS is set but GcsFaultToleranceOptions is not {where}")
    if (head.get("rayStartParams") or {}).get("redis-username") or "REDIS_USERNAME" in head_env:
        errors.append(
            f"cannot set redis username in rayStartParams or environment variables {where}"
        )
    if not autoscaling and head_env.get(RAY_ENABLE_AUTOSCALER_V2) in ("1", "true"):
        errors.append(
            f"environment variable {RAY_ENABLE_AUTOSCALER_V2} cannot be set when "
            f"enableInTreeAutoscaling is false {where}"
        )
    options = spec.get("autoscalerOptions") or {}
    if autoscaling:
        if options.get("version") is not None and RAY_ENABLE_AUTOSCALER_V2 in head_env:
            errors.append(
                f"both .spec.autoscalerOptions.version and head Pod env var "
                f"{RAY_ENABLE_AUTOSCALER_V2} are set {where}"
            )
        if autoscaling_v2(spec):
            templates = [("head Pod", head)] + [
                (f"worker group {g.get('groupName')}", g)
                for g in spec.get("workerGroupSpecs") or []
            ]
            for label, group in templates:
                policy = ((group.get("template") or {}).get("spec") or {}).get("restartPolicy")
                if policy not in (None, "", "Never"):
                    errors.append(
                        f"restartPolicy for {label} should be Never or unset when using "
                        f"autoscaler V2 {where}"
                    )
    if (options.get("idleTimeoutSeconds") or 0) < 0:
        errors.append(f"autoscalerOptions.idleTimeoutSeconds must be non-negative {where}")
    if "KUBERAY_GEN_AUTOSCALER_START_CMD" in _env(options):
        errors.append(
            f"autoscalerOptions.env must not contain KUBERAY_GEN_AUTOSCALER_START_CMD {where}"
        )
    auth = spec.get("authOptions")
    if auth_enabled(spec):
        version = _version(spec.get("rayVersion", ""))
        if not spec.get("rayVersion"):
            errors.append(f"authOptions.mode is 'token' but RayVersion was not specified {where}")
        elif version is None:
            errors.append(f"authOptions.mode is 'token' but RayVersion format is invalid {where}")
        elif version < (2, 52, 0):
            errors.append(
                f"authOptions.mode is 'token' but minimum Ray version is 2.52.0, got "
                f"{spec['rayVersion']} {where}"
            )
        elif k8s_auth_enabled(auth):
            if version < (2, 55, 0):
                errors.append(f"authOptions.enableK8sTokenAuth needs Ray 2.55.0 or later {where}")
            if auth.get("secretName"):
                errors.append(
                    f"authOptions.enableK8sTokenAuth is enabled and authOptions.secretName is "
                    f"also set {where}"
                )
    elif k8s_auth_enabled(auth):
        errors.append(
            f"authOptions.enableK8sTokenAuth is enabled but authOptions.mode not set to "
            f"'token' {where}"
        )
    strategy = (spec.get("upgradeStrategy") or {}).get("type")
    if strategy not in (None, "Recreate", "None"):
        errors.append(
            f"Spec.UpgradeStrategy.Type value {strategy} is invalid "
            f"{_cite('ValidateRayClusterUpgradeOptions')}"
        )
    return errors


def raycluster_errors(doc: dict) -> list[str]:
    """Every rule of the operator a RayCluster manifest breaks."""
    return raycluster_metadata_errors(doc["metadata"]) + raycluster_spec_errors(
        doc.get("spec") or {}, doc["metadata"].get("annotations")
    )


def rayjob_errors(doc: dict, clusters: list[dict] | None = None) -> list[str]:
    """ValidateRayJobMetadata and ValidateRayJobSpec; with `clusters`, also that the cluster a
    `clusterSelector` names is among them, in the job's namespace (the RayJob otherwise waits
    for it for ever: rayjob_controller.go getOrCreateRayClusterInstance)."""
    meta, spec = doc["metadata"], doc.get("spec") or {}
    errors: list[str] = []
    name = meta.get("name", "")
    if len(name) > MAX_RAYJOB_NAME:
        errors.append(f"RayJob name should be no more than {MAX_RAYJOB_NAME} characters")
    if not DNS1035.match(name) or len(name) > 63:
        errors.append(f"RayJob name should be a valid DNS1035 label: {name!r}")
    errors = [f"{e} {_cite('ValidateRayJobMetadata')}" for e in errors]
    where = _cite("ValidateRayJobSpec")
    errors += [
        f"spec.{f} is set: its rules are not ported here" for f in UNPORTED_JOB_FIELDS if f in spec
    ]
    mode = spec.get("submissionMode", "K8sJobMode")
    shutdown = spec.get("shutdownAfterJobFinishes", False)
    selector = spec.get("clusterSelector") or {}
    backoff = spec.get("backoffLimit")
    if spec.get("suspend") and not shutdown:
        errors.append(
            f"a RayJob with shutdownAfterJobFinishes set to false is not allowed to be suspended {where}"
        )
    ttl = spec.get("ttlSecondsAfterFinished", 0)
    if ttl < 0:
        errors.append(f"TTLSecondsAfterFinished must be a non-negative integer {where}")
    if not shutdown and ttl > 0:
        errors.append(
            f"a RayJob with shutdownAfterJobFinishes set to false cannot have "
            f"TTLSecondsAfterFinished {_cite('validateDeletionConfiguration')}"
        )
    if spec.get("suspend") and selector:
        errors.append(f"the ClusterSelector mode doesn't support the suspend operation {where}")
    if not spec.get("rayClusterSpec") and not selector:
        errors.append(f"one of RayClusterSpec or ClusterSelector must be set {where}")
    if selector:
        cluster = selector.get("ray.io/cluster", "")  # utils/constant.go RayJobClusterSelectorKey
        if not cluster:
            errors.append(f"cluster name in ClusterSelector should not be empty {where}")
        if mode == "SidecarMode":
            errors.append(f"ClusterSelector is not supported in SidecarMode {where}")
        if backoff is not None and backoff > 0:
            errors.append(f"BackoffLimit is incompatible with ClusterSelector mode {where}")
        if clusters is not None and cluster:
            namespace = meta.get("namespace")
            known = {(c["metadata"].get("namespace"), c["metadata"]["name"]) for c in clusters}
            if (namespace, cluster) not in known:
                errors.append(f"clusterSelector names RayCluster {cluster!r}, not in {namespace!r}")
    if mode == "InteractiveMode" and backoff is not None and backoff > 0:
        errors.append(f"BackoffLimit is incompatible with InteractiveMode {where}")
    if mode == "SidecarMode":
        errors.append("submissionMode SidecarMode: its rules are not ported here")
    if spec.get("rayClusterSpec"):
        if k8s_auth_enabled(spec["rayClusterSpec"].get("authOptions")):
            errors.append(f"K8s token auth mode is currently not supported for RayJob {where}")
        errors += raycluster_spec_errors(spec["rayClusterSpec"], meta.get("annotations"))
    try:
        # dashboardclient.UnmarshalRuntimeEnvYAML: into map[string]interface{}
        runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML", "") or "")
        if runtime_env is not None and not isinstance(runtime_env, dict):
            errors.append(f"failed to unmarshal RuntimeEnvYAML: not a mapping {where}")
    except yaml.YAMLError as e:
        errors.append(f"failed to unmarshal RuntimeEnvYAML: {e} {where}")
    for key in ("activeDeadlineSeconds", "preRunningDeadlineSeconds"):
        if key in spec and spec[key] <= 0:
            errors.append(f"{key} must be a positive integer {where}")
    if backoff is not None and backoff < 0:
        errors.append(f"backoffLimit must be a positive integer {where}")
    return errors


def worker_init_env(cluster: dict, group_name: str) -> dict[str, Any]:
    """The env of the `wait-gcs-ready` init container the operator adds to a worker pod.

    common/pod.go DefaultWorkerPodTemplate copies the Ray container's `env` (not `envFrom`)
    into it; configureTokenAuth then adds RAY_AUTH_MODE and RAY_AUTH_TOKEN when authOptions
    turns token auth on (SetContainerTokenAuthEnvVars). Values: a literal, or
    ("secret", name, key) for a secretKeyRef.
    """
    (group,) = [g for g in cluster["spec"]["workerGroupSpecs"] if g["groupName"] == group_name]
    env: dict[str, Any] = {}
    for e in _containers(group["template"])[0].get("env") or []:
        ref = (e.get("valueFrom") or {}).get("secretKeyRef")
        env[e["name"]] = ("secret", ref["name"], ref["key"]) if ref else e.get("value")
    secret = auth_secret(cluster)
    if auth_enabled(cluster["spec"]):
        env.setdefault("RAY_AUTH_MODE", "token")
        if secret:
            env.setdefault("RAY_AUTH_TOKEN", ("secret", *secret))
    return env
