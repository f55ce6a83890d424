"""What a run reports while it trains: Prometheus gauges (the names the operator scrapes, see
docs/architecture.md "Trainer run contract") and `metrics.jsonl` in output_dir."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from prometheus_client import CollectorRegistry, Gauge, start_http_server

GAUGES = {
    "step": ("kubetune_train_step", "Optimizer steps completed"),
    "total_steps": ("kubetune_train_total_steps", "Optimizer steps this run will take"),
    "epoch": ("kubetune_train_epoch", "Current epoch (0-based)"),
    "loss": ("kubetune_train_loss", "Training loss of the last logged step"),
    "learning_rate": ("kubetune_train_learning_rate", "Learning rate of the last step"),
    "tokens_per_second": ("kubetune_train_tokens_per_second", "Training tokens per second (recent steps)"),
    "peak_memory_bytes": ("kubetune_train_peak_memory_bytes", "Peak accelerator memory, or peak RSS on CPU"),
    "last_checkpoint_step": ("kubetune_train_last_checkpoint_step", "Step of the newest complete checkpoint"),
}
# The dpo recipe serves these too: the rewards of the last step (see training/preference_loss.py).
PREFERENCE_GAUGES = {
    "rewards_chosen": ("kubetune_train_rewards_chosen", "DPO: mean reward of the chosen responses"),
    "rewards_rejected": ("kubetune_train_rewards_rejected", "DPO: mean reward of the rejected responses"),
    "reward_margin": ("kubetune_train_reward_margin", "DPO: mean reward margin, chosen minus rejected"),
    "reward_accuracy": ("kubetune_train_reward_accuracy", "DPO: share of pairs whose chosen reward is higher"),
}


class PrometheusExporter:
    """Gauges on their own registry (several runs in one process do not collide), served on
    `port` when given; port 0 picks a free port (see `.port`)."""

    def __init__(self, port: Optional[int], extra_gauges: Optional[dict[str, tuple[str, str]]] = None):
        self.registry = CollectorRegistry()
        gauges = {**GAUGES, **(extra_gauges or {})}
        self.gauges = {key: Gauge(name, doc, registry=self.registry) for key, (name, doc) in gauges.items()}
        self._server = None
        self.port: Optional[int] = None
        if port is not None:
            self._server, _ = start_http_server(port, registry=self.registry)
            self.port = self._server.server_port

    def update(self, **values: Optional[float]) -> None:
        for key, value in values.items():
            if value is not None:
                self.gauges[key].set(value)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


# metrics.jsonl keys -> the names experiment trackers see
TRACKED = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
           "tokens_per_second": "train/tokens_per_second", "eval_loss": "eval/loss"}
# The dpo recipe's rewards: rewards/chosen -> train/rewards/chosen, eval_rewards/... -> eval/rewards/...
TRACKED.update({f"{prefix}rewards/{name}": f"{section}/rewards/{name}"
                for prefix, section in (("", "train"), ("eval_", "eval"))
                for name in ("chosen", "rejected", "margin", "accuracy")})


class MetricsLog:
    """`metrics.jsonl`: one JSON object per logged step or eval, appended and flushed.

    On resume, lines past the resumed step are dropped first (they were logged after the
    checkpoint the run restarts from), so the file tells one consistent story."""

    def __init__(self, path: Path, resume_step: int = 0, enabled: bool = True, fresh: bool = False, trackers: Any = None):
        """enabled=False (ranks other than 0 under torchrun): writes nothing, touches no file.
        fresh=True (a new run): the file starts empty. `trackers` (trackers.Trackers) get every
        record too, as train/loss, train/lr, train/grad_norm, train/tokens_per_second, eval/loss (and
        the dpo recipe's train/rewards/* and eval/rewards/*)."""
        self.path = path
        self._file = None
        self.trackers = trackers
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._truncate_after(-1 if fresh else resume_step)
            self._file = path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record, sort_keys=True) + "\n")
            self._file.flush()
        if self.trackers is not None:
            self.trackers.log({TRACKED[k]: v for k, v in record.items() if k in TRACKED}, int(record.get("step", 0)))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, self.path)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def peak_memory_bytes(device_type: str) -> int:
    """Peak CUDA memory allocated, or the process's peak resident set size on the CPU."""
    if device_type == "cuda":
        import torch

        return int(torch.cuda.max_memory_allocated())
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB
