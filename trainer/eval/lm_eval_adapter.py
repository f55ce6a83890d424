"""EleutherAI's lm-evaluation-harness on our models: an `lm_eval` LM backed by kubetune's scorer.

`KubetuneLM` implements the three request types (`loglikelihood`, `loglikelihood_rolling`,
`generate_until`) with the same batched, shared-context scoring the local tasks use, so
`tasks: [hellaswag, ...]` run on native models, with PEFT adapters and NF4 bases alike.
Tokenization follows lm-eval's `TemplateLM` (context/continuation split, prefix token for
empty contexts); unlike HFLM's default we add BOS, as our models are trained with it.

Needs the optional `lm-eval` package (`pip install 'kubetune[eval]'`).
"""
from __future__ import annotations

import difflib
import os
from typing import Any, Optional, Sequence

import torch

from kubetune.errors import KubetuneError
from kubetune.trainer.eval import metrics as M
from kubetune.trainer.eval.scoring import chunks, rolling_windows, score_requests

try:
    from lm_eval.api.model import TemplateLM
except ImportError:  # the module still imports; require_lm_eval() says what to install
    TemplateLM = object  # type: ignore[misc,assignment]


def require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise KubetuneError(
            "lm-evaluation-harness tasks need the `lm-eval` package; install it with "
            "`pip install 'kubetune[eval]'`, or list only local tasks (with name, type and path)"
        ) from None


class KubetuneLM(TemplateLM):  # type: ignore[misc,valid-type]
    """An lm_eval LM over a kubetune model (`LlamaForCausalLM`, optionally LoRA-wrapped) and tokenizer."""

    backend = "causal"

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        batch_size: int = 8,
        max_length: int = 2048,
        add_bos_token: bool = True,
        max_gen_toks: int = 256,
        seed: int = 42,
    ) -> None:
        require_lm_eval()
        super().__init__()
        self.model = model.eval()
        self.kt_tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.add_bos_token = add_bos_token
        self.max_gen_toks = max_gen_toks
        self.seed = seed
        self._device = model.model.embed_tokens.weight.device

    # ---- tokenization (TemplateLM builds loglikelihood() on these) ----
    @property
    def eot_token_id(self) -> int:
        return self.kt_tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.kt_tokenizer.bos_id
        return bos if bos is not None else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs: Any) -> list[int]:
        add_bos = self.add_bos_token if add_special_tokens is None else add_special_tokens
        return self.kt_tokenizer.encode(string, add_bos=add_bos)

    def tok_decode(self, tokens: Sequence[int], **kwargs: Any) -> str:
        return self.kt_tokenizer.decode(list(tokens))

    @property
    def tokenizer_name(self) -> str:
        return type(self.kt_tokenizer).__name__

    # ---- the three request types ----
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        pairs = [(list(context), list(continuation)) for _, context, continuation in requests]
        scores = score_requests(self.model, pairs, self.batch_size, self.max_length, self._pad_id())
        for (strings, _, _), score in zip(requests, scores):
            self.cache_hook.add_partial("loglikelihood", strings, score)
        return scores

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        pairs, owners = [], []
        for index, request in enumerate(requests):
            (text,) = request.args
            for window in rolling_windows(self.tok_encode(text, add_special_tokens=False), self.prefix_token_id, self.max_length):
                pairs.append(window)
                owners.append(index)
        scores = score_requests(self.model, pairs, self.batch_size, self.max_length, self._pad_id())
        totals = [0.0] * len(requests)
        for index, (logprob, _) in zip(owners, scores):
            totals[index] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (request.args[0],), total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from kubetune.trainer.generation import generate

        outputs: list[Optional[str]] = [None] * len(requests)
        # Requests with the same generation settings are batched together.
        by_kwargs: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            by_kwargs.setdefault(repr(sorted(request.args[1].items())), []).append(index)
        for indices in by_kwargs.values():
            kwargs = dict(requests[indices[0]].args[1])
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", kwargs.pop("max_new_tokens", self.max_gen_toks)))
            do_sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 0.0)) if do_sample else 0.0
            if max_new >= self.max_length:
                raise KubetuneError(
                    f"an lm-eval task asks for {max_new} new tokens but max_seq_len is {self.max_length}; raise max_seq_len"
                )
            for batch_index, batch in enumerate(chunks(indices, self.batch_size)):
                prompts = [self.tok_encode(requests[i].args[0])[-(self.max_length - max_new):] for i in batch]
                new_tokens = generate(
                    self.model,
                    prompts,
                    max_new_tokens=max_new,
                    temperature=temperature,
                    top_k=kwargs.get("top_k"),
                    top_p=float(kwargs.get("top_p", 1.0)),
                    seed=self.seed + batch_index,
                    stop_ids=tuple(self.kt_tokenizer.stop_ids),
                    pad_id=self._pad_id(),
                )
                for i, ids in zip(batch, new_tokens):
                    outputs[i] = M.cut_at_stop(self.tok_decode(ids), until)
                    self.cache_hook.add_partial("generate_until", requests[i].args, outputs[i])
        return outputs  # type: ignore[return-value]

    def _pad_id(self) -> int:
        pad = getattr(self.kt_tokenizer, "pad_id", None)
        return pad if pad is not None and pad >= 0 else self.eot_token_id


