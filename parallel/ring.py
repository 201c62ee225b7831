"""Causal ring attention: context parallelism over one mesh axis, zig-zag load balanced.

The sequence is split over the `sequence` mesh axis. Every device keeps its own queries while the
K/V blocks travel round a ring (`ppermute` to the next device, n steps for n devices); each block
is folded into an online softmax (running max, denominator and output, all float32), so no device
ever holds the whole sequence's keys or a [T, T] matrix. The keys' positions and document ids travel
with them and, through `model.mask.visible`, alone decide what each query sees (causal, padding,
sliding window, documents), so any token layout is correct.

The backward pass is a second ring: K/V go round again, carrying their gradient accumulators with
them, and each block's probabilities are recomputed from the saved log-sum-exp. Autodiff through
the forward ring would instead keep every step's K/V block, i.e. the whole sequence's K/V per device.

Causality makes a contiguous layout unbalanced: the device holding the end of the sequence attends
to everything, the first one to almost nothing. `zigzag_order` gives device d the chunks d and
2n-1-d of 2n, and every device skips the (query half, K/V half) pairs the mask hides entirely, so
each computes the same 2n+1 half-block pairs over the ring, forward and backward (fewer with a
window or documents, which hide more pairs).

Every part of `model.mask.Mask` is supported, and so are GQA, soft-capped logits, a value head dim
different from the query/key one, and an additive bias.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from model.mask import Mask, visible

NEG_INF = -1e30  # finite, so an empty running state (max = NEG_INF) rescales by exp(0), never NaN
_FAR = 2**30  # beyond any position or document id, and far enough from int32's ends to subtract safely

BiasFn = Callable[[jax.Array, jax.Array], jax.Array]  # (q_pos_BT, k_pos_BS) -> bias_BNTS, all N heads


def zigzag_order(seq_len: int, num_shards: int) -> np.ndarray:
    """Slot -> original position: `x[:, order]` gives shard d the chunks d and 2n-1-d of 2n.

    Split into n contiguous pieces, the permuted sequence pairs an early chunk with a late one on
    every shard, which evens out causal attention's work. Permute tokens, targets, positions and
    document ids alike (a mean loss does not change) and hand the permuted mask to the model.
    """
    n = num_shards
    if seq_len % (2 * n):
        raise ValueError(f"zig-zag layout needs seq_len ({seq_len}) divisible by 2 * num_shards ({2 * n})")
    chunks_CL = np.arange(seq_len, dtype=np.int32).reshape(2 * n, seq_len // (2 * n))
    return np.concatenate([np.concatenate([chunks_CL[d], chunks_CL[2 * n - 1 - d]]) for d in range(n)])


class _Ring(NamedTuple):
    """What the per-device code needs to know about the mesh and the attention (static, hashable)."""

    axis: str | None  # None: the sequence is not sharded, the ring has one step
    num_shards: int
    head_axes: tuple[str, ...]
    bias_fn: BiasFn | None
    window: int
    softcap: float

    def shift(self, tree):
        """Sends `tree` to the next device round the ring."""
        if not jax.tree.leaves(tree):
            return tree
        perm = [(i, (i + 1) % self.num_shards) for i in range(self.num_shards)]
        return jax.lax.ppermute(tree, self.axis, perm)

    def head_offset(self, local_heads: int) -> jax.Array:
        """Index of this device's first query head; shards of `head_axes` are numbered row-major, as
        PartitionSpec lays them out."""
        index = jnp.int32(0)
        for name in self.head_axes:
            index = index * jax.lax.axis_size(name) + jax.lax.axis_index(name)
        return index * local_heads


class _Tokens(NamedTuple):
    """Where a block of queries or keys sits: positions ([B, L], -1 for padding) and document ids
    ([B, L]; None: one document)."""

    positions: jax.Array
    segments: jax.Array | None


# ----------------------------------------------------------------------------- one (query, K/V) block


def _masked_logits(ring, q_BKGTH, k_BSKH, q_at: _Tokens, k_at: _Tokens):
    """(cap * tanh(q k^T / cap) or q k^T) + bias in float32, NEG_INF where masked; the mask; and the
    tanh, whose derivative the backward needs (None without a cap)."""
    B, K, G, T, _ = q_BKGTH.shape
    logits_BKGTS = jnp.einsum("bkgth,bskh->bkgts", q_BKGTH, k_BSKH, preferred_element_type=jnp.float32)
    tanh_BKGTS = None
    if ring.softcap > 0:
        tanh_BKGTS = jnp.tanh(logits_BKGTS / ring.softcap)
        logits_BKGTS = ring.softcap * tanh_BKGTS
    if ring.bias_fn is not None:
        bias_BNTS = ring.bias_fn(q_at.positions, k_at.positions)
        bias_BNTS = jax.lax.dynamic_slice_in_dim(bias_BNTS, ring.head_offset(K * G), K * G, axis=1)  # local heads
        logits_BKGTS = logits_BKGTS + bias_BNTS.reshape(B, K, G, T, -1).astype(jnp.float32)
    mask_BTS = visible(q_at.positions, k_at.positions, q_at.segments, k_at.segments, ring.window)
    mask_B11TS = mask_BTS[:, None, None]
    return jnp.where(mask_B11TS, logits_BKGTS, NEG_INF), mask_B11TS, tanh_BKGTS


class _Softmax(NamedTuple):
    """Online-softmax state of one block of queries, float32 (V: the value head dim)."""

    max_BKGT: jax.Array
    denom_BKGT: jax.Array
    out_BKGTV: jax.Array


def _empty_softmax(q_BKGTH: jax.Array, value_dim: int) -> _Softmax:
    shape_BKGT = q_BKGTH.shape[:-1]
    zeros_BKGT = jnp.zeros(shape_BKGT, jnp.float32)
    out_BKGTV = jnp.zeros((*shape_BKGT, value_dim), jnp.float32)
    return _Softmax(jnp.full(shape_BKGT, NEG_INF, jnp.float32), zeros_BKGT, out_BKGTV)


def _fold_block(ring, state, q_BKGTH, q_at, k_BSKH, v_BSKV, k_at):
    """Folds one K/V block into the running softmax of one block of queries."""
    logits_BKGTS, mask_B11TS, _ = _masked_logits(ring, q_BKGTH, k_BSKH, q_at, k_at)
    max_BKGT = jnp.maximum(state.max_BKGT, logits_BKGTS.max(axis=-1))
    probs_BKGTS = jnp.where(mask_B11TS, jnp.exp(logits_BKGTS - max_BKGT[..., None]), 0.0)
    rescale_BKGT = jnp.exp(state.max_BKGT - max_BKGT)
    denom_BKGT = state.denom_BKGT * rescale_BKGT + probs_BKGTS.sum(axis=-1)
    pv_BKGTV = jnp.einsum(
        "bkgts,bskv->bkgtv", probs_BKGTS.astype(v_BSKV.dtype), v_BSKV, preferred_element_type=jnp.float32
    )
    return _Softmax(max_BKGT, denom_BKGT, state.out_BKGTV * rescale_BKGT[..., None] + pv_BKGTV)


class _Query(NamedTuple):
    """What the backward pass knows about one block of queries."""

    q_BKGTH: jax.Array
    q_at: _Tokens
    dout_BKGTV: jax.Array
    lse_BKGT: jax.Array  # log-sum-exp of the forward's masked logits
    delta_BKGT: jax.Array  # rowsum(dout * out), the softmax Jacobian's correction term


def _block_grads(ring, query, dq_BKGTH, k_BSKH, v_BSKV, k_at, dk_BSKH, dv_BSKV):
    """Adds one block's share to dq, dk and dv (the textbook dS = P * (dP - rowsum(dO * O)), times
    the cap's derivative 1 - tanh^2 where the logits are soft-capped)."""
    logits_BKGTS, mask_B11TS, tanh_BKGTS = _masked_logits(ring, query.q_BKGTH, k_BSKH, query.q_at, k_at)
    probs_BKGTS = jnp.where(mask_B11TS, jnp.exp(logits_BKGTS - query.lse_BKGT[..., None]), 0.0)
    dout_BKGTV = query.dout_BKGTV
    dv_BSKV += jnp.einsum(
        "bkgts,bkgtv->bskv", probs_BKGTS.astype(dout_BKGTV.dtype), dout_BKGTV, preferred_element_type=jnp.float32
    )
    dprobs_BKGTS = jnp.einsum("bkgtv,bskv->bkgts", dout_BKGTV, v_BSKV, preferred_element_type=jnp.float32)
    dlogits_BKGTS = probs_BKGTS * (dprobs_BKGTS - query.delta_BKGT[..., None])
    if tanh_BKGTS is not None:
        dlogits_BKGTS = dlogits_BKGTS * (1.0 - tanh_BKGTS**2)
    dq_BKGTH += jnp.einsum(
        "bkgts,bskh->bkgth", dlogits_BKGTS.astype(k_BSKH.dtype), k_BSKH, preferred_element_type=jnp.float32
    )
    dk_BSKH += jnp.einsum(
        "bkgts,bkgth->bskh",
        dlogits_BKGTS.astype(query.q_BKGTH.dtype),
        query.q_BKGTH,
        preferred_element_type=jnp.float32,
    )
    return dq_BKGTH, dk_BSKH, dv_BSKV


