"""Checkpoints under `output_dir/checkpoints/step_<N>/`: the model (HF folder, or a PEFT
adapter for LoRA), `training_state.pt` (step, scheduler, data position, rank 0's RNG states),
`distcp/` (the trainable model weights and the optimizer state, written with
torch.distributed.checkpoint: with N processes every rank writes its own shards, and any other
number of processes can load them) and `rng_rank_<r>.pt` for the other ranks' RNG states.

Each checkpoint is written into `step_<N>.tmp-*` and renamed into place only when complete
(under torchrun: by rank 0, after a barrier that every rank reaches only once its shards are
written), so a crash at any moment leaves either the whole checkpoint or none; anything named
`step_<N>` is complete. Old checkpoints are pruned only after the new one is in place.
Several nodes must share output_dir (one ReadWriteMany volume), since every rank writes into it.

Given the run it belongs to (`run=`, a `resume.RunRecord`), each checkpoint also carries the
run's `run.json`, and pruning and `latest_of(run_id)` only ever consider that run's checkpoints.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

import torch

from kubetune.trainer.training.resume import RUN_FILE, ResumeError, RunRecord  # noqa: F401 (ResumeError re-exported)

if TYPE_CHECKING:
    from kubetune.trainer.distributed import World

TRAINING_STATE = "training_state.pt"
SHARDED_STATE = "distcp"  # torch.distributed.checkpoint folder: {"model": ..., "optimizer": ...}
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointManager:
    def __init__(self, output_dir: str | Path, keep_last: int = 2, run: Any = None):
        self.dir = Path(output_dir) / "checkpoints"
        self.keep_last = keep_last
        self.run = run  # resume.RunRecord: written into every checkpoint; pruning keeps to its checkpoints
        self.protected: set[int] = set()  # steps pruning keeps whatever keep_last says (the best checkpoint)

    def complete_checkpoints(self, run_id: Optional[str] = None) -> list[tuple[int, Path]]:
        """(step, folder) of every complete checkpoint (of run `run_id` when given), oldest first."""
        if not self.dir.is_dir():
            return []
        found = []
        for child in self.dir.iterdir():
            match = _STEP_DIR.match(child.name)
            if match and (child / TRAINING_STATE).is_file() and (run_id is None or checkpoint_run_id(child) == run_id):
                found.append((int(match.group(1)), child))
        return sorted(found)

    def latest(self) -> Optional[Path]:
        checkpoints = self.complete_checkpoints()
        return checkpoints[-1][1] if checkpoints else None

    def latest_of(self, run_id: str) -> Optional[Path]:
        """The newest complete checkpoint of run `run_id` (what resume: auto continues from)."""
        checkpoints = self.complete_checkpoints(run_id)
        return checkpoints[-1][1] if checkpoints else None

    def resume_from(self, resume: str) -> Optional[Path]:
        """The checkpoint `resume:` names: auto = the newest complete one (or none), never = none,
        anything else = that folder, which must be a complete checkpoint."""
        if resume == "never":
            return None
        if resume == "auto":
            return self.latest()
        path = Path(resume)
        if not (path / TRAINING_STATE).is_file():
            raise ResumeError(
                f"resume: {resume} is not a complete checkpoint (no {TRAINING_STATE}); use resume: auto to pick "
                f"the newest one in {self.dir}, or resume: never to start fresh"
            )
        return path

    def save(
        self,
        step: int,
        write_model: Callable[[Path], None],
        training_state: dict[str, Any],
        world: Optional["World"] = None,
        sharded_state: Optional[dict[str, Any]] = None,
        rank_state: Optional[dict[str, Any]] = None,
    ) -> Path:
        """Write a checkpoint atomically and prune old ones; returns its folder.

        `write_model(folder)` creates `folder` and writes the model into it (save_pretrained's
        writer, or the LoRA adapter writer). Under torchrun every rank calls save(): write_model
        runs on every rank (it may gather shards collectively; rank 0 writes the files),
        `sharded_state` (from `sharded_training_state`) is written by all ranks with
        torch.distributed.checkpoint, `rank_state` (RNG) by each rank for itself, and rank 0 writes
        `training_state` and renames the folder into place once every rank is done."""
        from kubetune.trainer.distributed import World

        world = world or World()
        final = self.dir / f"step_{step}"
        tmp = None
        if world.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp = self.dir / f"step_{step}.tmp-{uuid.uuid4().hex[:8]}"
        tmp = world.broadcast_object(tmp)
        try:
            write_model(tmp)
            if world.is_main:
                tmp.mkdir(exist_ok=True)
                if self.run is not None:
                    self.run.write(tmp / RUN_FILE)
            world.barrier()  # the folder exists before the other ranks write into it
            if sharded_state is not None:
                import torch.distributed.checkpoint as dcp

                with _single_process_is_intended():
                    dcp.save(sharded_state, checkpoint_id=str(tmp / SHARDED_STATE), no_dist=not world.distributed)
            if rank_state is not None and not world.is_main:
                _save_fsynced(rank_state, tmp / rank_state_name(world.rank))
            world.barrier()  # every rank's shards are on disk
            if world.is_main:
                _save_fsynced(training_state, tmp / TRAINING_STATE)
                if final.exists():  # the same step saved again (e.g. SIGTERM right after a periodic save)
                    shutil.rmtree(final)
                os.rename(tmp, final)
                _fsync_dir(self.dir)
        finally:
            if world.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
        if world.is_main:
            self.prune()
        world.barrier()  # no rank runs ahead (and may be killed) before the checkpoint is in place
        return final

    def prune(self) -> None:
        """Keep the newest keep_last complete checkpoints of the current run (and protected steps);
        remove leftovers of interrupted writes. Another run's checkpoints are never pruned here."""
        checkpoints = self.complete_checkpoints(self.run.run_id if self.run is not None else None)
        for step, folder in checkpoints[: max(0, len(checkpoints) - self.keep_last)]:
            if step not in self.protected:
                shutil.rmtree(folder, ignore_errors=True)
        for child in self.dir.glob("step_*.tmp-*"):
            shutil.rmtree(child, ignore_errors=True)


