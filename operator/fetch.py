"""Download hf:// and s3:// sources into a cache folder: what the init container
(`kubetune initialize --plan FILE`) and `kubetune apply` run before the trainer starts.

- hf://org/name[@revision]: the revision (default branch, tag or commit) is resolved to a commit
  with huggingface_hub, then that commit's files are downloaded (snapshot_download); a model
  repository for model fields, a dataset repository for dataset fields (hf://org/name/CONFIG:
  only that folder) and EvalJob task files (hf://org/name/path/file.jsonl: only that file);
- s3://bucket/prefix: every object under the prefix (a folder, or one object: a task file must be
  one) is listed and downloaded with boto3; `endpoint` points at an S3-compatible store (MinIO,
  Ceph, moto, ...).

Credentials come from the environment only (HF_TOKEN; AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY),
which the planner fills from Secret references. Each download goes to a temporary folder next to
the destination and is renamed into place with a marker file holding the resolved commit or the
objects' ETags: a re-run whose source has not changed skips the download, and a half-finished
download is never mistaken for a complete one. Errors name the field and say what to fix.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Mapping, Optional

import yaml

from kubetune.errors import KubetuneError
from kubetune.operator.initializers import RemoteSource, parse_remote

MARKER = ".kubetune-source.json"
CARD = "README.md"  # a dataset repository's card: its `configs` say which files make which split
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_BAD_CREDENTIALS = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken", "ExpiredToken", "403", "401"}


class FetchError(KubetuneError):
    """A remote source that cannot be fetched; the message names the field and the fix."""


@dataclass(frozen=True)
class Fetched:
    source: RemoteSource
    path: Path
    skipped: bool  # the marker matched: nothing was downloaded
    identity: dict[str, Any]  # {"revision": commit} or {"etags": {relative path: ETag}}


def read_marker(dest: Path) -> Optional[dict[str, Any]]:
    try:
        marker = json.loads((dest / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _up_to_date(dest: Path, source: RemoteSource, identity: dict[str, Any]) -> bool:
    marker = read_marker(dest)
    return marker is not None and marker.get("uri") == source.uri and marker.get("identity") == identity


def _install(tmp: Path, dest: Path, source: RemoteSource, identity: dict[str, Any]) -> None:
    """Move a finished download into place: marker first (inside tmp), then one rename. Another
    pod sharing the cache may have finished the same download first: keep its copy then."""
    (tmp / MARKER).write_text(json.dumps({"uri": source.uri, "identity": identity}, sort_keys=True))
    old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
    if dest.exists():
        if _up_to_date(dest, source, identity):
            shutil.rmtree(tmp)
            return
        dest.rename(old)
    try:
        tmp.rename(dest)
    except OSError:
        if not _up_to_date(dest, source, identity):
            raise
        shutil.rmtree(tmp)
    shutil.rmtree(old, ignore_errors=True)


def _tmp_for(dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    return tmp


# --- hf:// -------------------------------------------------------------------------------------


def fetch_hf(source: RemoteSource, dest: Path, env: Mapping[str, str]) -> Fetched:
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    if source.revision and _COMMIT.match(source.revision) and _up_to_date(dest, source, {"revision": source.revision}):
        return Fetched(source, dest, True, {"revision": source.revision})  # pinned and present: no request at all
    token = env.get("HF_TOKEN") or None
    endpoint = env.get("HF_ENDPOINT") or None
    where = endpoint or "the Hugging Face Hub"
    try:
        api = HfApi(endpoint=endpoint, token=token)
        info = api.dataset_info if source.repo_type == "dataset" else api.model_info
        repo_info = info(source.repo, revision=source.revision)
        commit = repo_info.sha
        identity = {"revision": commit}
        if _up_to_date(dest, source, identity):
            return Fetched(source, dest, True, identity)
        tmp = _tmp_for(dest)
        try:
            configs: dict[str, Any] = {}
            if source.file:  # a task file: only that file (escaped: the patterns are fnmatch globs)
                patterns: Optional[list[str]] = [glob.escape(source.file)]
            elif source.repo_type == "dataset":  # the card's config, or a folder: only their files
                has_card = any(sibling.rfilename == CARD for sibling in repo_info.siblings or [])
                if has_card:
                    hf_hub_download(source.repo, CARD, repo_type="dataset", revision=commit, local_dir=tmp, token=token, endpoint=endpoint)
                configs = _card_configs(source, tmp / CARD if has_card else None)
                patterns = _dataset_patterns(source, configs)
            else:
                patterns = None
            snapshot_download(source.repo, repo_type=source.repo_type, revision=commit, local_dir=tmp, token=token,
                              endpoint=endpoint, allow_patterns=patterns)
            if source.subset and source.subset not in configs and not (tmp / source.subset).is_dir():
                declared = f" and its card declares no config {source.subset!r} (its configs: {', '.join(configs)})" if configs else ""
                raise FetchError(
                    f"{source.field}: {source.uri}: the dataset has no folder {source.subset!r} (its config){declared}; "
                    "name one of its configs or folders after the repository, or none"
                )
            if source.file and not (tmp / source.file).is_file():
                raise FetchError(
                    f"{source.field}: {source.uri}: the dataset repository has no file {source.file!r}; "
                    "write hf://ORG/NAME/PATH/TO/FILE.jsonl with the file's path in the repository"
                )
            shutil.rmtree(tmp / ".cache", ignore_errors=True)  # huggingface_hub's bookkeeping for local_dir
            _install(tmp, dest, source, identity)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except RevisionNotFoundError:
        raise FetchError(
            f"{source.field}: {source.uri}: the repository has no revision {source.revision!r}; "
            "use an existing branch, tag or commit after the @"
        ) from None
    except GatedRepoError:
        raise FetchError(
            f"{source.field}: {source.uri} is gated: accept its terms on the Hub with the account of the token in "
            "spec.secrets.hfToken (HF_TOKEN)"
        ) from None
    except RepositoryNotFoundError:
        raise FetchError(
            f"{source.field}: {source.uri}: no such repository on {where}, or it is private and the token "
            "(spec.secrets.hfToken, HF_TOKEN) cannot read it; check the name and the token"
        ) from None
    except HfHubHTTPError as err:
        status = getattr(getattr(err, "response", None), "status_code", None)
        if status in (401, 403):
            raise FetchError(f"{source.field}: {source.uri}: the Hub refused the token ({status}); check spec.secrets.hfToken (HF_TOKEN)") from None
        raise FetchError(f"{source.field}: {source.uri}: {where} answered {status}: {err}") from None
    except OSError as err:  # connection errors (requests' and httpx's are OSErrors or wrapped as such)
        raise FetchError(f"{source.field}: {source.uri}: cannot reach {where}: {err}") from None
    return Fetched(source, dest, False, identity)


def _card_configs(source: RemoteSource, card: Optional[Path]) -> dict[str, Any]:
    """The configs the dataset card (README.md) declares, read as the trainer reads them."""
    from kubetune.trainer.data.hub_card import card_configs
    from kubetune.trainer.data.sources import DatasetError

    if card is None:
        return {}
    try:
        return card_configs(card.read_text(encoding="utf-8", errors="replace"), f"{source.field}: {source.uri}: {CARD}")
    except DatasetError as err:
        raise FetchError(f"{err}; fix the card, or name a folder of the repository (hf://ORG/NAME/FOLDER)") from None


def _dataset_patterns(source: RemoteSource, configs: dict[str, Any]) -> Optional[list[str]]:
    """What to download of a dataset repository (None: all of it): the files of the config the
    trainer will read (hf://org/name/CONFIG, else the card's default config) and the card; with
    a CONFIG the card does not declare, the repository's CONFIG/ folder."""
    from kubetune.trainer.data.hub_card import default_config, download_patterns
    from kubetune.trainer.data.sources import DatasetError

    if source.subset:
        return download_patterns(configs[source.subset]) if source.subset in configs else [f"{source.subset}/**"]
    if not configs:
        return None
    try:
        config = default_config(configs, f"{source.field}: {source.uri}: {CARD}")
    except DatasetError as err:
        raise FetchError(str(err)) from None
    if config is None:
        raise FetchError(
            f"{source.field}: {source.uri}: the dataset card declares the configs {', '.join(configs)} and none is "
            "the default; name one: hf://ORG/NAME/CONFIG"
        )
    return download_patterns(config)


# --- s3:// -------------------------------------------------------------------------------------


def _relative(key: str, prefix: str) -> Optional[str]:
    """Where an object lands under the destination; None when it is not under the prefix folder."""
    if key.endswith("/"):
        return None  # a "folder" placeholder object
    if not prefix or prefix.endswith("/"):
        rel = key[len(prefix):]
    elif key == prefix:
        rel = PurePosixPath(key).name  # the prefix names one object
    elif key.startswith(prefix + "/"):
        rel = key[len(prefix) + 1:]
    else:
        return None  # s3://b/models/llama must not take models/llama-2/...
    parts = PurePosixPath(rel).parts
    if not parts or any(part in ("..", ".") for part in parts) or rel.startswith("/"):
        raise FetchError(f"object key {key!r} would land outside the download folder; refusing it")
    return rel


def fetch_s3(source: RemoteSource, dest: Path, env: Mapping[str, str], *, endpoint: Optional[str], region: Optional[str]) -> Fetched:
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

    where = endpoint or "S3"
    session = boto3.session.Session(
        aws_access_key_id=env.get("AWS_ACCESS_KEY_ID") or None,
        aws_secret_access_key=env.get("AWS_SECRET_ACCESS_KEY") or None,
        aws_session_token=env.get("AWS_SESSION_TOKEN") or None,
        region_name=region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
    )
    client = session.client("s3", endpoint_url=endpoint, config=Config(retries={"max_attempts": 5, "mode": "standard"}))
    try:
        objects: dict[str, tuple[str, str]] = {}  # relative path -> (key, ETag)
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=source.bucket, Prefix=source.prefix):
            for obj in page.get("Contents") or []:
                rel = _relative(obj["Key"], source.prefix)
                if rel is not None:
                    objects[rel] = (obj["Key"], obj["ETag"].strip('"'))
        if not objects:
            raise FetchError(
                f"{source.field}: {source.uri}: no objects under that prefix in bucket {source.bucket} at {where}; "
                "check the path (a folder of files, or one object)"
            )
        if source.file and source.prefix not in {key for key, _ in objects.values()}:
            raise FetchError(  # e.g. the key of a folder: a task reads one file
                f"{source.field}: {source.uri}: no object {source.prefix} in bucket {source.bucket} at {where} "
                "(only objects under it); a task's source is one JSONL object: write s3://BUCKET/PATH/TO/FILE.jsonl"
            )
        if source.file:  # that object alone, not others under a folder of the same name
            objects = {rel: value for rel, value in objects.items() if value[0] == source.prefix}
        identity = {"etags": {rel: etag for rel, (_, etag) in sorted(objects.items())}}
        if _up_to_date(dest, source, identity):
            return Fetched(source, dest, True, identity)
        tmp = _tmp_for(dest)
        try:
            for rel, (key, _) in sorted(objects.items()):
                target = tmp / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                client.download_file(source.bucket, key, str(target))
            _install(tmp, dest, source, identity)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except NoCredentialsError:
        raise FetchError(
            f"{source.field}: {source.uri}: no S3 credentials; set spec.secrets.s3 to a Secret with the keys "
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (locally: export them)"
        ) from None
    except EndpointConnectionError as err:
        raise FetchError(f"{source.field}: {source.uri}: cannot reach {where}: {err}; check spec.s3.endpoint") from None
    except ClientError as err:
        code = str(err.response.get("Error", {}).get("Code", ""))
        if code == "NoSuchBucket":
            raise FetchError(f"{source.field}: {source.uri}: bucket {source.bucket} does not exist at {where}") from None
        if code in _BAD_CREDENTIALS:
            raise FetchError(
                f"{source.field}: {source.uri}: {where} refused the credentials ({code}); check the Secret in "
                "spec.secrets.s3 (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) and its rights on the bucket"
            ) from None
        raise FetchError(f"{source.field}: {source.uri}: {where} answered {code}: {err}") from None
    except BotoCoreError as err:
        raise FetchError(f"{source.field}: {source.uri}: {err}") from None
    return Fetched(source, dest, False, identity)


