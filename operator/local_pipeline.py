"""The local backend for all three kinds: `kubetune apply -f FILE_OR_FOLDER`, `kubetune delete`.

`apply` reads every document of the files (a folder: its *.yaml / *.yml, sorted), refuses what a
cluster refuses (bad references, a promotion metric the EvalJob cannot report, a cycle) before
running anything, then in dependency order:
- FineTuneJobs run as local.py runs them (skipped when runs/<name> already succeeded with the same spec
  and, with spec.fineTuneJob, from the same run of that job, whose model folder it starts from);
- EvalJobs run the eval recipe (the baseline first with spec.baseline) as local processes, with the
  same config the cluster's ConfigMap would hold, and the same status.result;
- ModelDeployments start `kubetune serve` on a free loopback port, wait for /readyz and print the
  URL; a promotion gate holds a new model exactly as on a cluster (the running server keeps serving).
Without --detach, apply then keeps the servers in the foreground until Ctrl-C; with it, it returns.
`kubetune delete -f ...` / `kubetune delete mdep NAME` stops servers and removes the runs' status
(outputs and checkpoints stay).

Every run keeps its state in runs/<name>/status.yaml (what `kubectl get KIND NAME -o yaml` shows),
so `kubetune get evj|mdep|all` lists them like kubectl.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from kubetune.errors import KubetuneError
from kubetune.operator.api import KINDS, ManifestError, kind_for, parse_object
from kubetune.operator.crdgen import write_atomic
from kubetune.operator.deployplanner import kubetune_argv, served_models, vllm_argv
from kubetune.operator.evalplanner import eval_configs, task_configs, task_source_fields
from kubetune.operator.inputs import local_inputs, model_source_fields
from kubetune.operator.pipeline_status import eval_result
from kubetune.operator.planner import render_config
from kubetune.operator.references import (
    PipelineReferenceError,
    dependency_order,
    finetune_start_model,
    finetune_wait,
    promotion_metric_error,
    promotion_verdict,
)
from kubetune.operator.sources import MappedSource, map_local_source
from kubetune.operator.status import WorkloadState, conditions_for, now_iso, set_condition

STATUS_FILE = "status.yaml"
SPEC_HASH = "kubetune.dev/spec-hash"
READY_TIMEOUT = float(os.environ.get("KUBETUNE_LOCAL_READY_TIMEOUT", "300"))


# ---------------------------------------------------------------------------------------------
# Manifests


def manifest_files(paths: Sequence[str]) -> list[Path]:
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
            if not found:
                raise ManifestError(f"{path}: no *.yaml or *.yml files in the folder")
            files += found
        else:
            files.append(path)
    return files


def load_objects(paths: Sequence[str]) -> list[Any]:
    from kubetune.operator.local import load_manifest

    objects = [obj for path in manifest_files(paths) for obj in load_manifest(path)]
    seen: set[tuple[str, str]] = set()
    for obj in objects:
        key = (obj.kind, obj.metadata.name)
        if key in seen:
            raise ManifestError(f"{obj.kind} {obj.metadata.name} appears twice in the manifests")
        seen.add(key)
    return objects


def spec_hash(obj: Any) -> str:
    spec = obj.spec.model_dump(by_alias=True, exclude_none=True, mode="json")
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# runs/<name>/status.yaml


def status_path(runs_dir: Path, name: str) -> Path:
    return runs_dir / name / STATUS_FILE


def read_doc(runs_dir: Path, kind: str, name: str) -> Optional[dict[str, Any]]:
    try:
        doc = yaml.safe_load(status_path(runs_dir, name).read_text())
    except (OSError, yaml.YAMLError):
        return None
    return doc if isinstance(doc, dict) and doc.get("kind") == kind else None


def write_doc(runs_dir: Path, obj: Any, status: dict[str, Any], *, uid: str, created: str) -> dict[str, Any]:
    doc = {
        "apiVersion": obj.api_version,
        "kind": obj.kind,
        "metadata": {"name": obj.metadata.name, "uid": uid, "creationTimestamp": created, "annotations": {SPEC_HASH: spec_hash(obj)}},
        "spec": obj.spec.model_dump(by_alias=True, exclude_none=True, mode="json"),
        "status": status,
    }
    path = status_path(runs_dir, obj.metadata.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, yaml.safe_dump(doc, sort_keys=False))
    return doc


# ---------------------------------------------------------------------------------------------
# References, checked before anything runs (the cluster's messages)


def check_references(objects: Sequence[Any], runs_dir: Path) -> None:
    """Refuse what a cluster would refuse, naming the resource and the field."""
    applied = {(o.kind, o.metadata.name): o for o in objects}
    dependency_order(objects)  # a cycle
    for obj in objects:
        where = f"{obj.kind} {obj.metadata.name}"
        ref = getattr(obj.spec, "fine_tune_job", None)
        if ref is not None and ("FineTuneJob", ref.name) not in applied and read_doc(runs_dir, "FineTuneJob", ref.name) is None:
            raise PipelineReferenceError(
                f"{where}: spec.fineTuneJob: FineTuneJob {ref.name} does not exist (yet); create it or fix spec.fineTuneJob.name "
                f"(locally: apply it in the same command, or it must be in {runs_dir}/)"
            )
        promotion = getattr(obj.spec, "promotion", None)
        if promotion is not None:
            evj = applied.get(("EvalJob", promotion.eval_job))
            if evj is None:
                doc = read_doc(runs_dir, "EvalJob", promotion.eval_job)
                if doc is None:
                    raise PipelineReferenceError(
                        f"{where}: spec.promotion.evalJob: EvalJob {promotion.eval_job} does not exist (yet); "
                        "create it or fix spec.promotion.evalJob"
                    )
                evj = parse_object({k: doc[k] for k in ("apiVersion", "kind", "metadata", "spec")}, f"{runs_dir}/{promotion.eval_job}")
            error = promotion_metric_error(promotion, evj)
            if error:
                raise PipelineReferenceError(f"{where}: {error}")


def finetune_doc(runs_dir: Path, name: str) -> Optional[dict[str, Any]]:
    return read_doc(runs_dir, "FineTuneJob", name)


# ---------------------------------------------------------------------------------------------
# FineTuneJob from another FineTuneJob's output


@dataclass(frozen=True)
class Start:
    model: Optional[str]  # the folder it starts from (None: spec.model)
    uid: Optional[str]  # the run of spec.fineTuneJob it starts from: a re-run of that one re-runs this
    status: dict[str, Any]  # what its status records about it


def finetune_start(ftj: Any, runs_dir: Path) -> "Start | dict[str, Any]":
    """Where a FineTuneJob starts: spec.model, or its spec.fineTuneJob's model folder once that
    run succeeded (applied earlier: dependency order); else the Failed status saying why."""
    ref = ftj.spec.fine_tune_job
    if ref is None:
        return Start(None, None, {"baseModel": ftj.spec.model.source})
    doc = finetune_doc(runs_dir, ref.name)
    wait = finetune_wait(ref.name, doc, None)
    try:
        if wait is not None:  # locally nothing else will finish it: waiting means it did not succeed
            raise PipelineReferenceError(wait.message)
        assert doc is not None
        model = finetune_start_model(ref.name, doc)
    except PipelineReferenceError as err:
        now = now_iso()
        reason = "InvalidSpec" if wait is None else "FineTuneJobFailed" if wait.reason == "WaitingForFineTuneJob" else wait.reason
        state = WorkloadState("Failed", reason, str(err))
        return {"phase": "Failed", "observedGeneration": 1, "completionTime": now,
                "conditions": conditions_for([], state, now=now, generation=1, created=False)}
    uid = (doc.get("metadata") or {}).get("uid")
    return Start(model, uid, {"baseModel": model, "fineTuneJobUid": uid})


# ---------------------------------------------------------------------------------------------
# EvalJob


def run_eval(evj: Any, runs_dir: Path, base_dir: Path) -> dict[str, Any]:
    """Run the eval (and the baseline first) as local processes; returns the final status."""
    name = evj.metadata.name
    run_dir = (runs_dir / name).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    created, uid, now = now_iso(), str(uuid.uuid4()), now_iso()
    status: dict[str, Any] = {"observedGeneration": 1}

    def fail(reason: str, message: str, model_ready: bool) -> dict[str, Any]:
        state = WorkloadState("Failed", reason, message)
        status.update(phase="Failed", completionTime=now_iso())
        status["conditions"] = set_condition(conditions_for([], state, now=now, generation=1, created=False), "ModelReady",
                                             model_ready, reason if not model_ready else "ModelResolved", message, now=now, generation=1)
        write_doc(runs_dir, evj, status, uid=uid, created=created)
        return status

    ftj = None
    if evj.spec.fine_tune_job is not None:
        ref = evj.spec.fine_tune_job.name
        status["model"] = f"finetunejob/{ref}"
        ftj = finetune_doc(runs_dir, ref)
        wait = finetune_wait(ref, ftj, None)
        if wait is not None:  # locally nothing else will finish it: waiting means it did not succeed
            reason = "FineTuneJobFailed" if wait.reason == "WaitingForFineTuneJob" else wait.reason
            return fail(reason, wait.message, False)
    from kubetune.operator.local import fetch_local, local_cache_dir

    try:
        inputs = local_inputs(evj, ftj, base_dir, local_cache_dir(runs_dir), claims_dir=runs_dir)
        tasks = task_configs(evj, lambda source, index: MappedSource(
            map_local_source(source, f"spec.tasks[{index}].source", base_dir, local_cache_dir(runs_dir), claims_dir=runs_dir)))
        output = (map_local_source(evj.spec.output.source, "spec.output.source", base_dir, output=True, claims_dir=runs_dir)
                  if evj.spec.output.source else str(run_dir / "output"))
        configs = eval_configs(evj, inputs, tasks, output)
    except KubetuneError as err:
        return fail("InvalidSpec", str(err), False)
    try:  # hf:// and s3:// models, adapters and task files: as the initializer does on a cluster
        fetch_local({**model_source_fields(evj, ftj), **task_source_fields(evj)}, evj.spec, runs_dir)
    except KubetuneError as err:
        return fail("InitializerFailed", str(err), False)
    status.update(model=inputs.description, modelId=inputs.identity, phase="Running", startTime=now_iso())
    status["conditions"] = model_ready_true(conditions_for([], WorkloadState("Running", "ProcessRunning", f"eval running; log: {run_dir / 'eval.log'}"),
                                                          now=now, generation=1), inputs.description)
    write_doc(runs_dir, evj, status, uid=uid, created=created)
    messages: dict[str, Optional[str]] = {}
    for file in ("baseline.yaml", "config.yaml"):  # the baseline first, as the init container on a cluster
        if file not in configs:
            continue
        stem = file.split(".")[0]
        config_path = run_dir / file
        write_atomic(config_path, render_config("eval", configs[file]))
        termination = run_dir / f"{stem}-termination-log"
        termination.unlink(missing_ok=True)
        log_path = run_dir / f"{stem}.log"
        env = {**os.environ, "KUBETUNE_TERMINATION_LOG": str(termination), "PYTHONUNBUFFERED": "1"}
        with open(log_path, "wb") as log:
            code = subprocess.call([sys.executable, "-m", "kubetune.cli", "run", "eval", "--config", str(config_path)],
                                   stdout=log, stderr=subprocess.STDOUT, env=env)
        if code != 0:
            from kubetune.operator.local import _tail

            return fail("EvalFailed", f"the {stem} eval exited with code {code}; its last lines ({log_path}):\n{_tail(log_path)}", True)
        messages[stem] = termination.read_text() if termination.exists() else None
    result = eval_result(messages.get("config"), messages.get("baseline"))
    state = WorkloadState("Succeeded", "EvalComplete", f"the eval finished; results in {output}/results.json", True)
    status.update(phase="Succeeded", completionTime=now_iso())
    status["conditions"] = model_ready_true(conditions_for(status["conditions"], state, now=now_iso(), generation=1), inputs.description)
    if result:
        status["result"] = result
    write_doc(runs_dir, evj, status, uid=uid, created=created)
    return status


def model_ready_true(conditions: list[dict[str, Any]], description: str) -> list[dict[str, Any]]:
    return set_condition(conditions, "ModelReady", True, "ModelResolved", f"evaluating {description}", now=now_iso(), generation=1)


# ---------------------------------------------------------------------------------------------
# ModelDeployment


def pid_alive(pid: Optional[int], run_dir: Path) -> bool:
    """Whether `pid` is still our server, not a reused pid: its environment names our run folder."""
    if not pid:
        return False
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except FileNotFoundError:
        if Path("/proc/self/environ").exists():
            return False  # Linux: the process is gone
        try:  # no /proc (macOS): trust the pid
            os.kill(pid, 0)
        except OSError:
            return False
        return True
    except OSError:
        return False  # another user's process: not ours
    return f"KUBETUNE_RUN_DIR={run_dir}".encode() in environ


def stop_server(pid: int, timeout: float = 30.0) -> None:
    """SIGTERM (the server drains in-flight requests), then SIGKILL if it does not exit."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
            waited = os.waitpid(pid, os.WNOHANG)  # reap our own child, if it is one
            if waited[0] == pid:
                return
        except ChildProcessError:
            pass
        except ProcessLookupError:
            return
        time.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def wait_ready(url: str, proc: subprocess.Popen, log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            from kubetune.operator.local import _tail

            raise KubetuneError(f"the server exited with code {proc.returncode}; its last lines ({log_path}):\n{_tail(log_path)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise KubetuneError(f"the server did not become ready within {timeout:.0f} s; see {log_path}")


@dataclass
class Deployed:
    status: dict[str, Any]
    started: bool  # a server process was started by this apply


def deploy(mdep: Any, runs_dir: Path, base_dir: Path) -> Deployed:
    """Start (or keep, or replace) the local server of a ModelDeployment; returns its status."""
    from kubetune.operator.local import fetch_local, free_port, local_cache_dir

    name = mdep.metadata.name
    run_dir = (runs_dir / name).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    previous = read_doc(runs_dir, "ModelDeployment", name)
    old = (previous or {}).get("status") or {}
    running = pid_alive(old.get("pid"), run_dir)
    created = (previous or {}).get("metadata", {}).get("creationTimestamp") or now_iso()
    uid = (previous or {}).get("metadata", {}).get("uid") or str(uuid.uuid4())
    now = now_iso()
    conds = list(old.get("conditions") or []) if running else []
    status: dict[str, Any] = {**(old if running else {}), "observedGeneration": 1}

    def finish(phase: str, reason: str, message: str, ok: bool) -> Deployed:
        status["phase"] = phase if not running else status.get("phase", "Ready")
        status["conditions"] = set_condition(conds, "ModelReady", ok, reason, message, now=now, generation=1)
        if not running:
            status.update(ready="0/1", readyReplicas=0, replicas=1)
        write_doc(runs_dir, mdep, status, uid=uid, created=created)
        return Deployed(status, False)

    ftj = None
    if mdep.spec.fine_tune_job is not None:
        ref = mdep.spec.fine_tune_job.name
        ftj = finetune_doc(runs_dir, ref)
        wait = finetune_wait(ref, ftj, None)
        if wait is not None:
            reason = "FineTuneJobFailed" if wait.reason == "WaitingForFineTuneJob" else wait.reason
            return finish("Failed", reason, wait.message, False)
    if mdep.spec.runtime == "vllm" and shutil.which("vllm") is None:
        return finish("Failed", "InvalidSpec", "spec.runtime: vllm is not installed here; locally use runtime: kubetune (or install vLLM)", False)
    cache = local_cache_dir(runs_dir)
    try:
        inputs = local_inputs(mdep, ftj, base_dir, cache, claims_dir=runs_dir)
        adapter_paths = [inputs.adapter.path] if inputs.adapter is not None else []
        adapter_paths += [map_local_source(a.source, f"spec.adapters[{i}].source", base_dir, cache, claims_dir=runs_dir) for i, a in enumerate(mdep.spec.adapters)]
        names = served_models(mdep, inputs)
    except KubetuneError as err:
        return finish("Failed", "InvalidSpec", str(err), False)
    try:  # hf:// and s3:// models and adapters: as the initializer does on a cluster
        fetch_local(model_source_fields(mdep, ftj), mdep.spec, runs_dir)
    except KubetuneError as err:
        return finish("Failed", "InitializerFailed", str(err), False)
    if mdep.spec.api_key_secret is not None:
        return finish("Failed", "InvalidSpec", "spec.apiKeySecret needs a cluster; locally the server listens on 127.0.0.1 "
                      "only, or export KUBETUNE_SERVE_API_KEY in your shell and remove spec.apiKeySecret", False)
    if running and old.get("modelId") == inputs.identity and old.get("specHash") == spec_hash(mdep):
        print(f"modeldeployment.kubetune.dev/{name} unchanged: {old.get('url')}", file=sys.stderr)
        return Deployed(old, False)
    if mdep.spec.promotion is not None and inputs.identity != old.get("modelId"):
        evj = read_doc(runs_dir, "EvalJob", mdep.spec.promotion.eval_job)
        verdict = promotion_verdict(mdep.spec.promotion, evj, inputs.identity)
        conds = set_condition(conds, "Promoted", verdict.promoted, verdict.reason, verdict.message, now=now, generation=1)
        if not verdict.promoted:
            return finish("Pending", "ModelResolved", f"serving {old.get('model') or 'nothing yet'}; held: {verdict.message}", True)
    if running:  # a new model or spec: replace the server (locally there is one process, no rolling update)
        stop_server(old["pid"])
    port = free_port()
    adapters = list(zip(names[1:], adapter_paths))
    builder = vllm_argv if mdep.spec.runtime == "vllm" else kubetune_argv
    argv = builder(mdep.model_copy(update={"spec": mdep.spec.model_copy(update={"port": port})}), inputs.model.path, adapters)
    argv[argv.index("0.0.0.0")] = "127.0.0.1"  # loopback only on this machine
    if argv[0] == "kubetune":
        argv = [sys.executable, "-m", "kubetune.cli", *argv[1:]]
    log_path = run_dir / "server.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "KUBETUNE_RUN_DIR": str(run_dir)}
    for var in mdep.spec.env:
        if var.secret_key_ref is not None:
            return finish("Failed", "InvalidSpec", f"spec.env {var.name}: secretKeyRef needs a cluster; locally, export {var.name} in your shell instead", False)
        env[var.name] = var.value or ""
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=run_dir)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url + ("/health" if mdep.spec.runtime == "vllm" else "/readyz"), proc, log_path, READY_TIMEOUT)
    except KubetuneError as err:
        stop_server(proc.pid)
        running = False
        conds = []
        return finish("Failed", "ServerFailed", str(err), True)
    status.update(phase="Ready", ready="1/1", readyReplicas=1, replicas=1, url=f"{url}/v1", model=inputs.description,
                  modelId=inputs.identity, servedModels=names, pid=proc.pid, specHash=spec_hash(mdep))
    conds = set_condition(conds, "ModelReady", True, "ModelResolved", f"serving {inputs.description}", now=now, generation=1)
    conds = set_condition(conds, "Available", True, "ServerReady", f"pid {proc.pid} answers {url}/readyz", now=now, generation=1)
    status["conditions"] = conds
    write_doc(runs_dir, mdep, status, uid=uid, created=created)
    return Deployed(status, True)


