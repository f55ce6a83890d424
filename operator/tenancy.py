"""Tenancy: a FineTuneJob, EvalJob or ModelDeployment must not lend the operator's rights to the
one who creates it.

Whoever may create one of them gets pods made by the operator. The fields that grant power
over the namespace are checked at admission (CREATE; the spec is immutable after) against
the requester's own rights, with SubjectAccessReviews as the requester (what `kubectl auth
can-i --as` asks), and against the allow-lists the platform team configures:

| field | the requester must be allowed to (any one of) |
|---|---|
| `spec.serviceAccountName: X` | `impersonate` serviceaccounts `X`, or `create` pods, in the namespace |
| `spec.secrets.hfToken`, `spec.secrets.s3`, `spec.env[].secretKeyRef`, `spec.apiKeySecret` (Secret `S`) | `get` secrets `S` in the namespace |
| `pvc://C/...` anywhere in the spec (model, dataset, output, adapter, adapters, tasks), `spec.cache.claimName: C` | `get` persistentvolumeclaims `C` in the namespace |
| `spec.fineTuneJob: {name: F}` (its output is mounted into this run's pods) | `get` finetunejobs.kubetune.dev `F` in the namespace |
| `spec.image` | (allow-list) start with one of `KUBETUNE_ALLOWED_REGISTRIES`, when set |
| `spec.tolerations[].key` | (allow-list) be in `KUBETUNE_ALLOWED_TOLERATIONS` (default `nvidia.com/gpu`; `*` any) |
| `spec.priorityClassName` | (allow-list) be in `KUBETUNE_ALLOWED_PRIORITY_CLASSES`, when set |

Someone who may create pods in the namespace could do all of that directly, so `create pods`
also covers the service account (the Secrets and claims keep their own checks: reading them
through a pod is reading them).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Optional



@dataclass(frozen=True)
class Access:
    """One access to check: verb on resource (core group unless group) named name."""

    verb: str
    resource: str
    name: Optional[str] = None
    group: str = ""

    def describe(self, namespace: str) -> str:
        what = f"{self.resource}{'.' + self.group if self.group else ''}"
        return f"`{self.verb}` on {what}{' ' + repr(self.name) if self.name else ''} in {namespace}"


@dataclass(frozen=True)
class Need:
    """A field that needs one of several accesses."""

    field: str
    any_of: tuple[Access, ...]


@dataclass(frozen=True)
class Policy:
    """The platform team's allow-lists (None: no list, anything goes)."""

    allowed_registries: Optional[tuple[str, ...]] = None
    allowed_tolerations: Optional[tuple[str, ...]] = ("nvidia.com/gpu",)
    allowed_priority_classes: Optional[tuple[str, ...]] = None

    @classmethod
    def from_env(cls, env: dict[str, str]) -> "Policy":
        def listed(name: str, default: Optional[tuple[str, ...]]) -> Optional[tuple[str, ...]]:
            raw = env.get(name)
            if raw is None:
                return default
            items = tuple(item.strip() for item in raw.split(",") if item.strip())
            return None if items == ("*",) else items

        return cls(
            allowed_registries=listed("KUBETUNE_ALLOWED_REGISTRIES", None),
            allowed_tolerations=listed("KUBETUNE_ALLOWED_TOLERATIONS", cls.allowed_tolerations),
            allowed_priority_classes=listed("KUBETUNE_ALLOWED_PRIORITY_CLASSES", None),
        )


def _pvc_claims(spec: dict[str, Any], path: str = "spec") -> list[tuple[str, str]]:
    """(field, claim) of every pvc:// source anywhere in the spec: each kind keeps its sources in
    other fields (model, dataset, output, adapter, adapters[], tasks[]), and all are mounted."""
    if isinstance(spec, dict):
        return [claim for key, value in spec.items() for claim in _pvc_claims(value, f"{path}.{key}")]
    if isinstance(spec, list):
        return [claim for index, value in enumerate(spec) for claim in _pvc_claims(value, f"{path}[{index}]")]
    if isinstance(spec, str) and spec.startswith("pvc://"):
        return [(path, spec[len("pvc://"):].split("/", 1)[0])]
    return []


