"""Checkpoint integrity, at the checkpoint manager: every checkpoint carries checksums.json (size and
sha256 of every file, DCP shards included), written last; resume detects a damaged newest checkpoint
(truncated safetensors, garbage optimizer or training state, a missing file, a damaged manifest),
names what is wrong in a warning and takes the previous one; pruning never lets a damaged checkpoint
displace a good one. The end-to-end half (a real resumed run equal to an uninterrupted one) is in
test_resume_faults.py."""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from kubetune.trainer.training.checkpointing import (
    CHECKSUMS,
    FAILPOINTS_ENV,
    TRAINING_STATE,
    CheckpointManager,
    ResumeError,
    load_sharded_training_state,
    sharded_training_state,
    verify_checkpoint,
)
from kubetune.trainer.training.resume import RunRecord


def tiny():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def save(manager, step, model, optimizer):
    def write(folder):
        folder.mkdir()
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))

    return manager.save(step, write, {"step": step, "optimizer_note": torch.arange(50)},
                        sharded_state=sharded_training_state(model, optimizer))


def truncate(path):
    os.truncate(path, path.stat().st_size // 2)


def garbage_same_size(path):
    path.write_bytes(os.urandom(path.stat().st_size))  # only a checksum can tell


def flip_one_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "truncated safetensors": ("model.safetensors", truncate, "model.safetensors has"),
    "one flipped byte in the weights": ("model.safetensors", flip_one_byte, "model.safetensors does not match its sha256"),
    "garbage optimizer shard (same size)": ("distcp/__0_0.distcp", garbage_same_size, "distcp/__0_0.distcp does not match"),
    "garbage training state": (TRAINING_STATE, lambda p: p.write_bytes(b"not a pickle"), f"{TRAINING_STATE} has"),
    "missing DCP metadata": ("distcp/.metadata", lambda p: p.unlink(), "distcp/.metadata is missing"),
    "missing weights": ("model.safetensors", lambda p: p.unlink(), "model.safetensors is missing"),
    "damaged checksums.json": (CHECKSUMS, lambda p: p.write_text("{"), f"{CHECKSUMS} is unreadable"),
}


def test_every_file_of_a_checkpoint_is_in_its_checksums(tmp_path):
    folder = save(CheckpointManager(tmp_path), 3, *tiny())
    listed = json.loads((folder / CHECKSUMS).read_text())["files"]
    on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS}
    assert set(listed) == on_disk >= {"model.safetensors", TRAINING_STATE, "distcp/.metadata", "distcp/__0_0.distcp"}
    assert verify_checkpoint(folder) is None


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_a_damaged_newest_checkpoint_is_named_and_the_previous_one_is_used(tmp_path, caplog, kind):
    name, corrupt, problem = CORRUPTIONS[kind]
    manager = CheckpointManager(tmp_path, keep_last=2)
    model, optimizer = tiny()
    save(manager, 3, model, optimizer)
    state_at_3 = {k: v.clone() for k, v in model.state_dict().items()}
    model.weight.data += 1  # the newer checkpoint holds other weights
    newest = save(manager, 6, model, optimizer)
    corrupt(newest / name)

    with caplog.at_level(logging.WARNING, logger="kubetune.checkpoint"):
        chosen = manager.resume_from("auto")
    assert chosen == tmp_path / "checkpoints" / "step_3"
    assert f"checkpoint {newest} is damaged: {problem}" in caplog.text
    assert "resuming from the previous one, step_3, instead" in caplog.text
    # What it resumes from is really the previous state.
    fresh, fresh_optimizer = tiny()
    fresh.weight.data.zero_()
    load_sharded_training_state(chosen, fresh, fresh_optimizer)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state_at_3.items())
    # Naming the damaged checkpoint explicitly is refused, with the reason.
    with pytest.raises(ResumeError, match=f"step_6 is damaged: {problem}"):
        manager.resume_from(str(newest))


