"""Position encodings, one small function or module each, selected by name in `POSITIONS`.

A scheme acts at one of three places: it adds a vector to the token embeddings (`embed`), rotates
queries and keys (`rotate(cfg, x_BTNH, positions_BT)`), or adds a bias to the attention logits (`bias(num_heads)`
gives a function of the query and key positions).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from model import rope as rope_lib

if TYPE_CHECKING:  # model.config imports the kinds (model/kinds.py), which build on this module
    from model.config import ModelConfig


def rope_frequencies(head_dim: int, theta: float) -> jax.Array:
    """Inverse frequencies theta^(-2i/head_dim), i < head_dim/2, as in RoFormer and Llama."""
    return 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)


def apply_rope(x_BTNH: jax.Array, positions_BT: jax.Array, theta: float) -> jax.Array:
    """Rotates pairs (x[i], x[i + H/2]) by angle pos * freq[i] (the half-split layout of Llama)."""
    return rotate_pairs(x_BTNH, positions_BT, rope_frequencies(x_BTNH.shape[-1], theta))


def rotate_pairs(x_BTNH: jax.Array, positions_BT: jax.Array, inv_freq_F, factor: float = 1.0) -> jax.Array:
    """Rotates pairs (x[i], x[i + H/2]) by angle pos * inv_freq[i], cos and sin scaled by `factor` (YaRN)."""
    angles_BTF = positions_BT[..., None].astype(jnp.float32) * jnp.asarray(inv_freq_F, jnp.float32)
    sin_BT1F = jnp.sin(angles_BTF)[:, :, None, :]
    cos_BT1F = jnp.cos(angles_BTF)[:, :, None, :]
    if factor != 1.0:
        sin_BT1F, cos_BT1F = factor * sin_BT1F, factor * cos_BT1F
    x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos_BT1F - x2 * sin_BT1F, x2 * cos_BT1F + x1 * sin_BT1F], axis=-1)
    return rotated.astype(x_BTNH.dtype)


def alibi_slopes(num_heads: int) -> np.ndarray:
    """Per-head slopes of Press et al. (2022): the geometric sequence 2^(-8/n), 2^(-16/n), ...

    For a head count that is not a power of two, the slopes of the next lower power of two are
    followed by every other slope of the next higher power of two (the reference implementation).
    """

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(num_heads).is_integer():
        return np.asarray(power_of_two(num_heads), np.float32)
    lower = 2 ** math.floor(math.log2(num_heads))
    extra = power_of_two(2 * lower)[0::2][: num_heads - lower]
    return np.asarray(power_of_two(lower) + extra, np.float32)


def rope(cfg: ModelConfig, x_BTNH: jax.Array, positions_BT: jax.Array) -> jax.Array:
    """RoPE as `cfg` sets it: theta and the scaling's inverse frequencies and attention factor (model/rope.py).
    Padding's position -1 rotates as 0, which no query reads."""
    head_dim = x_BTNH.shape[-1]
    if cfg.rope_scaling == rope_lib.RopeScaling():
        # Unscaled: the in-graph formula runs trained with (XLA folds it to constants that can differ from NumPy's
        # in the last bit, and the same config must train bit-identically across versions).
        inv_freq_F = rope_frequencies(head_dim, cfg.rope_theta)
    else:
        inv_freq_F = rope_lib.inverse_frequencies(head_dim, cfg.rope_theta, cfg.rope_scaling)
    factor = rope_lib.attention_factor(cfg.rope_scaling)
    return rotate_pairs(x_BTNH, jnp.maximum(positions_BT, 0), inv_freq_F, factor)


@dataclasses.dataclass(frozen=True)
class AlibiBias:
    """ALiBi's bias for `num_heads` heads as a function of query and key positions; `slopes` for kernels that
    add it themselves."""

    num_heads: int

    @property
    def slopes(self) -> np.ndarray:
        return alibi_slopes(self.num_heads)

    def __call__(self, q_positions_BT: jax.Array, k_positions_BS: jax.Array) -> jax.Array:
        return alibi_bias(self.num_heads, q_positions_BT, k_positions_BS)


def alibi_bias(num_heads: int, q_positions_BT: jax.Array, k_positions_BS: jax.Array) -> jax.Array:
    """Bias -slope_h * (q_pos - k_pos) added to the attention logits, shape [B, N, T, S]."""
    distance_BTS = (q_positions_BT[:, :, None] - k_positions_BS[:, None, :]).astype(jnp.float32)
    slopes_N = jnp.asarray(alibi_slopes(num_heads))
    return -slopes_N[None, :, None, None] * distance_BTS[:, None, :, :]


def sinusoidal_table(positions_BT: jax.Array, dim: int) -> jax.Array:
    """Vaswani et al. (2017): sin on the first half of the channels, cos on the second."""
    inv_freq = 1.0 / 10_000.0 ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
    angles_BTF = positions_BT[..., None].astype(jnp.float32) * inv_freq
    return jnp.concatenate([jnp.sin(angles_BTF), jnp.cos(angles_BTF)], axis=-1)


class SinusoidalPositions(nn.Module):
    cfg: ModelConfig

    def __call__(self, positions_BT: jax.Array) -> jax.Array:
        return sinusoidal_table(positions_BT, self.cfg.d_model)


class LearnedPositions(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, positions_BT: jax.Array) -> jax.Array:
        table_PD = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(self.cfg.init_std), (None, "embed")),
            (self.cfg.max_seq_len, self.cfg.d_model),
            jnp.dtype(self.cfg.param_dtype),
        )
        return jnp.take(table_PD, positions_BT, axis=0)


@dataclasses.dataclass(frozen=True)
class Position:
    embed: type[nn.Module] | None = None  # module (cfg) -> positions_BT -> [B, T, D]
    rotate: Callable[[ModelConfig, jax.Array, jax.Array], jax.Array] | None = None
    bias: Callable[[int], Callable[[jax.Array, jax.Array], jax.Array]] | None = None
    bounded: bool = False  # a table of max_seq_len positions: the model reaches no further


POSITIONS: dict[str, Position] = {
    "rope": Position(rotate=rope),
    "alibi": Position(bias=AlibiBias),
    "learned": Position(embed=LearnedPositions, bounded=True),
    "sinusoidal": Position(embed=SinusoidalPositions),
    "none": Position(),
}
