"""Optimizers beyond AdamW (torch's Adafactor, torchao's 8-bit AdamW) each train the tiny model, and
lr_scheduler.warmup_ratio warms up over its fraction of the planned steps."""
from types import SimpleNamespace

import pytest
import torch

from kubetune.trainer.config.finetune import LRSchedulerSection, OptimizerSection
from kubetune.trainer.training.optim import build_lr_scheduler, build_optimizer, warmup_steps

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def fixed_batch(vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab, (4, 24), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


def train(tiny_model_dir, optimizer_cfg: OptimizerSection, steps: int = 25) -> tuple[list[float], torch.optim.Optimizer]:
    from kubetune.trainer.checkpoint import load_pretrained
    from kubetune.trainer.training.steps import batch_loss_sum

    torch.manual_seed(0)
    model = load_pretrained(tiny_model_dir)
    optimizer = build_optimizer(model.named_parameters(), optimizer_cfg, torch.device("cpu"))
    batch = fixed_batch(model.args.vocab_size)
    tokens = int((batch["labels"][:, 1:] != -100).sum())
    losses = []
    for _ in range(steps):
        loss = batch_loss_sum(model, batch) / tokens
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses, optimizer


@pytest.mark.parametrize("name, lr, expected_class", [
    ("adamw", 3e-3, "AdamW"),
    ("adafactor", 3e-2, "Adafactor"),
    ("adamw_8bit", 3e-3, "AdamW8bit"),
])
def test_each_optimizer_trains_the_tiny_model(tiny_model_dir, name, lr, expected_class):
    if name == "adamw_8bit":
        pytest.importorskip("torchao")
    losses, optimizer = train(tiny_model_dir, OptimizerSection(name=name, lr=lr, weight_decay=0.01))
    assert type(optimizer).__name__ == expected_class
    # A random model starts at ~ln(vocab) = 6.9 nats; memorising one batch brings it well down.
    assert losses[0] > 6.5 and losses[-1] < 0.6 * losses[0], losses


def test_adamw_8bit_follows_adamw_closely(tiny_model_dir):
    """Its states are 8-bit: the first steps track full-precision AdamW to a few percent."""
    pytest.importorskip("torchao")
    exact, _ = train(tiny_model_dir, OptimizerSection(name="adamw", lr=1e-3), steps=8)
    eight_bit, _ = train(tiny_model_dir, OptimizerSection(name="adamw_8bit", lr=1e-3), steps=8)
    assert eight_bit[0] == pytest.approx(exact[0], rel=1e-6)
    assert all(abs(a - b) / a < 0.05 for a, b in zip(exact, eight_bit)), (exact, eight_bit)


def test_warmup_ratio_warms_up_over_its_fraction_of_the_planned_steps():
    cfg = LRSchedulerSection(name="linear", warmup_ratio=0.1)
    assert warmup_steps(cfg, 95) == 10 and warmup_steps(LRSchedulerSection(warmup_steps=7), 95) == 7
    param = torch.nn.Parameter(torch.zeros(2, 2))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = build_lr_scheduler(optimizer, cfg, total_steps=95)
    lrs = []
    for _ in range(95):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])  # linear warmup to the peak at step 10
    assert lrs[10] == pytest.approx(1.0) and lrs[-1] == pytest.approx(1 / 85)  # then linear decay to 0 at 95
    with pytest.raises(ValueError, match="set warmup_steps or warmup_ratio, not both"):
        LRSchedulerSection(warmup_steps=5, warmup_ratio=0.1)


def test_adamw_8bit_without_torchao_is_a_clear_error(monkeypatch):
    import builtins

    from kubetune.errors import KubetuneError

    real_import = builtins.__import__

    def no_torchao(name, *args, **kwargs):
        if name.startswith("torchao"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchao)
    params = [("w", torch.nn.Parameter(torch.zeros(2, 2)))]
    with pytest.raises(KubetuneError, match=r"adamw_8bit needs torchao \(pip install 'kubetune\[quant\]'\)"):
        build_optimizer(params, SimpleNamespace(name="adamw_8bit", lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8),
                        torch.device("cpu"))
