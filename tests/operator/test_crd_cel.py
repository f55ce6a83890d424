"""The CEL rules (x-kubernetes-validations) of crds/*.yaml, run with a real CEL implementation
(cel-python) the way the API server runs them:

- the object is defaulted first (structural defaulting: a missing property gets its schema
  default, then defaulting goes on inside it), on create and update alike, for the old object too;
- a rule runs at its schema node with `self` bound to the value there, only where that value exists;
- a transition rule (one naming `oldSelf`) runs only on update, and only where the old object has
  a value at the same place; `oldSelf` is bound to that value;
- a rule passes only when it returns true: false or an evaluation error (e.g. `no such key`)
  rejects the object.

Every rule in the CRDs is collected from the schemas, so a new rule is compiled here at once, and
`test_every_rule_is_seen_to_accept_and_to_reject` fails until the cases below show it doing both.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import celpy
import pytest
import yaml

from kubetune.operator.api import KINDS

REPO = Path(__file__).resolve().parents[2]
MISSING = object()
ITEMS, VALUES = "[]", "{}"  # path segments: every list item, every map value


# --- the rules, as the CRDs carry them -------------------------------------------------------


@dataclass(frozen=True)
class CelRule:
    kind: str
    path: tuple[str, ...]  # from the root of openAPIV3Schema: property names, ITEMS or VALUES
    rule: str
    message: str

    @property
    def where(self) -> str:
        return ".".join(self.path) or "<root>"

    @property
    def is_transition(self) -> bool:
        return re.search(r"\boldSelf\b", self.rule) is not None

    def __str__(self) -> str:
        return f"{self.kind} {self.where}: {self.rule}"


def crd_schemas() -> dict[str, dict[str, Any]]:
    """kind -> openAPIV3Schema of the (single) served version, from crds/*.yaml."""
    schemas = {}
    for path in sorted((REPO / "crds").glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        (version,) = crd["spec"]["versions"]
        schemas[crd["spec"]["names"]["kind"]] = version["schema"]["openAPIV3Schema"]
    return schemas


def rules_in(kind: str, node: dict[str, Any], path: tuple[str, ...] = ()) -> Iterator[CelRule]:
    for entry in node.get("x-kubernetes-validations", []):
        yield CelRule(kind, path, entry["rule"], entry.get("message") or f"failed rule: {entry['rule']}")
    for name, sub in node.get("properties", {}).items():
        yield from rules_in(kind, sub, path + (name,))
    if isinstance(node.get("items"), dict):
        yield from rules_in(kind, node["items"], path + (ITEMS,))
    if isinstance(node.get("additionalProperties"), dict):
        yield from rules_in(kind, node["additionalProperties"], path + (VALUES,))


SCHEMAS = crd_schemas()
RULES = [rule for kind, schema in SCHEMAS.items() for rule in rules_in(kind, schema)]
CEL = celpy.Environment()
PROGRAMS = {rule.rule: CEL.program(CEL.compile(rule.rule)) for rule in RULES}


# --- the API server's side: defaulting, then each rule where its value exists -----------------


def defaulted(schema: dict[str, Any], value: Any) -> Any:
    """A copy of value with the schema's defaults filled in, as the API server's structural
    defaulting does (k8s.io/apiextensions-apiserver .../schema/defaulting)."""
    value = copy.deepcopy(value)
    _default_in_place(schema, value)
    return value


def _default_in_place(schema: dict[str, Any], value: Any) -> None:
    if isinstance(value, dict):
        for name, sub in schema.get("properties", {}).items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
        for name, item in value.items():
            if name in schema.get("properties", {}):
                _default_in_place(schema["properties"][name], item)
            elif isinstance(schema.get("additionalProperties"), dict):
                _default_in_place(schema["additionalProperties"], item)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            _default_in_place(schema["items"], item)


def values_at(value: Any, path: tuple[str, ...]) -> Iterator[Any]:
    """Every value at path (several below ITEMS or VALUES); nothing where the object has none."""
    if not path:
        yield value
        return
    head, rest = path[0], path[1:]
    if head == ITEMS and isinstance(value, list):
        children = value
    elif head == VALUES and isinstance(value, dict):
        children = list(value.values())
    elif isinstance(value, dict) and head in value:
        children = [value[head]]
    else:
        children = []
    for child in children:
        yield from values_at(child, rest)


def old_value_at(old: Any, path: tuple[str, ...]) -> Any:
    """The old object's value at a path of property names (where transition rules sit)."""
    node = old
    for name in path:
        if not isinstance(node, dict) or name not in node:
            return MISSING
        node = node[name]
    return node


def run(rule: CelRule, value: Any, old: Any = MISSING) -> Optional[str]:
    """None when the rule passes; else why the API server would reject the object."""
    activation = {"self": celpy.json_to_cel(value)}
    if old is not MISSING:
        activation["oldSelf"] = celpy.json_to_cel(old)
    try:
        result = PROGRAMS[rule.rule].evaluate(activation)
    except celpy.CELEvalError as err:
        return f"{rule.where}: {rule.message} (evaluation error: {err.args[0]})"
    if isinstance(result, celpy.CELEvalError):
        return f"{rule.where}: {rule.message} (evaluation error: {result.args[0]})"
    passed = isinstance(result, celpy.celtypes.BoolType) and bool(result)
    return None if passed else f"{rule.where}: {rule.message}"


@dataclass(frozen=True)
class Outcome:
    rule: CelRule
    error: Optional[str]  # None: evaluated and passed


def outcomes(new: dict[str, Any], old: Optional[dict[str, Any]] = None) -> list[Outcome]:
    """Every evaluation of a rule the API server makes on a create (old None) or an update."""
    schema = SCHEMAS[new["kind"]]
    new = defaulted(schema, new)
    old = defaulted(schema, old) if old is not None else None
    results = []
    for rule in (r for r in RULES if r.kind == new["kind"]):
        if rule.is_transition and old is None:
            continue  # transition rules run on updates only
        for value in values_at(new, rule.path):
            old_value = old_value_at(old, rule.path) if rule.is_transition else MISSING
            if rule.is_transition and old_value is MISSING:
                continue  # nothing to compare with: the API server skips the rule
            results.append(Outcome(rule, run(rule, value, old_value)))
    return results


def rejections(new: dict[str, Any], old: Optional[dict[str, Any]] = None) -> list[str]:
    return [outcome.error for outcome in outcomes(new, old) if outcome.error is not None]


# --- objects: the examples, and changes to them -----------------------------------------------


def example(filename: str, kind: Optional[str] = None) -> dict[str, Any]:
    docs = [doc for doc in yaml.safe_load_all((REPO / "examples" / filename).read_text()) if doc]
    return next(doc for doc in docs if kind is None or doc["kind"] == kind)


def example_documents() -> list[dict[str, Any]]:
    return [doc for path in sorted((REPO / "examples").glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]


def changed(doc: dict[str, Any], dotted: str, value: Any = MISSING) -> dict[str, Any]:
    """A copy of doc with the field at dotted set to value, or removed when no value is given."""
    out = copy.deepcopy(doc)
    *parents, last = dotted.split(".")
    node = out
    for part in parents:
        node = node.setdefault(part, {})
    if value is MISSING:
        node.pop(last, None)
    else:
        node[last] = value
    return out


TINY = example("finetune-tiny.yaml")  # one node, CPU, config set, no output
TWO_NODES = example("llama3.1-8b-full-2node.yaml")  # backend job, output, env with value and secretKeyRef
QLORA = example("qwen2-qlora.yaml")  # resources: {gpusPerNode: 1}, the defaults
EVAL = example("eval-and-serve.yaml", "EvalJob")  # from a fineTuneJob
SERVE = example("eval-and-serve.yaml", "ModelDeployment")  # from a model

IMMUTABLE = "spec: spec cannot change once the job exists (only spec.suspend can); create a new FineTuneJob"
DPO = "spec: the dpo recipe needs spec.dataset.format: preference"
NODES = "spec: several nodes need spec.resources.gpusPerNode >= 1 (multi-node CPU training is not supported)"
ENV = "spec.env: each spec.env entry sets either value or secretKeyRef, not both"
ONE_MODEL = "spec: set exactly one of spec.model and spec.fineTuneJob"
SELF = "<root>: spec.fineTuneJob: a FineTuneJob cannot start from its own output; name another FineTuneJob (or use spec.model)"


@dataclass(frozen=True)
class Case:
    name: str
    new: dict[str, Any]
    old: Optional[dict[str, Any]]  # None: a create
    rejected: tuple[str, ...] = ()  # the API server's messages, in rule order; () = accepted


def immutable(field: str) -> str:
    """The one whole-spec rule's message (it names no field: the webhook's refusal does)."""
    return IMMUTABLE


CASES = [
    # spec.recipe, model, dataset, config, output, resources, backend: fixed once created
    Case("recipe changed", changed(TINY, "spec.recipe", "lora_finetune"), TINY, (immutable("recipe"),)),
    Case("model changed", changed(TINY, "spec.model.source", "pvc://models/other"), TINY, (immutable("model"),)),
    Case("dataset format changed", changed(TINY, "spec.dataset.format", "chat"), TINY, (immutable("dataset"),)),
    Case("config value changed", changed(TINY, "spec.config.max_steps", 301), TINY, (immutable("config"),)),
    Case("config removed", changed(TINY, "spec.config"), TINY, (immutable("config"),)),
    Case("output changed", changed(TWO_NODES, "spec.output.source", "pvc://outputs/elsewhere"), TWO_NODES, (immutable("output"),)),
    Case("output added", changed(TINY, "spec.output", {"source": "pvc://outputs/tiny"}), TINY, (immutable("output"),)),
    Case("empty output added (the default)", changed(TINY, "spec.output", {}), TINY),
    Case("gpus changed", changed(TINY, "spec.resources.gpusPerNode", 1), TINY, (immutable("resources"),)),
    Case("resources removed (gpus 0 -> 1)", changed(TINY, "spec.resources"), TINY, (immutable("resources"),)),
    Case("resources equal to the defaults removed", changed(QLORA, "spec.resources"), QLORA),
    Case("backend changed", changed(TWO_NODES, "spec.backend", "pytorchjob"), TWO_NODES, (immutable("backend"),)),
    Case("backend auto written out (the default)", changed(TINY, "spec.backend", "auto"), TINY),
    # only suspend stays mutable: nothing else would reach the running workload
    Case("suspended", changed(TWO_NODES, "spec.suspend", True), TWO_NODES),
    Case("resumed", TWO_NODES, changed(TWO_NODES, "spec.suspend", True)),
    Case("queue set", changed(TINY, "spec.queueName", "cpu-queue"), TINY, (IMMUTABLE,)),
    Case("run policy changed", changed(TWO_NODES, "spec.runPolicy.backoffLimit", 3), TWO_NODES, (IMMUTABLE,)),
    Case("env changed", changed(TWO_NODES, "spec.env", [{"name": "NCCL_DEBUG", "value": "INFO"}]), TWO_NODES, (IMMUTABLE,)),
    Case("image changed", changed(TINY, "spec.image", "ghcr.io/kubetune/trainer:0.2.0"), TINY, (IMMUTABLE,)),
    Case("service account added", changed(TINY, "spec.serviceAccountName", "trainer"), TINY, (IMMUTABLE,)),
    Case("tolerations changed", changed(QLORA, "spec.tolerations", []), QLORA, (IMMUTABLE,)),
    # a config key swapped for another (same number of keys): a real API server's equality on a
    # bare preserve-unknown-fields object would miss it (see test_no_rule_compares_an_opaque_object)
    Case("config key swapped", changed(changed(TINY, "spec.config.max_steps"), "spec.config.save_every", 300), TINY, (IMMUTABLE,)),
    # spec.env: a literal value or a Secret's key, never both
    Case("env with value and secretKeyRef", changed(TINY, "spec.env", [{"name": "TOKEN", "value": "x", "secretKeyRef": {"name": "s", "key": "k"}}]), None, (ENV,)),
    Case("env entry with a name only", changed(TINY, "spec.env", [{"name": "EMPTY"}]), None),
    # dpo needs preference pairs (format defaults to alpaca)
    Case("dpo with alpaca data", changed(TINY, "spec.recipe", "dpo"), None, (DPO,)),
    Case("dpo without a format", changed(changed(TINY, "spec.recipe", "dpo"), "spec.dataset.format"), None, (DPO,)),
    Case("dpo with preference data", changed(changed(TINY, "spec.recipe", "dpo"), "spec.dataset.format", "preference"), None),
    # several nodes only with GPUs
    Case("two CPU nodes", changed(TWO_NODES, "spec.resources.gpusPerNode", 0), None, (NODES,)),
    Case("two nodes, default GPUs", changed(TWO_NODES, "spec.resources", {"nodes": 2}), None),
    Case("no resources at all", changed(TINY, "spec.resources"), None),
    # EvalJob and ModelDeployment: exactly one of model and fineTuneJob
    Case("EvalJob with model and fineTuneJob", changed(EVAL, "spec.model", {"source": "pvc://models/base"}), None, (ONE_MODEL,)),
    Case("EvalJob with neither", changed(EVAL, "spec.fineTuneJob"), None, (ONE_MODEL,)),
    Case("EvalJob with a model only", changed(changed(EVAL, "spec.fineTuneJob"), "spec.model", {"source": "pvc://models/base"}), None),
    Case("ModelDeployment with model and fineTuneJob", changed(SERVE, "spec.fineTuneJob", {"name": "llama31-8b-lora"}), None, (ONE_MODEL,)),
    Case("ModelDeployment with neither", changed(SERVE, "spec.model"), None, (ONE_MODEL,)),
    Case("ModelDeployment with a fineTuneJob only", changed(changed(SERVE, "spec.model"), "spec.fineTuneJob", {"name": "x"}), None),
]
CASES += [
    # FineTuneJob: from spec.model or from another FineTuneJob's output, never both, never itself
    Case("FineTuneJob with model and fineTuneJob", changed(TINY, "spec.fineTuneJob", {"name": "pretrain"}), None, (ONE_MODEL,)),
    Case("FineTuneJob with neither", changed(TINY, "spec.model"), None, (ONE_MODEL,)),
    Case("FineTuneJob from another's output", changed(changed(TINY, "spec.model"), "spec.fineTuneJob", {"name": "pretrain"}), None),
    Case("FineTuneJob from its own output", changed(changed(TINY, "spec.model"), "spec.fineTuneJob", {"name": "tiny"}), None, (SELF,)),
    Case("FineTuneJob's start changed", changed(changed(TINY, "spec.model"), "spec.fineTuneJob", {"name": "other"}),
         changed(changed(TINY, "spec.model"), "spec.fineTuneJob", {"name": "pretrain"}), (IMMUTABLE,)),
]
# spec.tolerations and spec.affinity (operator/api/scheduling.py): every cross-field rule, at each
# place it sits in each kind, accepts the good values and rejects the value that breaks it
from scheduling_cases import BREAKS, replaced, with_scheduling  # noqa: E402

SCHEDULED = {"FineTuneJob": with_scheduling(TINY), "EvalJob": with_scheduling(EVAL), "ModelDeployment": with_scheduling(SERVE)}
SCHEDULING_RULES = [r for r in RULES if r.path[1:2] in (("tolerations",), ("affinity",))]
CASES += [Case(f"{kind} with every toleration and affinity field", doc, None) for kind, doc in SCHEDULED.items()]
CASES += [
    Case(f"{rule.kind} {rule.where}.{rule.message}", replaced(SCHEDULED[rule.kind], rule.path, BREAKS[rule.rule]), None,
         (f"{rule.where}: {rule.message}",))
    for rule in SCHEDULING_RULES if rule.rule in BREAKS
]
EXAMPLES = example_documents()
EXAMPLE_IDS = [f"{doc['kind']}/{doc['metadata']['name']}" for doc in EXAMPLES]


# --- tests ------------------------------------------------------------------------------------


def test_rules_are_collected_from_every_crd():
    assert set(SCHEMAS) == set(KINDS)
    declared = {(kind, tuple(rule.path.split(".")) if rule.path else (), rule.rule) for kind, info in KINDS.items() for rule in info.rules}
    found = {(rule.kind, rule.path, rule.rule) for rule in RULES}
    assert declared <= found, f"rules of the API models missing from crds/: {declared - found}"


@pytest.mark.parametrize("rule", RULES, ids=str)
def test_rule_compiles(rule):
    CEL.compile(rule.rule)  # raises CELParseError on a malformed rule
    assert set(re.findall(r"\b(?:self|oldSelf)\b", rule.rule)), f"{rule}: names neither self nor oldSelf"


@pytest.mark.parametrize("rule", [r for r in RULES if r.is_transition], ids=str)
def test_transition_rule_sits_where_old_and_new_values_pair_up(rule):
    """The API server refuses oldSelf below a list or a map's values (no old item to pair with)."""
    assert ITEMS not in rule.path and VALUES not in rule.path, rule


@pytest.mark.parametrize("doc", EXAMPLES, ids=EXAMPLE_IDS)
def test_example_is_accepted_on_create(doc):
    assert rejections(doc) == []


@pytest.mark.parametrize("doc", EXAMPLES, ids=EXAMPLE_IDS)
def test_example_reapplied_unchanged_is_accepted(doc):
    assert rejections(doc, old=doc) == []


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_rules_on_a_concrete_object(case):
    assert rejections(case.new, case.old) == list(case.rejected)


def test_a_rule_that_cannot_evaluate_rejects():
    """The harness itself: a missing key is an error, and an error rejects (as on a real API server)."""
    (rule,) = [r for r in RULES if r.kind == "FineTuneJob" and "dpo" in r.rule]
    error = run(rule, {"recipe": "dpo", "dataset": {}})
    assert error is not None and "evaluation error" in error
    assert run(rule, {"recipe": "full_finetune", "dataset": {}}) is None  # `true || error` is true in CEL


def opaque_objects(node: dict[str, Any], path: tuple[str, ...] = ()) -> Iterator[str]:
    """Schema nodes the API server's CEL cannot see into: an object with
    x-kubernetes-preserve-unknown-fields and neither properties nor additionalProperties."""
    if node.get("x-kubernetes-preserve-unknown-fields") and node.get("type") == "object" and "properties" not in node and "additionalProperties" not in node:
        yield ".".join(path)
    for name, sub in node.get("properties", {}).items():
        yield from opaque_objects(sub, path + (name,))
    for key, seg in (("items", ITEMS), ("additionalProperties", VALUES)):
        if isinstance(node.get(key), dict):
            yield from opaque_objects(node[key], path + (seg,))


def schema_at(kind: str, path: tuple[str, ...]) -> dict[str, Any]:
    node = SCHEMAS[kind]
    for name in path:
        node = node["properties"][name]
    return node


@pytest.mark.parametrize("rule", [r for r in RULES if r.is_transition], ids=str)
def test_no_rule_compares_an_opaque_object(rule):
    """cel-python compares dicts whole; a real API server does not for an opaque object: it
    exposes none of its keys to CEL, and its equality checks the sizes and then only the keys both
    sides have (k8s.io/apiserver/pkg/cel/common/values.go, UnstructuredToVal and
    unstructuredMap.Equal), so {a: 1} == {b: 1}. The emulation above is faithful only if nothing a
    transition rule compares is opaque: free-form maps use additionalProperties instead, whose
    values the API server compares whole (DeepEqual)."""
    assert list(opaque_objects(schema_at(rule.kind, rule.path), rule.path)) == []


def test_the_opaque_object_check_finds_one():
    bare = {"type": "object", "properties": {"config": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}}
    assert list(opaque_objects(bare, ("spec",))) == ["spec.config"]


def test_every_rule_is_seen_to_accept_and_to_reject():
    """A new rule fails here until CASES show it accepting a valid object and rejecting a bad one."""
    seen = [o for doc in EXAMPLES for o in outcomes(doc, doc)] + [o for case in CASES for o in outcomes(case.new, case.old)]
    accepted = {o.rule for o in seen if o.error is None}
    rejected = {o.rule for o in seen if o.error is not None}
    assert [str(r) for r in RULES if r not in accepted] == [], "rules never seen passing"
    assert [str(r) for r in RULES if r not in rejected] == [], "rules never seen rejecting"


def test_every_scheduling_rule_has_a_value_that_breaks_it():
    """tests/scheduling_cases.py BREAKS names each rule of the tolerations and affinity types."""
    assert len(SCHEDULING_RULES) >= 3 * 40  # tolerations, node/pod (anti-)affinity terms and selectors, in 3 kinds
    assert sorted({r.rule for r in SCHEDULING_RULES} - set(BREAKS)) == []