def checkpoint_run_id(checkpoint: Path) -> Optional[str]:
    """The id of the run a checkpoint belongs to (None: written without a run record)."""
    record = RunRecord.read(checkpoint / RUN_FILE)
    return record.run_id if record else None


def load_training_state(checkpoint: Path, rank: int = 0) -> dict[str, Any]:
    """training_state.pt; for rank > 0, `rng` is that rank's own when the checkpoint has it (same
    world size), else rank 0's (the run was resumed with more processes than it was saved with)."""
    # Our own files: they hold RNG states (Python tuples), which weights_only loading allows.
    state = torch.load(checkpoint / TRAINING_STATE, map_location="cpu", weights_only=True)
    own = checkpoint / rank_state_name(rank)
    if rank > 0 and own.is_file():
        state.update(torch.load(own, map_location="cpu", weights_only=True))
    return state


def rank_state_name(rank: int) -> str:
    return f"rng_rank_{rank}.pt"


def _state_dict_options(strict: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Frozen parameters (a LoRA base, an NF4 base) come from model.path again on resume.
    return StateDictOptions(ignore_frozen_params=True, strict=strict)


def sharded_training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """{"model": trainable weights, "optimizer": AdamW state}, keyed by parameter name, each
    tensor this rank's shard (a DTensor under FSDP2, a plain tensor with one process): what
    torch.distributed.checkpoint writes, and can load back at any world size."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer, options=_state_dict_options())
    return {"model": model_state, "optimizer": optimizer_state}


def load_sharded_training_state(checkpoint: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load `distcp/` into the (sharded or not) model and optimizer, resharding as needed: a
    checkpoint written by N processes resumes with M. Every rank calls it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    folder = checkpoint / SHARDED_STATE
    if not folder.is_dir():
        raise ResumeError(
            f"{checkpoint}: no {SHARDED_STATE}/ (model and optimizer state); it was written by an older kubetune "
            "or is damaged; resume from another checkpoint, or set resume: never"
        )
    state = sharded_training_state(model, optimizer)
    with _single_process_is_intended():
        dcp.load(state, checkpoint_id=str(folder), no_dist=not torch.distributed.is_initialized())
    # strict=False: the frozen base is left out on purpose (dcp.load has already checked that every
    # trainable tensor and its optimizer state was in the checkpoint).
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=_state_dict_options(strict=False))


@contextlib.contextmanager
def _single_process_is_intended() -> Iterator[None]:
    """torch.distributed.checkpoint warns on every save/load without a process group; one process is
    a normal run here, not a mistake."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _save_fsynced(obj: Any, path: Path) -> None:
    torch.save(obj, path)
    _fsync_file(path)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