# ----------------------------------------------------------------------------- skipping and the ring


def _fully_masked(q_at: _Tokens, k_at: _Tokens, window: int) -> jax.Array:
    """True only when `visible` hides every (query, key) pair of the blocks, in every row.

    Each test below is sufficient on its own, over the real tokens (position >= 0; padding sees and is
    seen by nothing): every key after every query by position; every key outside every query's window;
    no document id shared; or every key after every query in (document, position) order, which is what
    skips the future blocks when positions restart at each document. Positions alone stay a safe test
    with documents (a key later by position is hidden whatever its document), just a weaker one.
    """
    q_real_BT, k_real_BS = q_at.positions >= 0, k_at.positions >= 0

    def lowest(x, real):
        return jnp.min(jnp.where(real, x, _FAR), axis=1)

    def highest(x, real):
        return jnp.max(jnp.where(real, x, -_FAR), axis=1)

    first_key_B, last_query_B = lowest(k_at.positions, k_real_BS), highest(q_at.positions, q_real_BT)
    hidden_B = first_key_B > last_query_B  # also true when either block has no real token
    if window > 0:
        hidden_B |= lowest(q_at.positions, q_real_BT) - highest(k_at.positions, k_real_BS) >= window
    if q_at.segments is not None:
        first_doc_B, last_doc_B = lowest(k_at.segments, k_real_BS), highest(q_at.segments, q_real_BT)
        hidden_B |= first_doc_B > last_doc_B
        hidden_B |= highest(k_at.segments, k_real_BS) < lowest(q_at.segments, q_real_BT)
        # (document, position) order: the earliest key of the first key document against the latest
        # query of the last query document
        first_key_B = lowest(k_at.positions, k_real_BS & (k_at.segments == first_doc_B[:, None]))
        last_query_B = highest(q_at.positions, q_real_BT & (q_at.segments == last_doc_B[:, None]))
        hidden_B |= (first_doc_B == last_doc_B) & (first_key_B > last_query_B)
    return jnp.all(hidden_B)


