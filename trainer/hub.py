"""Models by name: Hugging Face Hub ids in `model.path` / `tokenizer.path`, and `kubetune download`.

A path is a Hub id when it is `hf://org/name[@revision]`, or `org/name[@revision]` that is not an
existing local path. It resolves to a folder in huggingface_hub's own cache (`HF_HOME`,
`HF_HUB_CACHE`), downloading what is missing; with `HF_HUB_OFFLINE=1` only the cache is read.
The token comes from huggingface_hub's usual places (`HF_TOKEN`, `huggingface-cli login`).
Torch-free: the CLI's `download` and the tokenizer loader use it.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional, Sequence

from kubetune.errors import KubetuneError

# org/name with Hub-legal characters, optionally @revision (a branch, tag or commit).
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")
# What a model folder needs; Meta's repos also hold original/*.pth weights the trainer never reads.
MODEL_PATTERNS = ("*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt")
DEFAULT_IGNORE = ("original/*",)


class HubError(KubetuneError):
    """A Hub model that cannot be resolved: not cached (offline), not found, gated, or no network."""


def is_hub_id(path: str) -> bool:
    """hf://org/name[@rev] always; org/name[@rev] only when no such local path exists."""
    text = str(path)
    if text.startswith("hf://"):
        return True
    if "://" in text or text.startswith((".", "/", "~")) or Path(text).exists():
        return False
    return _HUB_ID.match(text) is not None


def parse_hub_id(path: str) -> tuple[str, Optional[str]]:
    """'hf://org/name@rev' or 'org/name@rev' -> ('org/name', 'rev'); no revision -> None."""
    text = str(path).removeprefix("hf://")
    match = _HUB_ID.match(text)
    if match is None:
        raise HubError(f"{path!r} is not a Hub model id; expected org/name or hf://org/name[@revision]")
    return match.group("repo"), match.group("revision")


def resolve_hub_model(path: str) -> Path:
    """The local snapshot folder of a Hub model (cached by huggingface_hub; downloaded when missing
    unless HF_HUB_OFFLINE is set)."""
    repo_id, revision = parse_hub_id(path)
    return download(repo_id, revision=revision, what=f"model {path}")


def download(
    repo_id: str,
    revision: Optional[str] = None,
    output_dir: Optional[str | os.PathLike] = None,
    allow_patterns: Optional[Sequence[str]] = MODEL_PATTERNS,
    ignore_patterns: Optional[Sequence[str]] = DEFAULT_IGNORE,
    what: Optional[str] = None,
) -> Path:
    """huggingface_hub.snapshot_download with errors that say what to do."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:  # pragma: no cover - tokenizers depends on huggingface_hub
        raise HubError("Hub model ids need the huggingface_hub library (pip install huggingface_hub)") from None
    what = what or repo_id
    offline = _offline()
    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            local_dir=str(output_dir) if output_dir else None,
            allow_patterns=list(allow_patterns) if allow_patterns else None,
            ignore_patterns=list(ignore_patterns) if ignore_patterns else None,
        )
    except GatedRepoError:
        raise HubError(
            f"{what}: the repository is gated; accept its license on huggingface.co and set HF_TOKEN "
            "(or run `huggingface-cli login`)"
        ) from None
    except RepositoryNotFoundError:
        raise HubError(
            f"{what}: no such repository on the Hub (or it is private: set HF_TOKEN); "
            "check the name, or point the path at a local folder"
        ) from None
    except RevisionNotFoundError:
        raise HubError(f"{what}: revision {revision!r} does not exist; use a branch, tag or commit of the repository") from None
    except LocalEntryNotFoundError:
        how = "HF_HUB_OFFLINE is set and it is not in the Hugging Face cache" if offline else (
            "it is not in the Hugging Face cache and the Hub cannot be reached"
        )
        raise HubError(
            f"{what}: not a local folder, and {how}; download it first with `kubetune download {repo_id}` "
            "(where the Hub is reachable) or point the path at a local folder"
        ) from None
    except OSError as err:  # network errors (requests / httpx) and disk errors
        raise HubError(f"{what}: download failed ({err}); retry, or point the path at a local folder") from None
    return Path(folder)


def base_model_reference(path: str) -> str:
    """What an adapter records as base_model_name_or_path, so PEFT's AutoPeftModelForCausalLM can load
    the base: a Hub id as org/name, a local folder as its absolute path, builtin://tiny as its folder."""
    text = str(path)
    if text.startswith("builtin://"):
        from kubetune.trainer.builtin import resolve_model_path

        return str(resolve_model_path(text))
    if is_hub_id(text):
        return parse_hub_id(text)[0]
    local = Path(text).expanduser()
    return str(local.resolve()) if local.exists() else text


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def download_command(args) -> int:
    """`kubetune download org/name [--revision R] [--output-dir D]` (like `tune download`)."""
    repo_id, revision = parse_hub_id(args.repo_id)
    folder = download(
        repo_id,
        revision=args.revision or revision,
        output_dir=args.output_dir,
        allow_patterns=None if args.all_files else MODEL_PATTERNS,
        ignore_patterns=args.ignore_patterns if args.ignore_patterns is not None else DEFAULT_IGNORE,
    )
    print(folder)
    return 0
