"""An MLP kind for tests of the seams: a SwiGLU of its input minus a running mean of that input, kept as
non-trained state (sharded over `embed`, updated by a rule in every train step), plus an auxiliary loss. The
state changes the output, so a run that lost or mangled it would train differently. Importing this module
registers it as model.mlp='toy'."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from model.aux import Aux
from model.kinds import MLP_KINDS
from model.layers import SwiGLU
from model.runtime import TRAINING, Runtime

AUX_WEIGHT = 0.5
MOMENTUM = 0.75


class ToyMLP(nn.Module):
    cfg: object
    rt: Runtime = TRAINING

    @nn.compact
    def __call__(self, x_BTD: jax.Array):
        mean = self.variable(
            "state",
            "input_mean",
            nn.with_logical_partitioning(jnp.zeros, ("embed",)),
            (x_BTD.shape[-1],),
            jnp.float32,
        )
        y_BTD, _ = SwiGLU(self.cfg, self.rt, name="inner")(x_BTD - nn.unbox(mean.value).astype(x_BTD.dtype))
        if self.is_mutable_collection("state") and not self.is_initializing():
            batch_mean_D = jax.lax.stop_gradient(jnp.mean(x_BTD.astype(jnp.float32), axis=(0, 1)))
            mean.value = MOMENTUM * nn.unbox(mean.value) + (1 - MOMENTUM) * batch_mean_D
        return y_BTD, {"toy_aux": Aux(jnp.mean(jnp.square(y_BTD.astype(jnp.float32))), AUX_WEIGHT)}

    param_count = SwiGLU.param_count
    matmul_params = SwiGLU.matmul_params


MLP_KINDS["toy"] = ToyMLP
