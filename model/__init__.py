"""The network's math: a pure-functional Flax Linen decoder-only transformer."""

from model.accounting import ParamCounts, flops_per_token, param_counts
from model.config import LayerSpec, ModelConfig
from model.transformer import Output, Transformer, init_variables, layer_groups, logits, stack_layers, unstack_layers

__all__ = [
    "LayerSpec",
    "ModelConfig",
    "Output",
    "ParamCounts",
    "Transformer",
    "flops_per_token",
    "init_variables",
    "layer_groups",
    "logits",
    "param_counts",
    "stack_layers",
    "unstack_layers",
]