# --- both --------------------------------------------------------------------------------------


def fetch(source: RemoteSource, dest: Path, *, endpoint: Optional[str] = None, region: Optional[str] = None,
          env: Optional[Mapping[str, str]] = None) -> Fetched:
    env = os.environ if env is None else env
    if source.scheme == "hf":
        return fetch_hf(source, dest, env)
    return fetch_s3(source, dest, env, endpoint=endpoint, region=region)


def fetch_plan(doc: dict[str, Any], env: Optional[Mapping[str, str]] = None) -> list[Fetched]:
    """Every source of a plan document (initializers.sources_document), in order."""
    s3 = doc.get("s3") or {}
    done = []
    for entry in doc.get("sources") or []:
        source = parse_remote(entry["uri"], entry["field"])
        if source is None:
            raise FetchError(f"{entry['field']}: {entry['uri']} is not an hf:// or s3:// source")
        done.append(fetch(source, Path(entry["dest"]), endpoint=s3.get("endpoint"), region=s3.get("region"), env=env))
    return done


def initialize_command(args: argparse.Namespace) -> int:
    """`kubetune initialize --plan FILE`: the init container's command."""
    try:
        doc = yaml.safe_load(Path(args.plan).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise FetchError(f"--plan {args.plan}: cannot read it: {err}") from None
    for done in fetch_plan(doc):
        verb = "up to date" if done.skipped else "fetched"
        print(f"{done.source.field}: {done.source.uri} {verb} in {done.path}", file=sys.stderr)
    return 0
