"""The model an EvalJob or a ModelDeployment works on, where its pods (or local processes) find it.

With spec.model (+ spec.adapter for an EvalJob): those sources. With spec.fineTuneJob: what that
job wrote, per its status.result (docs/architecture.md, trainer run contract): its full model,
or its adapter on its base model. On a cluster the FineTuneJob's output claim is mounted at the
same place as in the trainer pod (/mnt/output) and its model claim at /mnt/model, so the paths in
its summary are valid as they are.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from kubetune.errors import KubetuneError
from kubetune.operator.api.finetune import FineTuneJob
from kubetune.operator.references import finetune_identity, finetune_output, source_identity
from kubetune.operator.sources import MappedSource, map_cluster_source, map_local_source


@dataclass(frozen=True)
class ModelInputs:
    model: MappedSource  # what the eval/serving process loads
    adapter: Optional[MappedSource]  # a PEFT adapter on top of it
    base: MappedSource  # the model without the adapter / the FineTuneJob's starting point
    description: str  # what `kubectl get` shows: the source, or finetunejob/NAME
    identity: str  # what a promotion gate compares
    adapter_name: Optional[str] = None  # the FineTuneJob's adapter is served under the job's name


def _finetune_inputs(name: str, ftj: dict[str, Any], *, model: MappedSource, output_mount: Optional[MappedSource]) -> ModelInputs:
    full, adapter = finetune_output(ftj)
    mount = output_mount.mount if output_mount is not None else None
    uid = (ftj.get("metadata") or {}).get("uid")
    description, identity = f"finetunejob/{name}", finetune_identity(name, uid)
    if adapter:
        return ModelInputs(model, MappedSource(adapter, mount), model, description, identity, adapter_name=name)
    assert full is not None  # finetune_wait said the job wrote something
    return ModelInputs(MappedSource(full, mount), None, model, description, identity)


def start_source(name: str, ftj: dict[str, Any]) -> str:
    """The model FineTuneJob `name` started from, as a source: its spec.model.source, or, when it
    started from another FineTuneJob's output, the source its run recorded (status.baseModel)."""
    job = FineTuneJob.model_validate(ftj)
    if job.spec.model is not None:
        return job.spec.model.source
    recorded = (ftj.get("status") or {}).get("baseModel")
    if not recorded:
        raise KubetuneError(f"spec.fineTuneJob: FineTuneJob {name} records no status.baseModel (the model it started from); run it again")
    return recorded


def cluster_inputs(obj: Any, ftj: Optional[dict[str, Any]]) -> ModelInputs:
    """Sources as the pods see them (PVCs mounted read-only; hf:// and s3:// models and adapters in
    the initializer's cache). Raises KubetuneError naming the field."""
    spec = obj.spec
    if spec.fine_tune_job is not None:
        assert ftj is not None
        job = FineTuneJob.model_validate(ftj)
        name = spec.fine_tune_job.name
        where = f"spec.model.source of FineTuneJob {name}"
        model = map_cluster_source(start_source(name, ftj), "model", where, fetch=True)  # an adapter's hf:// base
        if not job.spec.output.source:
            raise KubetuneError(
                f"spec.fineTuneJob: FineTuneJob {name} wrote its output to an emptyDir (it has no spec.output.source), "
                "which went away with its pod; give it spec.output.source: pvc://CLAIM/path and run it again"
            )
        output = map_cluster_source(job.spec.output.source, "output", f"spec.output.source of FineTuneJob {name}")
        return _finetune_inputs(name, ftj, model=model, output_mount=output)
    model = map_cluster_source(spec.model.source, "model", "spec.model.source", fetch=True)
    adapter_spec = getattr(spec, "adapter", None)
    adapter = map_cluster_source(adapter_spec.source, "adapter", "spec.adapter.source", fetch=True) if adapter_spec else None
    identity = source_identity(spec.model.source, adapter_spec.source if adapter_spec else None)
    return ModelInputs(model, adapter, model, spec.model.source, identity)


def model_source_fields(obj: Any, ftj: Optional[dict[str, Any]]) -> dict[str, str]:
    """{field: source} of every model and adapter an EvalJob or ModelDeployment reads from a
    source of its own or of its FineTuneJob (what the initializer may have to fetch)."""
    spec = obj.spec
    if spec.fine_tune_job is not None:
        assert ftj is not None
        fields = {f"spec.model.source of FineTuneJob {spec.fine_tune_job.name}": start_source(spec.fine_tune_job.name, ftj)}
    else:
        fields = {"spec.model.source": spec.model.source}
        if getattr(spec, "adapter", None) is not None:
            fields["spec.adapter.source"] = spec.adapter.source
    for index, adapter in enumerate(getattr(spec, "adapters", None) or []):
        fields[f"spec.adapters[{index}].source"] = adapter.source
    return fields


def local_inputs(obj: Any, ftj: Optional[dict[str, Any]], base_dir: Path, cache_dir: Optional[Path] = None, *,
                 claims_dir: Optional[Path] = None) -> ModelInputs:
    """Sources as paths on this machine (a local FineTuneJob's summary already names local paths);
    hf:// and s3:// models and adapters where `kubetune apply` fetches them, in cache_dir."""
    spec = obj.spec
    if spec.fine_tune_job is not None:
        assert ftj is not None
        name = spec.fine_tune_job.name
        model = MappedSource(map_local_source(start_source(name, ftj), f"spec.model.source of FineTuneJob {name}", base_dir, cache_dir, claims_dir=claims_dir))
        return _finetune_inputs(name, ftj, model=model, output_mount=None)
    model = MappedSource(map_local_source(spec.model.source, "spec.model.source", base_dir, cache_dir, claims_dir=claims_dir))
    adapter_spec = getattr(spec, "adapter", None)
    adapter = MappedSource(map_local_source(adapter_spec.source, "spec.adapter.source", base_dir, cache_dir, claims_dir=claims_dir)) if adapter_spec else None
    identity = source_identity(spec.model.source, adapter_spec.source if adapter_spec else None)
    return ModelInputs(model, adapter, model, spec.model.source, identity)
