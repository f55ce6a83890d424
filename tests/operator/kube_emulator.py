"""kmock's KubernetesEmulator plus the API-server semantics the operator relies on.

kmock 0.8 stores and serves objects over real HTTP but, by design, leaves out what a real
API server adds; each addition below says which behaviour of Kubernetes it stands in for:
  - metadata.uid, resourceVersion, generation (bumped on spec changes), creationTimestamp,
    names from generateName;
  - the status subresource: PATCH on the object ignores `status`, PATCH on /status only `status`;
  - label selectors on list (equality-based, comma-separated), as the operator lists pods;
  - the garbage collector: deleting an owner deletes objects whose ownerReferences name its uid;
  - fault injection for tests: answer the next N matching requests with an error (before or
    after applying the request: a write that went through but whose answer was lost), late (a
    slow or timing-out API), with no answer at all (a connection dropped), or end a watch;
  - max_history: kmock matches each request against all earlier ones (quadratic), fine for a
    test, not for 500 jobs: the benchmark keeps only the latest requests;
  - the Namespace resource itself (/api/v1/namespaces[/NAME]): kmock 0.8 reads `namespaces` there
    as the namespace segment of a namespaced path and fails (500); kopf lists and watches
    namespaces when it runs restricted to some (`kubetune operator --namespace NS`);
  - RBAC of a ServiceAccount bound by a Role in each of some namespaces (`bind_role`): requests
    with its token reach discovery and namespaced resources in those namespaces, 403 elsewhere;
  - the authorizer's answer to SubjectAccessReviews (POST /apis/authorization.k8s.io/v1/
    subjectaccessreviews): `grant(user, verb, resource, namespace, name)` says what a user may do;
    everything else is denied (RBAC is deny by default). Groups are not modelled;
  - OwnerReferencesPermissionEnforcement (`enforce_owner_references`, on by default on OpenShift):
    kube-apiserver's plugin/pkg/admission/gc/gc_admission.go refuses (403) an object whose
    ownerReferences set blockOwnerDeletion unless the writer may `update` the owner's
    `<plural>/finalizers`; the emulator has no RBAC objects, so the test says whether it may;
  - discovery paths with a trailing slash (/api/v1/, as the generated kubernetes_asyncio client
    asks for the core resource list): the API server serves them as without it, kmock 0.8 404s;
  - the discovery entry of authorization.k8s.io/v1 subjectaccessreviews (create only), so a
    client that finds plurals by discovery can post reviews (answered by `grant`, above);
  - authentication of bearer tokens that expired (`revoke`): 401 Unauthorized, as the API server
    answers a projected service-account token past its expiry (the kubelet rotates the file
    before that; a client that keeps the old token meets this). A watch already open goes on,
    as a stream authenticated once does.
"""
from __future__ import annotations

import asyncio
import contextvars
import datetime as dt
import itertools
import re
import uuid
from dataclasses import dataclass
from typing import Any, Optional

import aiohttp.web
import attrs
import kmock
from kmock._internal import enums, parsing