def test_a_flipped_byte_or_a_truncation_in_any_file_is_detected_with_hashing_threads(tmp_path, monkeypatch):
    """Every file hashed in full, whichever thread hashes it: damage anywhere, in any file, is named."""
    from kubetune.trainer.training import checkpointing

    monkeypatch.setattr(checkpointing, "HASH_THREADS", 4)  # the thread pool, whatever the machine's cores
    manager = CheckpointManager(tmp_path / "run", run=RunRecord("r", "h", {}, 9))  # with its run.json
    folder = save(manager, 3, *tiny())
    names = sorted(json.loads((folder / CHECKSUMS).read_text())["files"])
    assert len(names) >= 5  # weights, DCP metadata and shard, training state, run.json
    for name in names:
        for damage, problem in [(flip_one_byte, "does not match its sha256"), (lambda p: os.truncate(p, p.stat().st_size - 1), "bytes")]:
            copy = tmp_path / "copy"
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(folder, copy)
            damage(copy / name)
            found = verify_checkpoint(copy)
            assert found is not None and found.startswith(f"{name} ") and problem in found, (name, found)
    assert verify_checkpoint(folder) is None


def test_checkpoints_without_checksums_get_a_structure_check(tmp_path):
    """Written before checksums existed: a truncated safetensors file or an unloadable state is still caught."""
    manager = CheckpointManager(tmp_path)
    folder = save(manager, 3, *tiny())
    (folder / CHECKSUMS).unlink()
    assert verify_checkpoint(folder) is None
    weights = folder / "model.safetensors"
    os.truncate(weights, weights.stat().st_size - 4)  # the header intact, the tensors cut short
    assert verify_checkpoint(folder) == (f"model.safetensors has {weights.stat().st_size} bytes, its header says "
                                         f"{weights.stat().st_size + 4} (truncated)")
    os.truncate(weights, 20)  # the header cut
    assert verify_checkpoint(folder).startswith("model.safetensors is not a readable safetensors file")
    folder = save(manager, 4, *tiny())
    (folder / CHECKSUMS).unlink()
    (folder / TRAINING_STATE).write_bytes(b"garbage")
    assert verify_checkpoint(folder).startswith(f"{TRAINING_STATE} does not load")


