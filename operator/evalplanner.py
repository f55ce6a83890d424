"""The EvalJob planner: an EvalJob (and the FineTuneJob it names) -> a ConfigMap and a Job. Pure.

The Job has one pod running the eval recipe (`kubetune run eval --config ...`, an argv list) on the
model of ModelInputs. With spec.baseline an init container first evaluates the baseline model
(the FineTuneJob's starting point, or spec.model without spec.adapter) with the same tasks and
settings; each container leaves its own one-line summary as its termination message, and the
operator reads both into status.result (metrics, baseline, delta).
"""
from __future__ import annotations

from typing import Any, Optional

from kubetune.errors import KubetuneError
from kubetune.operator.api.common import DEFAULT_TRAINER_IMAGE
from kubetune.operator.api.evaljob import EvalJob, LocalTask
from kubetune.operator.inputs import ModelInputs, cluster_inputs
from kubetune.operator.initializers import SOURCES_KEY
from kubetune.operator.planner import KUEUE_QUEUE_LABEL, TERMINATION_LOG, _optional_limits, child_names, initializer_plan, render_config
from kubetune.operator.podspec import (
    base_labels,
    container_security,
    env,
    initializer_wiring,
    metadata,
    pod_spec,
    pvc_volumes,
    remote_sources_of,
    resources,
    scratch_volumes,
)
from kubetune.operator.sources import MappedSource, map_cluster_source
from kubetune.trainer.config import ConfigError, resolve_config

EVAL_LABEL = "kubetune.dev/evaljob"
CONFIG_DIR = "/etc/kubetune"
RESULTS_DIR = "/mnt/results"
EVAL_CONTAINER = "eval"
BASELINE_CONTAINER = "baseline"

# Config keys that come from the EvalJob's own fields: setting them in spec.config as well is refused.
_FROM_SPEC = {"adapter": "spec.adapter / spec.fineTuneJob", "tasks": "spec.tasks", "output_dir": "spec.output.source"}


def labels(evj: EvalJob) -> dict[str, str]:
    return base_labels(EVAL_LABEL, child_names(evj.metadata.name).base, "eval")


def check_baseline(evj: EvalJob) -> None:
    if evj.spec.baseline and evj.spec.fine_tune_job is None and evj.spec.adapter is None:
        raise KubetuneError(
            "spec.baseline: there is nothing to compare with; it needs spec.fineTuneJob (its starting model is the "
            "baseline) or spec.adapter (spec.model without the adapter is the baseline)"
        )


def task_configs(evj: EvalJob, map_source: Any) -> list[Any]:
    """spec.tasks -> the recipe's tasks: lm-eval names as they are, local tasks with `path` from `source`."""
    tasks: list[Any] = []
    for index, task in enumerate(evj.spec.tasks):
        if isinstance(task, str):
            tasks.append(task)
            continue
        task = task if isinstance(task, LocalTask) else LocalTask.model_validate(task)
        path = map_source(task.source, index)
        tasks.append({"name": task.name, "type": task.type, "path": path.path, "options": dict(task.options)})
    return tasks


def eval_config(evj: EvalJob, *, model: str, adapter: Optional[str], tasks: list[Any], output_dir: str) -> dict[str, Any]:
    """spec.config plus model, adapter, tasks and output, validated by the eval recipe's config model."""
    config = {key: (dict(value) if isinstance(value, dict) else value) for key, value in evj.spec.config.items()}
    for key, owner in _FROM_SPEC.items():
        if key in config:
            raise ConfigError(f"spec.config.{key}: set by {owner}; remove it from spec.config")
    if not isinstance(config.get("model", {}), dict):
        raise ConfigError("spec.config.model must be a mapping of keys to values")
    if "path" in config.get("model", {}):
        raise ConfigError("spec.config.model.path: set by spec.model / spec.fineTuneJob; remove it from spec.config")
    config["model"] = {**config.get("model", {}), "path": model}
    config.update(adapter=adapter, tasks=tasks, output_dir=output_dir)
    try:
        resolved = resolve_config("eval", config)
    except ConfigError as err:
        raise ConfigError(f"spec.config: {err}") from None
    return resolved.model_dump(mode="json")


def eval_configs(evj: EvalJob, inputs: ModelInputs, tasks: list[Any], output_dir: str) -> dict[str, dict[str, Any]]:
    """{"config.yaml": the model's config, and "baseline.yaml" with spec.baseline}."""
    check_baseline(evj)
    adapter = inputs.adapter.path if inputs.adapter else None
    configs = {"config.yaml": eval_config(evj, model=inputs.model.path, adapter=adapter, tasks=tasks, output_dir=output_dir)}
    if evj.spec.baseline:
        configs["baseline.yaml"] = eval_config(evj, model=inputs.base.path, adapter=None, tasks=tasks, output_dir=f"{output_dir}/baseline")
    return configs


