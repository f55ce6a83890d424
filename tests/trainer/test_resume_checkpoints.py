"""The checkpoint manager: atomic writes, pruning after success, resume discovery."""
import pytest
import torch

from kubetune.trainer.training.checkpointing import (
    TRAINING_STATE,
    CheckpointManager,
    CheckpointWriteError,
    ResumeError,
    load_training_state,
)
from kubetune.trainer.training.rng import load_rng_state, rng_state


def write_weights(folder):
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")


def test_save_writes_model_and_state_and_keeps_only_the_newest(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in (10, 20, 30):
        folder = manager.save(step, write_weights, {"step": step})
        assert folder == tmp_path / "checkpoints" / f"step_{step}"
        assert (folder / "model.safetensors").read_bytes() == b"weights"
        assert load_training_state(folder)["step"] == step
    assert [s for s, _ in manager.complete_checkpoints()] == [20, 30]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_20", "step_30"]


def test_a_crash_while_writing_leaves_no_checkpoint_and_keeps_the_old_ones(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=1)
    manager.save(10, write_weights, {"step": 10})

    def crash(folder):
        write_weights(folder)
        raise OSError("disk full")

    with pytest.raises(CheckpointWriteError, match="step-20 checkpoint.*disk full.*step_10 is untouched"):
        manager.save(20, crash, {"step": 20})
    # The old checkpoint was not pruned for a new one that never completed, and no half is left.
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_10"]
    assert manager.latest() == tmp_path / "checkpoints" / "step_10"


def test_resume_auto_ignores_incomplete_folders_left_by_a_kill(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=3)
    assert manager.resume_from("auto") is None
    manager.save(4, write_weights, {"step": 4})
    checkpoints = tmp_path / "checkpoints"
    (checkpoints / "step_8.tmp-deadbeef").mkdir()  # SIGKILL during a write
    (checkpoints / TRAINING_STATE).write_bytes(b"")  # stray file
    (checkpoints / "step_9").mkdir()  # not ours: no training state
    assert manager.resume_from("auto") == checkpoints / "step_4"
    assert manager.resume_from("never") is None
    assert manager.resume_from(str(checkpoints / "step_4")) == checkpoints / "step_4"
    with pytest.raises(ResumeError, match="step_9 is not a complete checkpoint.*resume: auto"):
        manager.resume_from(str(checkpoints / "step_9"))
    manager.save(12, write_weights, {"step": 12})
    assert not (checkpoints / "step_8.tmp-deadbeef").exists()  # leftovers cleaned on the next save


def test_saving_the_same_step_again_replaces_it(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    manager.save(5, write_weights, {"step": 5, "v": 1})
    manager.save(5, write_weights, {"step": 5, "v": 2})
    assert load_training_state(manager.latest())["v"] == 2


def test_rng_state_round_trips_through_a_checkpoint(tmp_path):
    import random

    manager = CheckpointManager(tmp_path)
    torch.manual_seed(3)
    random.seed(3)
    folder = manager.save(1, write_weights, {"rng": rng_state()})
    expected = (torch.rand(3), random.random())
    torch.manual_seed(99)
    random.seed(99)
    load_rng_state(load_training_state(folder)["rng"])
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
