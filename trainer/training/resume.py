"""Resume that never surprises: which run an output_dir holds, and whether this config may continue it.

A training run writes `output_dir/run.json` when it starts fresh: a run id, the settings that must
match to resume it (model, tokenizer, data, batch geometry, optimizer and schedule, recipe-specific
keys like `lora`), their hash, and the number of steps its learning-rate schedule was planned for.
Every checkpoint carries a copy (`checkpoints/step_N/run.json`), so a checkpoint always says which
run it belongs to. `plan_resume(cfg, output_dir)` then decides, before any work:

- `resume: auto`: continue the run in output_dir when its settings match, from its newest
  checkpoint (and say so); refuse when they differ, listing the differing keys and the two ways out.
- `resume: never`, or auto on an empty folder: a fresh run; refused when output_dir holds another
  run's checkpoints or outputs, unless `overwrite_output_dir: true` (which clears them first).
- `resume: <checkpoint folder>`: that checkpoint, when its run's settings match.

`max_steps` and `epochs` are not part of the match: raising max_steps continues the run, and its
schedule keeps the plan it started with (`lr_scheduler.on_resume: keep`) unless the config says
`replan`. Shared by every training recipe (full, LoRA, DPO): each passes its own config.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from kubetune.errors import KubetuneError

log = logging.getLogger("kubetune.resume")
RUN_FILE = "run.json"
# Keys that never affect what a resumed run computes, or that may change on resume by design.
NOT_MATCHED = {
    "output_dir", "epochs", "max_steps", "resume", "overwrite_output_dir", "device", "metrics_port", "progress_bar",
    "log_every_steps", "save_every_steps", "keep_last_checkpoints", "eval_every_steps", "eval_max_batches",
    "checkpoint_on_sigterm", "compile", "activation_checkpointing", "loggers", "early_stopping", "save_merged",
    "lr_scheduler.on_resume", "optimizer.fused", "bf16_autocast", "distributed",
}
# Files a finished or running training run leaves in output_dir (besides checkpoints/).
RUN_OUTPUTS = ("model", "adapter", "metrics.jsonl", "loss.png", "tensorboard", "mlruns", "wandb", RUN_FILE)


class ResumeError(KubetuneError):
    """output_dir and the config disagree about which run this is; the message lists the ways out."""


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def matched_settings(cfg: Any, world_size: int = 1) -> dict[str, Any]:
    """The flattened config keys that must be equal to resume a run (everything but NOT_MATCHED).
    batch_size counts as the global batch (batch_size x processes): a run may resume at another
    world size with the same global batch (the data loader allows it)."""
    flat = flatten(json.loads(json.dumps(cfg.model_dump(mode="json"))))
    settings = {k: v for k, v in sorted(flat.items()) if k not in NOT_MATCHED and k.split(".")[0] not in NOT_MATCHED}
    settings["batch_size"] = settings.get("batch_size", 1) * world_size
    return settings


def settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class RunRecord:
    """What run.json holds."""

    run_id: str
    settings_hash: str
    settings: dict[str, Any]
    schedule_steps: int  # the steps the learning-rate schedule was planned for when the run started

    def to_json(self) -> str:
        return json.dumps({"run_id": self.run_id, "settings_hash": self.settings_hash,
                           "schedule_steps": self.schedule_steps, "settings": self.settings}, indent=2) + "\n"

    @classmethod
    def read(cls, path: Path) -> Optional["RunRecord"]:
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(data["run_id"], data["settings_hash"], data["settings"], int(data["schedule_steps"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise ResumeError(f"{path}: unreadable run record ({err}); set overwrite_output_dir: true to start over") from None

    def write(self, path: Path) -> None:
        """Atomically (temp file, fsync, rename)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(self.to_json())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)


