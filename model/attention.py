"""Causal multi-head attention with grouped K/V heads (MHA, GQA and MQA are one code path).

Query head h reads K/V head h // group_size: queries are viewed as [B, T, K, G, H] so K/V are
never repeated in memory.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from model.config import ModelConfig
from model.layers import dense, output_std
from model.positions import POSITIONS

NEG_INF = -1e30


def attend(
    q_BTNH: jax.Array,
    k_BSKH: jax.Array,
    v_BSKH: jax.Array,
    mask_BTS: jax.Array,
    bias_BNTS: jax.Array | None = None,
) -> jax.Array:
    """softmax(q k^T / sqrt(H) + bias, masked) v, logits and softmax in float32."""
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
    logits_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32)
    logits_BKGTS = logits_BKGTS * (H**-0.5)
    if bias_BNTS is not None:
        logits_BKGTS = logits_BKGTS + bias_BNTS.reshape(B, K, N // K, T, -1)
    logits_BKGTS = jnp.where(mask_BTS[:, None, None], logits_BKGTS, NEG_INF)
    probs_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1).astype(v_BSKH.dtype)
    out_BTKGH = jnp.einsum("bkgts,bskh->btkgh", probs_BKGTS, v_BSKH)
    return out_BTKGH.reshape(B, T, N, H)


def causal_mask(q_positions_BT: jax.Array, k_positions_BS: jax.Array) -> jax.Array:
    """True where key position <= query position."""
    return k_positions_BS[:, None, :] <= q_positions_BT[:, :, None]


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array) -> jax.Array:
        cfg = self.cfg
        N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
        q_BTNH = dense(cfg, (N, H), ("embed", "heads", "head_dim"), "query")(x_BTD)
        k_BTKH = dense(cfg, (K, H), ("embed", "kv_heads", "head_dim"), "key")(x_BTD)
        v_BTKH = dense(cfg, (K, H), ("embed", "kv_heads", "head_dim"), "value")(x_BTD)
        q_BTNH = nn.with_logical_constraint(q_BTNH, ("batch", "length", "heads", "head_dim"))
        k_BTKH = nn.with_logical_constraint(k_BTKH, ("batch", "length", "kv_heads", "head_dim"))
        v_BTKH = nn.with_logical_constraint(v_BTKH, ("batch", "length", "kv_heads", "head_dim"))

        scheme = POSITIONS[cfg.position]
        if scheme.rotate is not None:
            q_BTNH = scheme.rotate(q_BTNH, positions_BT, cfg.rope_theta)
            k_BTKH = scheme.rotate(k_BTKH, positions_BT, cfg.rope_theta)
        bias = scheme.bias(N, positions_BT, positions_BT) if scheme.bias is not None else None

        out_BTNH = attend(q_BTNH, k_BTKH, v_BTKH, causal_mask(positions_BT, positions_BT), bias)
        out_BTNH = nn.with_logical_constraint(out_BTNH, ("batch", "length", "heads", "head_dim"))
        proj = dense(cfg, cfg.d_model, ("heads", "head_dim", "embed"), "out", in_axes=(-2, -1), std=output_std(cfg))
        return proj(out_BTNH)