def _halves(tree, axis: int) -> list:
    """The two zig-zag chunks of every array in `tree`, split along `axis`."""
    first, second = zip(*(jnp.split(x, 2, axis=axis) for x in jax.tree.leaves(tree)))
    treedef = jax.tree.structure(tree)
    return [jax.tree.unflatten(treedef, first), jax.tree.unflatten(treedef, second)]


def _visit_pairs(ring, update, q_at_halves, k_at_halves, q_accs, kv_accs):
    """Runs `update(i, j, q_accs[i], kv_accs[j])` on each (query half i, K/V half j) pair the mask
    does not entirely hide; returns the accumulators and how many pairs it computed."""
    q_accs, kv_accs, work = list(q_accs), list(kv_accs), jnp.int32(0)
    for i in range(2):
        for j in range(2):
            hidden = _fully_masked(q_at_halves[i], k_at_halves[j], ring.window)
            q_accs[i], kv_accs[j] = jax.lax.cond(
                hidden, lambda *accs: accs, partial(update, i, j), q_accs[i], kv_accs[j]
            )
            work += 1 - hidden.astype(jnp.int32)
    return q_accs, kv_accs, work


def _around_ring(ring, visit, q_accs, block, kv_accs):
    """Calls `visit(q_accs, block, kv_accs)` on each device's K/V `block` in turn as it goes round the
    ring; `kv_accs` (gradients of the block) travel with it and finally come home. Returns the
    accumulators and the work done."""

    def step(carry, _):
        q_accs, block, kv_accs, work = carry
        next_block = ring.shift(block)  # sent before the compute, so the transfer can overlap it
        q_accs, kv_accs, step_work = visit(q_accs, block, kv_accs)
        return (q_accs, next_block, ring.shift(kv_accs), work + step_work), None

    work = jnp.int32(0)
    if ring.num_shards > 1:
        (q_accs, block, kv_accs, work), _ = jax.lax.scan(
            step, (q_accs, block, kv_accs, work), length=ring.num_shards - 1
        )
    q_accs, kv_accs, last_work = visit(q_accs, block, kv_accs)
    if ring.num_shards > 1:
        kv_accs = ring.shift(kv_accs)
    return q_accs, kv_accs, work + last_work