@dataclass
class ResumePlan:
    run: RunRecord  # the run this process continues or starts
    checkpoint: Optional[Path]  # the checkpoint to resume from; None: a fresh start
    fresh: bool  # True: a new run (run.json to be written, metrics.jsonl started anew)
    messages: list[str] = field(default_factory=list)  # what the console should say about it
    clear_previous: bool = False  # overwrite_output_dir: remove the previous run's files before starting
    previous_schedule_steps: int = 0  # lr_scheduler.on_resume replan: the schedule the run had before

    def schedule_messages(self, total_steps: int, on_resume: str) -> list[str]:
        """What to say when a resumed run plans another number of steps than its schedule."""
        if self.fresh or total_steps == self.planned_steps_at_start:
            return []
        old = self.planned_steps_at_start
        if on_resume == "replan":
            return [f"planned steps changed from {old} to {total_steps}: the learning-rate schedule is replanned over "
                    f"{total_steps} steps (lr_scheduler.on_resume: replan)"]
        return [f"planned steps changed from {old} to {total_steps}: the run keeps the {old}-step learning-rate schedule "
                f"it started with (after step {old} the rate stays at its final value); set lr_scheduler.on_resume: "
                f"replan to stretch it over {total_steps} steps"]

    @property
    def planned_steps_at_start(self) -> int:
        return self.previous_schedule_steps or self.run.schedule_steps


def describe_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    missing = object()
    return [
        f"{key}: {_show(old.get(key, missing))} -> {_show(new.get(key, missing))}"
        for key in keys if old.get(key, missing) != new.get(key, missing)
    ]


def global_batch_hint(old: dict[str, Any], new: dict[str, Any], world_size: int) -> str:
    """batch_size is matched as the global batch (batch_size x processes), so a run resumed with
    another number of processes and the same batch_size differs in "batch_size": say what the
    numbers are and which batch_size continues the run at this world size."""
    before, now = old.get("batch_size"), new.get("batch_size")
    if before == now or not isinstance(before, int) or not isinstance(now, int):
        return ""
    fix = (f"set batch_size: {before // world_size} to continue it with {world_size} process(es)" if before % world_size == 0
           else f"{before} does not split over {world_size} processes: resume with a number of processes that divides it")
    return (f"\nbatch_size is compared as the global batch (batch_size x processes): the run has {before}, this config "
            f"{now} ({now // world_size} x {world_size} process(es)); {fix}")


def _show(value: Any) -> str:
    return "(unset)" if not isinstance(value, (str, int, float, bool, list, dict, type(None))) else json.dumps(value)


def _ways_out(output_dir: Path) -> str:
    return (
        f"either start a new run with resume: never and a new or emptied output_dir (not {output_dir}), "
        f"or set overwrite_output_dir: true to replace the run in {output_dir}"
    )


PARTIAL_WRITE = ".tmp-"  # `checkpoints/step_<N>.tmp-*`: a checkpoint still being written (checkpointing.py)


def _occupants(output_dir: Path) -> list[str]:
    """What of a previous run lies in output_dir (checkpoints and outputs)."""
    found = []
    checkpoints = output_dir / "checkpoints"
    # A `step_N.tmp-*` folder is a write that never completed (the run was killed during its first
    # checkpoint): nothing to keep, so it must not stop `resume: auto` from starting the run again.
    kept = sorted(p.name for p in checkpoints.iterdir() if PARTIAL_WRITE not in p.name) if checkpoints.is_dir() else []
    if kept:
        found.append("checkpoints/ (" + ", ".join(kept[:5]) + ")")
    found += [name for name in ("model", "adapter") if (output_dir / name).exists()]
    return found


def clear_run_outputs(output_dir: Path) -> None:
    """overwrite_output_dir: remove the previous run's checkpoints and outputs (nothing else)."""
    shutil.rmtree(output_dir / "checkpoints", ignore_errors=True)
    for name in RUN_OUTPUTS:
        target = output_dir / name
        if target.is_dir():
            shutil.rmtree(target, ignore_errors=True)
        elif target.exists():
            target.unlink()