def test_a_damaged_checkpoint_never_displaces_a_good_one_when_pruning(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    model, optimizer = tiny()
    for step in (3, 6):
        save(manager, step, model, optimizer)
    truncate(tmp_path / "checkpoints" / "step_6" / "model.safetensors")
    assert manager.latest() == tmp_path / "checkpoints" / "step_3"  # found damaged on resume
    save(manager, 9, model, optimizer)
    # Counting folders, keep_last=2 would have dropped step_3 and kept the damaged step_6.
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_3", "step_9"]


def test_when_every_checkpoint_is_damaged_resume_auto_says_so(tmp_path):
    from types import SimpleNamespace

    from kubetune.trainer.training.resume import plan_resume, start_run

    manager = CheckpointManager(tmp_path, keep_last=2)
    cfg = SimpleNamespace(resume="auto", overwrite_output_dir=False, lr_scheduler=SimpleNamespace(on_resume="keep"),
                          model_dump=lambda mode: {"model": "m", "batch_size": 1})
    start_run(plan_resume(cfg, manager, 10), tmp_path)
    for step in (3, 6):
        save(manager, step, *tiny())
        truncate(tmp_path / "checkpoints" / f"step_{step}" / "model.safetensors")
    with pytest.raises(ResumeError, match=r"no intact checkpoint to resume from \(damaged: step_3: model.safetensors has"):
        plan_resume(cfg, CheckpointManager(tmp_path), 10)


def test_a_run_killed_during_its_first_checkpoint_write_starts_again(tmp_path):
    """SIGKILL while step_3 is still `step_3.tmp-*` (found by a seeded kill trial under load):
    `resume: auto` must start the same run from step 0, not refuse the folder forever (a pod
    restart would then never get past it)."""
    from types import SimpleNamespace

    from kubetune.trainer.training.resume import plan_resume, start_run

    cfg = SimpleNamespace(resume="auto", overwrite_output_dir=False, lr_scheduler=SimpleNamespace(on_resume="keep"),
                          model_dump=lambda mode: {"model": "m", "batch_size": 1})
    first = plan_resume(cfg, CheckpointManager(tmp_path, keep_last=2), 10)
    start_run(first, tmp_path)
    (tmp_path / "checkpoints" / "step_3.tmp-0123abcd").mkdir(parents=True)  # the write the kill cut short
    again = plan_resume(cfg, CheckpointManager(tmp_path, keep_last=2), 10)
    assert again.checkpoint is None and "starting it again from step 0" in " ".join(again.messages)


def test_saving_a_step_again_never_leaves_neither_copy(tmp_path, monkeypatch):
    """The same step saved twice (SIGTERM right after a periodic save): if putting the new one in
    place fails, the old one is still there, complete."""
    manager = CheckpointManager(tmp_path)
    model, optimizer = tiny()
    save(manager, 5, model, optimizer)
    real_rename = os.rename

    def failing_rename(src, dst):
        if os.path.basename(src).startswith("step_5.tmp-"):  # the finished folder being put in place
            raise OSError(28, "No space left on device")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(Exception, match="step-5 checkpoint.*No space left"):
        save(manager, 5, model, optimizer)
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_5"]
    assert verify_checkpoint(tmp_path / "checkpoints" / "step_5") is None


# ------------------------------------------------------------- a kill between the swap's renames

KILLED_CHILD = r"""
import sys
sys.path.insert(0, sys.argv[2])
from test_checkpoint_integrity import save, tiny
from kubetune.trainer.training.checkpointing import CheckpointManager
from kubetune.trainer.training.resume import RunRecord

manager = CheckpointManager(sys.argv[1], keep_last=2, run=RunRecord("run-killed", "", {}, 10))
model, optimizer = tiny()
for step in map(int, sys.argv[3:]):
    model.weight.data.fill_(step)  # each checkpoint's weights say which step wrote them
    save(manager, step, model, optimizer)
print("not killed")
"""


@pytest.fixture(scope="module")
def killed_mid_swap(tmp_path_factory):
    """killed_mid_swap(into, failpoint, *steps): the checkpoints folder left when a child process
    saving `steps` with the real writer SIGKILLs itself at `failpoint` (checkpointing._failpoint:
    the exact moment between two renames, not timing luck), copied into `into`. Each state is
    made once per module (a child process costs seconds)."""
    made = {}

    def make(into, failpoint, *steps):
        key = (failpoint, steps)
        if key not in made:
            made[key] = out = tmp_path_factory.mktemp("killed")
            script = out / "child.py"
            script.write_text(KILLED_CHILD)
            env = {**os.environ, FAILPOINTS_ENV: f"{failpoint}=SIGKILL", "OMP_NUM_THREADS": "1"}
            child = subprocess.run([sys.executable, str(script), str(out), str(Path(__file__).parent), *map(str, steps)],
                                   env=env, capture_output=True, text=True, timeout=120)
            assert child.returncode == -signal.SIGKILL, (child.returncode, child.stdout, child.stderr[-3000:])
        shutil.copytree(made[key] / "checkpoints", into / "checkpoints")
        return sorted((into / "checkpoints").iterdir())

    return make


def weights_step(folder):
    from safetensors.torch import load_file

    values = set(load_file(folder / "model.safetensors")["weight"].flatten().tolist())
    assert len(values) == 1
    return int(values.pop())


@pytest.mark.parametrize("point, left", [
    ("replacing", ["step_3", "step_5.replaced-", "step_5.tmp-"]),  # step 5 saved again: both copies aside
    ("renaming", ["step_3", "step_5.tmp-"]),  # step 5's first write, finished, not yet renamed
])
def test_a_kill_between_the_renames_never_loses_the_completed_checkpoint(tmp_path, caplog, killed_mid_swap, point,
                                                                              left):
    steps = (3, 5, 5) if point == "replacing" else (3, 5)
    folders = killed_mid_swap(tmp_path, f"{point}:step_5", *steps)
    assert len(folders) == len(left) and [f.name[: len(name)] for f, name in zip(folders, left)] == left
    assert all(verify_checkpoint(f) is None for f in folders)  # every copy complete: nothing may be lost

    manager = CheckpointManager(tmp_path, keep_last=2)
    with caplog.at_level(logging.WARNING, logger="kubetune.checkpoint"):
        assert manager.recover_interrupted_writes() == [tmp_path / "checkpoints" / "step_5"]
    assert f"was left as {folders[1].name} by a run killed while" in caplog.text
    chosen = manager.resume_from("auto")
    assert chosen == tmp_path / "checkpoints" / "step_5" and weights_step(chosen) == 5  # not step_3
    fresh, fresh_optimizer = tiny()
    load_sharded_training_state(chosen, fresh, fresh_optimizer)
    assert torch.equal(fresh.weight, torch.full_like(fresh.weight, 5))
    # The next save prunes the duplicate leftover and the oldest checkpoint, nothing else.
    save(manager, 7, *tiny())
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_5", "step_7"]


def test_pruning_never_removes_the_only_complete_copy_of_a_step(tmp_path, killed_mid_swap):
    """A save (and its prune) with the leftovers still there, as when nothing recovered them first."""
    killed_mid_swap(tmp_path, "replacing:step_5", 3, 5, 5)
    manager = CheckpointManager(tmp_path, keep_last=2)
    save(manager, 7, *tiny())
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_5", "step_7"]
    assert weights_step(tmp_path / "checkpoints" / "step_5") == 5


def test_a_damaged_leftover_gives_way_to_the_intact_copy(tmp_path, caplog, killed_mid_swap):
    folders = killed_mid_swap(tmp_path, "replacing:step_5", 3, 5, 5)
    replaced, written = folders[1], folders[2]
    flip_one_byte(replaced / "model.safetensors")
    manager = CheckpointManager(tmp_path, keep_last=2)
    manager.recover_interrupted_writes()
    assert not written.exists() and replaced.exists()  # the intact new copy was put in place
    assert manager.resume_from("auto") == tmp_path / "checkpoints" / "step_5"

    # Both copies damaged: one is put back all the same, so resume names the damage and falls back.
    folders = killed_mid_swap(tmp_path / "both", "replacing:step_5", 3, 5, 5)
    for folder in folders[1:]:
        truncate(folder / "model.safetensors")
    manager = CheckpointManager(tmp_path / "both", keep_last=2)
    manager.recover_interrupted_writes()
    with caplog.at_level(logging.WARNING, logger="kubetune.checkpoint"):
        assert manager.resume_from("auto") == tmp_path / "both" / "checkpoints" / "step_3"
    assert "step_5 is damaged: model.safetensors has" in caplog.text


def test_an_unfinished_write_is_not_put_back(tmp_path):
    """A `step_N.tmp-*` without checksums.json (killed while writing): not a checkpoint."""
    manager = CheckpointManager(tmp_path, keep_last=2)
    model, optimizer = tiny()
    save(manager, 3, model, optimizer)
    unfinished = tmp_path / "checkpoints" / "step_5.tmp-0123abcd"
    shutil.copytree(tmp_path / "checkpoints" / "step_3", unfinished)
    (unfinished / CHECKSUMS).unlink()
    assert manager.recover_interrupted_writes() == []
    assert manager.resume_from("auto") == tmp_path / "checkpoints" / "step_3"
    save(manager, 6, model, optimizer)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_3", "step_6"]


DECIDING_WORKER = r"""
import json, sys
from pathlib import Path
from types import SimpleNamespace
from kubetune.errors import KubetuneError
from kubetune.trainer.distributed import close_distributed, init_distributed
from kubetune.trainer.training import checkpointing
from kubetune.trainer.training.checkpointing import CheckpointManager
from kubetune.trainer.training.resume import plan_resume

out, model = Path(sys.argv[1]), sys.argv[2]
world = init_distributed("cpu")
hashed = []
real_sha256 = checkpointing._sha256
checkpointing._sha256 = lambda path: hashed.append(path.name) or real_sha256(path)
cfg = SimpleNamespace(resume="auto", overwrite_output_dir=False, lr_scheduler=SimpleNamespace(on_resume="keep"),
                      model_dump=lambda mode: {"model": model, "batch_size": 1})
try:
    plan = world.main_decides(lambda: plan_resume(cfg, CheckpointManager(out), 10, world.size))
    report = {"checkpoint": str(plan.checkpoint), "run": plan.run.run_id}
except KubetuneError as err:
    report = {"error": str(err)}
report["hashed"] = len(hashed)
(out / f"report-{world.rank}.json").write_text(json.dumps(report))
close_distributed()
"""


def test_under_torchrun_rank_0_alone_chooses_the_checkpoint_and_every_rank_gets_its_answer(tmp_path, killed_mid_swap):
    """Two processes: only rank 0 puts the leftover back and hashes the newest checkpoint (each rank
    hashing it would read the checkpoint once per process); rank 1 gets the same plan. A refusal
    (the settings differ) reaches both ranks with the same message."""
    from kubetune.trainer.training.resume import RUN_FILE, RunRecord, matched_settings, settings_hash

    killed_mid_swap(tmp_path, "replacing:step_5", 3, 5, 5)
    cfg = SimpleNamespace(model_dump=lambda mode: {"model": "m", "batch_size": 1})
    settings = matched_settings(cfg, world_size=2)  # the run in output_dir: the killed one, with these settings
    RunRecord("run-killed", settings_hash(settings), settings, 10).write(tmp_path / RUN_FILE)
    (tmp_path / "worker.py").write_text(DECIDING_WORKER)
    for model in ("m", "another-model"):
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                              str(tmp_path / "worker.py"), str(tmp_path), model],
                             env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=240)
        assert run.returncode == 0, run.stderr[-4000:]
        reports = [json.loads((tmp_path / f"report-{rank}.json").read_text()) for rank in (0, 1)]
        if model == "m":
            assert reports[0]["checkpoint"] == str(tmp_path / "checkpoints" / "step_5")
            assert reports[0]["hashed"] >= 4 and reports[1]["hashed"] == 0  # both leftovers, then step_5: rank 0 only
            assert reports[1]["checkpoint"] == reports[0]["checkpoint"] and reports[1]["run"] == reports[0]["run"]
        else:
            assert "whose settings differ from this config" in reports[0]["error"]
            assert reports[1] == {**reports[0], "hashed": 0}


