"""The 'gqa' attention kind: multi-head attention with grouped K/V heads (MHA, GQA and MQA are one module).

It owns its projections (with optional per-head QK-norm), what its decode cache holds (keys and values laid out
[B, K, slots, H], in the layout `DecodeConfig.cache` names: model/cache.py) and its parameter and FLOP counts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import flax.linen as nn
import jax
import jax.numpy as jnp

from model import attention
from model.cache import LAYOUTS, SLOTS, KVView, Pages
from model.layers import RMSNorm, dense, output_std
from model.mask import Mask
from model.positions import POSITIONS
from model.runtime import TRAINING, Runtime

if TYPE_CHECKING:  # model.config imports the kinds (model/kinds.py)
    from model.config import ModelConfig


class GQA(nn.Module):
    """Causal self-attention over grouped K/V heads. `window` is this layer's sliding window (0: global).

    Decoding (`rt.decode`) it keeps its keys and values in the "cache" collection: `model.init` sizes it from its input
    ([B, max_len]; a windowed layer keeps window + max_rewind slots instead); each later call writes its keys and
    values and attends over the cache. `rt.hooks.attention` replaces the attention implementation `cfg` chooses
    (e.g. ring attention)."""

    cfg: ModelConfig
    window: int = 0
    rt: Runtime = TRAINING
    decode_variants = ()  # one way to decode: DecodeConfig.attention must be ''

    @nn.compact
    def __call__(self, x_BTD: jax.Array, mask: Mask) -> tuple[jax.Array, dict]:
        cfg, rt = self.cfg, self.rt
        N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
        q_BTNH = dense(cfg, rt, (N, H), ("embed", "heads", "head_dim"), "query")(x_BTD)
        k_BTKH = dense(cfg, rt, (K, H), ("embed", "kv_heads", "head_dim"), "key")(x_BTD)
        v_BTKH = dense(cfg, rt, (K, H), ("embed", "kv_heads", "head_dim"), "value")(x_BTD)
        q_BTNH = nn.with_logical_constraint(q_BTNH, ("batch", "length", "heads", "head_dim"))
        k_BTKH = nn.with_logical_constraint(k_BTKH, ("batch", "length", "kv_heads", "head_dim"))
        v_BTKH = nn.with_logical_constraint(v_BTKH, ("batch", "length", "kv_heads", "head_dim"))
        if cfg.qk_norm:
            # Per-head RMSNorm, one weight per channel shared by the heads (Qwen3's q_norm / k_norm).
            q_BTNH = RMSNorm(cfg, "head_dim", name="q_norm")(q_BTNH)
            k_BTKH = RMSNorm(cfg, "head_dim", name="k_norm")(k_BTKH)

        scheme = POSITIONS[cfg.position]
        positions_BT = mask.q_positions_BT
        if scheme.rotate is not None:
            q_BTNH = scheme.rotate(cfg, q_BTNH, positions_BT)
            k_BTKH = scheme.rotate(cfg, k_BTKH, positions_BT)
        impl = rt.hooks.attention or attention.choose(cfg, mask.has_segments)
        kw = dict(bias_fn=scheme.bias(N) if scheme.bias is not None else None, softcap=cfg.attn_logit_softcap)
        mask = mask.replace(window=self.window)
        if rt.decode is not None:
            out_BTNH = self._decode(impl, q_BTNH, k_BTKH, v_BTKH, mask, kw)
        else:
            out_BTNH = impl.attend(cfg, q_BTNH, k_BTKH, v_BTKH, mask, **kw)
        out_BTNH = nn.with_logical_constraint(out_BTNH, ("batch", "length", "heads", "head_dim"))
        proj = dense(cfg, rt, cfg.d_model, ("heads", "head_dim", "embed"), "out", num_in=2, std=output_std(cfg))
        return proj(out_BTNH), {}

    def _decode(self, impl, q_BTNH, k_BTKH, v_BTKH, mask: Mask, kw) -> jax.Array:
        """Attention of this call's tokens over the cache, which it then holds them too."""
        B, T, K, H = k_BTKH.shape  # T: max_len at init
        initialized, decode = self.has_variable("cache", "kv"), self.rt.decode
        dtype = jnp.dtype(decode.cache_dtype or k_BTKH.dtype)
        fields = {"k": ((K, SLOTS, H), dtype), "v": ((K, SLOTS, H), dtype)}  # laid out as attention reads them
        create = LAYOUTS[decode.cache].create
        cache = self.variable("cache", "kv", create, B, T, fields, self.window, decode)
        if not initialized:  # model.init: the input only sizes the cache
            return impl.attend(self.cfg, q_BTNH, k_BTKH, v_BTKH, mask, **kw)
        cache.value, view = cache.value.write({"k": k_BTKH, "v": v_BTKH}, mask.q_positions_BT)
        over = Mask(mask.q_positions_BT, view.k_positions_BS, window=mask.window)
        pages = cache.value.paged("k", "v") if isinstance(cache.value, Pages) and dtype != jnp.int8 else None
        return impl.decode(self.cfg, q_BTNH, KVView(view.arrays["k"], view.arrays["v"], over, pages), **kw)

    # -- counts (per layer) --------------------------------------------------------------------------------------
    @staticmethod
    def param_count(cfg: ModelConfig) -> int:
        D, H = cfg.d_model, cfg.resolved_head_dim
        return D * H * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) + (2 * H if cfg.qk_norm else 0)

    @staticmethod
    def matmul_params(cfg: ModelConfig) -> int:
        """Weights each token is multiplied by (per layer)."""
        D, H = cfg.d_model, cfg.resolved_head_dim
        return D * H * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)

    @staticmethod
    def attention_flops(cfg: ModelConfig, context: int) -> int:
        """Forward FLOPs per token of q.k^T and probs.v over `context` keys (per layer)."""
        return 4 * context * cfg.num_heads * cfg.resolved_head_dim
