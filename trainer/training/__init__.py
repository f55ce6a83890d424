"""Pieces every training recipe shares: optimizer and schedule, loss, metrics (Prometheus +
metrics.jsonl), progress bar, SIGTERM handling, checkpoints with exact resume, run summary."""