SAVING_WORKER = r"""
import json, sys
from pathlib import Path
import torch
from safetensors.torch import save_file
from kubetune.trainer.distributed import close_distributed, init_distributed
from kubetune.trainer.training import checkpointing
from kubetune.trainer.training.checkpointing import CheckpointManager

out = Path(sys.argv[1])
world = init_distributed("cpu")
hashed = []
real_sha256 = checkpointing._sha256
checkpointing._sha256 = lambda path: hashed.append(path.relative_to(out / "checkpoints").as_posix()) or real_sha256(path)

def write_model(folder):
    if world.is_main:
        folder.mkdir()
        save_file({"w": torch.ones(1000)}, str(folder / "model.safetensors"))

# Each rank's own tensors (a sharded optimizer state): every rank writes a DCP shard file of its own.
state = {"optimizer": {f"rank{world.rank}": torch.full((250_000,), float(world.rank))}}
checkpointing.CheckpointManager(out).save(4, write_model, {"step": 4}, world=world, sharded_state=state,
                                          rank_state={"rng": world.rank})
(out / f"hashed-{world.rank}.json").write_text(json.dumps(sorted(hashed)))
close_distributed()
"""


def test_under_torchrun_each_rank_hashes_the_shards_it_wrote_and_the_checksums_cover_all(tmp_path):
    """At save, rank 1 hashes its own DCP shard and RNG state (still in its node's page cache), rank 0
    the rest, and checksums.json lists every file; damage in rank 1's shard is found at resume."""
    (tmp_path / "worker.py").write_text(SAVING_WORKER)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          str(tmp_path / "worker.py"), str(tmp_path)],
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-4000:]
    hashed = [{"/".join(h.split("/")[1:]) for h in json.loads((tmp_path / f"hashed-{r}.json").read_text())} for r in (0, 1)]
    folder = tmp_path / "checkpoints" / "step_4"
    listed = set(json.loads((folder / CHECKSUMS).read_text())["files"])
    assert hashed[1] == {"distcp/__1_0.distcp", "rng_rank_1.pt"}
    assert not hashed[0] & hashed[1] and hashed[0] | hashed[1] == listed
    assert {"model.safetensors", TRAINING_STATE, "distcp/.metadata", "distcp/__0_0.distcp"} <= hashed[0]
    assert verify_checkpoint(folder) is None
    flip_one_byte(folder / "distcp" / "__1_0.distcp")
    assert verify_checkpoint(folder).startswith("distcp/__1_0.distcp does not match its sha256")


