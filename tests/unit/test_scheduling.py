"""spec.tolerations and spec.affinity typed as Kubernetes types them (operator/api/scheduling.py):

- every field of core/v1 Toleration and Affinity (recursively, with LabelSelector) is in each
  CRD's schema with the same type, compared with Kubernetes' own OpenAPI definitions (vendored in
  tests/data/upstream, see its README), so no field is dropped or invented;
- good values reach every planned pod (each FineTuneJob backend, EvalJob, ModelDeployment)
  exactly as written;
- bad values are refused naming the field: by the CRD schema (what `kubectl apply` meets), by the
  API models (`kubetune apply` and the operator's admission), and by `kubetune apply` itself.
The CRDs' CEL rules for the cross-field checks are run in tests/operator/test_crd_cel.py."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import kubernetes_validate
import pytest
import yaml

from kubetune.operator.api import KINDS, ManifestError, parse_object
from kubetune.operator.crdgen import build_crd
from kubetune.operator.deployplanner import plan_deployment
from kubetune.operator.evalplanner import plan_eval
from kubetune.operator.handlers import admission_error
from kubetune.operator.pipeline_handlers import deployment_admission_error, eval_admission_error
from kubetune.operator.planner import ClusterInfo, plan
from scheduling_cases import BREAKS, GOOD_AFFINITY, GOOD_TOLERATIONS, replaced, with_scheduling
from upstream_crds import validate_upstream

REPO = Path(__file__).resolve().parents[2]
UPSTREAM = json.loads((REPO / "tests" / "data" / "upstream" / "k8s-v1.37.0-toleration-affinity.json").read_text())["definitions"]
K8S = "io.k8s.api.core.v1."
BACKENDS = ("job", "pytorchjob", "jobset", "trainjob")
BUILTIN = {"Job", "Deployment", "ConfigMap", "Service", "NetworkPolicy", "HorizontalPodAutoscaler"}


def manifests() -> dict[str, dict[str, Any]]:
    """One manifest per kind, each with a model source (nothing to wait for), in a namespace."""
    docs = [d for d in yaml.safe_load_all((REPO / "examples" / "eval-and-serve.yaml").read_text()) if d]
    evj = next(d for d in docs if d["kind"] == "EvalJob")
    evj["spec"].pop("fineTuneJob")
    evj["spec"].pop("baseline")  # a baseline needs a FineTuneJob's starting model
    evj["spec"]["model"] = {"source": "pvc://models/meta-llama/Llama-3.1-8B"}
    mdep = next(d for d in docs if d["kind"] == "ModelDeployment")
    ftj = yaml.safe_load((REPO / "examples" / "finetune-tiny.yaml").read_text())  # every backend can run it
    for doc in (ftj, evj, mdep):
        doc["metadata"]["namespace"] = "ml-team"
        doc["metadata"]["uid"] = "uid-1"
    return {"FineTuneJob": ftj, "EvalJob": evj, "ModelDeployment": mdep}


MANIFESTS = manifests()


def crd_schema(kind: str) -> dict[str, Any]:
    return build_crd(KINDS[kind])["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


# --- every Kubernetes field, with its type ------------------------------------------------------


def upstream_type(prop: dict[str, Any]) -> str:
    """The JSON type of a Kubernetes property ($ref: an object; ["string", "null"]: a string)."""
    if "$ref" in prop:
        return "object"
    types = prop["type"] if isinstance(prop["type"], list) else [prop["type"]]
    (kind,) = [t for t in types if t != "null"]
    return kind


def compare(definition: str, ours: dict[str, Any], where: str) -> Iterator[str]:
    """Differences between a Kubernetes definition and our schema node, recursively."""
    theirs = UPSTREAM[definition]
    assert ours.get("type") == "object", f"{where}: not an object"
    mine = ours.get("properties", {})
    for name in sorted(set(mine) - set(theirs["properties"])):
        yield f"{where}.{name}: not a field of {definition}"
    for name in sorted(set(theirs.get("required", [])) - set(ours.get("required", []))):
        yield f"{where}.{name}: required by Kubernetes, optional here"
    for name, prop in sorted(theirs["properties"].items()):
        if name not in mine:
            yield f"{where}.{name}: missing ({definition} has it)"
            continue
        kind = upstream_type(prop)
        if mine[name].get("type") != kind:
            yield f"{where}.{name}: {mine[name].get('type')} here, {kind} in Kubernetes"
            continue
        if "$ref" in prop:
            yield from compare(prop["$ref"].rsplit("/", 1)[-1], mine[name], f"{where}.{name}")
        elif kind == "array":
            items = prop["items"]
            if "$ref" in items:
                yield from compare(items["$ref"].rsplit("/", 1)[-1], mine[name]["items"], f"{where}.{name}[]")
            elif mine[name]["items"].get("type") != upstream_type(items):
                yield f"{where}.{name}[]: {mine[name]['items'].get('type')} here, {upstream_type(items)} in Kubernetes"
        elif kind == "object":  # a map (matchLabels): its values' type
            values = prop.get("additionalProperties", {})
            if mine[name].get("additionalProperties", {}).get("type") != upstream_type(values):
                yield f"{where}.{name}{{}}: values differ from Kubernetes"


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_field_of_core_v1_toleration_and_affinity_is_in_the_crd_with_its_type(kind):
    spec = crd_schema(kind)["properties"]["spec"]["properties"]
    assert spec["tolerations"]["type"] == "array"
    problems = [*compare(K8S + "Toleration", spec["tolerations"]["items"], "spec.tolerations[]"),
                *compare(K8S + "Affinity", spec["affinity"], "spec.affinity")]
    assert problems == []


def test_the_comparison_sees_a_dropped_a_retyped_and_an_invented_field():
    spec = crd_schema("FineTuneJob")["properties"]["spec"]["properties"]
    term = copy.deepcopy(spec["affinity"])
    anti = term["properties"]["podAntiAffinity"]["properties"]["requiredDuringSchedulingIgnoredDuringExecution"]["items"]
    del anti["properties"]["mismatchLabelKeys"]
    anti["properties"]["namespaces"] = {"type": "string"}
    anti["properties"]["topologyKeys"] = {"type": "string"}
    where = "spec.affinity.podAntiAffinity.requiredDuringSchedulingIgnoredDuringExecution[]"
    assert list(compare(K8S + "Affinity", term, "spec.affinity")) == [
        f"{where}.topologyKeys: not a field of io.k8s.api.core.v1.PodAffinityTerm",
        f"{where}.mismatchLabelKeys: missing (io.k8s.api.core.v1.PodAffinityTerm has it)",
        f"{where}.namespaces: string here, array in Kubernetes",
    ]


def test_the_vendored_definitions_are_the_kubernetes_ones():
    """The test data is what its README says (the Kubernetes types, not a copy of ours)."""
    assert set(UPSTREAM[K8S + "Toleration"]["properties"]) == {"key", "operator", "value", "effect", "tolerationSeconds"}
    assert UPSTREAM[K8S + "PodAffinityTerm"]["required"] == ["topologyKey"]
    assert "Kubernetes v1.37.0" in (REPO / "tests" / "data" / "upstream" / "README.md").read_text()


# --- good values: into every pod as written ------------------------------------------------------


def scheduling_in(objects: list[dict[str, Any]]) -> Iterator[tuple[str, Any]]:
    """Every tolerations and affinity value anywhere in the planned objects (pod templates, the
    TrainJob's pod overrides)."""
    def walk(node: Any) -> Iterator[tuple[str, Any]]:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("tolerations", "affinity"):
                    yield key, value
                else:
                    yield from walk(value)
        elif isinstance(node, list):
            for item in node:
                yield from walk(item)
    for obj in objects:
        yield from walk(obj)


def planned(kind: str, doc: dict[str, Any], backend: str = "job") -> list[dict[str, Any]]:
    obj = parse_object(copy.deepcopy(doc), "test")
    if kind == "FineTuneJob":
        obj = obj.model_copy(update={"spec": obj.spec.model_copy(update={"backend": backend})})
        return plan(obj, ClusterInfo())
    return plan_eval(obj) if kind == "EvalJob" else plan_deployment(obj)


CASES = [("FineTuneJob", backend) for backend in BACKENDS] + [("EvalJob", "job"), ("ModelDeployment", "deployment")]


@pytest.mark.parametrize("kind,backend", CASES)
def test_good_values_reach_every_pod_unchanged(kind, backend):
    objects = planned(kind, with_scheduling(MANIFESTS[kind]), backend)
    found = list(scheduling_in(objects))
    assert sorted({key for key, _ in found}) == ["affinity", "tolerations"]
    for key, value in found:
        assert value == (GOOD_TOLERATIONS if key == "tolerations" else GOOD_AFFINITY), key
    for obj in objects:  # and the API server (its schema; the CRDs' schemas and CEL rules) takes them
        if obj["kind"] in BUILTIN:
            kubernetes_validate.validate(obj, "1.30.0", strict=True)
        else:
            validate_upstream(obj)


def test_fields_left_out_stay_out():
    """Nothing is added: no default operator, no empty lists, no nulls."""
    doc = copy.deepcopy(MANIFESTS["FineTuneJob"])
    doc["spec"]["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "value": None}]
    doc["spec"]["affinity"] = {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": 1, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname"}}]}}
    (pod,) = [template["spec"] for template in pod_templates(planned("FineTuneJob", doc))]
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists"}]
    assert pod["affinity"] == doc["spec"]["affinity"]