# Resources kopf needs to start (namespaces, events, CRDs), the children, and our CRs.
RESOURCES: dict[str, dict[str, Any]] = {
    "v1/namespaces": {"kind": "Namespace", "namespaced": False},
    "v1/events": {"kind": "Event", "namespaced": True},
    "v1/configmaps": {"kind": "ConfigMap", "namespaced": True},
    "v1/services": {"kind": "Service", "namespaced": True},
    "v1/pods": {"kind": "Pod", "namespaced": True, "subresources": {"status"}},
    "batch/v1/jobs": {"kind": "Job", "namespaced": True, "subresources": {"status"}},
    "apiextensions.k8s.io/v1/customresourcedefinitions": {"kind": "CustomResourceDefinition", "namespaced": False},
    "kubetune.dev/v1alpha1/finetunejobs": {
        "kind": "FineTuneJob", "singular": "finetunejob", "namespaced": True,
        "shortnames": {"ftj"}, "categories": {"kubetune"}, "subresources": {"status"},
    },
    "kubetune.dev/v1alpha1/evaljobs": {
        "kind": "EvalJob", "singular": "evaljob", "namespaced": True,
        "shortnames": {"evj"}, "categories": {"kubetune"}, "subresources": {"status"},
    },
    "kubetune.dev/v1alpha1/modeldeployments": {
        "kind": "ModelDeployment", "singular": "modeldeployment", "namespaced": True,
        "shortnames": {"mdep"}, "categories": {"kubetune"}, "subresources": {"status"},
    },
    "apps/v1/deployments": {"kind": "Deployment", "namespaced": True, "subresources": {"status"}},
    "autoscaling/v2/horizontalpodautoscalers": {"kind": "HorizontalPodAutoscaler", "namespaced": True, "subresources": {"status"}},
    "networking.k8s.io/v1/networkpolicies": {"kind": "NetworkPolicy", "namespaced": True},
    "authorization.k8s.io/v1/subjectaccessreviews": {"kind": "SubjectAccessReview", "namespaced": False, "verbs": {"create"}},
}
PYTORCHJOBS = {"kubeflow.org/v1/pytorchjobs": {"kind": "PyTorchJob", "namespaced": True, "subresources": {"status"}}}
JOBSETS = {"jobset.x-k8s.io/v1alpha2/jobsets": {"kind": "JobSet", "namespaced": True, "subresources": {"status"}}}
TRAINJOBS = {
    "trainer.kubeflow.org/v1alpha1/trainjobs": {"kind": "TrainJob", "namespaced": True, "subresources": {"status"}},
    "trainer.kubeflow.org/v1alpha1/clustertrainingruntimes": {"kind": "ClusterTrainingRuntime", "namespaced": False},
}
VERBS = {"list", "watch", "patch", "get", "create", "delete", "update"}


def _parse_path(path: str) -> parsing.ParsedPath:
    """kmock's path parser, plus the cluster-scoped Namespace resource: /api/v1/namespaces and
    /api/v1/namespaces/NAME (a namespaced path goes on: /api/v1/namespaces/NS/PLURAL...)."""
    parts = path.strip("/").split("/")
    if parts[:3] == ["api", "v1", "namespaces"] and len(parts) <= 4:
        return parsing.ParsedPath(group="", version="v1", plural="namespaces", name=parts[3] if len(parts) == 4 else None)
    return _kmock_parse_path(path)


_kmock_parse_path = parsing.parse_path
parsing.parse_path = _parse_path  # kmock's request parser looks it up in its module on every request


def _is_discovery(path: str) -> bool:
    """/api, /api/v1, /apis, /apis/GROUP, /apis/GROUP/VERSION (with or without a trailing slash)."""
    parts = path.strip("/").split("/")
    return (parts[0] == "api" and len(parts) <= 2) or (parts[0] == "apis" and len(parts) <= 3)


@dataclass(frozen=True)
class Role:
    """A ServiceAccount's rights when Roles (not ClusterRoles) bind it: namespaced resources in
    these namespaces only. Discovery (/api, /apis, /apis/GROUP/VERSION, /version) stays open to
    every authenticated client, as the system:discovery ClusterRole grants."""

    token: str
    namespaces: frozenset[str]

    def applies_to(self, request: aiohttp.web.BaseRequest) -> bool:
        return request.headers.get("Authorization") == f"Bearer {self.token}"

    def allows(self, path: str) -> bool:
        parts = path.strip("/").split("/")
        if parts == ["version"] or (parts[0] == "api" and len(parts) <= 2) or (parts[0] == "apis" and len(parts) <= 3):
            return True
        namespaced = parts[1:3] == ["v1", "namespaces"] if parts[0] == "api" else parts[3:4] == ["namespaces"]
        rest = parts[3:] if parts[0] == "api" else parts[4:]
        return namespaced and len(rest) >= 2 and rest[0] in self.namespaces


