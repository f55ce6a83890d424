"""The security walk (issue #25): one pass over every object the operator plans (all three kinds,
every FineTuneJob backend, with the initializers that fetch hf:// and s3:// sources, every pod
option that references a Secret) and every object the Helm chart renders (all its scenarios):

- every pod meets the restricted Pod Security Standard (tests/pss.py);
- RBAC names no wildcard;
- containers run argument lists: no shell (`sh -c`, `bash -c`) anywhere, and a spec string
  planted with shell metacharacters reaches argv only as one whole argument or a file;
- Secrets are referenced, never copied: no planned object carries a Secret's value.

Then, over real HTTP against the emulator, a planted Secret value must appear in nothing the
operator writes (objects, status, events, ConfigMaps) nor in its logs, even with the pods' own
termination messages in play; `trust_remote_code` is never used by the product; sources are
limited to the documented schemes and pvc:// paths cannot leave their volume; and a tenant in
one namespace cannot make the operator read or write another namespace's objects.

The chart parts need helm-python-sdk (dev extra); the rest runs everywhere."""
from __future__ import annotations

import ast
import asyncio
import base64
import copy
import logging
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from ophelpers import eventually

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "platform"))
sys.path.insert(0, str(REPO / "tests"))

from pipeline_objects import pipeline_objects  # noqa: E402
from pss import pod_specs, restricted_violations  # noqa: E402

from kubetune.errors import KubetuneError  # noqa: E402
from kubetune.operator.api import parse_object  # noqa: E402
from kubetune.operator.deployplanner import plan_deployment  # noqa: E402
from kubetune.operator.evalplanner import plan_eval  # noqa: E402
from kubetune.operator.handlers import admission_error  # noqa: E402
from kubetune.operator.pipeline_handlers import deployment_admission_error, eval_admission_error  # noqa: E402
from kubetune.operator.planner import ClusterInfo, plan  # noqa: E402

SHELLS = {"sh", "bash", "ash", "dash", "zsh", "/bin/sh", "/bin/bash", "/usr/bin/env"}
PLANTED = "s3cr3t-PLANTED-value-7f3a"  # a Secret's value: must never show up in what the operator writes
SHELL_BAIT = "x$(touch /tmp/pwned);`id`|| true"  # a spec string with shell metacharacters
BACKENDS = ("job", "pytorchjob", "jobset", "trainjob")


