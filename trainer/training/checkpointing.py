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

Integrity: the last file written into a checkpoint, before the rename, is `checksums.json` (the
size and sha256 of every other file, every rank's shards included: each rank hashes the files it
wrote itself, at once and from its own page cache, and rank 0 the rest). Resume verifies the newest
checkpoint against it; one that fails (a truncated safetensors file, a damaged optimizer shard or
training state, a missing file: disks and copies do that after the fact) is named in a warning and
the next older checkpoint is used instead. A checkpoint written before checksums existed gets a
structure check (the safetensors headers fit the file sizes, training_state.pt loads). Pruning
counts only checkpoints not known to be damaged, so a damaged one never displaces a good one.

A kill at the wrong moment can leave a complete checkpoint under a temporary name and no
`step_<N>`: between `write_checksums` and the rename (a finished `step_<N>.tmp-*`), or, when the
same step is saved again, between moving the old copy aside (`step_<N>.replaced-*`) and renaming
the new one in (both). `recover_interrupted_writes` (in resume's plan_resume, which only rank 0
runs, and again before every prune) renames the first of them that verifies back to `step_<N>`,
so neither resume nor pruning ever loses a completed checkpoint.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import struct
import shutil
import signal
import uuid
import warnings
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

import torch
from torch.distributed.checkpoint.api import CheckpointException

from kubetune.errors import KubetuneError
from kubetune.trainer.training.resume import PARTIAL_WRITE, RUN_FILE, ResumeError, RunRecord  # noqa: F401 (ResumeError re-exported)

if TYPE_CHECKING:
    from kubetune.trainer.distributed import World

log = logging.getLogger("kubetune.checkpoint")
TRAINING_STATE = "training_state.pt"
CHECKSUMS = "checksums.json"  # {"files": {relative path: {"size": bytes, "sha256": hex}}}, written last
SHARDED_STATE = "distcp"  # torch.distributed.checkpoint folder: {"model": ..., "optimizer": ...}
_STEP_DIR = re.compile(r"^step_(\d+)$")
REPLACED = ".replaced-"  # `step_<N>.replaced-*`: a complete step_<N> moved aside while the step is saved again
_LEFTOVER = re.compile(rf"^step_(\d+)(?:{re.escape(PARTIAL_WRITE)}|{re.escape(REPLACED)})[0-9a-f]+$")
FAILPOINTS_ENV = "KUBETUNE_TEST_FAILPOINTS"
HASH_THREADS = min(8, os.cpu_count() or 1)  # files hashed at once by write_checksums and verify_checkpoint


class CheckpointWriteError(KubetuneError):
    """A checkpoint could not be written (a full disk, say); the message says what was kept."""


