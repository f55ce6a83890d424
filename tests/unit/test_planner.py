"""The planner: FineTuneJob -> ConfigMap + headless Service + indexed Job (or a PyTorchJob)."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from kubetune.errors import KubetuneError
from kubetune.operator.api import parse_object
from kubetune.operator.api.finetune import FineTuneJob
from kubetune.operator.planner import (
    JOB_LABEL,
    KUEUE_QUEUE_LABEL,
    MANAGED_BY,
    ClusterInfo,
    base_name,
    child_names,
    plan,
)
from kubetune.trainer.config import ConfigError, resolve_config

REPO = Path(__file__).resolve().parents[2]
K8S_VERSION = "1.30.0"


def example(name: str, **changes: Any) -> FineTuneJob:
    doc = yaml.safe_load((REPO / "examples" / name).read_text())
    doc["metadata"].setdefault("namespace", "default")
    doc["metadata"]["uid"] = "0d6f1c1e-uid"
    for dotted, value in changes.items():
        node = doc
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return parse_object(doc, name)


def by_kind(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    kinds = [o["kind"] for o in objects]
    assert len(kinds) == len(set(kinds)), kinds
    return {o["kind"]: o for o in objects}


def trainer_container(job_obj: dict[str, Any]) -> dict[str, Any]:
    (container,) = job_obj["spec"]["template"]["spec"]["containers"]
    return container


def test_tiny_job_becomes_configmap_service_and_indexed_job():
    job = example("finetune-tiny.yaml")
    children = by_kind(plan(job, ClusterInfo()))
    assert set(children) == {"ConfigMap", "Service", "Job"}

    config_text = children["ConfigMap"]["data"]["config.yaml"]
    parsed = yaml.safe_load(config_text)
    assert parsed["recipe"] == "full_finetune"
    cfg = resolve_config("full_finetune", parsed)  # the trainer reads it back with the same model
    assert cfg.model.path == "builtin://tiny"
    assert cfg.dataset.source == "examples/data/tiny_instruct.jsonl"
    assert cfg.max_steps == job.spec.config["max_steps"]
    assert cfg.optimizer.lr == job.spec.config["optimizer"]["lr"]
    assert cfg.metrics_port == 9090 and cfg.progress_bar is False

    job_spec = children["Job"]["spec"]
    assert job_spec["completionMode"] == "Indexed"
    assert job_spec["completions"] == job_spec["parallelism"] == 1
    assert job_spec["suspend"] is False
    container = trainer_container(children["Job"])
    assert "resources" not in container or "nvidia.com/gpu" not in container["resources"].get("limits", {})
    assert container["command"][container["command"].index("-m") :] == [
        "-m", "kubetune.cli", "run", "full_finetune", "--config", "/etc/kubetune/config.yaml"
    ]


def test_two_node_job_runs_torchrun_with_rendezvous_at_pod_zero():
    job = example("llama3.1-8b-full-2node.yaml")
    children = by_kind(plan(job, ClusterInfo()))
    names = child_names(job.metadata.name)
    job_obj, service = children["Job"], children["Service"]
    assert job_obj["spec"]["completions"] == job_obj["spec"]["parallelism"] == 2
    command = trainer_container(job_obj)["command"]
    assert command[0] == "torchrun"  # an argv list, no shell
    assert "--nnodes=2" in command and "--nproc-per-node=8" in command
    # elastic c10d rendezvous hosted by pod 0 at its stable DNS name (a restarted node rejoins)
    assert f"--rdzv-endpoint={job_obj['metadata']['name']}-0.{service['metadata']['name']}:29500" in command
    assert "--rdzv-backend=c10d" in command and f"--rdzv-id={job.metadata.uid}" in command
    assert "--max-restarts=1" in command  # spec.runPolicy.backoffLimit of the example
    assert not any(arg.startswith(("--master-addr", "--node-rank")) for arg in command)
    pod = job_obj["spec"]["template"]["spec"]
    assert pod["subdomain"] == service["metadata"]["name"] == names.service
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == {JOB_LABEL: names.base}
    assert job_obj["spec"]["template"]["metadata"]["labels"][JOB_LABEL] == names.base
    limits = trainer_container(job_obj)["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "8"
    assert trainer_container(job_obj)["resources"]["requests"]["memory"] == "512Gi"


def test_secrets_come_from_secret_references_never_inline():
    job = example("llama3.1-8b-full-2node.yaml")
    container = trainer_container(by_kind(plan(job, ClusterInfo()))["Job"])
    env = {e["name"]: e for e in container["env"]}
    assert env["HF_TOKEN"] == {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token"}}}
    assert env["WANDB_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "wandb", "key": "api-key"}
    assert env["NCCL_DEBUG"] == {"name": "NCCL_DEBUG", "value": "WARN"}


def test_pods_run_non_root_without_privileges_and_with_shm():
    job = example("llama3.1-8b-lora.yaml")
    pod = by_kind(plan(job, ClusterInfo()))["Job"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["privileged"] is False and sc["readOnlyRootFilesystem"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Gi"}
    assert volumes[mounts["/etc/kubetune"]]["configMap"]["name"] == child_names(job.metadata.name).config_map
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_pvc_sources_are_mounted_and_the_config_points_inside_them():
    job = example("llama3.1-8b-lora.yaml")
    children = by_kind(plan(job, ClusterInfo()))
    pod = children["Job"]["spec"]["template"]["spec"]
    claims = {v["name"]: v["persistentVolumeClaim"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {
        "model": {"claimName": "models", "readOnly": True},
        "dataset": {"claimName": "datasets", "readOnly": True},
        "output": {"claimName": "outputs", "readOnly": False},
    }
    cfg = yaml.safe_load(children["ConfigMap"]["data"]["config.yaml"])
    assert cfg["model"]["path"] == "/mnt/model/meta-llama/Llama-3.1-8B-Instruct"
    assert cfg["dataset"]["source"] == "/mnt/dataset/support-tickets/train.jsonl"
    assert cfg["dataset"]["format"] == "chat"
    assert cfg["output_dir"] == "/mnt/output/llama31-8b-lora"
    assert cfg["lora"]["rank"] == 16


def test_every_child_is_owned_labelled_and_deterministic():
    job = example("llama3.1-8b-lora.yaml")
    first, second = plan(job, ClusterInfo()), plan(copy.deepcopy(job), ClusterInfo())
    assert first == second
    for obj in first:
        meta = obj["metadata"]
        assert meta["namespace"] == "ml-team"
        assert meta["labels"][MANAGED_BY] == "kubetune" and meta["labels"][JOB_LABEL] == "llama31-8b-lora"
        (owner,) = meta["ownerReferences"]
        assert owner == {
            "apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneJob", "name": "llama31-8b-lora",
            "uid": "0d6f1c1e-uid", "controller": True, "blockOwnerDeletion": True,
        }


def test_kueue_queue_labels_the_workload_and_creates_it_suspended():
    job = example("llama3.1-8b-lora.yaml")
    workload = by_kind(plan(job, ClusterInfo()))["Job"]
    assert workload["metadata"]["labels"][KUEUE_QUEUE_LABEL] == "gpu-queue"
    assert workload["spec"]["suspend"] is True
    assert by_kind(plan(example("finetune-tiny.yaml", **{"spec.suspend": True}), ClusterInfo()))["Job"]["spec"]["suspend"] is True


def derived_names(children: list[dict[str, Any]], nodes: int) -> list[str]:
    """Every name a child has or makes: the children, the indexed Job's pod hostnames, and what
    the Kubeflow training-operator derives from a PyTorchJob (`<name>-<replica>-<index>` Services
    and pods: genGeneralName in kubeflow/training-operator pkg/controller.v1/common)."""
    names = []
    for obj in children:
        name = obj["metadata"]["name"]
        names.append(name)
        if obj["kind"] == "Job":
            names += [f"{name}-{index}" for index in range(nodes)]
        if obj["kind"] == "PyTorchJob":
            names.append(f"{name}-master-0")
            names += [f"{name}-worker-{index}" for index in range(nodes - 1)]
    return names


@pytest.mark.parametrize("backend", ["job", "pytorchjob"])
@pytest.mark.parametrize("length", [1, 20, 52, 53, 54, 55, 56, 57, 63, 64, 200, 253])
def test_every_name_of_every_backend_fits_a_dns_label(backend, length):
    name = ("d" + "x" * 252)[:length]
    job = example("llama3.1-8b-full-2node.yaml", **{"metadata.name": name, "spec.backend": backend, "spec.resources.nodes": 256})
    children = plan(job, ClusterInfo(has_pytorchjob=True))
    for derived in derived_names(children, 256):
        assert len(derived) <= 63 and derived[0].isalpha(), (len(derived), derived)
    for obj in children:
        assert len(obj["metadata"]["labels"][JOB_LABEL]) <= 63
    if length <= 52:
        assert children[-1]["metadata"]["name"] == name  # short names are kept as they are


@pytest.mark.parametrize("name", ["x" * 253, "a" * 60 + "-one", "a" * 60 + "-two", "9lives", "demo"])
def test_child_names_fit_dns_labels_and_stay_unique(name):
    job = example("llama3.1-8b-full-2node.yaml", **{"metadata.name": name})
    children = plan(job, ClusterInfo())
    for obj in children:
        assert len(obj["metadata"]["name"]) <= 63 and obj["metadata"]["name"][0].isalpha()
        assert len(obj["metadata"]["labels"][JOB_LABEL]) <= 63
    workload = by_kind(children)["Job"]["metadata"]["name"]
    assert len(f"{workload}-{job.spec.resources.nodes - 1}") <= 63  # pod hostnames
    assert base_name(name) == base_name(name)
    if name == "demo":
        assert workload == "demo"


def test_long_names_with_a_common_prefix_get_different_children():
    assert base_name("a" * 60 + "-one") != base_name("a" * 60 + "-two")


def test_backend_auto_picks_pytorchjob_when_the_crd_is_served():
    job = example("llama3.1-8b-lora.yaml", **{"spec.resources.nodes": 3})
    assert "Job" in by_kind(plan(job, ClusterInfo(has_pytorchjob=False)))
    children = by_kind(plan(job, ClusterInfo(has_pytorchjob=True)))
    assert set(children) == {"ConfigMap", "PyTorchJob"}
    ptj = children["PyTorchJob"]["spec"]
    assert ptj["nprocPerNode"] == "8"
    assert ptj["pytorchReplicaSpecs"]["Master"]["replicas"] == 1
    assert ptj["pytorchReplicaSpecs"]["Worker"]["replicas"] == 2
    container = ptj["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    assert container["name"] == "pytorch" and container["command"][:2] == ["torchrun", "-m"]
    assert ptj["runPolicy"]["suspend"] is True  # queueName: Kueue admits it


def test_run_policy_limits_reach_both_backends_only_when_set():
    limits = {"spec.runPolicy": {"activeDeadlineSeconds": 3600, "ttlSecondsAfterFinished": 600, "backoffLimit": 2}}
    job = example("llama3.1-8b-lora.yaml", **limits)
    job_spec = by_kind(plan(job, ClusterInfo(has_pytorchjob=False)))["Job"]["spec"]
    run_policy = by_kind(plan(job, ClusterInfo(has_pytorchjob=True)))["PyTorchJob"]["spec"]["runPolicy"]
    for spec in (job_spec, run_policy):
        assert (spec["activeDeadlineSeconds"], spec["ttlSecondsAfterFinished"], spec["backoffLimit"]) == (3600, 600, 2)

    unlimited = example("llama3.1-8b-lora.yaml", **{"spec.runPolicy": {"backoffLimit": 2}})
    job_spec = by_kind(plan(unlimited, ClusterInfo(has_pytorchjob=False)))["Job"]["spec"]
    run_policy = by_kind(plan(unlimited, ClusterInfo(has_pytorchjob=True)))["PyTorchJob"]["spec"]["runPolicy"]
    for spec in (job_spec, run_policy):
        assert "activeDeadlineSeconds" not in spec and "ttlSecondsAfterFinished" not in spec


def test_explicit_backend_job_wins_over_an_available_pytorchjob():
    job = example("llama3.1-8b-full-2node.yaml")
    assert "Job" in by_kind(plan(job, ClusterInfo(has_pytorchjob=True)))


def test_bad_config_key_is_refused_naming_the_field_and_the_fix():
    job = example("finetune-tiny.yaml", **{"spec.config.max_stepz": 5})
    with pytest.raises(ConfigError, match=r"(?s)spec\.config.*max_stepz.*did you mean 'max_steps'"):
        plan(job, ClusterInfo())
    job = example("finetune-tiny.yaml", **{"spec.config.model": {"path": "/elsewhere"}})
    with pytest.raises(ConfigError, match=r"spec\.config\.model\.path: set by spec\.model\.source"):
        plan(job, ClusterInfo())
    job = example("finetune-tiny.yaml", **{"spec.config.batch_size": 0})
    with pytest.raises(ConfigError, match="batch_size"):
        plan(job, ClusterInfo())


def test_pvc_without_a_claim_is_refused():
    job = example("finetune-tiny.yaml", **{"spec.model.source": "pvc:///llama"})
    with pytest.raises(KubetuneError, match=r"spec\.model\.source.*pvc://CLAIM"):
        plan(job, ClusterInfo())


@pytest.mark.parametrize("name", ["finetune-tiny.yaml", "llama3.1-8b-lora.yaml", "llama3.1-8b-full-2node.yaml", "qwen2-qlora.yaml"])
def test_generated_objects_validate_with_kubernetes_validate(name):
    for obj in plan(example(name), ClusterInfo()):
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_hub_models_and_datasets_are_fetched_by_the_initializer():
    job = example("finetune-tiny.yaml", **{"spec.model.source": "hf://meta-llama/Llama-3.1-8B@main",
                                            "spec.dataset.source": "hf://tatsu-lab/alpaca/default"})
    children = by_kind(plan(job, ClusterInfo()))
    cfg = yaml.safe_load(children["ConfigMap"]["data"]["config.yaml"])
    assert cfg["model"]["path"].startswith("/mnt/cache/hf/meta-llama--Llama-3.1-8B-")
    assert cfg["dataset"]["source"].startswith("/mnt/cache/hf/tatsu-lab--alpaca-") and cfg["dataset"]["source"].endswith("/default")
    pod = children["Job"]["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["command"] == ["kubetune", "initialize", "--plan", "/etc/kubetune/sources.yaml"]
    sources = yaml.safe_load(children["ConfigMap"]["data"]["sources.yaml"])["sources"]
    assert sources == [
        {"field": "spec.model.source", "uri": "hf://meta-llama/Llama-3.1-8B@main", "dest": cfg["model"]["path"]},
        # the download's root; the trainer reads its config folder
        {"field": "spec.dataset.source", "uri": "hf://tatsu-lab/alpaca/default", "dest": cfg["dataset"]["source"].removesuffix("/default")},
    ]
    assert {"name": "cache", "mountPath": "/mnt/cache", "readOnly": True} in pod["containers"][0]["volumeMounts"]


# --- issue #26: pods a real cluster keeps, multi-node failures, restricted Pod Security ----------


def pod_of(children: list[dict[str, Any]]) -> dict[str, Any]:
    workload = children[-1]
    if workload["kind"] == "Job":
        return workload["spec"]["template"]["spec"]
    return workload["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]


def qos_class(pod: dict[str, Any]) -> str:
    """The pod's QoS class as the kubelet computes it (pkg/apis/core/helper/qos): Guaranteed when
    every container has cpu and memory limits equal to requests, BestEffort with no cpu/memory
    requests or limits at all, else Burstable."""
    resources = [c.get("resources") or {} for c in pod["containers"]]
    names = ("cpu", "memory")
    if not any(r.get(kind, {}).get(n) for r in resources for kind in ("requests", "limits") for n in names):
        return "BestEffort"
    guaranteed = all(
        r.get("limits", {}).get(n) and r.get("requests", {}).get(n, r["limits"][n]) == r["limits"][n] for r in resources for n in names
    )
    return "Guaranteed" if guaranteed else "Burstable"


@pytest.mark.parametrize("backend", ["job", "pytorchjob"])
def test_planned_pods_are_burstable_with_requests_per_gpu_and_bounded_scratch(backend):
    job = example("llama3.1-8b-lora.yaml", **{"spec.backend": backend, "spec.resources": {"gpusPerNode": 1}})  # no cpu/memory set
    pod = pod_of(plan(job, ClusterInfo(has_pytorchjob=True)))
    assert qos_class(pod) == "Burstable"
    requests = pod["containers"][0]["resources"]["requests"]
    assert requests == {"cpu": "4", "memory": "32Gi", "nvidia.com/gpu": "1"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["tmp"]["emptyDir"] == {"sizeLimit": "50Gi"}  # HOME and the Hugging Face cache
    assert pod["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"
    if backend == "job":
        kubernetes_validate.validate(plan(job, ClusterInfo())[-1], K8S_VERSION, strict=True)


def test_requests_scale_with_gpus_are_configurable_and_the_spec_wins():
    eight = example("llama3.1-8b-lora.yaml", **{"spec.resources": {"gpusPerNode": 8}})
    requests = pod_of(plan(eight, ClusterInfo(cpu_per_gpu="6", memory_per_gpu="48Gi")))["containers"][0]["resources"]["requests"]
    assert requests["cpu"] == "48" and requests["memory"] == "384Gi"
    own = example("llama3.1-8b-lora.yaml", **{"spec.resources.requests": {"cpu": "10"}, "spec.resources.limits": {"memory": "64Gi"}})
    resources = pod_of(plan(own, ClusterInfo()))["containers"][0]["resources"]
    assert resources["requests"]["cpu"] == "10"
    assert "memory" not in resources["requests"]  # a limit alone: Kubernetes makes it the request too
    tiny = pod_of(plan(example("finetune-tiny.yaml"), ClusterInfo()))["containers"][0]["resources"]
    assert tiny["requests"] == {"cpu": "2", "memory": "4Gi"}  # what the demo asks for


def test_scale_quantity():
    from kubetune.operator.planner import scale_quantity

    assert scale_quantity("32Gi", 3) == "96Gi" and scale_quantity("500m", 3) == "1500m" and scale_quantity("1.5", 2) == "3"
    with pytest.raises(ValueError, match="plain quantity"):
        scale_quantity("1e3", 2)


def test_multi_node_job_ignores_disruptions_and_fails_fast_on_a_config_error():
    job = example("llama3.1-8b-full-2node.yaml")
    workload = plan(job, ClusterInfo())[-1]
    rules = workload["spec"]["podFailurePolicy"]["rules"]
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]} in rules
    assert any(r["action"] == "FailJob" and r["onExitCodes"]["values"] == [2] for r in rules)
    assert workload["spec"]["template"]["spec"]["restartPolicy"] == "Never"  # podFailurePolicy requires it
    assert workload["spec"]["backoffLimit"] == 2  # backoffLimit 1 x 2 nodes: one group restart fails every node
    kubernetes_validate.validate(workload, K8S_VERSION, strict=True)


def test_pytorchjob_cleans_up_running_pods_when_it_ends():
    job = example("llama3.1-8b-pytorchjob.yaml")
    workload = plan(job, ClusterInfo(has_pytorchjob=True))[-1]
    assert workload["kind"] == "PyTorchJob" and workload["spec"]["runPolicy"]["cleanPodPolicy"] == "Running"


def restricted_violations(container: dict[str, Any], pod_security: dict[str, Any]) -> list[str]:
    """Pod Security Standards `restricted` for one container (kubernetes.io/docs/concepts/security/
    pod-security-standards): non-root, no privilege escalation, all capabilities dropped,
    seccomp RuntimeDefault or Localhost (container or pod level)."""
    sc = container.get("securityContext") or {}
    problems = []
    if not (sc.get("runAsNonRoot") or pod_security.get("runAsNonRoot")):
        problems.append("runAsNonRoot")
    if sc.get("allowPrivilegeEscalation") is not False:
        problems.append("allowPrivilegeEscalation")
    if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
        problems.append("capabilities.drop ALL")
    seccomp = (sc.get("seccompProfile") or pod_security.get("seccompProfile") or {}).get("type")
    if seccomp not in ("RuntimeDefault", "Localhost"):
        problems.append("seccompProfile")
    if sc.get("privileged"):
        problems.append("privileged")
    return problems


def test_the_pytorchjob_init_container_template_passes_restricted_pod_security():
    """The training-operator injects an init container into Worker pods (waiting for the master's
    DNS name); its default has no securityContext. deploy/pytorchjob/ ships a template for its
    --pytorch-init-container-template-file flag (a Go template)."""
    text = (REPO / "deploy" / "pytorchjob" / "init-container-template.yaml").read_text()
    rendered = text.replace("{{.InitContainerImage}}", "alpine:3.20").replace("{{.MasterAddr}}", "demo-master-0")
    (container,) = yaml.safe_load(rendered)
    assert container["name"] == "init-pytorch" and "demo-master-0" in " ".join(container["command"])
    assert restricted_violations(container, {}) == []
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "w"}, "spec": {"initContainers": [container], "containers": [container]}}
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    workload_pod = pod_of(plan(example("llama3.1-8b-pytorchjob.yaml"), ClusterInfo(has_pytorchjob=True)))
    assert restricted_violations(workload_pod["containers"][0], workload_pod["securityContext"]) == []


@pytest.mark.parametrize("fmt", ["prompt_completion", "chat", "text"])
def test_every_trainer_dataset_format_plans_into_the_trainer_config(fmt):
    """The API's dataset formats follow the trainer's: TRL-style prompt/completion data must not be
    refused by the CRD while the trainer reads it."""
    job = example("finetune-tiny.yaml", **{"spec.dataset.format": fmt})
    children = by_kind(plan(job, ClusterInfo()))
    cfg = yaml.safe_load(children["ConfigMap"]["data"]["config.yaml"])
    assert cfg["dataset"]["format"] == fmt
