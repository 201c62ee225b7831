"""Norms, dense MLP kinds and the projection helper, each variant one entry in a table.

An MLP kind is a module `(cfg) -> x_BTD -> (y_BTD, aux)` (aux: named auxiliary terms, see model.aux) with static
`param_count(cfg)` and `matmul_params(cfg)` (the weights each token is multiplied by) for the accounting.

Every parameter carries logical axis names; parallel/ maps them onto mesh axes.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import flax.linen as nn
import jax
import jax.numpy as jnp

from model import weights
from model.runtime import TRAINING

if TYPE_CHECKING:  # model.config imports model.moe, which builds on these layers
    from model.config import ModelConfig
    from model.runtime import Runtime


@jax.custom_vjp
def matmul(x_MK: jax.Array, w_KN: jax.Array) -> jax.Array:
    """x @ w whose backward pass is spelled out as dy @ w.T and x.T @ dy.

    Same math as autodiff; XLA:CPU lays out autodiff's weight-gradient dot with a transposed copy
    of the (large) output gradient that runs several times slower than this form (BENCHMARKS.md).
    """
    return x_MK @ w_KN


def _matmul_fwd(x_MK, w_KN):
    return x_MK @ w_KN, (x_MK, w_KN)


def _matmul_bwd(residuals, dy_MN):
    x_MK, w_KN = residuals
    return dy_MN @ w_KN.T, x_MK.T @ dy_MN


matmul.defvjp(_matmul_fwd, _matmul_bwd)

CALIBRATION = "calibration"  # the collection input statistics are sown into while calibrating (model/quant)


def observe(module: nn.Module, name: str, x_MK: jax.Array, group_M: jax.Array | None = None, groups: int = 0):
    """While the "calibration" collection is mutable (model/quant/calibrate.py), adds what weight `name` of `module`
    saw as input, rows x_MK (K: its fan-in, flattened as `weights.Layout.to_matrix` flattens it), to the module's
    sums {"xx": sum x x^T [K, K], "abs": sum |x| [K], "count": rows}; with `group_M` (MoE experts: each row's
    expert, `groups` of them, `groups` meaning none) one sum per group [groups, ...]. Otherwise nothing is computed:
    training, evaluation and decoding pay nothing for it."""
    if not module.is_mutable_collection(CALIBRATION):
        return
    x = x_MK.astype(jnp.float32)
    if group_M is None:
        stats = {"xx": x.T @ x, "abs": jnp.sum(jnp.abs(x), 0), "count": jnp.asarray(x.shape[0], jnp.float32)}
    else:
        one_hot_MG = jax.nn.one_hot(group_M, groups, dtype=jnp.float32)  # a row of group `groups`: all zeros
        stats = {
            "xx": jnp.einsum("mg,mk,ml->gkl", one_hot_MG, x, x),
            "abs": one_hot_MG.T @ jnp.abs(x),
            "count": jnp.sum(one_hot_MG, 0),
        }
    module.sow(
        CALIBRATION,
        name,
        stats,
        init_fn=lambda: jax.tree.map(jnp.zeros_like, stats),
        reduce_fn=lambda total, new: jax.tree.map(jnp.add, total, new),
    )


class Dense(nn.Module):
    """A bias-free projection contracting the last `num_in` axes of x; its weight "kernel" (axes `axes`) is read
    through the weight seam in format `fmt` (model/weights.py)."""

    cfg: ModelConfig
    features: tuple[int, ...]
    axes: tuple[str, ...]
    num_in: int = 1
    std: float | None = None
    fmt: str = "float"

    @property
    def layout(self) -> weights.Layout:
        return weights.Layout(fan_in=tuple(range(self.num_in)))

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, in_shape = self.cfg, x.shape[-self.num_in :]
        init = nn.initializers.normal(hidden_std(cfg) if self.std is None else self.std)
        kernel = weights.declare(
            self, self.fmt, "kernel", init, (*in_shape, *self.features), self.axes, cfg, layout=self.layout
        )
        k = math.prod(in_shape)
        x_MK = x.reshape(-1, k).astype(jnp.dtype(cfg.dtype))
        observe(self, "kernel", x_MK)
        y = kernel.matmul(x_MK)  # a quantized kernel, dequantized tile by tile
        if y is None:
            y = matmul(x_MK, kernel.value().reshape(k, -1))
        return y.reshape(*x.shape[: -self.num_in], *self.features)


def dense(
    cfg: ModelConfig, rt: Runtime, features, axes: tuple[str, ...], name: str, *, num_in: int = 1, std=None
) -> Dense:
    features = tuple(features) if isinstance(features, (tuple, list)) else (features,)
    return Dense(cfg, features, axes, num_in=num_in, std=std, fmt=rt.weights, name=name)


class RMSNorm(nn.Module):
    """RMSNorm over the last axis, whose logical name is `axis` (QK-norm normalises each head: "head_dim")."""

    cfg: ModelConfig
    axis: str = "embed"
    vectors = 1  # parameters per channel

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        scale_D = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones, (self.axis,)),
            (x_BTD.shape[-1],),
            jnp.dtype(self.cfg.param_dtype),
        )
        x = x_BTD.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.cfg.norm_eps)
        return (x * scale_D).astype(x_BTD.dtype)


class LayerNorm(nn.Module):
    cfg: ModelConfig
    vectors = 2

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        dim, pdtype = x_BTD.shape[-1], jnp.dtype(self.cfg.param_dtype)
        scale_D = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)), (dim,), pdtype)
        bias_D = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), (dim,), pdtype)
        x = x_BTD.astype(jnp.float32)
        x = x - jnp.mean(x, axis=-1, keepdims=True)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.cfg.norm_eps)
        return (x * scale_D + bias_D).astype(x_BTD.dtype)


NORMS: dict[str, type[nn.Module]] = {"rmsnorm": RMSNorm, "layernorm": LayerNorm}


class SwiGLU(nn.Module):
    """Shazeer (2020): down(silu(gate(x)) * up(x))."""

    cfg: ModelConfig
    rt: Runtime = TRAINING
    matrices = 3

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> tuple[jax.Array, dict]:
        cfg, rt = self.cfg, self.rt
        gate_BTF = dense(cfg, rt, cfg.d_ff, ("embed", "mlp"), "gate")(x_BTD)
        up_BTF = dense(cfg, rt, cfg.d_ff, ("embed", "mlp"), "up")(x_BTD)
        h_BTF = nn.with_logical_constraint(nn.silu(gate_BTF) * up_BTF, ("batch", "length", "mlp"))
        return dense(cfg, rt, cfg.d_model, ("mlp", "embed"), "down", std=output_std(cfg))(h_BTF), {}

    @classmethod
    def param_count(cls, cfg: ModelConfig) -> int:
        return cls.matrices * cfg.d_model * cfg.d_ff

    matmul_params = param_count  # every weight is used by every token


class GeluMLP(nn.Module):
    cfg: ModelConfig
    rt: Runtime = TRAINING
    matrices = 2

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> tuple[jax.Array, dict]:
        cfg, rt = self.cfg, self.rt
        h_BTF = nn.gelu(dense(cfg, rt, cfg.d_ff, ("embed", "mlp"), "up")(x_BTD))
        h_BTF = nn.with_logical_constraint(h_BTF, ("batch", "length", "mlp"))
        return dense(cfg, rt, cfg.d_model, ("mlp", "embed"), "down", std=output_std(cfg))(h_BTF), {}

    param_count = classmethod(SwiGLU.param_count.__func__)
    matmul_params = param_count


MLPS: dict[str, type[nn.Module]] = {"swiglu": SwiGLU, "gelu": GeluMLP}


def hidden_std(cfg: ModelConfig) -> float:
    """Init std of hidden (width x width) matrices: init_std, or under muP init_std / sqrt(width_mult), so
    their variance scales as 1 / fan_in from the base width on (Yang et al. 2022, Tensor Programs V)."""
    return cfg.init_std / cfg.width_mult**0.5


def output_std(cfg: ModelConfig) -> float:
    """Residual-branch output projections start smaller, as in GPT-2: hidden std / sqrt(2 * layers)."""
    return hidden_std(cfg) / (2 * cfg.num_layers) ** 0.5


class Embed(nn.Module):
    """The token embedding table "embedding" [vocab, d_model], read through the weight seam: looked up by token
    ids, and with tied embeddings also the output head (`attend`). Computes what flax's nn.Embed does."""

    cfg: ModelConfig
    rt: Runtime

    def setup(self):
        init = nn.initializers.normal(self.cfg.init_std)
        shape = (self.cfg.vocab_size, self.cfg.d_model)
        self.table = weights.declare(
            self, self.rt.weights, "embedding", init, shape, ("vocab", "embed"), self.cfg, layout=weights.Layout((1,))
        )
        # A quantized table is never dequantized whole: lookups dequantize their rows, the tied head tile by tile.
        self.table_VD = None if self.table.fused else self.table.value()

    def __call__(self, tokens_BT: jax.Array) -> jax.Array:
        if self.table_VD is None:
            return self.table.take(tokens_BT)
        return jnp.take(self.table_VD, tokens_BT, axis=0)

    def attend(self, x_BTD: jax.Array) -> jax.Array:
        observe(self, "embedding", x_BTD.reshape(-1, x_BTD.shape[-1]))
        if self.table_VD is None:  # its matrix is [D, V]: x @ table.T
            *lead, D = x_BTD.shape
            return self.table.matmul(x_BTD.reshape(-1, D).astype(self.table.dtype)).reshape(*lead, -1)
        return jnp.dot(x_BTD.astype(self.table_VD.dtype), self.table_VD.T)


