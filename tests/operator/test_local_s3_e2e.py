"""End to end, locally: a FineTuneJob whose model is s3://... on a real S3 API (moto's server on
loopback) and whose dataset is hf://... on a loopback Hub (tests/fake_hub.py, a dataset repository
in the Hub's sharded-parquet layout) is fetched by `kubetune apply` into runs/.cache, trained with
the real full_finetune recipe, and writes its output; an EvalJob of the same s3:// model is
fetched (up to date already) and evaluated; a second apply to a fresh runs folder with a wrong
secret key is refused naming the field."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fake_hub import FakeHub, FakeRepo
from ophelpers import REPO
from s3_server import start_s3_server

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def s3():
    server_iter = start_s3_server()
    yield next(server_iter)
    next(server_iter, None)


def test_apply_trains_a_model_fetched_from_s3(s3, tmp_path):
    from kubetune.trainer.builtin import resolve_model_path

    model_dir = resolve_model_path("builtin://tiny")  # a real HF-format folder: config, safetensors, tokenizer
    client = s3.client()
    client.create_bucket(Bucket="models")
    uploaded = sorted(p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*") if p.is_file())
    for rel in uploaded:
        client.upload_file(str(model_dir / rel), "models", f"tiny/{rel}")

    import io

    import pyarrow.parquet as pq
    import pyarrow as pa

    records = [json.loads(line) for line in (REPO / "examples" / "data" / "tiny_instruct.jsonl").read_text().splitlines() if line.strip()]
    shards = {}
    for index, rows in enumerate((records[: len(records) // 2], records[len(records) // 2:])):
        out = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows), out)
        shards[f"data/train-0000{index}-of-00002.parquet"] = out.getvalue()
    hub = FakeHub(FakeRepo("acme/tiny-instruct", shards, repo_type="dataset")).__enter__()

    doc = yaml.safe_load((REPO / "examples" / "finetune-tiny.yaml").read_text())
    doc["metadata"]["name"] = "from-s3"
    doc["spec"]["model"] = {"source": "s3://models/tiny"}
    doc["spec"]["dataset"]["source"] = "hf://acme/tiny-instruct"
    doc["spec"]["s3"] = {"endpoint": s3.endpoint, "region": "us-east-1"}
    doc["spec"]["secrets"] = {"s3": {"name": "s3-keys"}}  # a cluster Secret; locally the shell's keys are used
    doc["spec"]["config"].update(max_steps=2, batch_size=2)
    evaljob = {
        "apiVersion": "kubetune.dev/v1alpha1", "kind": "EvalJob", "metadata": {"name": "s3-eval"},
        "spec": {"model": {"source": "s3://models/tiny"}, "s3": doc["spec"]["s3"], "resources": {"gpusPerNode": 0},
                 "tasks": [{"name": "facts", "type": "multiple_choice", "source": "builtin://tiny_instruct_mc",
                            "options": {"context_field": "question"}}],
                 "config": {"device": "cpu", "batch_size": 36, "max_seq_len": 64}},
    }
    manifest = tmp_path / "from-s3.yaml"
    manifest.write_text(yaml.safe_dump(doc))
    folder = tmp_path / "both"
    folder.mkdir()
    (folder / "train.yaml").write_text(yaml.safe_dump(doc))
    (folder / "eval.yaml").write_text(yaml.safe_dump(evaljob))
    runs = tmp_path / "runs"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "HF_"))}, **s3.env,
           "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf-home")}
    argv = [sys.executable, "-m", "kubetune.cli", "apply", "-f", str(folder), "--runs-dir", str(runs), "--no-progress"]

    try:
        out = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=env, timeout=280)
    finally:
        hub.__exit__(None, None, None)
    log = runs / "from-s3" / "trainer.log"
    assert out.returncode == 0, out.stderr + (log.read_text()[-3000:] if log.exists() else "")
    assert "spec.model.source: s3://models/tiny fetched in" in out.stderr
    assert "spec.dataset.source: hf://acme/tiny-instruct fetched in" in out.stderr
    assert "spec.model.source: s3://models/tiny up to date in" in out.stderr  # the EvalJob's model: the same cache entry
    assert "finetunejob.kubetune.dev/from-s3 Succeeded" in out.stdout
    assert "evaljob.kubetune.dev/s3-eval Succeeded" in out.stdout

    config = yaml.safe_load((runs / "from-s3" / "config.yaml").read_text())
    assert Path(config["dataset"]["source"]).is_relative_to(runs / ".cache" / "hf")  # the trainer read the shards there
    eval_config = yaml.safe_load((runs / "s3-eval" / "config.yaml").read_text())
    assert eval_config["model"]["path"] == config["model"]["path"]
    cached = Path(config["model"]["path"])
    assert cached.is_relative_to(runs / ".cache" / "s3")
    assert sorted(p.relative_to(cached).as_posix() for p in cached.rglob("*") if p.is_file() and p.name != ".kubetune-source.json") == uploaded
    status = yaml.safe_load((runs / "from-s3" / "status.yaml").read_text())["status"]
    assert status["phase"] == "Succeeded" and status["result"]["steps"] == 2
    checkpoint = Path(status["result"]["checkpoint"])
    assert checkpoint.is_relative_to(runs / "from-s3" / "output") and any(checkpoint.glob("*.safetensors"))

    fresh = [sys.executable, "-m", "kubetune.cli", "apply", "-f", str(manifest), "--runs-dir", str(tmp_path / "runs-2"), "--no-progress"]
    wrong = subprocess.run(fresh, capture_output=True, text=True, cwd=REPO, env={**env, "AWS_SECRET_ACCESS_KEY": "wrong"}, timeout=60)
    assert wrong.returncode == 2 and "error: spec.model.source: s3://models/tiny" in wrong.stderr and "spec.secrets.s3" in wrong.stderr


def test_apply_evaluates_a_task_file_fetched_from_s3(s3, tmp_path):
    """An EvalJob whose task file is s3://...: fetched into runs/.cache by `kubetune apply`, then
    evaluated; the same records from the built-in source give the same metrics, so the file the
    eval read is the object that was uploaded. A wrong key fails the EvalJob naming the task's field."""
    from kubetune.trainer.data.synthetic import multiple_choice_records

    records = multiple_choice_records()
    client = s3.client()
    client.create_bucket(Bucket="evals")
    client.put_object(Bucket="evals", Key="suites/facts.jsonl", Body="".join(json.dumps(r) + "\n" for r in records).encode())
    options = {"context_field": "question"}
    evaljob = {
        "apiVersion": "kubetune.dev/v1alpha1", "kind": "EvalJob", "metadata": {"name": "task-from-s3"},
        "spec": {"model": {"source": "builtin://tiny"}, "resources": {"gpusPerNode": 0},
                 "s3": {"endpoint": s3.endpoint, "region": "us-east-1"}, "secrets": {"s3": {"name": "eval-keys"}},
                 "tasks": [{"name": "fetched", "type": "multiple_choice", "source": "s3://evals/suites/facts.jsonl", "options": options},
                           {"name": "builtin", "type": "multiple_choice", "source": "builtin://tiny_instruct_mc", "options": options}],
                 "config": {"device": "cpu", "batch_size": 36, "max_seq_len": 64}},
    }
    manifest = tmp_path / "eval.yaml"
    manifest.write_text(yaml.safe_dump(evaljob))
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "HF_"))}, **s3.env, "HF_HOME": str(tmp_path / "hf-home")}
    runs = tmp_path / "runs"
    argv = [sys.executable, "-m", "kubetune.cli", "apply", "-f", str(manifest), "--runs-dir", str(runs), "--no-progress"]
    out = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=env, timeout=240)
    log = runs / "task-from-s3" / "eval.log"
    assert out.returncode == 0, out.stderr + (log.read_text()[-3000:] if log.exists() else "")
    assert "spec.tasks[0].source: s3://evals/suites/facts.jsonl fetched in" in out.stderr
    assert "evaljob.kubetune.dev/task-from-s3 Succeeded" in out.stdout

    config = yaml.safe_load((runs / "task-from-s3" / "config.yaml").read_text())
    path = Path(config["tasks"][0]["path"])
    assert path.is_relative_to(runs / ".cache" / "s3") and path.name == "facts.jsonl"
    assert path.read_bytes() == client.get_object(Bucket="evals", Key="suites/facts.jsonl")["Body"].read()
    status = yaml.safe_load((runs / "task-from-s3" / "status.yaml").read_text())["status"]
    metrics = status["result"]["metrics"]
    fetched = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("fetched/")}
    assert fetched and fetched == {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("builtin/")}

    wrong = subprocess.run([*argv[:-3], "--runs-dir", str(tmp_path / "runs-2"), "--no-progress"], capture_output=True, text=True,
                           cwd=REPO, env={**env, "AWS_SECRET_ACCESS_KEY": "wrong"}, timeout=120)
    assert wrong.returncode != 0
    status = yaml.safe_load((tmp_path / "runs-2" / "task-from-s3" / "status.yaml").read_text())["status"]
    failed = {c["type"]: c for c in status["conditions"]}["Failed"]
    assert failed["reason"] == "InitializerFailed" and failed["message"].startswith("spec.tasks[0].source: s3://evals/suites/facts.jsonl")
    assert "spec.secrets.s3" in failed["message"]
