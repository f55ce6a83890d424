"""The JobSet and TrainJob backends (and the PyTorchJob), written from the upstream APIs:
every planned workload validates against the upstream CRD (vendored in tests/data/upstream,
schema + CEL rules), every backend runs the same pod template, `auto` picks in its documented
order, and `kubetune plan` prints what the planner plans."""
from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from kubetune.operator.api import parse_object
from kubetune.operator.api.finetune import FineTuneJob
from kubetune.operator.backends import BackendError
from kubetune.operator.backends import trainjob as trainjob_backend
from kubetune.operator.dryrun import plan_job
from kubetune.operator.planner import AUTO_ORDER, JOB_LABEL, ClusterInfo, choose_backend, plan
from upstream_crds import validate_upstream

REPO = Path(__file__).resolve().parents[2]
RUNTIME_MANIFEST = REPO / "examples" / "kubeflow" / "clustertrainingruntime.yaml"
EXAMPLES = ["finetune-tiny.yaml", "llama3.1-8b-lora.yaml", "llama3.1-8b-full-2node.yaml", "qwen2-qlora.yaml"]
WRAPPED = {"pytorchjob": "PyTorchJob", "jobset": "JobSet", "trainjob": "TrainJob"}
EVERY_CLUSTER = ClusterInfo(has_pytorchjob=True, has_jobset=True, has_trainjob=True)


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


def with_backend(job: FineTuneJob, backend: str) -> FineTuneJob:
    return job.model_copy(update={"spec": job.spec.model_copy(update={"backend": backend})})


def trainjob_fits(job: FineTuneJob) -> FineTuneJob:
    """The example without what only the runtime can set for a TrainJob (retries, TTL, priority class)."""
    spec = job.spec.model_copy(update={"priority_class_name": None, "image_pull_policy": None,
                                       "run_policy": job.spec.run_policy.model_copy(update={"backoff_limit": 0, "ttl_seconds_after_finished": None})})
    return job.model_copy(update={"spec": spec})


def workload_of(job: FineTuneJob, backend: str) -> dict[str, Any]:
    return plan(with_backend(job, backend), ClusterInfo())[-1]


# --- the upstream schemas --------------------------------------------------------------------


@pytest.mark.parametrize("backend", sorted(WRAPPED))
@pytest.mark.parametrize("name", EXAMPLES)
def test_planned_workloads_validate_against_the_upstream_crds(name, backend):
    job = example(name)
    if backend == "trainjob":
        job = trainjob_fits(job)
    obj = workload_of(job, backend)
    assert obj["kind"] == WRAPPED[backend]
    validate_upstream(obj)


