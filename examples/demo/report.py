"""The end of `make demo`: after `kubetune apply -f examples/demo/ --detach` ran the five stages,
print held-out accuracy per stage, draw the plots, and ask the served model one question through
the `openai` client.

Everything it reports comes from what the runs wrote: runs/<name>/status.yaml (the status a
cluster would show), each stage's metrics.jsonl, and the live server. It does not stop the server:
`kubetune delete mdep demo-bot` does (the Makefile runs it even if this fails).

    python examples/demo/report.py [--runs-dir runs] [--plots-dir runs/demo]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional

import yaml

STAGES = (  # (label, FineTuneJob, EvalJob)
    ("pretrain", "demo-pretrain", "demo-eval-pretrain"),
    ("instruct", "demo-instruct", "demo-eval-instruct"),
    ("align", "demo-align", "demo-eval-align"),
)
DEPLOYMENT = "demo-bot"
METRIC = "heldout/exact_match"
QUESTIONS = Path(__file__).parent / "data" / "heldout.jsonl"


def status_of(runs_dir: Path, name: str) -> dict[str, Any]:
    path = runs_dir / name / "status.yaml"
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError:
        raise SystemExit(f"error: {path} is missing: run `kubetune apply -f examples/demo/ --detach` first") from None
    return doc.get("status") or {}


def accuracies(runs_dir: Path) -> dict[str, Optional[float]]:
    """base + each stage -> held-out exact match (None where that EvalJob did not succeed)."""
    table: dict[str, Optional[float]] = {}
    for i, (label, _, evaljob) in enumerate(STAGES):
        result = status_of(runs_dir, evaljob).get("result") or {}
        if i == 0:
            table["base"] = (result.get("baseline") or {}).get(METRIC)
        table[label] = (result.get("metrics") or {}).get(METRIC)
    return table


def stage_outputs(runs_dir: Path) -> dict[str, Path]:
    """label -> the stage's output folder (where metrics.jsonl and loss.png are)."""
    outputs = {}
    for label, finetunejob, _ in STAGES:
        result = status_of(runs_dir, finetunejob).get("result") or {}
        written = result.get("adapter") or result.get("checkpoint")
        if written:
            outputs[label] = Path(written).parent
    return outputs


def draw_plots(runs_dir: Path, plots_dir: Path, table: dict[str, Optional[float]]) -> list[Path]:
    from kubetune.trainer.training.metrics import read_metrics
    from kubetune.trainer.training.plots import bar_plot, loss_series, plot_losses

    series = {}
    for label, folder in stage_outputs(runs_dir).items():
        records = read_metrics(folder / "metrics.jsonl")
        series[f"{label} ({'DPO loss' if label == 'align' else 'loss'})"] = {"train": loss_series(records, "loss")}
    paths = [plot_losses(series, plots_dir / "loss.png", "training loss of the three stages")]
    measured = {label: value for label, value in table.items() if value is not None}
    paths.append(bar_plot(measured, plots_dir / "accuracy.png", "held-out accuracy (exact match)", "accuracy"))
    return paths


def ask(runs_dir: Path) -> tuple[str, str, str]:
    """(question, expected, answer): one held-out question to the served model, via the openai client."""
    import openai

    status = status_of(runs_dir, DEPLOYMENT)
    if status.get("phase") != "Ready":
        raise SystemExit(f"error: ModelDeployment {DEPLOYMENT} is {status.get('phase')}, not Ready; see {runs_dir / DEPLOYMENT}")
    sample = json.loads(QUESTIONS.read_text().splitlines()[0])
    client = openai.OpenAI(base_url=status["url"], api_key="unused-locally", max_retries=2, timeout=60)
    reply = client.completions.create(model=DEPLOYMENT, prompt=sample["prompt"], max_tokens=8, temperature=0, stop=["\n"])
    return sample["prompt"], sample["answer"], reply.choices[0].text


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs-dir", default="runs")
    parser.add_argument("--plots-dir", default="runs/demo")
    args = parser.parse_args(argv)
    runs_dir, plots_dir = Path(args.runs_dir), Path(args.plots_dir)

    table = accuracies(runs_dir)
    print("\nheld-out accuracy (48 questions about things no training question was about, exact match):")
    print(f"  {'model':<10} {'accuracy':>8}")
    for label, value in table.items():
        print(f"  {label:<10} {'failed' if value is None else f'{value:.0%}':>8}")
    plots = draw_plots(runs_dir, plots_dir, table)
    question, expected, answer = ask(runs_dir)
    print(f"\nserved by ModelDeployment {DEPLOYMENT}, asked through the openai client:")
    print("  " + question.replace("\n", "\n  ") + answer)
    print(f"  (expected: {expected}; {'correct' if answer.strip() == expected else 'wrong'})")
    print("\nplots: " + ", ".join(str(p) for p in plots))
    print("per-stage loss plots: " + ", ".join(str(f / "loss.png") for f in stage_outputs(runs_dir).values()))
    return 0 if all(v is not None for v in table.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
