"""End to end: `kubetune apply -f` the tiny manifest (fewer steps) with the real full_finetune
recipe on builtin://tiny, then `kubetune get`."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ophelpers import REPO

pytestmark = pytest.mark.timeout(240)


def test_apply_runs_the_demo_manifest_with_the_real_trainer(tmp_path):
    doc = yaml.safe_load((REPO / "examples" / "finetune-tiny.yaml").read_text())
    doc["spec"]["config"].update(max_steps=3, batch_size=2)
    manifest = tmp_path / "finetune.yaml"
    manifest.write_text(yaml.safe_dump(doc))
    runs = tmp_path / "runs"
    out = subprocess.run(
        [sys.executable, "-m", "kubetune.cli", "apply", "-f", str(manifest), "--runs-dir", str(runs), "--no-progress"],
        capture_output=True, text=True, cwd=REPO, timeout=220,
    )
    log = (runs / "tiny" / "trainer.log")
    assert out.returncode == 0, out.stderr + (log.read_text()[-3000:] if log.exists() else "")
    assert "finetunejob.kubetune.dev/tiny Succeeded" in out.stdout

    status = yaml.safe_load((runs / "tiny" / "status.yaml").read_text())["status"]
    summary = json.loads((runs / "tiny" / "termination-log").read_text())
    assert status["phase"] == "Succeeded"
    assert status["result"]["steps"] == summary["steps"] == 3
    assert status["result"]["finalLoss"] == summary["finalLoss"]
    assert Path(status["result"]["checkpoint"]).is_dir()
    assert Path(status["result"]["checkpoint"]).is_relative_to(runs / "tiny" / "output")
    assert status["progress"]["totalSteps"] == 3 and status["progress"]["percent"] == 100.0

    listed = subprocess.run([sys.executable, "-m", "kubetune.cli", "get", "--runs-dir", str(runs)], capture_output=True, text=True, check=True)
    assert listed.stdout.splitlines()[1].split()[:3] == ["tiny", "full_finetune", "Succeeded"]