# ---------------------------------------------------------------------------------------------
# CLI


def apply_command(args: argparse.Namespace) -> int:
    from kubetune.operator.local import fetch_local_sources, plan_local, run_local

    runs_dir = Path(args.runs_dir)
    objects = load_objects(args.filename)
    check_references(objects, runs_dir)
    base_dir = Path.cwd()
    failed, servers = 0, []
    for obj in dependency_order(objects):
        name = obj.metadata.name
        ident = f"{obj.kind.lower()}.kubetune.dev/{name}"
        if obj.kind == "FineTuneJob":
            start = finetune_start(obj, runs_dir)
            done = read_doc(runs_dir, "FineTuneJob", name)
            if (done and done["status"].get("phase") == "Succeeded" and done["metadata"].get("annotations", {}).get(SPEC_HASH) == spec_hash(obj)
                    and not isinstance(start, dict) and done["status"].get("fineTuneJobUid") == start.uid):
                print(f"{ident} unchanged (Succeeded in {runs_dir / name})")
                continue
            if isinstance(start, dict):  # its spec.fineTuneJob did not succeed: nothing would finish it locally
                status = start
                write_doc(runs_dir, obj, status, uid=str(uuid.uuid4()), created=now_iso())
            else:
                run = plan_local(obj, runs_dir, start_model=start.model)  # validates the spec before anything is downloaded
                fetch_local_sources(obj, runs_dir)  # hf:// and s3:// sources: as the initializer does on a cluster
                print(f"{ident} running locally ({run.run_dir})", file=sys.stderr)
                status = run_local(run, progress_bar=not args.no_progress, uid=str(uuid.uuid4()), annotations={SPEC_HASH: spec_hash(obj)},
                                   status_extra=start.status)
            summary = ", ".join(f"{k}={v}" for k, v in (status.get("result") or {}).items() if k != "metrics")
        elif obj.kind == "EvalJob":
            print(f"{ident} running locally ({(runs_dir / name).resolve()})", file=sys.stderr)
            status = run_eval(obj, runs_dir, base_dir)
            summary = (status.get("result") or {}).get("mainMetric") or ""
        else:
            deployed = deploy(obj, runs_dir, base_dir)
            status = deployed.status
            if deployed.started:
                servers.append((obj, status))
            summary = status.get("url") or ""
            if status.get("phase") in ("Ready", "Pending"):
                promoted = next((c for c in status.get("conditions", []) if c["type"] == "Promoted"), None)
                held = promoted is not None and promoted["status"] == "False"
                print(f"{ident} {'held' if held else status['phase']}: {promoted['message'] if held else summary}")
                continue
        if status["phase"] == "Succeeded":
            print(f"{ident} Succeeded" + (f": {summary}" if summary else ""))
        else:
            failed += 1
            print(f"{ident} {status['phase']}: {failure_message(status)}", file=sys.stderr)
    if servers and not args.detach:
        print("serving until Ctrl-C (use --detach to return and `kubetune delete` to stop)", file=sys.stderr)
        try:
            while any(pid_alive(s["pid"], (runs_dir / o.metadata.name).resolve()) for o, s in servers):
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        for obj, status in servers:
            stop_server(status["pid"])
            mark_stopped(runs_dir, obj.metadata.name)
    return 1 if failed else 0


