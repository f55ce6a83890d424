"""DPO learns a preference: the pipeline's own flow on a synthetic task made here.

The tiny model is first instruction-tuned (full_finetune, chat format) on questions about the
synthetic facts answered half the time correctly and half the time with a wrong word, so its
greedy answers are a mix of both. The dpo recipe then trains on pairs with the correct answer
chosen and the wrong one rejected (chat preference records). On held-out questions the reward
accuracy must pass 0.9, and the greedy answers must move to the chosen ones.
"""
from __future__ import annotations

import json
import random

import pytest

from kubetune.trainer.config import resolve_config
from kubetune.trainer.data.synthetic import FACTS, PHRASINGS, question
from kubetune.trainer.training.metrics import read_metrics

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.slow]  # ~1-3 min: two training runs
# One wrong answer per kind of question, never a right one: what a confused model says instead of the fact.
WRONG = {"sound": "beep", "color": "plaid", "opposite": "maybe"}


def make_task(folder):
    rng = random.Random(0)
    pairs = []
    for fact in FACTS:
        for phrasing in range(len(PHRASINGS[fact.relation])):
            pairs.append({"prompt": [{"role": "user", "content": question(fact, phrasing)}],
                          "chosen": fact.answer, "rejected": WRONG[fact.relation]})
    rng.shuffle(pairs)
    held_out, train = pairs[:16], pairs[16:]
    write_jsonl(folder / "train.jsonl", train)
    write_jsonl(folder / "held_out.jsonl", held_out)
    write_jsonl(folder / "sft.jsonl", [{"messages": p["prompt"] + [{"role": "assistant", "content": p[side]}]}
                                       for p in pairs for side in ("chosen", "rejected")])
    return held_out


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def greedy_answers(model_dir, records):
    from kubetune.trainer.checkpoint import load_pretrained
    from kubetune.trainer.generation import generate
    from kubetune.trainer.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    prompts = [tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True) for r in records]
    outputs = generate(load_pretrained(model_dir).eval(), prompts, max_new_tokens=6, stop_ids=tokenizer.stop_ids,
                       pad_id=tokenizer.pad_id)
    answers = [tokenizer.decode(o).strip() for o in outputs]
    chosen = sum(a == r["chosen"] for a, r in zip(answers, records))
    rejected = sum(a == r["rejected"] for a, r in zip(answers, records))
    return chosen, rejected, answers


def test_dpo_raises_held_out_reward_accuracy_and_moves_greedy_answers_to_the_chosen(tmp_path):
    from kubetune.trainer.recipes.dpo import recipe_main
    from kubetune.trainer.recipes.full_finetune import recipe_main as finetune

    held_out = make_task(tmp_path)
    common = ["progress_bar=false", "resume=never", "save_every_steps=null", "max_seq_len=48", "epochs=100",
              "log_every_steps=10"]
    finetune(resolve_config("full_finetune", "tiny_full", [
        *common, f"output_dir={tmp_path / 'sft'}", f"dataset.source={tmp_path / 'sft.jsonl'}", "dataset.format=chat",
        "dataset.eval_fraction=0", "eval_every_steps=null", "max_steps=300", "optimizer.lr=3e-3"]))
    before_chosen, before_rejected, before = greedy_answers(tmp_path / "sft" / "model", held_out)

    summary = recipe_main(resolve_config("dpo", "tiny_dpo", [
        *common, f"output_dir={tmp_path / 'dpo'}", f"model.path={tmp_path / 'sft'}", f"dataset.source={tmp_path}",
        "dataset.split=train", "dataset.eval_split=held_out", "max_steps=40", "eval_every_steps=20",
        "optimizer.lr=5e-4", "beta=0.5"]))
    after_chosen, after_rejected, after = greedy_answers(tmp_path / "dpo" / "model", held_out)

    evals = [r for r in read_metrics(tmp_path / "dpo" / "metrics.jsonl") if "eval_loss" in r]
    assert evals[0]["eval_rewards/accuracy"] == 0.0 and evals[-1]["eval_rewards/accuracy"] > 0.9, evals
    assert evals[-1]["eval_rewards/margin"] > evals[0]["eval_rewards/margin"] + 0.5
    assert summary["rewardAccuracy"] > 0.9
    print("greedy before:", before, "after:", after)
    assert before_rejected >= 3, before  # the reference really was confused
    assert after_chosen >= before_chosen + 3 and after_rejected <= before_rejected // 2, (before, after)
    assert after_chosen >= len(held_out) // 2 and after_chosen >= 4 * max(1, after_rejected), after
