"""Where model, dataset and output sources point, on a cluster and on this machine.

| source                | on a cluster (planner)                          | locally (kubetune apply)        |
|-----------------------|-------------------------------------------------|---------------------------------|
| builtin://tiny        | passed to the trainer as-is                     | same                            |
| hf://org/name[@rev]   | fetched by the initializer into the cache volume | fetched into runs/.cache        |
|                       | (datasets: also hf://org/name/config)           |                                 |
| s3://bucket/prefix    | fetched by the initializer into the cache volume | fetched into runs/.cache        |
|                       | (EvalJob task files: hf://org/name/path/file.jsonl of a dataset repository, or one s3:// object) |
| pvc://claim/sub/path  | the claim mounted at /mnt/<role>, path inside it | <runs-dir>/claim/sub/path       |
| file:///abs/path      | /abs/path inside the trainer image              | /abs/path on this machine       |
| plain/path            | inside the image, from its working directory     | resolved against the current dir|
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from kubetune.errors import KubetuneError
from kubetune.operator.api.names import object_name_error

if TYPE_CHECKING:
    from kubetune.operator.initializers import RemoteSource

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
    remote: Optional["RemoteSource"] = None  # hf:// or s3://: the initializer fetches it to `path`


def split_scheme(source: str) -> tuple[str, str]:
    scheme, sep, rest = source.partition("://")
    return (scheme, rest) if sep else ("", source)


def _remote(source: str, field: str, fetch: bool, *, output: bool = False) -> Optional["RemoteSource"]:
    """The hf:// or s3:// source the initializer fetches (None: the trainer reads `source`
    itself). Callers that plan the initializer pass fetch=True (models, adapters, datasets and
    EvalJob task files); for the others (a FineTuneJob's output read back) an s3:// source is
    refused, naming the field."""
    from kubetune.operator.initializers import remote_sources  # it imports this module

    if output and split_scheme(source)[0] in ("hf", "s3"):
        raise SourceError(f"{field}: {source!r}: outputs are written to a volume or folder; use pvc://CLAIM/path (or a local folder)")
    found = remote_sources({field: source}) if fetch else []
    if found:
        return found[0]
    if not fetch and split_scheme(source)[0] == "s3":
        raise SourceError(f"{field}: {source!r}: only models, adapters, datasets and task files are fetched from s3://; "
                          "put the files in a volume (pvc://CLAIM/path) or a local folder")
    return None


def map_cluster_source(source: str, role: str, field: str, read_only: bool = True, *, fetch: bool = False) -> MappedSource:
    """Where the trainer finds `source` in its pod; fetch=True: hf:// and s3:// sources go
    through the initializer into the cache volume."""
    from kubetune.operator.initializers import CACHE_MOUNT

    remote = _remote(source, field, fetch, output=not read_only)
    if remote is not None:
        return MappedSource(remote.local_path(CACHE_MOUNT), remote=remote)
    scheme, rest = split_scheme(source)
    if scheme == "pvc":
        claim, _, sub = rest.partition("/")
        if not claim:
            raise SourceError(f"{field}: {source!r} names no claim; write pvc://CLAIM/path/inside/it")
        claim_error = object_name_error(claim)
        if claim_error:
            raise SourceError(f"{field}: {source!r}: claim {claim_error}")
        if ".." in sub.split("/"):  # the path must stay inside the claim's mount
            raise SourceError(f"{field}: {source!r}: '..' would leave the volume; write pvc://CLAIM/path/inside/it")
        sub = "/".join(part for part in sub.split("/") if part not in ("", "."))
        mount_path = f"{MOUNT_ROOT}/{role}"
        path = f"{mount_path}/{sub}".rstrip("/") if sub else mount_path
        return MappedSource(path, PvcMount(role, claim, mount_path, read_only))
    if scheme == "file":
        return MappedSource(rest if rest.startswith("/") else "/" + rest)
    return MappedSource(source)  # builtin://, hf://, or a path inside the image


def map_local_source(
    source: str, field: str, base_dir: Path, cache_dir: Optional[Path] = None, *, output: bool = False, claims_dir: Optional[Path] = None
) -> str:
    """The local path; with a cache_dir, hf:// and s3:// sources map to where `kubetune
    apply` fetches them; with a claims_dir (`kubetune apply`: the runs folder), a claim is the
    folder claims_dir/CLAIM, so one manifest with pvc:// paths runs on a cluster and here."""
    remote = _remote(source, field, cache_dir is not None, output=output)
    if remote is not None:
        return remote.local_path(str(cache_dir))
    scheme, rest = split_scheme(source)
    if scheme == "pvc" and claims_dir is not None:
        mapped = map_cluster_source(source, "claim", field, read_only=not output)  # the same checks: a claim name, no '..'
        assert mapped.mount is not None
        return str(claims_dir.resolve() / mapped.mount.claim / mapped.path[len(mapped.mount.mount_path):].lstrip("/"))
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
