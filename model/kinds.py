"""The tables a layer is built from: attention kinds (`model.attention`) and MLP kinds (`model.mlp`).

A new kind is one module plus one entry here. An attention kind is a module `(cfg, window, decode, impl,
max_rewind) -> (x_BTD, mask) -> (out_BTD, aux)` that owns its projections, its decode cache and static
`param_count(cfg)`, `matmul_params(cfg)` and `attention_flops(cfg, context)`, and optionally static
`config_errors(cfg)` (its own validation rules, checked by training.config when the kind is chosen); an MLP kind
is a module `(cfg) -> x_BTD -> (y_BTD, aux)` with static `param_count(cfg)` and `matmul_params(cfg)` (active
weights), and optionally `layer_kind(cfg, layer)`: the MLP kind each layer takes when it is `model.mlp` (MoE:
dense layers between sparse ones), which `ModelConfig.layer_specs` asks.
"""

from __future__ import annotations

import flax.linen as nn

from model.gqa import GQA
from model.layers import MLPS
from model.mla import MLA
from model.moe import MoE

ATTENTION_KINDS: dict[str, type[nn.Module]] = {"gqa": GQA, "mla": MLA}
MLP_KINDS: dict[str, type[nn.Module]] = {**MLPS, "moe": MoE}
