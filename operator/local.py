"""The local backend: `kubetune apply -f MANIFEST` runs a FineTuneJob on this machine
(EvalJobs and ModelDeployments: local_pipeline.py, which `apply` hands every manifest to).

Same manifest, same validation, same trainer config as on a cluster; the trainer runs as a
local process (torchrun when nodes x gpusPerNode > 1), rank 0's Prometheus metrics drive a
progress bar, and runs/<name>/status.yaml gets the same status the operator writes, so
`kubetune get` can print what `kubectl get ftj` would.

runs/<name>/ holds config.yaml (the resolved trainer config), trainer.log, termination-log,
status.yaml and, unless spec.output says otherwise, output/.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from kubetune.errors import KubetuneError
from kubetune.safe_yaml import read_user_text, YamlLimitError, safe_load, safe_load_all
from kubetune.operator.api import KINDS, ManifestError, kind_for, parse_object
from kubetune.operator.api.finetune import FineTuneJob
from kubetune.operator.crdgen import write_atomic
from kubetune.operator.planner import render_config, trainer_config
from kubetune.operator.scrape import scrape_local
from kubetune.operator.sources import map_local_source
from kubetune.operator.status import (
    WorkloadState,
    conditions_for,
    final_progress,
    now_iso,
    parse_metrics,
    parse_result,
    parse_time,
    progress_from_metrics,
)

STATUS_FILE = "status.yaml"


def load_manifest(path: Path) -> list[Any]:
    """Every document of a manifest file, parsed by the API models (errors name the field)."""
    try:
        docs = [d for d in safe_load_all(read_user_text(path, ManifestError), str(path)) if d is not None]
    except FileNotFoundError:
        raise ManifestError(f"{path}: no such file") from None
    except yaml.YAMLError as err:
        raise ManifestError(f"{path}: not valid YAML: {err}") from None
    if not docs:
        raise ManifestError(f"{path}: no documents in the file")
    return [parse_object(doc, f"{path}" + (f" (document {i + 1})" if len(docs) > 1 else "")) for i, doc in enumerate(docs)]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class LocalRun:
    job: FineTuneJob
    run_dir: Path
    config_path: Path
    metrics_port: int
    argv: list[str]
    env: dict[str, str]

    @property
    def status_path(self) -> Path:
        return self.run_dir / STATUS_FILE

    @property
    def log_path(self) -> Path:
        return self.run_dir / "trainer.log"

    @property
    def termination_log(self) -> Path:
        return self.run_dir / "termination-log"


def plan_local(
    job: FineTuneJob, runs_dir: Path, *, base_dir: Optional[Path] = None, trainer_argv: Optional[Sequence[str]] = None,
    start_model: Optional[str] = None,
) -> LocalRun:
    """The local counterpart of the planner: paths, the resolved config, the command line.
    start_model: with spec.fineTuneJob, that job's model folder (local_pipeline resolves it)."""
    base_dir = base_dir or Path.cwd()
    name = job.metadata.name
    run_dir = (runs_dir / name).resolve()
    spec = job.spec
    cache_dir = local_cache_dir(runs_dir)
    if spec.model is not None:
        model = map_local_source(spec.model.source, "spec.model.source", base_dir, cache_dir, claims_dir=runs_dir)
    elif start_model is not None:
        model = map_local_source(start_model, "spec.fineTuneJob", base_dir, cache_dir)
    else:
        raise KubetuneError(f"spec.fineTuneJob: the output of FineTuneJob {spec.fine_tune_job.name} is not known yet")
    dataset = map_local_source(spec.dataset.source, "spec.dataset.source", base_dir, cache_dir, claims_dir=runs_dir)
    output = (map_local_source(spec.output.source, "spec.output.source", base_dir, output=True, claims_dir=runs_dir)
              if spec.output.source else str(run_dir / "output"))
    port = free_port()
    config = trainer_config(
        job,
        model_path=model,
        dataset_path=dataset,
        output_dir=output,
        metrics_port=port,
        progress_bar=False,  # ours draws the bar from the metrics
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "config.yaml"
    write_atomic(config_path, render_config(spec.recipe, config))
    processes = spec.resources.nodes * max(spec.resources.gpus_per_node, 1)
    if trainer_argv is not None:
        argv = [*trainer_argv, spec.recipe, "--config", str(config_path)]
    elif processes > 1:
        # All ranks on this machine: torchrun's standalone rendezvous, no master address.
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
                "-m", "kubetune.cli", "run", spec.recipe, "--config", str(config_path)]
    else:
        argv = [sys.executable, "-m", "kubetune.cli", "run", spec.recipe, "--config", str(config_path)]
    env = {**os.environ, "KUBETUNE_TERMINATION_LOG": str(run_dir / "termination-log"), "PYTHONUNBUFFERED": "1"}
    for var in spec.env:
        if var.secret_key_ref is not None:
            raise KubetuneError(
                f"spec.env {var.name}: secretKeyRef needs a cluster; locally, export {var.name} in your shell instead"
            )
        env[var.name] = var.value or ""
    return LocalRun(job, run_dir, config_path, port, argv, env)


