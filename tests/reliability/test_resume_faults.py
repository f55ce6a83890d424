"""Trainer faults end to end, through `kubetune run` as a user (or a pod) runs it: SIGKILL at
seeded random steps, SIGTERM (preemption), a damaged newest checkpoint, a full disk during a
checkpoint write. Each time the resumed run must equal the uninterrupted one (losses, rewards and
weights, CPU fp32, <= 1e-6; 2 processes <= 1e-5) and no complete checkpoint may be lost.

Extends tests/trainer/test_resume_kill.py (full: one SIGKILL, one SIGTERM), test_dpo_resume.py
(full DPO SIGKILL, LoRA DPO SIGTERM) and test_distributed.py (2 processes killed at the step-2
checkpoint) with the recipes and faults they leave out. One trial runs in CI; the rest are `slow`:
    .venv/bin/python -m pytest tests/reliability/test_resume_faults.py -m slow
A failing SIGKILL trial prints its seed; the seeds are fixed, so it fails the same way again."""
from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import subprocess

import pytest

from reliability_runs import (
    RECIPES,
    assert_same_run,
    checkpoint_steps,
    finish,
    kill_run,
    kill_step,
    logged_step,
    start,
    train,
    wait_until,
)
from kubetune.trainer.training.checkpointing import CHECKSUMS, FAILPOINTS_ENV, verify_checkpoint

pytest.importorskip("kubetune.trainer.tokenizers")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """recipe name -> the output_dir of its uninterrupted run (made once per module, on first use)."""
    runs = {}

    def get(name):
        if name not in runs:
            runs[name] = tmp_path_factory.mktemp(f"uninterrupted-{name}")
            train(RECIPES[name], runs[name])
        return runs[name]

    return get


def kill_after_checkpoint(recipe, output_dir, step):
    """Run until the step-`step` checkpoint is in place, then SIGKILL everything at once."""
    process = start(recipe, output_dir)
    wait_until(lambda: step in checkpoint_steps(output_dir), process, f"the step-{step} checkpoint")
    kill_run(process)
    assert not (output_dir / recipe.weights).exists()  # it really was cut short


def garbage_same_size(path):
    path.write_bytes(os.urandom(path.stat().st_size))  # only a checksum tells this from the real thing


