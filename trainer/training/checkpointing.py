"""Checkpoints under `output_dir/checkpoints/step_<N>/`: the model (HF folder, or a PEFT
adapter for LoRA) plus `training_state.pt` (optimizer, scheduler, data position, RNG states).

Each checkpoint is written into `step_<N>.tmp-*` and renamed into place only when complete,
so a crash at any moment leaves either the whole checkpoint or none; anything named
`step_<N>` is complete. Old checkpoints are pruned only after the new one is in place.

Given the run it belongs to (`run=`, a `resume.RunRecord`), each checkpoint also carries the
run's `run.json`, and pruning and `latest_of(run_id)` only ever consider that run's checkpoints.
"""
from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from kubetune.trainer.training.resume import RUN_FILE, ResumeError, RunRecord  # noqa: F401 (ResumeError re-exported)

TRAINING_STATE = "training_state.pt"
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

    def save(self, step: int, write_model: Callable[[Path], None], training_state: dict[str, Any]) -> Path:
        """Write a checkpoint atomically and prune old ones; returns its folder.

        `write_model(folder)` creates `folder` and writes the model into it (save_pretrained's
        writer, or the LoRA adapter writer)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        final = self.dir / f"step_{step}"
        tmp = self.dir / f"step_{step}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            write_model(tmp)
            tmp.mkdir(exist_ok=True)
            if self.run is not None:
                self.run.write(tmp / RUN_FILE)
            state_path = tmp / TRAINING_STATE
            torch.save(training_state, state_path)
            _fsync_file(state_path)
            if final.exists():  # the same step saved again (e.g. SIGTERM right after a periodic save)
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(self.dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.prune()
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


def load_training_state(checkpoint: Path) -> dict[str, Any]:
    # Our own file: it holds RNG states (Python tuples), which weights_only loading allows.
    return torch.load(checkpoint / TRAINING_STATE, map_location="cpu", weights_only=True)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
