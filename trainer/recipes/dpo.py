"""Preference alignment (DPO, IPO, SimPO), full or LoRA, on one device or on several under torchrun
with FSDP2: `kubetune run [--nproc-per-node G] dpo --config tiny_dpo`.

A copy of full_finetune.py / lora_finetune.py with the preference changes, so it reads top to bottom:
- data are preference pairs (`kubetune.trainer.data.preference`); a batch of B pairs is 2B rows,
  every chosen response then every rejected one, scored in one forward pass;
- the loss (`kubetune.trainer.training.preference_loss`) compares the policy's log-probabilities
  of the two responses with the reference model's: `loss: dpo` (sigmoid, `beta`,
  `label_smoothing`), `ipo`, or `simpo` (reference-free, length-normalised, `gamma`);
- the reference: with a `lora:` section it is the same base with the adapters switched off (no
  second copy in memory; QLoRA with `model.quantize_base: nf4`); without one (full DPO) it is a
  frozen copy of model.path, loaded once, in eval mode, and sharded like the policy. SimPO needs none;
- beside the loss, every logged step and every evaluation report rewards/chosen,
  rewards/rejected, rewards/margin and rewards/accuracy (metrics.jsonl, progress bar, Prometheus,
  the experiment trackers of `loggers:`);
- `early_stopping` watches the held-out DPO loss (eval_loss), as the other recipes watch theirs;
- `model.path` may also be a previous run's output folder (its `model/`, or its LoRA `adapter/`
  merged into that adapter's base once, into `output_dir/base/`), so a pipeline stage can align
  what the one before it trained.
Under torchrun each rank scores its slice of every global batch of pairs; the loss is the sum of
its pairs' losses divided by the pairs of the whole global step, and the gradients are summed
across ranks, so N processes make the update of one. Rank 0 alone reports and writes files.

Guarantees (tested): with the policy equal to the reference the first step's DPO loss is ln 2; on
the synthetic task the held-out reward accuracy passes 0.9 and greedy answers move to the chosen
ones; a run killed at any moment and resumed ends with the same weights and losses as an
uninterrupted one (CPU, fp32, same seed); SIGTERM saves a checkpoint and exits with 143; 2
processes give the losses and weights of 1 (fp32, 1e-5), full, LoRA and QLoRA (NF4 with the same
double-quantization groups); a checkpoint of 2 processes resumed with 1 (or of 1 with 2) continues
as the uninterrupted run at the new world size (QLoRA: on the NF4 base the run started with, or
refused before training when that base cannot be split over the new world size; docs/training.md
says what differs past an epoch boundary).
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
from kubetune.trainer.device import resolve_dtype
from kubetune.trainer.distributed import (
    World, clip_grad_norm, close_distributed, full_state_dict, init_distributed, mixed_precision_dtypes, shard_model,
)
from kubetune.trainer.peft import adapters_disabled, apply_lora, save_adapter, trainable_parameters
from kubetune.trainer.peft.adapter import write_adapter_files
from kubetune.trainer.peft.lora import is_adapter_key
from kubetune.trainer.peft.merge import merge_to_dir
from kubetune.trainer.tokenizers import check_vocab_matches, load_tokenizer
from kubetune.trainer.training.checkpointing import (
    CheckpointManager, load_sharded_training_state, load_training_state, sharded_training_state,
)
from kubetune.trainer.training.early_stopping import EarlyStopping
from kubetune.trainer.training.metrics import PREFERENCE_GAUGES, MetricsLog, PrometheusExporter, peak_memory_bytes
from kubetune.trainer.training.optim import build_lr_scheduler, build_optimizer, reapply_schedule
from kubetune.trainer.training.plots import write_loss_plot
from kubetune.trainer.training.preference_loss import REFERENCE_FREE, PreferenceLoss, preference_loss, sequence_logps
from kubetune.trainer.training.progress import ProgressBar
from kubetune.trainer.training.report import configure_logging, log_end, log_start
from kubetune.trainer.training.resume import plan_resume, start_run
from kubetune.trainer.training.rng import load_rng_state, rng_state, seed_everything
from kubetune.trainer.training.signals import GracefulStop
from kubetune.trainer.training.steps import bf16_autocast, planned_steps, real_tokens
from kubetune.trainer.training.summary import run_summary, write_termination_log
from kubetune.trainer.training.trackers import open_trackers

log = logging.getLogger("kubetune.dpo")
SIGTERM_EXIT_CODE = 143  # 128 + SIGTERM: the pod was stopped, the job did not finish


def recipe_main(cfg: DPOConfig) -> dict[str, Any]:
    # ---- Where and how -------------------------------------------------------------------
    configure_logging()  # INFO on stderr: the start and end summaries, resume, early stopping
    world = init_distributed(cfg.device, cfg.distributed)  # one process: a World of size 1
    device = world.device
    dtype = resolve_dtype(cfg.dtype)
    seed_everything(cfg.seed)  # the same seed on every rank: the same adapter initialisation
    output_dir = Path(cfg.output_dir)
    checkpoints = CheckpointManager(output_dir, keep_last=cfg.keep_last_checkpoints)
    use_lora = cfg.lora is not None
    nf4_shards: Optional[int] = None  # QLoRA: the world size its NF4 base's layout was chosen for
    needs_reference = cfg.loss not in REFERENCE_FREE
    # A previous run's output folder -> its model (rank 0 merges an adapter once; the others wait).
    model_path = world.broadcast_object(model_folder(cfg.model.path, output_dir) if world.is_main else None)
    tokenizer_path = cfg.tokenizer.path or model_path

    # ---- Tokenizer and preference pairs --------------------------------------------------
    tokenizer = load_tokenizer(tokenizer_path, cfg.tokenizer.chat_template)
    check_vocab_matches(tokenizer, load_model_args(model_path).vocab_size, model_path)  # before any work
    splits = build_datasets(cfg.dataset, tokenizer, cfg.max_seq_len, cfg.seed)
    ranks = {"rank": world.rank, "world_size": world.size}  # each rank takes its slice of every global batch
    train_loader = BatchLoader(splits.train, cfg.batch_size, splits.pad_id, shuffle=cfg.dataset.shuffle, seed=cfg.seed, **ranks)
    eval_loader = BatchLoader(splits.eval, cfg.batch_size, splits.pad_id, shuffle=False, **ranks) if splits.eval else None
    total_steps = planned_steps(cfg, train_loader.batches_per_epoch)  # max_steps, else epochs

    # ---- Which run: continue the one in output_dir, or start fresh (resume.py) --------
    # Refused before any work when output_dir holds a run with other settings (loss, beta, lora,
    # data, ...), or a fresh run would land on another run's files; rank 0 decides for all.
    plan = world.main_decides(lambda: plan_resume(cfg, checkpoints, total_steps, world.size))
    checkpoints.run = plan.run
    resume_dir = plan.checkpoint
    resume_state = load_training_state(resume_dir, world.rank) if resume_dir is not None else None

    # ---- Policy and reference, then shard (FSDP2 under torchrun), then optimizer ---------
    # The policy always starts from model.path; on resume its trainable weights (every one, or
    # the adapters) and AdamW state come from the checkpoint's distcp/ shards, at any world size.
    model = load_pretrained(model_path, device=world.load_device, dtype=dtype)
    if use_lora:
        if cfg.model.quantize_base == "nf4":
            from kubetune.trainer.quant import nf4_layout_shards, quantize_base

            # Decoder projections -> NF4 (lm_head stays in dtype), in the layout the run started with:
            # resumed at another world size it trains on the same base (or is refused, naming why).
            nf4_shards = nf4_layout_shards(resume_state, world.size)
            quantize_base(model, shards=nf4_shards, world_size=world.size)
        apply_lora(model, cfg.lora)  # freezes every base parameter; the reference = adapters off
    model.enable_activation_checkpointing(cfg.activation_checkpointing)
    if cfg.compile:
        for layer in model.model.layers:
            layer.compile()  # in place: parameter names (and checkpoints) stay the same
    shard_model(model, world, cfg.distributed, dtype)
    reference: Optional[torch.nn.Module] = None
    if not use_lora and needs_reference:
        # Full DPO: a frozen copy of model.path, loaded once the policy is sharded (under torchrun a
        # rank never holds two whole models) and sharded like it.
        reference = load_pretrained(model_path, device=world.load_device, dtype=dtype).eval().requires_grad_(False)
        shard_model(reference, world, cfg.distributed, dtype)
    trained = trainable_parameters(model)  # LoRA: the adapters; full: every parameter
    optimizer = build_optimizer(((n, p) for n, p in model.named_parameters() if p.requires_grad), cfg.optimizer, device)
    # On resume the schedule keeps the plan the run started with (lr_scheduler.on_resume).
    scheduler = build_lr_scheduler(optimizer, cfg.lr_scheduler, plan.run.schedule_steps)

    # ---- Resume: weights, optimizer, schedule, data position and RNG where they were -------
    step = 0
    if resume_state is not None:
        load_sharded_training_state(resume_dir, model, optimizer)
        scheduler.load_state_dict(resume_state["lr_scheduler"])
        reapply_schedule(scheduler)  # the groups take this run's schedule (it may be replanned)
        train_loader.load_state_dict(resume_state["data"])
        load_rng_state(resume_state["rng"])
        step = resume_state["step"]

    # ---- Reporting: metrics.jsonl, Prometheus, progress bar, trackers ----------------------
    # Only rank 0 reports (the operator scrapes rank 0); the other ranks log with a rank prefix.
    if world.is_main:
        start_run(plan, output_dir)  # run.json (overwrite_output_dir: the old run's files go first)
    trackers = open_trackers(cfg, output_dir, world.rank)  # loggers: tensorboard, mlflow, wandb
    metrics = MetricsLog(output_dir / "metrics.jsonl", resume_step=step, enabled=world.is_main, fresh=plan.fresh,
                         trackers=trackers)
    exporter = PrometheusExporter(cfg.metrics_port if world.is_main else None, extra_gauges=PREFERENCE_GAUGES)
    exporter.update(step=step, total_steps=total_steps, epoch=train_loader.epoch,
                    last_checkpoint_step=step if resume_dir else None)
    progress = ProgressBar(total_steps, initial=step, enabled=cfg.progress_bar, text_every=cfg.log_every_steps,
                           silent=not world.is_main)
    if world.is_main:
        log_start(log, cfg, trainable=sum(p.numel() for p in trained), total=sum(p.numel() for p in model.parameters()),
                  train_samples=len(splits.train), eval_samples=len(splits.eval) if splits.eval else None,
                  world_size=world.size, total_steps=total_steps, batches_per_epoch=train_loader.batches_per_epoch,
                  resume_messages=plan.messages, step=step)
        for message in plan.schedule_messages(total_steps, cfg.lr_scheduler.on_resume):
            log.info(message)
    # Under FSDP2 on CUDA the mixed-precision policy computes in bf16; autocast is for one process.
    fsdp_bf16 = mixed_precision_dtypes(world, dtype, cfg.distributed)[0] is not None and world.distributed
    autocast = bf16_autocast(device, dtype, cfg.bf16_autocast and not fsdp_bf16)
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
                    if world.distributed:
                        reference.reshard()  # no backward frees its root's gathered weights: do it here
        policy_logps, tokens = sequence_logps(model, batch)
        chosen_ref, rejected_ref = reference_logps.chunk(2) if reference_logps is not None else (None, None)
        return preference_loss(cfg.loss, *policy_logps.chunk(2), chosen_ref, rejected_ref, *tokens.chunk(2),
                               beta=cfg.beta, label_smoothing=cfg.label_smoothing, gamma=cfg.gamma)

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        """The held-out loss and rewards, over every rank's slice of each eval batch (same on all ranks)."""
        model.eval()
        totals = RewardTotals()
        for batch in eval_loader.epoch_batches(cfg.eval_max_batches):
            batch = {key: value.to(device) for key, value in batch.items()}
            with autocast:
                totals.add(pair_losses(batch))
        model.train()
        return {f"eval_{key}": value for key, value in totals.means(world).items()}

    def write_model(folder: Path) -> None:  # every rank gathers, rank 0 writes
        state = full_state_dict(model, world, keep=is_adapter_key if use_lora else None)
        if world.is_main:
            if use_lora:
                write_adapter_files(model, folder, model_path, state=state)
            else:
                write_model_dir(model, folder, tokenizer_dir, state=state)

    def save_checkpoint() -> Path:
        training_state = {
            "step": step,
            "lr_scheduler": scheduler.state_dict(),
            "data": train_loader.state_dict(),
            "rng": rng_state(),
            "nf4_shards": nf4_shards,
        }
        folder = checkpoints.save(step, write_model, training_state, world=world,
                                  sharded_state=sharded_training_state(model, optimizer), rank_state={"rng": rng_state()})
        exporter.update(last_checkpoint_step=step)
        return folder

    def run_eval() -> dict[str, float]:
        evaluation = evaluate()
        metrics.write({"step": step, **evaluation})
        return evaluation

    last_loss: Optional[float] = None
    evaluation: dict[str, float] = {}
    trained_tokens, train_seconds = 0, 0.0
    result_dir: Optional[Path] = resume_dir
    adapter_dir: Optional[Path] = None
    stop = GracefulStop(enabled=cfg.checkpoint_on_sigterm)
    stopping = False  # a SIGTERM seen by any rank, agreed on by all at the end of a step
    # Early stopping watches the held-out DPO (IPO, SimPO) loss, eval_loss.
    early = EarlyStopping(cfg.early_stopping.patience, cfg.early_stopping.min_delta) if cfg.early_stopping else None
    best_dir: Optional[Path] = None  # early stopping: the best checkpoint, kept through pruning
    finished = False
    try:
        with stop:
            if eval_loader is not None and step == 0:
                evaluation = run_eval()

            # ---- The training loop: one optimizer step per iteration -----------------------
            while step < total_steps and not stopping:
                started = time.perf_counter()
                model.train()
                micro_batches = [train_loader.next_batch() for _ in range(cfg.gradient_accumulation_steps)]
                # The loss is the mean over every pair of the whole global step, however it is
                # split into ranks and micro-batches.
                step_pairs = max(1, world.sum_int(sum(b["input_ids"].shape[0] // 2 for b in micro_batches)))
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
                    grad_norm = clip_grad_norm(trained, cfg.max_grad_norm)  # the global norm
                lr = scheduler.get_last_lr()[0]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1

                rewards = totals.means(world)  # over every rank's pairs; syncs with the device once per step
                last_loss = rewards.pop("loss")
                input_tokens = world.sum_int(input_tokens)  # tokens/s of the whole run, not of one rank
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
                    evaluation = run_eval()
                    progress.write(f"step {step}: eval loss {evaluation['eval_loss']:.4f}, "
                                   f"reward accuracy {evaluation['eval_rewards/accuracy']:.3f}, "
                                   f"margin {evaluation['eval_rewards/margin']:.3f}")
                    if early is not None and early.update(step, evaluation["eval_loss"]):
                        best_dir = result_dir = save_checkpoint()  # each new best is checkpointed...
                        checkpoints.protected = {step}  # ...and kept whatever keep_last_checkpoints says
                if cfg.save_every_steps and step % cfg.save_every_steps == 0 and step < total_steps and result_dir != (
                        checkpoints.dir / f"step_{step}"):
                    result_dir = save_checkpoint()
                stopping = world.any(stop.requested)
                if early is not None and early.should_stop:
                    log.info("early stopping at step %d: eval loss did not improve by %g for %d evals; best eval loss "
                             "%.4f at step %d (checkpoint %s)", step, early.min_delta, early.patience, early.best_loss,
                             early.best_step, best_dir)
                    break

            # ---- The end: a checkpoint on SIGTERM, else the final model or adapter --------
            if stopping:
                result_dir = save_checkpoint() if step > 0 else result_dir
                progress.write(f"SIGTERM: saved a checkpoint at step {step}; resume with resume: auto")
                log.info("SIGTERM: saved a checkpoint at step %d (%s); run again with resume: auto to continue", step,
                         result_dir)
            else:
                if eval_loader is not None and not (cfg.eval_every_steps and step % cfg.eval_every_steps == 0):
                    evaluation = run_eval()
                result_dir = save_checkpoint() if cfg.save_every_steps else result_dir
                state = full_state_dict(model, world, keep=is_adapter_key if use_lora else None)  # {} on ranks > 0
                if use_lora:
                    adapter_dir = result_dir = output_dir / "adapter"
                    if cfg.save_merged:
                        result_dir = output_dir / "model"
                    if world.is_main:
                        save_adapter(model, adapter_dir, base_model_name_or_path=model_path, state=state)
                        if cfg.save_merged:  # from the base on disk, in its dtype, on the CPU
                            merge_to_dir(model_path, adapter_dir, result_dir, tokenizer_dir=tokenizer_dir)
                else:
                    result_dir = output_dir / "model"
                    if world.is_main:
                        save_pretrained(model, result_dir, tokenizer_dir=tokenizer_dir, state=state)
                del state
                world.barrier()
            finished = True
    finally:
        tokens_per_second = trained_tokens / train_seconds if train_seconds > 0 else 0.0
        summary = run_summary(last_loss, evaluation.get("eval_loss"), step, str(result_dir) if result_dir else None,
                              tokens_per_second, adapter=str(adapter_dir) if adapter_dir else None)
        # Extra keys land in FineTuneJob status.result.metrics.
        if "eval_rewards/accuracy" in evaluation:
            summary["rewardAccuracy"] = evaluation["eval_rewards/accuracy"]
            summary["rewardMargin"] = evaluation["eval_rewards/margin"]
        if world.is_main:
            write_termination_log(summary)
            if finished or stopping:
                log_end(log, summary, summary["adapter"] or summary["checkpoint"], stopped=stopping)
                if early is not None and early.best_step is not None:
                    log.info("best eval loss %.4f at step %d: %s", early.best_loss, early.best_step, best_dir)
        best = {"bestEvalLoss": early.best_loss, "bestStep": early.best_step,
                "bestCheckpoint": str(best_dir) if best_dir else None} if early is not None else {}
        trackers.summary({**summary, **best})
        trackers.close(failed=not (finished or stopping))
        progress.close()
        metrics.close()
        exporter.close()
    close_distributed()
    if world.is_main and finished:
        write_loss_plot(output_dir)  # output_dir/loss.png; a plotting error is only a warning
    if stopping:
        raise SystemExit(SIGTERM_EXIT_CODE)
    return summary


class RewardTotals:
    """Sums over pairs -> the means a step or an evaluation reports (one device sync, at the end)."""

    def __init__(self) -> None:
        self.sums: Optional[torch.Tensor] = None

    def add(self, pairs: PreferenceLoss) -> None:
        chosen, rejected = pairs.chosen_rewards, pairs.rejected_rewards
        row = torch.stack([pairs.losses.detach().sum(), chosen.sum(), rejected.sum(), (chosen - rejected).sum(),
                           (chosen > rejected).float().sum(), torch.tensor(float(chosen.shape[0]), device=chosen.device)])
        self.sums = row if self.sums is None else self.sums + row

    def means(self, world: World = World()) -> dict[str, float]:
        """Means over the pairs of every rank (under torchrun the sums are all-reduced first)."""
        *sums, pairs = world.sum_tensor(self.sums).tolist()
        names = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy")
        return {name: value / max(1.0, pairs) for name, value in zip(names, sums)}


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
