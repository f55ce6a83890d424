"""The trainer: recipes, models, tokenizers, datasets, checkpoints (imports torch lazily per module)."""
