"""Llama 3.x model definitions: plain modules, no torch.distributed."""
from .args import LlamaArgs, RopeScaling
from .llama import Llama, build_llama, count_parameters, llama3_inv_freq

__all__ = ["LlamaArgs", "RopeScaling", "Llama", "build_llama", "count_parameters", "llama3_inv_freq"]
