"""Every pod the planner creates meets the restricted Pod Security Standard (the chart's pods are
checked in test_chart.py with the same function), and the checker itself refuses what the
standard refuses."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline_objects import pipeline_objects
from pss import restricted_violations

from kubetune.operator.api import parse_object
from kubetune.operator.planner import ClusterInfo, plan

REPO = Path(__file__).resolve().parents[2]


def finetune_examples() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted((REPO / "examples").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "FineTuneJob":
                doc["metadata"].setdefault("namespace", "default")
                doc["metadata"]["uid"] = "uid-1"
                found.append((f"{path.name}:{doc['metadata']['name']}", doc))
    return found


EXAMPLES = finetune_examples()


def workloads(doc: dict[str, Any], has_pytorchjob: bool) -> list[dict[str, Any]]:
    children = plan(parse_object(doc, "example"), ClusterInfo(has_pytorchjob=has_pytorchjob))
    return [c for c in children if c["kind"] not in {"ConfigMap", "Service"}]


@pytest.mark.parametrize("has_pytorchjob", [False, True], ids=["job", "auto-pytorchjob"])
@pytest.mark.parametrize("name, doc", EXAMPLES, ids=[n for n, _ in EXAMPLES])
def test_planned_pods_meet_the_restricted_standard(name, doc, has_pytorchjob):
    planned = workloads(copy.deepcopy(doc), has_pytorchjob)
    assert planned
    for workload in planned:
        assert restricted_violations(workload) == [], name


def test_planned_pods_with_every_pod_option_still_pass():
    """A job that sets a service account, node selector, tolerations, a PVC output and secrets."""
    doc = copy.deepcopy(dict(EXAMPLES)["finetune-tiny.yaml:tiny"])
    doc["spec"].update(
        serviceAccountName="trainer", nodeSelector={"gpu": "a100"},
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        output={"source": "pvc://outputs/tiny"}, secrets={"hfToken": {"name": "hf", "key": "token"}},
        resources={"nodes": 2, "gpusPerNode": 8},
    )
    for workload in workloads(doc, has_pytorchjob=False) + workloads(doc, has_pytorchjob=True):
        assert restricted_violations(workload) == []


def test_evaljob_and_modeldeployment_pods_meet_the_restricted_standard():
    workloads = [o for o in pipeline_objects() if o["kind"] in {"Job", "Deployment"}]
    assert {w["kind"] for w in workloads} == {"Job", "Deployment"}
    for workload in workloads:
        assert restricted_violations(workload) == [], workload["metadata"]["name"]


GOOD_POD = {
    "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
    "spec": {
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [{"name": "c", "image": "i", "securityContext": {
            "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}}],
        "volumes": [{"name": "tmp", "emptyDir": {}}],
    },
}


def test_a_restricted_pod_passes():
    assert restricted_violations(GOOD_POD) == []


@pytest.mark.parametrize(
    "change, problem",
    [
        (lambda s: s["containers"][0]["securityContext"].update(privileged=True), "privileged"),
        (lambda s: s["containers"][0]["securityContext"].pop("allowPrivilegeEscalation"), "allowPrivilegeEscalation"),
        (lambda s: s["containers"][0]["securityContext"].update(capabilities={"drop": ["NET_RAW"]}), "drop must contain ALL"),
        (lambda s: s["containers"][0]["securityContext"].update(capabilities={"drop": ["ALL"], "add": ["SYS_ADMIN"]}), "SYS_ADMIN"),
        (lambda s: s["securityContext"].pop("runAsNonRoot"), "runAsNonRoot"),
        (lambda s: s["containers"][0]["securityContext"].update(runAsNonRoot=False), "runAsNonRoot"),
        (lambda s: s["securityContext"].update(runAsUser=0), "runAsUser is 0"),
        (lambda s: s["securityContext"].pop("seccompProfile"), "seccompProfile"),
        (lambda s: s["containers"][0]["securityContext"].update(seccompProfile={"type": "Unconfined"}), "seccompProfile"),
        (lambda s: s["volumes"].append({"name": "host", "hostPath": {"path": "/"}}), "hostPath"),
        (lambda s: s.update(hostNetwork=True), "hostNetwork"),
        (lambda s: s["containers"][0].update(ports=[{"containerPort": 80, "hostPort": 80}]), "hostPort"),
        (lambda s: s.setdefault("initContainers", []).append({"name": "init", "image": "i"}), "initContainers[init]"),
    ],
)
def test_the_checker_refuses_what_the_standard_refuses(change, problem):
    pod = copy.deepcopy(GOOD_POD)
    change(pod["spec"])
    problems = restricted_violations(pod)
    assert any(problem in p for p in problems), problems


def test_the_checker_finds_pods_inside_workloads_and_refuses_objects_without_pods():
    deployment = {"kind": "Deployment", "metadata": {"name": "d"}, "spec": {"template": copy.deepcopy({"spec": GOOD_POD["spec"]})}}
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"]["privileged"] = True
    assert any("spec.template.spec" in p and "privileged" in p for p in restricted_violations(deployment))
    assert restricted_violations({"kind": "ConfigMap", "metadata": {"name": "c"}, "data": {}}) != []