def test_a_typo_in_a_planned_workload_is_caught_by_the_vendored_schema():
    """The validation has teeth: an unknown field or a broken CEL rule fails it."""
    job = example("llama3.1-8b-full-2node.yaml")
    jobset = workload_of(job, "jobset")
    bad = copy.deepcopy(jobset)
    bad["spec"]["failurePolicy"]["maxRestart"] = 3
    with pytest.raises(Exception, match="maxRestart"):
        validate_upstream(bad)
    bad = copy.deepcopy(jobset)
    bad["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "9090"
    with pytest.raises(Exception, match="'9090' is not of type 'integer'"):
        validate_upstream(bad)
    train = workload_of(trainjob_fits(job), "trainjob")
    train["metadata"]["name"] = "Has_Capitals"
    with pytest.raises(AssertionError, match="RFC 1035"):
        validate_upstream(train)


def test_the_cluster_training_runtime_example_validates_and_matches_the_planner():
    (runtime,) = [d for d in yaml.safe_load_all(RUNTIME_MANIFEST.read_text()) if d]
    validate_upstream(runtime)
    assert runtime["metadata"]["name"] == trainjob_backend.RUNTIME
    (node,) = [r for r in runtime["spec"]["template"]["spec"]["replicatedJobs"] if r["name"] == trainjob_backend.REPLICATED_JOB]
    assert node["template"]["metadata"]["labels"]["trainer.kubeflow.org/trainjob-ancestor-step"] == "trainer"
    assert [c["name"] for c in node["template"]["spec"]["template"]["spec"]["containers"]] == [trainjob_backend.CONTAINER]


# --- one pod template ------------------------------------------------------------------------


def _runtime_pod() -> dict[str, Any]:
    (runtime,) = [d for d in yaml.safe_load_all(RUNTIME_MANIFEST.read_text()) if d]
    (node,) = [r for r in runtime["spec"]["template"]["spec"]["replicatedJobs"] if r["name"] == "node"]
    return copy.deepcopy(node["template"]["spec"]["template"])


def trainjob_pod_template(train: dict[str, Any]) -> dict[str, Any]:
    """The pod template the Trainer builds from kubetune's runtime and this TrainJob, following
    the API's documented semantics (trainjob_types.go): the `trainer` field sets the `node`
    container's image, command, env and resources; the runtime patch sets the pod fields it
    names and, per container name, appends env and volumeMounts and sets the securityContext."""
    template = _runtime_pod()
    pod = template["spec"]
    containers = {c["name"]: c for c in pod.get("containers", []) + pod.get("initContainers", [])}
    trainer = train["spec"]["trainer"]
    node = containers["node"]
    node.update(image=trainer["image"], command=trainer["command"])
    node["env"] = node.get("env", []) + trainer.get("env", [])
    if "resourcesPerNode" in trainer:
        node["resources"] = trainer["resourcesPerNode"]
    (patch,) = train["spec"]["runtimePatches"]
    (rjob,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    pod_patch = rjob["template"]["spec"]["template"]
    template.setdefault("metadata", {}).setdefault("labels", {}).update(pod_patch.get("metadata", {}).get("labels", {}))
    for key, value in pod_patch["spec"].items():
        if key in ("containers", "initContainers"):
            for entry in value:
                target = containers[entry["name"]]
                for field in ("env", "volumeMounts"):
                    if field in entry:
                        target[field] = target.get(field, []) + entry[field]
                if "securityContext" in entry:
                    target["securityContext"] = entry["securityContext"]
        elif key == "volumes":
            pod["volumes"] = pod.get("volumes", []) + value
        else:
            pod[key] = value
    return template


def pod_template_of(obj: dict[str, Any]) -> dict[str, Any]:
    kind = obj["kind"]
    if kind == "Job":
        return obj["spec"]["template"]
    if kind == "PyTorchJob":
        return obj["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
    if kind == "JobSet":
        (rjob,) = obj["spec"]["replicatedJobs"]
        return rjob["template"]["spec"]["template"]
    return trainjob_pod_template(obj)


# What a wrapper may add or change, and nothing else: the container's name (the operators find it
# by name), torchrun's rendezvous flags and the env they read, the PyTorchJob's port, the
# Job's pod subdomain (JobSet sets it itself), the ServiceAccount token (a TrainJob's patch
# cannot set automountServiceAccountToken: the runtime turns it off), and the initializer's
# image (a TrainJob's runtime names it) and presence (the runtime runs it for every TrainJob; with
# no hf:// or s3:// source its plan is empty).
def normalized(template: dict[str, Any]) -> dict[str, Any]:
    template = copy.deepcopy(template)
    pod = template["spec"]
    pod.pop("subdomain", None)
    pod.pop("automountServiceAccountToken", None)
    for init in pod.get("initContainers", []):
        init.pop("image", None)
        init.pop("imagePullPolicy", None)
    for container in pod["containers"]:
        container["name"] = "trainer"
        command = container["command"]
        container["command"] = [command[0], *command[command.index("-m"):]]
        container["env"] = [e for e in container["env"] if e["name"] != "NODE_RANK"]
        container["ports"] = [p for p in container["ports"] if p["name"] != "pytorchjob-port"]
    return template


REMOTE_MODELS = {"spec.model.source": "s3://models/llama/3.1-8b", "spec.secrets.s3": {"name": "s3-keys"}}


@pytest.mark.parametrize("remote", [False, True], ids=["local-sources", "s3-model"])
@pytest.mark.parametrize("name", EXAMPLES)
def test_every_backend_runs_the_same_pod_template(name, remote):
    job = trainjob_fits(example(name, **(REMOTE_MODELS if remote else {})))
    templates = {backend: normalized(pod_template_of(workload_of(job, backend))) for backend in AUTO_ORDER}
    if not remote and not job.spec.dataset.source.startswith("hf://"):  # qwen2-qlora's dataset is on the Hub
        assert "initContainers" not in templates["job"]["spec"]
        (init,) = templates["trainjob"]["spec"].pop("initContainers")
        assert init["name"] == "initializer"
    for backend, template in templates.items():
        assert template == templates["job"], f"{backend}'s pod template differs from the indexed Job's"
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x", **templates["trainjob"]["metadata"]}, "spec": templates["trainjob"]["spec"]}
    kubernetes_validate.validate(pod, "1.30.0", strict=True)


def test_the_trainjob_keeps_the_service_account_token_off_like_the_other_backends():
    job = trainjob_fits(example("finetune-tiny.yaml"))
    assert workload_of(job, "job")["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    assert trainjob_pod_template(workload_of(job, "trainjob"))["spec"]["automountServiceAccountToken"] is False


# --- the wrappers ----------------------------------------------------------------------------


def test_jobset_is_one_indexed_job_of_n_pods_with_rendezvous_at_pod_zero_and_group_restarts():
    job = example("llama3.1-8b-full-2node.yaml", **{"spec.runPolicy": {"backoffLimit": 3, "activeDeadlineSeconds": 7200}})
    jobset = workload_of(job, "jobset")
    name = jobset["metadata"]["name"]
    (rjob,) = jobset["spec"]["replicatedJobs"]
    assert rjob["replicas"] == 1
    job_spec = rjob["template"]["spec"]
    assert job_spec["completionMode"] == "Indexed" and job_spec["completions"] == job_spec["parallelism"] == 2
    assert job_spec["backoffLimit"] == 0 and job_spec["activeDeadlineSeconds"] == 7200
    assert jobset["spec"]["failurePolicy"] == {"maxRestarts": 3, "restartStrategy": "Recreate"}
    assert jobset["spec"]["network"] == {"enableDNSHostnames": True, "subdomain": name, "publishNotReadyAddresses": True}
    command = job_spec["template"]["spec"]["containers"][0]["command"]
    assert f"--master-addr={name}-node-0-0.{name}" in command and "--nnodes=2" in command and "--node-rank=$(NODE_RANK)" in command
    assert job_spec["template"]["metadata"]["labels"][JOB_LABEL] == name


def test_trainjob_references_the_runtime_and_sets_nodes_processes_and_resources():
    job = trainjob_fits(example("llama3.1-8b-full-2node.yaml"))
    train = workload_of(job, "trainjob")
    spec = train["spec"]
    assert spec["runtimeRef"] == {"name": "kubetune-torch", "apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime"}
    trainer = spec["trainer"]
    assert trainer["numNodes"] == 2 and trainer["numProcPerNode"] == 8
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "8"
    assert trainer["command"][:3] == ["torchrun", "-m", "kubetune.cli"]  # PET_* variables come from the Trainer
    env = {e["name"]: e for e in trainer["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "token"}


@pytest.mark.parametrize(("field", "value", "message"), [
    ("spec.runPolicy", {"backoffLimit": 2}, r"spec\.runPolicy\.backoffLimit.*failurePolicy\.maxRestarts.*backend: jobset"),
    ("spec.priorityClassName", "high", r"spec\.priorityClassName.*backend: jobset"),
    ("spec.imagePullPolicy", "Always", r"spec\.imagePullPolicy"),
    ("spec.runPolicy", {"ttlSecondsAfterFinished": 60}, r"spec\.runPolicy\.ttlSecondsAfterFinished"),
])
def test_trainjob_refuses_what_only_its_runtime_can_set_naming_the_field(field, value, message):
    job = example("finetune-tiny.yaml", **{field: value, "spec.backend": "trainjob"})
    with pytest.raises(BackendError, match=message):
        plan(job, EVERY_CLUSTER)


@pytest.mark.parametrize("backend", ["jobset", "trainjob"])
@pytest.mark.parametrize("name", ["x" * 253, "a" * 60 + "-one", "demo"])
def test_wrapper_names_and_pod_hostnames_fit_dns_labels(backend, name):
    job = trainjob_fits(example("llama3.1-8b-full-2node.yaml", **{"metadata.name": name, "spec.resources.nodes": 256}))
    workload = workload_of(job, backend)
    workload_name = workload["metadata"]["name"]
    assert len(f"{workload_name}-node-0-255") <= 63  # the last pod's hostname
    if name == "demo":
        assert workload_name == "demo"
    validate_upstream(workload)


# --- auto ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("cluster", "expected"), [
    (ClusterInfo(), "job"),
    (ClusterInfo(has_pytorchjob=True), "pytorchjob"),
    (ClusterInfo(has_pytorchjob=True, has_jobset=True), "jobset"),
    (EVERY_CLUSTER, "trainjob"),
    (ClusterInfo(has_trainjob=True), "trainjob"),
])
def test_auto_takes_the_first_served_backend_in_the_documented_order(cluster, expected):
    job = example("finetune-tiny.yaml")
    assert job.spec.backend == "auto"
    assert choose_backend(job.spec, cluster) == expected
    assert plan(job, cluster)[-1]["kind"] == {"job": "Job", **WRAPPED}[expected]


def test_auto_passes_over_a_trainjob_that_cannot_carry_the_spec():
    job = example("finetune-tiny.yaml", **{"spec.runPolicy": {"backoffLimit": 2}})
    assert choose_backend(job.spec, EVERY_CLUSTER) == "jobset"


# --- kubetune plan ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["jobset", "trainjob", None])
def test_kubetune_plan_prints_the_planner_objects_as_yaml(backend):
    manifest = REPO / "examples" / "finetune-tiny.yaml"
    argv = [sys.executable, "-m", "kubetune.cli", "plan", "-f", str(manifest)] + (["--backend", backend] if backend else [])
    out = subprocess.run(argv, capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    printed = [d for d in yaml.safe_load_all(out.stdout) if d]
    (job,) = [o for o in parse_manifest(manifest)]
    chosen, expected = plan_job(job, backend)
    assert printed == expected and chosen == (backend or "job")
    assert f"backend {chosen}" in out.stdout.splitlines()[0]


def parse_manifest(path: Path) -> list[FineTuneJob]:
    return [parse_object(d, str(path)) for d in yaml.safe_load_all(path.read_text()) if d]


def test_kubetune_plan_names_the_field_of_a_bad_manifest(tmp_path):
    doc = yaml.safe_load((REPO / "examples" / "finetune-tiny.yaml").read_text())
    doc["spec"]["priorityClassName"] = "high"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    out = subprocess.run([sys.executable, "-m", "kubetune.cli", "plan", "-f", str(bad), "--backend", "trainjob"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2 and "error: spec.priorityClassName" in out.stderr and not out.stdout


@pytest.mark.parametrize("backend", AUTO_ORDER)
def test_pods_with_the_initializer_meet_the_restricted_pod_security_standard(backend):
    from pss import restricted_violations

    job = trainjob_fits(example("llama3.1-8b-full-2node.yaml", **REMOTE_MODELS))
    template = pod_template_of(workload_of(job, backend))
    assert [c["name"] for c in template["spec"]["initContainers"]] == ["initializer"]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": template["spec"]}
    assert restricted_violations(pod) == []
