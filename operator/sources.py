"""Where model, dataset and output sources point, on a cluster and on this machine.

| source                | on a cluster (planner)                          | locally (kubetune apply)        |
|-----------------------|-------------------------------------------------|---------------------------------|
| builtin://tiny        | passed to the trainer as-is                     | same                            |
| hf://org/name         | datasets: passed as-is (the Hub, HF_TOKEN);      | same                            |
|                       | models: refused (the trainer does not download)  |                                 |
| pvc://claim/sub/path  | the claim mounted at /mnt/<role>, path inside it | an error: there is no cluster   |
| file:///abs/path      | /abs/path inside the trainer image              | /abs/path on this machine       |
| plain/path            | inside the image, from its working directory     | resolved against the current dir|
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from kubetune.errors import KubetuneError

MOUNT_ROOT = "/mnt"


class SourceError(KubetuneError):
    """A source that cannot be used where the job runs; the message names the field."""


@dataclass(frozen=True)
class PvcMount:
    volume: str  # volume name in the pod spec
    claim: str
    mount_path: str
    read_only: bool


@dataclass(frozen=True)
class MappedSource:
    path: str  # what the trainer config gets
    mount: Optional[PvcMount] = None


def split_scheme(source: str) -> tuple[str, str]:
    scheme, sep, rest = source.partition("://")
    return (scheme, rest) if sep else ("", source)


def _no_hub_models(source: str, field: str) -> None:
    if field == "spec.model.source" and source.startswith("hf://"):
        name = source[len("hf://"):]
        raise SourceError(
            f"{field}: {source!r}: the trainer does not download models; put the model in a volume "
            f"(e.g. `huggingface-cli download {name} --local-dir DIR`) and use pvc://CLAIM/DIR on a cluster "
            "or a local folder with kubetune apply"
        )


def map_cluster_source(source: str, role: str, field: str, read_only: bool = True) -> MappedSource:
    _no_hub_models(source, field)
    scheme, rest = split_scheme(source)
    if scheme == "pvc":
        claim, _, sub = rest.partition("/")
        if not claim:
            raise SourceError(f"{field}: {source!r} names no claim; write pvc://CLAIM/path/inside/it")
        mount_path = f"{MOUNT_ROOT}/{role}"
        path = f"{mount_path}/{sub}".rstrip("/") if sub else mount_path
        return MappedSource(path, PvcMount(role, claim, mount_path, read_only))
    if scheme == "file":
        return MappedSource(rest if rest.startswith("/") else "/" + rest)
    return MappedSource(source)  # builtin://, hf://, or a path inside the image


def map_local_source(source: str, field: str, base_dir: Path) -> str:
    _no_hub_models(source, field)
    scheme, rest = split_scheme(source)
    if scheme == "pvc":
        raise SourceError(
            f"{field}: {source!r} is a PersistentVolumeClaim, which only exists on a cluster; "
            "for `kubetune apply` use a local path (or file:///abs/path)"
        )
    if scheme == "file":
        return rest if rest.startswith("/") else "/" + rest
    if scheme:  # builtin://, hf://
        return source
    return str((base_dir / source).resolve())
