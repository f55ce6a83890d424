"""The lora: section and the built-in LoRA configs (torch-free validation, as the operator runs it)."""
from __future__ import annotations

import pytest

from kubetune.trainer.config import ConfigError, load_config, resolve_config
from kubetune.trainer.config.catalog import list_builtin_configs

LORA_CONFIGS = ["tiny_lora", "tiny_qlora", "llama3_1_8b_lora", "llama3_1_8b_qlora", "llama3_2_1b_lora",
                "qwen2_5_7b_lora", "mistral_7b_lora"]


@pytest.mark.parametrize("name", LORA_CONFIGS)
def test_builtin_lora_configs_validate_and_name_their_recipe(name):
    assert load_config(name)["recipe"] == "lora_finetune"
    cfg = resolve_config("lora_finetune", name)
    assert cfg.lora.rank > 0 and cfg.lora.target_modules
    assert (cfg.model.quantize_base == "nf4") == ("qlora" in name)
    assert name in list_builtin_configs()["lora_finetune"]


@pytest.mark.parametrize(
    "override,message",
    [
        ("lora.rank=0", "lora.rank: Input should be greater than 0"),
        ("lora.target_modules=[q_proj,q_proj]", "lora.target_modules: Value error, lists q_proj more than once"),
        ("lora.target_modules=[]", "lora.target_modules"),
        ("lora.target_modules=[c_attn]", "lora.target_modules: expected a list of one of 'q_proj'"),
        ("lora.alpha=-1", "lora.alpha"),
        ("lora.dropout=1.0", "lora.dropout"),
    ],
)
def test_bad_lora_section_names_the_field(override, message):
    with pytest.raises(ConfigError) as err:
        resolve_config("lora_finetune", "tiny_lora", [override])
    assert message in str(err.value)
