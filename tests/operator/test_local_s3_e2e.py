"""End to end, locally: a FineTuneJob whose model is s3://... on a real S3 API (moto's server on
loopback) is fetched by `kubetune apply` into runs/.cache, trained with the real full_finetune
recipe, and writes its output; applying it again finds the model up to date in the cache."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

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

    doc = yaml.safe_load((REPO / "examples" / "finetune-tiny.yaml").read_text())
    doc["metadata"]["name"] = "from-s3"
    doc["spec"]["model"] = {"source": "s3://models/tiny"}
    doc["spec"]["s3"] = {"endpoint": s3.endpoint, "region": "us-east-1"}
    doc["spec"]["secrets"] = {"s3": {"name": "s3-keys"}}  # a cluster Secret; locally the shell's keys are used
    doc["spec"]["config"].update(max_steps=2, batch_size=2)
    manifest = tmp_path / "from-s3.yaml"
    manifest.write_text(yaml.safe_dump(doc))
    runs = tmp_path / "runs"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("AWS_")}, **s3.env}
    argv = [sys.executable, "-m", "kubetune.cli", "apply", "-f", str(manifest), "--runs-dir", str(runs), "--no-progress"]

    out = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=env, timeout=280)
    log = runs / "from-s3" / "trainer.log"
    assert out.returncode == 0, out.stderr + (log.read_text()[-3000:] if log.exists() else "")
    assert "spec.model.source: s3://models/tiny fetched in" in out.stderr
    assert "finetunejob.kubetune.dev/from-s3 Succeeded" in out.stdout

    config = yaml.safe_load((runs / "from-s3" / "config.yaml").read_text())
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