# ------------------------------------------------------------------------------------ full disk

CHILD = r"""
import json, sys
from pathlib import Path
import torch
from safetensors.torch import save_file
from kubetune.errors import KubetuneError
from kubetune.trainer.training.checkpointing import CheckpointManager, verify_checkpoint

out = Path(sys.argv[1])
manager = CheckpointManager(out, keep_last=2)

def weights(n):
    def write(folder):
        folder.mkdir()
        save_file({"w": torch.ones(n)}, str(folder / "model.safetensors"))
    return write

big = sys.argv[2]  # which file of the step-2 checkpoint does not fit: the weights or the DCP shard
manager.save(1, weights(25_000), {"step": 1})  # 100 kB: fits
try:
    if big == "weights":
        manager.save(2, weights(1_000_000), {"step": 2})  # 4 MB: does not
    else:
        manager.save(2, weights(10), {"step": 2}, sharded_state={"optimizer": {"exp_avg": torch.ones(1_000_000)}})
    error = None
except KubetuneError as err:
    error = str(err)
print(json.dumps({"error": error, "left": sorted(p.name for p in (out / "checkpoints").iterdir()),
                  "intact": verify_checkpoint(out / "checkpoints" / "step_1") is None}))
"""


def _tmpfs_works() -> bool:
    import shutil
    import subprocess

    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            'd=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs "$d"'], capture_output=True)
    return probe.returncode == 0