def examples(kind: str) -> list[dict[str, Any]]:
    found = []
    for path in sorted((REPO / "examples").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == kind and doc.get("apiVersion") == "kubetune.dev/v1alpha1":
                doc["metadata"].setdefault("namespace", "ml")
                doc["metadata"]["uid"] = "uid-1"
                found.append(doc)
    return found


def with_every_secret_reference(doc: dict[str, Any]) -> dict[str, Any]:
    """The job with each way a spec names a Secret, an hf:// model and s3:// data (so the
    initializers are planned), and shell bait in a free-text config string."""
    doc = copy.deepcopy(doc)
    spec = doc["spec"]
    spec["secrets"] = {"hfToken": {"name": "hf-token", "key": "token"}, "s3": {"name": "s3-creds"}}
    spec["env"] = [{"name": "WANDB_API_KEY", "secretKeyRef": {"name": "wandb", "key": "key"}}, {"name": "NOTE", "value": SHELL_BAIT}]
    return doc


def planned_objects() -> list[dict[str, Any]]:
    objects: list[dict[str, Any]] = []
    for doc in examples("FineTuneJob"):
        for variant in (doc, with_every_secret_reference(doc)):
            variant = copy.deepcopy(variant)
            if variant is not doc:
                variant["spec"]["model"] = {"source": "hf://org/model"}
                variant["spec"]["dataset"] = {**variant["spec"].get("dataset", {}), "source": "s3://bucket/data.jsonl"}
            job = parse_object(variant, "walk")
            for backend in BACKENDS:
                try:
                    objects += plan(job, ClusterInfo(has_pytorchjob=True, has_jobset=True), backend=backend)
                except KubetuneError:
                    pass  # a backend that cannot run this spec refuses it (tests/operator/test_operator_backends.py)
    objects += pipeline_objects()
    objects += plan_eval(parse_object(copy.deepcopy(EVJ), "walk"))
    remote_tasks = with_every_secret_reference(EVJ)  # task files the initializer fetches, one named as shell bait
    remote_tasks["spec"]["tasks"] = [{**EVJ["spec"]["tasks"][0], "source": f"s3://bucket/evals/{SHELL_BAIT}.jsonl"},
                                     {**EVJ["spec"]["tasks"][0], "name": "hub", "source": "hf://org/evals/mc/test.jsonl@v1"}]
    objects += plan_eval(parse_object(remote_tasks, "walk"))
    for kind, planner in (("EvalJob", plan_eval), ("ModelDeployment", plan_deployment)):
        for doc in examples(kind):
            if (doc["spec"].get("fineTuneJob")) is None:
                objects += planner(parse_object(with_every_secret_reference(doc) if kind == "ModelDeployment" else doc, "walk"))
    return objects


def chart_objects() -> list[dict[str, Any]]:
    pytest.importorskip("helm_python", reason="helm-python-sdk (dev extra) renders the chart")
    from test_chart import SCENARIOS, render

    return [obj for values in SCENARIOS.values() for obj in render(values)]


def containers(obj: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for where, spec in pod_specs(obj):
        for group in ("initContainers", "containers"):
            for container in spec.get(group) or []:
                yield f"{obj['kind']} {obj['metadata'].get('name')} {where} {group}/{container['name']}", container


@pytest.fixture(scope="module")
def walked() -> list[dict[str, Any]]:
    return planned_objects()


def test_the_walk_covers_every_kind_backend_and_initializer(walked):
    kinds = {obj["kind"] for obj in walked}
    assert {"Job", "PyTorchJob", "JobSet", "TrainJob", "ConfigMap", "Service", "Deployment", "NetworkPolicy"} <= kinds, kinds
    assert any(c.get("name", "").startswith("initializer") or "initializer" in c.get("name", "")
               for obj in walked for _, spec in pod_specs(obj) for c in spec.get("initContainers") or []), "no initializer planned"


def check_objects(objects: list[dict[str, Any]]) -> None:
    for obj in objects:
        assert not restricted_violations(obj) or not list(pod_specs(obj)), (obj["kind"], restricted_violations(obj))
        if obj["kind"] in ("Role", "ClusterRole"):
            for rule in obj.get("rules") or []:
                for field in ("apiGroups", "resources", "verbs"):
                    assert "*" not in rule.get(field, []), (obj["metadata"]["name"], rule)
        for where, container in containers(obj):
            argv = list(container.get("command") or []) + list(container.get("args") or [])
            assert all(isinstance(arg, str) for arg in argv), where
            # no shell at all (a fixed `python -c` script of the chart's test pod carries no spec string)
            assert not (argv and argv[0].rsplit("/", 1)[-1] in {s.rsplit("/", 1)[-1] for s in SHELLS}), (where, argv[:3])
            for arg in argv:  # the bait is a whole argument or nowhere: never spliced into a script
                assert SHELL_BAIT not in arg or arg == SHELL_BAIT or arg.endswith("=" + SHELL_BAIT), (where, arg)
            for env in container.get("env") or []:
                assert "value" not in env or PLANTED not in env["value"]
        if obj["kind"] == "Secret":
            raise AssertionError(f"the operator plans a Secret: {obj['metadata']['name']}")


def test_every_planned_object_is_restricted_argv_only_and_references_secrets(walked):
    check_objects(walked)
    for obj in walked:  # Secrets by reference: secretKeyRef / secretRef / secret volumes only
        text = yaml.safe_dump(obj)
        assert "hf-token" not in text or "secretKeyRef" in text or "secretName" in text or "secretRef" in text, obj["kind"]


def test_every_object_the_chart_renders_is_restricted_argv_only_and_without_wildcards():
    objects = chart_objects()
    assert {"ClusterRole", "Deployment"} <= {o["kind"] for o in objects}
    check_objects([o for o in objects if o["kind"] != "Secret"])


# --- product code: no trust_remote_code, no shell ---------------------------------------------

PRODUCT = [REPO / "kubetune", REPO / "trainer", REPO / "operator"]


def product_sources() -> Iterator[tuple[Path, ast.AST]]:
    for root in PRODUCT:
        for path in sorted(root.rglob("*.py")):
            yield path, ast.parse(path.read_text(), str(path))


def test_trust_remote_code_is_never_turned_on_and_nothing_runs_a_shell():
    """No call passes trust_remote_code=True (or a variable), and no subprocess runs with
    shell=True or os.system: a model repository's code never runs, no string reaches a shell."""
    offences = []
    for path, tree in product_sources():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            for kw in node.keywords:
                if kw.arg == "trust_remote_code" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                    offences.append(f"{path}:{node.lineno} trust_remote_code={ast.unparse(kw.value)}")
                if kw.arg == "shell" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                    offences.append(f"{path}:{node.lineno} shell={ast.unparse(kw.value)}")
            name = ast.unparse(node.func)
            if name in ("os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput"):
                offences.append(f"{path}:{node.lineno} {name}")
    assert not offences, offences


def test_loaders_never_run_a_model_repositorys_code(tmp_path):
    """A model folder whose config asks for custom code (auto_map, and a module beside it): the
    trainer's loader (its own, not transformers' Auto classes) loads the weights of a supported
    architecture and never imports the module; an unknown architecture is refused by name."""
    import json

    from kubetune.trainer.builtin import resolve_model_path
    from kubetune.trainer.checkpoint.hf import load_pretrained

    tiny = resolve_model_path("builtin://tiny")
    folder = tmp_path / "remote-code-model"
    folder.mkdir()
    for item in tiny.iterdir():
        if item.is_file():
            (folder / item.name).write_bytes(item.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text("import pathlib\npathlib.Path(__file__).with_name('RAN').write_text('x')\n")
    load_pretrained(folder)
    config["architectures"] = ["EvilModel"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(KubetuneError, match="unsupported architecture EvilModel"):
        load_pretrained(folder)
    assert not (folder / "RAN").exists()


# --- sources: documented schemes, no escape from a volume ---------------------------------------

FTJ = examples("FineTuneJob")[0]
EVJ = {"apiVersion": "kubetune.dev/v1alpha1", "kind": "EvalJob", "metadata": {"name": "e", "namespace": "ml", "uid": "uid-1"},
       "spec": {"model": {"source": "pvc://models/llama"}, "resources": {"gpusPerNode": 1},
                "tasks": [{"name": "facts", "type": "multiple_choice", "source": "builtin://tiny_instruct_mc", "options": {"context_field": "question"}}]}}
MDEP = next(d for d in examples("ModelDeployment") if d["spec"].get("model"))


def with_source(doc: dict[str, Any], field: str, source: str) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    node = doc["spec"]
    *parents, last = field.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = source
    return doc


SOURCE_FIELDS = [
    (FTJ, admission_error, "model.source"), (FTJ, admission_error, "dataset.source"), (FTJ, admission_error, "output.source"),
    (EVJ, eval_admission_error, "model.source"), (MDEP, deployment_admission_error, "model.source"),
]
UNDOCUMENTED = ["http://example.com/model", "https://example.com/x", "ftp://h/x", "gs://bucket/x", "ssh://h/x", "javascript:alert(1)"]
ESCAPES = ["pvc://claim/../../etc", "pvc://claim/a/../../../var/run/secrets", "pvc://claim/..", "pvc://../x", "pvc://Claim_Upper/x", "pvc:///abs"]


@pytest.mark.parametrize("source", UNDOCUMENTED + ESCAPES)
@pytest.mark.parametrize("doc,admit,field", SOURCE_FIELDS, ids=lambda v: v if isinstance(v, str) else "")
def test_sources_outside_the_documented_schemes_or_their_volume_are_refused_naming_the_field(doc, admit, field, source):
    error = admit(with_source(doc, field, source))
    assert error is not None, f"spec.{field}: {source!r} was accepted"
    assert f"spec.{field.split('.')[0]}" in error, error


def test_a_pvc_path_is_always_inside_its_mount():
    from kubetune.operator.sources import map_cluster_source

    for sub in ("a/b", "./a//b/", "a/./b", ""):
        mapped = map_cluster_source(f"pvc://claim/{sub}", "data", "spec.dataset.source")
        assert mapped.path == "/mnt/data" or mapped.path.startswith("/mnt/data/"), mapped.path
        assert "/./" not in mapped.path and "//" not in mapped.path


# --- over HTTP: planted secrets, other namespaces -----------------------------------------------

def secret(name: str, namespace: str, **values: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": namespace},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in values.items()}}


@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_a_planted_secret_value_appears_in_nothing_the_operator_writes_or_logs(api, operator, emulator, caplog):
    """Secrets referenced every way a spec can, holding a known value; jobs of all three kinds
    run to a phase, a pod ends with a termination message; then every request body the operator
    sent, every object it left, and its log are searched for the value (plain and base64)."""
    from kube_emulator import RESOURCES
    from ophelpers import NS, OPERATOR_TOKEN, manifest

    emulator.declare({"v1/secrets": {"kind": "Secret", "namespaced": True}, "networking.k8s.io/v1/networkpolicies": {"kind": "NetworkPolicy", "namespaced": True}})
    assert "v1/pods" in RESOURCES
    for name, key in (("hf-token", "token"), ("s3-creds", "AWS_SECRET_ACCESS_KEY"), ("wandb", "key"), ("api-keys", "keys")):
        await api.post(f"/api/v1/namespaces/{NS}/secrets", secret(name, NS, **{key: PLANTED}))
    ftj = with_every_secret_reference(manifest())
    evj = copy.deepcopy(EVJ)
    evj["metadata"] = {"name": "walk-eval", "namespace": NS}
    evj["spec"]["secrets"] = {"hfToken": {"name": "hf-token", "key": "token"}}
    mdep = copy.deepcopy(MDEP)
    mdep["metadata"] = {"name": "walk-serve", "namespace": NS}
    mdep["spec"]["apiKeySecret"] = {"name": "api-keys", "key": "keys"}
    caplog.set_level(logging.DEBUG)
    async with operator():
        await api.create_ftj(ftj)
        await api.post(f"/apis/kubetune.dev/v1alpha1/namespaces/{NS}/evaljobs", evj)
        await api.post(f"/apis/kubetune.dev/v1alpha1/namespaces/{NS}/modeldeployments", mdep)
        await eventually(lambda: api.status("tiny").get("phase") == "Pending", what="the FineTuneJob planned")
        (job,) = [j for j in api.children("batch/v1/jobs") if j["metadata"]["name"] == "tiny"]
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {
            "name": "tiny-0-x", "namespace": NS, "labels": {**job["spec"]["template"]["metadata"]["labels"], "batch.kubernetes.io/job-completion-index": "0"},
            "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": "tiny", "uid": job["metadata"]["uid"], "controller": True}]},
            "spec": {"containers": [{"name": "trainer", "image": "x"}]}}
        await api.post(f"/api/v1/namespaces/{NS}/pods", pod)
        await api.patch(f"/api/v1/namespaces/{NS}/pods/tiny-0-x/status", {"status": {"phase": "Failed", "containerStatuses": [{
            "name": "trainer", "state": {"terminated": {"exitCode": 1, "reason": "Error", "message": "RuntimeError: boom"}}}]}})
        await api.patch(f"/apis/batch/v1/namespaces/{NS}/jobs/tiny/status", {"status": {"failed": 1, "conditions": [
            {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "backoff"}]}})
        await eventually(lambda: api.status("tiny").get("phase") == "Failed", what="the FineTuneJob failed")
        await eventually(lambda: emulator.objects["kubetune.dev/v1alpha1/modeldeployments", NS, "walk-serve"].raw.get("status"), what="deployment status")
    encoded = base64.b64encode(PLANTED.encode()).decode()
    sent = [r for r in emulator if r.headers.get("Authorization") == f"Bearer {OPERATOR_TOKEN}" and r.method.value in ("POST", "PATCH", "PUT")]
    assert sent, "the operator wrote nothing"
    for request in sent:
        assert PLANTED not in request.text and encoded not in request.text, request.url.path
    for (resource, _ns, _name), obj in emulator.objects.items():
        if getattr(resource, "plural", "") == "secrets" or obj.deleted:
            continue
        text = yaml.safe_dump(obj.raw)
        assert PLANTED not in text and encoded not in text, resource
    assert PLANTED not in caplog.text and encoded not in caplog.text
    secret_reads = [r.url.path for r in emulator if "/secrets" in r.url.path and r.headers.get("Authorization") == f"Bearer {OPERATOR_TOKEN}"]
    assert not secret_reads, secret_reads  # the operator never even reads a Secret


@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_a_tenant_cannot_make_the_operator_touch_another_namespace(api, operator, emulator):
    """Objects in team-b naming things that exist only in team-a (a FineTuneJob, an EvalJob, a
    claim, a Secret): the operator reads and writes only team-b, and says the reference is missing."""
    from ophelpers import OPERATOR_TOKEN, manifest

    emulator.declare({"networking.k8s.io/v1/networkpolicies": {"kind": "NetworkPolicy", "namespaced": True}})
    victim = manifest(**{"metadata.name": "victim", "metadata.namespace": "team-a", "spec.output": {"source": "pvc://team-a-outputs/victim"}})
    await api.create_ftj(victim)
    evj = copy.deepcopy(EVJ)
    evj["metadata"] = {"name": "thief", "namespace": "team-b"}
    evj["spec"].pop("model", None)
    evj["spec"]["fineTuneJob"] = {"name": "victim"}
    mdep = copy.deepcopy(MDEP)
    mdep["metadata"] = {"name": "thief", "namespace": "team-b"}
    mdep["spec"].pop("model", None)
    mdep["spec"]["fineTuneJob"] = {"name": "victim"}
    mdep["spec"]["promotion"] = {"evalJob": "victim-eval", "metric": "arc_easy/acc", "min": 0.5}
    async with operator():
        await eventually(lambda: api.status("victim").get("phase") == "Pending", what="team-a's job planned")
        await asyncio.sleep(1.0)  # team-a's own job settles: its sync writes nothing more
        since = len(list(emulator))
        await api.post("/apis/kubetune.dev/v1alpha1/namespaces/team-b/evaljobs", evj)
        await api.post("/apis/kubetune.dev/v1alpha1/namespaces/team-b/modeldeployments", mdep)
        thief = lambda plural: emulator.objects[f"kubetune.dev/v1alpha1/{plural}", "team-b", "thief"].raw.get("status") or {}  # noqa: E731
        await eventually(lambda: thief("evaljobs").get("conditions") and thief("modeldeployments").get("conditions"), what="statuses")
    for plural in ("evaljobs", "modeldeployments"):
        text = str(thief(plural).get("conditions"))
        assert "victim" in text and ("not found" in text or "does not exist" in text or "waiting" in text.lower()), text
    about_thief = [r for r in list(emulator)[since:] if r.headers.get("Authorization") == f"Bearer {OPERATOR_TOKEN}"
                   and "/namespaces/team-a/" in r.url.path and r.method.value != "GET"]
    assert not about_thief, [f"{r.method.value} {r.url.path}" for r in about_thief]  # no write into team-a
    reads_of_a = {r.url.path for r in list(emulator)[since:] if r.headers.get("Authorization") == f"Bearer {OPERATOR_TOKEN}"
                  and r.method.value == "GET" and "/namespaces/team-a/" in r.url.path and "victim" in r.url.path}
    assert not any("finetunejobs/victim" in p for p in reads_of_a), reads_of_a  # team-b's reference looked only in team-b
    for plural in ("batch/v1/jobs", "apps/v1/deployments"):
        assert all(o["metadata"]["namespace"] == "team-a" for o in emulator.live(plural) if "victim" in o["metadata"]["name"])
        assert not emulator.live(plural, "team-b")  # nothing planned from another namespace's job
