"""`kubetune apply` with EvalJobs and ModelDeployments: the refusals a cluster makes, made locally
with the same words before anything runs, and the failure and gate paths without training.
(The whole pipeline with the real recipes: test_local_pipeline_e2e.py.)"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kubetune.operator.api import parse_object
from kubetune.operator.references import finetune_wait, promotion_metric_error
from ophelpers import REPO

pytestmark = pytest.mark.timeout(120)
TASKS = [{"name": "facts", "type": "multiple_choice", "source": "builtin://tiny_instruct_mc", "options": {"context_field": "question"}}]


def doc(kind: str, name: str, **spec) -> dict:
    return {"apiVersion": "kubetune.dev/v1alpha1", "kind": kind, "metadata": {"name": name}, "spec": spec}


def evaljob(name="facts-eval", **spec):
    return doc("EvalJob", name, **{"fineTuneJob": {"name": "facts"}, "tasks": TASKS, "resources": {"gpusPerNode": 0}, **spec})


def modeldeployment(name="bot", **spec):
    return doc("ModelDeployment", name, **{"fineTuneJob": {"name": "facts"}, "resources": {"gpusPerNode": 0}, **spec})


def write(folder: Path, *docs: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "all.yaml").write_text(yaml.safe_dump_all(docs))
    return folder


def kubetune(*args: str, runs: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kubetune.cli", *args, "--runs-dir", str(runs)],
                          capture_output=True, text=True, cwd=REPO, timeout=100)


def put_run(runs: Path, body: dict, status: dict) -> None:
    (runs / body["metadata"]["name"]).mkdir(parents=True, exist_ok=True)
    body = {**body, "metadata": {**body["metadata"], "uid": "run-1"}, "status": status}
    (runs / body["metadata"]["name"] / "status.yaml").write_text(yaml.safe_dump(body))


def test_a_missing_finetunejob_is_refused_with_the_clusters_words_before_anything_runs(tmp_path):
    runs = tmp_path / "runs"
    out = kubetune("apply", "-f", str(write(tmp_path / "m", evaljob())), runs=runs)
    assert out.returncode == 2 and out.stderr.startswith("error: EvalJob facts-eval: spec.fineTuneJob:")
    assert finetune_wait("facts", None, None).message in out.stderr  # what the operator says on a cluster
    assert not runs.exists()


def test_a_promotion_metric_the_evaljob_cannot_report_is_refused_with_the_clusters_words(tmp_path):
    finetune = yaml.safe_load((REPO / "examples" / "finetune-tiny.yaml").read_text())
    finetune["metadata"]["name"] = "facts"
    evj = evaljob()
    mdep = modeldeployment(promotion={"evalJob": "facts-eval", "metric": "facts/perplexity", "min": 0.5})
    runs = tmp_path / "runs"
    out = kubetune("apply", "-f", str(write(tmp_path / "m", finetune, evj, mdep)), runs=runs)
    expected = promotion_metric_error(parse_object(mdep).spec.promotion, parse_object(evj))
    assert out.returncode == 2 and f"error: ModelDeployment bot: {expected}" in out.stderr
    assert "reports acc, acc_norm, not 'perplexity'" in expected
    assert not runs.exists()  # the FineTuneJob did not run either

    twice = kubetune("apply", "-f", str(write(tmp_path / "t", evj, evj)), runs=runs)
    assert twice.returncode == 2 and "EvalJob facts-eval appears twice" in twice.stderr


def test_an_evaljob_of_a_failed_finetunejob_fails_naming_it(tmp_path):
    runs = tmp_path / "runs"
    finetune = yaml.safe_load((REPO / "examples" / "finetune-tiny.yaml").read_text())
    finetune["metadata"]["name"] = "facts"
    put_run(runs, finetune, {"phase": "Failed", "conditions": [
        {"type": "Failed", "status": "True", "reason": "TrainerFailed", "message": "the trainer exited with code 3"}]})
    out = kubetune("apply", "-f", str(write(tmp_path / "m", evaljob())), runs=runs)
    assert out.returncode == 1 and "FineTuneJob facts failed: the trainer exited with code 3" in out.stderr
    status = yaml.safe_load((runs / "facts-eval" / "status.yaml").read_text())["status"]
    ready = next(c for c in status["conditions"] if c["type"] == "ModelReady")
    assert status["phase"] == "Failed" and ready["reason"] == "FineTuneJobFailed"
    listed = kubetune("get", "evj", runs=runs).stdout.splitlines()
    assert listed[0].split() == ["NAME", "MODEL", "PHASE", "MAIN", "METRIC", "AGE"]
    assert listed[1].split()[:3] == ["facts-eval", "finetunejob/facts", "Failed"]


def test_the_gate_holds_a_new_model_locally_and_says_the_measured_value(tmp_path):
    runs = tmp_path / "runs"
    finetune = yaml.safe_load((REPO / "examples" / "finetune-tiny.yaml").read_text())
    finetune["metadata"]["name"] = "facts"
    put_run(runs, finetune, {"phase": "Succeeded", "result": {"checkpoint": str(tmp_path / "model")}})
    put_run(runs, evaljob(), {"phase": "Succeeded", "modelId": "finetunejob/facts@run-1", "model": "finetunejob/facts",
                               "result": {"metrics": {"facts/acc": 0.3}}})
    mdep = modeldeployment(promotion={"evalJob": "facts-eval", "metric": "facts/acc", "min": 0.5})
    out = kubetune("apply", "-f", str(write(tmp_path / "m", mdep)), "--detach", runs=runs)
    assert out.returncode == 0, out.stderr
    assert "modeldeployment.kubetune.dev/bot held: facts/acc = 0.3, not >= min 0.5" in out.stdout
    status = yaml.safe_load((runs / "bot" / "status.yaml").read_text())["status"]
    promoted = next(c for c in status["conditions"] if c["type"] == "Promoted")
    assert promoted["status"] == "False" and promoted["reason"] == "MetricBelowThreshold"
    assert status["ready"] == "0/1" and "pid" not in status and "url" not in status

    deleted = kubetune("delete", "mdep", "bot", runs=runs)
    assert deleted.returncode == 0 and "modeldeployment.kubetune.dev/bot deleted" in deleted.stdout
    assert not (runs / "bot" / "status.yaml").exists()
    again = kubetune("delete", "mdep", "bot", runs=runs)
    assert again.returncode == 1 and 'modeldeployments.kubetune.dev "bot" not found' in again.stderr


def test_an_api_key_secret_is_refused_locally_saying_what_to_do_instead(tmp_path):
    runs = tmp_path / "runs"
    mdep = doc("ModelDeployment", "keyed", model={"source": "builtin://tiny"}, resources={"gpusPerNode": 0},
               apiKeySecret={"name": "keys", "key": "keys"})
    out = kubetune("apply", "-f", str(write(tmp_path / "m", mdep)), "--detach", runs=runs)
    assert out.returncode == 1 and "spec.apiKeySecret needs a cluster" in out.stderr and "KUBETUNE_SERVE_API_KEY" in out.stderr
    status = yaml.safe_load((runs / "keyed" / "status.yaml").read_text())["status"]
    assert status["phase"] == "Failed" and "pid" not in status  # no server was started


def test_get_shows_a_server_that_is_gone_as_not_ready(tmp_path):
    runs = tmp_path / "runs"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that no longer runs (and pid 1 below: running, but not our server)
    for name, pid in (("bot", gone.pid), ("other", 1)):
        put_run(runs, modeldeployment(name), {"phase": "Ready", "ready": "1/1", "url": "http://127.0.0.1:1/v1", "pid": pid,
                                               "model": "finetunejob/facts"})
    rows = [line.split() for line in kubetune("get", "mdep", runs=runs).stdout.splitlines()]
    assert rows[0] == ["NAME", "MODEL", "READY", "URL", "AGE"]
    assert [row[:3] for row in rows[1:]] == [["bot", "finetunejob/facts", "0/1"], ["other", "finetunejob/facts", "0/1"]]


def test_apply_without_detach_serves_in_the_foreground_until_ctrl_c(tmp_path):
    import signal
    import time
    import urllib.request

    runs = tmp_path / "runs"
    folder = write(tmp_path / "m", doc("ModelDeployment", "tiny-bot", model={"source": "builtin://tiny"}, resources={"gpusPerNode": 0}))
    apply = subprocess.Popen([sys.executable, "-m", "kubetune.cli", "apply", "-f", str(folder), "--runs-dir", str(runs)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        deadline = time.monotonic() + 90
        status: dict = {}
        while time.monotonic() < deadline and status.get("phase") != "Ready":
            time.sleep(0.3)
            path = runs / "tiny-bot" / "status.yaml"
            status = (yaml.safe_load(path.read_text()) or {}).get("status", {}) if path.exists() else {}
        assert status.get("phase") == "Ready", apply.stderr.read() if apply.poll() is not None else "not ready in time"
        with urllib.request.urlopen(status["url"] + "/models", timeout=10) as resp:
            assert [m["id"] for m in yaml.safe_load(resp.read())["data"]] == ["tiny-bot"]
        assert apply.poll() is None  # still in the foreground, serving
        apply.send_signal(signal.SIGINT)
        out, err = apply.communicate(timeout=120)  # idle: ~0.2 s to stop the server (stop_server kills after 30 s)
    finally:
        if apply.poll() is None:
            apply.kill()
    assert apply.returncode == 0, err
    assert not Path(f"/proc/{status['pid']}").exists()  # Ctrl-C stopped the server too
    after = yaml.safe_load((runs / "tiny-bot" / "status.yaml").read_text())["status"]
    assert after["ready"] == "0/1" and "pid" not in after


def finetunejob(name: str, **spec) -> dict:
    base = yaml.safe_load((REPO / "examples" / "finetune-tiny.yaml").read_text())
    config = {**base["spec"]["config"], "max_steps": 2, "eval_every_steps": None, "batch_size": 4, "overwrite_output_dir": True}
    return doc("FineTuneJob", name, **{**base["spec"], "config": config, **spec})


def test_a_finetunejob_starts_from_another_finetunejobs_model_in_dependency_order(tmp_path):
    """spec.fineTuneJob locally: the later job (first in the file) runs after the one it names, from
    its model folder; a re-run of the first re-runs the second, nothing else does."""
    runs = tmp_path / "runs"
    lora = finetunejob("second", recipe="lora_finetune", fineTuneJob={"name": "first"},
                       config={**finetunejob("x")["spec"]["config"], "lora": {"rank": 4, "alpha": 8}, "save_merged": True})
    del lora["spec"]["model"]
    folder = write(tmp_path / "m", lora, finetunejob("first"))
    out = kubetune("apply", "-f", str(folder), "--no-progress", runs=runs)
    assert out.returncode == 0, out.stderr
    assert out.stdout.index("finetunejob.kubetune.dev/first Succeeded") < out.stdout.index("finetunejob.kubetune.dev/second Succeeded")
    first, second = (yaml.safe_load((runs / n / "status.yaml").read_text()) for n in ("first", "second"))
    model = first["status"]["result"]["checkpoint"]
    assert Path(model, "config.json").is_file()
    assert yaml.safe_load((runs / "second" / "config.yaml").read_text())["model"]["path"] == model
    assert second["status"]["baseModel"] == model and second["status"]["fineTuneJobUid"] == first["metadata"]["uid"]
    assert second["spec"]["fineTuneJob"] == {"name": "first"} and "model" not in second["spec"]

    again = kubetune("apply", "-f", str(folder), "--no-progress", runs=runs)
    assert "first unchanged" in again.stdout and "second unchanged" in again.stdout, again.stdout
    (runs / "first" / "status.yaml").unlink()  # `kubetune delete ftj first`: it runs again, so does second
    rerun = kubetune("apply", "-f", str(folder), "--no-progress", runs=runs)
    assert "first Succeeded" in rerun.stdout and "second Succeeded" in rerun.stdout, rerun.stdout


@pytest.mark.parametrize("status,words", [
    ({"phase": "Failed", "conditions": [{"type": "Failed", "status": "True", "reason": "TrainerFailed", "message": "out of memory"}]},
     "FineTuneJob first failed: out of memory"),
    ({"phase": "Succeeded", "result": {"checkpoint": "/x/adapter", "adapter": "/x/adapter"}},
     "FineTuneJob first wrote only a LoRA adapter (/x/adapter); a FineTuneJob starts from a whole model: give FineTuneJob first spec.config.save_merged: true"),
])
def test_a_finetunejob_whose_start_did_not_succeed_or_is_an_adapter_fails_saying_why(tmp_path, status, words):
    runs = tmp_path / "runs"
    put_run(runs, finetunejob("first"), status)
    second = finetunejob("second", fineTuneJob={"name": "first"})
    del second["spec"]["model"]
    out = kubetune("apply", "-f", str(write(tmp_path / "m", second)), runs=runs)
    assert out.returncode == 1 and words in out.stderr, out.stderr
    st = yaml.safe_load((runs / "second" / "status.yaml").read_text())["status"]
    assert st["phase"] == "Failed" and words in next(c["message"] for c in st["conditions"] if c["type"] == "Failed")
    assert not (runs / "second" / "config.yaml").exists()  # nothing ran


def test_finetunejob_references_are_refused_when_they_cannot_work():
    second = finetunejob("second", fineTuneJob={"name": "second"})
    del second["spec"]["model"]
    with pytest.raises(Exception, match="cannot start from its own output"):
        parse_object(second)
    with pytest.raises(Exception, match="set exactly one of spec.model and spec.fineTuneJob"):
        parse_object(finetunejob("second", fineTuneJob={"name": "first"}))
