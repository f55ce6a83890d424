"""Initializers: `hf://org/name[@revision]` (models and datasets) and `s3://bucket/prefix` sources, downloaded before
the trainer starts, as Kubeflow Trainer v2's initializers do; EvalJob task files too
(`hf://org/name/path/file.jsonl`, a file of a dataset repository, or `s3://bucket/file.jsonl`).
Pure planning (no I/O here).

On a cluster an init container (`kubetune initialize --plan /etc/kubetune/sources.yaml`, the
trainer image) downloads each remote source into a cache volume (spec.cache.claimName, else an
emptyDir) and the trainer reads the local folder; locally `kubetune apply` runs the same
download into runs/.cache. kubetune.operator.fetch does the downloading.

Where a source lands is a pure function of its URI (cache_path), so the planner can write the
trainer config before anything is downloaded, and a re-run finds what an earlier one fetched.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any, Optional

import yaml

from kubetune.operator.sources import SourceError, split_scheme

CACHE_MOUNT = "/mnt/cache"
CACHE_VOLUME = "cache"
INIT_CONTAINER = "initializer"
SOURCES_KEY = "sources.yaml"  # the ConfigMap key the init container reads
SOURCES_PATH = f"/etc/kubetune/{SOURCES_KEY}"
INIT_ARGV = ["kubetune", "initialize", "--plan", SOURCES_PATH]
# The keys of spec.secrets.s3's Secret: the names boto3 reads from the environment.
S3_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")

_HF_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_SUBSET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_HUB_KINDS = {"datasets": "a dataset repository", "spaces": "a Space"}  # huggingface_hub's hf://KIND/ORG/NAME


@dataclass(frozen=True)
class RemoteSource:
    """A source the trainer cannot read itself: fetched into the cache first."""

    uri: str
    field: str  # spec.model.source, ...: named in every error
    scheme: str  # hf | s3
    repo: str = ""  # hf: org/name
    revision: Optional[str] = None  # hf: branch, tag or commit (None: the default branch)
    bucket: str = ""  # s3
    prefix: str = ""  # s3: a folder (or one object) in the bucket
    repo_type: str = "model"  # hf: "dataset" for dataset fields (the Hub keeps them apart)
    subset: Optional[str] = None  # hf datasets: hf://org/name/CONFIG reads the repository's CONFIG/ folder
    file: Optional[str] = None  # task files: the one file read (hf: its path in the repository; s3: the object's name)

    def cache_path(self, root: str) -> str:
        """<root>/<scheme>/<readable name>-<hash of the URI>: stable, distinct per URI. Where the
        download goes."""
        name = self.repo.replace("/", "--") if self.scheme == "hf" else f"{self.bucket}--{self.prefix.strip('/').replace('/', '--')}"
        name = re.sub(r"[^A-Za-z0-9._-]", "-", name).strip("-.")[:80] or self.scheme
        return f"{root.rstrip('/')}/{self.scheme}/{name}-{hashlib.sha256(self.uri.encode()).hexdigest()[:10]}"

    def local_path(self, root: str) -> str:
        """What the trainer (or server, or eval) reads: the download, its CONFIG folder, or the task file in it."""
        inside = self.subset or self.file
        return self.cache_path(root) + (f"/{inside}" if inside else "")


def is_dataset_field(field: str) -> bool:
    return field.startswith("spec.dataset.")


def is_task_field(field: str) -> bool:
    """spec.tasks[N].source: one JSONL file (EvalJob local tasks)."""
    return field.startswith("spec.tasks[")


def _task_file(source: str, field: str, scheme: str, path: str) -> str:
    """The file a task source names (hf: the path inside the repository; s3: the key), checked:
    a file, not a folder, nothing that climbs out of the download."""
    parts = path.split("/")
    if not path or path.endswith("/") or any(part in ("", ".", "..") for part in parts):
        form = "hf://ORG/NAME/PATH/TO/FILE.jsonl[@REVISION] (a file of a dataset repository)" if scheme == "hf" else "s3://BUCKET/PATH/TO/FILE.jsonl"
        raise SourceError(f"{field}: {source!r}: a task's source is one JSONL file; write {form}")
    return path


def parse_remote(source: str, field: str) -> Optional[RemoteSource]:
    """hf:// and s3:// sources (None for any other); errors name the field and the form to use.
    Datasets may name a config (a folder of the repository): hf://ORG/NAME/CONFIG[@REVISION]; task
    files are one file of a dataset repository (hf://ORG/NAME/PATH/FILE.jsonl[@REVISION]) or one object."""
    scheme, rest = split_scheme(source)
    task = is_task_field(field)
    if scheme == "hf":
        path, _, revision = rest.partition("@")
        dataset = is_dataset_field(field)
        kind, _, after = path.partition("/")
        if kind in _HUB_KINDS:  # huggingface_hub's own form, hf://datasets/ORG/NAME: the Hub reserves these names
            if kind != "datasets" or not (dataset or task):
                wanted = "a dataset repository: hf://datasets/ORG/NAME or hf://ORG/NAME" if dataset or task else "a model repository: hf://ORG/NAME"
                raise SourceError(f"{field}: {source!r} names {_HUB_KINDS[kind]}; this field reads {wanted}")
            path = after
        repo, subset, file = path, None, None
        if task:
            org_name = path.split("/", 2)
            repo = "/".join(org_name[:2])
            file = _task_file(source, field, "hf", org_name[2] if len(org_name) == 3 else "")
        elif dataset and path.count("/") == 2:
            org, name, subset = path.split("/")
            repo = f"{org}/{name}"
            if not _SUBSET.match(subset):
                raise SourceError(f"{field}: {source!r}: {subset!r} is not a config name; write hf://ORG/NAME/CONFIG")
        if not _HF_REPO.match(repo) or (revision == "" and "@" in rest):
            form = ("hf://ORG/NAME/PATH/TO/FILE.jsonl[@REVISION]" if task else
                    "hf://ORG/NAME[/CONFIG][@REVISION]" if dataset else "hf://ORG/NAME or hf://ORG/NAME@REVISION")
            raise SourceError(f"{field}: {source!r} is not a Hub repository; write {form}")
        return RemoteSource(source, field, "hf", repo=repo, revision=revision or None,
                            repo_type="dataset" if dataset or task else "model", subset=subset, file=file)
    if scheme == "s3":
        bucket, _, prefix = rest.partition("/")
        if not _BUCKET.match(bucket):
            raise SourceError(f"{field}: {source!r} names no valid bucket; write s3://BUCKET/PREFIX")
        file = _task_file(source, field, "s3", prefix).rsplit("/", 1)[-1] if task else None
        return RemoteSource(source, field, "s3", bucket=bucket, prefix=prefix, file=file)
    return None


def remote_sources(fields: dict[str, Optional[str]]) -> list[RemoteSource]:
    """The remote sources among `fields` ({field name: source}), hf:// datasets included (the
    trainer then reads the downloaded files: no network, no token, no `datasets` library)."""
    out = []
    for field, source in fields.items():
        if source is None:
            continue
        remote = parse_remote(source, field)
        if remote is not None:
            out.append(remote)
    return out


def sources_document(sources: list[RemoteSource], root: str, *, endpoint: Optional[str], region: Optional[str]) -> dict[str, Any]:
    """What `kubetune initialize --plan` reads: each source and where it goes."""
    doc: dict[str, Any] = {"sources": [{"field": s.field, "uri": s.uri, "dest": s.cache_path(root)} for s in sources]}
    s3 = {key: value for key, value in (("endpoint", endpoint), ("region", region)) if value}
    if s3:
        doc["s3"] = s3
    return doc


def render_sources(doc: dict[str, Any]) -> str:
    return yaml.safe_dump(doc, sort_keys=False)


def initializer_failure(pods: list[dict[str, Any]]) -> Optional[str]:
    """The initializer's last words when it failed in one of the pods (its termination message:
    `error: <field>: <source>: ...`), for the FineTuneJob's conditions."""
    for pod in pods:
        for cs in (pod.get("status") or {}).get("initContainerStatuses") or []:
            if cs.get("name") != INIT_CONTAINER:
                continue
            terminated = (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated") or {}
            if terminated.get("exitCode"):
                lines = [line for line in (terminated.get("message") or "").strip().splitlines() if line.strip()]
                return lines[-1] if lines else f"exit code {terminated['exitCode']}"
    return None