def truncate(path):
    os.truncate(path, path.stat().st_size // 2)


CORRUPTIONS = {
    "garbage optimizer shard": ("distcp/__0_0.distcp", garbage_same_size),
    "truncated safetensors": (None, truncate),  # the recipe's weights file in the checkpoint
    "garbage training state": ("training_state.pt", lambda p: p.write_bytes(b"\x80\x04garbage" * 100)),
    "missing file": ("distcp/.metadata", lambda p: p.unlink()),
}


def damage_newest_then_resume(recipe_name, corruption, tmp_path, uninterrupted):
    """Kill after the step-6 checkpoint, damage the newest checkpoint, resume: the run must say
    which file of which checkpoint is damaged, resume from the one before, and end exactly as
    the uninterrupted run. The damaged checkpoint never costs the previous one."""
    recipe, reference = RECIPES[recipe_name], uninterrupted(recipe_name)
    kill_after_checkpoint(recipe, tmp_path, 6)
    steps = checkpoint_steps(tmp_path)
    newest, previous = tmp_path / "checkpoints" / f"step_{steps[-1]}", tmp_path / "checkpoints" / f"step_{steps[-2]}"
    name, corrupt = CORRUPTIONS[corruption]
    name = name or recipe.weights.split("/")[-1]
    corrupt(newest / name)
    assert verify_checkpoint(previous) is None

    _, err = finish(start(recipe, tmp_path))
    assert f"checkpoint {newest} is damaged: {name}" in err, err[-3000:]
    assert f"resuming from the previous one, {previous.name}, instead" in err
    assert_same_run(recipe, tmp_path, reference)
    # What is left is intact, and the damaged folder did not outlive a newer good one.
    for step in checkpoint_steps(tmp_path):
        assert verify_checkpoint(tmp_path / "checkpoints" / f"step_{step}") is None


def killed_mid_swap_then_resume(recipe_name, failpoints, left, tmp_path, uninterrupted):
    """SIGKILL at an exact moment of a checkpoint write (checkpointing._failpoint), between two
    renames, so that step_6's only complete copies lie under temporary names: the resumed run must
    put step_6 back, resume from it (not from step_3) and end equal to the uninterrupted run."""
    recipe, reference = RECIPES[recipe_name], uninterrupted(recipe_name)
    process = start(recipe, tmp_path, env={FAILPOINTS_ENV: failpoints})
    _, err = process.communicate(timeout=400)
    assert process.returncode == (-signal.SIGKILL if recipe.nproc == 1 else 1), err[-3000:]  # torchrun: 1
    folders = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert [f.split("-")[0] for f in folders] == left, folders
    assert all(verify_checkpoint(tmp_path / "checkpoints" / f) is None for f in folders)  # all complete copies

    _, err = finish(start(recipe, tmp_path))
    assert re.search(rf"checkpoint \S+/step_6 was left as step_6\.{left[1].split('.')[1]}-\w+ by a run killed", err), err[-3000:]
    assert re.search(r"resuming run \w+ from \S+/checkpoints/step_6\b", err), err[-3000:]
    assert_same_run(recipe, tmp_path, reference)
    assert not list((tmp_path / "checkpoints").glob("step_*.*"))  # the duplicate went with the next prune


# The same step saved again (SIGTERM right after the periodic step-6 save), killed after the old
# copy was moved aside and before the new one was renamed in: both copies aside, no step_6.
RESAVE_KILLED = "saved:step_6=SIGTERM,replacing:step_6=SIGKILL"
BOTH_ASIDE = ["step_3", "step_6.replaced", "step_6.tmp"]


# ------------------------------------------------------------------------------------------- CI

def test_lora_killed_between_the_renames_of_a_resave_resumes_from_that_step_exactly(tmp_path, uninterrupted):
    killed_mid_swap_then_resume("lora", RESAVE_KILLED, BOTH_ASIDE, tmp_path, uninterrupted)


def test_lora_killed_with_a_damaged_newest_checkpoint_resumes_from_the_previous_one_exactly(tmp_path, uninterrupted):
    damage_newest_then_resume("lora", "garbage optimizer shard", tmp_path, uninterrupted)


# ----------------------------------------------------------------------------------------- slow

@pytest.mark.slow
@pytest.mark.parametrize("recipe_name, corruption", [
    ("full", "truncated safetensors"),
    ("full", "missing file"),
    ("dpo", "garbage training state"),  # training_state.pt: schedule, data position, RNG (since #22: optimizer in distcp/)
    ("dpo_lora", "truncated safetensors"),
    ("lora", "missing file"),
])
def test_damaged_newest_checkpoint(tmp_path, uninterrupted, recipe_name, corruption):
    damage_newest_then_resume(recipe_name, corruption, tmp_path, uninterrupted)


# 20 SIGKILL trials across the recipes, each at a seeded step (seed = the trial's number).
KILL_TRIALS = [("full", s) for s in (1, 2, 3, 4, 5)] + [("lora", s) for s in (6, 7, 8, 9, 10)] + \
              [("dpo", s) for s in (11, 12, 13, 14)] + [("dpo_lora", s) for s in (15, 16, 17)] + \
              [("full_2proc", s) for s in (18, 19, 20)]


@pytest.mark.slow
@pytest.mark.parametrize("recipe_name, seed", KILL_TRIALS)
def test_sigkill_at_a_seeded_step_then_resume_matches(tmp_path, uninterrupted, recipe_name, seed):
    recipe, reference = RECIPES[recipe_name], uninterrupted(recipe_name)
    after = kill_step(seed, recipe)
    print(f"{recipe_name}: SIGKILL after step {after} (seed {seed})")
    process = start(recipe, tmp_path)
    wait_until(lambda: logged_step(tmp_path) >= after, process, f"step {after}")
    kill_run(process)
    assert not (tmp_path / recipe.weights).exists()
    finish(start(recipe, tmp_path))
    assert_same_run(recipe, tmp_path, reference)
    assert not list((tmp_path / "checkpoints").glob("step_*.*"))  # leftovers of the killed write are gone


@pytest.mark.slow
@pytest.mark.parametrize("recipe_name, failpoints, left", [
    ("full_2proc", RESAVE_KILLED, BOTH_ASIDE),  # rank 0 renames, rank 1 waits at the barrier
    ("dpo", RESAVE_KILLED, BOTH_ASIDE),
    ("full", "renaming:step_6=SIGKILL", ["step_3", "step_6.tmp"]),  # a first write, finished, not yet renamed
])
def test_killed_between_the_renames_resumes_from_that_step(tmp_path, uninterrupted, recipe_name, failpoints, left):
    killed_mid_swap_then_resume(recipe_name, failpoints, left, tmp_path, uninterrupted)


@pytest.mark.slow
@pytest.mark.parametrize("recipe_name, seed", [("lora", 21), ("dpo", 22), ("full_2proc", 23)])
def test_sigterm_at_a_seeded_step_checkpoints_and_resumes_exactly(tmp_path, uninterrupted, recipe_name, seed):
    recipe, reference = RECIPES[recipe_name], uninterrupted(recipe_name)
    after = kill_step(seed, recipe)
    log = tmp_path / "termination-log"
    process = start(recipe, tmp_path, termination_log=log)
    wait_until(lambda: logged_step(tmp_path) >= after, process, f"step {after}")
    os.kill(process.pid, signal.SIGTERM)
    process.communicate(timeout=180)
    assert process.returncode == (143 if recipe.nproc == 1 else 1)  # torchrun reports its ranks' 143 as 1
    summary = json.loads(log.read_text())
    assert summary["steps"] >= after and summary["checkpoint"].endswith(f"step_{summary['steps']}")
    assert verify_checkpoint(tmp_path / "checkpoints" / f"step_{summary['steps']}") is None
    finish(start(recipe, tmp_path, termination_log=log))
    assert json.loads(log.read_text())["steps"] == recipe.steps
    assert_same_run(recipe, tmp_path, reference)


# ------------------------------------------------------------------------------------ full disk

def _can_mount_tmpfs() -> bool:
    if not shutil.which("unshare") or not shutil.which("mount"):
        return False
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            "d=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs \"$d\""], capture_output=True)
    return probe.returncode == 0