def failure_message(status: dict[str, Any]) -> str:
    """Why a run failed: its Failed condition, else why its model is not ready."""
    conditions = {c["type"]: c for c in status.get("conditions", [])}
    for type_, bad in (("Failed", "True"), ("ModelReady", "False")):
        if conditions.get(type_, {}).get("status") == bad:
            return conditions[type_]["message"]
    return ""


def mark_stopped(runs_dir: Path, name: str) -> None:
    path = status_path(runs_dir, name)
    doc = read_doc(runs_dir, "ModelDeployment", name)
    if doc is None:
        return
    doc["status"].update(phase="Pending", ready="0/1", readyReplicas=0)
    doc["status"].pop("pid", None)
    write_atomic(path, yaml.safe_dump(doc, sort_keys=False))


def delete_command(args: argparse.Namespace) -> int:
    """`kubetune delete -f FILE_OR_FOLDER` or `kubetune delete KIND NAME...`."""
    runs_dir = Path(args.runs_dir)
    if args.filename:
        targets = [(o.kind, o.metadata.name) for o in load_objects(args.filename)]
    elif args.kind and args.names:
        kind = kind_for(args.kind).kind
        targets = [(kind, name) for name in args.names]
    else:
        raise KubetuneError("kubetune delete: give -f FILE_OR_FOLDER, or a kind and names (e.g. kubetune delete mdep my-bot)")
    missing = 0
    for kind, name in targets:
        ident = f"{kind.lower()}.kubetune.dev/{name}"
        doc = read_doc(runs_dir, kind, name)
        if doc is None:
            print(f'Error from server (NotFound): {KINDS[kind].plural}.kubetune.dev "{name}" not found in {runs_dir}/', file=sys.stderr)
            missing += 1
            continue
        pid = (doc.get("status") or {}).get("pid")
        if kind == "ModelDeployment" and pid_alive(pid, (runs_dir / name).resolve()):
            stop_server(pid)
        status_path(runs_dir, name).unlink(missing_ok=True)
        kept = "" if kind == "ModelDeployment" else f" (outputs kept in {runs_dir / name})"
        print(f"{ident} deleted{kept}")
    return 1 if missing else 0
