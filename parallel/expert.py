"""Expert parallelism: an MoE layer's experts split over the `expert` mesh axis, assignments moved to the device
holding their expert and back by all-to-all inside `shard_map`.

Installed by training/layout.py as model/moe.py's collectives hook (`moe.expert_collectives`) when
`mesh.expert > 1`; the model itself never sees the mesh. Routing, capacity and the balancing terms stay outside,
global, so an expert-parallel run computes what one device computes.

Each device holds a slice of the tokens (the batch is split over the batch axes, `expert` among them) and
1 / mesh.expert of the experts. It packs its kept assignments into a send buffer of `slots` rows per expert,
[experts, slots, D]; an all-to-all over `expert` gives every device the rows of its own experts from every device
on its expert axis; it runs its experts on them, and a second all-to-all sends the results back, where each
token sums its experts' outputs with their gates. The buffer is padded (XLA's all-to-all moves equal pieces): a
device may send at most `slots` assignments to one expert, which is every assignment it holds under dropless
dispatch and min(that, capacity) under capacity dispatch. (A ragged all-to-all would move only the rows used; not
implemented here.)
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

AXIS = "expert"


def _present(mesh: Mesh, axes: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(a for a in axes if a in mesh.axis_names and mesh.shape[a] > 1)


def expert_parallel(mesh: Mesh, batch_axes: tuple[str, ...]):
    """The collectives hook for `mesh`: `(x_TD, experts_TK, gates_TK, kept_TK, w_gate_EDF, w_up_EDF, w_down_EFD,
    capacity) -> y_TD`, tokens split over `batch_axes`, experts over `expert`."""
    return functools.partial(_dispatch, mesh=mesh, batch=_present(mesh, batch_axes))


def _dispatch(x_TD, experts_TK, gates_TK, kept_TK, w_gate_EDF, w_up_EDF, w_down_EFD, capacity, *, mesh, batch):
    shards = mesh.shape[AXIS]
    E = w_gate_EDF.shape[0]
    if E % shards:
        raise ValueError(f"model.moe.num_experts={E} does not divide over mesh.expert={shards}")
    tokens = P(batch or None, None)
    weights = P(AXIS, None, None)  # whole matrices of the local experts (GSPMD gathers FSDP's pieces)
    local_T = x_TD.shape[0] // math.prod(mesh.shape[a] for a in batch)
    slots = min(local_T * experts_TK.shape[1], capacity)
    return jax.shard_map(
        functools.partial(_local, slots=slots, shards=shards),
        mesh=mesh,
        in_specs=(tokens, tokens, tokens, tokens, weights, weights, weights),
        out_specs=tokens,
        check_vma=False,
    )(x_TD, experts_TK, gates_TK, kept_TK, w_gate_EDF, w_up_EDF, w_down_EFD)


def _local(x_TD, experts_TK, gates_TK, kept_TK, w_gate_LDF, w_up_LDF, w_down_LFD, *, slots, shards):
    """One device: its tokens' assignments to all experts out, its experts' rows in, computed, and back."""
    T, D = x_TD.shape
    K = experts_TK.shape[1]
    L = w_gate_LDF.shape[0]  # local experts
    E = L * shards
    expert_A = experts_TK.T.reshape(-1)  # assignment a = (choice a // T, token a % T), as model/moe.py orders them
    kept_A = kept_TK.T.reshape(-1)
    # Rank among this device's kept assignments to the same expert (dropped ones go to a sentinel expert E).
    grouped_A = jnp.where(kept_A, expert_A, E)
    order_A = jnp.argsort(grouped_A, stable=True)
    counts = jnp.bincount(grouped_A, length=E + 1)
    starts = jnp.cumsum(counts) - counts
    rank_A = jnp.zeros_like(grouped_A).at[order_A].set(jnp.arange(T * K) - starts[grouped_A[order_A]])
    slot_A = jnp.where(kept_A, expert_A * slots + rank_A, E * slots)
    source = jnp.full(E * slots + 1, T, jnp.int32).at[slot_A].set(jnp.arange(T * K, dtype=jnp.int32) % T)
    send_ESD = jnp.concatenate([x_TD, jnp.zeros((1, D), x_TD.dtype)])[source[:-1]].reshape(E, slots, D)
    # Expert e = destination * L + l: each destination gets its L experts' rows from every source, stacked by source.
    got = jax.lax.all_to_all(send_ESD, AXIS, 0, 0, tiled=True).reshape(shards, L, slots, D)
    rows_LRD = got.transpose(1, 0, 2, 3).reshape(L, shards * slots, D)
    h_LRF = nn.silu(jnp.einsum("lrd,ldf->lrf", rows_LRD, w_gate_LDF)) * jnp.einsum("lrd,ldf->lrf", rows_LRD, w_up_LDF)
    y_LRD = jnp.einsum("lrf,lfd->lrd", h_LRF, w_down_LFD)
    back = y_LRD.reshape(L, shards, slots, D).transpose(1, 0, 2, 3).reshape(shards * L, slots, D)
    y_ESD = jax.lax.all_to_all(back, AXIS, 0, 0, tiled=True).reshape(E * slots, D)
    y_AD = jnp.concatenate([y_ESD, jnp.zeros((1, D), y_ESD.dtype)])[slot_A]
    gates_KT = (gates_TK * kept_TK).T.astype(y_AD.dtype)
    return jnp.einsum("ktd,kt->td", y_AD.reshape(K, T, D), gates_KT)