def cluster_task_source(source: str, index: int) -> MappedSource:
    """A task file as the eval container sees it: hf:// and s3:// ones fetched by the initializer."""
    return map_cluster_source(source, f"task-{index}", f"spec.tasks[{index}].source", fetch=True)


def task_source_fields(evj: EvalJob) -> dict[str, str]:
    """{spec.tasks[N].source: source} of the local tasks (what the initializer may have to fetch)."""
    return {f"spec.tasks[{index}].source": (task if isinstance(task, LocalTask) else LocalTask.model_validate(task)).source
            for index, task in enumerate(evj.spec.tasks) if not isinstance(task, str)}


def plan_eval(evj: EvalJob, ftj: Optional[dict[str, Any]] = None, *, image: str = DEFAULT_TRAINER_IMAGE) -> list[dict[str, Any]]:
    """ConfigMap `<name>-config` and Job `<name>`. `ftj`: the referenced FineTuneJob (succeeded);
    `image`: the operator's default trainer image (the eval recipe runs there) when spec.image is empty.

    Raises KubetuneError (ConfigError, SourceError) naming the field when the spec cannot run."""
    names = child_names(evj.metadata.name)
    inputs = cluster_inputs(evj, ftj)
    task_sources: list[MappedSource] = []

    def map_task(source: str, index: int) -> MappedSource:
        mapped = cluster_task_source(source, index)
        task_sources.append(mapped)
        return mapped

    tasks = task_configs(evj, map_task)
    if evj.spec.output.source:
        results = map_cluster_source(evj.spec.output.source, "results", "spec.output.source", read_only=False)
    else:
        results = MappedSource(RESULTS_DIR)
    configs = eval_configs(evj, inputs, tasks, results.path)
    image = evj.spec.image or image
    # hf:// and s3:// models, adapters and task files: fetched into the cache by an init container first.
    models = [inputs.model, inputs.adapter, inputs.base] if evj.spec.baseline else [inputs.model, inputs.adapter]
    remote = remote_sources_of([*models, *task_sources])
    init_containers, cache_volumes, cache_mounts = initializer_wiring(evj, remote, image=image)
    data = {file: render_config("eval", config) for file, config in configs.items()}
    if remote:
        data[SOURCES_KEY] = initializer_plan(evj.spec, remote)
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(evj, names.config_map, labels(evj)),
        "data": data,
    }

    volumes, mounts = scratch_volumes(evj.spec.resources.shm_size)
    volumes.append({"name": "config", "configMap": {"name": names.config_map}})
    mounts.append({"name": "config", "mountPath": CONFIG_DIR, "readOnly": True})
    pvc_v, pvc_m = pvc_volumes([inputs.model, inputs.adapter, inputs.base, *task_sources, results])
    volumes += pvc_v
    mounts += pvc_m
    if results.mount is None:
        volumes.append({"name": "results", "emptyDir": {}})
        mounts.append({"name": "results", "mountPath": RESULTS_DIR})
    volumes += cache_volumes
    mounts += cache_mounts

    def container(name: str, config_file: str) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": name,
            "image": image,
            "command": ["kubetune", "run", "eval", "--config", f"{CONFIG_DIR}/{config_file}"],
            "env": env(evj),
            "volumeMounts": mounts,
            "terminationMessagePath": TERMINATION_LOG,
            "terminationMessagePolicy": "FallbackToLogsOnError",
            "securityContext": container_security(),
        }
        if evj.spec.image_pull_policy:
            out["imagePullPolicy"] = evj.spec.image_pull_policy
        res = resources(evj)
        if res:
            out["resources"] = res
        return out

    extra: dict[str, Any] = {"restartPolicy": "Never"}
    if evj.spec.baseline:
        # An init container: it runs (and leaves its summary) before the model's eval, on the same
        # GPUs; a pod's effective request is the larger of the two, not the sum.
        init_containers = init_containers + [container(BASELINE_CONTAINER, "baseline.yaml")]
    if init_containers:
        extra["initContainers"] = init_containers
    pod = pod_spec(evj, [container(EVAL_CONTAINER, "config.yaml")], volumes, **extra)
    policy = evj.spec.run_policy
    job_labels = {**labels(evj), **({KUEUE_QUEUE_LABEL: evj.spec.queue_name} if evj.spec.queue_name else {})}
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata(evj, names.workload, job_labels),
        "spec": {
            "completions": 1,
            "parallelism": 1,
            "backoffLimit": policy.backoff_limit,
            "suspend": bool(evj.spec.queue_name),
            "template": {"metadata": {"labels": labels(evj)}, "spec": pod},
            **_optional_limits(policy),
        },
    }
    return [config_map, job]
