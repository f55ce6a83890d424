"""Native PyTorch models (the Llama family), with Hugging Face parameter names."""
from kubetune.trainer.models.llama import KVCache, LlamaForCausalLM, ModelArgs, UnsupportedModelError

__all__ = ["KVCache", "LlamaForCausalLM", "ModelArgs", "UnsupportedModelError"]