def forbidden(request: aiohttp.web.BaseRequest) -> aiohttp.web.Response:
    """The API server's 403, as the client sees it."""
    message = f"{request.method} {request.path} is forbidden: the service account's Roles do not cover it"
    body = {"apiVersion": "v1", "kind": "Status", "status": "Failure", "code": 403, "reason": "Forbidden", "message": message}
    return aiohttp.web.json_response(body, status=403)


DROP = -1  # Fault.status: close the connection without an answer
PASS = 200  # Fault.status: answer normally (with a delay: a slow API)


@dataclass
class Fault:
    method: str  # GET, POST, PATCH, DELETE, WATCH
    path: re.Pattern
    status: int  # an HTTP error; 0: end a watch stream at once (a dropped watch); DROP; PASS
    times: int
    message: str = "injected fault"
    delay: float = 0.0  # seconds before the answer (longer than the client's timeout: a timeout)
    after: bool = False  # apply the request first, then answer with the fault (the write happened)


_raw_request: contextvars.ContextVar[aiohttp.web.BaseRequest] = contextvars.ContextVar("raw_request")


@attrs.define(kw_only=True)
class Emulator(kmock.KubernetesEmulator):
    _counter: Any = attrs.field(factory=lambda: itertools.count(1), init=False)
    faults: list[Fault] = attrs.field(factory=list, init=False)
    hits: list[tuple[str, str, int]] = attrs.field(factory=list, init=False)  # injected faults served
    base_url: str = attrs.field(default="", init=False)
    # kmock keeps every request for assertions and matches each new one against that history,
    # so long runs slow down quadratically; the benchmark keeps only the current request.
    max_history: Optional[int] = None
    role: Optional[Role] = attrs.field(default=None, init=False)
    refused: list[str] = attrs.field(factory=list, init=False)  # "METHOD /path" answered 403 by the role
    grants: set[tuple[str, str, str, str, str]] = attrs.field(factory=set, init=False)  # (user, verb, resource, ns, name or "*")
    access_reviews: list[dict[str, Any]] = attrs.field(factory=list, init=False)
    owner_references_enforced: bool = attrs.field(default=False, init=False)
    may_set_finalizers: bool = attrs.field(default=True, init=False)
    revoked: set[str] = attrs.field(factory=set, init=False)  # bearer tokens answered 401
    unauthorized: list[str] = attrs.field(factory=list, init=False)  # "METHOD /path" answered 401

    def declare(self, resources: dict[str, dict[str, Any]]) -> None:
        for key, info in resources.items():
            self.resources[key] = {"verbs": VERBS, **info}

    def bind_role(self, token: str, namespaces: set[str]) -> None:
        """Requests with this bearer token get only what Roles in these namespaces allow."""
        self.role = Role(token, frozenset(namespaces))

    def revoke(self, token: str) -> None:
        """Requests with this bearer token are answered 401 from now on (an expired token)."""
        self.revoked.add(token)

    def grant(self, user: str, verb: str, resource: str, namespace: str, name: str = "*") -> None:
        """RBAC for SubjectAccessReviews: user may `verb` `resource` (named `name`, or any)."""
        self.grants.add((user, verb, resource, namespace, name))

    async def _access_review(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.Response:
        review = await raw_request.json()
        self.access_reviews.append(review)
        spec = review.get("spec") or {}
        attrs_ = spec.get("resourceAttributes") or {}
        key = (spec.get("user"), attrs_.get("verb"), attrs_.get("resource"), attrs_.get("namespace"))
        allowed = any((*key, name) in self.grants for name in ("*", attrs_.get("name")))
        return aiohttp.web.json_response({**review, "status": {"allowed": allowed}}, status=201)

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        if raw_request.path != "/" and raw_request.path.endswith("/") and _is_discovery(raw_request.path):
            raw_request = raw_request.clone(rel_url=raw_request.rel_url.with_path(raw_request.path.rstrip("/")))
        _raw_request.set(raw_request)
        if raw_request.headers.get("Authorization", "").removeprefix("Bearer ") in self.revoked:
            self.unauthorized.append(f"{raw_request.method} {raw_request.path}")
            body = {"apiVersion": "v1", "kind": "Status", "status": "Failure", "code": 401, "reason": "Unauthorized", "message": "Unauthorized"}
            return aiohttp.web.json_response(body, status=401)
        if raw_request.method == "POST" and raw_request.path.rstrip("/") == "/apis/authorization.k8s.io/v1/subjectaccessreviews":
            return await self._access_review(raw_request)
        if self.role is not None and self.role.applies_to(raw_request) and not self.role.allows(raw_request.path):
            self.refused.append(f"{raw_request.method} {raw_request.path}")
            return forbidden(raw_request)
        return await super().__call__(raw_request)

    def fail(
        self, method: str, path: str, status: int, times: int = 1, message: str = "injected fault", *, delay: float = 0.0, after: bool = False
    ) -> None:
        """Answer the next `times` requests matching method and path (a regex) with `status`."""
        self.faults.append(Fault(method.upper(), re.compile(path), status, times, message, delay, after))

    def enforce_owner_references(self, *, allowed: bool) -> None:
        """Turn on OwnerReferencesPermissionEnforcement; `allowed`: whether the writer may update
        the owners' finalizers subresource (what its RBAC would say)."""
        self.owner_references_enforced, self.may_set_finalizers = True, allowed

    def _owner_reference_refusal(self, request: kmock.Request) -> Optional[aiohttp.web.Response]:
        """gc_admission.go: on create/update, every ownerReference with blockOwnerDeletion: true
        needs `update` on the owner's finalizers subresource."""
        if not self.owner_references_enforced or self.may_set_finalizers or not isinstance(request.data, dict):
            return None
        if request.action not in (enums.action.CREATE, enums.action.UPDATE):
            return None
        owners = (request.data.get("metadata") or {}).get("ownerReferences") or []
        blocking = [o for o in owners if o.get("blockOwnerDeletion")]
        if not blocking:
            return None
        owner = blocking[0]
        group = owner.get("apiVersion", "").rpartition("/")[0]
        name = (request.data.get("metadata") or {}).get("name", "")
        message = (
            f'{request.resource.plural}.{request.resource.group or ""} "{name}" is forbidden: cannot set blockOwnerDeletion if an '
            f"ownerReference refers to a resource you can't set finalizers on: User \"system:serviceaccount:kubetune:kubetune\" "
            f'cannot update resource "{owner.get("kind", "").lower()}s/finalizers" in API group "{group}" in the namespace "{request.namespace}"'
        )
        body = {"apiVersion": "v1", "kind": "Status", "status": "Failure", "code": 403, "reason": "Forbidden", "message": message}
        return aiohttp.web.json_response(body, status=403)

    def _fault_for(self, request: kmock.Request) -> Optional[Fault]:
        method = "WATCH" if request.action == enums.action.WATCH else str(request.method.value).upper()
        for fault in self.faults:
            if fault.times > 0 and fault.method == method and fault.path.search(request.url.path):
                fault.times -= 1
                self.hits.append((method, request.url.path, fault.status))
                return fault
        return None

    def _has_status_subresource(self, resource: Any) -> bool:
        for res in self._resources:
            if res == resource:
                return "status" in self._resources[res].subresources
        return False

    def _stored(self, request: kmock.Request) -> Optional[Any]:
        for (resource, namespace, name), obj in self._objects.items():
            if resource == request.resource and namespace == request.namespace and name == request.name and not obj.deleted:
                return obj
        return None

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        if self.max_history is not None and len(self._requests) > self.max_history:
            del self._requests[: -self.max_history]
        fault = self._fault_for(request) if request.resource is not None else None
        if fault is not None:
            if fault.delay:
                await asyncio.sleep(fault.delay)
            if fault.after or fault.status == PASS:
                response = await self._apply(request)
                if fault.status == PASS:
                    return response
            if fault.status == 0:
                response = aiohttp.web.StreamResponse(status=200)
                response.content_type = "application/json"
                return response  # an empty, finished watch stream
            if fault.status == DROP:
                _raw_request.get().transport.close()  # the client sees the connection end, no answer
                return aiohttp.web.Response(status=500)
            return aiohttp.web.json_response(
                {"apiVersion": "v1", "kind": "Status", "status": "Failure", "code": fault.status, "reason": "Injected", "message": fault.message},
                status=fault.status,
            )
        return await self._apply(request)

    async def _apply(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        """What the API server does with a request that meets no fault."""
        refusal = self._owner_reference_refusal(request) if request.resource is not None else None
        if refusal is not None:
            return refusal
        if request.resource is not None and isinstance(request.data, dict):
            if request.action == enums.action.CREATE:
                meta = request.data.setdefault("metadata", {})
                if not meta.get("name") and meta.get("generateName"):  # kopf names its events this way
                    meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
                meta.setdefault("uid", str(uuid.uuid4()))
                meta.setdefault("creationTimestamp", dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
                meta["generation"] = 1
                meta["resourceVersion"] = str(next(self._counter))
                if request.namespace and "namespace" not in meta:
                    meta["namespace"] = request.namespace
            elif request.action == enums.action.UPDATE and request.name is not None:
                self._split_status(request)
        response = await super()._handle(request)
        if request.action == enums.action.DELETE and request.name is not None:
            await self._collect_garbage()
        return response

    def _split_status(self, request: kmock.Request) -> None:
        data = request.data
        stored = self._stored(request)
        if self._has_status_subresource(request.resource):
            if request.subresource == "status":
                for key in [k for k in data if k not in ("status", "metadata")]:
                    del data[key]
                data.pop("metadata", None)
            else:
                data.pop("status", None)
        meta = data.setdefault("metadata", {})
        meta["resourceVersion"] = str(next(self._counter))
        if stored is not None and "spec" in data:
            old_spec = stored.get("spec")
            merged = _merge(old_spec, data["spec"])
            if merged != old_spec:
                meta["generation"] = int(stored.get("metadata", {}).get("generation", 1)) + 1

    async def _serve_list(self, request: kmock.Request) -> Any:
        answer = await super()._serve_list(request)
        selector = (request.params or {}).get("labelSelector")
        if selector:
            wanted = dict(part.split("=", 1) for part in selector.split(",") if "=" in part)
            answer["items"] = [
                item for item in answer["items"]
                if all((item.get("metadata", {}).get("labels") or {}).get(k) == v for k, v in wanted.items())
            ]
        return answer

    async def _collect_garbage(self) -> None:
        """Delete dependents of deleted owners, repeatedly (chains of owners)."""
        while True:
            alive_uids = {obj.get("metadata", {}).get("uid") for obj in self._objects.values() if not obj.deleted}
            orphans = []
            for key, obj in self._objects.items():
                if obj.deleted:
                    continue
                owners = obj.get("metadata", {}).get("ownerReferences") or []
                if owners and all(o.get("uid") not in alive_uids for o in owners):
                    orphans.append(key)
            if not orphans:
                return
            async with self._lock:
                for key in orphans:
                    raw = self._objects[key].raw
                    self._objects[key].delete()
                    await self._buses[key[0]].put({"type": "DELETED", "object": raw})

    def live(self, resource: str, namespace: Optional[str] = None) -> list[dict[str, Any]]:
        """Objects of a resource that exist now (not soft-deleted), as plain dicts."""
        wanted = kmock.resource(resource) if isinstance(resource, str) else resource
        out = []
        for (res, ns, _name), obj in self._objects.items():
            if not obj.deleted and wanted.check(res) and (namespace is None or ns == namespace):
                out.append(obj.raw)
        return out


def _merge(old: Any, patch: Any) -> Any:
    if not isinstance(old, dict) or not isinstance(patch, dict):
        return patch
    out = dict(old)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merge(old.get(key), value)
    return out
