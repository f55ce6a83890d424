"""Recipe configs: YAML + dotted overrides validated by torch-free pydantic models, with errors
that name the field and the fix."""
import pytest
import yaml

from kubetune.trainer.config import ConfigError, parse_overrides, resolve_config
from kubetune.trainer.config.catalog import list_builtin_configs
from kubetune.trainer.config.finetune import FullFinetuneConfig
from kubetune.trainer.config.loader import BUILTIN_CONFIG_DIR, load_config

MINIMAL = {"model": {"path": "builtin://tiny"}, "dataset": {"source": "data.jsonl"}}


def error_of(data, overrides=None, recipe="full_finetune") -> str:
    with pytest.raises(ConfigError) as info:
        resolve_config(recipe, data, overrides)
    return str(info.value)


def test_minimal_config_fills_documented_defaults():
    cfg = resolve_config("full_finetune", MINIMAL)
    assert isinstance(cfg, FullFinetuneConfig)
    assert cfg.tokenizer_path == "builtin://tiny"  # tokenizer.path defaults to model.path
    assert (cfg.dataset.format, cfg.dataset.split, cfg.dataset.train_on_input) == ("alpaca", "train", False)
    assert cfg.resume == "auto" and cfg.checkpoint_on_sigterm is True


def test_every_minimum_key_of_the_issue_is_understood():
    keys = [
        "model.path=m", "tokenizer.path=t", "dataset.source=d", "dataset.format=chat", "dataset.split=s",
        "output_dir=o", "epochs=2", "max_steps=5", "batch_size=3", "gradient_accumulation_steps=4",
        "max_seq_len=128", "optimizer.lr=1e-4", "optimizer.weight_decay=0.1", "lr_scheduler.name=linear",
        "lr_scheduler.warmup_steps=7", "max_grad_norm=0.5", "seed=3", "device=cpu", "dtype=bf16",
        "activation_checkpointing=true", "save_every_steps=10", "keep_last_checkpoints=3",
        "eval_every_steps=20", "metrics_port=9090",
    ]
    cfg = resolve_config("full_finetune", {}, keys)
    assert cfg.tokenizer_path == "t" and cfg.dataset.format == "chat" and cfg.dataset.split == "s"
    assert (cfg.epochs, cfg.max_steps, cfg.batch_size, cfg.gradient_accumulation_steps) == (2, 5, 3, 4)
    assert cfg.optimizer.lr == pytest.approx(1e-4) and cfg.optimizer.weight_decay == pytest.approx(0.1)
    assert (cfg.lr_scheduler.name, cfg.lr_scheduler.warmup_steps) == ("linear", 7)
    assert (cfg.device, cfg.dtype, cfg.activation_checkpointing) == ("cpu", "bf16", True)
    assert (cfg.save_every_steps, cfg.keep_last_checkpoints, cfg.eval_every_steps, cfg.metrics_port) == (10, 3, 20, 9090)


def test_overrides_beat_the_file_and_parse_yaml_scalars(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**MINIMAL, "optimizer": {"lr": 1e-3}, "epochs": 3}))
    cfg = resolve_config("full_finetune", str(path), ["optimizer.lr=1e-4", "max_steps=null", "progress_bar=false"])
    assert cfg.optimizer.lr == pytest.approx(1e-4)
    assert cfg.epochs == 3 and cfg.max_steps is None and cfg.progress_bar is False
    assert parse_overrides(["optimizer.betas=[0.9, 0.95]"]) == [(["optimizer", "betas"], [0.9, 0.95])]


def test_unknown_key_names_it_and_suggests_the_nearest_valid_key():
    assert "optimizer.lrr: unknown key; did you mean 'optimizer.lr'?" in error_of({**MINIMAL, "optimizer": {"lrr": 1}})
    assert "epoch: unknown key; did you mean 'epochs'?" in error_of({**MINIMAL, "epoch": 2})
    assert "dataset.formatt: unknown key; did you mean 'dataset.format'?" in error_of(MINIMAL, ["dataset.formatt=chat"])
    # Nothing close: list what is valid instead of guessing.
    message = error_of({**MINIMAL, "lr_scheduler": {"zzzzzz": 1}})
    assert "lr_scheduler.zzzzzz: unknown key; valid keys here: min_lr_ratio, name, warmup_ratio, warmup_steps" in message