def _folder_bytes(folder):
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def run_on_a_small_disk(recipe, output_dir, how, tmp_path):
    """Resume the run in output_dir where writes fail past a size, as on a full disk:
    - "tmpfs": a size-limited tmpfs mounted in a user+mount namespace (util-linux unshare, no root
      needed where unprivileged user namespaces are allowed): writes past it fail with ENOSPC. The
      run works on a copy inside it, copied back when it exits (the tmpfs goes with the namespace).
    - "rlimit": RLIMIT_FSIZE set in the child: writing a file past the limit fails with EFBIG
      (Python ignores SIGXFSZ), the way a full disk fails a write with ENOSPC.
    Sized so that the files already there fit and the next checkpoint does not.
    -> (returncode, stderr)"""
    checkpoint = _folder_bytes(output_dir / "checkpoints" / f"step_{checkpoint_steps(output_dir)[-1]}")
    if how == "rlimit":
        biggest = max(p.stat().st_size for p in (output_dir / "checkpoints").rglob("*") if p.is_file())
        limit = biggest // 2  # the biggest checkpoint file cannot be written again

        def limited():
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

        process = start(recipe, output_dir, preexec_fn=limited)
        _, err = process.communicate(timeout=400)
        return process.returncode, err
    from reliability_runs import command

    size_kib = (_folder_bytes(output_dir) + checkpoint // 2) // 1024
    mount = tmp_path / "small-disk"
    mount.mkdir(parents=True)
    script = ('mount -t tmpfs -o size="$1"k tmpfs "$2" && cp -a "$3/." "$2/" && shift 3 && '
              '"$@"; rc=$?; rm -rf "$OUT" && mkdir "$OUT" && cp -a "$MNT/." "$OUT/"; exit $rc')
    inner = [str(a).replace(str(output_dir), str(mount)) for a in command(recipe, output_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OUT": str(output_dir), "MNT": str(mount)}
    process = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh",
                              str(size_kib), str(mount), str(output_dir), *inner],
                             env=env, capture_output=True, text=True, timeout=400)
    return process.returncode, process.stderr.replace(str(mount), str(output_dir))  # paths as outside the namespace


@pytest.mark.slow
@pytest.mark.parametrize("how", ["tmpfs", "rlimit"])
def test_a_full_disk_during_a_checkpoint_write_keeps_the_previous_one_and_resumes_exactly(tmp_path, uninterrupted, how):
    if how == "tmpfs" and not _can_mount_tmpfs():
        pytest.skip("cannot mount a tmpfs here (no unshare, or unprivileged user namespaces are off); the rlimit case runs")
    recipe, reference = RECIPES["full"], uninterrupted("full")
    kill_after_checkpoint(recipe, tmp_path, 3)
    before = checkpoint_steps(tmp_path)
    kept = tmp_path / "checkpoints" / f"step_{before[-1]}"
    kept_checksums = (kept / CHECKSUMS).read_text()

    returncode, err = run_on_a_small_disk(recipe, tmp_path, how, tmp_path.parent / f"{tmp_path.name}-mnt")
    assert returncode == 2, err[-3000:]
    error = err.strip().splitlines()[-1]
    assert error.startswith("error: could not write the step-") and "Traceback" not in err, err[-3000:]
    # The DCP shard is what no longer fits; its writer can lose the errno, so the message also says the room left.
    if how == "tmpfs":
        assert re.search(r"No space left on device|\b[01] MiB free there", error), error
    else:
        assert "File too large" in error or "unexpected pos" in error, error
    assert f"{kept} is untouched and resume: auto continues from it" in error
    # No half-written folder, the previous checkpoints as they were.
    assert not [p.name for p in (tmp_path / "checkpoints").iterdir() if not p.name.startswith("step_") or "." in p.name]
    assert checkpoint_steps(tmp_path)[: len(before)] == before
    assert (kept / CHECKSUMS).read_text() == kept_checksums and verify_checkpoint(kept) is None

    finish(start(recipe, tmp_path))  # room again: it resumes from the kept checkpoint
    assert_same_run(recipe, tmp_path, reference)
