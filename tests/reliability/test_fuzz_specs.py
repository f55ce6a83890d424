"""Property-based fuzzing (hypothesis) of FineTuneJob, EvalJob and ModelDeployment manifests through
admission and the planners (issue #25): every input is either accepted and then planned by every
backend into objects a Kubernetes API server accepts, or refused with a message naming the field;
never any other exception (which the webhook would turn into a 500, and the reconciler into a
retry loop).

Inputs are the examples/ manifests with 1-3 mutations: a value replaced by one of a hostile set
(wrong types, huge and negative numbers, NaN, path escapes, shell metacharacters, unicode), a key
removed, an unknown key added. CI runs a few dozen examples per kind; `-m slow` runs thousands."""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubetune.errors import KubetuneError
from kubetune.operator.api import parse_object
from kubetune.operator.deployplanner import plan_deployment
from kubetune.operator.evalplanner import plan_eval
from kubetune.operator.handlers import admission_error
from kubetune.operator.pipeline_handlers import deployment_admission_error, eval_admission_error
from kubetune.operator.planner import ClusterInfo, plan
from scheduling_cases import with_scheduling

REPO = Path(__file__).resolve().parents[2]
BACKENDS = ("job", "pytorchjob", "jobset", "trainjob")
BUILTIN_KINDS = {"ConfigMap", "Service", "Job", "Deployment", "HorizontalPodAutoscaler", "NetworkPolicy"}
ADMISSION = {"FineTuneJob": admission_error, "EvalJob": eval_admission_error, "ModelDeployment": deployment_admission_error}


def seeds() -> dict[str, list[dict[str, Any]]]:
    """Every kubetune manifest in examples/, by kind."""
    out: dict[str, list[dict[str, Any]]] = {kind: [] for kind in ADMISSION}
    for path in sorted((REPO / "examples").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("apiVersion") == "kubetune.dev/v1alpha1" and doc.get("kind") in out:
                doc.setdefault("metadata", {}).setdefault("namespace", "ml")
                out[doc["kind"]].append(doc)
    for kind, docs in out.items():  # and one with every toleration and affinity field, to mutate those
        docs.append(with_scheduling(docs[0]))
    return out


SEEDS = seeds()

HOSTILE_STRINGS = [
    "", " ", "..", "../../etc/passwd", "/etc/passwd", "pvc://", "pvc://claim/../../other", "pvc://../x", "pvc://Claim_Bad/x",
    "s3://", "s3://bucket/../../x", "hf://", "hf://../../x", "file:///etc/shadow", "http://169.254.169.254/latest",
    "builtin://../tiny", "$(cat /var/run/secrets/kubernetes.io/serviceaccount/token)", "; rm -rf / #", "`id`", "a\nb",
    "x" * 300, "UPPER_case", "0", "-1", "1e309", "NaN", "true", "null", "\x00", "\u202e", "ünïcode", "{{ .Values }}",
    "${HOME}", "--help", "-rf",
]
VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**64),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(HOSTILE_STRINGS), st.text(max_size=12),
    st.lists(st.sampled_from([0, "x", None, {}]), max_size=3), st.dictionaries(st.sampled_from(["a", "name", "source", "key"]), st.integers(), max_size=2),
)


def paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path into a manifest (dict keys and list indexes)."""
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            out += paths(value, prefix + (key,))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            out += paths(value, prefix + (index,))
    return out


def _parent(doc: Any, path: tuple) -> Any:
    for part in path[:-1]:
        doc = doc[part]
    return doc


@st.composite
def mutated(draw, kind: str) -> tuple[dict[str, Any], list[tuple]]:
    doc = copy.deepcopy(draw(st.sampled_from(SEEDS[kind])))
    touched: list[tuple] = []
    for _ in range(draw(st.integers(1, 3))):
        # spec.tolerations and spec.affinity included: typed as in a pod spec (operator/api/scheduling.py),
        # a bad value there is refused here, not by the API server when the workload is created
        candidates = [p for p in paths(doc) if p[:1] in (("spec",), ("metadata",))]
        if not candidates:
            break
        path = draw(st.sampled_from(candidates))
        parent = _parent(doc, path)
        operation = draw(st.sampled_from(["set", "set", "set", "delete", "add"]))
        if operation == "delete":
            if isinstance(parent, list):
                parent.pop(path[-1])
            else:
                del parent[path[-1]]
        elif operation == "add" and isinstance(parent, dict):
            key = draw(st.sampled_from(["bogus", "Source", "command", "args", "securityContext", "trust_remote_code", "privileged"]))
            parent[key] = draw(VALUES)
            path = path[:-1] + (key,)
        else:
            parent[path[-1]] = draw(VALUES)
        touched.append(path)
    return doc, touched


def names_a_field(message: str, touched: list[tuple]) -> bool:
    """The refusal names the field (or one of its parents: a field that became the wrong type
    takes its parent's rule with it, e.g. `spec.resources: ...`)."""
    words = {str(part) for path in touched for part in path if isinstance(part, str)}
    return any(word in message for word in words) or "spec" in message or "metadata" in message


def api_server_accepts(objects: list[dict[str, Any]]) -> None:
    """Built-in kinds validated against Kubernetes 1.30's OpenAPI schema (strict: no unknown
    fields); the CRD kinds (PyTorchJob, JobSet, TrainJob) at least serialize as JSON."""
    import json

    for obj in objects:
        json.dumps(obj, allow_nan=False)  # a NaN or infinity cannot reach the API server
        if obj["kind"] in BUILTIN_KINDS:
            kubernetes_validate.validate(obj, "1.30.0", strict=True)


def plan_everywhere(kind: str, obj: Any) -> list[dict[str, Any]]:
    """Every plan the operator could make of an accepted object: each FineTuneJob backend; an
    EvalJob or ModelDeployment referring to a FineTuneJob, with a succeeded one."""
    from pipeline_objects import succeeded_finetunejob

    if kind == "FineTuneJob":
        out = []
        for backend in BACKENDS:
            try:
                out += plan(obj, ClusterInfo(), backend=backend)
            except KubetuneError as err:  # a backend that cannot run this spec says which field
                assert "spec" in str(err), (backend, str(err))
        return out
    ref = obj.spec.fine_tune_job.name if obj.spec.fine_tune_job is not None else None
    ftj = succeeded_finetunejob(ref, obj.metadata.namespace or "ml") if ref else None
    try:
        return plan_eval(obj, ftj) if kind == "EvalJob" else plan_deployment(obj, ftj)
    except KubetuneError as err:  # e.g. what the referenced job produced does not fit
        assert "spec" in str(err), str(err)
        return []


def check(kind: str, doc: dict[str, Any], touched: list[tuple]) -> None:
    error = ADMISSION[kind](copy.deepcopy(doc))  # never raises: a refusal is a message
    if error is not None:
        assert isinstance(error, str) and error.strip()
        assert names_a_field(error, touched), (touched, error)
        return
    obj = parse_object(copy.deepcopy(doc), "fuzz")
    api_server_accepts(plan_everywhere(kind, obj))


FAST = settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
THOROUGH = settings(max_examples=int(os.environ.get("KUBETUNE_FUZZ_EXAMPLES", "1500")), deadline=None, suppress_health_check=list(HealthCheck))


def _test(kind: str, profile: settings):
    @profile
    @given(case=mutated(kind))
    def run(case):
        check(kind, *case)

    return run


@pytest.fixture(autouse=True, scope="module")
def _platform_helpers():
    import sys

    sys.path.insert(0, str(REPO / "tests" / "platform"))
    yield


@pytest.mark.parametrize("kind", sorted(ADMISSION))
def test_fuzzed_specs_are_planned_or_refused_naming_the_field(kind):
    _test(kind, FAST)()


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("kind", sorted(ADMISSION))
def test_fuzzed_specs_thoroughly(kind):
    _test(kind, THOROUGH)()


def test_the_seeds_are_all_accepted_and_planned():
    """The fuzzer starts from valid manifests (else it tests only refusals)."""
    assert all(SEEDS.values()), {k: len(v) for k, v in SEEDS.items()}
    for kind, docs in SEEDS.items():
        for doc in docs:
            assert ADMISSION[kind](copy.deepcopy(doc)) is None, doc["metadata"]
            assert plan_everywhere(kind, parse_object(copy.deepcopy(doc), "seed"))


# --- the same through kopf's webhook server, as the API server calls it ----------------------

WEBHOOK_PATHS = {"FineTuneJob": "validate-finetunejob", "EvalJob": "validate-evaljob", "ModelDeployment": "validate-modeldeployment"}


def admission_review(kind: str, operation: str, new: Any, old: Any = None) -> dict[str, Any]:
    name = new.get("metadata", {}).get("name") if isinstance(new, dict) and isinstance(new.get("metadata"), dict) else "x"
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": "fuzz", "operation": operation, "object": new, "oldObject": old, "dryRun": False,
        "kind": {"group": "kubetune.dev", "version": "v1alpha1", "kind": kind},
        "resource": {"group": "kubetune.dev", "version": "v1alpha1", "resource": kind.lower() + "s"},
        "namespace": "ml", "name": name if isinstance(name, str) else "x",
        "userInfo": {"username": "alice", "groups": ["system:authenticated"]}, "options": {}}}


