"""Decode caches as a whole: every attention kind keeps its own cache object in the "cache" collection (GQA's
`KVCache`, ...); these functions act on all of them without knowing their fields."""

from __future__ import annotations

import jax
import jax.numpy as jnp


class DecodeCache:
    """What a kind's cache (a flax.struct dataclass) provides: `select_rows(rows_B)` (beam search reorders rows)
    and `rewind(written_B)` (each row forgets what it wrote after its first written_B tokens), and `written_B`,
    how many tokens each row has written."""

    def select_rows(self, rows_B: jax.Array):
        raise NotImplementedError

    def rewind(self, written_B: jax.Array):
        raise NotImplementedError


def _is_cache(x) -> bool:
    return isinstance(x, DecodeCache)


def init_cache(model, batch: int, max_len: int) -> dict:
    """An empty cache for rows of up to `max_len` tokens (call inside jit: the forward pass that sizes it is dead
    code there). `model` is a Transformer with decode=True."""
    return model.init(jax.random.key(0), jnp.zeros((batch, max_len), jnp.int32))["cache"]


def select_rows(cache: dict, rows_B: jax.Array) -> dict:
    return jax.tree.map(lambda c: c.select_rows(rows_B), cache, is_leaf=_is_cache)


def rewind(cache: dict, written_B: jax.Array) -> dict:
    return jax.tree.map(lambda c: c.rewind(written_B), cache, is_leaf=_is_cache)


def written(cache: dict) -> jax.Array:
    """Tokens each row has written (the same in every layer)."""
    return jax.tree.leaves(cache, is_leaf=_is_cache)[0].written_B
