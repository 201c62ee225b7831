"""Causal ring attention: context parallelism over one mesh axis, zig-zag load balanced.

The sequence is split over the `sequence` mesh axis. Every device keeps its own queries while the
K/V blocks travel round a ring (`ppermute` to the next device, n steps for n devices); each block
is folded into an online softmax (running max, denominator and output, all float32), so no device
ever holds the whole sequence's keys or a [T, T] matrix. Positions travel with the keys and alone
decide the causal mask, so any token layout is correct.

The backward pass is a second ring: K/V go round again, carrying their gradient accumulators with
them, and each block's probabilities are recomputed from the saved log-sum-exp. Autodiff through
the forward ring would instead keep every step's K/V block, i.e. the whole sequence's K/V per device.

Causality makes a contiguous layout unbalanced: the device holding the end of the sequence attends
to everything, the first one to almost nothing. `zigzag_order` gives device d the chunks d and
2n-1-d of 2n, and every device skips the (query half, K/V half) pairs the mask hides entirely, so
each computes the same 2n+1 half-block pairs over the ring, forward and backward.
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

NEG_INF = -1e30  # finite, so an empty running state (max = NEG_INF) rescales by exp(0), never NaN

BiasFn = Callable[[jax.Array, jax.Array], jax.Array]  # (q_pos_BT, k_pos_BS) -> bias_BNTS, all N heads


def zigzag_order(seq_len: int, num_shards: int) -> np.ndarray:
    """Slot -> original position: `x[:, order]` gives shard d the chunks d and 2n-1-d of 2n.

    Split into n contiguous pieces, the permuted sequence pairs an early chunk with a late one on
    every shard, which evens out causal attention's work. Permute tokens, targets and positions
    alike (a mean loss does not change) and hand the permuted positions to the model.
    """
    n = num_shards
    if seq_len % (2 * n):
        raise ValueError(f"zig-zag layout needs seq_len ({seq_len}) divisible by 2 * num_shards ({2 * n})")
    chunks_CL = np.arange(seq_len, dtype=np.int32).reshape(2 * n, seq_len // (2 * n))
    return np.concatenate([np.concatenate([chunks_CL[d], chunks_CL[2 * n - 1 - d]]) for d in range(n)])


class _Ring(NamedTuple):
    """What the per-device code needs to know about the mesh (static, hashable)."""

    axis: str | None  # None: the sequence is not sharded, the ring has one step
    num_shards: int
    head_axes: tuple[str, ...]
    bias_fn: BiasFn | None

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


# ----------------------------------------------------------------------------- one (query, K/V) block


def _masked_logits(ring, q_BKGTH, k_BSKH, q_pos_BT, k_pos_BS):
    """q k^T + bias in float32, NEG_INF where masked; and the mask."""
    B, K, G, T, _ = q_BKGTH.shape
    logits_BKGTS = jnp.einsum("bkgth,bskh->bkgts", q_BKGTH, k_BSKH, preferred_element_type=jnp.float32)
    if ring.bias_fn is not None:
        bias_BNTS = ring.bias_fn(q_pos_BT, k_pos_BS)
        bias_BNTS = jax.lax.dynamic_slice_in_dim(bias_BNTS, ring.head_offset(K * G), K * G, axis=1)  # local heads
        logits_BKGTS = logits_BKGTS + bias_BNTS.reshape(B, K, G, T, -1).astype(jnp.float32)
    k_pos_B1S = k_pos_BS[:, None, :]
    mask_B11TS = ((k_pos_B1S <= q_pos_BT[:, :, None]) & (k_pos_B1S >= 0))[:, None, None]
    return jnp.where(mask_B11TS, logits_BKGTS, NEG_INF), mask_B11TS


class _Softmax(NamedTuple):
    """Online-softmax state of one block of queries, float32."""

    max_BKGT: jax.Array
    denom_BKGT: jax.Array
    out_BKGTH: jax.Array


def _empty_softmax(q_BKGTH: jax.Array) -> _Softmax:
    shape_BKGT = q_BKGTH.shape[:-1]
    zeros_BKGT = jnp.zeros(shape_BKGT, jnp.float32)
    return _Softmax(jnp.full(shape_BKGT, NEG_INF, jnp.float32), zeros_BKGT, jnp.zeros(q_BKGTH.shape, jnp.float32))


def _fold_block(ring, state, q_BKGTH, q_pos_BT, k_BSKH, v_BSKH, k_pos_BS):
    """Folds one K/V block into the running softmax of one block of queries."""
    logits_BKGTS, mask_B11TS = _masked_logits(ring, q_BKGTH, k_BSKH, q_pos_BT, k_pos_BS)
    max_BKGT = jnp.maximum(state.max_BKGT, logits_BKGTS.max(axis=-1))
    probs_BKGTS = jnp.where(mask_B11TS, jnp.exp(logits_BKGTS - max_BKGT[..., None]), 0.0)
    rescale_BKGT = jnp.exp(state.max_BKGT - max_BKGT)
    denom_BKGT = state.denom_BKGT * rescale_BKGT + probs_BKGTS.sum(axis=-1)
    pv_BKGTH = jnp.einsum(
        "bkgts,bskh->bkgth", probs_BKGTS.astype(v_BSKH.dtype), v_BSKH, preferred_element_type=jnp.float32
    )
    return _Softmax(max_BKGT, denom_BKGT, state.out_BKGTH * rescale_BKGT[..., None] + pv_BKGTH)


class _Query(NamedTuple):
    """What the backward pass knows about one block of queries."""

    q_BKGTH: jax.Array
    q_pos_BT: jax.Array
    dout_BKGTH: jax.Array
    lse_BKGT: jax.Array  # log-sum-exp of the forward's masked logits
    delta_BKGT: jax.Array  # rowsum(dout * out), the softmax Jacobian's correction term


def _block_grads(ring, query, dq_BKGTH, k_BSKH, v_BSKH, k_pos_BS, dk_BSKH, dv_BSKH):
    """Adds one block's share to dq, dk and dv (the textbook dS = P * (dP - rowsum(dO * O)))."""
    logits_BKGTS, mask_B11TS = _masked_logits(ring, query.q_BKGTH, k_BSKH, query.q_pos_BT, k_pos_BS)
    probs_BKGTS = jnp.where(mask_B11TS, jnp.exp(logits_BKGTS - query.lse_BKGT[..., None]), 0.0)
    dout_BKGTH = query.dout_BKGTH
    dv_BSKH += jnp.einsum(
        "bkgts,bkgth->bskh", probs_BKGTS.astype(dout_BKGTH.dtype), dout_BKGTH, preferred_element_type=jnp.float32
    )
    dprobs_BKGTS = jnp.einsum("bkgth,bskh->bkgts", dout_BKGTH, v_BSKH, preferred_element_type=jnp.float32)
    dlogits_BKGTS = probs_BKGTS * (dprobs_BKGTS - query.delta_BKGT[..., None])
    dq_BKGTH += jnp.einsum(
        "bkgts,bskh->bkgth", dlogits_BKGTS.astype(k_BSKH.dtype), k_BSKH, preferred_element_type=jnp.float32
    )
    dk_BSKH += jnp.einsum(
        "bkgts,bkgth->bskh",
        dlogits_BKGTS.astype(query.q_BKGTH.dtype),
        query.q_BKGTH,
        preferred_element_type=jnp.float32,
    )
    return dq_BKGTH, dk_BSKH, dv_BSKH


