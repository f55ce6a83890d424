"""What a training run says on the console (stderr) and in pod logs: INFO logging, a start summary
(model, data, global batch, planned steps, where it starts from) and an end summary (losses,
throughput, where the result is). Shared by the training recipes; progress.ProgressBar adds the
per-step lines (a bar on a terminal, plain `step N/T loss=...` lines elsewhere)."""
from __future__ import annotations

import logging
import sys
from typing import Any, Optional

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: int = logging.INFO) -> None:
    """kubetune's loggers at INFO on stderr, unless the application already configured logging
    (a root handler, e.g. pytest's or an embedding program's): then only the level is set."""
    logger = logging.getLogger("kubetune")
    if logger.level == logging.NOTSET:
        logger.setLevel(level)
    if not logging.getLogger().handlers and not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        logger.addHandler(handler)


def describe_plan(cfg: Any, total_steps: int, batches_per_epoch: int) -> str:
    """'planned 80 optimizer steps (max_steps; 7.3 epochs of 11 steps)' or '... (3 epochs of 11 steps)'."""
    per_epoch = max(1, batches_per_epoch // cfg.gradient_accumulation_steps)
    if cfg.max_steps:
        return f"planned {total_steps} optimizer steps (max_steps; {total_steps / per_epoch:.3g} epochs of {per_epoch} steps)"
    return f"planned {total_steps} optimizer steps ({cfg.epochs} epoch{'s' if cfg.epochs != 1 else ''} of {per_epoch} steps)"


def log_start(log: logging.Logger, cfg: Any, *, trainable: int, total: int, train_samples: int,
              eval_samples: Optional[int], world_size: int, total_steps: int, batches_per_epoch: int,
              resume_messages: list[str], step: int) -> None:
    log.info("model %s: %s parameters, %s trainable", cfg.model.path, f"{total:,}", f"{trainable:,}")
    log.info("data %s (%s): %d training samples, %s held out", cfg.dataset.source, cfg.dataset.format, train_samples,
             eval_samples if eval_samples is not None else "none")
    log.info("global batch %d (%d x %d accumulation x %d process%s)",
             cfg.batch_size * cfg.gradient_accumulation_steps * world_size, cfg.batch_size,
             cfg.gradient_accumulation_steps, world_size, "es" if world_size != 1 else "")
    log.info(describe_plan(cfg, total_steps, batches_per_epoch))
    for message in resume_messages:
        log.info(message + (f" at step {step}" if step else ""))


def log_end(log: logging.Logger, summary: dict[str, Any], output: Optional[str], stopped: bool = False) -> None:
    def number(value: Optional[float]) -> str:
        return f"{value:.4f}" if value is not None else "n/a"

    how = "stopped by SIGTERM after" if stopped else "done:"
    log.info("%s %d steps, final loss %s, eval loss %s, %.0f tokens/s; output %s", how, summary["steps"],
             number(summary.get("finalLoss")), number(summary.get("evalLoss")), summary.get("tokensPerSecond") or 0.0,
             output or "none")