def local_cache_dir(runs_dir: Path) -> Path:
    """Where `kubetune apply` fetches hf:// and s3:// sources (shared by all runs)."""
    return runs_dir.resolve() / ".cache"


def fetch_local_sources(job: FineTuneJob, runs_dir: Path) -> list[Any]:
    """Fetch the job's hf:// and s3:// sources as the init container does on a cluster, with the
    credentials of this shell (HF_TOKEN, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY): spec.secrets
    names cluster Secrets. Skips what an earlier run fetched and has not changed."""
    spec = job.spec
    model = {"spec.model.source": spec.model.source} if spec.model is not None else {}  # spec.fineTuneJob: a folder another run wrote
    return fetch_local({**model, "spec.dataset.source": spec.dataset.source}, spec, runs_dir)


def fetch_local(fields: dict[str, Optional[str]], spec: Any, runs_dir: Path) -> list[Any]:
    """Fetch the hf:// and s3:// sources among `fields` ({field: source}) into the local cache, as
    the init container does on a cluster (any kind's spec: its s3 endpoint and region)."""
    from kubetune.operator.fetch import fetch
    from kubetune.operator.initializers import remote_sources

    cache = local_cache_dir(runs_dir)
    done = []
    for source in remote_sources(fields):
        fetched = fetch(source, Path(source.cache_path(str(cache))), endpoint=spec.s3.endpoint, region=spec.s3.region)
        print(f"{source.field}: {source.uri} {'up to date' if fetched.skipped else 'fetched'} in {fetched.path}", file=sys.stderr)
        done.append(fetched)
    return done


def status_document(
    job: FineTuneJob, status: dict[str, Any], created: str, uid: Optional[str] = None, annotations: Optional[dict[str, str]] = None
) -> dict[str, Any]:
    """What `kubectl get ftj NAME -o yaml` would show (a uid per run: EvalJobs and
    ModelDeployments tell a re-run from the run they evaluated or serve by it)."""
    metadata: dict[str, Any] = {"name": job.metadata.name, "creationTimestamp": created}
    if uid:
        metadata["uid"] = uid
    if annotations:
        metadata["annotations"] = dict(annotations)
    return {
        "apiVersion": job.api_version,
        "kind": job.kind,
        "metadata": metadata,
        "spec": job.spec.model_dump(by_alias=True, exclude_none=True, mode="json"),
        "status": status,
    }


def scrape(port: int, timeout: float = 1.0) -> Optional[str]:
    return scrape_local(port, timeout=timeout)  # None: not serving yet (model loading) or already gone


