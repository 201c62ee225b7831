"""The tables a layer is built from: attention kinds (`model.attention`) and MLP kinds (`model.mlp`).

A new kind is one module plus one entry here. An attention kind is a module `(cfg, window, decode, impl,
max_rewind) -> (x_BTD, mask) -> (out_BTD, aux)` that owns its projections, its decode cache and static
`param_count(cfg)`, `matmul_params(cfg)` and `attention_flops(cfg, context)`; an MLP kind is a module
`(cfg) -> x_BTD -> (y_BTD, aux)` with static `param_count(cfg)` and `matmul_params(cfg)` (active weights), and
optionally `layer_kind(cfg, layer)`: the MLP kind each layer takes when it is `model.mlp` (MoE: dense layers
between sparse ones), which `ModelConfig.layer_specs` asks.

Either kind may also have
- `config_group = (name, dataclass)`: its own settings, `cfg.<name>` (`model.<name>` in a config file), a
  frozen dataclass declared in its module; model.config gives ModelConfig one field per declared group;
- static `config_errors(cfg)` -> [(condition that must hold, key, value, what is allowed)]: its validation
  rules, checked by training.config when the kind is chosen;
- static `mesh_errors(cfg, mesh)`: the same for rules about the mesh config (`mesh.expert`, ...), also checked
  when chosen.
The kinds' modules import model.config only for type checking: model.config imports them (through this table).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn

from model.gqa import GQA
from model.layers import MLPS
from model.mla import MLA
from model.moe import MoE

ATTENTION_KINDS: dict[str, type[nn.Module]] = {"gqa": GQA, "mla": MLA}
MLP_KINDS: dict[str, type[nn.Module]] = {**MLPS, "moe": MoE}


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """One layer's kinds: layers with equal specs have the same parameters' shapes and run the same code."""

    attention: str  # a key of ATTENTION_KINDS
    window: int  # sliding window of its attention (0: global)
    mlp: str  # a key of MLP_KINDS
