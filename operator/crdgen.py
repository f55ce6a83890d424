"""CRDs generated from the pydantic API models (`kubetune crds`).

pydantic writes JSON Schema (2020-12); Kubernetes wants a *structural* OpenAPI v3.0 schema:
every node typed, no $ref, no anyOf for optional fields, no `title`/`const`, exclusive bounds
as booleans, free-form maps marked x-kubernetes-preserve-unknown-fields. This module does that
translation and adds what only the CRD knows: printer columns, short names, categories, the
status subresource and CEL rules.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from kubetune.operator.api import GROUP, KINDS, VERSION, KindInfo

_DROP = {"title", "$defs", "discriminator"}
_QUANTITY = {"anyOf": [{"type": "integer"}, {"type": "string"}], "x-kubernetes-int-or-string": True}


def _resolve_ref(ref: str, defs: dict[str, Any]) -> dict[str, Any]:
    return defs[ref.rsplit("/", 1)[-1]]


def _strip_null(options: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [opt for opt in options if opt.get("type") != "null"]


def to_structural(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """One pydantic JSON-schema node -> a structural OpenAPI v3 node."""
    if "$ref" in schema:
        merged = {**_resolve_ref(schema["$ref"], defs), **{k: v for k, v in schema.items() if k != "$ref"}}
        return to_structural(merged, defs)

    out: dict[str, Any] = {}
    options = schema.get("anyOf") or schema.get("oneOf")
    if options is not None:
        non_null = _strip_null(options)
        types = {opt.get("type") for opt in non_null}
        if len(non_null) == 1:  # Optional[X]: X, the field simply stays out of `required`
            inner = to_structural(non_null[0], defs)
            out.update(inner)
        elif types == {"integer", "string"}:  # a resource quantity
            out.update(_QUANTITY)
            patterns = [opt["pattern"] for opt in non_null if opt.get("type") == "string" and "pattern" in opt]
            if patterns:  # as controller-gen writes resource.Quantity: the pattern applies to strings
                out["pattern"] = patterns[0]
        else:  # a union of shapes (str | object): let it through, the operator validates it
            out["x-kubernetes-preserve-unknown-fields"] = True
    for key, value in schema.items():
        if key in _DROP or key in ("anyOf", "oneOf", "$ref"):
            continue
        if key == "default" and value is None:
            continue
        if key == "const":
            out["enum"] = [value]
        elif key == "exclusiveMinimum":
            out["minimum"], out["exclusiveMinimum"] = value, True
        elif key == "exclusiveMaximum":
            out["maximum"], out["exclusiveMaximum"] = value, True
        elif key == "properties":
            out["properties"] = {name: to_structural(sub, defs) for name, sub in value.items()}
        elif key == "items":
            if "items" in out and isinstance(out["items"], dict) and out["items"].get("x-kubernetes-preserve-unknown-fields"):
                continue  # an explicit json_schema_extra override already in place
            out["items"] = to_structural(value, defs)
        elif key == "additionalProperties":
            if value is False:
                continue  # closed objects are the default in a structural schema (unknown fields pruned)
            if value is True or value == {}:
                out["x-kubernetes-preserve-unknown-fields"] = True
            else:
                out["additionalProperties"] = to_structural(value, defs)
        elif key == "prefixItems":  # tuples: a list with a fixed length
            out["items"] = to_structural(value[0], defs)
        else:
            out[key] = value
    if out.get("type") == "object" and "properties" not in out and "additionalProperties" not in out:
        out["x-kubernetes-preserve-unknown-fields"] = True
    if isinstance(out.get("additionalProperties"), dict):  # a map: its values say what they keep
        out.pop("x-kubernetes-preserve-unknown-fields", None)
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    return _readable_order(out)


_FIRST = ("type", "description", "default", "required", "properties")


def _readable_order(node: dict[str, Any]) -> dict[str, Any]:
    """type and description first, so the YAML reads like `kubectl explain`."""
    return {**{k: node[k] for k in _FIRST if k in node}, **{k: v for k, v in node.items() if k not in _FIRST}}


def _schema_at(root: dict[str, Any], dotted: str) -> dict[str, Any]:
    node = root
    for part in dotted.split(".") if dotted else ():  # "": the object itself (a rule reading metadata.name)
        node = node["properties"][_camel(part)] if part not in node["properties"] else node["properties"][part]
    return node


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(word.title() for word in rest)


def openapi_schema(info: KindInfo) -> dict[str, Any]:
    raw = info.model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.get("$defs", {})
    props = raw["properties"]
    schema = {
        "type": "object",
        "description": info.description,
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": to_structural(props["spec"], defs),
            "status": to_structural(props["status"], defs),
        },
    }
    # The object-level rules: immutability and cross-field checks.
    for rule in info.rules:
        node = _schema_at(schema, rule.path)
        entry = {"rule": rule.rule, "message": rule.message}
        if rule.field_path:
            entry["fieldPath"] = rule.field_path
        node.setdefault("x-kubernetes-validations", []).append(entry)
    return schema


def build_crd(info: KindInfo) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": info.crd_name,
            "labels": {"app.kubernetes.io/name": "kubetune", "app.kubernetes.io/part-of": "kubetune"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": info.kind,
                "listKind": f"{info.kind}List",
                "plural": info.plural,
                "singular": info.singular,
                "shortNames": list(info.short_names),
                "categories": list(info.categories),
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        {
                            "name": col.name,
                            "type": col.type,
                            "jsonPath": col.json_path,
                            **({"description": col.description} if col.description else {}),
                            **({"priority": col.priority} if col.priority else {}),
                        }
                        for col in info.columns
                    ],
                    "schema": {"openAPIV3Schema": openapi_schema(info)},
                }
            ],
        },
    }


def all_crds() -> list[dict[str, Any]]:
    return [build_crd(info) for info in KINDS.values()]


def crd_filename(info: KindInfo) -> str:
    return f"{info.crd_name}.yaml"


HEADER = "# Generated by `kubetune crds --out crds/` from kubetune.operator.api; do not edit by hand.\n"


class _NoAliases(yaml.SafeDumper):
    """Every node written out where it is used: a schema shared by several fields (a label
    selector, a qualified-name pattern) must not become a YAML anchor and *alias in the CRD."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def render(crd: dict[str, Any]) -> str:
    return HEADER + yaml.dump(crd, Dumper=_NoAliases, sort_keys=False, width=120)


def write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def crds_command(args: argparse.Namespace) -> int:
    if not args.out:
        sys.stdout.write("---\n".join(render(crd) for crd in all_crds()))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for info in KINDS.values():
        write_atomic(out / crd_filename(info), render(build_crd(info)))
        print(f"wrote {out / crd_filename(info)}", file=sys.stderr)
    return 0
