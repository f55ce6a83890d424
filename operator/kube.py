"""A small async Kubernetes API client for the children the operator manages.

kopf talks to the API for the custom resources; the handlers use this client (same
credentials, from kopf's login) to create-or-adopt children, read their state and patch them.
Only what the operator needs: create, get, list (label selector), merge-patch, discovery.
"""
from __future__ import annotations

import json
from typing import Any, Optional
from urllib.parse import quote

import aiohttp

_PLURALS = {
    "ConfigMap": "configmaps",
    "Service": "services",
    "Pod": "pods",
    "Job": "jobs",
    "PyTorchJob": "pytorchjobs",
    "JobSet": "jobsets",
    "TrainJob": "trainjobs",
    "ClusterTrainingRuntime": "clustertrainingruntimes",
    "Event": "events",
    "FineTuneJob": "finetunejobs",
    "EvalJob": "evaljobs",
    "ModelDeployment": "modeldeployments",
    "Deployment": "deployments",
    "HorizontalPodAutoscaler": "horizontalpodautoscalers",
    "NetworkPolicy": "networkpolicies",
    "SubjectAccessReview": "subjectaccessreviews",
    "ClusterKopfPeering": "clusterkopfpeerings",  # kopf's peering objects (operator/peering.py)
    "KopfPeering": "kopfpeerings",
}


class ApiError(Exception):
    """An error answer of the API server (or no answer: status 0)."""

    def __init__(self, status: int, reason: str, message: str):
        super().__init__(f"{status} {reason}: {message}")
        self.status, self.reason, self.message = status, reason, message

    @property
    def retriable(self) -> bool:
        return self.status in (0, 409, 429) or self.status >= 500


def resource_path(api_version: str, kind: str, namespace: Optional[str], name: Optional[str] = None, subresource: Optional[str] = None) -> str:
    root = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    path = root + (f"/namespaces/{quote(namespace)}" if namespace else "") + f"/{_PLURALS[kind]}"
    if name:
        path += f"/{quote(name)}"
    if subresource:
        path += f"/{subresource}"
    return path


class KubeClient:
    def __init__(self, connection: Any, *, timeout: float = 30.0):
        """`connection`: a kopf.ConnectionInfo (what kopf's login handlers return)."""
        self.server = connection.server.rstrip("/")
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=connection.as_ssl_context(), limit=64),
            headers=connection.as_http_headers(),
            timeout=aiohttp.ClientTimeout(total=timeout),
        )

    async def close(self) -> None:
        await self._session.close()

    async def _request(self, method: str, path: str, *, body: Any = None, params: Optional[dict[str, str]] = None, content_type: str = "application/json") -> Any:
        headers = {"Content-Type": content_type} if body is not None else {}
        data = json.dumps(body) if body is not None else None
        try:
            async with self._session.request(method, self.server + path, data=data, params=params, headers=headers) as resp:
                text = await resp.text()
                if resp.status >= 400:
                    try:
                        payload = json.loads(text)
                    except ValueError:
                        payload = {}
                    raise ApiError(resp.status, payload.get("reason") or resp.reason or "", payload.get("message") or text[:200])
                return json.loads(text) if text else None
        except (aiohttp.ClientError, TimeoutError, ConnectionError) as err:
            raise ApiError(0, type(err).__name__, str(err)) from err

    async def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        return await self._request("POST", resource_path(obj["apiVersion"], obj["kind"], meta.get("namespace")), body=obj)

    async def get(self, api_version: str, kind: str, namespace: Optional[str], name: str) -> Optional[dict[str, Any]]:
        try:
            return await self._request("GET", resource_path(api_version, kind, namespace, name))
        except ApiError as err:
            if err.status == 404:
                return None
            raise

    async def list(self, api_version: str, kind: str, namespace: Optional[str], *, label_selector: Optional[dict[str, str]] = None) -> list[dict[str, Any]]:
        params = {"labelSelector": ",".join(f"{k}={v}" for k, v in label_selector.items())} if label_selector else None
        answer = await self._request("GET", resource_path(api_version, kind, namespace), params=params)
        return list((answer or {}).get("items") or [])

    async def patch(self, api_version: str, kind: str, namespace: Optional[str], name: str, patch: dict[str, Any], *, subresource: Optional[str] = None) -> dict[str, Any]:
        return await self._request(
            "PATCH", resource_path(api_version, kind, namespace, name, subresource), body=patch, content_type="application/merge-patch+json"
        )

    async def serves(self, api_version: str, plural: str) -> bool:
        """Whether the API serves this resource (e.g. kubeflow.org/v1 pytorchjobs)."""
        try:
            answer = await self._request("GET", f"/apis/{api_version}")
        except ApiError as err:
            if err.status == 404:
                return False
            raise
        return any(r.get("name") == plural for r in (answer or {}).get("resources") or [])
