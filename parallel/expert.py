"""Expert parallelism: an MoE layer's experts split over the `expert` mesh axis, assignments moved to the device
holding their expert and back by all-to-all inside `shard_map`.

Built by parallel/hooks.py into the model's hooks (`Hooks.experts`, model/runtime.py) when
`mesh.expert > 1`; the model itself never sees the mesh. Routing, capacity and the balancing terms stay outside,
global, so an expert-parallel run computes what one device computes.

Each device holds a slice of the tokens (the batch is split over the batch axes, `expert` among them) and
L = 1 / mesh.expert of the experts. It packs its kept assignments by destination device, each destination's
rows grouped by expert at the front of a chunk of `chunk` rows, and sends each destination its rows with the
local expert of each. The receiver runs the rows through its experts with the model's grouped matmul (`ffn`,
model/moe.py's `grouped_ffn`, sized for mesh.expert x chunk rows: not every local expert over every slot), and the
results go back the same way, where each token sums its experts' outputs with their gates.

The exchange is `ragged` where the backend has XLA's ragged all-to-all (GPU, TPU): only the rows used move.
Elsewhere (XLA:CPU has none) it is `padded`: an all-to-all of whole chunks. A chunk holds every assignment a
device can send one destination: all it holds under dropless dispatch, min(that, L x capacity) under capacity
dispatch.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

AXIS = "expert"


def _present(mesh: Mesh, axes: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(a for a in axes if a in mesh.axis_names and mesh.shape[a] > 1)


EXCHANGES = ("ragged", "padded")


def expert_parallel(mesh: Mesh, batch_axes: tuple[str, ...], exchange: str | None = None, ragged=None):
    """The collectives hook for `mesh`: `(x_TD, experts_TK, gates_TK, kept_TK, w_gate_EDF, w_up_EDF, w_down_EFD,
    capacity, ffn) -> y_TD`, tokens split over `batch_axes`, experts over `expert`. `exchange`: one of EXCHANGES
    (default: ragged where the backend has it); `ragged`: the ragged all-to-all to call (default
    jax.lax.ragged_all_to_all; tests pass an emulation where the backend has none)."""
    exchange = exchange or ("padded" if jax.default_backend() == "cpu" else "ragged")
    if exchange not in EXCHANGES:
        raise ValueError(f"exchange={exchange!r}: one of {EXCHANGES}")
    move = _ragged_mover(ragged or jax.lax.ragged_all_to_all) if exchange == "ragged" else _padded_mover
    return functools.partial(_dispatch, mesh=mesh, batch=_present(mesh, batch_axes), move=move)


def _dispatch(x_TD, experts_TK, gates_TK, kept_TK, w_gate_EDF, w_up_EDF, w_down_EFD, capacity, ffn, *, mesh, batch,
              move):  # fmt: skip
    shards = mesh.shape[AXIS]
    E = w_gate_EDF.shape[0]
    if E % shards:
        raise ValueError(f"model.moe.num_experts={E} does not divide over mesh.expert={shards}")
    tokens = P(batch or None, None)
    weights = P(AXIS, None, None)  # whole matrices of the local experts (GSPMD gathers FSDP's pieces)
    local_T = x_TD.shape[0] // math.prod(mesh.shape[a] for a in batch)
    local_A = local_T * experts_TK.shape[1]
    chunk = min(local_A, (E // shards) * capacity)
    return jax.shard_map(
        functools.partial(_local, chunk=chunk, shards=shards, ffn=ffn, move=move),
        mesh=mesh,
        in_specs=(tokens, tokens, tokens, tokens, weights, weights, weights),
        out_specs=tokens,
        check_vma=False,
    )(x_TD, experts_TK, gates_TK, kept_TK, w_gate_EDF, w_up_EDF, w_down_EFD)


def _local(x_TD, experts_TK, gates_TK, kept_TK, w_gate_LDF, w_up_LDF, w_down_LFD, *, chunk, shards, ffn, move):
    """One device: its tokens' assignments out to their experts' devices, the rows for its experts in, computed,
    and back."""
    T, D = x_TD.shape
    K = experts_TK.shape[1]
    L = w_gate_LDF.shape[0]  # local experts
    E = L * shards
    # Assignment a = (choice a // T, token a % T), as model/moe.py orders them; expert e lives on device e // L as
    # its local expert e % L. Sorting by expert sorts by (destination, local expert); dropped ones go last (E).
    expert_A = jnp.where(kept_TK.T.reshape(-1), experts_TK.T.reshape(-1), E)
    order_A = jnp.argsort(expert_A, stable=True)
    sent_S = jnp.bincount(expert_A // L, length=shards + 1)[:shards]  # rows for each destination
    starts_S = jnp.cumsum(sent_S) - sent_S
    sorted_A = expert_A[order_A]
    dest_sorted_A = jnp.minimum(sorted_A // L, shards)
    slot_sorted_A = jnp.where(
        sorted_A < E,
        dest_sorted_A * chunk + jnp.arange(T * K) - starts_S[jnp.minimum(dest_sorted_A, shards - 1)],
        shards * chunk,
    )
    slot_A = jnp.zeros(T * K, jnp.int32).at[order_A].set(slot_sorted_A.astype(jnp.int32))
    holder = jnp.full(shards * chunk + 1, T * K, jnp.int32).at[slot_A].set(jnp.arange(T * K, dtype=jnp.int32))[:-1]
    send_RD = jnp.concatenate([x_TD, jnp.zeros((1, D), x_TD.dtype)])[jnp.where(holder < T * K, holder % T, T)]
    local_R = jnp.concatenate([expert_A % L, jnp.full(1, L, expert_A.dtype)])[holder].astype(jnp.int32)  # L: none
    # Device s's rows land at [s * chunk, s * chunk + its count) of every receiver's buffer, and come back alike.
    recv_S = jax.lax.all_to_all(sent_S, AXIS, 0, 0, tiled=True)
    there = functools.partial(move, sizes=(sent_S, recv_S), chunk=chunk, shards=shards)
    back = functools.partial(move, sizes=(recv_S, sent_S), chunk=chunk, shards=shards)
    rows_RD, expert_R = there(send_RD, jnp.zeros_like(send_RD)), there(local_R, jnp.full_like(local_R, L))
    y_RD = back(ffn(rows_RD, expert_R, w_gate_LDF, w_up_LDF, w_down_LFD), jnp.zeros_like(send_RD))
    y_AD = jnp.concatenate([y_RD, jnp.zeros((1, D), y_RD.dtype)])[slot_A]
    gates_KT = (gates_TK * kept_TK).T.astype(y_AD.dtype)
    return jnp.einsum("ktd,kt->td", y_AD.reshape(K, T, D), gates_KT)


def _padded_mover(x_R, empty_R, *, sizes, chunk, shards):
    """Whole chunks: chunk s of every device's buffer goes to device s, landing as chunk (sender)."""
    del empty_R, sizes
    return jax.lax.all_to_all(x_R, AXIS, 0, 0, tiled=True)


def _ragged_mover(ragged_all_to_all):
    def move(x_R, empty_R, *, sizes, chunk, shards):
        """Only the rows used: chunk s's first sizes[0][s] rows go to device s, landing at (sender) x chunk."""
        send_S, recv_S = sizes
        starts_S = jnp.arange(shards, dtype=jnp.int32) * chunk
        lands_S = jnp.full(shards, jax.lax.axis_index(AXIS) * chunk, jnp.int32)
        return ragged_all_to_all(x_R, empty_R, starts_S, send_S.astype(jnp.int32), lands_S,
                                 recv_S.astype(jnp.int32), axis_name=AXIS)  # fmt: skip

    return move