@pytest.mark.parametrize("disk, big", [("tmpfs", "weights"), ("rlimit", "weights"), ("rlimit", "dcp shard")])
def test_a_full_disk_during_a_checkpoint_write_is_a_clear_error_and_keeps_the_previous_one(tmp_path, disk, big):
    """tmpfs: a 1 MiB tmpfs in a user+mount namespace (writes past it fail with ENOSPC, a real full
    disk); rlimit: RLIMIT_FSIZE of 1 MiB in the child (writes past it fail with EFBIG), where
    namespaces are not allowed."""
    import resource
    import subprocess
    import sys

    script = tmp_path / "child.py"
    script.write_text(CHILD)
    out = tmp_path / "out"
    if disk == "tmpfs":
        if not _tmpfs_works():
            pytest.skip("no unshare, or unprivileged user namespaces are off: the rlimit case covers this")
        out.mkdir()
        argv = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                'mount -t tmpfs -o size=1m tmpfs "$1" && exec "$2" "$3" "$1" "$4"', "sh", str(out), sys.executable, str(script), big]
        limit = None
    else:
        argv, limit = [sys.executable, str(script), str(out), big], 1 << 20

    def limited():
        if limit:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    child = subprocess.run(argv, capture_output=True, text=True, timeout=120, preexec_fn=limited)
    assert child.returncode == 0, child.stderr[-3000:]
    result = json.loads(child.stdout.strip().splitlines()[-1])
    assert result["error"].startswith("could not write the step-2 checkpoint") and "MiB free there" in result["error"]
    if big == "weights":  # torch.distributed.checkpoint's writer loses the errno ("unexpected pos ...")
        assert ("No space left on device" if disk == "tmpfs" else "File too large") in result["error"], result
    assert "step_1 is untouched and resume: auto continues from it" in result["error"]
    assert "Traceback" not in result["error"] and "\n" not in result["error"]  # one line, not DCP's rank tracebacks
    assert result["left"] == ["step_1"] and result["intact"]  # no half-written step_2, step_1 whole
