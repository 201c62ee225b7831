"""One quantized matmul on CPU: microseconds of x_MK @ W_KN for configs/bench_10m.py's weight shapes, float32 against
int8 (per channel) and int4 (groups of 32) multiplied by the C++ kernel (model/kernels/cpu_quant_matmul) and by
`model.weights.tiled_matmul`, at several row counts M (what sets the kernel's MAX_ROWS).

    python -m benchmarks.quant_matmul --rows 1,16,32,64

Each matmul is its own jitted call, so small ones include XLA's dispatch (a few microseconds); the weights stay in
cache between calls. The variants run interleaved, round after round; each figure is the median over --repeats rounds
of the mean over --calls calls. One JSON line at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from model import weights
from model.kernels import cpu_quant_matmul
from model.quant import schemes

SHAPES = [(384, 1152), (384, 384), (384, 2048), (1024, 384), (384, 8192)]  # qkv, out, gate+up, down, head
QUANT = {"int8": ("int8", 0), "int4 g32": ("int4", 32)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="1,16,32,64")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--calls", type=int, default=100)
    args = parser.parse_args()
    if (reason := cpu_quant_matmul.unavailable_reason()) is not None:
        raise SystemExit(f"the kernel is unavailable here: {reason}")
    rng = np.random.default_rng(0)
    fns = {
        "float32": jax.jit(lambda x, w: x @ w),
        "kernel": jax.jit(cpu_quant_matmul.quant_matmul, static_argnums=2),
        "tiled": jax.jit(weights.tiled_matmul, static_argnums=2),
    }
    result = {"jax_version": jax.__version__, "microseconds": {}}
    print(
        f"{'M':>3s} {'K x N':>11s} {'float32':>8s} "
        + " ".join(f"{q + ' ' + p:>16s}" for q in QUANT for p in fns if p != "float32")
    )
    for M in map(int, args.rows.split(",")):
        for K, N in SHAPES:
            w = jnp.asarray(rng.standard_normal((K, N)), jnp.float32)
            x = jnp.asarray(rng.standard_normal((M, K)), jnp.float32)
            calls = {"float32": lambda: fns["float32"](x, w)}
            for name, (scheme, group) in QUANT.items():
                stored = schemes.quantize(w, scheme, group)
                for path in ("kernel", "tiled"):
                    calls[f"{name} {path}"] = lambda f=fns[path], s=stored, q=scheme: f(x, s, q)
            times = {name: [] for name in calls}
            for call in calls.values():
                call().block_until_ready()  # compiles
            for _ in range(args.repeats):
                for name, call in calls.items():
                    start = time.perf_counter()
                    for _ in range(args.calls):
                        y = call()
                    y.block_until_ready()
                    times[name].append((time.perf_counter() - start) / args.calls * 1e6)
            medians = {name: statistics.median(t) for name, t in times.items()}
            print(
                f"{M:3d} {f'{K} x {N}':>11s} "
                + " ".join(f"{t:8.1f}" if n == "float32" else f"{t:16.1f}" for n, t in medians.items())
            )
            result["microseconds"][f"{M}x{K}x{N}"] = medians
    print(json.dumps(result))


if __name__ == "__main__":
    main()
