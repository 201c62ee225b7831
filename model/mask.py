"""The one description of which keys a query may read, shared by every attention implementation.

A key is visible to a query when it is a real token (position >= 0: padding and empty cache slots are -1),
at or before the query's position, inside the query's sliding window (query position - key position <
`window`, as in Mistral; 0: no window) and in the same document (segment ids equal; None: one document).
Positions restart at each document start when documents are masked, so "before" is only ever compared
within one document.

`in_order` says the queries and keys are the same tokens in order (positions 0..T-1 in every row, no
padding): implementations may then mask by index and skip whole blocks.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class Mask:
    q_positions_BT: jax.Array
    k_positions_BS: jax.Array
    q_segments_BT: jax.Array | None = None
    k_segments_BS: jax.Array | None = None
    window: int = flax.struct.field(pytree_node=False, default=0)
    in_order: bool = flax.struct.field(pytree_node=False, default=False)

    @classmethod
    def self_attention(cls, positions_BT, segments_BT=None, *, window: int = 0, in_order: bool = False) -> Mask:
        """Queries and keys are the same tokens."""
        return cls(positions_BT, positions_BT, segments_BT, segments_BT, window, in_order)

    @property
    def has_segments(self) -> bool:
        return self.q_segments_BT is not None

    def allowed(self) -> jax.Array:
        """[B, T, S] bool: True where query t may read key s."""
        return visible(self.q_positions_BT, self.k_positions_BS, self.q_segments_BT, self.k_segments_BS, self.window)

    def queries(self, start: int, end: int) -> Mask:
        """The mask of queries start:end against the same keys."""
        seg = None if self.q_segments_BT is None else self.q_segments_BT[:, start:end]
        return self.replace(q_positions_BT=self.q_positions_BT[:, start:end], q_segments_BT=seg, in_order=False)

    def keys(self, start: int, end: int) -> Mask:
        """The mask of the same queries against keys start:end."""
        seg = None if self.k_segments_BS is None else self.k_segments_BS[:, start:end]
        return self.replace(k_positions_BS=self.k_positions_BS[:, start:end], k_segments_BS=seg, in_order=False)


def visible(q_pos_BT, k_pos_BS, q_seg_BT=None, k_seg_BS=None, window: int = 0) -> jax.Array:
    """The rule of `Mask.allowed` on plain arrays (ring attention applies it block by block)."""
    q_BT1, k_B1S = q_pos_BT[:, :, None], k_pos_BS[:, None, :]
    ok_BTS = (k_B1S <= q_BT1) & (k_B1S >= 0)
    if window > 0:
        ok_BTS = ok_BTS & (q_BT1 - k_B1S < window)
    if q_seg_BT is not None:
        ok_BTS = ok_BTS & (q_seg_BT[:, :, None] == k_seg_BS[:, None, :])
    return ok_BTS


def documents(tokens_BT: jax.Array, eod_id: int) -> tuple[jax.Array, jax.Array]:
    """(segment ids, positions) of windows cut from a stream of documents that each start with the
    end-of-document token of the one before (as prompts do): a new segment begins at every end-of-document
    token, and positions count from 0 there (and from the window's first token)."""
    T = tokens_BT.shape[1]
    starts_BT = tokens_BT == eod_id
    segments_BT = jnp.cumsum(starts_BT, axis=1, dtype=jnp.int32)
    index_T = jnp.arange(T, dtype=jnp.int32)
    start_index_BT = jax.lax.cummax(jnp.where(starts_BT, index_T, 0), axis=1)
    return segments_BT, index_T - start_index_BT