def pod_templates(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [obj["spec"]["template"] for obj in objects if obj["kind"] == "Job"]


def test_the_manifests_we_ship_still_parse():
    """Backwards compatibility: every kubetune manifest in examples/ (its tolerations included) is valid."""
    docs = [d for p in sorted((REPO / "examples").rglob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if isinstance(d, dict)]
    ours = [d for d in docs if str(d.get("apiVersion", "")).startswith("kubetune.dev/")]
    assert len(ours) >= 10 and any(d["spec"].get("tolerations") for d in ours)
    for doc in ours:
        parse_object(doc, doc["metadata"]["name"])


# --- bad values: refused naming the field ---------------------------------------------------------

TOL = ("spec", "tolerations", 0)
NODE = ("spec", "affinity", "nodeAffinity", "requiredDuringSchedulingIgnoredDuringExecution")
TERM = ("spec", "affinity", "podAffinity", "requiredDuringSchedulingIgnoredDuringExecution", 0)
PREFERRED = ("spec", "affinity", "nodeAffinity", "preferredDuringSchedulingIgnoredDuringExecution", 0)
# (where, the value put there, the field the refusal names): values the CRD schema refuses by
# itself (patterns, enums, bounds, types, required fields)
SCHEMA_REFUSES = [
    (TOL + ("key",), False, TOL + ("key",)),  # the fuzzer's finding: a boolean key reached the API server
    (TOL + ("key",), "nvidia.com/gpu/extra", TOL + ("key",)),
    (TOL + ("key",), "-gpu", TOL + ("key",)),
    (TOL + ("key",), "x" * 64, TOL + ("key",)),
    (TOL + ("key",), "a" * 254 + "/gpu", TOL + ("key",)),  # a prefix over 253 characters
    (TOL + ("operator",), "exists", TOL + ("operator",)),
    (TOL + ("operator",), "Lt", TOL + ("operator",)),  # alpha in Kubernetes 1.35, behind a feature gate
    (TOL + ("effect",), "NoScheduled", TOL + ("effect",)),
    (TOL + ("value",), "two words", TOL + ("value",)),
    (TOL, {"key": "taint", "effect": "NoExecute", "tolerationSeconds": "an hour"}, TOL + ("tolerationSeconds",)),
    (TOL, {"key": "taint", "effect": "NoExecute", "tolerationSeconds": 2**63}, TOL + ("tolerationSeconds",)),
    (NODE + ("nodeSelectorTerms",), [], NODE + ("nodeSelectorTerms",)),
    (NODE + ("nodeSelectorTerms", 0, "matchExpressions", 0, "operator"), "in", NODE + ("nodeSelectorTerms", 0, "matchExpressions", 0, "operator")),
    (NODE + ("nodeSelectorTerms", 1, "matchFields", 0, "key"), "metadata.labels", NODE + ("nodeSelectorTerms", 1, "matchFields", 0, "key")),
    (NODE + ("nodeSelectorTerms", 1, "matchFields", 0, "values"), ["a", "b"], NODE + ("nodeSelectorTerms", 1, "matchFields", 0, "values")),
    (PREFERRED + ("weight",), 0, PREFERRED + ("weight",)),
    (PREFERRED + ("weight",), 101, PREFERRED + ("weight",)),
    (TERM + ("topologyKey",), "", TERM + ("topologyKey",)),
    (TERM + ("namespaces",), ["ML"], TERM + ("namespaces", 0)),
    (TERM + ("labelSelector", "matchLabels"), {"app": "x" * 64}, TERM + ("labelSelector", "matchLabels", "app")),
    (TERM + ("labelSelector", "matchExpressions", 0, "values"), ["not a label value"], TERM + ("labelSelector", "matchExpressions", 0, "values", 0)),
    (TERM + ("matchLabelKeys",), ["bad key"], TERM + ("matchLabelKeys", 0)),
]


def put(doc: dict[str, Any], path: tuple, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(doc)
    node = out
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return out


def dotted(path: tuple) -> str:
    return ".".join(str(part) for part in path)


def strict(schema: dict[str, Any]) -> dict[str, Any]:
    """Unknown fields rejected, as `kubectl apply` (field validation Strict) does."""
    node = copy.deepcopy(schema)
    if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        node["additionalProperties"] = False
    for name, sub in node.get("properties", {}).items():
        node["properties"][name] = strict(sub)
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            node[key] = strict(node[key])
    return node


def crd_refusals(doc: dict[str, Any]) -> list[tuple]:
    validator = jsonschema.Draft4Validator(strict(crd_schema(doc["kind"])))
    return sorted({tuple(err.absolute_path) for err in validator.iter_errors(doc)}, key=str)


@pytest.mark.parametrize("kind", list(KINDS))
def test_good_values_fit_the_crd_schema(kind):
    assert crd_refusals(with_scheduling(MANIFESTS[kind])) == []


@pytest.mark.parametrize("where,value,field", SCHEMA_REFUSES, ids=lambda v: dotted(v) if isinstance(v, tuple) else None)
def test_bad_values_are_refused_by_the_crd_schema_and_the_api_models(where, value, field):
    for kind, manifest in MANIFESTS.items():
        doc = put(with_scheduling(manifest), where, value)
        assert crd_refusals(doc) == [field], kind
        with pytest.raises(ManifestError) as err:
            parse_object(doc, "test")
        assert f"\n  {dotted(field)}" in str(err.value) or f"\n  {dotted(where)}" in str(err.value), str(err.value)


def test_an_unknown_field_is_refused_naming_it():
    doc = put(with_scheduling(MANIFESTS["FineTuneJob"]), TOL + ("tolerationSecond",), 60)  # a typo
    assert crd_refusals(doc) == [TOL]  # strict field validation: "unknown field" at the toleration
    with pytest.raises(ManifestError, match=r"spec\.tolerations\.0\.tolerationSecond: Extra inputs are not permitted"):
        parse_object(doc, "test")


def test_a_bad_match_labels_key_is_refused_by_the_api_models():
    """The one check the CRD schema cannot make (a map's keys have no pattern there): the operator's
    admission and `kubetune apply` make it."""
    doc = put(with_scheduling(MANIFESTS["FineTuneJob"]), TERM + ("labelSelector", "matchLabels"), {"bad key": "x"})
    with pytest.raises(ManifestError, match=r"spec\.affinity\.podAffinity\.requiredDuringSchedulingIgnoredDuringExecution\.0\.labelSelector\.matchLabels: .*'bad key' is not a label key"):
        parse_object(doc, "test")


def rule_places(kind: str) -> Iterator[tuple[tuple, str, dict[str, Any]]]:
    """(path to the object, the field a rule names, the rule) for every cross-field rule in the CRD."""
    def walk(node: dict[str, Any], path: tuple) -> Iterator[tuple[tuple, str, dict[str, Any]]]:
        for rule in node.get("x-kubernetes-validations", []):
            if "fieldPath" in rule and path[1:2] in (("tolerations",), ("affinity",)):
                yield path, rule["fieldPath"].lstrip("."), rule
        for name, sub in node.get("properties", {}).items():
            yield from walk(sub, path + (name,))
        if isinstance(node.get("items"), dict):
            yield from walk(node["items"], path + (0,))
    yield from walk(crd_schema(kind), ())


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_cross_field_rule_is_also_checked_by_the_api_models_naming_the_field(kind):
    places = list(rule_places(kind))
    assert len(places) >= 40
    for path, field, rule in places:
        doc = replaced(with_scheduling(MANIFESTS[kind]), path, BREAKS[rule["rule"]], items=0)
        with pytest.raises(ManifestError) as err:
            parse_object(doc, "test")
        assert str(err.value).endswith(f"\n  {dotted(path + (field,))}: {rule['message']}"), (path, str(err.value))


@pytest.mark.parametrize("kind,check", [("FineTuneJob", admission_error), ("EvalJob", eval_admission_error),
                                        ("ModelDeployment", deployment_admission_error)])
def test_admission_refuses_naming_the_field(kind, check):
    good = with_scheduling(MANIFESTS[kind])
    assert check(copy.deepcopy(good)) is None
    bad = put(good, TOL, {"key": "nvidia.com/gpu", "effect": "NoSchedule", "tolerationSeconds": 60})
    message = check(bad)
    assert "spec.tolerations.0.tolerationSeconds: is only for effect NoExecute" in message
    bad = put(good, TERM + ("topologyKey",), "")
    assert "requiredDuringSchedulingIgnoredDuringExecution.0.topologyKey" in check(bad)


def test_kubetune_apply_refuses_naming_the_field(tmp_path):
    doc = put(yaml.safe_load((REPO / "examples" / "finetune-tiny.yaml").read_text()), ("spec", "tolerations"),
              [{"operator": "Equal", "value": "gpu"}])
    manifest = tmp_path / "bad.yaml"
    manifest.write_text(yaml.safe_dump(doc))
    result = subprocess.run([sys.executable, "-m", "kubetune.cli", "apply", "-f", str(manifest), "--runs-dir", str(tmp_path / "runs")],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "error:" in result.stderr and "spec.tolerations.0.operator: must be Exists when key is empty" in result.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # nothing ran
