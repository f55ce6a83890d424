"""`kubetune plan -f MANIFEST [--backend B]`: the objects the operator would create, as YAML.

A dry run for review or diff (like `helm template`), through the very planner the operator
calls. Without a cluster to ask, `backend: auto` is planned as on a cluster that serves none of
the optional backends (an indexed Job); `--backend` shows any other one.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional

import yaml

from kubetune.errors import KubetuneError
from kubetune.operator.api.finetune import FineTuneJob
from kubetune.operator.planner import AUTO_ORDER, UNRESOLVED_START, ClusterInfo, choose_backend, plan

BACKENDS = ("auto", *AUTO_ORDER)


def plan_job(job: FineTuneJob, backend: Optional[str] = None) -> tuple[str, list[dict[str, Any]]]:
    """(the backend used, the planned objects) for one FineTuneJob; `backend` overrides spec.backend."""
    if backend and backend != "auto":
        job = job.model_copy(update={"spec": job.spec.model_copy(update={"backend": backend})})
    cluster = ClusterInfo()  # auto: what a cluster without the optional CRDs gets
    start = UNRESOLVED_START if job.spec.fine_tune_job else None  # only the operator knows that job's output
    return choose_backend(job.spec, cluster), plan(job, cluster, start_model=start)


def render(documents: list[tuple[str, list[dict[str, Any]]]]) -> str:
    out = []
    for header, objects in documents:
        for obj in objects:
            out.append(f"# {header}\n" + yaml.safe_dump(obj, sort_keys=False, width=120))
    return "---\n".join(out)


def plan_command(args: argparse.Namespace) -> int:
    from kubetune.operator.local import load_manifest  # one manifest reader for apply and plan

    path = Path(args.filename)
    documents = []
    for obj in load_manifest(path):
        if not isinstance(obj, FineTuneJob):
            raise KubetuneError(f"{path}: kubetune plan covers FineTuneJobs for now; {obj.kind} {obj.metadata.name} is not planned here")
        backend, objects = plan_job(obj, args.backend)
        how = "" if (args.backend or obj.spec.backend) != "auto" else " (auto, planned for a cluster without Kubeflow Trainer, JobSet or PyTorchJob)"
        documents.append((f"FineTuneJob {obj.metadata.name}: backend {backend}{how}", objects))
    sys.stdout.write(render(documents))
    return 0