def token_embedding(cfg: ModelConfig, rt: Runtime) -> Embed:
    """The token embedding ("embed"), created in the calling module (the transformer; MTP drafting reuses it)."""
    return Embed(cfg, rt, name="embed")


def output_head(cfg: ModelConfig, rt: Runtime, embedding: Embed):
    """`logits_of(hidden_BTD, norm=None)` -> float32 logits_BTV: the final norm ("final_norm"; `norm`, a head's
    own norm module, replaces it), the unembedding (tied, or "head") and muP's multiplier and the logit softcap.
    Created once in the calling module and called by every head that shares it (the main head, the multi-token
    prediction heads)."""
    final_norm = NORMS[cfg.norm](cfg, name="final_norm")
    head = None if cfg.tie_embeddings else dense(cfg, rt, cfg.vocab_size, ("embed", "vocab"), "head", std=cfg.init_std)

    def logits_of(x_BTD: jax.Array, norm: nn.Module | None = None) -> jax.Array:
        x_BTD = (final_norm if norm is None else norm)(x_BTD)
        logits_BTV = embedding.attend(x_BTD) if head is None else head(x_BTD)
        if cfg.width_mult != 1.0:  # muP's output multiplier keeps logits O(1) as the width grows
            logits_BTV = logits_BTV / cfg.width_mult
        logits_BTV = logits_BTV.astype(jnp.float32)
        if cfg.final_logit_softcap > 0:
            logits_BTV = cfg.final_logit_softcap * jnp.tanh(logits_BTV / cfg.final_logit_softcap)
        return nn.with_logical_constraint(logits_BTV, ("batch", "length", "vocab"))

    return logits_of