@pytest.mark.parametrize(
    "override, expected",
    [
        ("batch_size=abc", "batch_size: expected an integer, got 'abc' (str)"),
        ("max_steps=1.5", "max_steps: expected an integer or null, got 1.5 (float)"),
        ("max_grad_norm=big", "max_grad_norm: expected a number or null, got 'big' (str)"),
        ("device=tpu", "device: expected one of 'auto', 'cpu', 'cuda', got 'tpu' (str)"),
        ("dataset.format=csv", "dataset.format: expected one of 'alpaca', 'chat', 'prompt_completion', 'text', 'preference', got 'csv'"),
        ("progress_bar=maybe", "progress_bar: expected a boolean (true/false), got 'maybe' (str)"),
        ("optimizer.betas=[0.9]", "optimizer.betas: expected a list of 2 values (a number, a number)"),
        ("model=x", "model: expected a section with keys path, quantize_base, got 'x' (str)"),
    ],
)
def test_wrong_type_names_the_field_and_the_expected_type(override, expected):
    assert expected in error_of(MINIMAL, [override])


def test_constraint_and_missing_errors_name_the_field():
    assert "batch_size: Input should be greater than or equal to 1 (got 0)" in error_of(MINIMAL, ["batch_size=0"])
    assert "model: required section missing; set model.path" in error_of({"dataset": {"source": "d"}})
    assert "dataset.source: required but missing" in error_of({"model": {"path": "m"}, "dataset": {}})


def test_all_errors_are_reported_at_once():
    message = error_of(MINIMAL, ["batch_size=x", "seed=y", "epoch=1"])
    assert "batch_size:" in message and "seed:" in message and "epoch:" in message


def test_quantized_base_is_rejected_for_full_finetune_with_the_fix():
    message = error_of(MINIMAL, ["model.quantize_base=nf4"])
    assert "model.quantize_base" in message and "lora_finetune" in message


def test_malformed_overrides_and_files_are_config_errors(tmp_path):
    assert "expected KEY=VALUE" in error_of(MINIMAL, ["optimizer.lr"])
    assert "expected KEY=VALUE" in error_of(MINIMAL, ["optimizer..lr=1"])
    assert "'epochs' is a value, not a section" in error_of({**MINIMAL, "epochs": 1}, ["epochs.x=1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    assert "not valid YAML" in error_of(str(bad))
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    assert "must be a mapping" in error_of(str(listy))
    assert "no such file and no built-in config" in error_of(str(tmp_path / "missing.yaml"))
    assert "unknown recipe 'full_finetun'; did you mean 'full_finetune'?" in error_of(MINIMAL, recipe="full_finetun")


def test_config_models_are_strict_on_assignment_too():
    cfg = resolve_config("full_finetune", MINIMAL)
    with pytest.raises(ValueError):
        cfg.batch_size = "many"


@pytest.mark.parametrize("path", sorted(BUILTIN_CONFIG_DIR.glob("*_full.yaml")), ids=lambda p: p.stem)
def test_builtin_full_finetune_configs_name_their_recipe_and_validate(path):
    data = load_config(path)
    assert data["recipe"] == "full_finetune"
    cfg = resolve_config("full_finetune", path.stem)  # by built-in name, as `--config NAME`
    assert cfg.model.path and cfg.dataset.source


def test_builtin_configs_cover_the_real_model_families():
    names = set(list_builtin_configs()["full_finetune"])
    assert {"tiny_full", "llama3_1_8b_full", "llama3_2_1b_full", "llama3_2_3b_full", "qwen2_5_7b_full",
            "mistral_7b_full"} <= names
    # Big models default to the memory savers they need on one device.
    for name in names - {"tiny_full"}:
        cfg = resolve_config("full_finetune", name)
        assert cfg.dtype == "bf16" and cfg.activation_checkpointing and cfg.device == "auto"


def test_lora_config_shares_the_training_keys():
    cfg = resolve_config("lora_finetune", MINIMAL, ["lora.rank=4", "optimizer.lr=1e-4"])
    assert cfg.lora.rank == 4 and cfg.optimizer.lr == pytest.approx(1e-4)
    assert "lora.rnak: unknown key; did you mean 'lora.rank'?" in error_of(MINIMAL, ["lora.rnak=4"], recipe="lora_finetune")
