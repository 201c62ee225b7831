"""Causal multi-head attention with grouped K/V heads (MHA, GQA and MQA are one code path).

Query head h reads K/V head h // group_size: queries are viewed as [B, T, K, G, H] so K/V are
never repeated in memory.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from model.config import ModelConfig
from model.kernels import cpu_attention
from model.layers import dense, output_std
from model.mask import Mask
from model.positions import POSITIONS, alibi_slopes

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
    """softmax(q k^T / sqrt(H) + bias, masked) v; logits and softmax in float32."""
    return attend_kv_major(q_BTNH, k_BSKH.transpose(0, 2, 1, 3), v_BSKH.transpose(0, 2, 1, 3), mask_BTS, bias_BNTS)


def attend_kv_major(
    q_BTNH: jax.Array,
    k_BKSH: jax.Array,
    v_BKSH: jax.Array,
    mask_BTS: jax.Array,
    bias_BNTS: jax.Array | None = None,
) -> jax.Array:
    """`attend` with keys and values laid out [B, K, S, H] (as the decode cache keeps them).

    The G = N / K query heads sharing a K/V head are stacked along the row axis, so each K/V head
    is one [G*T, H] x [H, S] product and K/V are never repeated.
    """
    B, T, N, H = q_BTNH.shape
    K, S = k_BKSH.shape[1], k_BKSH.shape[2]
    G = N // K
    q_BKMH = (q_BTNH * H**-0.5).reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, H)
    mask_BMS = jnp.tile(mask_BTS, (1, G, 1))
    bias_BKMS = jnp.zeros((1, 1, 1, 1), jnp.float32) if bias_BNTS is None else bias_BNTS.reshape(B, K, G * T, S)
    out_BKMH = _attention_core(q_BKMH, k_BKSH, v_BKSH, mask_BMS, bias_BKMS)
    return out_BKMH.reshape(B, K, G, T, H).transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)


def attend_in_blocks(
    q_BTNH: jax.Array,
    k_BKSH: jax.Array,
    v_BKSH: jax.Array,
    positions_BT: jax.Array,
    bias_fn: Callable | None,
    num_blocks: int,
) -> jax.Array:
    """Causal `attend_kv_major` when keys are the queries' own tokens in order (positions 0..T-1): the queries
    are cut into `num_blocks` blocks and block i reads only the keys up to its last query, skipping the
    fully masked rest. Same result; 4 blocks skip 3/8 of the attention matmuls and softmax."""
    T = q_BTNH.shape[1]
    ends = [round(T * (i + 1) / num_blocks) for i in range(min(num_blocks, T))]
    outs, start = [], 0
    for end in ends:
        q_positions, k_positions = positions_BT[:, start:end], positions_BT[:, :end]
        bias = bias_fn(q_positions, k_positions) if bias_fn is not None else None
        mask = causal_mask(q_positions, k_positions)
        outs.append(attend_kv_major(q_BTNH[:, start:end], k_BKSH[:, :, :end], v_BKSH[:, :, :end], mask, bias))
        start = end
    return jnp.concatenate(outs, axis=1)


def causal_mask(q_positions_BT: jax.Array, k_positions_BS: jax.Array) -> jax.Array:
    """True where the key is a real token (position >= 0; padding and empty cache slots are -1) at or
    before the query's position."""
    k_positions_B1S = k_positions_BS[:, None, :]
    return (k_positions_B1S <= q_positions_BT[:, :, None]) & (k_positions_B1S >= 0)


ATTENTION_IMPLS = ("auto", "xla", "cpu_kernel")


def cpu_kernel_blocker(cfg: ModelConfig) -> str | None:
    """Why the C++ CPU kernel (model/kernels/cpu_attention) cannot run this model's training attention here,
    or None when it can: one CPU device (the kernel does not shard), float32, ALiBi or no bias, and a head_dim
    that fits the CPU's vector width."""
    if jax.default_backend() != "cpu":
        return f"backend is {jax.default_backend()}, not cpu"
    if jax.device_count() != 1:
        return f"{jax.device_count()} devices (the kernel runs on one)"
    if POSITIONS[cfg.position].bias is not None and cfg.position != "alibi":
        return f"position {cfg.position!r} adds a bias other than ALiBi's"
    return cpu_attention.supports(cfg.resolved_head_dim, cfg.dtype)


def use_cpu_kernel(cfg: ModelConfig) -> bool:
    """`model.attention_impl`: 'xla' never, 'auto' where `cpu_kernel_blocker` finds nothing, 'cpu_kernel' always
    (an error naming the blocker where it cannot)."""
    if cfg.attention_impl == "xla":
        return False
    blocker = cpu_kernel_blocker(cfg)
    if cfg.attention_impl == "cpu_kernel" and blocker is not None:
        raise ValueError(f"model.attention_impl='cpu_kernel' cannot run here: {blocker}")
    return blocker is None


