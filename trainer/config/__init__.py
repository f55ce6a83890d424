"""Recipe configuration: torch-free pydantic models, YAML loading and dotted overrides.

The operator imports this package at admission time, so nothing here may import torch.
"""
from kubetune.trainer.config.base import ConfigError, StrictModel
from kubetune.trainer.config.loader import load_config, parse_overrides, resolve_config

__all__ = ["ConfigError", "StrictModel", "load_config", "parse_overrides", "resolve_config"]