# ----------------------------------------------------------------------------- skipping and the ring


def _fully_masked(q_pos_BT: jax.Array, k_pos_BS: jax.Array) -> jax.Array:
    """True when no query of the block sees any key: every real key comes after the last query."""
    first_key_B = jnp.min(jnp.where(k_pos_BS >= 0, k_pos_BS, jnp.iinfo(jnp.int32).max), axis=1)
    return jnp.all(first_key_B > jnp.max(q_pos_BT, axis=1))


def _halves(tree, axis: int) -> list:
    """The two zig-zag chunks of every array in `tree`, split along `axis`."""
    first, second = zip(*(jnp.split(x, 2, axis=axis) for x in jax.tree.leaves(tree)))
    treedef = jax.tree.structure(tree)
    return [jax.tree.unflatten(treedef, first), jax.tree.unflatten(treedef, second)]


def _visit_pairs(update, q_pos_halves, k_pos_halves, q_accs, kv_accs):
    """Runs `update(i, j, q_accs[i], kv_accs[j])` on each (query half i, K/V half j) pair the mask
    does not entirely hide; returns the accumulators and how many pairs it computed."""
    q_accs, kv_accs, work = list(q_accs), list(kv_accs), jnp.int32(0)
    for i in range(2):
        for j in range(2):
            hidden = _fully_masked(q_pos_halves[i], k_pos_halves[j])
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


