"""Eval recipe: `kubetune run eval --config F`.

Reads top to bottom: validate every task file (cheap, so a bad record fails before the model
loads) -> load the model (+ NF4 base, + PEFT adapter) and tokenizer -> score the local tasks
-> run the lm-eval tasks through `KubetuneLM` -> write `results.json` (and per-sample files)
atomically -> print a table -> leave a one-line summary for the operator.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from kubetune.trainer.config.eval import EvalConfig, LocalTask
from kubetune.trainer.device import resolve_device, resolve_dtype
from kubetune.trainer.eval.results import flat_metrics, format_table, main_metric, write_json_atomic, write_jsonl_atomic
from kubetune.trainer.eval.runner import RunSettings, evaluate_task
from kubetune.trainer.eval.tasks import load_task

TERMINATION_LOG_LIMIT = 3500  # Kubernetes keeps 4096 bytes of a termination message


def load_model_and_tokenizer(cfg: EvalConfig, device: torch.device, dtype: torch.dtype):
    """The model to evaluate: base (optionally NF4-quantized) + optional PEFT adapter, in eval mode."""
    from kubetune.trainer.checkpoint import load_pretrained
    from kubetune.trainer.tokenizers import load_tokenizer

    model = load_pretrained(cfg.model.path, device=device, dtype=dtype)
    if cfg.model.quantize_base == "nf4":
        from kubetune.trainer.quant import quantize_base

        model = quantize_base(model)
    if cfg.adapter:
        from kubetune.trainer.peft import load_adapter

        model = load_adapter(model, cfg.adapter)  # raises AdapterError on a base/adapter mismatch
    tokenizer = load_tokenizer(cfg.tokenizer_path, cfg.tokenizer.chat_template)
    return model.to(device).eval(), tokenizer


def recipe_main(cfg: EvalConfig) -> dict[str, Any]:
    started = time.perf_counter()
    local_specs = [t for t in cfg.tasks if isinstance(t, LocalTask)]
    lm_eval_names = [t for t in cfg.tasks if isinstance(t, str)]
    local_tasks = [load_task(t.name, t.type, t.path, t.options, cfg.limit) for t in local_specs]
    task_manager = None
    if lm_eval_names:  # unknown names fail here, before the model loads
        from kubetune.trainer.eval.lm_eval_adapter import check_task_names, require_lm_eval, task_manager_for

        require_lm_eval()
        task_manager = task_manager_for(lm_eval_names, cfg.lm_eval_include_path)
        check_task_names(lm_eval_names, task_manager)

    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    model, tokenizer = load_model_and_tokenizer(cfg, device, resolve_dtype(cfg.dtype))
    settings = RunSettings(cfg.batch_size, cfg.max_seq_len, cfg.num_fewshot, cfg.seed, cfg.add_bos)

    output_dir = Path(cfg.output_dir)
    results: dict[str, dict[str, Any]] = {}
    for task in local_tasks:
        result = evaluate_task(model, tokenizer, task, settings)
        results[task.name] = result.to_dict()
        if cfg.write_samples:
            write_jsonl_atomic(output_dir / f"samples_{task.name}.jsonl", result.samples)
    if lm_eval_names:
        from kubetune.trainer.eval.lm_eval_adapter import KubetuneLM, run_lm_eval

        lm = KubetuneLM(model, tokenizer, cfg.batch_size, cfg.max_seq_len, add_bos_token=cfg.add_bos, seed=cfg.seed)
        results.update(
            run_lm_eval(
                lm,
                lm_eval_names,
                num_fewshot=cfg.num_fewshot,
                limit=cfg.limit,
                seed=cfg.seed,
                task_manager=task_manager,
            )
        )

    report = {
        "model": cfg.model.path,
        "adapter": cfg.adapter,
        "settings": {
            "limit": cfg.limit,
            "num_fewshot": cfg.num_fewshot,
            "seed": cfg.seed,
            "batch_size": cfg.batch_size,
            "max_seq_len": cfg.max_seq_len,
            "dtype": cfg.dtype,
        },
        "tasks": results,
        "elapsed_seconds": round(time.perf_counter() - started, 3),
    }
    results_file = output_dir / "results.json"
    write_json_atomic(results_file, report)
    print(format_table(results), flush=True)

    summary = {"mainMetric": main_metric(results), "metrics": flat_metrics(results)}
    if len(json.dumps(summary)) > TERMINATION_LOG_LIMIT:
        summary["metrics"] = {}  # too many to fit; results.json has them all
    from kubetune.trainer.training.summary import write_termination_log

    write_termination_log(summary)
    return {**summary, "results": str(results_file), "tasks": results}
