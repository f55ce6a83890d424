"""Workload identity and API-error handling shared by the reconcilers. Pure functions.

A run must never train twice and never have two workloads. So, for any custom resource that
owns one workload (FineTuneJob today; EvalJob and ModelDeployment can use the same pieces):

- on first creation the operator records in `status.workload` the workload's name, kind,
  **uid**, the **backend** it was planned for and a **hash of the spec** it was planned from;
- every child carries that hash in the annotation `kubetune.dev/spec-hash`; a child found under
  the planned name is adopted only when its controller ownerReference is this resource's uid
  and its hash is this spec's (a look-alike with our labels, or a leftover of a deleted
  resource of the same name, is never taken over);
- later plans use the recorded backend, never a new `auto` decision (a training-operator
  installed mid-run must not start a PyTorchJob next to the running Job);
- a recorded workload that has gone is recreated only if it never started (`workload_fate`);
  a started or finished one is not: the run ends with an event saying why.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Optional

from kubetune.operator.kube import ApiError
from kubetune.operator.status import WorkloadState

SPEC_HASH_ANNOTATION = "kubetune.dev/spec-hash"
# Spec fields the operator applies to a running workload: a change to them is not a new plan.
LIVE_FIELDS = ("suspend",)


def spec_hash(spec: dict[str, Any], live_fields: tuple[str, ...] = LIVE_FIELDS) -> str:
    """A short stable hash of the spec the children are planned from (live fields left out)."""
    planned = {key: value for key, value in (spec or {}).items() if key not in live_fields}
    canonical = json.dumps(planned, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def model_spec_hash(spec: Any) -> str:
    """spec_hash of a pydantic spec model, default values left out: a field a newer kubetune adds
    (with its default) does not make every existing run look changed."""
    return spec_hash(spec.model_dump(mode="json", by_alias=True, exclude_defaults=True))


def stamp(children: list[dict[str, Any]], digest: str) -> list[dict[str, Any]]:
    """The children with the spec hash annotation (in place; returned for chaining)."""
    for child in children:
        child["metadata"].setdefault("annotations", {})[SPEC_HASH_ANNOTATION] = digest
    return children


def controller_uid(obj: dict[str, Any]) -> Optional[str]:
    for owner in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if owner.get("controller"):
            return owner.get("uid")
    return None


def adoption_problem(existing: dict[str, Any], owner_uid: str, digest: str) -> Optional[str]:
    """Why an object found under a planned child's name is not ours to adopt; None when it is.

    Ours = its controller ownerReference is the resource's uid and it was planned from the same
    spec. A child without a hash annotation (made before kubetune recorded hashes) is adopted
    on the owner's uid alone."""
    meta = existing.get("metadata") or {}
    if controller_uid(existing) != owner_uid:
        return "does not belong to this resource (its controller ownerReference names another object or none)"
    found = (meta.get("annotations") or {}).get(SPEC_HASH_ANNOTATION)
    if found is not None and found != digest:
        return f"was planned from another spec (hash {found}, this spec {digest})"
    return None


def workload_record(workload: dict[str, Any], backend: str, digest: str) -> dict[str, Any]:
    """status.workload for a workload as the API returned it."""
    meta = workload.get("metadata") or {}
    return {
        "apiVersion": workload["apiVersion"], "kind": workload["kind"], "name": meta["name"],
        "uid": meta.get("uid"), "backend": backend, "specHash": digest,
    }


# The backend of a workload recorded before status.workload.backend existed.
_BACKEND_OF_KIND = {"Job": "job", "PyTorchJob": "pytorchjob"}


def recorded_backend(record: Optional[dict[str, Any]]) -> Optional[str]:
    """The backend the workload was planned for, when one was recorded (plan from it forever)."""
    if not record:
        return None
    return record.get("backend") or _BACKEND_OF_KIND.get(record.get("kind", ""))


def workload_fate(record: Optional[dict[str, Any]], existing: Optional[dict[str, Any]], *, started: bool) -> str:
    """What to do about the recorded workload, given what the API has under its name now:

    - "create": nothing recorded yet, or the recorded one vanished before it ever started
      (e.g. deleted while Pending or Queued): making it (again) cannot train twice;
    - "keep": it is there (same uid, or no uid recorded by an older operator);
    - "lost": it vanished (or was replaced) after it started or finished: recreating it would
      train again from scratch next to whatever the first run wrote. The caller ends the run.
    """
    if not record:
        return "create"
    if existing is not None and (not record.get("uid") or (existing.get("metadata") or {}).get("uid") == record.get("uid")):
        return "keep"
    if existing is None and not started:
        return "create"
    return "lost"


