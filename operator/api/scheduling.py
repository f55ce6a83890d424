"""spec.tolerations and spec.affinity, typed as Kubernetes defines them (core/v1 Toleration and
Affinity, meta/v1 LabelSelector), with the API server's own checks of a pod spec
(k8s.io/kubernetes pkg/apis/core/validation: ValidateTolerations, ValidateAffinity;
k8s.io/apimachinery ValidateLabelSelector).

They are copied into every planned pod as given, so a value the API server would refuse must be
refused when the job is applied, not when the operator creates its workload (then the job could
only fail with ChildRejected). Single-field checks are OpenAPI patterns, enums and bounds in the
CRD; the cross-field checks (operator Exists => no value, tolerationSeconds only with NoExecute,
...) are `FieldRule`s: one CEL rule in the CRD (x-kubernetes-validations, with the field it
names) and the same predicate here, for `kubetune apply` and the operator's admission.

Lists are bounded (maxItems) where Kubernetes leaves them open, so the API server can cost the
CEL rules below them; the bounds are far above what a training job's pods need.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, Callable, ClassVar, Literal, Optional

from pydantic import AfterValidator, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from kubetune.operator.api.common import DNS_SUBDOMAIN, ApiModel

# k8s.io/apimachinery/pkg/util/validation: IsQualifiedName (label keys, taint keys, topology
# keys): an optional DNS-subdomain prefix of at most 253 characters and '/', then a name of 1-63
# alphanumerics, '-', '_', '.', starting and ending alphanumeric.
_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_PREFIX = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
QUALIFIED_NAME = rf"^({_PREFIX}/)?{_NAME}$"
QUALIFIED_NAME_MAX = 253 + 1 + 63
# The prefix's length, which the pattern above cannot bound: a second pattern (allOf) in the CRD.
PREFIX_AT_MOST_253 = r"^([^/]{1,253}/)?[^/]*$"
# IsValidLabelValue: empty, or a name of 1-63 characters.
LABEL_VALUE = rf"^({_NAME})?$"
# IsDNS1123Label: namespace names.
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
QUALIFIED_NAME_HELP = "a label key: [prefix/]name, e.g. nvidia.com/gpu or topology.kubernetes.io/zone"


def _qualified_name_error(value: str) -> Optional[str]:
    if len(value) > QUALIFIED_NAME_MAX or not re.match(QUALIFIED_NAME, value) or not re.match(PREFIX_AT_MOST_253, value):
        return f"{value!r} is not {QUALIFIED_NAME_HELP} (name: at most 63 characters of A-Z a-z 0-9 - _ ., alphanumeric at both ends; prefix: a DNS subdomain of at most 253)"
    return None


def _check_qualified_name(value: str) -> str:
    error = _qualified_name_error(value)
    if error:
        raise ValueError(error)
    return value


QualifiedName = Annotated[
    str,
    Field(pattern=QUALIFIED_NAME, max_length=QUALIFIED_NAME_MAX, json_schema_extra={"allOf": [{"pattern": PREFIX_AT_MOST_253}]}),
    AfterValidator(_check_qualified_name),
]
LabelValue = Annotated[str, Field(pattern=LABEL_VALUE, max_length=63)]


# --- cross-field rules: CEL in the CRD, the same predicate here ---------------------------------


@dataclass(frozen=True)
class FieldRule:
    """A rule between fields of one object: `rule` is CEL on the wire names (the API server runs
    it, and its error names `field`), `holds` the same test on the parsed model."""

    field: str  # wire name of the field the message is about
    rule: str
    message: str
    holds: Callable[[Any], bool]


def _cel_rules(schema: dict[str, Any], cls: Any) -> None:
    rules = getattr(cls, "field_rules", ())
    if rules:
        schema["x-kubernetes-validations"] = [{"rule": r.rule, "message": r.message, "fieldPath": f".{r.field}"} for r in rules]


class RuledModel(ApiModel):
    """An API object with FieldRules; a broken rule is a validation error at the field it names
    (format_errors in operator/api/__init__.py adds the field to the location)."""

    model_config = {"json_schema_extra": _cel_rules}
    field_rules: ClassVar[tuple[FieldRule, ...]] = ()

    @model_validator(mode="after")
    def _field_rules(self) -> "RuledModel":
        for rule in self.field_rules:
            if not rule.holds(self):
                raise PydanticCustomError("field_rule", "{message}", {"field": rule.field, "message": rule.message})
        return self


# --- tolerations ---------------------------------------------------------------------------------


class Toleration(RuledModel):
    """A taint the pods tolerate, as in a pod spec (core/v1 Toleration)."""

    key: Optional[Annotated[str, Field(pattern=rf"^(({_PREFIX}/)?{_NAME})?$", max_length=QUALIFIED_NAME_MAX,
                                       json_schema_extra={"allOf": [{"pattern": PREFIX_AT_MOST_253}]})]] = Field(
        default=None, description="Taint key (e.g. nvidia.com/gpu); empty: every key, with operator Exists"
    )
    operator: Optional[Literal["", "Exists", "Equal"]] = Field(
        default=None, description="Exists (any value) or Equal (the value); default Equal"
    )
    value: Optional[LabelValue] = Field(default=None, description="Taint value to match (operator Equal)")
    effect: Optional[Literal["", "NoSchedule", "PreferNoSchedule", "NoExecute"]] = Field(
        default=None, description="Taint effect to match: NoSchedule, PreferNoSchedule or NoExecute; empty: all"
    )
    toleration_seconds: Optional[int] = Field(
        default=None, ge=-(2**63), le=2**63 - 1, json_schema_extra={"format": "int64"},
        description="With effect NoExecute: how long the pod stays bound after the taint appears (default: forever)",
    )

    @field_validator("key")
    @classmethod
    def _key(cls, key: Optional[str]) -> Optional[str]:
        return _check_qualified_name(key) if key else key

    field_rules: ClassVar[tuple[FieldRule, ...]] = (
        FieldRule(
            "operator",
            "(has(self.key) && self.key != '') || (has(self.operator) && self.operator == 'Exists')",
            "must be Exists when key is empty (a toleration of every taint)",
            lambda t: bool(t.key) or t.operator == "Exists",
        ),
        FieldRule(
            "value",
            "!has(self.operator) || self.operator != 'Exists' || !has(self.value) || self.value == ''",
            "must be empty when operator is Exists",
            lambda t: t.operator != "Exists" or not t.value,
        ),
        FieldRule(
            "tolerationSeconds",
            "!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
            "is only for effect NoExecute (how long a pod stays after a NoExecute taint appears); set effect: NoExecute or remove it",
            lambda t: t.toleration_seconds is None or t.effect == "NoExecute",
        ),
    )


# --- selectors -----------------------------------------------------------------------------------

_IN = ("In", "NotIn")
_EXISTS = ("Exists", "DoesNotExist")
VALUES_WITH_IN = FieldRule(
    "values",
    "!(self.operator in ['In', 'NotIn']) || (has(self.values) && size(self.values) > 0)",
    "must be set when operator is In or NotIn",
    lambda r: r.operator not in _IN or bool(r.values),
)
NO_VALUES_WITH_EXISTS = FieldRule(
    "values",
    "!(self.operator in ['Exists', 'DoesNotExist']) || !has(self.values) || size(self.values) == 0",
    "must be empty when operator is Exists or DoesNotExist",
    lambda r: r.operator not in _EXISTS or not r.values,
)


class NodeSelectorRequirement(RuledModel):
    """A test of one node label."""

    key: QualifiedName = Field(description="Node label key")
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"] = Field(
        description="In, NotIn (values), Exists, DoesNotExist (no values), Gt, Lt (one integer value)"
    )
    values: Optional[list[str]] = Field(default=None, max_length=256, description="Label values")

    field_rules: ClassVar[tuple[FieldRule, ...]] = (
        VALUES_WITH_IN,
        NO_VALUES_WITH_EXISTS,
        FieldRule(
            "values",
            "!(self.operator in ['Gt', 'Lt']) || (has(self.values) && size(self.values) == 1)",
            "must hold exactly one value (an integer) when operator is Gt or Lt",
            lambda r: r.operator not in ("Gt", "Lt") or len(r.values or ()) == 1,
        ),
    )


class NodeFieldSelectorRequirement(ApiModel):
    """A test of one node field: the API server knows only metadata.name."""

    key: Literal["metadata.name"] = Field(description="Node field: metadata.name")
    operator: Literal["In", "NotIn"] = Field(description="In or NotIn")
    values: list[Annotated[str, Field(pattern=DNS_SUBDOMAIN, max_length=253)]] = Field(
        min_length=1, max_length=1, description="Exactly one node name"
    )


class NodeSelectorTerm(ApiModel):
    """Node tests, ANDed; an empty term matches no node."""

    match_expressions: Optional[list[NodeSelectorRequirement]] = Field(default=None, max_length=64, description="Tests of node labels")
    match_fields: Optional[list[NodeFieldSelectorRequirement]] = Field(default=None, max_length=64, description="Tests of node fields")


class NodeSelector(ApiModel):
    node_selector_terms: list[NodeSelectorTerm] = Field(min_length=1, max_length=64, description="Terms, ORed")


class PreferredSchedulingTerm(ApiModel):
    weight: int = Field(ge=1, le=100, description="1-100, added to a node's score when the term matches")
    preference: NodeSelectorTerm


class NodeAffinity(ApiModel):
    required_during_scheduling_ignored_during_execution: Optional[NodeSelector] = Field(
        default=None, description="Nodes the pods must run on"
    )
    preferred_during_scheduling_ignored_during_execution: Optional[list[PreferredSchedulingTerm]] = Field(
        default=None, max_length=64, description="Nodes the pods prefer, by weight"
    )


class LabelSelectorRequirement(RuledModel):
    key: QualifiedName = Field(description="Label key")
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"] = Field(
        description="In, NotIn (values), Exists, DoesNotExist (no values)"
    )
    values: Optional[list[LabelValue]] = Field(default=None, max_length=256, description="Label values")

    field_rules: ClassVar[tuple[FieldRule, ...]] = (VALUES_WITH_IN, NO_VALUES_WITH_EXISTS)


class LabelSelector(ApiModel):
    """Labels to match (meta/v1 LabelSelector); the tests are ANDed, empty matches everything."""

    match_labels: Optional[dict[str, LabelValue]] = Field(
        default=None, description="Labels that must be set to these values", json_schema_extra={"maxProperties": 64}
    )
    match_expressions: Optional[list[LabelSelectorRequirement]] = Field(default=None, max_length=64, description="Label tests")

    # The keys' format (the CRD schema cannot say it: a map's keys have no pattern there)
    @field_validator("match_labels")
    @classmethod
    def _label_keys(cls, labels: Optional[dict[str, str]]) -> Optional[dict[str, str]]:
        for key in labels or {}:
            error = _qualified_name_error(key)
            if error:
                raise ValueError(f"key {error}")
        return labels


def _selector_keys(selector: Optional[LabelSelector]) -> set[str]:
    if selector is None:
        return set()
    return set(selector.match_labels or {}) | {e.key for e in selector.match_expressions or ()}


class PodAffinityTerm(RuledModel):
    """Pods (labelSelector, in namespaces) whose topology domain (topologyKey) the pods join or avoid."""

    label_selector: Optional[LabelSelector] = Field(default=None, description="The pods this term is about")
    namespace_selector: Optional[LabelSelector] = Field(default=None, description="Namespaces (by label) to look in")
    namespaces: Optional[list[Annotated[str, Field(pattern=DNS_LABEL, max_length=63)]]] = Field(
        default=None, max_length=256, description="Namespaces to look in (default: the pod's)"
    )
    topology_key: QualifiedName = Field(description="Node label that defines the domain, e.g. kubernetes.io/hostname")
    match_label_keys: Optional[list[QualifiedName]] = Field(
        default=None, max_length=32, description="Pod label keys whose values (the pod's own) are added to labelSelector (In)"
    )
    mismatch_label_keys: Optional[list[QualifiedName]] = Field(
        default=None, max_length=32, description="Pod label keys whose values (the pod's own) are added to labelSelector (NotIn)"
    )

    field_rules: ClassVar[tuple[FieldRule, ...]] = (
        FieldRule(
            "matchLabelKeys",
            "!has(self.matchLabelKeys) || size(self.matchLabelKeys) == 0 || has(self.labelSelector)",
            "needs labelSelector",
            lambda t: not t.match_label_keys or t.label_selector is not None,
        ),
        FieldRule(
            "mismatchLabelKeys",
            "!has(self.mismatchLabelKeys) || size(self.mismatchLabelKeys) == 0 || has(self.labelSelector)",
            "needs labelSelector",
            lambda t: not t.mismatch_label_keys or t.label_selector is not None,
        ),
        FieldRule(
            "matchLabelKeys",
            "!has(self.matchLabelKeys) || !has(self.mismatchLabelKeys) || self.matchLabelKeys.all(k, !(k in self.mismatchLabelKeys))",
            "a key may not be in both matchLabelKeys and mismatchLabelKeys",
            lambda t: not set(t.match_label_keys or ()) & set(t.mismatch_label_keys or ()),
        ),
        # The API server adds each matchLabelKeys key to the pod's labelSelector when it creates
        # the pod, and refuses the pod if the key was there already.
        FieldRule(
            "matchLabelKeys",
            "!has(self.matchLabelKeys) || !has(self.labelSelector) || self.matchLabelKeys.all(k, "
            "!(has(self.labelSelector.matchLabels) && k in self.labelSelector.matchLabels) && "
            "!(has(self.labelSelector.matchExpressions) && self.labelSelector.matchExpressions.exists(e, e.key == k)))",
            "a key may not be in both matchLabelKeys and labelSelector",
            lambda t: not set(t.match_label_keys or ()) & _selector_keys(t.label_selector),
        ),
    )


class WeightedPodAffinityTerm(ApiModel):
    weight: int = Field(ge=1, le=100, description="1-100, added to a node's score when the term matches")
    pod_affinity_term: PodAffinityTerm


class PodAffinity(ApiModel):
    required_during_scheduling_ignored_during_execution: Optional[list[PodAffinityTerm]] = Field(
        default=None, max_length=32, description="Terms every pod must meet"
    )
    preferred_during_scheduling_ignored_during_execution: Optional[list[WeightedPodAffinityTerm]] = Field(
        default=None, max_length=32, description="Terms the pods prefer, by weight"
    )


class PodAntiAffinity(PodAffinity):
    """The same terms as podAffinity, avoided instead of joined."""


class Affinity(ApiModel):
    """Scheduling constraints of the pods, as in a pod spec (core/v1 Affinity)."""

    node_affinity: Optional[NodeAffinity] = Field(default=None, description="Nodes the pods run on")
    pod_affinity: Optional[PodAffinity] = Field(default=None, description="Pods to run near (same topology domain)")
    pod_anti_affinity: Optional[PodAntiAffinity] = Field(default=None, description="Pods to keep away from")


def pod_fields(model: ApiModel) -> dict[str, Any]:
    """A toleration or affinity as the pod spec takes it: the fields given, camelCase."""
    return model.model_dump(by_alias=True, exclude_none=True)
