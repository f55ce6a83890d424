"""Hugging Face model folders: config.json + model.safetensors (or shards + index) <-> LlamaForCausalLM.

Loading builds the model on the meta device and assigns the tensors read from safetensors, so
peak memory is one copy of the weights. Saving writes the folder transformers and vLLM expect,
atomically: into `<dir>.tmp-*`, fsync, then rename.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kubetune.errors import KubetuneError
from kubetune.trainer.models.llama import LlamaForCausalLM, ModelArgs

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = 5 * 2**30
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
)
# Buffers some older checkpoints carry; they are recomputed, never loaded.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(KubetuneError):
    """A model folder that cannot be loaded: missing files, bad tensors, wrong names or shapes."""


def resolve_local_dir(path: str | os.PathLike) -> Path:
    """A local folder for `path`: a folder as is, `builtin://NAME` made on first use, a Hub id from
    huggingface_hub's cache (downloaded when missing)."""
    text = str(path)
    if text.startswith("builtin://"):
        from kubetune.trainer.builtin import resolve_model_path

        return resolve_model_path(text)
    from kubetune.trainer.hub import is_hub_id, resolve_hub_model

    if is_hub_id(text):  # org/name or hf://org/name[@rev]: huggingface_hub's cache (HF_HUB_OFFLINE honoured)
        return resolve_hub_model(text)
    if "://" in text:
        raise CheckpointError(
            f"model path {text!r}: the trainer reads local folders, Hub ids (org/name, hf://org/name[@revision]) "
            "and builtin://tiny; download other sources first (the operator mounts pvc:// sources)"
        )
    return Path(text).expanduser()


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """Like resolve_local_dir, and the folder must hold a config.json."""
    folder = resolve_local_dir(path)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: no config.json; expected a Hugging Face model folder (config.json + *.safetensors)")
    return folder


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None


def load_model_args(path: str | os.PathLike) -> ModelArgs:
    folder = resolve_model_dir(path)
    args = ModelArgs.from_hf_config(read_json(folder / "config.json"), source=str(folder / "config.json"))
    if (folder / "generation_config.json").is_file():
        args.generation_config = read_json(folder / "generation_config.json")
    return args


