"""The JobSet and Kubeflow Trainer v2 TrainJob backends: wrappers around the one trainer pod template.

Each wrapper is written from its upstream API (the CRD and Go types of the release named in the
module; tests/data/upstream holds those CRDs and the tests validate every planned object
against them). The indexed Job and the PyTorchJob stay in planner.py.

unsupported_fields(backend, spec) says what a backend cannot carry for a given spec, so an
explicit `backend:` fails with a message naming the field, and `backend: auto` skips it.
"""
from __future__ import annotations

from typing import Any

from kubetune.errors import KubetuneError
from kubetune.operator.api.finetune import FineTuneJob, FineTuneJobSpec
from kubetune.operator.backends import jobset, trainjob
from kubetune.operator.planner import ChildNames, ClusterPaths


class BackendError(KubetuneError):
    """The spec asks for something the chosen backend cannot express; the message names the field."""


def unsupported_fields(backend: str, spec: FineTuneJobSpec) -> list[str]:
    """Human messages, one per field the backend cannot carry (empty: it can run the spec)."""
    if backend == "trainjob":
        return trainjob.unsupported_fields(spec)
    return []


def workload(backend: str, job: FineTuneJob, names: ChildNames, paths: ClusterPaths) -> dict[str, Any]:
    problems = unsupported_fields(backend, job.spec)
    if problems:
        raise BackendError("; ".join(problems))
    if backend == "jobset":
        return jobset.jobset(job, names, paths)
    if backend == "trainjob":
        return trainjob.trainjob(job, names, paths)
    raise ValueError(f"not a wrapper backend: {backend}")
