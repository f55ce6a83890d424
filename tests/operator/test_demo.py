"""`make demo` end to end: the folder examples/demo/ applied with `kubetune apply -f --detach`
(continued pretraining -> LoRA instruction tuning -> DPO -> an EvalJob per stage -> a
ModelDeployment), then examples/demo/report.py, then `kubetune delete`: every stage succeeds, the
held-out accuracy rises from the base model to the final one past a threshold, the plots are
PNG images, and the served model answers a held-out question correctly through `openai`.

The manifests run as shipped (fewer steps lost most of the accuracy: 200/80/20 steps reached 29%,
and the promotion gate rightly held the deployment), in a copy of the folder, from a scratch
working directory (their paths are relative to it). About 2.5 minutes on 2 quiet cores."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
import yaml

from ophelpers import REPO

pytestmark = pytest.mark.timeout(900)

DEMO = REPO / "examples" / "demo"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run(*argv: str, cwd: Path, timeout: float = 800) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as the Makefile runs it
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def status(runs: Path, name: str) -> dict:
    return yaml.safe_load((runs / name / "status.yaml").read_text())["status"]


def assert_png(path: Path) -> None:
    from PIL import Image

    assert path.read_bytes()[:8] == PNG_MAGIC, f"{path} is not a PNG"
    with Image.open(path) as image:
        image.verify()  # a truncated or corrupt file raises here
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) > 100


def test_the_demo_data_is_what_make_data_writes():
    checked = run(str(DEMO / "make_data.py"), "--check", cwd=REPO)
    assert checked.returncode == 0, checked.stderr


def test_the_demo_pipeline_learns_and_serves(tmp_path):
    demo = tmp_path / "examples" / "demo"
    shutil.copytree(DEMO, demo, ignore=shutil.ignore_patterns("__pycache__"))
    runs = tmp_path / "runs"
    shutil.copytree(DEMO / "data", runs / "demo" / "data")  # the claim `demo` (pvc://demo/...) is runs/demo locally: as `make demo`

    applied = run("-m", "kubetune.cli", "apply", "-f", "examples/demo/", "--detach", "--no-progress", cwd=tmp_path)
    logs = "".join(f"\n--- {p}\n" + p.read_text()[-1500:] for p in runs.glob("*/*.log")) if runs.exists() else ""
    assert applied.returncode == 0, applied.stdout + applied.stderr + logs
    try:
        for name in ("demo-pretrain", "demo-instruct", "demo-align", "demo-eval-pretrain", "demo-eval-instruct", "demo-eval-align"):
            assert status(runs, name)["phase"] == "Succeeded", (name, status(runs, name))
        assert status(runs, "demo-bot")["phase"] == "Ready"

        reported = run(str(tmp_path / "examples" / "demo" / "report.py"), cwd=tmp_path, timeout=300)
        assert reported.returncode == 0, reported.stdout + reported.stderr

        # Accuracy, as the EvalJobs measured it (the report prints the same numbers).
        metric = "heldout/exact_match"
        first = status(runs, "demo-eval-pretrain")["result"]
        base = first["baseline"][metric]
        final = status(runs, "demo-eval-align")["result"]["metrics"][metric]
        assert base < 0.1 and final > 0.8, (base, final)  # the demo's targets
        assert f"{final:.0%}" in reported.stdout and "base" in reported.stdout

        # Plots: the stages' loss curves and the accuracy per stage, and each run's own loss plot.
        for png in ("runs/demo/loss.png", "runs/demo/accuracy.png", "runs/demo/pretrain/loss.png",
                    "runs/demo/instruct/loss.png", "runs/demo/align/loss.png"):
            assert_png(tmp_path / png)
            assert png in reported.stdout

        # The served model, through the openai client: a held-out question its EvalJob got right is
        # answered right (the same model behind the API), and report.py's question is answered.
        url = status(runs, "demo-bot")["url"]
        questions = [json.loads(line) for line in (DEMO / "data" / "heldout.jsonl").read_text().splitlines()]
        scored = [json.loads(line) for line in (runs / "demo-eval-align" / "output" / "samples_heldout.jsonl").read_text().splitlines()]
        question = next(q for q, s in zip(questions, scored) if s["correct"])
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
        reply = client.completions.create(model="demo-bot", prompt=question["prompt"], max_tokens=8, temperature=0, stop=["\n"])
        assert reply.choices[0].text.strip() == question["answer"]
        assert questions[0]["prompt"].splitlines()[-1] in reported.stdout and "(expected: " in reported.stdout
    finally:
        pid = (status(runs, "demo-bot") if (runs / "demo-bot" / "status.yaml").exists() else {}).get("pid")
        deleted = run("-m", "kubetune.cli", "delete", "mdep", "demo-bot", cwd=tmp_path, timeout=120)
    assert deleted.returncode == 0, deleted.stderr
    deadline = time.monotonic() + 30
    while pid and time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        time.sleep(0.2)
    assert not (pid and Path(f"/proc/{pid}").exists()), "the server still runs after kubetune delete"
