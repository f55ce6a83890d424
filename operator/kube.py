"""The operator's client for its children, on kubernetes_asyncio (the async client generated from
the Kubernetes OpenAPI), with API discovery for the resources' plurals and scopes.

kopf talks to the API for the custom resources; the handlers use this client, with kopf's
credentials (the ConnectionInfo its login handler returned), to create-or-adopt children, read
their state and patch them. Every object stays a plain dict (JSON as the API serves it): the
children are planned as dicts, and typed models would drop fields the client does not know
(a newer JobSet or TrainJob) and cost much more to build for a namespace's pods and events.

- requests go through the generated ApiClient (TLS, headers, JSON, ApiException), the same
  generic call its CustomObjectsApi makes; that class cannot address the core group (/api/v1),
  so one call serves every group;
- which plural names a kind, and whether it is namespaced, comes from the API's resource lists
  (CoreV1Api / CustomObjectsApi.get_api_resources), cached per group version and read again
  once when a kind is missing (a CRD installed after the operator started);
- a 401 (a projected service-account token the kubelet rotated, an expired kubeconfig token)
  logs in again through `relogin` (the operator's kopf login function, which reads the token
  file afresh) and retries the request once with the new credentials, as kopf does for its own
  requests; concurrent 401s share one re-login.
"""
from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Optional

import aiohttp
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio.client.exceptions import ApiException

REQUEST_TIMEOUT = 30.0  # seconds, per request: a hung API call must not stall a handler forever
POOL_SIZE = 64  # parallel connections to the API server (the sync loop runs 32 jobs at a time)
_OBJECT = {200: "object", 201: "object"}  # answers stay plain dicts (the generated "object" type)


class ApiError(Exception):
    """An error answer of the API server (or no answer: status 0)."""

    def __init__(self, status: int, reason: str, message: str):
        super().__init__(f"{status} {reason}: {message}")
        self.status, self.reason, self.message = status, reason, message

    @property
    def retriable(self) -> bool:
        return self.status in (0, 409, 429) or self.status >= 500


def api_error(err: BaseException) -> ApiError:
    """The client's exception as an ApiError: the Status object's reason and message, if any."""
    if not isinstance(err, ApiException):
        return ApiError(0, type(err).__name__, str(err))
    try:
        payload = json.loads(err.body) if err.body else {}
    except (TypeError, ValueError):
        payload = {}
    payload = payload if isinstance(payload, dict) else {}
    return ApiError(int(err.status or 0), payload.get("reason") or err.reason or "", payload.get("message") or str(err.body or "")[:200])


@dataclass(frozen=True)
class ApiResource:
    """What discovery says of a kind: its plural (the path segment) and whether it is namespaced."""

    plural: str
    namespaced: bool


def group_version(api_version: str) -> tuple[str, str]:
    group, _, version = api_version.rpartition("/")
    return group, version


def _pem(data: str | bytes) -> bytes:
    """Certificate data from a kubeconfig: PEM, or PEM in base64 (as kopf reads it)."""
    raw = data.encode() if isinstance(data, str) else data
    return raw if raw.startswith(b"-----BEGIN ") else base64.b64decode(raw)


def configuration(connection: Any, secrets_dir: Optional[str] = None) -> k8s.Configuration:
    """The generated client's Configuration from kopf's ConnectionInfo: the same server, CA,
    client certificate and verification; the Authorization header is kopf's (see KubeClient).
    The client reads certificates only from files, so certificate data (a kubeconfig with
    embedded certificates) is written to `secrets_dir`, a private folder the client removes."""
    config = k8s.Configuration(host=connection.server.rstrip("/"))
    config.verify_ssl = not connection.insecure
    config.connection_pool_maxsize = POOL_SIZE
    if connection.proxy_url:
        config.proxy = connection.proxy_url

    def path_of(path: Any, data: Any, name: str) -> Optional[str]:
        if path:
            return os.fsdecode(path)
        if not data:
            return None
        if secrets_dir is None:
            raise ValueError(f"{name} data needs a folder to write it to")
        target = os.path.join(secrets_dir, name)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(_pem(data))
        return target

    config.ssl_ca_cert = path_of(connection.ca_path, connection.ca_data, "ca.crt")
    config.cert_file = path_of(connection.certificate_path, connection.certificate_data, "tls.crt")
    config.key_file = path_of(connection.private_key_path, connection.private_key_data, "tls.key")
    return config


