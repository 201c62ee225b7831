"""Norms, MLPs and the projection helper, each variant one entry in a table.

Every parameter carries logical axis names; parallel/ maps them onto mesh axes.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from model.config import ModelConfig


def dense(cfg: ModelConfig, features, axes: tuple[str, ...], name: str, *, in_axes=-1, std=None):
    """A bias-free projection whose kernel has logical axes `axes` (input axes first)."""
    init = nn.initializers.normal(cfg.init_std if std is None else std)
    return nn.DenseGeneral(
        features=features,
        axis=in_axes,
        use_bias=False,
        dtype=jnp.dtype(cfg.dtype),
        param_dtype=jnp.dtype(cfg.param_dtype),
        kernel_init=nn.with_logical_partitioning(init, axes),
        name=name,
    )


class RMSNorm(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        scale_D = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
            (x_BTD.shape[-1],),
            jnp.dtype(self.cfg.param_dtype),
        )
        x = x_BTD.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.cfg.norm_eps)
        return (x * scale_D).astype(x_BTD.dtype)


class LayerNorm(nn.Module):
    cfg: ModelConfig

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

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        cfg = self.cfg
        gate_BTF = dense(cfg, cfg.d_ff, ("embed", "mlp"), "gate")(x_BTD)
        up_BTF = dense(cfg, cfg.d_ff, ("embed", "mlp"), "up")(x_BTD)
        h_BTF = nn.with_logical_constraint(nn.silu(gate_BTF) * up_BTF, ("batch", "length", "mlp"))
        return dense(cfg, cfg.d_model, ("mlp", "embed"), "down", std=output_std(cfg))(h_BTF)


class GeluMLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        cfg = self.cfg
        h_BTF = nn.gelu(dense(cfg, cfg.d_ff, ("embed", "mlp"), "up")(x_BTD))
        h_BTF = nn.with_logical_constraint(h_BTF, ("batch", "length", "mlp"))
        return dense(cfg, cfg.d_model, ("mlp", "embed"), "down", std=output_std(cfg))(h_BTF)


MLPS: dict[str, type[nn.Module]] = {"swiglu": SwiGLU, "gelu": GeluMLP}

# Weight matrices per MLP kind, for parameter and FLOPs accounting.
MLP_MATRICES: dict[str, int] = {"swiglu": 3, "gelu": 2}


def output_std(cfg: ModelConfig) -> float:
    """Residual-branch output projections start smaller, as in GPT-2: std / sqrt(2 * layers)."""
    return cfg.init_std / (2 * cfg.num_layers) ** 0.5
