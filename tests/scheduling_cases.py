"""spec.tolerations and spec.affinity test values shared by the CRD (CEL) tests and the API model
tests: good values that reach every place a rule sits, and for each cross-field rule (by its CEL
text) a value that breaks it and no other rule."""
from __future__ import annotations

import copy
import json
from typing import Any

GOOD_TOLERATIONS = [
    {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
    {"key": "dedicated", "operator": "Equal", "value": "ml-team", "effect": "NoExecute", "tolerationSeconds": 3600},
    {"operator": "Exists"},  # every taint
    {"key": "spot", "value": "true"},  # operator defaults to Equal, effect to all
    {"key": "example.com/empty", "operator": "", "value": "", "effect": ""},  # empty strings mean the defaults
]

TERM = {
    "labelSelector": {
        "matchLabels": {"app.kubernetes.io/managed-by": "kubetune"},
        "matchExpressions": [{"key": "kubetune.dev/job", "operator": "In", "values": ["llama-lora", "llama-full"]}],
    },
    "namespaceSelector": {"matchExpressions": [{"key": "team", "operator": "Exists"}]},
    "namespaces": ["ml", "ml-staging"],
    "topologyKey": "kubernetes.io/hostname",
    "matchLabelKeys": ["batch.kubernetes.io/job-name"],
    "mismatchLabelKeys": ["tenant"],
}

GOOD_AFFINITY = {
    "nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [
                {"key": "nvidia.com/gpu.product", "operator": "In", "values": ["NVIDIA-H100-80GB-HBM3", "NVIDIA-A100-SXM4-80GB"]},
                {"key": "nvidia.com/gpu.memory", "operator": "Gt", "values": ["40000"]},
                {"key": "node.kubernetes.io/exclude-from-external-load-balancers", "operator": "DoesNotExist"},
            ]},
            {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["gpu-node-1"]}]},
        ]},
        "preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 100, "preference": {"matchExpressions": [{"key": "topology.kubernetes.io/zone", "operator": "NotIn", "values": ["us-east-1a"]}]}},
            {"weight": 1, "preference": {"matchExpressions": [{"key": "spot", "operator": "Exists"}]}},
        ],
    },
    "podAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": [TERM],
        "preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 50, "podAffinityTerm": TERM}],
    },
    "podAntiAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": [TERM],
        "preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 100, "podAffinityTerm": {**TERM, "topologyKey": "topology.kubernetes.io/zone"}},
            {"weight": 1, "podAffinityTerm": {"topologyKey": "topology.kubernetes.io/region"}},
        ],
    },
}

# Each cross-field rule of operator/api/scheduling.py (its CEL text, as in the CRDs) -> a value of
# the object it sits on that breaks that rule only. A new rule without an entry fails the tests.
BREAKS = {
    # Toleration
    "(has(self.key) && self.key != '') || (has(self.operator) && self.operator == 'Exists')":
        {"operator": "Equal", "value": "x"},
    "!has(self.operator) || self.operator != 'Exists' || !has(self.value) || self.value == ''":
        {"key": "nvidia.com/gpu", "operator": "Exists", "value": "present"},
    "!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')":
        {"key": "nvidia.com/gpu", "effect": "NoSchedule", "tolerationSeconds": 60},
    # NodeSelectorRequirement and LabelSelectorRequirement
    "!(self.operator in ['In', 'NotIn']) || (has(self.values) && size(self.values) > 0)":
        {"key": "zone", "operator": "In"},
    "!(self.operator in ['Exists', 'DoesNotExist']) || !has(self.values) || size(self.values) == 0":
        {"key": "zone", "operator": "Exists", "values": ["a"]},
    # NodeSelectorRequirement
    "!(self.operator in ['Gt', 'Lt']) || (has(self.values) && size(self.values) == 1)":
        {"key": "nvidia.com/gpu.memory", "operator": "Gt", "values": ["40000", "80000"]},
    # PodAffinityTerm
    "!has(self.matchLabelKeys) || size(self.matchLabelKeys) == 0 || has(self.labelSelector)":
        {"topologyKey": "kubernetes.io/hostname", "matchLabelKeys": ["app"]},
    "!has(self.mismatchLabelKeys) || size(self.mismatchLabelKeys) == 0 || has(self.labelSelector)":
        {"topologyKey": "kubernetes.io/hostname", "mismatchLabelKeys": ["app"]},
    "!has(self.matchLabelKeys) || !has(self.mismatchLabelKeys) || self.matchLabelKeys.all(k, !(k in self.mismatchLabelKeys))":
        {"topologyKey": "kubernetes.io/hostname", "labelSelector": {}, "matchLabelKeys": ["app"], "mismatchLabelKeys": ["app"]},
    "!has(self.matchLabelKeys) || !has(self.labelSelector) || self.matchLabelKeys.all(k, "
    "!(has(self.labelSelector.matchLabels) && k in self.labelSelector.matchLabels) && "
    "!(has(self.labelSelector.matchExpressions) && self.labelSelector.matchExpressions.exists(e, e.key == k)))":
        {"topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchExpressions": [{"key": "app", "operator": "Exists"}]}, "matchLabelKeys": ["app"]},
}


def with_scheduling(doc: dict[str, Any]) -> dict[str, Any]:
    """A copy of a manifest with the good tolerations and affinity."""
    out = copy.deepcopy(doc)
    # through JSON: no object shared between places (deepcopy keeps TERM one object in five places)
    out["spec"]["tolerations"] = json.loads(json.dumps(GOOD_TOLERATIONS))
    out["spec"]["affinity"] = json.loads(json.dumps(GOOD_AFFINITY))
    return out


def replaced(doc: dict[str, Any], path: tuple[str, ...], value: Any, items: str = "[]") -> dict[str, Any]:
    """A copy of doc with the value at path (property names; `items`: the first item of a list)
    replaced."""
    out = copy.deepcopy(doc)
    node: Any = out
    for part in path[:-1]:
        node = node[0] if part == items else node[part]
    last = path[-1]
    if last == items:
        node[0] = copy.deepcopy(value)
    else:
        node[last] = copy.deepcopy(value)
    return out
