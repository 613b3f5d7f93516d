"""The cluster manifests: valid YAML, private dashboards, GPU workers, and entrypoints that are real jobs."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import yaml

from jobs.config import load_config
from jobs.pipeline_jobs import JOBS
from tests.conftest import REPO_ROOT

CLUSTER = REPO_ROOT / "cluster"


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _walk(node, key: str):
    """Every value stored under ``key`` anywhere in ``node``."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from _walk(v, key)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v, key)


def _cluster_specs() -> list[dict]:
    specs = [d["spec"] for d in _docs(CLUSTER / "kuberay" / "raycluster.yaml") if d["kind"] == "RayCluster"]
    specs += [
        d["spec"]["rayClusterSpec"]
        for d in _docs(CLUSTER / "kuberay" / "rayjob.yaml")
        if d["kind"] == "RayJob"
    ]
    assert len(specs) == 2
    return specs


def _cascade_job(entrypoint: str) -> str:
    """The job a ``python -m jobs.cli JOB ...`` / ``python -m jobs.entrypoint JOB ...`` command runs."""
    words = shlex.split(entrypoint)
    assert words[:2] == ["python", "-m"] and words[2] in ("jobs.cli", "jobs.entrypoint"), entrypoint
    return words[3]


@pytest.mark.parametrize("name", ["kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "launcher.yaml"])
def test_manifests_are_commented_yaml_without_public_exposure(name: str) -> None:
    path = CLUSTER / name
    text = path.read_text()
    assert text.startswith("#") and ("RAY_AUTH_MODE" in text or "authOptions" in text)
    docs = _docs(path)
    assert docs
    for doc in docs:
        assert all(t not in ("LoadBalancer", "NodePort") for t in _walk(doc, "serviceType"))
        assert all(t not in ("LoadBalancer", "NodePort") for t in _walk(doc, "type"))
        assert not any(d.get("kind") in ("Ingress", "Route") for d in docs)
    assert not any(word in text for word in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "aws_secret"))


def test_kuberay_clusters_keep_the_dashboard_inside_and_put_gpus_on_workers() -> None:
    for spec in _cluster_specs():
        head = spec["headGroupSpec"]
        assert head["serviceType"] == "ClusterIP"
        assert head["rayStartParams"]["num-cpus"] == "0"
        assert spec["authOptions"] == {"mode": "token"} and spec["rayVersion"] == "2.60.0"
        head_container = head["template"]["spec"]["containers"][0]
        assert "nvidia.com/gpu" not in json.dumps(head_container["resources"])
        labels = head["template"]["metadata"]["labels"]
        assert labels["app.kubernetes.io/component"] == "ray-head"  # what the NetworkPolicy selects
        for group in spec["workerGroupSpecs"]:
            limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
            assert int(limits["nvidia.com/gpu"]) >= 1
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


@pytest.mark.parametrize("name", ["kuberay/raycluster.yaml", "kuberay/rayjob.yaml"])
def test_network_policy_selects_the_head_and_opens_nothing_to_the_world(name: str) -> None:
    docs = _docs(CLUSTER / name)
    (policy,) = [d for d in docs if d["kind"] == "NetworkPolicy"]
    assert policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "ray-head"
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    assert "ipBlock" not in json.dumps(policy)  # peers are pods and namespaces, never address ranges


def test_rayjob_runs_a_real_job_on_the_configmap_config(tmp_path) -> None:
    docs = _docs(CLUSTER / "kuberay" / "rayjob.yaml")
    (job,) = [d for d in docs if d["kind"] == "RayJob"]
    (config_map,) = [d for d in docs if d["kind"] == "ConfigMap"]
    words = shlex.split(job["spec"]["entrypoint"])
    name = _cascade_job(job["spec"]["entrypoint"])
    assert name in JOBS
    config_path = words[words.index("--config") + 1]
    mount = config_path.rsplit("/", 1)[0]
    volumes = {
        v["name"]: v for v in job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["volumes"]
    }
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    (volume_name,) = [m["name"] for m in head["volumeMounts"] if m["mountPath"] == mount]
    assert volumes[volume_name]["configMap"]["name"] == config_map["metadata"]["name"]
    # the ConfigMap's YAML is a valid config of that job, checked by the same code the job runs
    key = config_path.rsplit("/", 1)[1]
    (tmp_path / key).write_text(config_map["data"][key])
    load_config(JOBS[name].config_cls, tmp_path / key, JOBS[name].fixed)
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert runtime_env == {"env_vars": {"HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1",
                                        "RAY_USAGE_STATS_ENABLED": "0"}}  # fmt: skip


def test_launcher_binds_the_dashboard_to_localhost_and_uses_gpu_workers() -> None:
    config = yaml.safe_load((CLUSTER / "launcher.yaml").read_text())
    jsonschema = pytest.importorskip("jsonschema")
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)  # the launcher's own schema
    (head_start,) = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start
    assert "RAY_AUTH_MODE=token" in head_start
    assert all("RAY_AUTH_MODE=token" in c for c in config["worker_start_ray_commands"] if "ray start" in c)
    assert config["provider"]["security_group"]["IpPermissions"] == []
    assert "0.0.0.0/0" not in json.dumps(config["provider"])
    head_type = config["available_node_types"][config["head_node_type"]]
    assert head_type["resources"] == {"CPU": 0}
    workers = [t for n, t in config["available_node_types"].items() if n != config["head_node_type"]]
    assert workers and all(t["resources"]["GPU"] >= 1 and t["max_workers"] >= 1 for t in workers)
    assert any("pip install" in c and "cascade-data" in c for c in config["setup_commands"])
    assert all(
        t["node_config"]["MetadataOptions"]["HttpTokens"] == "required"
        for t in config["available_node_types"].values()
    )


def test_submit_entrypoints_name_real_jobs() -> None:
    from jobs.submit import job_entrypoint

    for name in JOBS:
        assert _cascade_job(job_entrypoint(name, ["a.b=1"])) == name
