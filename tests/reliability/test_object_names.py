"""Object names, judged the same way by the local backend (`kubetune apply`) and by the operator's
admission, as a Kubernetes API server judges them (DNS-1123 subdomains; namespaces DNS-1123 labels);
and every child the planners derive from a valid name is itself a valid name for its kind (Services
and pod hostnames are DNS-1035 labels of at most 63 characters, labels at most 63)."""
from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kubetune.errors import KubetuneError
from kubetune.operator.api import parse_object
from kubetune.operator.deployplanner import plan_deployment
from kubetune.operator.evalplanner import plan_eval
from kubetune.operator.handlers import admission_error
from kubetune.operator.local_pipeline import load_objects
from kubetune.operator.pipeline_handlers import deployment_admission_error, eval_admission_error
from kubetune.operator.planner import ClusterInfo, plan

REPO = Path(__file__).resolve().parents[2]

# The API server's rules, written out independently of operator/api/names.py (apimachinery's
# IsDNS1123Subdomain / IsDNS1123Label / IsDNS1035Label).
SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")

VALID = [
    "demo", "a", "0", "9lives", "my-job", "my.job", "a.b.c", "x" * 63, "x" * 64, "y" * 253,
    ".".join(["z" * 63] * 4)[:253].rstrip("."), "a-" * 50 + "b", "job-1.2.3",
]
INVALID = [
    "Upper_Name", "UPPER", "has_underscore", "-leading", "trailing-", ".dot", "dot.", "a..b", "a.-b", "sp ace",
    "slash/name", "..", "tab\tname", "ünïcode", "colon:name", "z" * 254, "",
]

FINETUNE = yaml.safe_load((REPO / "examples" / "finetune-tiny.yaml").read_text())
EVAL = {"apiVersion": "kubetune.dev/v1alpha1", "kind": "EvalJob", "metadata": {"name": "e", "namespace": "ml"},
        "spec": {"model": {"source": "pvc://models/llama"}, "resources": {"gpusPerNode": 1},
                 "tasks": [{"name": "facts", "type": "multiple_choice", "source": "builtin://tiny_instruct_mc",
                            "options": {"context_field": "question"}}]}}
DEPLOY = {"apiVersion": "kubetune.dev/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": "d", "namespace": "ml"},
          "spec": {"model": {"source": "pvc://models/llama"}, "replicas": 2, "resources": {"gpusPerNode": 1}}}
ADMISSION = {"FineTuneJob": admission_error, "EvalJob": eval_admission_error, "ModelDeployment": deployment_admission_error}


def named(doc, name, namespace="ml"):
    doc = copy.deepcopy(doc)
    doc["metadata"] = {"name": name, "namespace": namespace}
    return doc


def local_verdict(tmp_path, doc):
    """What `kubetune apply` decides before running anything (its manifest loader)."""
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(doc))
    try:
        load_objects([str(path)])
    except KubetuneError as err:
        return str(err)
    return None


@pytest.mark.parametrize("kind", ADMISSION)
@pytest.mark.parametrize("name", VALID + INVALID, ids=lambda n: repr(n)[:30])
def test_the_local_backend_and_admission_give_the_same_verdict(tmp_path, kind, name):
    doc = named({"FineTuneJob": FINETUNE, "EvalJob": EVAL, "ModelDeployment": DEPLOY}[kind], name)
    api_server_accepts = len(name) <= 253 and bool(SUBDOMAIN.match(name))
    local, admission = local_verdict(tmp_path, doc), ADMISSION[kind](doc)
    if api_server_accepts:
        assert local is None and admission is None, (local, admission)
    else:
        assert local and admission, (local, admission)
        assert "metadata.name" in local and "metadata.name" in admission
        assert any(why in local for why in ("DNS-1123", "at most 253", "at least 1 character"))
        # The same sentence from both paths (only the source prefix differs).
        assert local.split("metadata.name:", 1)[1] == admission.split("metadata.name:", 1)[1]


@pytest.mark.parametrize("namespace", ["ml", "team-a", "Bad_NS", "a.b", "n" * 64])
def test_namespaces_are_dns_labels_on_both_paths(tmp_path, namespace):
    doc = named(FINETUNE, "demo", namespace)
    ok = len(namespace) <= 63 and re.match(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", namespace)
    local, admission = local_verdict(tmp_path, doc), admission_error(doc)
    assert (local is None) == (admission is None) == bool(ok), (local, admission)
    if not ok:
        assert "metadata.namespace" in local and "DNS-1123 label" in local


def test_kubetune_apply_refuses_upper_name_with_exit_2_before_running(tmp_path):
    path = tmp_path / "upper.yaml"
    path.write_text(yaml.safe_dump(named(FINETUNE, "Upper_Name")))
    result = subprocess.run([sys.executable, "-m", "kubetune", "apply", "-f", str(path), "--runs-dir", str(tmp_path / "runs")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert "metadata.name" in result.stderr and "'upper-name'" in result.stderr  # the field and the fix
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def child_name_problems(objects):
    problems = []
    for obj in objects:
        meta = obj["metadata"]
        name, kind = meta["name"], obj["kind"]
        if not (len(name) <= 253 and SUBDOMAIN.match(name)):
            problems.append(f"{kind} {name}: not a DNS-1123 subdomain")
        # Services, and workloads whose names become pod hostnames, need 63-char DNS-1035 labels.
        if kind in ("Service", "Job", "JobSet", "TrainJob", "PyTorchJob", "Deployment") and not (len(name) <= 63 and LABEL_1035.match(name)):
            problems.append(f"{kind} {name}: not a DNS-1035 label of <= 63 chars")
        for key, value in meta.get("labels", {}).items():
            if len(value) > 63 or not LABEL_VALUE.match(value):
                problems.append(f"{kind} {name}: label {key}={value!r} is not a label value")
    return problems


@pytest.mark.parametrize("name", VALID, ids=lambda n: repr(n)[:30])
def test_every_child_planned_from_a_valid_name_is_valid_for_its_kind(name):
    cluster = ClusterInfo(has_pytorchjob=True, has_jobset=True, has_trainjob=True)
    objects = []
    job = parse_object(named(FINETUNE, name), "test")
    for backend in ("job", "jobset", "pytorchjob", "trainjob"):
        objects += plan(job, cluster, backend=backend)
    objects += plan_eval(parse_object(named(EVAL, name), "test"))
    objects += plan_deployment(parse_object(named(DEPLOY, name), "test"))
    assert {o["kind"] for o in objects} >= {"ConfigMap", "Service", "Job", "JobSet", "PyTorchJob", "TrainJob", "Deployment"}
    assert child_name_problems(objects) == []
