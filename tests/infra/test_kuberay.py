"""The RayCluster and RayJob against the KubeRay operator's own rules (tests/infra/kuberay_rules.py,
ported from KubeRay v1.7.0), not only the CRD schema: a spec the operator refuses passes
`kubectl apply` and then never starts a pod."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from tests.infra import kuberay_rules as rules
from tests.infra.test_infra import broken, kuberay_docs, manifest_errors


def cluster() -> dict:
    (doc,) = [d for d in kuberay_docs() if d["kind"] == "RayCluster"]
    return doc


def job() -> dict:
    (doc,) = [d for d in kuberay_docs() if d["kind"] == "RayJob"]
    return doc


def test_manifests_pass_the_operators_rules() -> None:
    assert rules.raycluster_errors(cluster()) == []
    assert rules.rayjob_errors(job(), clusters=[cluster()]) == []


DELETE = object()  # an edit's value that removes the field


def edited(doc: dict, *edits: tuple[list, Any]) -> dict:
    """A copy of `doc` with each (path, value) edit applied: set, or removed with DELETE."""
    out = copy.deepcopy(doc)
    for path, value in edits:
        parent = out
        for key in path[:-1]:
            parent = parent[key]
        if value is DELETE:
            del parent[path[-1]]
        else:
            parent[path[-1]] = value
    return out


GPU = ["spec", "workerGroupSpecs", 0]
HEAD = ["spec", "headGroupSpec"]
HEAD_CONTAINER = [*HEAD, "template", "spec", "containers", 0]
AUTH = ["spec", "authOptions"]
VERSION = ["spec", "autoscalerOptions", "version"]


def env(name: str, value: str = "1") -> list[dict]:
    return [{"name": name, "value": value}]


# (edits, what the operator says): each breaks one rule of the cluster.
CLUSTER_CASES = [
    # The defect the rules were ported for: per-group idle timeouts need autoscaler v2.
    ([(VERSION, DELETE)], "autoscaler v2 is not enabled"),
    ([(VERSION, "v1")], "autoscaler v2 is not enabled"),
    ([([*GPU, "idleTimeoutSeconds"], -1)], "idleTimeoutSeconds must be non-negative"),
    ([(["spec", "autoscalerOptions", "idleTimeoutSeconds"], -5)], "must be non-negative"),
    # authOptions
    ([(["spec", "rayVersion"], "2.51.0")], "minimum Ray version is 2.52.0"),
    ([(["spec", "rayVersion"], DELETE)], "RayVersion was not specified"),
    ([(["spec", "rayVersion"], "latest")], "RayVersion format is invalid"),
    ([([*AUTH, "enableK8sTokenAuth"], True)], "secretName is also set"),
    ([(AUTH, {"mode": "disabled", "enableK8sTokenAuth": True})], "not set to 'token'"),
    # worker groups
    ([([*GPU, "minReplicas"], 3)], "greater than maxReplicas"),
    ([([*GPU, "maxReplicas"], -1)], "negative maxReplicas"),
    (
        [(["spec", "enableInTreeAutoscaling"], False), ([*GPU, "minReplicas"], DELETE)],
        "must set both",
    ),
    ([([*GPU, "groupName"], "cpu-data")], "must be unique"),
    ([([*GPU, "template", "spec", "containers"], [])], "at least one container"),
    ([([*HEAD, "template", "spec", "containers"], [])], "headGroupSpec should have"),
    ([([*HEAD, "resources"], {"CPU": "0"})], "both rayStartParams and Resources"),
    ([([*GPU, "rayStartParams", "labels"], "a=b")], "rayStartParams['labels']"),
    ([([*GPU, "labels"], {"bad key!": "x"})], "invalid label key"),
    ([([*GPU, "priority"], 5), (VERSION, DELETE)], "priority is set to 5"),
    ([([*GPU, "priority"], 5), (["spec", "rayVersion"], "2.55.0")], "priority needs Ray 2.56"),
    ([([*GPU, "suspend"], True)], "cannot be suspended with Autoscaler"),
    ([([*GPU, "template", "spec", "restartPolicy"], "Always")], "restartPolicy for worker"),
    ([([*HEAD, "template", "spec", "restartPolicy"], "OnFailure")], "restartPolicy for head"),
    # head and autoscaler env
    ([([*HEAD_CONTAINER, "env"], env("RAY_enable_autoscaler_v2"))], "both .spec.autoscalerOptions"),
    (
        [
            (["spec", "enableInTreeAutoscaling"], False),
            ([*HEAD_CONTAINER, "env"], env("RAY_enable_autoscaler_v2")),
        ],
        "cannot be set when enableInTreeAutoscaling is false",
    ),
    ([([*HEAD_CONTAINER, "env"], env("RAY_REDIS_ADDRESS"))], "GcsFaultToleranceOptions is not"),
    ([([*HEAD, "rayStartParams", "redis-username"], "u")], "redis username"),
    (
        [(["spec", "autoscalerOptions", "env"], env("KUBERAY_GEN_AUTOSCALER_START_CMD"))],
        "must not contain KUBERAY_GEN_AUTOSCALER_START_CMD",
    ),
    ([(["spec", "upgradeStrategy"], {"type": "Rolling"})], "UpgradeStrategy.Type"),
    ([(["spec", "tlsOptions"], {})], "not ported here"),
    ([(["metadata", "name"], "p" * 54)], "no more than 53"),
    ([(["metadata", "name"], "1panet")], "DNS1035"),
]


@pytest.mark.parametrize(("edits", "needle"), CLUSTER_CASES)
def test_each_cluster_rule_refuses_a_broken_copy(edits, needle) -> None:
    errors = rules.raycluster_errors(edited(cluster(), *edits))
    assert any(needle in e for e in errors), (needle, errors)


JOB_CASES = [
    ([(["spec", "backoffLimit"], 2)], "incompatible with ClusterSelector"),
    ([(["spec", "clusterSelector"], {"ray.io/cluster": ""})], "should not be empty"),
    ([(["spec", "clusterSelector"], {"ray.io/cluster": "other"})], "names RayCluster"),
    ([(["spec", "clusterSelector"], DELETE)], "one of RayClusterSpec or ClusterSelector"),
    ([(["spec", "submissionMode"], "SidecarMode")], "not supported in SidecarMode"),
    (
        [(["spec", "submissionMode"], "InteractiveMode"), (["spec", "backoffLimit"], 1)],
        "InteractiveMode",
    ),
    ([(["spec", "suspend"], True)], "not allowed to be suspended"),
    ([(["spec", "ttlSecondsAfterFinished"], 60)], "cannot have TTLSecondsAfterFinished"),
    ([(["spec", "activeDeadlineSeconds"], 0)], "must be a positive integer"),
    ([(["spec", "runtimeEnvYAML"], "working_dir: [a")], "failed to unmarshal"),
    ([(["spec", "runtimeEnvYAML"], "- a list")], "not a mapping"),
    ([(["spec", "deletionStrategy"], {})], "not ported here"),
    ([(["metadata", "name"], "j" * 48)], "no more than 47"),
]


@pytest.mark.parametrize(("edits", "needle"), JOB_CASES)
def test_each_job_rule_refuses_a_broken_copy(edits, needle) -> None:
    errors = rules.rayjob_errors(edited(job(), *edits), clusters=[cluster()])
    assert any(needle in e for e in errors), (needle, errors)


def test_a_job_with_its_own_cluster_spec_gets_the_cluster_rules() -> None:
    inline = edited(job(), (["spec", "clusterSelector"], DELETE))
    inline["spec"]["rayClusterSpec"] = copy.deepcopy(cluster()["spec"])
    assert rules.rayjob_errors(inline) == []
    del inline["spec"]["rayClusterSpec"]["autoscalerOptions"]["version"]
    assert any("autoscaler v2" in e for e in rules.rayjob_errors(inline))
    inline["spec"]["rayClusterSpec"]["authOptions"] = {"mode": "token", "enableK8sTokenAuth": True}
    assert any("not supported for RayJob" in e for e in rules.rayjob_errors(inline))


def test_the_ray_token_reaches_the_workers_init_container() -> None:
    """KubeRay's wait-gcs-ready init container runs `ray health-check` against the token-auth
    GCS; it gets the Ray container's `env` only, so a token passed through `envFrom` never
    reaches it and the worker waits at Init:0/1. Through authOptions it does."""
    ours = cluster()
    for group in ("gpu", "cpu-data"):
        env = rules.worker_init_env(ours, group)
        assert env["RAY_AUTH_MODE"] == "token"
        assert env["RAY_AUTH_TOKEN"] == ("secret", "panet-ray-token", "auth_token")
    # The same cluster with the token in envFrom and no authOptions: nothing reaches it.
    old = edited(ours, (AUTH, DELETE))
    container = old["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    container["envFrom"].append({"secretRef": {"name": "panet-ray-token"}})
    assert "RAY_AUTH_TOKEN" not in rules.worker_init_env(old, "gpu")
    # And no Ray container gets a token or auth mode any other way than authOptions.
    for c in [ours["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]] + [
        g["template"]["spec"]["containers"][0] for g in ours["spec"]["workerGroupSpecs"]
    ]:
        assert not {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} & {e["name"] for e in c.get("env", [])}
        assert {"secretRef": {"name": "panet-ray-token"}} not in c.get("envFrom", [])


def test_auth_options_against_the_crd_schema() -> None:
    """The CRD in ../shared/schemas/kuberay is KubeRay v1.7.0's (same bytes as the tag's
    ray-operator/config/crd/bases); it has authOptions {mode: disabled|token, secretName,
    enableK8sTokenAuth}."""
    ours = cluster()
    assert manifest_errors(ours) == []
    for bad, needle in (
        (edited(ours, ([*AUTH, "mode"], "tokens")), "is not one of"),
        (broken(ours, [*AUTH, "secretName"], rename="secret"), "secret"),
        (edited(ours, (VERSION, "v3")), "is not one of"),
    ):
        errors = manifest_errors(bad)
        assert any(needle in e for e in errors), (needle, errors)