# ----------------------------------------------------------------------------- forward and backward rings


def _ring_forward(ring, q_BKGTH, k_BSKH, v_BSKV, q_at, k_at):
    """Returns out (q's dtype), the log-sum-exp of each query's logits, and the pairs computed."""
    queries = list(zip(_halves(q_BKGTH, 3), _halves(q_at, 1)))

    def visit(states, block, no_kv_accs):
        kv_halves = _halves(block, 1)

        def update(i, j, state, _):
            return _fold_block(ring, state, *queries[i], *kv_halves[j]), ()

        return _visit_pairs(ring, update, [a for _, a in queries], [a for *_, a in kv_halves], states, no_kv_accs)

    states = [_empty_softmax(q, v_BSKV.shape[-1]) for q, _ in queries]
    states, _, work = _around_ring(ring, visit, states, (k_BSKH, v_BSKV, k_at), [(), ()])
    seen_BKGT = [s.denom_BKGT > 0 for s in states]  # a query that sees no key outputs 0
    out_BKGTV = jnp.concatenate(
        [s.out_BKGTV / jnp.where(seen, s.denom_BKGT, 1.0)[..., None] for s, seen in zip(states, seen_BKGT)], axis=3
    )
    lse_BKGT = jnp.concatenate(
        [
            jnp.where(seen, s.max_BKGT + jnp.log(jnp.where(seen, s.denom_BKGT, 1.0)), 0.0)
            for s, seen in zip(states, seen_BKGT)
        ],
        axis=3,
    )
    return out_BKGTV.astype(q_BKGTH.dtype), lse_BKGT, work


