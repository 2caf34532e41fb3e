"""What an autoscaling cluster can grow to, read from the shipped clusters' own configs.

Ray 2.60's autoscalers do not publish their limits to the GCS, so the driver reads the
autoscaling config the head node has: the cluster launcher's bootstrap config, or KubeRay's
RayCluster converted by Ray's own KubeRay autoscaler code. Both are fed the shipped files here.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_job_config
from pipeline.ray_session import LAUNCHER_CONFIG, autoscaler_max_resources, autoscaling_config_max
from pipeline.train.preflight import check_resources

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = REPO / "infra" / "launcher" / "aws-gpu.yaml"
RAYCLUSTER = REPO / "infra" / "k8s" / "ray" / "raycluster.yaml"


def _gpu_job(workers: int):
    sets = {
        "data.train": "s3://b/train",
        "data.val": "s3://b/val",
        "scaling.use_gpu": True,
        "scaling.num_workers": workers,
        "solver.ims_per_batch": workers,
    }
    return load_job_config(REPO / "jobs" / "configs" / "tiny_synth.yaml", sets)


@pytest.fixture
def launcher_head(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """This process as the launcher's head node: the shipped config where `ray up` puts it."""
    home = tmp_path / "home"
    config = Path(LAUNCHER_CONFIG.replace("~", str(home)))
    config.parent.mkdir(parents=True)
    shutil.copy(LAUNCHER, config)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("RAY_CLUSTER_NAME", raising=False)
    return yaml.safe_load(LAUNCHER.read_text())


def test_launcher_head_reads_its_autoscaling_config(launcher_head: dict) -> None:
    gpu = launcher_head["available_node_types"]["gpu"]
    found = autoscaler_max_resources()  # no Ray here: Ray's GCS record cannot answer
    assert found["GPU"] == gpu["max_workers"] * gpu["resources"]["GPU"] == 16
    # The GPU workers need 96 CPUs each; the data workers fill the global cap of 10 workers.
    assert found["CPU"] == 2 * 96 + 8 * 16


def test_scale_from_zero_gpu_job_waits_instead_of_failing(launcher_head: dict) -> None:
    head_now = {"CPU": 0.0}  # `ray up` starts the head alone, with no tasks on it
    with pytest.warns(UserWarning, match="autoscaler adds nodes"):
        check_resources(_gpu_job(8), head_now)
    # Its 32 workers' CPUs would come (a warning), their 32 GPUs never.
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="grows to at most 16"):
        check_resources(_gpu_job(32), head_now)


def test_kuberay_raycluster_through_rays_own_converter() -> None:
    from ray.autoscaler._private.kuberay.autoscaling_config import (
        _derive_autoscaling_config_from_ray_cr,
    )

    cr = yaml.safe_load(RAYCLUSTER.read_text())
    found = autoscaling_config_max(_derive_autoscaling_config_from_ray_cr(cr))
    groups = cr["spec"]["workerGroupSpecs"]
    gpus = sum(
        g["maxReplicas"]
        * int(
            g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)
        )
        for g in groups
    )
    assert gpus > 0 and found["GPU"] == gpus


def test_global_max_workers_caps_the_node_types() -> None:
    config = {
        "max_workers": 5,
        "head_node_type": "head",
        "available_node_types": {
            "head": {"resources": {"CPU": 4}, "max_workers": 0},
            "gpu": {"resources": {"CPU": 96, "GPU": 8}, "max_workers": 4},
            "cpu": {"resources": {"CPU": 16}, "max_workers": 8},
        },
    }
    # GPU: 4 GPU nodes. CPU: the head, 4 GPU nodes, then 1 CPU node left under the cap of 5.
    assert autoscaling_config_max(config) == {"CPU": 4 + 4 * 96 + 16, "GPU": 32}
    assert autoscaling_config_max({"available_node_types": {}}) == {}
