"""The kubetune.dev/v1alpha1 API: one KindInfo per custom resource, with everything the CRD
generator, the operator and `kubetune get` need to know about it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

from kubetune.errors import KubetuneError
from kubetune.operator.api.common import API_VERSION, GROUP, VERSION
from kubetune.operator.api.evaljob import EvalJob, ModelDeployment
from kubetune.operator.api.finetune import SELF_REFERENCE, FineTuneJob, FineTuneJobSpec


class ManifestError(KubetuneError):
    """A manifest that does not fit the API; the message names the field."""


@dataclass(frozen=True)
class PrinterColumn:
    name: str
    type: str  # string | integer | number | boolean | date
    json_path: str
    description: str = ""
    priority: int = 0


@dataclass(frozen=True)
class Rule:
    """A CEL rule (x-kubernetes-validations) placed at `path` (dotted, from the root schema)."""

    path: str
    rule: str
    message: str
    field_path: str = ""


@dataclass(frozen=True)
class KindInfo:
    kind: str
    plural: str
    singular: str
    short_names: tuple[str, ...]
    model: type[BaseModel]
    columns: tuple[PrinterColumn, ...]
    rules: tuple[Rule, ...] = ()
    categories: tuple[str, ...] = ("kubetune",)
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def crd_name(self) -> str:
        return f"{self.plural}.{GROUP}"


AGE = PrinterColumn("Age", "date", ".metadata.creationTimestamp")

# A run's spec cannot change once it exists (the children were planned from it and the status
# describes that run), except the fields the operator applies to the running workload.
MUTABLE_SPEC_FIELDS = ("suspend",)


def unchanged_except(model: type[BaseModel], mutable: tuple[str, ...]) -> str:
    """A CEL rule, placed at `spec`, comparing every field of the spec but `mutable`, presence
    included (a field added or removed is a change): the whole object, not field by field
    (a per-field transition rule is skipped where either side lacks the field)."""
    terms = []
    for name, field_info in model.model_fields.items():
        wire = field_info.alias or name
        if name in mutable or wire in mutable:
            continue
        terms.append(f"(has(self.{wire}) == has(oldSelf.{wire}) && (!has(self.{wire}) || self.{wire} == oldSelf.{wire}))")
    return " && ".join(terms)


_ONE_MODEL = Rule("spec", "has(self.model) != has(self.fineTuneJob)", "set exactly one of spec.model and spec.fineTuneJob", ".model")

FINETUNEJOB = KindInfo(
    kind="FineTuneJob",
    plural="finetunejobs",
    singular="finetunejob",
    short_names=("ftj",),
    model=FineTuneJob,
    description="Fine-tune an LLM with a kubetune recipe (full_finetune, lora_finetune, dpo, ...).",
    columns=(
        PrinterColumn("Recipe", "string", ".spec.recipe"),
        PrinterColumn("Phase", "string", ".status.phase"),
        PrinterColumn("Progress", "number", ".status.progress.percent", "Percent of total steps done"),
        PrinterColumn("Loss", "number", ".status.progress.loss", "Latest training loss"),
        PrinterColumn("GPU-Hours", "number", ".status.gpuHours", "GPU hours used: the pods' running time x their GPUs", priority=1),
        AGE,
    ),
    rules=(
        Rule(
            "spec.env",
            "self.all(e, !(has(e.value) && has(e.secretKeyRef)))",
            "each spec.env entry sets either value or secretKeyRef, not both",
        ),
        Rule(
            "spec",
            unchanged_except(FineTuneJobSpec, MUTABLE_SPEC_FIELDS),
            "spec cannot change once the job exists (only spec.suspend can); create a new FineTuneJob",
        ),
        Rule(
            "spec",
            "self.recipe != 'dpo' || self.dataset.format == 'preference'",
            "the dpo recipe needs spec.dataset.format: preference",
            ".dataset.format",
        ),
        Rule(
            "spec",
            "self.resources.nodes == 1 || self.resources.gpusPerNode >= 1",
            "several nodes need spec.resources.gpusPerNode >= 1 (multi-node CPU training is not supported)",
            ".resources.gpusPerNode",
        ),
        _ONE_MODEL,
        Rule("", "!has(self.spec.fineTuneJob) || self.spec.fineTuneJob.name != self.metadata.name", SELF_REFERENCE, ".spec.fineTuneJob.name"),
    ),
)


EVALJOB = KindInfo(
    kind="EvalJob",
    plural="evaljobs",
    singular="evaljob",
    short_names=("evj",),
    model=EvalJob,
    description="Evaluate a model, or a FineTuneJob's output, on benchmark or local tasks.",
    columns=(
        PrinterColumn("Model", "string", ".status.model", "The source, or finetunejob/NAME"),
        PrinterColumn("Phase", "string", ".status.phase"),
        PrinterColumn("Main Metric", "string", ".status.result.mainMetric", "First task's main metric (and the change vs baseline)"),
        AGE,
        PrinterColumn("Baseline", "string", ".status.result.baselineMainMetric", "The baseline model's main metric", priority=1),
    ),
    rules=(_ONE_MODEL,),
)

MODELDEPLOYMENT = KindInfo(
    kind="ModelDeployment",
    plural="modeldeployments",
    singular="modeldeployment",
    short_names=("mdep",),
    model=ModelDeployment,
    description="Serve a model (and LoRA adapters) behind an OpenAI-compatible API.",
    columns=(
        PrinterColumn("Model", "string", ".status.model", "The source, or finetunejob/NAME"),
        PrinterColumn("Ready", "string", ".status.ready", "Ready/desired replicas"),
        PrinterColumn("URL", "string", ".status.url", "OpenAI-compatible base URL"),
        AGE,
        PrinterColumn("Runtime", "string", ".spec.runtime", priority=1),
        PrinterColumn("Phase", "string", ".status.phase", priority=1),
    ),
    rules=(_ONE_MODEL,),
)

KINDS: dict[str, KindInfo] = {info.kind: info for info in (FINETUNEJOB, EVALJOB, MODELDEPLOYMENT)}


def kind_for(name: str) -> KindInfo:
    """A kind by kind, plural, singular or short name (as kubectl accepts them)."""
    lowered = name.lower()
    for info in KINDS.values():
        if lowered in (info.kind.lower(), info.plural, info.singular, *info.short_names):
            return info
    known = ", ".join(f"{i.plural} ({'/'.join(i.short_names)})" for i in KINDS.values())
    raise ManifestError(f"unknown kind '{name}'; known kinds: {known}")


def format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for error in err.errors():
        loc = tuple(error["loc"])
        if error["type"] == "field_rule":  # a rule between fields names the field it is about (scheduling.py)
            loc += (error["ctx"]["field"],)
        dotted = ".".join(str(part) for part in loc)
        given = error.get("input")
        # a whole object as "got" is noise: the rule's message names the fields
        hint = "" if error["type"] == "missing" or isinstance(given, dict) else f" (got {given!r})"
        message = error["msg"].removeprefix("Value error, ")  # a validator's own sentence
        lines.append(f"{dotted}: {message}{hint}" if dotted else f"{message}{hint}")
    return f"{source}: invalid manifest:\n  " + "\n  ".join(lines)


def describe(kind: str, body: Any) -> str:
    """`Kind name` for messages, whatever shape the body has (a refusal must not crash on it)."""
    meta = body.get("metadata") if isinstance(body, dict) else None
    name = meta.get("name") if isinstance(meta, dict) else None
    return f"{kind} {name if isinstance(name, str) and name else '?'}"


def parse_object(obj: dict[str, Any], source: str = "manifest") -> BaseModel:
    """A manifest document -> its typed model; errors name the field (spec.resources.nodes: ...)."""
    if not isinstance(obj, dict):
        raise ManifestError(f"{source}: a manifest document must be a mapping, got {type(obj).__name__}")
    api_version, kind = obj.get("apiVersion"), obj.get("kind")
    if api_version != API_VERSION:
        raise ManifestError(f"{source}: apiVersion must be {API_VERSION}, got {api_version!r}")
    if not isinstance(kind, str) or kind not in KINDS:
        raise ManifestError(f"{source}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    model = KINDS[kind].model
    try:
        return model.model_validate(obj)
    except ValidationError as err:
        raise ManifestError(format_errors(err, source)) from None


__all__ = [
    "API_VERSION",
    "GROUP",
    "VERSION",
    "KINDS",
    "KindInfo",
    "ManifestError",
    "PrinterColumn",
    "Rule",
    "kind_for",
    "describe",
    "parse_object",
    "FineTuneJob",
    "EvalJob",
    "ModelDeployment",
]