def _ring_forward(ring, q_BKGTH, k_BSKH, v_BSKH, positions_BT):
    """Returns out (q's dtype), the log-sum-exp of each query's logits, and the pairs computed."""
    queries = list(zip(_halves(q_BKGTH, 3), _halves(positions_BT, 1)))

    def visit(states, block, no_kv_accs):
        kv_halves = _halves(block, 1)

        def update(i, j, state, _):
            return _fold_block(ring, state, *queries[i], *kv_halves[j]), ()

        return _visit_pairs(update, [p for _, p in queries], [p for *_, p in kv_halves], states, no_kv_accs)

    states = [_empty_softmax(q) for q, _ in queries]
    states, _, work = _around_ring(ring, visit, states, (k_BSKH, v_BSKH, positions_BT), [(), ()])
    seen_BKGT = [s.denom_BKGT > 0 for s in states]  # a query that sees no key outputs 0
    out_BKGTH = jnp.concatenate(
        [s.out_BKGTH / jnp.where(seen, s.denom_BKGT, 1.0)[..., None] for s, seen in zip(states, seen_BKGT)], axis=3
    )
    lse_BKGT = jnp.concatenate(
        [
            jnp.where(seen, s.max_BKGT + jnp.log(jnp.where(seen, s.denom_BKGT, 1.0)), 0.0)
            for s, seen in zip(states, seen_BKGT)
        ],
        axis=3,
    )
    return out_BKGTH.astype(q_BKGTH.dtype), lse_BKGT, work


def _ring_backward(ring, residuals, dout_BKGTH):
    """dq stays home; dk and dv ride round the ring with their K/V block and arrive back at its owner."""
    q_BKGTH, k_BSKH, v_BSKH, positions_BT, out_BKGTH, lse_BKGT = residuals
    delta_BKGT = jnp.sum(dout_BKGTH.astype(jnp.float32) * out_BKGTH.astype(jnp.float32), axis=-1)
    queries = [
        _Query(*halves)
        for halves in zip(
            _halves(q_BKGTH, 3),
            _halves(positions_BT, 1),
            _halves(dout_BKGTH, 3),
            _halves(lse_BKGT, 3),
            _halves(delta_BKGT, 3),
        )
    ]

    def visit(dq_halves, block, kv_grads):
        kv_halves = _halves(block, 1)

        def update(i, j, dq_BKGTH, kv_grad):
            dq_BKGTH, dk_BSKH, dv_BSKH = _block_grads(ring, queries[i], dq_BKGTH, *kv_halves[j], *kv_grad)
            return dq_BKGTH, (dk_BSKH, dv_BSKH)

        q_pos_halves = [q.q_pos_BT for q in queries]
        dq_halves, kv_grad_halves, _ = _visit_pairs(
            update, q_pos_halves, [p for *_, p in kv_halves], dq_halves, _halves(kv_grads, 1)
        )
        return dq_halves, jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=1), *kv_grad_halves), jnp.int32(0)

    dq_halves = [jnp.zeros(q.q_BKGTH.shape, jnp.float32) for q in queries]
    kv_grads = (jnp.zeros(k_BSKH.shape, jnp.float32), jnp.zeros(v_BSKH.shape, jnp.float32))
    dq_halves, (dk_BSKH, dv_BSKH), _ = _around_ring(ring, visit, dq_halves, (k_BSKH, v_BSKH, positions_BT), kv_grads)
    dq_BKGTH = jnp.concatenate(dq_halves, axis=3)
    return dq_BKGTH.astype(q_BKGTH.dtype), dk_BSKH.astype(k_BSKH.dtype), dv_BSKH.astype(v_BSKH.dtype), None


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring_core(ring, q_BKGTH, k_BSKH, v_BSKH, positions_BT):
    """Per-device causal attention over the ring (q already scaled); returns out and the pairs computed."""
    out_BKGTH, _, work = _ring_forward(ring, q_BKGTH, k_BSKH, v_BSKH, positions_BT)
    return out_BKGTH, work


def _ring_core_fwd(ring, q_BKGTH, k_BSKH, v_BSKH, positions_BT):
    out_BKGTH, lse_BKGT, work = _ring_forward(ring, q_BKGTH, k_BSKH, v_BSKH, positions_BT)
    return (out_BKGTH, work), (q_BKGTH, k_BSKH, v_BSKH, positions_BT, out_BKGTH, lse_BKGT)