def _ring_backward(ring, residuals, dout_BKGTV):
    """dq stays home; dk and dv ride round the ring with their K/V block and arrive back at its owner."""
    q_BKGTH, k_BSKH, v_BSKV, q_at, k_at, out_BKGTV, lse_BKGT = residuals
    delta_BKGT = jnp.sum(dout_BKGTV.astype(jnp.float32) * out_BKGTV.astype(jnp.float32), axis=-1)
    queries = [
        _Query(*halves)
        for halves in zip(
            _halves(q_BKGTH, 3),
            _halves(q_at, 1),
            _halves(dout_BKGTV, 3),
            _halves(lse_BKGT, 3),
            _halves(delta_BKGT, 3),
        )
    ]

    def visit(dq_halves, block, kv_grads):
        kv_halves = _halves(block, 1)

        def update(i, j, dq_BKGTH, kv_grad):
            dq_BKGTH, dk_BSKH, dv_BSKV = _block_grads(ring, queries[i], dq_BKGTH, *kv_halves[j], *kv_grad)
            return dq_BKGTH, (dk_BSKH, dv_BSKV)

        q_at_halves = [q.q_at for q in queries]
        dq_halves, kv_grad_halves, _ = _visit_pairs(
            ring, update, q_at_halves, [a for *_, a in kv_halves], dq_halves, _halves(kv_grads, 1)
        )
        return dq_halves, jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=1), *kv_grad_halves), jnp.int32(0)

    dq_halves = [jnp.zeros(q.q_BKGTH.shape, jnp.float32) for q in queries]
    kv_grads = (jnp.zeros(k_BSKH.shape, jnp.float32), jnp.zeros(v_BSKV.shape, jnp.float32))
    dq_halves, (dk_BSKH, dv_BSKV), _ = _around_ring(ring, visit, dq_halves, (k_BSKH, v_BSKV, k_at), kv_grads)
    dq_BKGTH = jnp.concatenate(dq_halves, axis=3)
    return dq_BKGTH.astype(q_BKGTH.dtype), dk_BSKH.astype(k_BSKH.dtype), dv_BSKV.astype(v_BSKV.dtype), None, None


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring_core(ring, q_BKGTH, k_BSKH, v_BSKV, q_at, k_at):
    """Per-device attention over the ring (q already scaled); returns out and the pairs computed."""
    out_BKGTV, _, work = _ring_forward(ring, q_BKGTH, k_BSKH, v_BSKV, q_at, k_at)
    return out_BKGTV, work


def _ring_core_fwd(ring, q_BKGTH, k_BSKH, v_BSKV, q_at, k_at):
    out_BKGTV, lse_BKGT, work = _ring_forward(ring, q_BKGTH, k_BSKH, v_BSKV, q_at, k_at)
    return (out_BKGTV, work), (q_BKGTH, k_BSKH, v_BSKV, q_at, k_at, out_BKGTV, lse_BKGT)


def _ring_core_bwd(ring, residuals, cotangents):
    dout_BKGTV, _ = cotangents  # the work count has no gradient
    return _ring_backward(ring, residuals, dout_BKGTV)


_ring_core.defvjp(_ring_core_fwd, _ring_core_bwd)


