"""Preference alignment (DPO, IPO, SimPO), full or LoRA, on one device: `kubetune run dpo --config tiny_dpo`.

A copy of full_finetune.py / lora_finetune.py with the preference changes, so it reads top to bottom:
- data are preference pairs (`kubetune.trainer.data.preference`); a batch of B pairs is 2B rows,
  every chosen response then every rejected one, scored in one forward pass;
- the loss (`kubetune.trainer.training.preference_loss`) compares the policy's log-probabilities
  of the two responses with the reference model's: `loss: dpo` (sigmoid, `beta`,
  `label_smoothing`), `ipo`, or `simpo` (reference-free, length-normalised, `gamma`);
- the reference: with a `lora:` section it is the same base with the adapters switched off (no
  second copy in memory; QLoRA with `model.quantize_base: nf4`); without one (full DPO) it is a
  frozen copy of model.path, loaded once, in eval mode. SimPO needs none;
- beside the loss, every logged step and every evaluation report rewards/chosen,
  rewards/rejected, rewards/margin and rewards/accuracy (metrics.jsonl, progress bar, Prometheus);
- `model.path` may also be a previous run's output folder (its `model/`, or its LoRA `adapter/`
  merged into that adapter's base once, into `output_dir/base/`), so a pipeline stage can align
  what the one before it trained.
The set-up order is the other recipes' (model, then [shard], then optimizer), so FSDP2 drops in.

Guarantees (tested): with the policy equal to the reference the first step's DPO loss is ln 2; on
the synthetic task the held-out reward accuracy passes 0.9 and greedy answers move to the chosen
ones; a run killed at any moment and resumed ends with the same weights and losses as an
uninterrupted one (CPU, fp32, same seed); SIGTERM saves a checkpoint and exits with 143.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Optional

import torch

from kubetune.errors import KubetuneError
from kubetune.trainer.checkpoint import load_model_args, load_pretrained, resolve_local_dir
from kubetune.trainer.checkpoint.hf import save_pretrained, write_model_dir
from kubetune.trainer.config.dpo import DPOConfig
from kubetune.trainer.data.dataset import BatchLoader, build_datasets
from kubetune.trainer.device import resolve_device, resolve_dtype
from kubetune.trainer.peft import adapters_disabled, apply_lora, restore_adapter_weights, save_adapter, trainable_parameters
from kubetune.trainer.peft.adapter import write_adapter_files
from kubetune.trainer.peft.merge import merge_to_dir
from kubetune.trainer.tokenizers import check_vocab_matches, load_tokenizer
from kubetune.trainer.training.checkpointing import CheckpointManager, load_training_state
from kubetune.trainer.training.metrics import PREFERENCE_GAUGES, MetricsLog, PrometheusExporter, peak_memory_bytes
from kubetune.trainer.training.optim import build_lr_scheduler, build_optimizer
from kubetune.trainer.training.plots import write_loss_plot
from kubetune.trainer.training.preference_loss import REFERENCE_FREE, PreferenceLoss, preference_loss, sequence_logps
from kubetune.trainer.training.progress import ProgressBar
from kubetune.trainer.training.rng import load_rng_state, rng_state, seed_everything
from kubetune.trainer.training.signals import GracefulStop
from kubetune.trainer.training.steps import bf16_autocast, planned_steps, real_tokens
from kubetune.trainer.training.summary import run_summary, write_termination_log

log = logging.getLogger("kubetune.dpo")
SIGTERM_EXIT_CODE = 143  # 128 + SIGTERM: the pod was stopped, the job did not finish


def recipe_main(cfg: DPOConfig) -> dict[str, Any]:
    # ---- Where and how -------------------------------------------------------------------
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype)
    seed_everything(cfg.seed)
    output_dir = Path(cfg.output_dir)
    checkpoints = CheckpointManager(output_dir, keep_last=cfg.keep_last_checkpoints)
    resume_dir = checkpoints.resume_from(cfg.resume)
    use_lora = cfg.lora is not None
    needs_reference = cfg.loss not in REFERENCE_FREE
    model_path = model_folder(cfg.model.path, output_dir)  # a previous run's output folder -> its model
    tokenizer_path = cfg.tokenizer.path or model_path

    # ---- Tokenizer and preference pairs --------------------------------------------------
    tokenizer = load_tokenizer(tokenizer_path)
    check_vocab_matches(tokenizer, load_model_args(model_path).vocab_size, model_path)  # before any work
    splits = build_datasets(cfg.dataset, tokenizer, cfg.max_seq_len, cfg.seed)
    train_loader = BatchLoader(splits.train, cfg.batch_size, splits.pad_id, shuffle=cfg.dataset.shuffle, seed=cfg.seed)
    eval_loader = BatchLoader(splits.eval, cfg.batch_size, splits.pad_id, shuffle=False) if splits.eval else None
    total_steps = planned_steps(cfg, train_loader.batches_per_epoch)

    # ---- Policy and reference, then (FSDP2: shard here), then optimizer and schedule -----
    reference: Optional[torch.nn.Module] = None
    if use_lora:
        # The base always comes from model.path; a checkpoint holds only the adapter.
        model = load_pretrained(model_path, device=device, dtype=dtype)
        if cfg.model.quantize_base == "nf4":
            from kubetune.trainer.quant import quantize_base

            quantize_base(model)  # decoder projections -> NF4; lm_head stays in dtype
        apply_lora(model, cfg.lora)  # freezes every base parameter; the reference = adapters off
        if resume_dir is not None:
            restore_adapter_weights(model, resume_dir)
    else:
        # Resuming loads the policy from the checkpoint; the reference is always model.path.
        model = load_pretrained(resume_dir or model_path, device=device, dtype=dtype)
        if needs_reference:
            reference = load_pretrained(model_path, device=device, dtype=dtype).eval().requires_grad_(False)
    model.enable_activation_checkpointing(cfg.activation_checkpointing)
    if cfg.compile:
        for layer in model.model.layers:
            layer.compile()  # in place: parameter names (and checkpoints) stay the same
    trained = trainable_parameters(model) if use_lora else list(model.parameters())
    optimizer = build_optimizer(((n, p) for n, p in model.named_parameters() if p.requires_grad), cfg.optimizer, device)
    scheduler = build_lr_scheduler(optimizer, cfg.lr_scheduler, total_steps)

    # ---- Resume: optimizer, schedule, data position and RNG exactly where they were -------
    step = 0
    if resume_dir is not None:
        state = load_training_state(resume_dir)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["lr_scheduler"])
        train_loader.load_state_dict(state["data"])
        load_rng_state(state["rng"])
        step = state["step"]
        log.info("resumed from %s at step %d", resume_dir, step)

    # ---- Reporting: metrics.jsonl, Prometheus, progress bar --------------------------------
    metrics = MetricsLog(output_dir / "metrics.jsonl", resume_step=step)
    exporter = PrometheusExporter(cfg.metrics_port, extra_gauges=PREFERENCE_GAUGES)
    exporter.update(step=step, total_steps=total_steps, epoch=train_loader.epoch,
                    last_checkpoint_step=step if resume_dir else None)
    progress = ProgressBar(total_steps, initial=step, enabled=cfg.progress_bar, text_every=cfg.log_every_steps)
    autocast = bf16_autocast(device, dtype, cfg.bf16_autocast)
    tokenizer_dir = resolve_local_dir(tokenizer_path)  # copied next to every saved model

    def pair_losses(batch: dict[str, torch.Tensor]) -> PreferenceLoss:
        """The loss and rewards of each pair of a batch (rows: every chosen, then every rejected)."""
        reference_logps = None
        if needs_reference:
            with torch.no_grad():
                if use_lora:
                    with adapters_disabled(model):
                        reference_logps, _ = sequence_logps(model, batch)
                else:
                    reference_logps, _ = sequence_logps(reference, batch)
        policy_logps, tokens = sequence_logps(model, batch)
        chosen_ref, rejected_ref = reference_logps.chunk(2) if reference_logps is not None else (None, None)
        return preference_loss(cfg.loss, *policy_logps.chunk(2), chosen_ref, rejected_ref, *tokens.chunk(2),
                               beta=cfg.beta, label_smoothing=cfg.label_smoothing, gamma=cfg.gamma)

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        model.eval()
        totals = RewardTotals()
        for batch in eval_loader.epoch_batches(cfg.eval_max_batches):
            batch = {key: value.to(device) for key, value in batch.items()}
            with autocast:
                totals.add(pair_losses(batch))
        model.train()
        return {f"eval_{key}": value for key, value in totals.means().items()}

    def save_checkpoint() -> Path:
        training_state = {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": scheduler.state_dict(),
            "data": train_loader.state_dict(),
            "rng": rng_state(),
        }
        if use_lora:
            write = lambda tmp: write_adapter_files(model, tmp, model_path)  # noqa: E731
        else:
            write = lambda tmp: write_model_dir(model, tmp, tokenizer_dir)  # noqa: E731
        folder = checkpoints.save(step, write, training_state)
        exporter.update(last_checkpoint_step=step)
        return folder

    last_loss: Optional[float] = None
    evaluation: dict[str, float] = {}
    trained_tokens, train_seconds = 0, 0.0
    result_dir: Optional[Path] = resume_dir
    adapter_dir: Optional[Path] = None
    stop = GracefulStop(enabled=cfg.checkpoint_on_sigterm)
    try:
        with stop:
            if eval_loader is not None and step == 0:
                evaluation = evaluate()
                metrics.write({"step": 0, **evaluation})

            # ---- The training loop: one optimizer step per iteration -----------------------
            while step < total_steps and not stop.requested:
                started = time.perf_counter()
                model.train()
                micro_batches = [train_loader.next_batch() for _ in range(cfg.gradient_accumulation_steps)]
                # The loss is the mean over every pair of the whole step, however it is split.
                step_pairs = sum(b["input_ids"].shape[0] // 2 for b in micro_batches)
                totals = RewardTotals()
                input_tokens = 0
                for batch in micro_batches:
                    batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
                    with autocast:
                        pairs = pair_losses(batch)
                        loss = pairs.losses.sum() / step_pairs
                    loss.backward()
                    totals.add(pairs)
                    input_tokens += real_tokens(batch)
                    del loss, pairs
                grad_norm = None
                if cfg.max_grad_norm is not None:
                    grad_norm = torch.nn.utils.clip_grad_norm_(trained, cfg.max_grad_norm)
                lr = scheduler.get_last_lr()[0]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1

                rewards = totals.means()  # syncs with the device once per step
                last_loss = rewards.pop("loss")
                elapsed = time.perf_counter() - started
                trained_tokens += input_tokens
                train_seconds += elapsed
                tokens_per_second = input_tokens / elapsed if elapsed > 0 else 0.0
                exporter.update(step=step, epoch=train_loader.epoch, loss=last_loss, learning_rate=lr,
                                tokens_per_second=tokens_per_second, peak_memory_bytes=peak_memory_bytes(device.type),
                                rewards_chosen=rewards["rewards/chosen"], rewards_rejected=rewards["rewards/rejected"],
                                reward_margin=rewards["rewards/margin"], reward_accuracy=rewards["rewards/accuracy"])
                progress.update(step, loss=last_loss, lr=lr, acc=rewards["rewards/accuracy"],
                                margin=rewards["rewards/margin"])
                if step % cfg.log_every_steps == 0 or step == total_steps:
                    metrics.write({
                        "step": step, "epoch": train_loader.epoch, "loss": last_loss, "lr": lr, **rewards,
                        "grad_norm": None if grad_norm is None else float(grad_norm),
                        "tokens": input_tokens, "tokens_per_second": round(tokens_per_second, 2),
                    })
                if eval_loader is not None and cfg.eval_every_steps and step % cfg.eval_every_steps == 0:
                    evaluation = evaluate()
                    metrics.write({"step": step, **evaluation})
                    progress.write(f"step {step}: eval loss {evaluation['eval_loss']:.4f}, "
                                   f"reward accuracy {evaluation['eval_rewards/accuracy']:.3f}, "
                                   f"margin {evaluation['eval_rewards/margin']:.3f}")
                if cfg.save_every_steps and step % cfg.save_every_steps == 0 and step < total_steps:
                    result_dir = save_checkpoint()

            # ---- The end: a checkpoint on SIGTERM, else the final model or adapter --------
            if stop.requested:
                result_dir = save_checkpoint() if step > 0 else result_dir
                progress.write(f"SIGTERM: saved a checkpoint at step {step}; resume with resume: auto")
            else:
                if eval_loader is not None and not (cfg.eval_every_steps and step % cfg.eval_every_steps == 0):
                    evaluation = evaluate()
                    metrics.write({"step": step, **evaluation})
                result_dir = save_checkpoint() if cfg.save_every_steps else result_dir
                if use_lora:
                    adapter_dir = save_adapter(model, output_dir / "adapter", base_model_name_or_path=model_path)
                    result_dir = adapter_dir
                    if cfg.save_merged:  # from the base on disk, in its dtype, on the CPU
                        result_dir = merge_to_dir(model_path, adapter_dir, output_dir / "model", tokenizer_dir=tokenizer_dir)
                else:
                    result_dir = save_pretrained(model, output_dir / "model", tokenizer_dir=tokenizer_dir)
    finally:
        tokens_per_second = trained_tokens / train_seconds if train_seconds > 0 else 0.0
        summary = run_summary(last_loss, evaluation.get("eval_loss"), step, str(result_dir) if result_dir else None,
                              tokens_per_second, adapter=str(adapter_dir) if adapter_dir else None)
        # Extra keys land in FineTuneJob status.result.metrics.
        if "eval_rewards/accuracy" in evaluation:
            summary["rewardAccuracy"] = evaluation["eval_rewards/accuracy"]
            summary["rewardMargin"] = evaluation["eval_rewards/margin"]
        write_termination_log(summary)
        progress.close()
        metrics.close()
        exporter.close()
    if not stop.requested:
        write_loss_plot(output_dir)  # output_dir/loss.png; a plotting error is only a warning
    if stop.requested:
        raise SystemExit(SIGTERM_EXIT_CODE)
    return summary


class RewardTotals:
    """Sums over pairs -> the means a step or an evaluation reports (one device sync, at the end)."""

    def __init__(self) -> None:
        self.sums: Optional[torch.Tensor] = None
        self.pairs = 0

    def add(self, pairs: PreferenceLoss) -> None:
        chosen, rejected = pairs.chosen_rewards, pairs.rejected_rewards
        row = torch.stack([pairs.losses.detach().sum(), chosen.sum(), rejected.sum(), (chosen - rejected).sum(),
                           (chosen > rejected).float().sum()])
        self.sums = row if self.sums is None else self.sums + row
        self.pairs += pairs.losses.shape[0]

    def means(self) -> dict[str, float]:
        names = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy")
        values = (self.sums / max(1, self.pairs)).tolist()
        return dict(zip(names, values))


def model_folder(path: str, output_dir: Path) -> str:
    """The HF model folder model.path names. Besides a model folder or builtin://, a previous kubetune
    run's output folder: its final `model/` when it has one; else, when it holds only a LoRA
    `adapter/` (or is an adapter folder), that adapter merged into its base, written once to
    `output_dir/base/` (reused on resume) so the policy, the reference, checkpoints, the adapter's
    base_model_name_or_path and save_merged all refer to one model on disk."""
    if path.startswith("builtin://"):
        return path
    folder = Path(path).expanduser()
    if (folder / "config.json").is_file():
        return path
    if (folder / "model" / "config.json").is_file():
        return str(folder / "model")
    adapter = folder if (folder / "adapter_config.json").is_file() else folder / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        return path  # not a run folder: load_pretrained names what is missing
    merged = output_dir / "base"
    if not (merged / "config.json").is_file():
        base = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base:
            raise KubetuneError(f"model.path {path}: {adapter}/adapter_config.json names no base_model_name_or_path; "
                                "set model.path to the base model folder and merge the adapter first (kubetune merge)")
        log.info("model.path %s: merging the adapter %s into its base %s -> %s", path, adapter, base, merged)
        merge_to_dir(base, adapter, merged)
    return str(merged)
