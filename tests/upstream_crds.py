"""Validate objects against the upstream CRDs vendored in tests/data/upstream (see its README):
the OpenAPI schema as `kubectl apply --validate=strict` would (unknown fields rejected, not
pruned), then every CEL rule (x-kubernetes-validations) that is not a transition rule, run with
cel-python on the defaulted object the way the API server runs them on create."""
from __future__ import annotations

import copy
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import celpy
import jsonschema
import yaml

UPSTREAM = Path(__file__).resolve().parent / "data" / "upstream"
CRD_FILES = {
    ("trainer.kubeflow.org/v1alpha1", "TrainJob"): "trainer.kubeflow.org_trainjobs.yaml",
    ("trainer.kubeflow.org/v1alpha1", "ClusterTrainingRuntime"): "trainer.kubeflow.org_clustertrainingruntimes.yaml",
    ("jobset.x-k8s.io/v1alpha2", "JobSet"): "jobset.x-k8s.io_jobsets.yaml",
    ("kubeflow.org/v1", "PyTorchJob"): "kubeflow.org_pytorchjobs.yaml",
}


@lru_cache(maxsize=None)
def schema_for(api_version: str, kind: str) -> dict[str, Any]:
    crd = yaml.safe_load((UPSTREAM / CRD_FILES[(api_version, kind)]).read_text())
    version = api_version.split("/")[1]
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    assert served.get("served", True), f"{kind} {version} is not served by the vendored CRD"
    return served["schema"]["openAPIV3Schema"]


def strict(schema: dict[str, Any]) -> dict[str, Any]:
    node = dict(schema)
    if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        node["additionalProperties"] = False
    if "properties" in node:
        node["properties"] = {name: strict(sub) for name, sub in node["properties"].items()}
    if isinstance(node.get("items"), dict):
        node["items"] = strict(node["items"])
    if isinstance(node.get("additionalProperties"), dict):
        node["additionalProperties"] = strict(node["additionalProperties"])
    return node


@lru_cache(maxsize=None)
def _strict_validator(api_version: str, kind: str) -> jsonschema.Draft4Validator:
    return jsonschema.Draft4Validator(strict(schema_for(api_version, kind)))


def _defaulted(schema: dict[str, Any], value: Any) -> Any:
    """Structural defaulting: a missing property gets its schema default, recursively."""
    if isinstance(value, dict):
        out = dict(value)
        for name, sub in schema.get("properties", {}).items():
            if name not in out and "default" in sub:
                out[name] = copy.deepcopy(sub["default"])
        for name in list(out):
            sub = schema.get("properties", {}).get(name)
            if sub is None and isinstance(schema.get("additionalProperties"), dict):
                sub = schema["additionalProperties"]
            if sub is not None:
                out[name] = _defaulted(sub, out[name])
        return out
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [_defaulted(schema["items"], item) for item in value]
    return value


def _rule_sites(schema: dict[str, Any], value: Any, where: str = "") -> Iterator[tuple[str, dict[str, str], Any]]:
    """(where, the rule entry, the value `self` is bound to) for every rule whose node has a value."""
    for entry in schema.get("x-kubernetes-validations", []):
        yield where or "<root>", entry, value
    if isinstance(value, dict):
        for name, item in value.items():
            sub = schema.get("properties", {}).get(name)
            if sub is None and isinstance(schema.get("additionalProperties"), dict):
                sub = schema["additionalProperties"]
            if sub is not None:
                yield from _rule_sites(sub, item, f"{where}.{name}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            yield from _rule_sites(schema["items"], item, f"{where}[{index}]")


_CEL = celpy.Environment()


@lru_cache(maxsize=None)
def _program(rule: str) -> Any:
    return _CEL.program(_CEL.compile(rule))


def cel_errors(obj: dict[str, Any]) -> list[str]:
    schema = schema_for(obj["apiVersion"], obj["kind"])
    errors = []
    for where, entry, value in _rule_sites(schema, _defaulted(schema, obj)):
        rule = entry["rule"]
        if "oldSelf" in rule:
            continue  # transition rules run on update only
        result = _program(rule).evaluate({"self": celpy.json_to_cel(value)})
        if not (isinstance(result, celpy.celtypes.BoolType) and bool(result)):
            errors.append(f"{where}: {entry.get('message') or rule} ({rule} -> {result!r})")
    return errors


def validate_upstream(obj: dict[str, Any]) -> None:
    """Raise when obj is not a valid object of its upstream CRD (schema, then CEL rules)."""
    _strict_validator(obj["apiVersion"], obj["kind"]).validate(obj)
    errors = cel_errors(obj)
    assert not errors, f"{obj['kind']} {obj['metadata'].get('name')}: CEL rules failed: {errors}"