def fuzzed_documents(kind: str, count: int) -> list[tuple[dict[str, Any], list[tuple]]]:
    import warnings

    from hypothesis.errors import NonInteractiveExampleWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonInteractiveExampleWarning)
        return [mutated(kind).example() for _ in range(count)]


@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_the_webhook_answers_fuzzed_and_malformed_reviews_without_a_500(operator, emulator):
    """kopf's webhook server with the operator's handlers: a refusal is `allowed: false` with a
    4xx code and a message naming the field; nothing is ever a 5xx (the API server would then
    refuse everything, failurePolicy Fail), whatever the object looks like."""
    import asyncio
    import socket

    import aiohttp
    import kopf

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = kopf.WebhookServer(addr="127.0.0.1", port=port, insecure=True)
    for kind in ADMISSION:  # the requester may use what the examples name (tenancy is tested elsewhere)
        for verb, resource in (("get", "secrets"), ("get", "persistentvolumeclaims"), ("impersonate", "serviceaccounts")):
            emulator.grant("alice", verb, resource, "ml")
    cases: list[tuple[str, dict[str, Any], list[tuple]]] = []
    for kind in ADMISSION:
        # metadata that is not a mapping: kopf itself fails on it (kopf/_core/reactor/inventory.py
        # reads metadata.uid) before any handler; an API server never sends one (it validates
        # metadata before calling validating webhooks), so it is left out here.
        cases += [(kind, *case) for case in fuzzed_documents(kind, 8) if isinstance(case[0].get("metadata"), dict)]
        seed = copy.deepcopy(SEEDS[kind][0])
        broken = [({**seed, "metadata": {"name": "Bad_Name", "namespace": "ml"}}, [("metadata",)]), ({**seed, "spec": "a string"}, [("spec",)]),
                  ({**seed, "spec": None}, [("spec",)]), ({k: v for k, v in seed.items() if k != "spec"}, [("spec",)])]
        cases += [(kind, doc, touched) for doc, touched in broken]
    answers = []
    async with operator(webhook=server, admission=True), aiohttp.ClientSession() as http:
        for kind, doc, touched in cases:
            url = f"http://127.0.0.1:{port}/{WEBHOOK_PATHS[kind]}"
            for _ in range(100):  # the server starts with the operator
                try:
                    async with http.post(url, json=admission_review(kind, "CREATE", doc)) as resp:
                        text = await resp.text()
                        assert resp.status == 200, (kind, doc, resp.status, text[:500])
                        answers.append((kind, doc, touched, resp.status, json.loads(text)))
                    break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.1)
            else:
                raise AssertionError("the webhook never answered")
    for kind, doc, touched, http_status, body in answers:
        response = body["response"]
        assert http_status == 200, (kind, doc, body)
        if response["allowed"]:
            assert ADMISSION[kind](copy.deepcopy(doc)) is None
            continue
        code, message = response["status"]["code"], response["status"]["message"]
        assert 400 <= code < 500, (kind, doc, response)
        assert names_a_field(message, touched), (touched, message)