def plan_resume(cfg: Any, checkpoints: Any, total_steps: int, world_size: int = 1) -> ResumePlan:
    """Decide fresh start or resume for `cfg` in the checkpoint manager's output_dir; raise
    ResumeError when they disagree. One process decides (rank 0: `World.main_decides`): it puts
    back a complete checkpoint a kill left under a temporary name (`recover_interrupted_writes`)
    and verifies the newest checkpoint, then every rank gets the plan. Otherwise reads only (with
    overwrite_output_dir, `start_run` clears the previous run's outputs). Sets `checkpoints.run`, so
    every checkpoint carries the run record and pruning keeps to this run. The caller then writes
    run.json with `start_run` (rank 0)."""
    checkpoints.recover_interrupted_writes()
    output_dir = checkpoints.dir.parent
    settings = matched_settings(cfg, world_size)
    digest = settings_hash(settings)
    current = RunRecord.read(output_dir / RUN_FILE)
    resume = cfg.resume

    def decide() -> ResumePlan:
        def fresh(note: str, clear: bool = False) -> ResumePlan:
            return ResumePlan(RunRecord(uuid.uuid4().hex[:12], digest, settings, total_steps), None, True, [note], clear)

        if resume not in ("auto", "never"):  # an explicit checkpoint folder
            checkpoint = checkpoints.resume_from(resume)  # raises unless it is a complete checkpoint
            record = RunRecord.read(checkpoint / RUN_FILE)
            if record is None:
                record = RunRecord(uuid.uuid4().hex[:12], digest, settings, total_steps)
                return ResumePlan(record, checkpoint, False,
                                  [f"resuming from {checkpoint} (it carries no run record: settings not checked)"])
            if record.settings_hash != digest:
                raise ResumeError(
                    f"resume: {checkpoint} belongs to run {record.run_id}, whose settings differ from this config:\n  "
                    + "\n  ".join(describe_differences(record.settings, settings))
                    + global_batch_hint(record.settings, settings, world_size)
                    + f"\nresume it with the settings it was trained with, or {_ways_out(output_dir)}"
                )
            return ResumePlan(record, checkpoint, False, [f"resuming run {record.run_id} from {checkpoint}"])

        if getattr(cfg, "overwrite_output_dir", False):
            occupied = _occupants(output_dir)
            return fresh(f"overwrite_output_dir: replacing the previous run's {', '.join(occupied)}" if occupied
                         else f"starting a new run in {output_dir}", clear=True)

        if resume == "auto" and current is not None:
            if current.settings_hash != digest:
                raise ResumeError(
                    f"output_dir {output_dir} holds run {current.run_id}, whose settings differ from this config:\n  "
                    + "\n  ".join(describe_differences(current.settings, settings))
                    + global_batch_hint(current.settings, settings, world_size)
                    + f"\nresume: auto continues only a run with the same settings; {_ways_out(output_dir)}"
                )
            checkpoint = checkpoints.latest_of(current.run_id)
            if checkpoint is not None:
                return ResumePlan(current, checkpoint, False, [f"resuming run {current.run_id} from {checkpoint}"])
            occupied = _occupants(output_dir)
            if occupied:  # finished without checkpoints: a fresh start would overwrite its outputs
                damaged = checkpoints.damage_report()
                raise ResumeError(
                    f"output_dir {output_dir} holds run {current.run_id} ({', '.join(occupied)}) with no "
                    + (f"intact checkpoint to resume from (damaged: {damaged})" if damaged else "checkpoint to resume from")
                    + f"; {_ways_out(output_dir)}"
                )
            return fresh(f"run {current.run_id} left no checkpoint in {output_dir}: starting it again from step 0")

        occupied = _occupants(output_dir)
        if occupied:
            owner = f"run {current.run_id}" if current else "another run (written without a run record)"
            raise ResumeError(
                f"output_dir {output_dir} holds {owner}: {', '.join(occupied)}; a fresh run there would mix with it. "
                + _ways_out(output_dir)[0].upper() + _ways_out(output_dir)[1:]
            )
        return fresh(f"starting a new run in {output_dir}")

    plan = decide()
    if not plan.fresh and total_steps != plan.run.schedule_steps and cfg.lr_scheduler.on_resume == "replan":
        plan.previous_schedule_steps = plan.run.schedule_steps
        plan.run = RunRecord(plan.run.run_id, plan.run.settings_hash, plan.run.settings, total_steps)
    checkpoints.run = plan.run
    return plan


def start_run(plan: ResumePlan, output_dir: str | Path) -> None:
    """Record the run in output_dir/run.json (rank 0, before the first step); a fresh run with
    overwrite_output_dir removes the previous run's checkpoints and outputs first."""
    output_dir = Path(output_dir)
    if plan.fresh and plan.clear_previous:
        clear_run_outputs(output_dir)
    plan.run.write(output_dir / RUN_FILE)
