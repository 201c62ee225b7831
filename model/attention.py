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


def _probs(q_BKMH, k_BKSH, mask_BMS, bias_BKMS):
    logits_BKMS = jnp.einsum("bkmh,bksh->bkms", q_BKMH, k_BKSH, preferred_element_type=jnp.float32) + bias_BKMS
    return jax.nn.softmax(jnp.where(mask_BMS[:, None], logits_BKMS, NEG_INF), axis=-1)


@jax.custom_vjp
def _attention_core(q_BKMH, k_BKSH, v_BKSH, mask_BMS, bias_BKMS):
    """softmax(q k^T + bias, masked) v per K/V head; M = group_size * T query rows per K/V head.

    `mask` and `bias` are constants (no gradient). The backward pass is the textbook one (dS = P * (dP - rowsum(dP * P))), written out because
    XLA:CPU runs it more than twice as fast as autodiff's version of the same math.
    """
    probs_BKMS = _probs(q_BKMH, k_BKSH, mask_BMS, bias_BKMS)
    return jnp.einsum("bkms,bksh->bkmh", probs_BKMS.astype(v_BKSH.dtype), v_BKSH)


def _attention_core_fwd(q_BKMH, k_BKSH, v_BKSH, mask_BMS, bias_BKMS):
    probs_BKMS = _probs(q_BKMH, k_BKSH, mask_BMS, bias_BKMS)
    out_BKMH = jnp.einsum("bkms,bksh->bkmh", probs_BKMS.astype(v_BKSH.dtype), v_BKSH)
    return out_BKMH, (q_BKMH, k_BKSH, v_BKSH, probs_BKMS)


def _attention_core_bwd(residuals, dout_BKMH):
    q_BKMH, k_BKSH, v_BKSH, probs_BKMS = residuals
    dv_BKSH = jnp.einsum("bkms,bkmh->bksh", probs_BKMS.astype(dout_BKMH.dtype), dout_BKMH)
    dprobs_BKMS = jnp.einsum("bkmh,bksh->bkms", dout_BKMH, v_BKSH, preferred_element_type=jnp.float32)
    dlogits_BKMS = probs_BKMS * (dprobs_BKMS - jnp.sum(dprobs_BKMS * probs_BKMS, axis=-1, keepdims=True))
    dlogits_BKMS = dlogits_BKMS.astype(q_BKMH.dtype)
    dq_BKMH = jnp.einsum("bkms,bksh->bkmh", dlogits_BKMS, k_BKSH)
    dk_BKSH = jnp.einsum("bkms,bkmh->bksh", dlogits_BKMS, q_BKMH)
    return dq_BKMH, dk_BKSH, dv_BKSH, None, None


_attention_core.defvjp(_attention_core_fwd, _attention_core_bwd)


def attend(
    q_BTNH: jax.Array,
    k_BSKH: jax.Array,
    v_BSKH: jax.Array,
    mask_BTS: jax.Array,
    bias_BNTS: jax.Array | None = None,
) -> jax.Array:
    """softmax(q k^T / sqrt(H) + bias, masked) v; logits and softmax in float32.

    The G = N / K query heads sharing a K/V head are stacked along the row axis, so each K/V head
    is one [G*T, H] x [H, S] product and K/V are never repeated.
    """
    B, T, N, H = q_BTNH.shape
    S, K = k_BSKH.shape[1], k_BSKH.shape[2]
    G = N // K
    q_BKMH = (q_BTNH * H**-0.5).reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, H)
    k_BKSH, v_BKSH = k_BSKH.transpose(0, 2, 1, 3), v_BSKH.transpose(0, 2, 1, 3)
    mask_BMS = jnp.tile(mask_BTS, (1, G, 1))
    bias_BKMS = jnp.zeros((1, 1, 1, 1), jnp.float32) if bias_BNTS is None else bias_BNTS.reshape(B, K, G * T, S)
    out_BKMH = _attention_core(q_BKMH, k_BKSH, v_BKSH, mask_BMS, bias_BKMS)
    return out_BKMH.reshape(B, K, G, T, H).transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)


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
        proj = dense(cfg, cfg.d_model, ("heads", "head_dim", "embed"), "out", num_in=2, std=output_std(cfg))
        return proj(out_BTNH)
