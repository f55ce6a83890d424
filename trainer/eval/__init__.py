"""Evaluation: local JSONL tasks (perplexity, multiple choice, generate) and an lm-eval adapter.

`tasks` and `metrics` are torch-free; `scoring` runs the model; `lm_eval_adapter` needs the
optional `lm-eval` package (`pip install kubetune[eval]`).
"""
