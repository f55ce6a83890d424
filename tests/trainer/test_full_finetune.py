"""The full_finetune recipe end to end on the synthetic task: it learns, reports as the run
contract says, and its output loads in transformers."""
import json

import pytest
import torch

from kubetune.trainer.config import resolve_config
from kubetune.trainer.training.metrics import read_metrics

pytest.importorskip("kubetune.trainer.tokenizers")


def tiny_config(tmp_path, *overrides):
    return resolve_config("full_finetune", "tiny_full", [
        f"output_dir={tmp_path / 'out'}", "progress_bar=false", "resume=never", *overrides,
    ])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short run shared by the tests below (keeps the suite fast on a shared 2-core box)."""
    from kubetune.trainer.recipes.full_finetune import recipe_main

    tmp_path = tmp_path_factory.mktemp("full")
    log = tmp_path / "termination-log"
    cfg = tiny_config(tmp_path, "max_steps=60", "batch_size=8", "eval_every_steps=20", "save_every_steps=20",
                      "log_every_steps=5", "keep_last_checkpoints=2", "eval_max_batches=2", "metrics_port=0")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the CI box is small and shared: one busy thread beats two waiting ones
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("KUBETUNE_TERMINATION_LOG", str(log))
            summary = recipe_main(cfg)
    finally:
        torch.set_num_threads(threads)
    return {"cfg": cfg, "summary": summary, "out": tmp_path / "out", "log": log}


def test_the_run_draws_its_loss_plot(trained):
    """The recipe's end hook: output_dir/loss.png, a real PNG (tests/trainer/test_plots.py: the rest)."""
    from PIL import Image

    with Image.open(trained["out"] / "loss.png") as image:
        assert image.format == "PNG" and min(image.size) > 100


def test_held_out_loss_falls_well_below_its_start(trained):
    evals = [r["eval_loss"] for r in read_metrics(trained["out"] / "metrics.jsonl") if "eval_loss" in r]
    assert len(evals) == 4  # step 0, 20, 40, 60
    assert evals[-1] < 0.5 * evals[0], evals
    assert trained["summary"]["evalLoss"] == pytest.approx(evals[-1])


def test_metrics_log_checkpoints_and_termination_log_follow_the_run_contract(trained):
    records = read_metrics(trained["out"] / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(5, 61, 5))
    assert all(r["tokens_per_second"] > 0 and r["lr"] > 0 for r in train)
    checkpoints = sorted(p.name for p in (trained["out"] / "checkpoints").iterdir())
    assert checkpoints == ["step_40", "step_60"]  # keep_last_checkpoints=2; step_20 pruned
    summary = json.loads(trained["log"].read_text())
    assert summary == trained["summary"]
    assert summary["steps"] == 60 and summary["checkpoint"] == str(trained["out"] / "model")
    assert summary["finalLoss"] == pytest.approx(train[-1]["loss"]) and summary["tokensPerSecond"] > 0
    assert summary["adapter"] is None


def test_saved_model_loads_in_transformers_and_computes_the_same_logits(trained):
    transformers = pytest.importorskip("transformers")
    from kubetune.trainer.checkpoint import load_pretrained
    from kubetune.trainer.data.formats import format_alpaca_prompt
    from kubetune.trainer.tokenizers import load_tokenizer

    model_dir = trained["out"] / "model"
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    prompt = format_alpaca_prompt("What sound does a cow make?")
    ids = load_tokenizer(str(model_dir)).encode(prompt)
    assert hf_tokenizer(prompt, add_special_tokens=False)["input_ids"] == ids
    with torch.no_grad():
        ours = load_pretrained(model_dir)(torch.tensor([ids]))
        theirs = hf_model(torch.tensor([ids])).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    # And it is the trained model, not the starting one.
    start = load_pretrained("builtin://tiny")
    assert not torch.allclose(start.lm_head.weight, hf_model.lm_head.weight)


def test_run_errors_name_the_problem_without_a_traceback(tmp_path, capsys):
    from kubetune.cli import main

    def run(*overrides):
        code = main(["run", "full_finetune", "--config", "tiny_full", f"output_dir={tmp_path / 'o'}", *overrides])
        return code, capsys.readouterr().err

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "no output"}\n')
    code, err = run(f"dataset.source={bad}")
    assert code == 2 and f"error: {bad} record 2 (line 2): field 'output' is missing" in err
    code, err = run(f"resume={tmp_path}")
    assert code == 2 and "is not a complete checkpoint" in err
    code, err = run("max_seq_len=16")
    assert code == 2 and "raise max_seq_len (now 16)" in err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("overrides", [["dtype=fp32", "bf16_autocast=true"], ["dtype=bf16"]], ids=["autocast", "pure_bf16"])
def test_learns_on_cuda_in_bf16(tmp_path, overrides):
    from kubetune.trainer.recipes.full_finetune import recipe_main

    cfg = tiny_config(tmp_path, "device=cuda", "max_steps=60", "eval_every_steps=60", "activation_checkpointing=true",
                      *overrides)
    recipe_main(cfg)
    evals = [r["eval_loss"] for r in read_metrics(tmp_path / "out" / "metrics.jsonl") if "eval_loss" in r]
    assert evals[-1] < 0.5 * evals[0], evals