def needs(job: Any) -> list[Need]:
    """The accesses the requester must hold for the pods of this FineTuneJob, EvalJob or ModelDeployment."""
    spec = job.spec
    out: list[Need] = []
    if spec.service_account_name:
        out.append(Need("spec.serviceAccountName", (
            Access("impersonate", "serviceaccounts", spec.service_account_name),
            Access("create", "pods"),
        )))
    secrets = []
    if spec.secrets.hf_token:
        secrets.append(("spec.secrets.hfToken", spec.secrets.hf_token.name))
    if spec.secrets.s3:  # the initializer gets its keys
        secrets.append(("spec.secrets.s3", spec.secrets.s3.name))
    for index, var in enumerate(spec.env):
        if var.secret_key_ref is not None:
            secrets.append((f"spec.env[{index}].secretKeyRef", var.secret_key_ref.name))
    if getattr(spec, "api_key_secret", None) is not None:  # ModelDeployment: mounted into the server
        secrets.append(("spec.apiKeySecret", spec.api_key_secret.name))
    for field_name, secret in secrets:
        out.append(Need(field_name, (Access("get", "secrets", secret),)))
    for field_name, claim in _pvc_claims(spec.model_dump(by_alias=True, exclude_none=True)):
        out.append(Need(field_name, (Access("get", "persistentvolumeclaims", claim),)))
    ref = getattr(spec, "fine_tune_job", None)
    if ref is not None:  # its output (and the claim holding it) is read through this run's pods
        out.append(Need("spec.fineTuneJob", (Access("get", "finetunejobs", ref.name, group="kubetune.dev"),)))
    cache = getattr(spec, "cache", None)
    if cache is not None and cache.claim_name:  # the initializer writes into it
        out.append(Need("spec.cache.claimName", (Access("get", "persistentvolumeclaims", cache.claim_name),)))
    return out


def policy_errors(job: Any, policy: Policy) -> list[str]:
    """What the platform's allow-lists refuse, each naming the field and the list."""
    spec = job.spec
    errors = []
    # no spec.image: the operator's default trainer image, the platform's own choice
    if spec.image and policy.allowed_registries is not None and not any(spec.image.startswith(prefix) for prefix in policy.allowed_registries):
        errors.append(f"spec.image: {spec.image} is not from an allowed registry ({', '.join(policy.allowed_registries) or 'none'}; KUBETUNE_ALLOWED_REGISTRIES)")
    if policy.allowed_tolerations is not None:
        for index, toleration in enumerate(spec.tolerations):
            key = toleration.key
            if key not in policy.allowed_tolerations:
                allowed = ", ".join(policy.allowed_tolerations) or "none"
                errors.append(f"spec.tolerations[{index}].key: {key!r} is not an allowed toleration ({allowed}; KUBETUNE_ALLOWED_TOLERATIONS)")
    if spec.priority_class_name and policy.allowed_priority_classes is not None and spec.priority_class_name not in policy.allowed_priority_classes:
        allowed = ", ".join(policy.allowed_priority_classes) or "none"
        errors.append(f"spec.priorityClassName: {spec.priority_class_name} is not allowed ({allowed}; KUBETUNE_ALLOWED_PRIORITY_CLASSES)")
    return errors


def access_review(userinfo: dict[str, Any], namespace: str, access: Access) -> dict[str, Any]:
    """A SubjectAccessReview asking whether the requester (as the API server authenticated them
    in the AdmissionReview's userInfo) may do `access` in the namespace."""
    spec: dict[str, Any] = {
        "user": userinfo.get("username", ""),
        "groups": list(userinfo.get("groups") or []),
        "resourceAttributes": {
            "namespace": namespace, "verb": access.verb, "group": access.group, "resource": access.resource,
            **({"name": access.name} if access.name else {}),
        },
    }
    if userinfo.get("uid"):
        spec["uid"] = userinfo["uid"]
    if userinfo.get("extra"):
        spec["extra"] = {key: list(value) for key, value in userinfo["extra"].items()}
    return {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "metadata": {}, "spec": spec}


Review = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


@dataclass
class TenancyCheck:
    """Runs the checks for one request; `review` posts a SubjectAccessReview and returns it."""

    review: Review
    policy: Policy = field(default_factory=Policy)

    async def errors(self, job: Any, userinfo: dict[str, Any]) -> list[str]:
        namespace = job.metadata.namespace or "default"
        errors = policy_errors(job, self.policy)
        allowed: dict[Access, bool] = {}
        for need in needs(job):
            for access in need.any_of:
                if access not in allowed:
                    answer = await self.review(access_review(userinfo, namespace, access))
                    allowed[access] = bool((answer.get("status") or {}).get("allowed"))
                if allowed[access]:
                    break
            else:
                rights = " or ".join(a.describe(namespace) for a in need.any_of)
                who = userinfo.get("username") or "the requester"
                errors.append(f"{need.field}: {who} may not use it: that needs {rights}")
        return errors
