"""Experiment tracking: `loggers: [tensorboard, mlflow, wandb]` in a training config.

Each tracker is the library's own writer, so its usual tools read the result:
- tensorboard: event files in `output_dir/tensorboard` (torch.utils.tensorboard.SummaryWriter);
- mlflow: a run in `$MLFLOW_TRACKING_URI`, else the local folder store `output_dir/mlruns` (MLflow
  3 keeps that store behind MLFLOW_ALLOW_FILE_STORE, which we then set); experiment
  `$MLFLOW_EXPERIMENT_NAME` or "kubetune";
- wandb: `wandb.init` with its usual environment (`WANDB_API_KEY`, `WANDB_PROJECT` (default
  "kubetune"), `WANDB_MODE=offline` writes the run under `output_dir/wandb` without a network).

They get the resolved config once, every logged training step and eval, and the run summary at
the end. Only rank 0 tracks. The libraries are optional (`pip install 'kubetune[tracking]'`);
a missing one is an error before training starts, naming the package. Recipes use
`open_trackers(cfg, output_dir, rank)` and the returned object's `log`, `summary` and `close`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Optional

from kubetune.errors import KubetuneError

TRACKERS = ("tensorboard", "mlflow", "wandb")
PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow-skinny (or mlflow)", "wandb": "wandb"}


class TrackerError(KubetuneError):
    """A tracker that cannot start (its library is missing, or it refused the run)."""


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optimizer": {"lr": 1e-4}} -> {"optimizer.lr": 1e-4} (lists as JSON), for parameter tables."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            flat[name] = json.dumps(list(value))
        else:
            flat[name] = value
    return flat


class _TensorBoard:
    def __init__(self, output_dir: Path, config: dict[str, Any], run_name: str):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise _missing("tensorboard") from None
        self.writer = SummaryWriter(log_dir=str(output_dir / "tensorboard"))
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```", 0)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def summary(self, summary: dict[str, Any]) -> None:
        self.writer.add_text("summary", json.dumps(summary, default=str), int(summary.get("steps") or 0))

    def close(self, failed: bool) -> None:
        self.writer.close()


class _MLflow:
    def __init__(self, output_dir: Path, config: dict[str, Any], run_name: str):
        try:
            from mlflow.entities import Param
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise _missing("mlflow") from None
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            # The local folder default: MLflow 3 keeps its file store (in maintenance mode) behind this switch.
            uri = (output_dir / "mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "kubetune")
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        params = [Param(k, str(v)[:500]) for k, v in flatten(config).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[start:start + 100])

    def log(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def summary(self, summary: dict[str, Any]) -> None:
        for key, value in summary.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.client.log_metric(self.run_id, f"final/{key}", float(value))
            elif value is not None:
                self.client.set_tag(self.run_id, f"final.{key}", str(value))

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


class _WandB:
    def __init__(self, output_dir: Path, config: dict[str, Any], run_name: str):
        try:
            import wandb
        except ImportError:
            raise _missing("wandb") from None
        output_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.run = wandb.init(
                project=os.environ.get("WANDB_PROJECT", "kubetune"), name=run_name, dir=str(output_dir),
                config=config, reinit="create_new",
            )
        except Exception as err:  # wandb raises its own error types (no API key, no network, ...)
            raise TrackerError(
                f"loggers: wandb could not start ({err}); set WANDB_API_KEY, or WANDB_MODE=offline to log "
                "without a network, or remove wandb from loggers"
            ) from None

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def summary(self, summary: dict[str, Any]) -> None:
        self.run.summary.update({f"final/{k}": v for k, v in summary.items() if v is not None})

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


_CLASSES = {"tensorboard": _TensorBoard, "mlflow": _MLflow, "wandb": _WandB}


def _missing(name: str) -> TrackerError:
    return TrackerError(
        f"loggers: {name} needs the {PACKAGES[name]} package: pip install 'kubetune[tracking]' "
        f"(or just {PACKAGES[name].split()[0]}), or remove {name} from loggers"
    )


class Trackers:
    """The configured trackers as one: `log(metrics, step)`, `summary(dict)`, `close()`."""

    def __init__(self, trackers: list[Any]):
        self.trackers = trackers

    def log(self, metrics: dict[str, Optional[float]], step: int) -> None:
        values = {k: float(v) for k, v in metrics.items() if v is not None}
        for tracker in self.trackers:
            tracker.log(values, step)

    def summary(self, summary: dict[str, Any]) -> None:
        for tracker in self.trackers:
            tracker.summary(summary)

    def close(self, failed: bool = False) -> None:
        for tracker in self.trackers:
            tracker.close(failed)
        self.trackers = []


def start_trackers(names: Iterable[str], output_dir: str | Path, config: dict[str, Any], run_name: Optional[str] = None,
                   enabled: bool = True) -> Trackers:
    """Start each named tracker (none when not `enabled`: ranks other than 0)."""
    if not enabled:
        return Trackers([])
    output_dir = Path(output_dir)
    run_name = run_name or output_dir.resolve().name
    started: list[Any] = []
    try:
        for name in dict.fromkeys(names):
            if name not in _CLASSES:
                raise TrackerError(f"loggers: unknown tracker {name!r}; use any of {', '.join(TRACKERS)}")
            started.append(_CLASSES[name](output_dir, config, run_name))
    except BaseException:
        Trackers(started).close(failed=True)
        raise
    return Trackers(started)


def open_trackers(cfg: Any, output_dir: str | Path, rank: int = 0) -> Trackers:
    """The trackers a training config asks for (`cfg.loggers`), with the config logged once."""
    return start_trackers(getattr(cfg, "loggers", []) or [], output_dir, cfg.model_dump(mode="json"), enabled=rank == 0)
