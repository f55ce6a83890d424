"""The shared training pieces: schedule, optimizer groups, loss normalisation, metrics,
termination log and SIGTERM handling."""
import json
import math
import os
import signal
import urllib.request

import pytest
import torch
import torch.nn.functional as F

from kubetune.trainer.config.finetune import LRSchedulerSection, OptimizerSection
from kubetune.trainer.data.formats import IGNORE_INDEX
from kubetune.trainer.training.loss import causal_lm_loss_sum, count_label_tokens
from kubetune.trainer.training.metrics import GAUGES, MetricsLog, PrometheusExporter, read_metrics
from kubetune.trainer.training.optim import build_lr_scheduler, build_optimizer, lr_multiplier
from kubetune.trainer.training.signals import GracefulStop
from kubetune.trainer.training.summary import run_summary, write_termination_log


@pytest.mark.parametrize("name", ["cosine", "linear", "constant"])
def test_lr_schedule_warms_up_then_follows_its_formula(name):
    total, warmup, floor, base = 20, 5, 0.1, 1e-3
    model = torch.nn.Linear(2, 2)
    optimizer = build_optimizer(model.named_parameters(), OptimizerSection(lr=base), torch.device("cpu"))
    scheduler = build_lr_scheduler(optimizer, LRSchedulerSection(name=name, warmup_steps=warmup, min_lr_ratio=floor), total)
    seen = []
    for _ in range(total):
        seen.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    for step, lr in enumerate(seen):
        if step < warmup:
            expected = base * (step + 1) / warmup
        else:
            progress = (step - warmup) / (total - warmup)
            shape = {"cosine": 0.5 * (1 + math.cos(math.pi * progress)), "linear": 1 - progress, "constant": 1.0}[name]
            expected = base * (floor + (1 - floor) * shape) if name != "constant" else base
        assert lr == pytest.approx(expected, rel=1e-12), step
    assert lr_multiplier(total, total, "cosine", warmup, floor) == pytest.approx(floor)


def test_weight_decay_applies_to_matrices_only_and_fused_is_used_on_cpu():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    optimizer = build_optimizer(model.named_parameters(), OptimizerSection(lr=1e-3, weight_decay=0.1), torch.device("cpu"))
    decayed, plain = optimizer.param_groups
    assert [p.shape for p in decayed["params"]] == [torch.Size([3, 3])] and decayed["weight_decay"] == 0.1
    assert len(plain["params"]) == 3 and plain["weight_decay"] == 0.0
    assert decayed["fused"] is True
    off = build_optimizer(model.named_parameters(), OptimizerSection(fused=False), torch.device("cpu"))
    assert not off.param_groups[0]["fused"]


def test_loss_sum_over_micro_batches_equals_one_big_batch_mean():
    torch.manual_seed(0)
    logits = torch.randn(4, 6, 11)
    labels = torch.randint(0, 11, (4, 6))
    labels[0, :4] = IGNORE_INDEX
    labels[3, 2:] = IGNORE_INDEX
    reference = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
    tokens = count_label_tokens(labels)
    split = sum(causal_lm_loss_sum(logits[i:i + 2], labels[i:i + 2]) for i in (0, 2)) / tokens
    torch.testing.assert_close(split, reference, rtol=1e-6, atol=1e-6)


def test_prometheus_serves_the_contract_gauges(tmp_path):
    exporter = PrometheusExporter(port=0)
    try:
        exporter.update(step=7, total_steps=10, loss=1.5, learning_rate=None)
        body = urllib.request.urlopen(f"http://127.0.0.1:{exporter.port}/metrics", timeout=10).read().decode()
    finally:
        exporter.close()
    for name, _ in GAUGES.values():
        assert f"# TYPE {name} gauge" in body
    assert "kubetune_train_step 7.0" in body and "kubetune_train_loss 1.5" in body
    assert set(n for n, _ in GAUGES.values()) == {
        "kubetune_train_step", "kubetune_train_total_steps", "kubetune_train_epoch", "kubetune_train_loss",
        "kubetune_train_learning_rate", "kubetune_train_tokens_per_second", "kubetune_train_peak_memory_bytes",
        "kubetune_train_last_checkpoint_step",
    }


def test_metrics_log_drops_lines_past_the_resumed_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    for step in range(1, 6):
        log.write({"step": step, "loss": float(step)})
    log.close()
    with path.open("a") as handle:
        handle.write('{"step": 6, "lo')  # a line cut short by SIGKILL
    resumed = MetricsLog(path, resume_step=3)
    resumed.write({"step": 4, "loss": 40.0})
    resumed.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(path)] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]


def test_termination_log_is_one_json_line_with_the_contract_keys(tmp_path, monkeypatch):
    target = tmp_path / "termination-log"
    monkeypatch.setenv("KUBETUNE_TERMINATION_LOG", str(target))
    summary = run_summary(final_loss=0.5, eval_loss=float("nan"), steps=3, checkpoint="out/model", tokens_per_second=12.5)
    assert write_termination_log(summary) == target
    lines = target.read_text().splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0]) == {
        "finalLoss": 0.5, "evalLoss": None, "steps": 3, "checkpoint": "out/model", "adapter": None,
        "tokensPerSecond": 12.5,
    }
    monkeypatch.setenv("KUBETUNE_TERMINATION_LOG", str(tmp_path / "no" / "such" / "dir" / "log"))
    assert write_termination_log(summary) is None  # reporting never fails the run


def test_sigterm_sets_a_flag_inside_and_restores_the_handler_after():
    before = signal.getsignal(signal.SIGTERM)
    with GracefulStop() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested
    assert signal.getsignal(signal.SIGTERM) == before
    with GracefulStop(enabled=False):
        assert signal.getsignal(signal.SIGTERM) == before


def test_progress_prints_plain_lines_to_stderr_without_a_bar_and_nothing_when_silent(capsys):
    from kubetune.trainer.training.progress import ProgressBar

    bar = ProgressBar(total=4, enabled=True, text_every=2)  # pytest's stderr is not a terminal
    for step in range(1, 5):
        bar.update(step, loss=1.0 / step, lr=1e-3)
    bar.close()
    pod = ProgressBar(total=4, enabled=False, text_every=2)  # progress_bar: false, as in pods: plain lines too
    pod.update(2, loss=0.5)
    pod.close()
    other_rank = ProgressBar(total=4, enabled=True, text_every=2, silent=True)
    other_rank.update(2, loss=0.5)
    other_rank.write("not shown")
    other_rank.close()
    printed = capsys.readouterr()
    assert printed.out == ""  # stdout stays free for a program's output
    lines = printed.err.splitlines()
    assert lines == ["step 2/4 loss=0.5000 lr=1.00e-03", "step 4/4 loss=0.2500 lr=1.00e-03", "step 2/4 loss=0.5000"]
