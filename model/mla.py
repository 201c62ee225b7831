"""The 'mla' attention kind: DeepSeek-V2/V3's Multi-head Latent Attention, trained in full and decoded from a
compressed cache.

Keys and values of every head are rebuilt from one shared latent per token (`kv_lora_rank` channels, RMSNorm),
and a decoupled RoPE key of `qk_rope_head_dim` channels is shared by all heads; queries come straight from the
input or through a low-rank bottleneck with RMSNorm (`q_lora_rank` > 0). Each head's query and key are
[nope | rope]: the nope part meets the rebuilt key, the rope part the shared rotated key.

Weights (kernels are [in, out], torch's Linear weights transposed; C = kv_lora_rank, R = qk_rope_head_dim,
P = qk_nope_head_dim, V = v_head_dim, N = num_heads, D = d_model):
- q_lora_rank = 0: `query` [D, N, P + R]; else `q_down` [D, q_lora_rank], `q_norm` scale [q_lora_rank],
  `q_up` [q_lora_rank, N, P + R] (transformers' q_proj, or q_a_proj, q_a_layernorm, q_b_proj);
- `kv_down` [D, C + R]: the latent, then the rope key (kv_a_proj_with_mqa); `kv_norm` scale [C]
  (kv_a_layernorm); `kv_up` [C, N, P + V]: per head the nope key, then the value (kv_b_proj); `out` [N, V, D]
  (o_proj).
RoPE layout: the rope channels of `query`/`q_up` and `kv_down` are in DeepSeek's checkpoint order, interleaved
pairs (x[2i], x[2i+1]) rotated by frequency i. As transformers' DeepseekV3 (rope_interleave=True) does, they are
permuted to [x[0], x[2], ..., x[1], x[3], ...] and rotated half-split (`model.positions.rope`, YaRN included), so
DeepSeek-V3 weights load by reshape and transpose alone.

The softmax scale is (P + R)^-0.5 times YaRN's mscale^2 (`model.rope.softmax_mscale`).

Decoding caches, per token and layer, only the normed latent and the rotated rope key (C + R values: the field
"latent" [B, slots, C + R], in the layout `DecodeConfig.cache` names, model/cache.py).
By default ('absorbed') attention runs over that cache as one shared K/V head: the nope query is moved into latent
space through the key up-projection (q_nope W_uk^T), so logits are q_latent . latent + q_rope . rope_key, and the
value up-projection W_uv is applied after the weighted sum of latents; no step rebuilds full K/V. The reference
('naive', `DecodeConfig.attention`: infer.py's --mla_decode) rebuilds every head's keys and values from the cached latent at every step.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import flax.linen as nn
import jax
import jax.numpy as jnp

from model import attention, weights
from model import rope as rope_lib
from model.cache import LAYOUTS, SLOTS, KVView, Paged, Pages
from model.layers import RMSNorm, dense, output_std
from model.mask import Mask
from model.positions import rope
from model.runtime import TRAINING, Runtime

if TYPE_CHECKING:  # model.config builds ModelConfig from the kinds' groups, this one's MLAConfig among them
    from model.config import ModelConfig

__all__ = ["MLA", "MLAConfig", "DECODES", "config_errors"]

DECODES = ("absorbed", "naive")  # decode variants (DecodeConfig.attention, infer.py --mla_decode); the default first


@dataclasses.dataclass(frozen=True)
class MLAConfig:
    """Multi-head Latent Attention's sizes, `cfg.mla` (DeepSeek-V2/V3's names)."""

    q_lora_rank: int = 0  # width of the compressed query (0: queries projected straight from d_model)
    kv_lora_rank: int = 128  # width of the latent keys and values are rebuilt from (what decoding caches)
    qk_nope_head_dim: int = 64  # per-head query/key channels without RoPE (rebuilt from the latent)
    qk_rope_head_dim: int = 32  # per-head query channels with RoPE; the key's are one vector shared by all heads
    v_head_dim: int = 64  # per-head value channels


def deinterleave(x: jax.Array) -> jax.Array:
    """[..., R] channels (x0, x1, x2, x3, ...) -> (x0, x2, ..., x1, x3, ...): DeepSeek's interleaved RoPE pairs
    in the half-split layout `model.positions.rope` rotates (transformers' apply_rotary_pos_emb_interleave)."""
    *lead, R = x.shape
    return x.reshape(*lead, R // 2, 2).swapaxes(-1, -2).reshape(*lead, R)


def softmax_scale(cfg: ModelConfig) -> float:
    m = cfg.mla
    return (m.qk_nope_head_dim + m.qk_rope_head_dim) ** -0.5 * rope_lib.softmax_mscale(cfg.rope_scaling)


class MLA(nn.Module):
    """Causal Multi-head Latent Attention. `window` is this layer's sliding window (0: global).

    Decoding (`rt.decode`) it keeps its latents in the "cache" collection, sized by `model.init` from its input as
    model.gqa.GQA's is; `rt.decode.attention` (one of `decode_variants`) says how it attends over it.
    `rt.hooks.attention` replaces the implementation `cfg` chooses (e.g. ring attention)."""

    cfg: ModelConfig
    window: int = 0
    rt: Runtime = TRAINING
    decode_variants = DECODES  # what DecodeConfig.attention may name for this kind

    config_group = ("mla", MLAConfig)

    @nn.compact
    def __call__(self, x_BTD: jax.Array, mask: Mask) -> tuple[jax.Array, dict]:
        cfg, m, rt = self.cfg, self.cfg.mla, self.rt
        N, C, P, R, V = cfg.num_heads, m.kv_lora_rank, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim
        if m.q_lora_rank:
            q_BTQ = dense(cfg, rt, m.q_lora_rank, ("embed", None), "q_down")(x_BTD)
            q_BTQ = RMSNorm(cfg, None, name="q_norm")(q_BTQ)
            q_BTNE = dense(cfg, rt, (N, P + R), (None, "heads", "head_dim"), "q_up")(q_BTQ)
        else:
            q_BTNE = dense(cfg, rt, (N, P + R), ("embed", "heads", "head_dim"), "query")(x_BTD)
        q_BTNE = nn.with_logical_constraint(q_BTNE, ("batch", "length", "heads", "head_dim"))
        kv_BTX = dense(cfg, rt, C + R, ("embed", None), "kv_down")(x_BTD)
        latent_BTC = RMSNorm(cfg, None, name="kv_norm")(kv_BTX[..., :C])
        positions_BT = mask.q_positions_BT
        k_rope_BTR = rope(cfg, deinterleave(kv_BTX[..., None, C:]), positions_BT)[:, :, 0]
        q_nope_BTNP = q_BTNE[..., :P]
        q_rope_BTNR = rope(cfg, deinterleave(q_BTNE[..., P:]), positions_BT)
        # Per head the nope key (W_uk), then the value (W_uv).
        kv_up = dense(cfg, rt, (N, P + V), (None, "heads", "head_dim"), "kv_up")

        # The C++ kernel checks head_dim: this kind's query/key head is P + R wide (values V; others fall back).
        impl = rt.hooks.attention or attention.choose(dataclasses.replace(cfg, head_dim=P + R), mask.has_segments)
        kw = dict(softcap=cfg.attn_logit_softcap, scale=softmax_scale(cfg))
        mask = mask.replace(window=self.window)
        latent_BTL = jnp.concatenate([latent_BTC, k_rope_BTR.astype(latent_BTC.dtype)], axis=-1)
        if rt.decode is not None and self.has_variable("cache", "latent"):
            out_BTNV = self._decode(impl, kv_up, q_nope_BTNP, q_rope_BTNR, latent_BTL, mask, kw)
        else:
            if rt.decode is not None:  # model.init: the input only sizes the cache
                self._cache(latent_BTL)
            q_BTNE = jnp.concatenate([q_nope_BTNP, q_rope_BTNR], axis=-1)
            k_BTNE, v_BTNV = full_keys_values(kv_up(latent_BTC), k_rope_BTR, P)
            out_BTNV = impl.attend(cfg, q_BTNE, k_BTNE, v_BTNV, mask, **kw)
        out_BTNV = nn.with_logical_constraint(out_BTNV, ("batch", "length", "heads", "head_dim"))
        proj = dense(cfg, rt, cfg.d_model, ("heads", "head_dim", "embed"), "out", num_in=2, std=output_std(cfg))
        return proj(out_BTNV), {}

    def _cache(self, latent_BTL: jax.Array):
        B, T, L = latent_BTL.shape  # T: max_len at init
        decode = self.rt.decode
        fields = {"latent": ((SLOTS, L), jnp.dtype(decode.cache_dtype or latent_BTL.dtype))}
        create = LAYOUTS[decode.cache].create
        return self.variable("cache", "latent", create, B, T, fields, self.window, decode)

    def _decode(self, impl, kv_up, q_nope_BTNP, q_rope_BTNR, latent_BTL, mask: Mask, kw) -> jax.Array:
        """Attention of this call's tokens over the cache, which then holds them too."""
        cfg, C, P = self.cfg, self.cfg.mla.kv_lora_rank, self.cfg.mla.qk_nope_head_dim
        cache = self._cache(latent_BTL)
        cache.value, view = cache.value.write({"latent": latent_BTL}, mask.q_positions_BT)
        latent_BSL, k_pos_BS = view.arrays["latent"], view.k_positions_BS
        over = Mask(mask.q_positions_BT, k_pos_BS, window=mask.window)
        if (self.rt.decode.attention or DECODES[0]) == "naive":  # rebuild every head's keys and values from the latents
            k_BSNE, v_BSNV = full_keys_values(kv_up(latent_BSL[..., :C]), latent_BSL[..., C:], P)
            q_BTNE = jnp.concatenate([q_nope_BTNP, q_rope_BTNR], axis=-1)
            return impl.decode(
                cfg, q_BTNE, KVView(k_BSNE.transpose(0, 2, 1, 3), v_BSNV.transpose(0, 2, 1, 3), over), **kw
            )
        # Absorbed: q_nope . (W_uk latent) = (q_nope W_uk^T) . latent, and sum_s p_s W_uv latent_s = W_uv sum_s p_s
        # latent_s, so the cache is one K/V head [latent | rope key] shared by all N query heads. Its rope part is
        # also summed as "value" (R of C + R extra channels) rather than copying the latent out of the cache.
        shape = (C, *kv_up.features)  # as kv_up declares it: [C, N, P + V]
        kernel_CNF = weights.read(
            self.rt.weights, self.variables["params"]["kv_up"], "kernel", cfg, shape, kv_up.layout
        )
        w_uk_CNP, w_uv_CNV = kernel_CNF[..., :P], kernel_CNF[..., P:]
        q_latent_BTNC = jnp.einsum("btnp,cnp->btnc", q_nope_BTNP, w_uk_CNP)
        q_BTNL = jnp.concatenate([q_latent_BTNC, q_rope_BTNR.astype(q_latent_BTNC.dtype)], axis=-1)
        cache_B1SL = latent_BSL[:, None]
        pages = None
        if isinstance(cache.value, Pages) and cache.value.arrays["latent"].dtype != jnp.int8:
            pool_P1sL = cache.value.arrays["latent"][:, None]  # one K/V head
            pages = Paged(pool_P1sL, pool_P1sL, cache.value.table_BM)
        out_BTNL = impl.decode(cfg, q_BTNL, KVView(cache_B1SL, cache_B1SL, over, pages), **kw)
        return jnp.einsum("btnc,cnv->btnv", out_BTNL[..., :C], w_uv_CNV)

    # -- counts (per layer) --------------------------------------------------------------------------------------
    @staticmethod
    def matmul_params(cfg: ModelConfig) -> int:
        """Weights each token is multiplied by in training and evaluation (per layer)."""
        m, D, N = cfg.mla, cfg.d_model, cfg.num_heads
        E = m.qk_nope_head_dim + m.qk_rope_head_dim
        query = (D + N * E) * m.q_lora_rank if m.q_lora_rank else D * N * E
        kv = D * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank * N * (m.qk_nope_head_dim + m.v_head_dim)
        return query + kv + N * m.v_head_dim * D

    @staticmethod
    def param_count(cfg: ModelConfig) -> int:
        m = cfg.mla
        return MLA.matmul_params(cfg) + m.q_lora_rank + m.kv_lora_rank  # + the two norms' scales

    @staticmethod
    def attention_flops(cfg: ModelConfig, context: int) -> int:
        """Forward FLOPs per token of q.k^T (nope + rope channels) and probs.v over `context` keys (per layer)."""
        m = cfg.mla
        return 2 * context * cfg.num_heads * (m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim)

    @staticmethod
    def config_errors(cfg: ModelConfig) -> list[tuple[bool, str, object, str]]:
        """(condition that must hold, key, value, what is allowed) for a model with attention='mla'."""
        m, key = cfg.mla, "model.mla."
        positive = [
            (getattr(m, n) > 0, key + n, getattr(m, n), "must be > 0")
            for n in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
        ]
        return [
            (m.q_lora_rank >= 0, key + "q_lora_rank", m.q_lora_rank, "must be >= 0 (0: no query compression)"),
            *positive,
            (m.qk_rope_head_dim % 2 == 0, key + "qk_rope_head_dim", m.qk_rope_head_dim, "must be even (RoPE pairs)"),
            (
                cfg.position == "rope",
                "model.position",
                cfg.position,
                "must be 'rope' for attention='mla' (its decoupled key is the rotated part)",
            ),
            (not cfg.qk_norm, "model.qk_norm", cfg.qk_norm, "must be False for attention='mla' (it norms its latents)"),
        ]


config_errors = MLA.config_errors


def full_keys_values(kv_BSNF: jax.Array, k_rope_BSR: jax.Array, P: int) -> tuple[jax.Array, jax.Array]:
    """Every head's key [nope | shared rope key] and value from the up-projected latent [B, S, N, P + V]."""
    B, S, N, _ = kv_BSNF.shape
    k_rope_BSNR = jnp.broadcast_to(k_rope_BSR[:, :, None].astype(kv_BSNF.dtype), (B, S, N, k_rope_BSR.shape[-1]))
    return jnp.concatenate([kv_BSNF[..., :P], k_rope_BSNR], axis=-1), kv_BSNF[..., P:]
