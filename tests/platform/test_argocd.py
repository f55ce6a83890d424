"""Argo CD health checks (deploy/argocd/kubetune.dev/<Kind>/health.lua) run by a real Lua 5.4
interpreter against sample objects, each a valid object of the kubetune API models, the way
Argo CD runs them (the object in the global `obj`, the script returns {status, message})."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.operator.api import parse_object

REPO = Path(__file__).resolve().parents[2]
ARGOCD = REPO / "deploy" / "argocd"


def lua() -> str:
    found = shutil.which("lua5.4")
    if found is None:
        pytest.skip("lua5.4 not installed (Debian package lua5.4; .ci/run installs it)")
    return found


def to_lua(value: Any) -> str:
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # "..." with \" \\ \n escapes, which Lua reads the same
    if isinstance(value, list):
        return "{" + ", ".join(to_lua(v) for v in value) + "}"
    return "{" + ", ".join(f"[{json.dumps(k)}] = {to_lua(v)}" for k, v in value.items() if v is not None) + "}"


def health(kind: str, obj: dict[str, Any], tmp_path: Path) -> tuple[str, str]:
    parse_object(obj, "sample")  # a real object of the API: the script reads fields that exist
    driver = tmp_path / "driver.lua"
    driver.write_text(
        f"obj = {to_lua(obj)}\n"
        f"local hs = dofile({json.dumps(str(ARGOCD / 'kubetune.dev' / kind / 'health.lua'))})\n"
        'io.write(hs.status, "\\n", hs.message or "", "\\n")\n'
    )
    done = subprocess.run([lua(), str(driver)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    status, message = done.stdout.split("\n", 1)
    return status, message.strip()


def condition(type_: str, status: str, reason: str, message: str) -> dict[str, Any]:
    return {"type": type_, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": "2026-12-01T10:00:00Z", "observedGeneration": 1}


def ftj(status: dict[str, Any] | None = None, generation: int = 1) -> dict[str, Any]:
    doc = yaml.safe_load((REPO / "examples" / "finetune-tiny.yaml").read_text())
    doc["metadata"].update(namespace="ml", generation=generation)
    if status is not None:
        doc["status"] = {"observedGeneration": 1, **status}
    return doc


def test_lua_literal_round_trips_strings_with_quotes(tmp_path):
    driver = tmp_path / "d.lua"
    table = to_lua({"m": 'say "hi"\nback\\slash', "n": [1, 2.5]})
    driver.write_text(f"local t = {table}\nio.write(t.m, '|', t.n[2])")
    assert subprocess.run([lua(), str(driver)], capture_output=True, text=True).stdout == 'say "hi"\nback\\slash|2.5'


@pytest.mark.parametrize(
    "status, generation, expected, words",
    [
        (None, 1, "Progressing", "Waiting for the kubetune operator"),
        ({"phase": "Pending", "conditions": [condition("Created", "True", "Created", "Job created")]}, 1, "Progressing", "Pending"),
        ({"phase": "Queued"}, 1, "Progressing", "Kueue"),
        ({"phase": "Running", "progress": {"step": 40, "totalSteps": 100, "loss": 1.2345, "percent": 40}}, 1,
         "Progressing", "Running: step 40/100, loss 1.234"),
        ({"phase": "Running"}, 2, "Progressing", "generation 2"),
        ({"phase": "Suspended"}, 1, "Suspended", "spec.suspend"),
        ({"phase": "Succeeded", "result": {"finalLoss": 0.5}}, 1, "Healthy", "final loss 0.5"),
        ({"phase": "Failed", "conditions": [
            condition("Created", "True", "Created", "ok"),
            condition("Failed", "True", "BackoffLimitExceeded", "the trainer failed 3 times: see its logs")]},
         1, "Degraded", "BackoffLimitExceeded: the trainer failed 3 times"),
        ({"phase": "Failed", "conditions": [
            condition("Created", "False", "InvalidSpec", "spec.config: invalid config: max_stepz: unknown key")]},
         1, "Degraded", "InvalidSpec: spec.config: invalid config: max_stepz"),
    ],
)
def test_finetunejob_health(tmp_path, status, generation, expected, words):
    got, message = health("FineTuneJob", ftj(status, generation), tmp_path)
    assert got == expected
    assert words in message


def evj(status: dict[str, Any] | None) -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all((REPO / "examples" / "eval-and-serve.yaml").read_text()) if d]
    doc = next(d for d in docs if d["kind"] == "EvalJob")
    doc["metadata"].update(namespace="ml", generation=1)
    if status is not None:
        doc["status"] = status
    return doc


def mdep(status: dict[str, Any] | None) -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all((REPO / "examples" / "eval-and-serve.yaml").read_text()) if d]
    doc = next(d for d in docs if d["kind"] == "ModelDeployment")
    doc["metadata"].update(namespace="ml", generation=3)
    if status is not None:
        doc["status"] = status
    return doc


@pytest.mark.parametrize(
    "status, expected, words",
    [
        (None, "Progressing", "Waiting for the kubetune operator"),
        ({"phase": "Pending", "conditions": [condition("ModelReady", "False", "WaitingForFineTuneJob", "waiting for FineTuneJob demo")]},
         "Progressing", "WaitingForFineTuneJob"),
        ({"phase": "Running"}, "Progressing", "Running"),
        ({"phase": "Succeeded", "result": {"mainMetric": "hellaswag/acc=0.412"}}, "Healthy", "hellaswag/acc=0.412"),
        ({"phase": "Failed", "conditions": [condition("Failed", "True", "DeadlineExceeded", "ran past activeDeadlineSeconds")]},
         "Degraded", "DeadlineExceeded"),
    ],
)
def test_evaljob_health(tmp_path, status, expected, words):
    got, message = health("EvalJob", evj(status), tmp_path)
    assert (got, words in message) == (expected, True), message


@pytest.mark.parametrize(
    "status, expected, words",
    [
        (None, "Progressing", "Waiting for the kubetune operator"),
        ({"phase": "Progressing", "observedGeneration": 3, "ready": "1/2"}, "Progressing", "1/2"),
        ({"phase": "Ready", "observedGeneration": 2, "ready": "2/2"}, "Progressing", "generation 3"),
        ({"phase": "Ready", "observedGeneration": 3, "ready": "2/2", "readyReplicas": 2, "url": "http://chat.ml.svc:8000/v1"},
         "Healthy", "Serving 2/2 at http://chat.ml.svc:8000/v1"),
        ({"phase": "Failed", "observedGeneration": 3, "conditions": [condition("Ready", "False", "ImagePullBackOff", "cannot pull the server image")]},
         "Degraded", "ImagePullBackOff: cannot pull"),
    ],
)
def test_modeldeployment_health(tmp_path, status, expected, words):
    got, message = health("ModelDeployment", mdep(status), tmp_path)
    assert (got, words in message) == (expected, True), message


def test_argocd_cm_snippet_carries_the_same_scripts():
    cm = yaml.safe_load((ARGOCD / "argocd-cm.yaml").read_text())
    assert cm["kind"] == "ConfigMap" and cm["metadata"]["name"] == "argocd-cm"
    for kind in ("FineTuneJob", "EvalJob", "ModelDeployment"):
        script = (ARGOCD / "kubetune.dev" / kind / "health.lua").read_text()
        assert cm["data"][f"resource.customizations.health.kubetune.dev_{kind}"] == script