def _tls_and_server(connection: Any) -> tuple[Any, ...]:
    """What the client's Configuration is made of (everything but the Authorization header)."""
    return (connection.server, connection.insecure, connection.proxy_url, connection.ca_path, connection.ca_data,
            connection.certificate_path, connection.certificate_data, connection.private_key_path, connection.private_key_data)


class KubeClient:
    def __init__(
        self, connection: Any, *, timeout: float = REQUEST_TIMEOUT,
        relogin: Optional[Callable[[], Awaitable[Any]]] = None,
    ):
        """`connection`: a kopf.ConnectionInfo (what kopf's login handlers return); `relogin`:
        an async function returning fresh credentials (a ConnectionInfo, or None), called on 401."""
        self.timeout = timeout
        self._relogin = relogin
        self._relogging: Optional[asyncio.Future] = None
        self._retired: list[k8s.ApiClient] = []  # clients of earlier servers/certificates, closed with this one
        self._secrets_dirs: list[str] = []
        self.connection = connection
        self.api = self._api_client(connection)
        self._resources: dict[str, asyncio.Future] = {}  # api_version -> {kind: ApiResource}

    def _api_client(self, connection: Any) -> k8s.ApiClient:
        embedded = connection.ca_data or connection.certificate_data or connection.private_key_data
        secrets_dir = tempfile.mkdtemp(prefix="kubetune-kube-") if embedded else None
        if secrets_dir is not None:
            self._secrets_dirs.append(secrets_dir)
        api = k8s.ApiClient(configuration(connection, secrets_dir))
        for header, value in connection.as_http_headers().items():  # token (with its scheme) or basic auth
            api.set_default_header(header, value)
        api.user_agent = "kubetune-operator"
        return api

    def use(self, connection: Any) -> None:
        """Take new credentials (a re-login). Only the Authorization header changed (a rotated
        token): set it on the same client, keeping its connections and discovery cache; another
        server, CA or client certificate: a new client (the old one is closed with this one, as
        requests may still be in flight on it)."""
        if connection is self.connection:
            return
        if _tls_and_server(connection) == _tls_and_server(self.connection):
            self.api.default_headers.pop("Authorization", None)
            for header, value in connection.as_http_headers().items():
                self.api.set_default_header(header, value)
        else:
            self._retired.append(self.api)
            self.api = self._api_client(connection)
        self.connection = connection

    async def _reauthenticate(self, rejected: Any) -> bool:
        """After a 401 to a request made with the credentials `rejected`: log in again (once for
        all requests that met the 401 together). True if the credentials are new, so a retry may
        pass; False if there is no re-login, or it returned the same credentials."""
        if self.connection is not rejected:  # another request logged in again meanwhile
            return True
        if self._relogin is None:
            return False
        if self._relogging is None or self._relogging.done():
            self._relogging = asyncio.ensure_future(self._relogin())
        try:
            fresh = await asyncio.shield(self._relogging)
        except Exception:  # no credentials now: the 401 stands, the caller retries later
            return False
        if fresh is None or fresh == rejected:
            return False
        self.use(fresh)
        return True

    async def _authenticated(self, request: Callable[[], Awaitable[Any]]) -> Any:
        """The request; on 401, once more with new credentials (see _reauthenticate)."""
        sent_with = self.connection
        try:
            return await request()
        except ApiException as err:
            if err.status != 401 or not await self._reauthenticate(sent_with):
                raise
        return await request()

    async def close(self) -> None:
        for api in [*self._retired, self.api]:
            await api.close()
        for folder in self._secrets_dirs:
            shutil.rmtree(folder, ignore_errors=True)

    # --- discovery ---------------------------------------------------------------------------

    async def _fetch_resources(self, api_version: str) -> dict[str, ApiResource]:
        """The kinds the API serves in a group version ({} when it serves no such version)."""
        group, version = group_version(api_version)
        try:
            if not group:
                answer = await self._authenticated(lambda: k8s.CoreV1Api(self.api).get_api_resources(_request_timeout=self.timeout))
            else:
                answer = await self._authenticated(
                    lambda: k8s.CustomObjectsApi(self.api).get_api_resources(group, version, _request_timeout=self.timeout))
        except ApiException as err:
            if err.status == 404:
                return {}
            raise api_error(err) from err
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as err:
            raise api_error(err) from err
        return {
            r.kind: ApiResource(r.name, bool(r.namespaced))
            for r in answer.resources or []
            if "/" not in r.name  # subresources (jobs/status) share their kind
        }

    async def resources(self, api_version: str, *, refresh: bool = False) -> dict[str, ApiResource]:
        """The kinds of a group version, from the cache; concurrent callers share one request,
        and a failed one is not cached."""
        pending = self._resources.get(api_version)
        if pending is None or refresh or (pending.done() and pending.exception() is not None):
            pending = asyncio.ensure_future(self._fetch_resources(api_version))
            self._resources[api_version] = pending
        return await asyncio.shield(pending)

    async def resource(self, api_version: str, kind: str) -> ApiResource:
        found = (await self.resources(api_version)).get(kind)
        if found is None:  # installed since we looked?
            found = (await self.resources(api_version, refresh=True)).get(kind)
        if found is None:
            raise ApiError(404, "NotFound", f"the API serves no {kind} in {api_version} (is its CRD installed?)")
        return found

    async def serves(self, api_version: str, plural: str) -> bool:
        """Whether the API serves this resource now (e.g. kubeflow.org/v1 pytorchjobs)."""
        return any(r.plural == plural for r in (await self.resources(api_version, refresh=True)).values())

    # --- requests ----------------------------------------------------------------------------

    async def _path(self, api_version: str, kind: str, namespace: Optional[str], name: Optional[str], subresource: Optional[str]) -> tuple[str, dict[str, str]]:
        """A path template with its parameters (the generated client quotes them)."""
        found = await self.resource(api_version, kind)
        group, version = group_version(api_version)
        template, params = ("/api/{version}" if not group else "/apis/{group}/{version}"), {"group": group, "version": version}
        if found.namespaced:
            if not namespace:
                raise ApiError(400, "BadRequest", f"{kind} is namespaced: a namespace is required")
            template, params["namespace"] = template + "/namespaces/{namespace}", namespace
        template += "/" + found.plural
        if name:
            template, params["name"] = template + "/{name}", name
        if subresource:
            template += "/" + subresource
        return template, {k: v for k, v in params.items() if k in template}

    async def _call(
        self, method: str, path: tuple[str, dict[str, str]], *, body: Any = None,
        query: Optional[list[tuple[str, str]]] = None, content_type: str = "application/json",
    ) -> Any:
        template, params = path
        try:  # fresh header and parameter containers per attempt: the generated client fills them in
            return await self._authenticated(lambda: self.api.call_api(
                template, method, dict(params), list(query or []), {"Accept": "application/json", "Content-Type": content_type},
                body=body, response_types_map=_OBJECT, auth_settings=["BearerToken"], _return_http_data_only=True,
                _request_timeout=self.timeout,
            ))
        except (ApiException, aiohttp.ClientError, asyncio.TimeoutError, OSError) as err:
            raise api_error(err) from err

    async def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        return await self._call("POST", await self._path(obj["apiVersion"], obj["kind"], meta.get("namespace"), None, None), body=obj)

    async def get(self, api_version: str, kind: str, namespace: Optional[str], name: str) -> Optional[dict[str, Any]]:
        try:
            return await self._call("GET", await self._path(api_version, kind, namespace, name, None))
        except ApiError as err:
            if err.status == 404:
                return None
            raise

    async def list(self, api_version: str, kind: str, namespace: Optional[str], *, label_selector: Optional[dict[str, str]] = None) -> list[dict[str, Any]]:
        query = [("labelSelector", ",".join(f"{k}={v}" for k, v in label_selector.items()))] if label_selector else []
        answer = await self._call("GET", await self._path(api_version, kind, namespace, None, None), query=query)
        return list((answer or {}).get("items") or [])

    async def patch(self, api_version: str, kind: str, namespace: Optional[str], name: str, patch: dict[str, Any], *, subresource: Optional[str] = None) -> dict[str, Any]:
        return await self._call(
            "PATCH", await self._path(api_version, kind, namespace, name, subresource), body=patch, content_type="application/merge-patch+json"
        )