# softmax(q k^T / sqrt(H) + bias, masked by a `Mask`) v computed some other way, e.g. parallel/'s ring
# attention over a sequence-sharded mesh: (q_BTNH, k_BSKH, v_BSKH, mask, *, bias_fn) -> out_BTNH, where
# bias_fn(q_positions_BT, k_positions_BS) gives the [B, N, T, S] additive bias or is None.
AttentionFn = Callable[..., jax.Array]


class Attention(nn.Module):
    """Causal self-attention. With `decode=True` it keeps a static K/V cache in the "cache" collection:
    `model.init` sizes it from its input ([B, max_len]); each later call writes its keys and values
    at the next free slots and attends over the whole cache. `attention`, if given, replaces the
    attention math of the (non-decoding) forward pass. `in_order` says positions are 0..T-1 in every row,
    so the causal mask is by index: the C++ CPU kernel can run it (`cfg.attention_impl`), or XLA skipping the
    fully masked key blocks (`cfg.causal_blocks`)."""

    cfg: ModelConfig
    decode: bool = False
    attention: AttentionFn | None = None
    in_order: bool = False

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
            q_BTNH = scheme.rotate(q_BTNH, jnp.maximum(positions_BT, 0), cfg.rope_theta)
            k_BTKH = scheme.rotate(k_BTKH, jnp.maximum(positions_BT, 0), cfg.rope_theta)
        bias_fn = functools.partial(scheme.bias, N) if scheme.bias is not None else None
        if self.attention is not None and not self.decode:
            out_BTNH = self.attention(q_BTNH, k_BTKH, v_BTKH, Mask.self_attention(positions_BT), bias_fn=bias_fn)
        else:
            if self.decode:
                k_BKSH, v_BKSH, k_positions_BS = self._cached(k_BTKH, v_BTKH, positions_BT)
            else:
                k_BKSH, v_BKSH = k_BTKH.transpose(0, 2, 1, 3), v_BTKH.transpose(0, 2, 1, 3)
                k_positions_BS = positions_BT
            if self.in_order and not self.decode and use_cpu_kernel(cfg):
                slopes = alibi_slopes(N) if cfg.position == "alibi" else [0.0] * N
                out_BTNH = cpu_attention.causal_attention(q_BTNH, k_BTKH, v_BTKH, jnp.asarray(slopes, jnp.float32))
            elif self.in_order and not self.decode and cfg.causal_blocks > 1:
                out_BTNH = attend_in_blocks(q_BTNH, k_BKSH, v_BKSH, positions_BT, bias_fn, cfg.causal_blocks)
            else:
                bias = bias_fn(positions_BT, k_positions_BS) if bias_fn is not None else None
                out_BTNH = attend_kv_major(q_BTNH, k_BKSH, v_BKSH, causal_mask(positions_BT, k_positions_BS), bias)
        out_BTNH = nn.with_logical_constraint(out_BTNH, ("batch", "length", "heads", "head_dim"))
        proj = dense(cfg, cfg.d_model, ("heads", "head_dim", "embed"), "out", num_in=2, std=output_std(cfg))
        return proj(out_BTNH)

    def _cached(self, k_BTKH: jax.Array, v_BTKH: jax.Array, positions_BT: jax.Array):
        """Writes this call's T keys/values/positions at the cache's next free slots; returns the whole
        cache, keys and values laid out [B, K, max_len, H] so attention reads them without a transpose."""
        initialized = self.has_variable("cache", "k")
        k_BKTH, v_BKTH = k_BTKH.transpose(0, 2, 1, 3), v_BTKH.transpose(0, 2, 1, 3)
        B, K, T, H = k_BKTH.shape
        k_cache = self.variable("cache", "k", jnp.zeros, (B, K, T, H), k_BKTH.dtype)
        v_cache = self.variable("cache", "v", jnp.zeros, (B, K, T, H), v_BKTH.dtype)
        pos_cache = self.variable("cache", "pos", jnp.full, (B, T), -1, jnp.int32)
        index = self.variable("cache", "index", jnp.zeros, (), jnp.int32)
        if not initialized:  # model.init: the input only sizes the cache
            return k_BKTH, v_BKTH, positions_BT
        i = index.value
        k_cache.value = jax.lax.dynamic_update_slice(k_cache.value, k_BKTH, (0, 0, i, 0))
        v_cache.value = jax.lax.dynamic_update_slice(v_cache.value, v_BKTH, (0, 0, i, 0))
        pos_cache.value = jax.lax.dynamic_update_slice(pos_cache.value, positions_BT.astype(jnp.int32), (0, i))
        index.value = i + T
        return k_cache.value, v_cache.value, pos_cache.value