class ProgressBar:
    """tqdm over the scraped step count (stderr), or nothing."""

    def __init__(self, enabled: bool, name: str):
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm  # in the trainer extra, which a local run needs anyway
            except ImportError:
                return
            self.bar = tqdm(desc=name, unit="step", dynamic_ncols=True, file=sys.stderr)

    def update(self, progress: dict[str, Any]) -> None:
        if self.bar is None or progress.get("step") is None or progress["step"] == self.bar.n:
            return  # redraw on new steps only: quiet in CI logs
        if progress.get("totalSteps") and self.bar.total != progress["totalSteps"]:
            self.bar.total = progress["totalSteps"]
        self.bar.n = progress["step"]
        postfix = {}
        if progress.get("loss") is not None:
            postfix["loss"] = f"{progress['loss']:.4f}"
        if progress.get("tokensPerSecond") is not None:
            postfix["tok/s"] = f"{progress['tokensPerSecond']:.0f}"
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def run_local(
    run: LocalRun, *, progress_bar: bool = False, poll_interval: float = 0.5, uid: Optional[str] = None,
    annotations: Optional[dict[str, str]] = None, status_extra: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """Run the trainer to the end; returns the final status (also in runs/<name>/status.yaml).
    status_extra: fields the status also records (baseModel, fineTuneJobUid)."""
    created = now_iso()
    started = dt.datetime.now(dt.timezone.utc)
    run.termination_log.unlink(missing_ok=True)
    status: dict[str, Any] = {"phase": "Running", "startTime": now_iso(started), "observedGeneration": 1, **(status_extra or {})}
    status["conditions"] = conditions_for([], WorkloadState("Running", "ProcessRunning", f"trainer running; log: {run.log_path}"), now=status["startTime"], generation=1)

    def save() -> None:
        write_atomic(run.status_path, yaml.safe_dump(status_document(run.job, status, created, uid, annotations), sort_keys=False))

    save()
    bar = ProgressBar(progress_bar, run.job.metadata.name)
    interrupted = False
    with open(run.log_path, "wb") as log:
        proc = subprocess.Popen(run.argv, stdout=log, stderr=subprocess.STDOUT, env=run.env, start_new_session=True)
        try:
            while proc.poll() is None:
                time.sleep(poll_interval)
                text = scrape(run.metrics_port)
                if text:
                    progress = progress_from_metrics(parse_metrics(text), started_at=started, now=dt.datetime.now(dt.timezone.utc))
                    if progress.get("step") is not None:
                        status["progress"] = progress
                        bar.update(progress)
                        save()
        except KeyboardInterrupt:
            interrupted = True
            # SIGTERM, as the kubelet sends: the trainer checkpoints and exits (checkpoint_on_sigterm).
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        finally:
            bar.close()
    return finish(run, status, proc.returncode, interrupted, save)


def finish(run: LocalRun, status: dict[str, Any], returncode: int, interrupted: bool, save: Any) -> dict[str, Any]:
    now = now_iso()
    result = parse_result(run.termination_log.read_text() if run.termination_log.exists() else None)
    if returncode == 0 and not interrupted:
        state = WorkloadState("Succeeded", "TrainingComplete", f"the trainer finished; outputs in {run.job.spec.output.source or run.run_dir / 'output'}", True)
        status["progress"] = final_progress(status.get("progress"), result or {})
    elif interrupted:
        state = WorkloadState("Failed", "Interrupted", "stopped by the user; apply the manifest again to resume from the last checkpoint", True)
    else:
        state = WorkloadState(
            "Failed", "TrainerFailed", f"the trainer exited with code {returncode}; its last lines ({run.log_path}):\n{_tail(run.log_path)}", True
        )
    status["phase"] = state.phase
    status["completionTime"] = now
    status["conditions"] = conditions_for(status["conditions"], state, now=now, generation=1)
    if result:
        status["result"] = result
    save()
    return status


# ---------------------------------------------------------------------------------------------
# CLI


def apply_command(args: argparse.Namespace) -> int:
    """`kubetune apply -f FILE_OR_FOLDER`: all three kinds, in dependency order (local_pipeline.py)."""
    from kubetune.operator.local_pipeline import apply_command as apply_all

    return apply_all(args)


def _json_path(obj: Any, path: str) -> Any:
    for part in path.strip(".").split("."):
        if not isinstance(obj, dict):
            return None
        obj = obj.get(part)
    return obj


def human_age(seconds: float) -> str:
    """kubectl's AGE format (apimachinery's HumanDuration)."""
    seconds = int(max(seconds, 0))
    minutes, hours, days = seconds // 60, seconds // 3600, seconds // 86400
    if seconds < 120:
        return f"{seconds}s"
    if minutes < 10:
        return f"{minutes}m{seconds % 60}s" if seconds % 60 else f"{minutes}m"
    if hours < 3:
        return f"{minutes}m"
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    return f"{days}d"


def _age(timestamp: Optional[str], now: dt.datetime) -> str:
    created = parse_time(timestamp)
    return "<unknown>" if created is None else human_age((now - created).total_seconds())


def _cell(value: Any, column_type: str, now: dt.datetime) -> str:
    if column_type == "date":
        return _age(value, now)
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def local_runs(runs_dir: Path) -> list[dict[str, Any]]:
    docs = []
    for path in sorted(runs_dir.glob(f"*/{STATUS_FILE}")):
        try:
            doc = safe_load(path.read_text(), str(path))
        except (OSError, yaml.YAMLError, YamlLimitError):
            continue
        if isinstance(doc, dict) and doc.get("kind") in KINDS:
            docs.append(server_seen_now(doc, path.parent.resolve()))
    return docs


def server_seen_now(doc: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """A local ModelDeployment as it is now: a server that exited (killed, machine restarted) is
    not ready, whatever its status.yaml said when it started."""
    from kubetune.operator.local_pipeline import pid_alive

    status = doc.get("status") or {}
    if doc["kind"] == "ModelDeployment" and status.get("pid") and not pid_alive(status["pid"], run_dir):
        doc = {**doc, "status": {**status, "phase": "Failed", "ready": "0/1", "readyReplicas": 0}}
    return doc


def format_table(docs: list[dict[str, Any]], kind: str, now: Optional[dt.datetime] = None) -> str:
    """Rows like `kubectl get`: NAME, then the CRD's printer columns (priority 0)."""
    now = now or dt.datetime.now(dt.timezone.utc)
    columns = [c for c in KINDS[kind].columns if c.priority == 0]
    rows = [["NAME", *(c.name.upper() for c in columns)]]
    for doc in docs:
        rows.append([doc["metadata"]["name"], *(_cell(_json_path(doc, c.json_path), c.type, now) for c in columns)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("   ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def get_command(args: argparse.Namespace) -> int:
    runs_dir = Path(args.runs_dir)
    docs = local_runs(runs_dir) if runs_dir.is_dir() else []
    kinds = list(KINDS) if args.kind == "all" else [kind_for(args.kind).kind]
    printed = False
    for kind in kinds:
        of_kind = [d for d in docs if d["kind"] == kind]
        if of_kind or args.kind != "all":
            if of_kind:
                print(("\n" if printed else "") + format_table(of_kind, kind))
                printed = True
    if not printed:
        print(f"No resources found in {runs_dir}/.", file=sys.stderr)
    return 0
