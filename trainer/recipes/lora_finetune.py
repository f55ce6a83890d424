"""LoRA / DoRA / QLoRA fine-tuning on one device, or on several under torchrun with FSDP2:
`kubetune run [--nproc-per-node G] lora_finetune --config tiny_lora`.

A copy of full_finetune.py with the LoRA changes, so it reads top to bottom on its own:
- the base model is loaded, optionally quantized to NF4 (`model.quantize_base: nf4`, QLoRA),
  then the `lora.target_modules` projections are wrapped; the base is frozen and only the
  adapter parameters reach the optimizer;
- checkpoints and the result are PEFT adapter folders (`adapter_config.json` +
  `adapter_model.safetensors`), `output_dir/adapter/` at the end; `save_merged: true` also
  writes the merged model (HF format) to `output_dir/model/`, merged from the base on disk
  (never from its NF4 copy);
- resuming reloads the base from `model.path` and the adapter and its optimizer state from the
  checkpoint's distcp/ shards (at any world size);
- under torchrun the model is sharded as in full_finetune.py (base and adapters alike), and the
  adapter is gathered to rank 0, which alone writes it and reports.

Guarantees (tested): the held-out loss falls on the synthetic task; the adapter loads in
peft.PeftModel; a run stopped and resumed ends with the same adapter as an uninterrupted one.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Optional

import torch

from kubetune.trainer.checkpoint import load_pretrained, resolve_local_dir
from kubetune.trainer.config.lora import LoRAFinetuneConfig
from kubetune.trainer.data.dataset import BatchLoader, build_datasets
from kubetune.trainer.device import resolve_dtype
from kubetune.trainer.distributed import (
    clip_grad_norm, close_distributed, full_state_dict, init_distributed, mixed_precision_dtypes, shard_model,
)
from kubetune.trainer.peft import apply_lora, save_adapter, trainable_parameters
from kubetune.trainer.peft.lora import is_adapter_key
from kubetune.trainer.peft.adapter import write_adapter_files
from kubetune.trainer.peft.merge import merge_to_dir
from kubetune.trainer.tokenizers import load_tokenizer
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

log = logging.getLogger("kubetune.lora_finetune")
SIGTERM_EXIT_CODE = 143  # 128 + SIGTERM: the pod was stopped, the job did not finish


def recipe_main(cfg: LoRAFinetuneConfig) -> dict[str, Any]:
    # ---- Where and how -------------------------------------------------------------------
    configure_logging()  # INFO on stderr: the start and end summaries, resume, early stopping
    world = init_distributed(cfg.device, cfg.distributed)  # one process: a World of size 1
    device = world.device
    dtype = resolve_dtype(cfg.dtype)
    seed_everything(cfg.seed)  # the same seed on every rank: the same adapter initialisation
    output_dir = Path(cfg.output_dir)
    checkpoints = CheckpointManager(output_dir, keep_last=cfg.keep_last_checkpoints)

    # ---- Tokenizer and data --------------------------------------------------------------
    tokenizer = load_tokenizer(cfg.tokenizer_path, cfg.tokenizer.chat_template)
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
    resume_state = load_training_state(resume_dir, world.rank) if resume_dir is not None else None

    # ---- Model: base (NF4 for QLoRA), adapters, then shard (FSDP2), then optimizer ------
    # The base always comes from model.path; a checkpoint holds only the adapter.
    model = load_pretrained(cfg.model.path, device=world.load_device, dtype=dtype)
    nf4_shards: Optional[int] = None  # QLoRA: the world size its NF4 base's layout was chosen for
    if cfg.model.quantize_base == "nf4":
        from kubetune.trainer.quant import nf4_layout_shards, quantize_base

        # Decoder projections -> NF4 (lm_head stays in dtype), in the layout the run started with:
        # resumed at another world size it trains on the same base (or is refused, naming why).
        nf4_shards = nf4_layout_shards(resume_state, world.size)
        quantize_base(model, shards=nf4_shards, world_size=world.size)
    apply_lora(model, cfg.lora)  # freezes every base parameter
    model.enable_activation_checkpointing(cfg.activation_checkpointing)
    if cfg.compile:
        for layer in model.model.layers:
            layer.compile()  # in place: parameter names (and checkpoints) stay the same
    shard_model(model, world, cfg.distributed, dtype)
    adapter_params = trainable_parameters(model)  # only these are optimized, clipped and saved
    optimizer = build_optimizer(
        ((n, p) for n, p in model.named_parameters() if p.requires_grad), cfg.optimizer, device
    )
    # On resume the schedule keeps the plan the run started with (lr_scheduler.on_resume).
    scheduler = build_lr_scheduler(optimizer, cfg.lr_scheduler, plan.run.schedule_steps)

    # ---- Resume: adapter, optimizer, schedule, data position and RNG where they were -------
    step = 0
    if resume_state is not None:
        load_sharded_training_state(resume_dir, model, optimizer)  # the trainable weights + AdamW state
        scheduler.load_state_dict(resume_state["lr_scheduler"])
        reapply_schedule(scheduler)  # the groups take this run's schedule (it may be replanned)
        train_loader.load_state_dict(resume_state["data"])
        load_rng_state(resume_state["rng"])
        step = resume_state["step"]

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
        log_start(log, cfg, trainable=sum(p.numel() for p in adapter_params),
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

    def gathered_adapter() -> dict[str, torch.Tensor]:  # every rank takes part; {} on ranks > 0
        return full_state_dict(model, world, keep=is_adapter_key)

    def write_adapter(folder: Path) -> None:
        state = gathered_adapter()
        if world.is_main:
            write_adapter_files(model, folder, cfg.model.path, state=state)

    def save_checkpoint() -> Path:
        training_state = {
            "step": step,
            "lr_scheduler": scheduler.state_dict(),
            "data": train_loader.state_dict(),
            "rng": rng_state(),
            "nf4_shards": nf4_shards,
        }
        folder = checkpoints.save(step, write_adapter, training_state, world=world,
                                  sharded_state=sharded_training_state(model, optimizer), rank_state={"rng": rng_state()})
        exporter.update(last_checkpoint_step=step)
        return folder

    last_loss: Optional[float] = None
    eval_loss: Optional[float] = None
    trained_tokens, train_seconds = 0, 0.0
    result_dir: Optional[Path] = resume_dir
    adapter_dir: Optional[Path] = None
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
                    grad_norm = clip_grad_norm(adapter_params, cfg.max_grad_norm)  # the global norm
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
                state = gathered_adapter()
                adapter_dir = result_dir = output_dir / "adapter"
                if cfg.save_merged:
                    result_dir = output_dir / "model"
                if world.is_main:
                    save_adapter(model, adapter_dir, base_model_name_or_path=cfg.model.path, state=state)
                    if cfg.save_merged:  # from the base on disk, in its dtype, on the CPU
                        merge_to_dir(cfg.model.path, adapter_dir, result_dir, tokenizer_dir=tokenizer_dir)
                world.barrier()
            finished = True
    finally:
        tokens_per_second = trained_tokens / train_seconds if train_seconds > 0 else 0.0
        summary = run_summary(last_loss, eval_loss, step, str(result_dir) if result_dir else None, tokens_per_second,
                              adapter=str(adapter_dir) if adapter_dir else None)
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

