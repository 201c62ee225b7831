"""The network's math: a pure-functional Flax Linen decoder-only transformer."""

from model.accounting import ParamCounts, flops_per_token, param_counts
from model.config import ModelConfig
from model.transformer import Transformer, unstack_layers

__all__ = ["ModelConfig", "ParamCounts", "Transformer", "flops_per_token", "param_counts", "unstack_layers"]
