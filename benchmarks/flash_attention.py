"""Pallas attention kernels against jax.nn.dot_product_attention (XLA and cuDNN): forward and forward+backward
TFLOP/s of causal training attention, and decode tokens/s over a K/V cache against the XLA path.

    python benchmarks/flash_attention.py                 # on a GPU: the issue's shapes (bf16, causal)
    python benchmarks/flash_attention.py --smoke         # anywhere: one tiny shape, kernels interpreted on CPU

Training shapes: T in {1k, 4k, 16k}, D in {64, 128}, 16 heads (GQA 4: 4 K/V heads), batch x T = --tokens (default
64k, which fills an H100/H200 with work). FLOPs are FlashAttention's count: 4 B N T^2 D / 2 forward (causal), 2.5x
that backward (the recompute not counted). Decode: batch 8, 32 query heads on 8 K/V heads of 128, cache lengths
1k-32k, one new token per row; tokens/s and the HBM bandwidth the cache reads reach (K and V bytes / step time).
Each figure is the median of --repeats calls of a compiled function (compilation excluded); a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from model import ModelConfig
from model.attention import reference_decode
from model.kernels.decode_attention import decode_attention
from model.kernels.flash_attention import flash_attention
from model.mask import Mask


def median_seconds(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compiles
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def training_fns(B: int, T: int, smoke: bool) -> dict:
    """name -> causal attention(q, k, v) over B rows of T tokens in order."""
    mask = Mask.self_attention(jnp.broadcast_to(jnp.arange(T), (B, T)), in_order=True)
    blocks = dict(block_q=16, block_k=16) if smoke else {}
    fns = {"pallas": lambda q, k, v: flash_attention(q, k, v, mask, **blocks)}
    for impl in ("xla",) if smoke else ("xla", "cudnn"):
        fns[impl] = lambda q, k, v, impl=impl: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation=impl
        )
    return fns


def training_table(shapes, heads: int, kv_heads: int, dtype, repeats: int, smoke: bool) -> None:
    print("| T | D | batch | impl | forward TFLOP/s | fwd+bwd TFLOP/s | fwd ms | fwd+bwd ms |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    rng = np.random.default_rng(0)
    for T, D, B in shapes:
        q = jnp.asarray(rng.standard_normal((B, T, heads, D)), dtype)
        k, v = (jnp.asarray(rng.standard_normal((B, T, kv_heads, D)), dtype) for _ in range(2))
        fwd_flops = 4 * B * heads * T * T * D / 2
        for name, f in training_fns(B, T, smoke).items():
            fwd = jax.jit(f)
            both = jax.jit(jax.grad(lambda q, k, v, f=f: jnp.sum(f(q, k, v).astype(jnp.float32)), (0, 1, 2)))
            try:
                t_fwd = median_seconds(fwd, q, k, v, repeats=repeats)
                t_both = median_seconds(both, q, k, v, repeats=repeats)
            except Exception as e:  # cuDNN refuses some shapes and versions: say which, keep measuring the rest
                print(f"| {T} | {D} | {B} | {name} | n/a: {str(e).splitlines()[0][:80]} | | | |")
                continue
            print(
                f"| {T} | {D} | {B} | {name} | {fwd_flops / t_fwd / 1e12:.3g} | {3.5 * fwd_flops / t_both / 1e12:.3g}"
                f" | {t_fwd * 1e3:.2f} | {t_both * 1e3:.2f} |"
            )


def decode_table(lengths, B: int, heads: int, kv_heads: int, H: int, dtype, repeats: int, smoke: bool) -> None:
    print("\n| cache length | batch | impl | tokens/s | cache read GB/s | speed-up over XLA |")
    print("| --- | --- | --- | --- | --- | --- |")
    rng = np.random.default_rng(0)
    blocks = dict(block_k=16, num_splits=2) if smoke else {}
    for S in lengths:
        q = jnp.asarray(rng.standard_normal((B, 1, heads, H)), dtype)
        k, v = (jnp.asarray(rng.standard_normal((B, kv_heads, S, H)), dtype) for _ in range(2))
        lengths_B = S - jnp.arange(B) * (S // (2 * B))  # ragged rows, the longest full
        kpos = jnp.where(jnp.arange(S)[None] < lengths_B[:, None], jnp.arange(S)[None], -1)
        mask = Mask((lengths_B - 1)[:, None], kpos)
        fns = {
            "pallas": jax.jit(lambda q, k, v: decode_attention(q, k, v, mask, **blocks)),
            "xla": jax.jit(lambda q, k, v: reference_decode(ModelConfig(), q, k, v, mask)),
        }
        seconds = {name: median_seconds(f, q, k, v, repeats=repeats) for name, f in fns.items()}
        cache_bytes = 2 * B * kv_heads * S * H * jnp.dtype(dtype).itemsize
        for name, t in seconds.items():
            print(f"| {S} | {B} | {name} | {B / t:,.0f} | {cache_bytes / t / 1e9:.0f} | {seconds['xla'] / t:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="one tiny shape, interpreted on CPU (checks it runs)")
    parser.add_argument("--tokens", type=int, default=65536, help="batch x T of each training shape")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    backend = jax.default_backend()
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind} ({backend})\n")
    if args.smoke:
        training_table([(64, 16, 2)], 4, 2, jnp.float32, 2, smoke=True)
        decode_table([64], 2, 4, 2, 16, jnp.float32, 2, smoke=True)
        return
    if backend != "gpu":
        raise SystemExit(f"backend is {backend}: the benchmark needs a GPU (--smoke runs a tiny interpreted check)")
    shapes = [(T, D, max(1, args.tokens // T)) for T in (1024, 4096, 16384) for D in (64, 128)]
    training_table(shapes, 16, 4, jnp.bfloat16, args.repeats, smoke=False)
    decode_table([1024, 4096, 16384, 32768], 8, 32, 8, 128, jnp.bfloat16, args.repeats, smoke=False)


if __name__ == "__main__":
    main()