def load_pretrained(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """The model in `path` (a HF folder or builtin://tiny) on `device` in `dtype`, in eval mode."""
    folder = resolve_model_dir(path)
    args = load_model_args(folder)
    with torch.device("meta"):
        model = LlamaForCausalLM(args)
    expected = {name: tensor.shape for name, tensor in model.state_dict().items()}
    tied = {"lm_head.weight"} if args.tie_word_embeddings else set()
    loaded: set[str] = set()
    for file, names in _weight_files(folder).items():
        state = {}
        for name, tensor in _read_tensors(file, names, device):
            if name.endswith(_IGNORED_SUFFIXES) or name in tied:
                continue
            if name not in expected:
                raise CheckpointError(
                    f"{file}: unexpected tensor {name!r}; it is not a parameter of {args.architecture} with this "
                    "config.json (wrong architecture, or a checkpoint from another model?)"
                )
            if tuple(tensor.shape) != tuple(expected[name]):
                raise CheckpointError(
                    f"{file}: tensor {name!r} has shape {list(tensor.shape)}, but config.json implies "
                    f"{list(expected[name])}"
                )
            state[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
        model.load_state_dict(state, strict=False, assign=True)
        loaded.update(state)
    missing = sorted(set(expected) - loaded - tied)
    if missing:
        where = folder / (INDEX_FILE if (folder / INDEX_FILE).is_file() else SINGLE_FILE)
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{where}: missing tensor {missing[0]!r}{more}; the checkpoint is incomplete")
    model.tie_weights()
    return model.eval()


def _weight_files(folder: Path) -> dict[Path, set[str] | None]:
    """safetensors file -> tensor names it should hold (None: all of them)."""
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map' mapping tensor names to files")
        files: dict[Path, set[str] | None] = {}
        for name, filename in weight_map.items():
            files.setdefault(folder / filename, set()).add(name)  # type: ignore[union-attr]
        return files
    if (folder / SINGLE_FILE).is_file():
        return {folder / SINGLE_FILE: None}
    raise CheckpointError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE}; kubetune loads safetensors weights only")


def _read_tensors(file: Path, names: set[str] | None, device) -> Iterator[tuple[str, torch.Tensor]]:
    if not file.is_file():
        raise CheckpointError(f"{file}: file not found (listed in {INDEX_FILE})")
    try:
        with safe_open(str(file), framework="pt", device=str(device)) as handle:
            present = set(handle.keys())
            for name in sorted(names - present if names else ()):
                raise CheckpointError(f"{file}: tensor {name!r} is listed in {INDEX_FILE} but not in this file")
            for name in sorted(present):
                yield name, handle.get_tensor(name)
    except CheckpointError:
        raise
    except Exception as err:  # safetensors raises its own error types for corrupt or truncated files
        raise CheckpointError(
            f"{file}: not a readable safetensors file ({err}); it may be truncated or corrupt, copy it again"
        ) from None


def save_pretrained(
    model: LlamaForCausalLM,
    out_dir: str | os.PathLike,
    tokenizer_dir: str | os.PathLike | None = None,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    state: Optional[dict[str, torch.Tensor]] = None,
) -> Path:
    """Write `model` as a HF folder (replacing `out_dir` atomically); returns `out_dir`.

    `state`: the tensors to write instead of `model.state_dict()` (a sharded model's full state
    dict, gathered by `kubetune.trainer.distributed.full_state_dict`)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f"{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        write_model_dir(model, tmp, tokenizer_dir, max_shard_size, state=state)
        replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def replace_dir(src: Path, dest: Path) -> None:
    """Move a finished folder into place; an existing `dest` is swapped out, then removed."""
    old = None
    if dest.exists():
        old = dest.parent / f"{dest.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(dest, old)
    os.rename(src, dest)
    _fsync_dir(dest.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_model_dir(
    model: LlamaForCausalLM,
    folder: Path,
    tokenizer_dir: str | os.PathLike | None = None,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    state: Optional[dict[str, torch.Tensor]] = None,
) -> None:
    """Write the HF files into a new folder (not atomic on its own: save_pretrained is).
    `state`: as in save_pretrained."""
    folder.mkdir(parents=True)
    state = dict(model.state_dict() if state is None else state)
    if model.args.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # transformers re-ties it from the embedding
    shards = _plan_shards(state, max_shard_size)
    weight_map = {}
    for number, names in enumerate(shards, start=1):
        filename = SINGLE_FILE if len(shards) == 1 else f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: state[name].detach().to("cpu").contiguous() for name in names}
        save_file(tensors, str(folder / filename), metadata={"format": "pt"})
        weight_map.update({name: filename for name in names})
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in state.values())
        _write_json(folder / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
    dtype_name = str(next(iter(state.values())).dtype).removeprefix("torch.")
    _write_json(folder / "config.json", {**model.args.to_hf_config(), "torch_dtype": dtype_name, "dtype": dtype_name})
    _write_json(folder / "generation_config.json", _generation_config(model.args))
    if tokenizer_dir is not None:
        copy_tokenizer_files(resolve_local_dir(tokenizer_dir), folder)
    for file in folder.iterdir():
        _fsync(file)


def copy_tokenizer_files(src: Path, dest: Path) -> None:
    copied = [name for name in TOKENIZER_FILES if (src / name).is_file()]
    if not copied:
        raise CheckpointError(f"{src}: no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}) to copy")
    for name in copied:
        shutil.copyfile(src / name, dest / name)


def _plan_shards(state: dict[str, torch.Tensor], max_shard_size: int) -> list[list[str]]:
    """Names grouped into shards of at most `max_shard_size` bytes (a bigger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _generation_config(args: ModelArgs) -> dict[str, Any]:
    if args.generation_config:
        return dict(args.generation_config)
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    return {key: args.hf_config[key] for key in keys if args.hf_config.get(key) is not None}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
