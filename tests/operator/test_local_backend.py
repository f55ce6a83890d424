"""`kubetune apply` (the local backend) and `kubetune get`, driven with a stand-in trainer that
serves the real metric names and writes the termination summary."""
from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from kubetune.errors import KubetuneError
from kubetune.operator.api import parse_object
from kubetune.operator.local import format_table, human_age, load_manifest, local_runs, plan_local, run_local
from kubetune.trainer.config import resolve_config
from ophelpers import REPO

FAKE_TRAINER = [sys.executable, str(Path(__file__).with_name("fake_trainer.py"))]
pytestmark = pytest.mark.timeout(60)


def tiny_job(name: str = "tiny", **config):
    doc = yaml.safe_load((REPO / "examples" / "finetune-tiny.yaml").read_text())
    doc["metadata"]["name"] = name
    doc["spec"]["config"].update(config)
    return parse_object(doc, "test")


def read_status(run) -> dict:
    return yaml.safe_load(run.status_path.read_text())


def wait_for(check, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except (OSError, KeyError, TypeError, yaml.YAMLError):
            pass
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_local_run_writes_progress_then_the_result(tmp_path, monkeypatch):
    go = tmp_path / "go"
    monkeypatch.setenv("FAKE_PAUSE_AT", "3")
    monkeypatch.setenv("FAKE_GO_FILE", str(go))
    job = tiny_job(max_steps=6)
    run = plan_local(job, tmp_path / "runs", base_dir=REPO, trainer_argv=FAKE_TRAINER)

    cfg = resolve_config("full_finetune", yaml.safe_load(run.config_path.read_text()))
    assert cfg.model.path == "builtin://tiny"
    assert cfg.dataset.source == str(REPO / "examples" / "data" / "tiny_instruct.jsonl")
    assert cfg.output_dir == str(tmp_path / "runs" / "tiny" / "output")
    assert cfg.metrics_port == run.metrics_port and cfg.max_steps == 6
    assert run.env["KUBETUNE_TERMINATION_LOG"] == str(tmp_path / "runs" / "tiny" / "termination-log")

    final: dict = {}
    thread = threading.Thread(target=lambda: final.update(run_local(run, poll_interval=0.05)))
    thread.start()
    try:
        during = wait_for(lambda: (s := read_status(run)) and (s["status"].get("progress") or {}).get("step") == 3 and s)
    finally:
        go.touch()
        thread.join(30)
    status = during["status"]
    assert during["kind"] == "FineTuneJob" and during["spec"]["recipe"] == "full_finetune"
    assert status["phase"] == "Running" and status["progress"]["totalSteps"] == 6
    assert status["progress"]["percent"] == 50.0 and status["progress"]["loss"] == pytest.approx(4.0 / 3)

    on_disk = read_status(run)["status"]
    assert on_disk == final
    assert on_disk["phase"] == "Succeeded" and on_disk["completionTime"]
    summary = json.loads(run.termination_log.read_text())
    assert on_disk["result"] == {k: v for k, v in summary.items() if v is not None}
    assert on_disk["progress"]["step"] == 6 and on_disk["progress"]["percent"] == 100.0
    assert {c["type"]: c["status"] for c in on_disk["conditions"]}["Succeeded"] == "True"


def test_a_failing_trainer_fails_the_run_with_its_last_log_lines(tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_EXIT_CODE", "3")
    run = plan_local(tiny_job(max_steps=2), tmp_path / "runs", base_dir=REPO, trainer_argv=FAKE_TRAINER)
    status = run_local(run, poll_interval=0.05)
    assert status["phase"] == "Failed"
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "TrainerFailed" and "code 3" in failed["message"] and "boom" in failed["message"]
    assert "result" not in status


def test_several_processes_run_under_torchrun(tmp_path):
    doc = yaml.safe_load((REPO / "examples" / "finetune-tiny.yaml").read_text())
    doc["spec"]["resources"].update(nodes=2, gpusPerNode=2)
    run = plan_local(parse_object(doc, "t"), tmp_path / "runs", base_dir=REPO)
    assert run.argv[:4] == [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    assert "--nproc-per-node=4" in run.argv
    assert run.argv[run.argv.index("-m", 3):] == ["-m", "kubetune.cli", "run", "full_finetune", "--config", str(run.config_path)]


def test_a_claim_is_a_folder_of_the_runs_dir_locally_and_stays_inside_it(tmp_path):
    """pvc://CLAIM/path -> <runs-dir>/CLAIM/path, so one folder of manifests runs on a cluster and
    here (examples/demo/); the cluster's checks hold: a claim name, nothing outside the claim."""
    doc = yaml.safe_load((REPO / "examples" / "finetune-tiny.yaml").read_text())
    doc["spec"]["dataset"]["source"] = "pvc://shared/data/../../elsewhere.jsonl"
    with pytest.raises(KubetuneError, match=r"spec\.dataset\.source.*'\.\.' would leave the volume"):
        plan_local(parse_object(doc, "t"), tmp_path / "runs")
    doc["spec"]["dataset"]["source"] = "pvc://shared/data/tiny.jsonl"
    doc["spec"]["output"] = {"source": "pvc://shared/out/./run"}
    run = plan_local(parse_object(doc, "t"), tmp_path / "runs")
    config = yaml.safe_load(run.config_path.read_text())
    assert config["dataset"]["source"] == str((tmp_path / "runs" / "shared" / "data" / "tiny.jsonl").resolve())
    assert config["output_dir"] == str((tmp_path / "runs" / "shared" / "out" / "run").resolve())
    doc["spec"]["output"] = {"source": "pvc://Not_A_Claim/x"}
    with pytest.raises(KubetuneError, match=r"spec\.output\.source.*claim"):
        plan_local(parse_object(doc, "t"), tmp_path / "runs")


def test_get_prints_the_kubectl_columns(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    for name, status in [
        ("demo", {"phase": "Running", "progress": {"percent": 42.5, "loss": 1.25}}),
        ("other", {"phase": "Succeeded", "progress": {"percent": 100.0, "loss": 0.5}}),
    ]:
        (runs / name).mkdir(parents=True)
        doc = {"apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneJob",
               "metadata": {"name": name, "creationTimestamp": "2026-01-01T00:00:00Z"},
               "spec": {"recipe": "full_finetune"}, "status": status}
        (runs / name / "status.yaml").write_text(yaml.safe_dump(doc))
    table = format_table(local_runs(runs), "FineTuneJob", now=dt.datetime(2026, 1, 1, 0, 5, tzinfo=dt.timezone.utc))
    lines = [line.split() for line in table.splitlines()]
    assert lines == [
        ["NAME", "RECIPE", "PHASE", "PROGRESS", "LOSS", "AGE"],
        ["demo", "full_finetune", "Running", "42.5", "1.25", "5m"],
        ["other", "full_finetune", "Succeeded", "100", "0.5", "5m"],
    ]
    out = subprocess.run([sys.executable, "-m", "kubetune.cli", "get", "ftj", "--runs-dir", str(runs)], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines()[0].split() == lines[0] and "demo" in out.stdout


def test_human_age_matches_kubectl():
    assert [human_age(s) for s in (5, 119, 150, 600, 7200, 4 * 3600 + 60, 30 * 3600, 3 * 86400)] == [
        "5s", "119s", "2m30s", "10m", "120m", "4h1m", "30h", "3d"
    ]


def test_apply_with_a_bad_manifest_exits_2_naming_the_field(tmp_path):
    doc = yaml.safe_load((REPO / "examples" / "finetune-tiny.yaml").read_text())
    doc["spec"]["resources"]["nodes"] = 0
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    out = subprocess.run([sys.executable, "-m", "kubetune.cli", "apply", "-f", str(bad), "--runs-dir", str(tmp_path / "runs")],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "spec.resources.nodes" in out.stderr and out.stderr.startswith("error:")
    assert load_manifest(REPO / "examples" / "eval-and-serve.yaml")[0].kind == "EvalJob"


def folders_written(obj, runs: Path) -> set[Path]:
    """Where `kubetune apply` writes for an object: its run folder (runs/<name>) and the folder of
    every claim it names (runs/<claim>: pvc:// sources, outputs included)."""
    folders = {runs / obj.metadata.name}
    spec = obj.spec.model_dump(by_alias=True, exclude_none=True)
    sources = [node.get("source") for node in spec.values() if isinstance(node, dict)]
    for source in sources:
        if isinstance(source, str) and source.startswith("pvc://"):
            folders.add(runs / source.removeprefix("pvc://").split("/")[0])
    return folders


def test_the_tiny_example_and_the_demo_pipeline_write_into_different_folders(tmp_path):
    """examples/finetune-tiny.yaml (runs/tiny/) must not write into the demo's claim folder
    (runs/demo/, where `make demo` puts its data and each stage's output), nor into any run
    folder of the demo's objects: one would overwrite or refuse the other's files."""
    from kubetune.operator.local_pipeline import load_objects

    runs = tmp_path / "runs"
    (tiny,) = load_objects([str(REPO / "examples" / "finetune-tiny.yaml")])
    mine = folders_written(tiny, runs)
    assert mine == {runs / "tiny"}
    demo = set().union(*(folders_written(obj, runs) for obj in load_objects([str(REPO / "examples" / "demo")])))
    assert runs / "demo" in demo  # the claim (pvc://demo/...) the pipeline reads and writes
    assert not [(a, b) for a in mine for b in demo if a == b or a.is_relative_to(b) or b.is_relative_to(a)]
