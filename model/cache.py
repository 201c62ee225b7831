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


class SlotCache(DecodeCache):
    """A row-major cache of `size` slots per row, the base of the kinds' caches (model.gqa.KVCache,
    model.mla.MLACache): subclasses are flax.struct dataclasses with the fields `pos_BS` (each slot's token
    position; -1: empty, which no query reads), `written_B` (tokens each row has written) and a static `rolling`,
    besides their own [B, S, ...] arrays. A rolling cache (sliding-window layers) writes slot (written % size), so
    it keeps the last `size` tokens: `size` is the window plus how far a row may be rewound."""

    @property
    def size(self) -> int:
        return self.pos_BS.shape[1]

    def next_slots(self, T: int) -> tuple[jax.Array, jax.Array, jax.Array, int]:
        """Where a write of T tokens per row goes: (written_B after it, rows_BT, slot_BT, kept), the slots of the
        last `kept` of the T tokens (a rolling cache keeps at most `size`; a full one is sized for every token)."""
        written_B = self.written_B + T
        kept = min(T, self.size)
        slot_BT = (written_B - kept)[:, None] + jnp.arange(kept)
        slot_BT = slot_BT % self.size if self.rolling else slot_BT
        rows_BT = jnp.broadcast_to(jnp.arange(slot_BT.shape[0])[:, None], slot_BT.shape)
        return written_B, rows_BT, slot_BT, kept

    def rewind(self, written_B: jax.Array):
        """Forgets every token a row wrote after its first `written_B` (speculative decoding's rejected drafts):
        their slots read as empty again."""
        written_B = jnp.minimum(written_B, self.written_B)
        slot_S = jnp.arange(self.size)
        if self.rolling:  # slot s last held write number w with w % size == s, w < written
            last_write_BS = self.written_B[:, None] - 1 - (self.written_B[:, None] - 1 - slot_S) % self.size
            forget_BS = last_write_BS >= written_B[:, None]
        else:
            forget_BS = slot_S >= written_B[:, None]
        return self.replace(pos_BS=jnp.where(forget_BS, -1, self.pos_BS), written_B=written_B)

    def select_rows(self, rows_B: jax.Array):
        return jax.tree.map(lambda x: jnp.take(x, rows_B, axis=0), self)


# How decode caches lay out their slots (DecodeConfig.cache): rows of `size` slots per batch row.
LAYOUTS: dict[str, type[DecodeCache]] = {"rows": SlotCache}


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