def check_task_names(names: Sequence[str], task_manager) -> None:
    """Unknown lm-eval task names are errors that suggest the nearest known name."""
    known = set(task_manager.all_tasks)
    for name in names:
        if name not in known:
            nearest = difflib.get_close_matches(name, list(known), n=3)
            hint = f"did you mean {', '.join(nearest)}? " if nearest else ""
            raise KubetuneError(
                f"tasks: unknown lm-eval task '{name}'; {hint}a local task needs name, type and path; "
                "custom lm-eval task YAMLs are found through lm_eval_include_path"
            )


def task_manager_for(task_names: Sequence[str], include_path: Optional[str] = None):
    """lm-eval's task index. Indexing its ~15k built-in task YAMLs takes many seconds, so when
    every requested task is defined under `include_path`, only that folder is indexed."""
    from lm_eval.tasks import TaskManager

    if include_path:
        if not os.path.isdir(include_path):
            raise KubetuneError(f"lm_eval_include_path: {include_path} is not a folder; point it at your task YAMLs")
        local = TaskManager(include_path=include_path, include_defaults=False)
        if set(task_names) <= set(local.all_tasks):
            return local
        return TaskManager(include_path=include_path)
    return TaskManager()


def run_lm_eval(
    lm: KubetuneLM,
    task_names: Sequence[str],
    *,
    include_path: Optional[str] = None,
    num_fewshot: int = 0,
    limit: Optional[int] = None,
    seed: int = 42,
    task_manager=None,
) -> dict[str, dict[str, Any]]:
    """Run lm-eval tasks; results in our shape: {task: {type, n, metrics: {name: {value, stderr}}}}.

    Pass a `task_manager` already checked with check_task_names to skip indexing twice."""
    require_lm_eval()
    from lm_eval import simple_evaluate

    manager = task_manager
    if manager is None:
        manager = task_manager_for(task_names, include_path)
        check_task_names(task_names, manager)
    output = simple_evaluate(
        model=lm,
        tasks=list(task_names),
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        log_samples=False,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
        # Means get lm-eval's closed-form stderr; the few bootstrapped metrics (bleu, f1, ...) 1000 draws.
        bootstrap_iters=1000,
    )
    return convert_results(output)


def convert_results(output: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """lm-eval's {"results": {task: {"acc,none": v, "acc_stderr,none": s, ...}}} -> our shape."""
    tasks: dict[str, dict[str, Any]] = {}
    samples = output.get("n-samples", {})
    for task, values in output["results"].items():
        task_metrics: dict[str, dict[str, Any]] = {}
        for key, value in values.items():
            name, _, filter_name = key.partition(",")
            if not filter_name or name.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            label = name if filter_name == "none" else f"{name},{filter_name}"
            stderr = values.get(f"{name}_stderr,{filter_name}")
            task_metrics[label] = {"value": float(value), "stderr": stderr if isinstance(stderr, (int, float)) else None}
        n = samples.get(task, {}).get("effective", values.get("samples"))
        tasks[task] = {"type": "lm_eval", "n": n, "metrics": task_metrics}
    return tasks

