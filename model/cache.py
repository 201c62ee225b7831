"""Decode caches: the cache interface, its layouts (`LAYOUTS`, chosen by `DecodeConfig.cache`), and functions that
act on a whole model's caches without knowing their fields.

An attention kind says what it caches per token (GQA: keys and values; MLA: its latent and rope key) as named
arrays, each with one slot axis; a layout says where each row's tokens go. A layout is a flax.struct dataclass
made by `create(batch, max_len, fields, window, decode)` that provides
- `write(new, pos_BT) -> (cache, view)`: writes each row's T new tokens (`new`: name -> [B, T, ...]) at that row's
  next slots and returns the arrays this call's queries read, with the position of every slot they see
  (`CacheView`; -1: empty, which no query reads);
- `rewind(written_B)` (speculative decoding's rejected drafts), `select_rows(rows_B)` (beam search) and
  `written_B` (tokens each row has written).
The attention kind turns a view into the keys and values an attention implementation reads (`KVView`), which
`Implementation.decode` takes: a paged layout hands over its pages and each row's page table there, and
implementations that cannot read pages call `KVView.dense()`.

`Rows` keeps `size` slots per row. A rolling cache (sliding-window layers) writes slot (written % size), so it
keeps the last `size` tokens: `size` is the window plus how far a row may be rewound. `Pages` (the serving engine's)
keeps fixed-size pages of one pool per layer, each row a table of its pages, so rows of any length share the pool
and rows with a common prefix share its pages; the engine sets the tables before every call (`bind`).

A field of dtype int8 (`DecodeConfig.cache_dtype='int8'`) is stored quantized: each token's vector (per head for
keys and values: the last axis) as int8 codes round(x / s) with s = absmax / 127, its float32 scale in a companion
field "{name}_scale" of the same shape but a last axis of 1; views hand out the dequantized values.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from model.mask import Mask

SLOTS = None  # marks the slot axis in a field's shape (see Rows.create)


@flax.struct.dataclass
class CacheView:
    """What one decoding call reads from a layout: its arrays (name -> the layout's storage, e.g. [B, K, S, H]
    for rows) and the position of every slot (-1: empty)."""

    arrays: dict[str, jax.Array]
    k_positions_BS: jax.Array


@flax.struct.dataclass
class Paged:
    """A paged layout's keys and values as stored: pools of pages [num_pages, K, page_size, H] (values: Hv) and
    each row's page table [B, max_pages] (entry m: the page holding the row's slots m * page_size ...; page 0 is
    the null page, never visible). Slot s of the view is table[s // page_size], offset s % page_size."""

    k_PKsH: jax.Array
    v_PKsH: jax.Array
    table_BM: jax.Array


@flax.struct.dataclass
class KVView:
    """Keys [B, K, S, H] and values [B, K, S, Hv] of the slots each row may read, and the mask over them: what
    `Implementation.decode` takes. Rows keep them dense; a paged layout also hands over its pages (`pages`), which
    a kernel that reads pages through the page table takes instead (the dense gather is then dead code)."""

    k_BKSH: jax.Array
    v_BKSH: jax.Array
    mask: Mask
    pages: Paged | None = None

    def dense(self) -> tuple[jax.Array, jax.Array]:
        return self.k_BKSH, self.v_BKSH


class DecodeCache:
    """The interface every layout provides (see the module docstring)."""

    written_B: jax.Array

    def write(self, new: dict[str, jax.Array], pos_BT: jax.Array) -> tuple[DecodeCache, CacheView]:
        raise NotImplementedError

    def select_rows(self, rows_B: jax.Array) -> DecodeCache:
        raise NotImplementedError

    def rewind(self, written_B: jax.Array) -> DecodeCache:
        raise NotImplementedError


@flax.struct.dataclass
class Rows(DecodeCache):
    """`size` slots per batch row. `arrays` maps each field to [B, ..., size (at its slot axis), ...]; `pos_BS`
    is each slot's token position (-1: empty), `written_B` how many tokens each row has written."""

    arrays: dict[str, jax.Array]
    pos_BS: jax.Array
    written_B: jax.Array
    window: int = flax.struct.field(pytree_node=False, default=0)  # > 0: a rolling cache for this sliding window
    slot_axes: tuple[tuple[str, int], ...] = flax.struct.field(pytree_node=False, default=())

    @classmethod
    def create(cls, batch: int, max_len: int, fields: dict[str, tuple[tuple, object]], window: int, decode):
        """A cache for rows of up to `max_len` tokens; a sliding-window layer (`window` > 0) whose window plus
        `decode.max_rewind` (how far a row may be rewound) is shorter keeps only that many slots, rolling.
        `fields`: name -> (per-row shape with SLOTS where the slot axis goes, dtype), e.g. GQA's keys
        {"k": ((K, SLOTS, H), dtype)} are stored [B, K, slots, H], as attention reads them."""
        rolling = 0 < window and window + decode.max_rewind < max_len
        size = window + decode.max_rewind if rolling else max_len
        arrays, axes = _storage(batch, size, fields)
        empty = jnp.full((batch, size), -1, jnp.int32)
        return cls(arrays, empty, jnp.zeros((batch,), jnp.int32), window if rolling else 0, axes)

    @property
    def size(self) -> int:
        return self.pos_BS.shape[1]

    @property
    def rolling(self) -> bool:
        return self.window > 0

    def next_slots(self, T: int) -> tuple[jax.Array, jax.Array, jax.Array, int]:
        """Where a write of T tokens per row goes: (written_B after it, rows_BT, slot_BT, kept), the slots of the
        last `kept` of the T tokens (a rolling cache keeps at most `size`; a full one is sized for every token)."""
        written_B = self.written_B + T
        kept = min(T, self.size)
        slot_BT = (written_B - kept)[:, None] + jnp.arange(kept)
        slot_BT = slot_BT % self.size if self.rolling else slot_BT
        rows_BT = jnp.broadcast_to(jnp.arange(slot_BT.shape[0])[:, None], slot_BT.shape)
        return written_B, rows_BT, slot_BT, kept

    def write(self, new: dict[str, jax.Array], pos_BT: jax.Array) -> tuple[Rows, CacheView]:
        cache, view = self._write(quantized(new, self.arrays), pos_BT)
        return cache, CacheView(dequantized(view.arrays, next(iter(new.values())).dtype), view.k_positions_BS)

    def _write(self, new: dict[str, jax.Array], pos_BT: jax.Array) -> tuple[Rows, CacheView]:
        T = pos_BT.shape[1]
        if not self.rolling:
            return self._write_blocks(new, pos_BT)
        written_B, rows_BT, slot_BT, kept = self.next_slots(T)
        arrays = dict(self.arrays)
        for name, axis in self.slot_axes:
            # [rows, :, ..., slots]: the indexed axes come first in the update, so new values go in as [B, T, ...].
            index = (rows_BT, *[slice(None)] * (axis - 1), slot_BT)
            arrays[name] = arrays[name].at[index].set(new[name][:, -kept:].astype(arrays[name].dtype))
        pos = pos_BT.astype(jnp.int32)
        written = self.replace(arrays=arrays, pos_BS=self.pos_BS.at[rows_BT, slot_BT].set(pos[:, -kept:]))
        written = written.replace(written_B=written_B)
        if not (self.rolling and T > self.size - self.window + 1):
            return written, CacheView(written.arrays, written.pos_BS)
        # Writing T tokens may overwrite keys that this call's own first queries still see (more tokens than the
        # rewind room of a rolling cache: a prompt): they read the cache as it was plus the new tokens.
        joined = {
            name: jnp.concatenate(
                [self.arrays[name], jnp.moveaxis(new[name], 1, axis).astype(self.arrays[name].dtype)], axis
            )  # fmt: skip
            for name, axis in self.slot_axes
        }
        return written, CacheView(joined, jnp.concatenate([self.pos_BS, pos], axis=1))

    def _write_blocks(self, new: dict[str, jax.Array], pos_BT: jax.Array) -> tuple[Rows, CacheView]:
        """A full cache (sized for every token a row writes): row b's T tokens go to slots written_b .. written_b +
        T - 1, one contiguous block per row. A dynamic_update_slice per row copies blocks, where a scatter of B x T
        slots moves the tokens one by one (on XLA:CPU, scoring's prefill + continuation programs ran 10-15% faster)."""
        start_B = self.written_B

        def put(axis: int):
            return jax.vmap(lambda row, block, start: jax.lax.dynamic_update_slice_in_dim(row, block, start, axis))

        arrays = dict(self.arrays)
        for name, axis in self.slot_axes:
            block = jnp.moveaxis(new[name], 1, axis).astype(
                arrays[name].dtype
            )  # the T new slots where the cache has them
            arrays[name] = put(axis - 1)(arrays[name], block, start_B)
        pos_BS = put(0)(self.pos_BS, pos_BT.astype(jnp.int32), start_B)
        written = self.replace(arrays=arrays, pos_BS=pos_BS, written_B=start_B + pos_BT.shape[1])
        return written, CacheView(written.arrays, written.pos_BS)

    def rewind(self, written_B: jax.Array) -> Rows:
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

    def select_rows(self, rows_B: jax.Array) -> Rows:
        return jax.tree.map(lambda x: jnp.take(x, rows_B, axis=0), self)


def _storage(count: int, size: int, fields: dict[str, tuple[tuple, object]]) -> tuple[dict, tuple]:
    """Zeroed arrays [count, ...] for `fields` with `size` slots at each one's slot axis (an int8 field gets its
    scale field beside it), and (name, slot axis) of each."""
    arrays, axes = {}, []
    fields = dict(fields)
    for name, (shape, dtype) in list(fields.items()):
        if jnp.dtype(dtype) == jnp.int8:  # quantized per token: its scale beside it
            fields[f"{name}{SCALE}"] = ((*shape[:-1], 1), jnp.float32)
    for name, (shape, dtype) in fields.items():
        arrays[name] = jnp.zeros((count, *(size if d is SLOTS else d for d in shape)), dtype)
        axes.append((name, 1 + shape.index(SLOTS)))
    return arrays, tuple(axes)


@flax.struct.dataclass
class Pages(DecodeCache):
    """Slots in fixed-size pages of one pool per layer, shared by every row (the serving engine's layout,
    sampling/engine.py): `arrays` maps each field to its pool [num_pages, ..., page_size (at the slot axis), ...],
    `table_BM` gives each row's pages in order (page 0: the null page, never allocated, where padding tokens
    write) and `written_B` how many tokens each row holds. The engine owns the pages: before every call it sets
    each row's table and length (`bind`), so the same pools serve rows of any batch, and two rows may share a
    page of a common prefix.

    A paged row holds its tokens at positions 0, 1, 2, ... (no left padding: each row has its own length), so
    slot s holds position s; a call's tokens come first in their row and padding (position -1) after them. The
    engine frees pages that slide out of a windowed layer's window (their table entries become 0): slots on the
    null page are invisible."""

    arrays: dict[str, jax.Array]
    table_BM: jax.Array
    written_B: jax.Array
    window: int = flax.struct.field(pytree_node=False, default=0)
    slot_axes: tuple[tuple[str, int], ...] = flax.struct.field(pytree_node=False, default=())

    @classmethod
    def create(cls, batch: int, max_len: int, fields: dict[str, tuple[tuple, object]], window: int, decode):
        """`decode.num_pages` pages of `decode.page_size` slots; rows of up to `max_len` tokens."""
        if decode.num_pages < 2 or decode.page_size < 1:
            raise ValueError(
                f"cache='pages' needs num_pages >= 2 (page 0 is the null page) and page_size >= 1, got "
                f"num_pages={decode.num_pages}, page_size={decode.page_size}"
            )
        arrays, axes = _storage(decode.num_pages, decode.page_size, fields)
        table = jnp.zeros((batch, -(-max_len // decode.page_size)), jnp.int32)
        return cls(arrays, table, jnp.zeros((batch,), jnp.int32), window, axes)

    @property
    def page_size(self) -> int:
        name, axis = self.slot_axes[0]
        return self.arrays[name].shape[axis]

    def write(self, new: dict[str, jax.Array], pos_BT: jax.Array) -> tuple[Pages, CacheView]:
        dtype = next(iter(new.values())).dtype
        new = quantized(new, self.arrays)
        ps, T = self.page_size, pos_BT.shape[1]
        valid_BT = pos_BT >= 0
        slot_BT = self.written_B[:, None] + jnp.arange(T)
        block_BT = jnp.minimum(slot_BT // ps, self.table_BM.shape[1] - 1)
        page_BT = jnp.where(valid_BT, jnp.take_along_axis(self.table_BM, block_BT, axis=1), 0)
        arrays = dict(self.arrays)
        for name, axis in self.slot_axes:
            # [pages, :, ..., offsets]: the indexed axes come first in the update, so new values go in as [B, T, ...]
            index = (page_BT, *[slice(None)] * (axis - 1), slot_BT % ps)
            arrays[name] = arrays[name].at[index].set(new[name].astype(arrays[name].dtype))
        written = self.replace(arrays=arrays, written_B=self.written_B + valid_BT.sum(axis=1, dtype=jnp.int32))
        dense = {name: written.gathered(name) for name in arrays}
        return written, CacheView(dequantized(dense, dtype), written.k_positions_BS())

    def gathered(self, name: str) -> jax.Array:
        """A field's pages of each row in order: [B, ..., max_pages * page_size (at the slot axis), ...]."""
        axis = dict(self.slot_axes)[name]
        x = jnp.moveaxis(self.arrays[name][self.table_BM], 1, axis)  # [B, ..., max_pages, page_size, ...]
        return x.reshape(*x.shape[:axis], -1, *x.shape[axis + 2 :])

    def k_positions_BS(self) -> jax.Array:
        """Slot s's position (s) where the row holds it and its page is not the null page, else -1."""
        S = self.table_BM.shape[1] * self.page_size
        slot_S = jnp.arange(S, dtype=jnp.int32)
        on_page_BS = jnp.repeat(self.table_BM != 0, self.page_size, axis=1)
        return jnp.where((slot_S < self.written_B[:, None]) & on_page_BS, slot_S, -1)

    def paged(self, k: str, v: str) -> Paged:
        """Fields `k` and `v` as pools plus page tables, for kernels that read pages (float fields only)."""
        return Paged(self.arrays[k], self.arrays[v], self.table_BM)

    def rewind(self, written_B: jax.Array) -> Pages:
        return self.replace(written_B=jnp.minimum(written_B, self.written_B))

    def select_rows(self, rows_B: jax.Array) -> Pages:
        return self.replace(table_BM=self.table_BM[rows_B], written_B=self.written_B[rows_B])


def bind(cache: dict, tables: dict[int, jax.Array], written_B: jax.Array) -> dict:
    """Every paged layer's cache with the rows of the next call: the page table of its window's pages (`tables`:
    window -> [B, max_pages]; 0 is a global layer) and each row's length."""

    def one(c):
        return c.replace(table_BM=tables[c.window], written_B=written_B) if isinstance(c, Pages) else c

    return jax.tree.map(one, cache, is_leaf=_is_cache)


SCALE = "_scale"  # suffix of an int8 field's scales


def quantized(new: dict[str, jax.Array], stored: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """New values of int8 fields as codes plus per-vector scales (absmax / 127 over the last axis)."""
    out = dict(new)
    for name, x in new.items():
        if stored[name].dtype == jnp.int8:
            x = x.astype(jnp.float32)
            s = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / 127
            inv = jnp.where(s == 0, 0.0, 1.0 / jnp.where(s == 0, 1.0, s))
            out[name] = jnp.clip(jnp.round(x * inv), -127, 127).astype(jnp.int8)
            out[f"{name}{SCALE}"] = s
    return out


def dequantized(arrays: dict[str, jax.Array], dtype) -> dict[str, jax.Array]:
    """The view of int8 fields as values of `dtype` (their scale fields dropped)."""
    out = {}
    for name, x in arrays.items():
        if name.endswith(SCALE) and name[: -len(SCALE)] in arrays:
            continue
        out[name] = (x.astype(jnp.float32) * arrays[f"{name}{SCALE}"]).astype(dtype) if x.dtype == jnp.int8 else x
    return out


# How decode caches lay out their slots (DecodeConfig.cache).
LAYOUTS: dict[str, type[DecodeCache]] = {"rows": Rows, "pages": Pages}


def _is_cache(x) -> bool:
    return isinstance(x, DecodeCache)


def init_cache(model, batch: int, max_len: int) -> dict:
    """An empty cache for rows of up to `max_len` tokens (call inside jit: the forward pass that sizes it is dead
    code there). `model` is a decoding Transformer (`model.rt.decode` set)."""
    return model.init(jax.random.key(0), jnp.zeros((batch, max_len), jnp.int32))["cache"]


def select_rows(cache: dict, rows_B: jax.Array) -> dict:
    return jax.tree.map(lambda c: c.select_rows(rows_B), cache, is_leaf=_is_cache)


def rewind(cache: dict, written_B: jax.Array) -> dict:
    return jax.tree.map(lambda c: c.rewind(written_B), cache, is_leaf=_is_cache)


def written(cache: dict) -> jax.Array:
    """Tokens each row has written (the same in every layer)."""
    return jax.tree.leaves(cache, is_leaf=_is_cache)[0].written_B
