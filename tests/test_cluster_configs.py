"""Every cluster and schedule config parses and says what matters; built-in Kubernetes kinds are
validated against their schemas offline."""

import re
import shlex

import kubernetes_validate
import pytest
import ray
import yaml
from croniter import croniter

from pipeline.run.config import load_config
from tests.conftest import REPO

CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
PROJECT_IMAGE = re.compile(r"^[\w./-]+/rsr-pipeline:[\w.]+-ray(?P<ray>[\d.]+)$")
BUILT_IN_KINDS = {"ServiceAccount", "Role", "RoleBinding", "CronJob"}


def documents(path):
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def all_kuberay_docs():
    return [doc for path in sorted(KUBERAY.glob("*.yaml")) for doc in documents(path)]


def containers(pod_template):
    return pod_template["spec"]["containers"]


def assert_project_image(image):
    match = PROJECT_IMAGE.match(image)
    assert match, image
    assert match["ray"] == ray.__version__


def assert_runs_the_scoring_job(entrypoint):
    argv = shlex.split(entrypoint)
    assert argv[:3] == ["python", "-m", "jobs.score"] and argv[3] == "--config"
    load_config(REPO / argv[4], argv[5:])  # the config it names exists in the image and validates


def test_dockerfile_builds_on_the_projects_ray():
    base = re.search(r"^FROM (\S+)", (CLUSTER / "Dockerfile").read_text(), re.M)[1]
    assert base.startswith(f"rayproject/ray:{ray.__version__}-") and base.endswith("-gpu")


@pytest.mark.parametrize("doc", [d for d in all_kuberay_docs() if d["kind"] in BUILT_IN_KINDS], ids=lambda d: d["kind"])
def test_built_in_kinds_match_their_schemas(doc):
    kubernetes_validate.validate(doc, "1.31", strict=True)


def test_raycluster_has_an_autoscaling_gpu_group():
    [cluster] = [d for d in all_kuberay_docs() if d["kind"] == "RayCluster"]
    spec = cluster["spec"]
    assert spec["rayVersion"] == ray.__version__ and spec["enableInTreeAutoscaling"] is True
    assert_project_image(containers(spec["headGroupSpec"]["template"])[0]["image"])
    [gpu] = spec["workerGroupSpecs"]
    assert gpu["minReplicas"] == 0 < gpu["maxReplicas"]
    pod = gpu["template"]
    for container in containers(pod):
        assert_project_image(container["image"])
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert pod["spec"]["tolerations"] and pod["spec"]["nodeSelector"]


def test_rayjob_runs_the_scoring_job_on_the_cluster():
    [job] = [d for d in all_kuberay_docs() if d["kind"] == "RayJob"]
    [cluster] = [d for d in all_kuberay_docs() if d["kind"] == "RayCluster"]
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    assert_runs_the_scoring_job(job["spec"]["entrypoint"])
    assert_project_image(containers(job["spec"]["submitterPodTemplate"])[0]["image"])
    assert "generateName" in job["metadata"]  # every run gets its own name


def test_nightly_schedule_creates_the_rayjob_without_overlap():
    [cron] = [d for d in all_kuberay_docs() if d["kind"] == "CronJob"]
    assert croniter.is_valid(cron["spec"]["schedule"])
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    script = pod["containers"][0]["args"][0]
    assert "kubectl create -f /templates/rayjob.yaml" in script and "SUCCEEDED" in script
    [role] = [d for d in all_kuberay_docs() if d["kind"] == "Role"]
    assert {"create", "get"} <= set(role["rules"][0]["verbs"]) and role["rules"][0]["resources"] == ["rayjobs"]
    kustomization = yaml.safe_load((KUBERAY / "kustomization.yaml").read_text())
    [generator] = kustomization["configMapGenerator"]
    assert generator["name"] == pod["volumes"][0]["configMap"]["name"] and generator["files"] == ["rayjob.yaml"]
    assert set(kustomization["resources"]) == {"raycluster.yaml", "nightly.yaml"}


def test_cluster_launcher_has_gpu_workers_on_the_project_image():
    config = yaml.safe_load((CLUSTER / "launcher" / "aws-gpu.yaml").read_text())
    assert_project_image(config["docker"]["image"])
    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    assert workers and all(t["resources"]["GPU"] >= 1 and t["min_workers"] == 0 for t in workers)
