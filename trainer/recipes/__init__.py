"""Recipes: one readable file per way of training or using a model; each exposes `recipe_main(cfg) -> dict`."""
