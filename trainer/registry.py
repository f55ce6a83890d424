"""The recipes kubetune runs and their config models. Torch-free: the CLI and the operator read it."""
from __future__ import annotations

import difflib
from dataclasses import dataclass

from kubetune.trainer.config.base import ConfigError


@dataclass(frozen=True)
class RecipeInfo:
    name: str
    module: str  # exposes recipe_main(cfg) -> dict (the run summary)
    config_model: str  # "module:Class", a torch-free pydantic model
    description: str
    trains: bool  # produces a model/adapter (FineTuneJob recipes)
    distributed: bool = False  # runs under torchrun with WORLD_SIZE > 1 (FSDP2); others refuse it


RECIPES: dict[str, RecipeInfo] = {
    info.name: info
    for info in [
        RecipeInfo(
            "full_finetune",
            "kubetune.trainer.recipes.full_finetune",
            "kubetune.trainer.config.finetune:FullFinetuneConfig",
            "Full-parameter fine-tuning on one device, or FSDP2 under torchrun (--nproc-per-node).",
            trains=True,
            distributed=True,
        ),
        RecipeInfo(
            "lora_finetune",
            "kubetune.trainer.recipes.lora_finetune",
            "kubetune.trainer.config.lora:LoRAFinetuneConfig",
            "LoRA / DoRA fine-tuning; QLoRA with model.quantize_base: nf4. Adapters in PEFT format. FSDP2 under torchrun.",
            trains=True,
            distributed=True,
        ),
        RecipeInfo(
            "dpo",
            "kubetune.trainer.recipes.dpo",
            "kubetune.trainer.config.dpo:DPOConfig",
            "Preference alignment on chosen/rejected pairs: DPO, IPO or SimPO; full or LoRA/QLoRA (lora: section). FSDP2 under torchrun.",
            trains=True,
            distributed=True,
        ),
        RecipeInfo(
            "generate",
            "kubetune.trainer.recipes.generate",
            "kubetune.trainer.config.generate:GenerateConfig",
            "Generate text from a prompt (greedy or sampled); prints only the text on stdout.",
            trains=False,
        ),
        RecipeInfo(
            "eval",
            "kubetune.trainer.recipes.eval",
            "kubetune.trainer.config.eval:EvalConfig",
            "Evaluate a model or model + adapter on local tasks or lm-evaluation-harness tasks.",
            trains=False,
        ),
    ]
}


def get_recipe(name: str) -> RecipeInfo:
    try:
        return RECIPES[name]
    except KeyError:
        nearest = difflib.get_close_matches(name, list(RECIPES), n=1)
        hint = f"did you mean '{nearest[0]}'? " if nearest else ""
        raise ConfigError(f"unknown recipe '{name}'; {hint}known recipes: {', '.join(RECIPES)}") from None


def refuse_unless_distributed(info: RecipeInfo, world_size: int) -> None:
    """Under torchrun with WORLD_SIZE > 1, a recipe that runs in one process only (eval, generate)
    fails at once: N uncoordinated copies would race on one output folder."""
    if world_size > 1 and not info.distributed:
        able = ", ".join(name for name, recipe in RECIPES.items() if recipe.distributed)
        raise ConfigError(
            f"recipe {info.name} runs in one process only, but WORLD_SIZE={world_size} (torchrun, "
            f"`kubetune run --nproc-per-node`, or a job with nodes x gpusPerNode > 1); run it as one process "
            f"(no --nproc-per-node; gpusPerNode: 1). Recipes that run distributed: {able}"
        )
