"""Sampling rules on a batch of next-token logits [B, V], one small function each.

`pick` applies them in the usual order: temperature, then top-k, top-p and min-p on the tempered
distribution, then a categorical draw (temperature 0 is greedy). A filter removes a token by setting
its logit to -inf.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Rules:
    temperature: float = 0.8  # 0: greedy
    top_k: int = 0  # keep the k most likely tokens (0: all)
    top_p: float = 1.0  # keep the smallest set whose probability mass reaches p (1: all)
    min_p: float = 0.0  # keep tokens at least min_p times as likely as the most likely one (0: all)


def greedy(logits_BV: jax.Array) -> jax.Array:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)


def top_k_filter(logits_BV: jax.Array, k: int) -> jax.Array:
    """Keeps the k largest logits of each row (and any tied with the k-th)."""
    if k <= 0 or k >= logits_BV.shape[-1]:
        return logits_BV
    kth_B1 = jax.lax.top_k(logits_BV, k)[0][:, -1:]
    return jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)


def top_p_filter(logits_BV: jax.Array, p: float) -> jax.Array:
    """Keeps the smallest set of most likely tokens whose probability mass reaches p (nucleus sampling)."""
    if p >= 1.0:
        return logits_BV
    order_BV = jnp.argsort(-logits_BV, axis=-1)
    sorted_probs_BV = jax.nn.softmax(jnp.take_along_axis(logits_BV, order_BV, axis=-1), axis=-1)
    mass_before_BV = jnp.cumsum(sorted_probs_BV, axis=-1) - sorted_probs_BV
    keep_sorted_BV = mass_before_BV < p  # the most likely token always stays
    rows_B1 = jnp.arange(logits_BV.shape[0])[:, None]
    keep_BV = jnp.zeros_like(keep_sorted_BV).at[rows_B1, order_BV].set(keep_sorted_BV)
    return jnp.where(keep_BV, logits_BV, -jnp.inf)


def min_p_filter(logits_BV: jax.Array, min_p: float) -> jax.Array:
    """Keeps tokens whose probability is at least min_p times the row's largest probability."""
    if min_p <= 0.0:
        return logits_BV
    # p_i >= min_p * p_max  <=>  logit_i >= logit_max + log(min_p)
    threshold_B1 = jnp.max(logits_BV, axis=-1, keepdims=True) + jnp.log(min_p)
    return jnp.where(logits_BV < threshold_B1, -jnp.inf, logits_BV)


def filtered(logits_BV: jax.Array, rules: Rules) -> jax.Array:
    """The tempered, filtered logits that `pick` draws from (rules.temperature > 0)."""
    logits_BV = logits_BV.astype(jnp.float32) / rules.temperature
    logits_BV = top_k_filter(logits_BV, rules.top_k)
    logits_BV = top_p_filter(logits_BV, rules.top_p)
    return min_p_filter(logits_BV, rules.min_p)


def pick(logits_BV: jax.Array, keys_B: jax.Array, rules: Rules) -> jax.Array:
    """One token id per row; row b draws with its own key keys_B[b]."""
    if rules.temperature == 0:
        return greedy(logits_BV)
    draw = jax.vmap(lambda key, logits_V: jax.random.categorical(key, logits_V))
    return draw(keys_B, filtered(logits_BV, rules)).astype(jnp.int32)