@dataclass
class Ensured:
    """What ensuring a resource's children came to: the workload's fate, its status record and
    the children as planned (empty when nothing was planned)."""

    fate: str
    record: dict[str, Any]
    children: list[dict[str, Any]] = field(default_factory=list)


def lost_state(record: dict[str, Any]) -> WorkloadState:
    """The end of a run whose started workload vanished before the operator saw it finish."""
    what = f"{record.get('kind', 'the workload')} {record.get('name', '')}".strip()
    return WorkloadState(
        "Failed",
        "WorkloadDeleted",
        f"{what} was deleted after it started (ttlSecondsAfterFinished, a manual delete or a GitOps prune) before "
        "the operator saw it finish; it is not recreated, so the training does not run twice. Whatever it wrote is "
        "in spec.output; create a new FineTuneJob to train again",
        True,
    )


# ---------------------------------------------------------------------------------------------
# API errors on child writes: which are the user's to fix, which the platform's, which transient


class ChildError(Exception):
    """An API error on one child write, with what was being done (for a message that says
    which permission is missing, or which child the API refused)."""

    def __init__(self, err: ApiError, verb: str, child: dict[str, Any]):
        super().__init__(str(err))
        self.err, self.verb, self.child = err, verb, child


def child_error_state(error: ChildError, phase: str) -> Optional[WorkloadState]:
    """An API error on a child -> the state to report; None: transient, just retry.

    400/422: the API refused the object itself (e.g. a quantity it cannot parse): retrying
    cannot help, the run fails with the API's message. 403: a permission the platform team
    must grant: retried (with backoff) under a condition naming it. 404: the resource is not
    served (a CRD missing): retried, saying which."""
    err, child = error.err, error.child
    meta = child.get("metadata") or {}
    what = f"{child.get('kind')} {meta.get('name')}"
    if err.status in (400, 422):
        return WorkloadState("Failed", "ChildRejected", f"the API refused {what}: {err.message}; fix the field it names and create a new FineTuneJob")
    if err.status == 403:
        return WorkloadState(phase, "Forbidden", forbidden_message(err, error.verb, child))
    if err.status == 404 and error.verb == "create":
        return WorkloadState(phase, "ResourceNotServed", f"the API does not serve {child.get('apiVersion')} {child.get('kind')} (is its CRD installed?); retrying: {err.message}")
    return None


def forbidden_message(err: ApiError, verb: str, child: dict[str, Any]) -> str:
    """A 403 on a child write -> which permission the operator's ServiceAccount lacks.

    OwnerReferencesPermissionEnforcement (on by default on OpenShift) refuses a child whose
    ownerReference sets blockOwnerDeletion unless the writer may update the owner's
    `finalizers` subresource (kubernetes plugin/pkg/admission/gc/gc_admission.go)."""
    meta = child.get("metadata") or {}
    namespace = meta.get("namespace") or "the cluster"
    if "blockOwnerDeletion" in err.message:
        owners = {(o.get("apiVersion", "").split("/")[0], o.get("kind", "")) for o in meta.get("ownerReferences") or []}
        plurals = ", ".join(f"{kind.lower()}s/finalizers" for _, kind in sorted(owners)) or "finalizers"
        group = next(iter(sorted(owners)))[0] if owners else ""
        return (
            f"the operator may not set blockOwnerDeletion on its children: grant its ServiceAccount `update` on "
            f"`{plurals}` (API group {group}) in {namespace} (OwnerReferencesPermissionEnforcement); the API said: {err.message}"
        )
    group, _, _ = child.get("apiVersion", "").rpartition("/")
    resource = f"{child.get('kind', '').lower()}s" + (f".{group}" if group else "")
    return (
        f"the operator's ServiceAccount may not {verb} {resource} in {namespace}: grant it `{verb}` on `{resource}` "
        f"(docs/operator.md lists the RBAC); retrying. The API said: {err.message}"
    )
