"""Run local tasks on a model: prompts -> scoring requests -> per-sample scores -> metrics."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from kubetune.errors import KubetuneError
from kubetune.trainer.eval import metrics as M
from kubetune.trainer.eval.scoring import chunks, encode_pair, score_requests, score_rolling
from kubetune.trainer.eval.tasks import Task, generate_prompt, mc_prompt


@dataclass
class TaskResult:
    name: str
    type: str
    n: int
    metrics: dict[str, M.Metric]
    samples: list[dict[str, Any]] = field(default_factory=list)  # per-sample details for samples_<task>.jsonl

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "n": self.n,
            "metrics": {name: {"value": m.value, "stderr": m.stderr} for name, m in self.metrics.items()},
        }


@dataclass(frozen=True)
class RunSettings:
    batch_size: int = 8
    max_seq_len: int = 2048
    num_fewshot: int = 0
    seed: int = 42
    add_bos: bool = True


def evaluate_task(model: torch.nn.Module, tokenizer, task: Task, settings: RunSettings) -> TaskResult:
    if task.type == "multiple_choice":
        return evaluate_multiple_choice(model, tokenizer, task, settings)
    if task.type == "perplexity":
        return evaluate_perplexity(model, tokenizer, task, settings)
    if task.type == "generate":
        return evaluate_generate(model, tokenizer, task, settings)
    raise KubetuneError(f"task '{task.name}': unknown type {task.type!r}; use perplexity, multiple_choice or generate")


def evaluate_multiple_choice(model, tokenizer, task: Task, settings: RunSettings) -> TaskResult:
    samples, options = task.samples, task.options
    requests, owners = [], []
    for index, sample in enumerate(samples):
        prompt, add_bos = model_prompt(tokenizer, mc_prompt(task.pool, index, settings.num_fewshot, settings.seed, options),
                                       options, settings.add_bos)
        for choice in sample.choices:
            requests.append(encode_pair(tokenizer, prompt, options["target_delimiter"] + choice, add_bos,
                                        move_trailing_space=options.get("prompt_format") != "chat"))
            owners.append(index)
    scores = score_requests(model, requests, settings.batch_size, settings.max_seq_len, _pad_id(tokenizer))
    loglikelihoods: list[list[float]] = [[] for _ in samples]
    for index, (logprob, _) in zip(owners, scores):
        loglikelihoods[index].append(logprob)
    acc, acc_norm, details = [], [], []
    for sample, lls in zip(samples, loglikelihoods):
        pred, pred_norm = M.choice_predictions(lls, sample.choices)
        acc.append(float(pred == sample.answer))
        acc_norm.append(float(pred_norm == sample.answer))
        details.append({"answer": sample.answer, "pred": pred, "pred_norm": pred_norm, "loglikelihoods": lls})
    metrics = {"acc": M.mean_with_stderr(acc), "acc_norm": M.mean_with_stderr(acc_norm)}
    return TaskResult(task.name, task.type, len(samples), metrics, details)


def evaluate_perplexity(model, tokenizer, task: Task, settings: RunSettings) -> TaskResult:
    texts = [sample.text for sample in task.samples]
    documents = [tokenizer.encode(text, add_bos=False) for text in texts]
    prefix = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    scored = score_rolling(model, documents, prefix, settings.batch_size, settings.max_seq_len, _pad_id(tokenizer))
    nll = -sum(logprob for logprob, _ in scored)
    n_tokens = sum(count for _, count in scored)
    if n_tokens == 0:
        raise KubetuneError(f"task '{task.name}': the texts in {task.path} encode to no tokens")
    metrics = M.perplexity_metrics(
        nll, n_tokens, sum(M.count_words(t) for t in texts), sum(M.count_bytes(t) for t in texts)
    )
    details = [{"loglikelihood": logprob, "tokens": count} for logprob, count in scored]
    return TaskResult(task.name, task.type, len(texts), metrics, details)


def evaluate_generate(model, tokenizer, task: Task, settings: RunSettings) -> TaskResult:
    from kubetune.trainer.generation import generate

    samples, options = task.samples, task.options
    max_prompt = settings.max_seq_len - options["max_new_tokens"]
    if max_prompt < 1:
        raise KubetuneError(
            f"task '{task.name}': options.max_new_tokens={options['max_new_tokens']} leaves no room for the "
            f"prompt in max_seq_len={settings.max_seq_len}; lower it or raise max_seq_len"
        )
    prompts = [
        model_prompt(tokenizer, generate_prompt(task.pool, i, settings.num_fewshot, settings.seed, options), options,
                     settings.add_bos)
        for i in range(len(samples))
    ]
    encoded = [tokenizer.encode(p, add_bos=add_bos)[-max_prompt:] for p, add_bos in prompts]
    texts: list[str] = []
    for batch_index, batch in enumerate(chunks(encoded, settings.batch_size)):
        new_tokens = generate(
            model,
            list(batch),
            max_new_tokens=options["max_new_tokens"],
            temperature=options["temperature"],
            top_k=options["top_k"],
            top_p=options["top_p"],
            seed=settings.seed + batch_index,
            stop_ids=tuple(tokenizer.stop_ids),
            pad_id=_pad_id(tokenizer),
        )
        texts.extend(M.cut_at_stop(tokenizer.decode(ids), options["until"]) for ids in new_tokens)
    correct = [float(M.generation_correct(text, s.answers, options)) for text, s in zip(texts, samples)]
    details = [{"generated": text, "answers": list(s.answers), "correct": bool(c)} for text, s, c in zip(texts, samples, correct)]
    return TaskResult(task.name, task.type, len(samples), {f"{options['match']}_match": M.mean_with_stderr(correct)}, details)


def model_prompt(tokenizer, prompt: str, options: dict[str, Any], add_bos: bool) -> tuple[str, bool]:
    """(text, add_bos) the model is given: with prompt_format chat, the prompt as one user turn in the
    tokenizer's chat template followed by the assistant header (the template brings its own BOS)."""
    if options.get("prompt_format") == "chat":
        return tokenizer.render_chat([{"role": "user", "content": prompt}], add_generation_prompt=True), False
    return prompt, add_bos


def _pad_id(tokenizer) -> int:
    for candidate in (getattr(tokenizer, "pad_id", None), tokenizer.eos_id, 0):
        if candidate is not None and candidate >= 0:
            return int(candidate)
    return 0
