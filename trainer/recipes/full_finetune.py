"""Full-parameter fine-tuning on one device, or on several under torchrun with FSDP2:
`kubetune run [--nproc-per-node G] full_finetune --config tiny_full`.

Read it top to bottom: set-up, resume, the training loop, the end. Every parameter trains.
The order of set-up is model, then shard (FSDP2 on each decoder layer and the root; nothing with
one process), then the optimizer over the (sharded) parameters. Each rank trains on its slice of
every global batch; the loss is divided by the label tokens of the whole global step and the
gradients are summed across ranks, so N processes make the same update as one. Rank 0 alone
serves metrics, writes metrics.jsonl, the progress bar, the final model and the termination log.

Guarantees (tested): the held-out loss falls on the synthetic task; the saved model loads in
transformers; a run killed at any moment and resumed from its newest checkpoint ends with the
same weights and loss curve as an uninterrupted one (CPU, fp32, same seed); SIGTERM saves a
checkpoint and exits with 143; 2 processes give the losses and weights of 1 (fp32, 1e-5), and
resume at another world size continues the same run.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Optional

import torch

from kubetune.trainer.checkpoint import load_model_args, load_pretrained, resolve_local_dir
from kubetune.trainer.checkpoint.hf import save_pretrained, write_model_dir
from kubetune.trainer.config.finetune import FullFinetuneConfig
from kubetune.trainer.data.dataset import BatchLoader, build_datasets
from kubetune.trainer.device import resolve_dtype
from kubetune.trainer.distributed import (
    clip_grad_norm, close_distributed, full_state_dict, init_distributed, mixed_precision_dtypes, shard_model,
)
from kubetune.trainer.tokenizers import check_vocab_matches, load_tokenizer
from kubetune.trainer.training.checkpointing import (
    CheckpointManager, load_sharded_training_state, load_training_state, sharded_training_state,
)
from kubetune.trainer.training.loss import count_label_tokens
from kubetune.trainer.training.metrics import MetricsLog, PrometheusExporter, peak_memory_bytes
from kubetune.trainer.training.optim import build_lr_scheduler, build_optimizer, reapply_schedule
from kubetune.trainer.training.progress import ProgressBar
from kubetune.trainer.training.rng import load_rng_state, rng_state, seed_everything
from kubetune.trainer.training.signals import GracefulStop
from kubetune.trainer.training.steps import batch_loss_sum, bf16_autocast, evaluate, planned_steps, real_tokens
from kubetune.trainer.training.summary import run_summary, write_termination_log
from kubetune.trainer.training.early_stopping import EarlyStopping
from kubetune.trainer.training.plots import write_loss_plot
from kubetune.trainer.training.report import configure_logging, log_end, log_start
from kubetune.trainer.training.resume import plan_resume, start_run
from kubetune.trainer.training.trackers import open_trackers

log = logging.getLogger("kubetune.full_finetune")
SIGTERM_EXIT_CODE = 143  # 128 + SIGTERM: the pod was stopped, the job did not finish


def recipe_main(cfg: FullFinetuneConfig) -> dict[str, Any]:
    # ---- Where and how -------------------------------------------------------------------
    configure_logging()  # INFO on stderr: the start and end summaries, resume, early stopping
    world = init_distributed(cfg.device, cfg.distributed)  # one process: a World of size 1
    device = world.device
    dtype = resolve_dtype(cfg.dtype)
    seed_everything(cfg.seed)
    output_dir = Path(cfg.output_dir)
    checkpoints = CheckpointManager(output_dir, keep_last=cfg.keep_last_checkpoints)

    # ---- Tokenizer and data --------------------------------------------------------------
    tokenizer = load_tokenizer(cfg.tokenizer_path, cfg.tokenizer.chat_template)
    check_vocab_matches(tokenizer, load_model_args(cfg.model.path).vocab_size, cfg.model.path)  # before any work
    splits = build_datasets(cfg.dataset, tokenizer, cfg.max_seq_len, cfg.seed)
    ranks = {"rank": world.rank, "world_size": world.size}  # each rank takes its slice of every global batch
    train_loader = BatchLoader(splits.train, cfg.batch_size, splits.pad_id, shuffle=cfg.dataset.shuffle, seed=cfg.seed, **ranks)
    eval_loader = BatchLoader(splits.eval, cfg.batch_size, splits.pad_id, shuffle=False, **ranks) if splits.eval else None
    total_steps = planned_steps(cfg, train_loader.batches_per_epoch)  # max_steps, else epochs

    # ---- Which run: continue the one in output_dir, or start fresh (resume.py) --------
    # Refused before any work when output_dir holds a run with other settings, or a fresh run
    # would land on another run's files; rank 0 decides for all.
    plan = world.main_decides(lambda: plan_resume(cfg, checkpoints, total_steps, world.size))
    checkpoints.run = plan.run
    resume_dir = plan.checkpoint

    # ---- Model, then shard (FSDP2 under torchrun), then optimizer and schedule -----------
    # Every rank loads the whole model on the CPU (under torchrun) and keeps only its shards.
    model = load_pretrained(cfg.model.path, device=world.load_device, dtype=dtype)
    model.enable_activation_checkpointing(cfg.activation_checkpointing)
    if cfg.compile:
        for layer in model.model.layers:
            layer.compile()  # in place: parameter names (and checkpoints) stay the same
    shard_model(model, world, cfg.distributed, dtype)
    optimizer = build_optimizer(model.named_parameters(), cfg.optimizer, device)
    # On resume the schedule keeps the plan the run started with (lr_scheduler.on_resume).
    scheduler = build_lr_scheduler(optimizer, cfg.lr_scheduler, plan.run.schedule_steps)

    # ---- Resume: weights, optimizer, schedule, data position and RNG where they were -------
    # The weights and AdamW state come from the checkpoint's distcp/ shards, at any world size.
    step = 0
    if resume_dir is not None:
        load_sharded_training_state(resume_dir, model, optimizer)
        state = load_training_state(resume_dir, world.rank)
        scheduler.load_state_dict(state["lr_scheduler"])
        reapply_schedule(scheduler)  # the groups take this run's schedule (it may be replanned)
        train_loader.load_state_dict(state["data"])
        load_rng_state(state["rng"])
        step = state["step"]

    # ---- Reporting: metrics.jsonl, Prometheus, progress bar --------------------------------
    # Only rank 0 reports (the operator scrapes rank 0); the other ranks log with a rank prefix.
    if world.is_main:
        start_run(plan, output_dir)  # run.json (overwrite_output_dir: the old run's files go first)
    trackers = open_trackers(cfg, output_dir, world.rank)  # loggers: tensorboard, mlflow, wandb
    metrics = MetricsLog(output_dir / "metrics.jsonl", resume_step=step, enabled=world.is_main, fresh=plan.fresh,
                         trackers=trackers)
    exporter = PrometheusExporter(cfg.metrics_port if world.is_main else None)
    exporter.update(step=step, total_steps=total_steps, epoch=train_loader.epoch,
                    last_checkpoint_step=step if resume_dir else None)
    progress = ProgressBar(total_steps, initial=step, enabled=cfg.progress_bar, text_every=cfg.log_every_steps,
                           silent=not world.is_main)
    if world.is_main:
        log_start(log, cfg, trainable=sum(p.numel() for p in model.parameters()),
                  total=sum(p.numel() for p in model.parameters()), train_samples=len(splits.train),
                  eval_samples=len(splits.eval) if splits.eval else None, world_size=world.size,
                  total_steps=total_steps, batches_per_epoch=train_loader.batches_per_epoch,
                  resume_messages=plan.messages, step=step)
        for message in plan.schedule_messages(total_steps, cfg.lr_scheduler.on_resume):
            log.info(message)
    # Under FSDP2 on CUDA the mixed-precision policy computes in bf16; autocast is for one process.
    fsdp_bf16 = mixed_precision_dtypes(world, dtype, cfg.distributed)[0] is not None and world.distributed
    autocast = bf16_autocast(device, dtype, cfg.bf16_autocast and not fsdp_bf16)
    tokenizer_dir = resolve_local_dir(cfg.tokenizer_path)  # copied next to every saved model

    def write_model(folder: Path) -> None:  # every rank gathers, rank 0 writes
        state = full_state_dict(model, world)
        if world.is_main:
            write_model_dir(model, folder, tokenizer_dir, state=state)

    def save_checkpoint() -> Path:
        training_state = {
            "step": step,
            "lr_scheduler": scheduler.state_dict(),
            "data": train_loader.state_dict(),
            "rng": rng_state(),
        }
        folder = checkpoints.save(step, write_model, training_state, world=world,
                                  sharded_state=sharded_training_state(model, optimizer), rank_state={"rng": rng_state()})
        exporter.update(last_checkpoint_step=step)
        return folder

    last_loss: Optional[float] = None
    eval_loss: Optional[float] = None
    trained_tokens, train_seconds = 0, 0.0
    result_dir: Optional[Path] = resume_dir
    stop = GracefulStop(enabled=cfg.checkpoint_on_sigterm)
    stopping = False  # a SIGTERM seen by any rank, agreed on by all at the end of a step
    early = EarlyStopping(cfg.early_stopping.patience, cfg.early_stopping.min_delta) if cfg.early_stopping else None
    best_dir: Optional[Path] = None  # early stopping: the best checkpoint, kept through pruning
    finished = False
    try:
        with stop:
            if eval_loader is not None and step == 0:
                eval_loss = evaluate(model, eval_loader, device, autocast, cfg.eval_max_batches)
                metrics.write({"step": 0, "eval_loss": eval_loss})

            # ---- The training loop: one optimizer step per iteration -----------------------
            while step < total_steps and not stopping:
                started = time.perf_counter()
                model.train()
                micro_batches = [train_loader.next_batch() for _ in range(cfg.gradient_accumulation_steps)]
                # The loss is averaged over every target token of the whole global step, however
                # the step is split into ranks and micro-batches (and however much padding they carry).
                step_tokens = max(1, world.sum_int(sum(count_label_tokens(b["labels"]) for b in micro_batches)))
                step_loss = torch.zeros((), device=device)
                input_tokens = 0
                for batch in micro_batches:
                    batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
                    with autocast:
                        loss = batch_loss_sum(model, batch) / step_tokens
                    loss.backward()
                    step_loss += loss.detach()
                    input_tokens += real_tokens(batch)
                    del loss
                grad_norm = None
                if cfg.max_grad_norm is not None:
                    grad_norm = clip_grad_norm(model.parameters(), cfg.max_grad_norm)  # the global norm
                lr = scheduler.get_last_lr()[0]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1

                last_loss = float(world.sum_tensor(step_loss))  # syncs with the device once per step
                input_tokens = world.sum_int(input_tokens)  # tokens/s of the whole run, not of one rank
                elapsed = time.perf_counter() - started
                trained_tokens += input_tokens
                train_seconds += elapsed
                tokens_per_second = input_tokens / elapsed if elapsed > 0 else 0.0
                exporter.update(step=step, epoch=train_loader.epoch, loss=last_loss, learning_rate=lr,
                                tokens_per_second=tokens_per_second, peak_memory_bytes=peak_memory_bytes(device.type))
                progress.update(step, loss=last_loss, lr=lr)
                if step % cfg.log_every_steps == 0 or step == total_steps:
                    metrics.write({
                        "step": step, "epoch": train_loader.epoch, "loss": last_loss, "lr": lr,
                        "grad_norm": None if grad_norm is None else float(grad_norm),
                        "tokens": input_tokens, "tokens_per_second": round(tokens_per_second, 2),
                    })
                if eval_loader is not None and cfg.eval_every_steps and step % cfg.eval_every_steps == 0:
                    eval_loss = evaluate(model, eval_loader, device, autocast, cfg.eval_max_batches)
                    metrics.write({"step": step, "eval_loss": eval_loss})
                    progress.write(f"step {step}: eval loss {eval_loss:.4f}")
                    if early is not None and early.update(step, eval_loss):
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

            # ---- The end: a checkpoint on SIGTERM, else the final model -------------------
            if stopping:
                result_dir = save_checkpoint() if step > 0 else result_dir
                progress.write(f"SIGTERM: saved a checkpoint at step {step}; resume with resume: auto")
                log.info("SIGTERM: saved a checkpoint at step %d (%s); run again with resume: auto to continue", step,
                         result_dir)
            else:
                if eval_loader is not None and not (cfg.eval_every_steps and step % cfg.eval_every_steps == 0):
                    eval_loss = evaluate(model, eval_loader, device, autocast, cfg.eval_max_batches)
                    metrics.write({"step": step, "eval_loss": eval_loss})
                result_dir = save_checkpoint() if cfg.save_every_steps else result_dir
                state = full_state_dict(model, world)  # gathered tensor by tensor; {} on ranks > 0
                result_dir = output_dir / "model"
                if world.is_main:
                    save_pretrained(model, result_dir, tokenizer_dir=tokenizer_dir, state=state)
                del state
                world.barrier()
            finished = True
    finally:
        tokens_per_second = trained_tokens / train_seconds if train_seconds > 0 else 0.0
        summary = run_summary(last_loss, eval_loss, step, str(result_dir) if result_dir else None, tokens_per_second)
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