def _ring_core_bwd(ring, residuals, cotangents):
    dout_BKGTH, _ = cotangents  # the work count has no gradient
    return _ring_backward(ring, residuals, dout_BKGTH)


_ring_core.defvjp(_ring_core_fwd, _ring_core_bwd)


def _ring_shard(q_BTNH, k_BTKH, v_BTKH, positions_BT, *, ring, other_axes):
    """One device's share: queries viewed [B, K, G, T, H] so K/V heads are never repeated."""
    B, T, N, H = q_BTNH.shape
    K = k_BTKH.shape[2]
    q_BKGTH = (q_BTNH * H**-0.5).reshape(B, T, K, N // K, H).transpose(0, 2, 3, 1, 4)
    out_BKGTH, work = _ring_core(ring, q_BKGTH, k_BTKH, v_BTKH, positions_BT)
    out_BTNH = out_BKGTH.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)
    if other_axes:  # devices of one sequence shard may differ only by their batch rows: report the busiest
        work = jax.lax.pmax(jax.lax.stop_gradient(work), other_axes)
    return out_BTNH, work[None]


# ----------------------------------------------------------------------------- entry point


def _present(mesh: Mesh, axes: tuple[str, ...]) -> tuple[str, ...]:
    """The axes that actually shard on `mesh`: absent and size-1 axes drop out."""
    return tuple(name for name in axes if name in mesh.axis_names and mesh.shape[name] > 1)


def _check_shapes(q_BTNH, k_BTKH, num_seq_shards, num_head_shards):
    T, N = q_BTNH.shape[1], q_BTNH.shape[2]
    K = k_BTKH.shape[2]
    if T % (2 * num_seq_shards):
        raise ValueError(f"ring attention needs seq_len ({T}) divisible by 2 * sequence shards ({2 * num_seq_shards})")
    if N % K:
        raise ValueError(f"query heads ({N}) must be a multiple of K/V heads ({K})")
    if K % num_head_shards:
        raise ValueError(f"K/V heads ({K}) must be divisible by the head shards ({num_head_shards})")


def ring_attention(
    q_BTNH: jax.Array,
    k_BTKH: jax.Array,
    v_BTKH: jax.Array,
    positions_BT: jax.Array,
    *,
    mesh: Mesh,
    axis: str = "sequence",
    batch_axes: tuple[str, ...] = ("data", "fsdp", "expert"),
    head_axes: tuple[str, ...] = ("tensor",),
    bias_fn: BiasFn | None = None,
    return_work: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Causal softmax(q k^T / sqrt(H) + bias, masked) v with the sequence sharded over `axis`.

    The mask is (k_pos <= q_pos) & (k_pos >= 0), taken from `positions_BT` (so any layout works;
    use `zigzag_order` for balanced work). Query head h reads K/V head h // (N / K). `bias_fn` maps
    (q_pos_BT, k_pos_BS) to a [B, N, T, S] bias over all N heads; it is called per block (forward
    and backward), each device keeps its own heads, and it gets no gradient (close over constants
    only). A query that sees no key at all gets a zero output.

    With `return_work`, also returns an int32 [num_sequence_shards] count of the (query half,
    K/V half) pairs each sequence shard computed rather than skipped in the forward ring (its
    busiest device's count; the backward ring skips the same pairs).
    """
    seq = _present(mesh, (axis,))
    batch = _present(mesh, tuple(batch_axes))
    heads = _present(mesh, tuple(head_axes))
    num_seq_shards = mesh.shape[axis] if seq else 1
    _check_shapes(q_BTNH, k_BTKH, num_seq_shards, int(np.prod([mesh.shape[a] for a in heads])))

    def spec(*dims):
        return P(*(d if d else None for d in dims))

    x_spec = spec(batch, seq, heads, None)
    ring = _Ring(seq[0] if seq else None, num_seq_shards, heads, bias_fn)
    # check_vma is off: the softmax state starts replicated and turns device-varying inside scan and
    # cond, and the call that would mark it varying up front (pvary, then pcast) moved between JAX versions.
    out_BTNH, work = jax.shard_map(
        partial(_ring_shard, ring=ring, other_axes=batch + heads),
        mesh=mesh,
        in_specs=(x_spec, x_spec, x_spec, spec(batch, seq)),
        out_specs=(x_spec, spec(seq)),
        check_vma=False,
    )(q_BTNH, k_BTKH, v_BTKH, positions_BT.astype(jnp.int32))
    return (out_BTNH, work) if return_work else out_BTNH
