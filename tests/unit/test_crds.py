"""The CRDs: generated from the API models (no drift), valid apiextensions.k8s.io/v1 objects
with structural schemas, and every manifest in examples/ valid against them."""
from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import kubernetes_validate
import pytest
import yaml

from kubetune.operator.api import KINDS, ManifestError, parse_object
from kubetune.operator.crdgen import all_crds, build_crd, crd_filename, render

REPO = Path(__file__).resolve().parents[2]
CRD_DIR = REPO / "crds"
EXAMPLES = sorted([*(REPO / "examples").glob("*.yaml"), *(REPO / "examples" / "demo").glob("*.yaml")])
K8S_VERSION = "1.30.0"


def example_documents() -> Iterator[tuple[str, dict[str, Any]]]:
    for path in EXAMPLES:
        for index, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc:
                yield f"{path.name}#{index}", doc


def schema_of(kind: str) -> dict[str, Any]:
    return build_crd(KINDS[kind])["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def strict(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema with unknown fields rejected instead of pruned, as `kubectl apply
    --validate=strict` does: a typo in an example must fail here, not vanish on the cluster."""
    node = copy.deepcopy(schema)
    if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        node["additionalProperties"] = False
    for key in ("properties",):
        for name, sub in node.get(key, {}).items():
            node[key][name] = strict(sub)
    if isinstance(node.get("items"), dict):
        node["items"] = strict(node["items"])
    if isinstance(node.get("additionalProperties"), dict):
        node["additionalProperties"] = strict(node["additionalProperties"])
    return node


def validate_against_crd(doc: dict[str, Any]) -> None:
    jsonschema.Draft4Validator(strict(schema_of(doc["kind"]))).validate(doc)


def test_crds_on_disk_match_the_api_models():
    """`kubetune crds --out crds/` was run after the last API change."""
    for info in KINDS.values():
        path = CRD_DIR / crd_filename(info)
        assert path.is_file(), f"{path} missing: run `kubetune crds --out crds/`"
        assert path.read_text() == render(build_crd(info)), f"{path} drifted from the API models: run `kubetune crds --out crds/`"
    assert sorted(p.name for p in CRD_DIR.glob("*.yaml")) == sorted(crd_filename(i) for i in KINDS.values())


def test_kubetune_crds_prints_the_same_crds():
    out = subprocess.run([sys.executable, "-m", "kubetune.cli", "crds"], capture_output=True, text=True, cwd=REPO, check=True)
    assert list(yaml.safe_load_all(out.stdout)) == all_crds()


@pytest.mark.parametrize("crd", all_crds(), ids=lambda c: c["metadata"]["name"])
def test_crd_is_a_valid_apiextensions_v1_object(crd):
    kubernetes_validate.validate(crd, K8S_VERSION, strict=True)


def walk(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for name, sub in node.get("properties", {}).items():
        yield from walk(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}{{}}")


def structural_violations(schema: dict[str, Any]) -> list[str]:
    """The rules of a structural schema (Kubernetes docs, "Specifying a structural schema")."""
    problems = []
    for path, node in walk(schema):
        special = node.get("x-kubernetes-int-or-string") or node.get("x-kubernetes-preserve-unknown-fields")
        if "type" not in node and not special:
            problems.append(f"{path}: no type")
        for banned in ("$ref", "title", "const", "definitions", "$defs", "nullable"):
            if banned in node:
                problems.append(f"{path}: {banned} is not allowed")
        if "properties" in node and "additionalProperties" in node:
            problems.append(f"{path}: properties and additionalProperties together")
        for junction in ("anyOf", "oneOf", "allOf"):
            for option in node.get(junction, []):
                if not node.get("x-kubernetes-int-or-string") and {"type", "description", "default"} & set(option):
                    problems.append(f"{path}: {junction} may only hold value validations")
        if "exclusiveMinimum" in node and not isinstance(node["exclusiveMinimum"], bool):
            problems.append(f"{path}: exclusiveMinimum must be a boolean in OpenAPI v3.0")
        if node.get("x-kubernetes-preserve-unknown-fields") not in (None, True):
            problems.append(f"{path}: x-kubernetes-preserve-unknown-fields must be true")
        if "default" in node:
            try:
                jsonschema.Draft4Validator(node).validate(node["default"])
            except jsonschema.ValidationError as err:
                problems.append(f"{path}: default does not fit the schema: {err.message}")
    if schema["properties"]["metadata"] != {"type": "object"}:
        problems.append("metadata: only `type: object` is allowed at the root")
    return problems


def test_structural_checker_catches_a_non_structural_schema():
    bad = {"type": "object", "properties": {"metadata": {"type": "object"}, "spec": {"properties": {"x": {"$ref": "#/a"}}}}}
    assert structural_violations(bad) == [".spec: no type", ".spec.x: no type", ".spec.x: $ref is not allowed"]


@pytest.mark.parametrize("kind", list(KINDS))
def test_crd_schema_is_structural(kind):
    assert structural_violations(schema_of(kind)) == []


@pytest.mark.parametrize("kind", list(KINDS))
def test_crd_names_columns_and_status_subresource(kind):
    info = KINDS[kind]
    version = build_crd(info)["spec"]["versions"][0]
    names = build_crd(info)["spec"]["names"]
    assert names["categories"] == ["kubetune"] and names["shortNames"] == list(info.short_names)
    assert version["subresources"] == {"status": {}}
    for column in version["additionalPrinterColumns"]:  # every column points at a field that exists
        node = schema_of(kind)
        for part in column["jsonPath"].strip(".").split("."):
            node = node["properties"].get(part) if part != "metadata" else {"properties": {"creationTimestamp": {}}}
            assert node is not None, f"{kind} column {column['name']}: {column['jsonPath']} is not in the schema"


def test_ftj_columns_are_what_kubectl_get_promises():
    columns = build_crd(KINDS["FineTuneJob"])["spec"]["versions"][0]["additionalPrinterColumns"]
    assert [c["name"].upper() for c in columns] == ["RECIPE", "PHASE", "PROGRESS", "LOSS", "GPU-HOURS", "AGE"]
    assert {info.short_names[0] for info in KINDS.values()} == {"ftj", "evj", "mdep"}


def test_spec_config_is_free_form_and_cel_rules_are_attached():
    spec = schema_of("FineTuneJob")["properties"]["spec"]
    # a map of anything, each value compared whole by CEL (not a bare preserve-unknown-fields object)
    assert spec["properties"]["config"]["additionalProperties"] == {"x-kubernetes-preserve-unknown-fields": True}
    assert any("oldSelf.config" in rule["rule"] for rule in spec["x-kubernetes-validations"])
    assert any("preference" in rule["rule"] for rule in spec["x-kubernetes-validations"])
    assert spec["properties"]["resources"]["properties"]["shmSize"]["x-kubernetes-int-or-string"] is True


def test_examples_exist_for_the_demo_and_realistic_runs():
    names = {path.name for path in EXAMPLES}
    assert {"finetune-tiny.yaml", "llama3.1-8b-lora.yaml", "llama3.1-8b-full-2node.yaml", "llama3.1-8b-pytorchjob.yaml"} <= names


@pytest.mark.parametrize("doc", [d for _, d in example_documents()], ids=[i for i, _ in example_documents()])
def test_example_validates_against_its_crd_and_the_api_models(doc):
    validate_against_crd(doc)
    parse_object(doc, "example")


def test_crd_validation_rejects_a_typo_and_a_bad_enum():
    doc = yaml.safe_load((REPO / "examples" / "finetune-tiny.yaml").read_text())
    typo = copy.deepcopy(doc)
    typo["spec"]["resources"]["gpuPerNode"] = 1
    with pytest.raises(jsonschema.ValidationError, match="gpuPerNode"):
        validate_against_crd(typo)
    bad_recipe = copy.deepcopy(doc)
    bad_recipe["spec"]["recipe"] = "fine_tune"
    with pytest.raises(jsonschema.ValidationError, match="fine_tune"):
        validate_against_crd(bad_recipe)
    with pytest.raises(ManifestError, match=r"spec\.recipe"):
        parse_object(bad_recipe, "bad.yaml")
    too_many = copy.deepcopy(doc)
    too_many["spec"]["resources"]["nodes"] = 0
    with pytest.raises(jsonschema.ValidationError):
        validate_against_crd(too_many)
    with pytest.raises(ManifestError, match=r"spec\.resources\.nodes"):
        parse_object(too_many, "bad.yaml")


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_spec_field_is_described_for_kubectl_explain(kind):
    spec = schema_of(kind)["properties"]["spec"]
    fields = [(path, node) for path, node in walk(spec, "spec") if path != "spec" and not path.endswith(("[]", "{}"))]
    undocumented = [path for path, node in fields if not node.get("description")]
    assert undocumented == []