def _ring_shard(q_BTNH, k_BSKH, v_BSKV, q_at, k_at, *, ring, scale, other_axes):
    """One device's share: queries viewed [B, K, G, T, H] so K/V heads are never repeated."""
    B, T, N, H = q_BTNH.shape
    K, V = k_BSKH.shape[2], v_BSKV.shape[3]
    q_BKGTH = (q_BTNH * scale).reshape(B, T, K, N // K, H).transpose(0, 2, 3, 1, 4)
    out_BKGTV, work = _ring_core(ring, q_BKGTH, k_BSKH, v_BSKV, q_at, k_at)
    out_BTNV = out_BKGTV.transpose(0, 3, 1, 2, 4).reshape(B, T, N, V)
    if other_axes:  # devices of one sequence shard may differ only by their batch rows: report the busiest
        work = jax.lax.pmax(jax.lax.stop_gradient(work), other_axes)
    return out_BTNV, work[None]


# ----------------------------------------------------------------------------- entry point


def _present(mesh: Mesh, axes: tuple[str, ...]) -> tuple[str, ...]:
    """The axes that actually shard on `mesh`: absent and size-1 axes drop out."""
    return tuple(name for name in axes if name in mesh.axis_names and mesh.shape[name] > 1)


def _check_inputs(q_BTNH, k_BSKH, v_BSKV, mask, num_seq_shards, num_head_shards):
    (B, T, N, H), (S, K) = q_BTNH.shape, k_BSKH.shape[1:3]
    for name, length in (("seq_len", T), ("key length", S)):
        if length % (2 * num_seq_shards):
            raise ValueError(
                f"ring attention needs {name} ({length}) divisible by 2 * sequence shards ({2 * num_seq_shards})"
            )
    if k_BSKH.shape[:3] != v_BSKV.shape[:3] or k_BSKH.shape[0] != B or k_BSKH.shape[3] != H:
        raise ValueError(f"k {k_BSKH.shape} and v {v_BSKV.shape} do not fit q {q_BTNH.shape}")
    if N % K:
        raise ValueError(f"query heads ({N}) must be a multiple of K/V heads ({K})")
    if K % num_head_shards:
        raise ValueError(f"K/V heads ({K}) must be divisible by the head shards ({num_head_shards})")
    if (mask.q_segments_BT is None) != (mask.k_segments_BS is None):
        raise ValueError("the mask needs document ids for both queries and keys, or for neither")
    if mask.window < 0:
        raise ValueError(f"sliding window must be >= 0 (0: off), got {mask.window}")


def ring_attention(
    q_BTNH: jax.Array,
    k_BSKH: jax.Array,
    v_BSKV: jax.Array,
    mask: Mask,
    *,
    bias_fn: BiasFn | None = None,
    softcap: float = 0.0,
    scale: float | None = None,
    mesh: Mesh,
    axis: str = "sequence",
    batch_axes: tuple[str, ...] = ("data", "fsdp", "expert"),
    head_axes: tuple[str, ...] = ("tensor",),
    return_work: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """softmax(cap(scale * q k^T) + bias, masked by `mask`) v with the sequence sharded over `axis`.

    Every part of `mask` is honoured (positions, padding, window, document ids; `in_order` is not
    needed, any layout works: use `zigzag_order` for balanced work). Query head h reads K/V head
    h // (N / K); v's head dim V may differ from q's and k's H; `scale` defaults to H ** -0.5;
    `softcap` > 0 caps the scaled logits to softcap * tanh(logits / softcap) before the bias (Gemma 2).
    `bias_fn` maps (q_pos_BT, k_pos_BS) to a [B, N, T, S] bias over all N heads; it is called per
    block (forward and backward), each device keeps its own heads, and it gets no gradient (close
    over constants only). A query that sees no key at all gets a zero output.

    With `return_work`, also returns an int32 [num_sequence_shards] count of the (query half,
    K/V half) pairs each sequence shard computed rather than skipped in the forward ring (its
    busiest device's count; the backward ring skips the same pairs).
    """
    seq = _present(mesh, (axis,))
    batch = _present(mesh, tuple(batch_axes))
    heads = _present(mesh, tuple(head_axes))
    num_seq_shards = mesh.shape[axis] if seq else 1
    head_shards = int(np.prod([mesh.shape[a] for a in heads]))
    _check_inputs(q_BTNH, k_BSKH, v_BSKV, mask, num_seq_shards, head_shards)
    scale = q_BTNH.shape[-1] ** -0.5 if scale is None else scale

    def spec(*dims):
        return P(*(d if d else None for d in dims))

    x_spec = spec(batch, seq, heads, None)

    def tokens(positions, segments):
        return _Tokens(positions.astype(jnp.int32), None if segments is None else segments.astype(jnp.int32))

    q_at = tokens(mask.q_positions_BT, mask.q_segments_BT)
    k_at = tokens(mask.k_positions_BS, mask.k_segments_BS)
    ring = _Ring(seq[0] if seq else None, num_seq_shards, heads, bias_fn, int(mask.window), float(softcap))
    # check_vma is off: the softmax state starts replicated and turns device-varying inside scan and
    # cond, and the call that would mark it varying up front (pvary, then pcast) moved between JAX versions.
    out_BTNV, work = jax.shard_map(
        partial(_ring_shard, ring=ring, scale=scale, other_axes=batch + heads),
        mesh=mesh,
        in_specs=(x_spec, x_spec, x_spec, spec(batch, seq), spec(batch, seq)),
        out_specs=(x_spec, spec(seq)),
        check_vma=False,
    )(q_BTNH, k_BSKH, v_BSKV, q_at, k_at)
    return (out_BTNV, work) if return_work else out_BTNV
