"""One layer's causal attention on CPU, forward and forward+backward: the C++ kernel against XLA's attention.

    python benchmarks/attention_cpu.py [--rounds 20]

Shapes of configs/bench_10m.py (batch 8, 6 heads of 64) and configs/tiny.py (batch 16, 6 heads of 32), seq 256,
float32. XLA's side is what the model runs without the kernel (`reference_attention`, 4 causal blocks). The two
take turns call by call, so the machine's drift hits both; prints medians in ms and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from model import ModelConfig
from model.attention import reference_attention
from model.kernels import cpu_attention
from model.mask import Mask

SHAPES = {"bench_10m": (8, 256, 6, 64), "tiny": (16, 256, 6, 32)}  # B, T, N (= K), H


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    if (reason := cpu_attention.unavailable_reason()) is not None:
        raise SystemExit(f"the C++ kernel is unavailable here: {reason}")
    rng = np.random.default_rng(0)
    print("| shapes | pass | kernel (ms) | XLA (ms) | kernel speed-up |\n| --- | --- | --- | --- | --- |")
    for name, (B, T, N, H) in SHAPES.items():
        q, k, v, w = (jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32) for _ in range(4))
        positions, slopes = jnp.broadcast_to(jnp.arange(T), (B, T)), jnp.zeros(N, jnp.float32)
        kernel = lambda q, k, v: cpu_attention.causal_attention(q, k, v, slopes)
        mask = Mask.self_attention(positions, in_order=True)
        xla = lambda q, k, v: reference_attention(ModelConfig(causal_blocks=4), q, k, v, mask)
        grads = lambda f: jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) * w), argnums=(0, 1, 2))
        fns = {
            ("forward", "kernel"): jax.jit(kernel),
            ("forward", "xla"): jax.jit(xla),
            ("forward+backward", "kernel"): jax.jit(grads(kernel)),
            ("forward+backward", "xla"): jax.jit(grads(xla)),
        }
        times = {key: [] for key in fns}
        for i in range(args.rounds + 2):
            for key, f in fns.items():
                start = time.perf_counter()
                jax.block_until_ready(f(q, k, v))
                if i >= 2:
                    times[key].append(time.perf_counter() - start)
        for part in ("forward", "forward+backward"):
            ours, theirs = (statistics.median(times[(part, impl)]) * 1e3 for impl in ("kernel", "xla"))
            print(f"| {name} | {part} | {ours:.1f} | {theirs:.1f} | {theirs / ours:.2f}x |")


if __name__ == "__main__":
    main()
