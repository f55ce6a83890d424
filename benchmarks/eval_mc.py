"""Multiple-choice scoring throughput: kubetune's scorer vs lm-eval's HFLM on the same model and task.

    .venv/bin/python benchmarks/eval_mc.py [--questions 360] [--fewshot 0 5] [--batch-size 32]

Model: builtin://tiny (loaded natively by kubetune and by transformers inside HFLM). Task: the
synthetic fact questions (`multiple_choice_records` over several seeds), 4 choices each, as an
lm-eval task over a local JSONL file (nothing downloaded). Both sides score the identical
lm-eval request list (`Instance`s built by lm-eval from the task), so tokenization, requests and
the harness are the same; only the LM differs:

- HFLM: runs context + choice for every choice (lm-eval's reference implementation);
- KubetuneLM: runs each distinct context once into a KV cache, then only the choices.

Reported: questions per second of `lm.loglikelihood(requests)` (best of --repeats), and the
largest difference between the two sides' log-likelihoods. Record results in eval_mc.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
fewshot_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""


def build_requests(tasks_dir: Path, name: str, num_fewshot: int, limit: int):
    """The loglikelihood Instances lm-eval itself builds for the task (same for both LMs)."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    task = manager.load([name])["tasks"][name]
    task.set_config("num_fewshot", num_fewshot)
    task.set_fewshot_seed(1234)
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    return task.instances


def timed(fn, repeats: int) -> tuple[float, list]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=360)
    parser.add_argument("--fewshot", type=int, nargs="+", default=[0, 5])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from lm_eval.models.huggingface import HFLM

    from kubetune.trainer.builtin import resolve_model_path
    from kubetune.trainer.checkpoint import load_pretrained
    from kubetune.trainer.data.synthetic import multiple_choice_records
    from kubetune.trainer.eval.lm_eval_adapter import KubetuneLM
    from kubetune.trainer.tokenizers import load_tokenizer

    model_dir = resolve_model_path("builtin://tiny")
    records = [r for seed in range(args.questions // 36 + 1) for r in multiple_choice_records(seed=seed)][: args.questions]
    ours = KubetuneLM(load_pretrained(model_dir), load_tokenizer(str(model_dir)), batch_size=args.batch_size)
    hflm = HFLM(pretrained=str(model_dir), device="cpu", dtype="float32", batch_size=args.batch_size)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "facts.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in records))
        (Path(tmp) / "bench_facts.yaml").write_text(TASK_YAML.format(name="bench_facts", data=data))
        for shots in args.fewshot:
            requests = build_requests(Path(tmp), "bench_facts", shots, args.questions)
            hf_s, hf_out = timed(lambda: hflm.loglikelihood(requests, disable_tqdm=True), args.repeats)
            kt_s, kt_out = timed(lambda: ours.loglikelihood(requests, disable_tqdm=True), args.repeats)
            diff = max(abs(a[0] - b[0]) for a, b in zip(hf_out, kt_out))
            ctx_tokens = sum(len(ours.tok_encode(r.args[0])) for r in requests[::4]) / max(1, len(requests[::4]))
            rows.append(
                {
                    "fewshot": shots,
                    "questions": args.questions,
                    "requests": len(requests),
                    "mean_context_tokens": round(ctx_tokens, 1),
                    "hflm_questions_per_s": round(args.questions / hf_s, 1),
                    "kubetune_questions_per_s": round(args.questions / kt_s, 1),
                    "speedup": round(hf_s / kt_s, 2),
                    "max_abs_loglikelihood_diff": diff,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    print(
        json.dumps(
            {
                "machine": platform.processor() or platform.machine(),
                "cpus": os.cpu_count(),
                "torch_threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "python": sys.version.split()[0],
                "batch_size": args.batch_size,
            }
        )
    )


if __name__ == "__main__":
    main()
