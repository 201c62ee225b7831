"""One layer of the transformer: pre-norm attention of its kind, then pre-norm MLP of its kind, each added to the
residual stream. The trunk's layers (model/transformer.py) and every MTP head (model/mtp.py) are Blocks."""

from __future__ import annotations

from typing import TYPE_CHECKING

import flax.linen as nn
import jax

from model.kinds import ATTENTION_KINDS, MLP_KINDS, LayerSpec
from model.layers import NORMS
from model.mask import Mask
from model.runtime import TRAINING, Runtime

if TYPE_CHECKING:  # model.config imports this module (through model.mtp's heads)
    from model.config import ModelConfig


class Block(nn.Module):
    """`rt` (model/runtime.py) reaches every kind: how it decodes, the mesh's hooks, the weight format."""

    cfg: ModelConfig
    spec: LayerSpec
    rt: Runtime = TRAINING

    @nn.compact
    def __call__(self, x_BTD: jax.Array, mask: Mask):
        cfg, spec, norm = self.cfg, self.spec, NORMS[self.cfg.norm]
        attn = ATTENTION_KINDS[spec.attention](cfg, spec.window, self.rt, name="attn")
        h_BTD, attn_aux = attn(norm(cfg, name="attn_norm")(x_BTD), mask)
        x_BTD = x_BTD + h_BTD
        h_BTD, mlp_aux = MLP_KINDS[spec.mlp](cfg, self.rt, name="mlp")(norm(cfg, name="mlp_norm")(x_BTD))
        x_BTD = x_BTD + h_BTD
        x_BTD = nn.with_logical_constraint(x_BTD, ("batch", "length", "embed"))
        return x_BTD, {**attn_aux, **mlp_aux}  # (carry, output) so the same module runs under nn.scan