class CheckpointManager:
    def __init__(self, output_dir: str | Path, keep_last: int = 2, run: Any = None):
        self.dir = Path(output_dir) / "checkpoints"
        self.keep_last = keep_last
        self.run = run  # resume.RunRecord: written into every checkpoint; pruning keeps to its checkpoints
        self.protected: set[int] = set()  # steps pruning keeps whatever keep_last says (the best checkpoint)
        self.damaged: dict[Path, str] = {}  # checkpoints that failed verification -> what is wrong

    def complete_checkpoints(self, run_id: Optional[str] = None) -> list[tuple[int, Path]]:
        """(step, folder) of every complete checkpoint (of run `run_id` when given), oldest first."""
        if not self.dir.is_dir():
            return []
        found = []
        for child in self.dir.iterdir():
            match = _STEP_DIR.match(child.name)
            if match and (child / TRAINING_STATE).is_file() and (run_id is None or _run_id_or_unreadable(child) in (run_id, "")):
                found.append((int(match.group(1)), child))
        return sorted(found)

    def latest(self) -> Optional[Path]:
        """The newest intact complete checkpoint (damaged newer ones are skipped, with a warning)."""
        return self._newest_intact(self.complete_checkpoints())

    def latest_of(self, run_id: str) -> Optional[Path]:
        """The newest intact complete checkpoint of run `run_id` (what resume: auto continues from)."""
        return self._newest_intact(self.complete_checkpoints(run_id))

    def _newest_intact(self, checkpoints: list[tuple[int, Path]]) -> Optional[Path]:
        for _, folder in reversed(checkpoints):
            problem = verify_checkpoint(folder)
            if problem is None:
                return folder
            self.damaged[folder] = problem
            older = [f.name for _, f in checkpoints if f not in self.damaged]
            log.warning("checkpoint %s is damaged: %s; %s", folder, problem,
                        f"resuming from the previous one, {older[-1]}, instead" if older else "no older checkpoint is left")
        return None

    def damage_report(self) -> str:
        """The damaged checkpoints found so far and what is wrong with each (for error messages)."""
        return "; ".join(f"{folder.name}: {problem}" for folder, problem in sorted(self.damaged.items()))

    def recover_interrupted_writes(self) -> list[Path]:
        """Put back every complete checkpoint a kill left under a temporary name (see the module
        docstring); returns the folders put back. For each step with leftovers and no `step_<N>`:
        the first intact one of the copy that was in place (`.replaced-*`) and a finished write
        (`.tmp-*` with checksums.json, which is written last) is renamed to `step_<N>`; when none
        verifies, the first is put back anyway, so resume names its damage and pruning treats it as
        any damaged checkpoint. One process only (rank 0: resume's plan_resume, and prune), while no
        other reads the folder."""
        if not self.dir.is_dir():
            return []
        leftovers: dict[int, list[Path]] = {}
        for child in self.dir.iterdir():
            match = _LEFTOVER.match(child.name)
            if match and child.is_dir():
                leftovers.setdefault(int(match.group(1)), []).append(child)
        recovered = []
        for step, folders in sorted(leftovers.items()):
            final = self.dir / f"step_{step}"
            candidates = sorted((f for f in folders if REPLACED in f.name or (f / CHECKSUMS).is_file()),
                                key=lambda f: (REPLACED not in f.name, f.name))
            if final.exists() or not candidates:
                continue  # a duplicate of a step in place, or a write that never finished: pruning removes it
            chosen = next((f for f in candidates if verify_checkpoint(f) is None), candidates[0])
            os.rename(chosen, final)
            _fsync_dir(self.dir)
            log.warning("checkpoint %s was left as %s by a run killed while %s; put back in place", final,
                        chosen.name, "replacing it" if REPLACED in chosen.name else "renaming it into place")
            recovered.append(final)
        return recovered

    def resume_from(self, resume: str) -> Optional[Path]:
        """The checkpoint `resume:` names: auto = the newest intact complete one (or none), never =
        none, anything else = that folder, which must be a complete, intact checkpoint."""
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
        problem = verify_checkpoint(path)
        if problem is not None:
            raise ResumeError(
                f"resume: {resume} is damaged: {problem}; name an older checkpoint, or use resume: auto to take "
                f"the newest intact one in {self.dir}"
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
            tmp = self.dir / f"step_{step}{PARTIAL_WRITE}{uuid.uuid4().hex[:8]}"
        tmp = world.broadcast_object(tmp)
        try:
            self._write(tmp, final, write_model, training_state, world, sharded_state, rank_state)
        except KubetuneError:
            raise
        # A full disk, a file-size limit, a lost volume: say so, and what is kept. torch.distributed.
        # checkpoint wraps a failed write in CheckpointException (a BaseException, not an Exception).
        except (Exception, CheckpointException) as err:
            previous = [f.name for _, f in self.complete_checkpoints(self.run.run_id if self.run else None)]
            kept = (f"the previous checkpoint {self.dir / previous[-1]} is untouched and resume: auto continues from it"
                    if previous else "no earlier checkpoint exists")
            raise CheckpointWriteError(
                f"could not write the step-{step} checkpoint into {self.dir} ({describe_error(err)}; "
                f"{_free_space(self.dir)}); nothing of it was left behind, {kept}; free space on that volume (or lower "
                f"keep_last_checkpoints, or save less often) and run again"
            ) from err
        finally:
            if world.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
        if world.is_main:
            self.prune()
        world.barrier()  # no rank runs ahead (and may be killed) before the checkpoint is in place
        _failpoint("saved", final)
        return final

    def _write(self, tmp: Path, final: Path, write_model: Callable[[Path], None], training_state: dict[str, Any],
               world: "World", sharded_state: Optional[dict[str, Any]], rank_state: Optional[dict[str, Any]]) -> None:
        """save()'s writing half: everything into `tmp`, then `tmp` renamed to `final` (rank 0)."""
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
        # Each rank hashes the files it wrote itself (still in its own node's page cache, all ranks
        # at once); rank 0 hashes the rest. The gather also means: every rank's shards are on disk.
        hashed = world.gather_objects(_hash_own_files(tmp, world.rank) if world.rank > 0 else {})
        if world.is_main:
            _save_fsynced(training_state, tmp / TRAINING_STATE)
            # last: a folder with a valid checksums.json was written in full
            write_checksums(tmp, hashed={name: entry for entries in hashed for name, entry in entries.items()})
            _replace_folder(tmp, final)
            self.damaged.pop(final, None)

    def prune(self) -> None:
        """Keep the newest keep_last complete checkpoints of the current run (and protected steps);
        remove leftovers of interrupted writes. Another run's checkpoints are never pruned here."""
        self.recover_interrupted_writes()  # a leftover that is a step's only complete copy is put back, not removed
        checkpoints = self.complete_checkpoints(self.run.run_id if self.run is not None else None)
        # Only intact checkpoints count towards keep_last: a damaged one never displaces a good one.
        # A damaged one goes once an intact newer one exists (nothing would resume from it).
        intact = [(step, folder) for step, folder in checkpoints if folder not in self.damaged]
        newest_intact = intact[-1][0] if intact else None
        for step, folder in intact[: max(0, len(intact) - self.keep_last)]:
            if step not in self.protected:
                shutil.rmtree(folder, ignore_errors=True)
        for step, folder in checkpoints:
            if folder in self.damaged and newest_intact is not None and step < newest_intact:
                log.warning("removing damaged checkpoint %s (%s)", folder, self.damaged.pop(folder))
                shutil.rmtree(folder, ignore_errors=True)
        for child in [*self.dir.glob(f"step_*{PARTIAL_WRITE}*"), *self.dir.glob(f"step_*{REPLACED}*")]:
            shutil.rmtree(child, ignore_errors=True)


def checkpoint_run_id(checkpoint: Path) -> Optional[str]:
    """The id of the run a checkpoint belongs to (None: written without a run record)."""
    record = RunRecord.read(checkpoint / RUN_FILE)
    return record.run_id if record else None


def _run_id_or_unreadable(checkpoint: Path) -> Optional[str]:
    """checkpoint_run_id, or "" when its run.json is damaged: such a checkpoint is listed with this
    output_dir's run, so that verification names the damage (rather than it silently vanishing)."""
    try:
        return checkpoint_run_id(checkpoint)
    except ResumeError:
        return ""


def load_training_state(checkpoint: Path, rank: int = 0) -> dict[str, Any]:
    """training_state.pt; for rank > 0, `rng` is that rank's own when the checkpoint has it (same
    world size), else rank 0's (the run was resumed with more processes than it was saved with)."""
    # Our own files: they hold RNG states (Python tuples), which weights_only loading allows.
    state = torch.load(checkpoint / TRAINING_STATE, map_location="cpu", weights_only=True)
    own = checkpoint / rank_state_name(rank)
    if rank > 0 and own.is_file():
        state.update(torch.load(own, map_location="cpu", weights_only=True))
    return state


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _sha256_all(paths: list[Path]) -> list[str]:
    """sha256 of each file, HASH_THREADS files at a time (hashlib releases the GIL on large blocks,
    so the threads hash in parallel; a single file is hashed by one thread)."""
    if HASH_THREADS <= 1 or len(paths) <= 1:
        return [_sha256(p) for p in paths]
    with ThreadPoolExecutor(max_workers=HASH_THREADS) as pool:
        return list(pool.map(_sha256, paths))


def _hash_own_files(folder: Path, rank: int) -> dict[str, dict[str, Any]]:
    """Checksum entries for the files rank `rank` (> 0) wrote into a checkpoint: its RNG state and
    its torch.distributed.checkpoint shards (`__<rank>_<n>.distcp`, DCP's file naming). A file
    named otherwise is hashed by rank 0 instead, so a change of naming costs time, never coverage."""
    own = [folder / rank_state_name(rank), *sorted((folder / SHARDED_STATE).glob(f"__{rank}_*.distcp"))]
    own = [p for p in own if p.is_file()]
    return {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": d} for p, d in zip(own, _sha256_all(own))}


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS)


def write_checksums(folder: Path, hashed: Optional[dict[str, dict[str, Any]]] = None) -> None:
    """checksums.json: the size and sha256 of every file in `folder` (written atomically, fsynced).
    `hashed`: entries other ranks computed for the files they wrote ({name: {"size", "sha256"}});
    every other file is hashed here."""
    hashed = hashed or {}
    files = _files(folder)
    todo = [p for p in files if p.relative_to(folder).as_posix() not in hashed]
    entries = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": d} for p, d in zip(todo, _sha256_all(todo))}
    for name, entry in hashed.items():
        if (folder / name).stat().st_size != entry["size"]:  # changed since it was hashed: should never happen
            raise OSError(f"{name} changed while the checkpoint was being written ({entry['size']} bytes hashed)")
        entries[name] = entry
    tmp = folder / f".{CHECKSUMS}.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump({"files": entries}, handle, indent=1, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, folder / CHECKSUMS)


def verify_checkpoint(folder: Path) -> Optional[str]:
    """What is wrong with a checkpoint folder (None: intact): every file checksums.json lists must
    be there with its size and sha256; without checksums.json (an older kubetune), a structure check."""
    manifest = folder / CHECKSUMS
    if not manifest.is_file():
        return _structure_problem(folder)
    try:
        entries = json.loads(manifest.read_text(encoding="utf-8"))["files"]
        expected = {name: (int(e["size"]), str(e["sha256"])) for name, e in entries.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return f"{CHECKSUMS} is unreadable ({err})"
    for name, (size, sha) in sorted(expected.items()):
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        actual = path.stat().st_size
        if actual != size:
            return f"{name} has {actual} bytes, {size} were written (truncated or overwritten)"
    digests = dict(zip(expected, _sha256_all([folder / name for name in expected])))
    for name, (_, sha) in sorted(expected.items()):
        if digests[name] != sha:
            return f"{name} does not match its sha256 in {CHECKSUMS} (its content changed after it was written)"
    return None


def _structure_problem(folder: Path) -> Optional[str]:
    """For checkpoints without checksums: safetensors headers that fit their files, a loadable state."""
    for path in sorted(folder.rglob("*.safetensors")):
        try:
            with open(path, "rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(length))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (OSError, ValueError, KeyError, TypeError, struct.error) as err:
            return f"{path.relative_to(folder)} is not a readable safetensors file ({err})"
        if path.stat().st_size != 8 + length + end:
            return f"{path.relative_to(folder)} has {path.stat().st_size} bytes, its header says {8 + length + end} (truncated)"
    try:
        torch.load(folder / TRAINING_STATE, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 (any unpickling failure means the same: unusable)
        return f"{TRAINING_STATE} does not load ({type(err).__name__}: {err})"
    return None


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
    try:
        with _single_process_is_intended():
            dcp.load(state, checkpoint_id=str(folder), no_dist=not torch.distributed.is_initialized())
    except (Exception, CheckpointException) as err:  # checksums passed (or a pre-checksum checkpoint): still unusable
        raise ResumeError(
            f"{checkpoint}: {SHARDED_STATE}/ does not load ({describe_error(err)}); resume from another checkpoint "
            "(resume: <folder>), or set resume: never"
        ) from None
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


def _free_space(folder: Path) -> str:
    """How much room the volume has left (torch's own writers can lose the errno: "unexpected pos")."""
    try:
        return f"{shutil.disk_usage(folder).free / 2**20:.0f} MiB free there"
    except OSError:
        return "free space unknown"


def describe_error(err: BaseException) -> str:
    """One line for an I/O failure; a CheckpointException is reduced to each rank's own error (its
    str() is a multi-line traceback)."""
    if isinstance(err, CheckpointException):
        return "; ".join(f"rank {rank}: {type(exc).__name__}: {exc}" for rank, (exc, _) in sorted(err.failures.items()))
    return f"{type(err).__name__}: {err}"


def _replace_folder(new: Path, final: Path) -> None:
    """Rename `new` to `final`. A `final` already there (the same step saved again, e.g. SIGTERM right
    after a periodic save) is moved aside first and removed only once `new` is in place; if that
    rename fails it is moved back: never a moment where a failure leaves neither."""
    replaced = None
    if final.exists():
        replaced = final.with_name(f"{final.name}{REPLACED}{uuid.uuid4().hex[:8]}")
        os.rename(final, replaced)
    _failpoint("replacing" if replaced is not None else "renaming", final)  # a kill here: recover_interrupted_writes
    try:
        os.rename(new, final)
    except BaseException:
        if replaced is not None:
            os.rename(replaced, final)
        raise
    _fsync_dir(final.parent)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)


_fired: set[str] = set()


def _failpoint(where: str, folder: Path) -> None:
    """Fault injection for tests: with KUBETUNE_TEST_FAILPOINTS="saved:step_6=SIGTERM,replacing:step_6=SIGKILL"
    this process sends itself that signal the first time it reaches that point for that folder: a
    kill or preemption at an exact moment of a checkpoint write, not by timing luck. Points:
    `saved` (save() returned on this rank), `renaming` / `replacing` (rank 0, the finished folder
    about to be renamed into place; replacing: an existing one was just moved aside)."""
    spec = os.environ.get(FAILPOINTS_ENV)
    if not spec:
        return
    for item in spec.split(","):
        point, _, name = item.strip().partition("=")
        if point == f"{where}:{folder.name}" and point not in _fired:
            _fired.add(point)
            os.kill(os.getpid(), getattr(signal, name))


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
