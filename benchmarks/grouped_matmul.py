"""The MoE grouped matmul on CPU: model/moe.py's tiled loop against one plain dot of the same useful FLOPs and
against `jax.lax.ragged_dot` (which XLA:CPU lowers densely, over every group), forward and forward+backward.

    python benchmarks/grouped_matmul.py [--rounds 10] [--groups 8 --rows 8192 --k 256 --n 512]

Rows are split over the groups at random (as a router would), sorted by group; the tiled version pads each
group to whole tiles (model.moe.dropless_rows). The three take turns call by call, so the machine's drift hits
all; prints medians as useful GFLOP/s (2 x rows x k x n per matmul, 3x that forward+backward) and the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from model import moe as moe_lib


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--k", type=int, default=256)
    parser.add_argument("--n", type=int, default=512)
    a = parser.parse_args()
    E, M, K, N = a.groups, a.rows, a.k, a.n
    rng = np.random.default_rng(0)
    experts_A = jnp.asarray(np.sort(rng.integers(0, E, M)), jnp.int32)
    rows = moe_lib.dropless_rows(moe_lib.MoEConfig(num_experts=E), experts_A, "cpu")
    counts = np.bincount(np.asarray(experts_A), minlength=E)
    x_MK = jnp.asarray(rng.normal(size=(M, K)), jnp.float32)
    w_EKN = jnp.asarray(rng.normal(size=(E, K, N)), jnp.float32)
    w_KN = w_EKN[0]
    dy_MN = jnp.asarray(rng.normal(size=(M, N)), jnp.float32)

    def tiled(x, w):  # the grouped rows as the MoE layer builds them: a gather into padded tiles and back
        source_R = jnp.full(rows.num_rows + 1, M, jnp.int32).at[rows.row_A].set(jnp.arange(M, dtype=jnp.int32))
        x_RK = jnp.concatenate([x, jnp.zeros((1, K), x.dtype)])[source_R[:-1]]
        return rows.matmul(x_RK, w)[rows.row_A]

    def ragged(x, w):
        return jax.lax.ragged_dot(x, w, jnp.asarray(counts, jnp.int32))

    def dot(x, w):
        return x @ w

    def fwd_bwd(f):
        return lambda x, w, dy: jax.vjp(f, x, w)[1](dy)

    def fwd(f):
        return lambda x, w, dy: f(x, w)

    cases = {"plain dot": (dot, w_KN), "tiled (ours)": (tiled, w_EKN), "ragged_dot": (ragged, w_EKN)}
    for mode in ("forward", "forward+backward"):
        fns = {
            name: jax.jit((fwd if mode == "forward" else fwd_bwd)(f)).lower(x_MK, w, dy_MN).compile()
            for name, (f, w) in cases.items()
        }
        times = {name: [] for name in fns}
        for _ in range(a.rounds):
            for name, fn in fns.items():
                w = cases[name][1]
                start = time.perf_counter()
                jax.block_until_ready(fn(x_MK, w, dy_MN))
                times[name].append(time.perf_counter() - start)
        flops = 2 * M * K * N * (1 if mode == "forward" else 3)
        base = statistics.median(times["plain dot"])
        print(f"{mode} ({E} groups, {M} x {K} x {N}, {rows.num_rows} padded rows):")
        for name, t in times.items():
            med = statistics.median(t)
            print(f"  {name:14s} {flops / med / 1e9:7.1f} useful GFLOP/s  {base / med:5.2f}x the plain dot")


if __name__ == "__main__":
    main()
