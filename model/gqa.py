"""The 'gqa' attention kind: multi-head attention with grouped K/V heads (MHA, GQA and MQA are one module).

It owns its projections (with optional per-head QK-norm), its decode cache (`KVCache`: keys, values and the
position of every slot; a rolling buffer for sliding-window layers) and its parameter and FLOP counts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from model import attention
from model.cache import SlotCache
from model.layers import RMSNorm, dense, output_std
from model.mask import Mask
from model.positions import POSITIONS

if TYPE_CHECKING:  # model.config imports the kinds (model/kinds.py)
    from model.config import ModelConfig


@flax.struct.dataclass
class KVCache(SlotCache):
    """A row-major decode cache of `size` slots per row: keys and values [B, K, size, H] (laid out as attention
    reads them), the position of each slot's token (-1: empty, which no query reads) and how many tokens each
    row has written. A `rolling` cache (sliding-window layers) writes slot (written % size), so it keeps the
    last `size` tokens: `size` is the window plus how far a row may be rewound."""

    k_BKSH: jax.Array
    v_BKSH: jax.Array
    pos_BS: jax.Array
    written_B: jax.Array
    rolling: bool = flax.struct.field(pytree_node=False, default=False)

    @classmethod
    def create(cls, batch: int, size: int, kv_heads: int, head_dim: int, dtype, rolling: bool) -> KVCache:
        zeros = jnp.zeros((batch, kv_heads, size, head_dim), dtype)
        empty = jnp.full((batch, size), -1, jnp.int32)
        return cls(zeros, zeros, empty, jnp.zeros((batch,), jnp.int32), rolling)

    def write(self, k_BTKH: jax.Array, v_BTKH: jax.Array, pos_BT: jax.Array) -> KVCache:
        """Writes T tokens per row at each row's next slots (a rolling cache keeps only the last `size`)."""
        written_B, rows_BT, slot_BT, kept = self.next_slots(k_BTKH.shape[1])
        k_BTKH, v_BTKH, pos_BT = k_BTKH[:, -kept:], v_BTKH[:, -kept:], pos_BT[:, -kept:]
        return self.replace(
            k_BKSH=self.k_BKSH.at[rows_BT, :, slot_BT].set(k_BTKH.astype(self.k_BKSH.dtype)),
            v_BKSH=self.v_BKSH.at[rows_BT, :, slot_BT].set(v_BTKH.astype(self.v_BKSH.dtype)),
            pos_BS=self.pos_BS.at[rows_BT, slot_BT].set(pos_BT.astype(jnp.int32)),
            written_B=written_B,
        )


class GQA(nn.Module):
    """Causal self-attention over grouped K/V heads. `window` is this layer's sliding window (0: global).

    With `decode=True` it keeps a `KVCache` in the "cache" collection: `model.init` sizes it from its input
    ([B, max_len]; a windowed layer keeps window + max_rewind slots instead); each later call writes its keys and
    values and attends over the cache. `impl` replaces the attention implementation `cfg` chooses (e.g. ring
    attention)."""

    cfg: ModelConfig
    window: int = 0
    decode: bool = False
    impl: attention.Implementation | None = None
    max_rewind: int = 0  # decoding: how many tokens a row may be rewound (the rolling cache's extra slots)

    @nn.compact
    def __call__(self, x_BTD: jax.Array, mask: Mask) -> tuple[jax.Array, dict]:
        cfg = self.cfg
        N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
        q_BTNH = dense(cfg, (N, H), ("embed", "heads", "head_dim"), "query")(x_BTD)
        k_BTKH = dense(cfg, (K, H), ("embed", "kv_heads", "head_dim"), "key")(x_BTD)
        v_BTKH = dense(cfg, (K, H), ("embed", "kv_heads", "head_dim"), "value")(x_BTD)
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
        impl = self.impl or attention.choose(cfg, mask.has_segments)
        kw = dict(bias_fn=scheme.bias(N) if scheme.bias is not None else None, softcap=cfg.attn_logit_softcap)
        mask = mask.replace(window=self.window)
        if self.decode:
            out_BTNH = self._decode(impl, q_BTNH, k_BTKH, v_BTKH, mask, kw)
        else:
            out_BTNH = impl.attend(cfg, q_BTNH, k_BTKH, v_BTKH, mask, **kw)
        out_BTNH = nn.with_logical_constraint(out_BTNH, ("batch", "length", "heads", "head_dim"))
        proj = dense(cfg, cfg.d_model, ("heads", "head_dim", "embed"), "out", num_in=2, std=output_std(cfg))
        return proj(out_BTNH), {}

    def _decode(self, impl, q_BTNH, k_BTKH, v_BTKH, mask: Mask, kw) -> jax.Array:
        """Attention of this call's tokens over the cache, which it then holds them too."""
        B, T, K, H = k_BTKH.shape
        initialized = self.has_variable("cache", "kv")
        rolling = self.window > 0 and self.window + self.max_rewind < T  # T: max_len at init
        size = self.window + self.max_rewind if rolling else T
        cache = self.variable("cache", "kv", KVCache.create, B, size, K, H, k_BTKH.dtype, rolling)
        if not initialized:  # model.init: the input only sizes the cache
            return impl.attend(self.cfg, q_BTNH, k_BTKH, v_BTKH, mask, **kw)
        old = cache.value
        cache.value = old.write(k_BTKH, v_BTKH, mask.q_positions_BT)
        if old.rolling and T > self.max_rewind + 1:
            # Writing T tokens may overwrite keys that this call's own first queries still see (a prompt longer
            # than the free slots): attend over the cache as it was plus the new tokens.
            k_BKSH = jnp.concatenate([old.k_BKSH, k_BTKH.transpose(0, 2, 1, 3).astype(old.k_BKSH.dtype)], axis=2)
            v_BKSH = jnp.concatenate([old.v_BKSH, v_BTKH.transpose(0, 2, 1, 3).astype(old.v_BKSH.dtype)], axis=2)
            k_pos_BS = jnp.concatenate([old.pos_BS, mask.q_positions_BT.astype(jnp.int32)], axis=1)
        else:
            new = cache.value
            k_BKSH, v_BKSH, k_pos_BS = new.k_BKSH, new.v_BKSH, new.pos_BS
        over = Mask(mask.q_positions_BT, k_pos_BS, window=mask.window)
        return impl.decode(self.cfg, q_BTNH, k_BKSH, v_BKSH, over, **kw)

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
