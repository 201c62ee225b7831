"""Causal attention on XLA:CPU as a C++ kernel (cpu_attention.cc), called through XLA's FFI.

XLA:CPU runs attention's batched small matmuls one at a time at about a third of its matmul speed
(BENCHMARKS.md); the kernel spreads (batch row, K/V head) items over XLA's thread pool and keeps the
softmax in cache. The forward saves only the output and each row's log-sum-exp, the backward recomputes
the probabilities (FlashAttention's scheme).

The source is compiled on first use for this CPU and cached (model/kernels/cpu_build.py). Where no compiler is
found, `available()` is False and the model uses XLA's attention.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from model.kernels import cpu_build
from model.kernels.cpu_build import KernelUnavailable

SOURCE = pathlib.Path(__file__).with_name("cpu_attention.cc")
FORWARD, BACKWARD = "jax_lm_cpu_attention_fwd", "jax_lm_cpu_attention_bwd"
PAGED = "jax_lm_cpu_paged_decode"
REMAT_NAME = "cpu_attention"  # the forward's outputs, which remat policies should save (not rerun the kernel)


def _library() -> ctypes.CDLL:
    """The kernel's shared library, built and its FFI targets registered on first use."""
    targets = (
        (FORWARD, "JaxLmCpuAttentionForward"),
        (BACKWARD, "JaxLmCpuAttentionBackward"),
        (PAGED, "JaxLmCpuPagedDecode"),
    )
    return cpu_build.library(SOURCE, targets)


@functools.cache
def vector_width() -> int:
    """Floats per SIMD register the kernel was built for; head_dim must be a multiple of it."""
    fn = _library().JaxLmCpuAttentionVectorWidth
    fn.restype = ctypes.c_int
    return fn()


@functools.cache
def unavailable_reason() -> str | None:
    """None when the kernel builds and loads here, else why not (logged once)."""
    try:
        vector_width()
    except (KernelUnavailable, OSError, AttributeError) as e:
        logging.warning("C++ CPU attention kernel unavailable, using XLA's attention: %s", e)
        return str(e)
    return None


def available() -> bool:
    return unavailable_reason() is None


def supports(head_dim: int, dtype: str) -> str | None:
    """None when the kernel can run this attention, else why not (the dtype first: it needs no build, seconds)."""
    if dtype != "float32":
        return f"compute dtype {dtype} (the kernel is float32)"
    if (reason := unavailable_reason()) is not None:
        return reason
    if head_dim % vector_width():
        return f"head_dim {head_dim} is not a multiple of this CPU's vector width {vector_width()}"
    return None


def _forward(q_BTNH, k_BTKH, v_BTKH, slopes_N):
    _library()  # registers the FFI targets
    B, T, N, H = q_BTNH.shape
    shapes = (jax.ShapeDtypeStruct((B, T, N, H), jnp.float32), jax.ShapeDtypeStruct((B, N, T), jnp.float32))
    call = jax.ffi.ffi_call(FORWARD, shapes, vmap_method="sequential")
    return call(q_BTNH, k_BTKH, v_BTKH, slopes_N, scale=np.float32(H**-0.5))


@jax.custom_vjp
def causal_attention(q_BTNH: jax.Array, k_BTKH: jax.Array, v_BTKH: jax.Array, slopes_N: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(H) - slope_n (i - j)) v over keys j <= i (positions 0..T-1 in every row), float32.

    Query head n reads K/V head n // (N / K); `slopes_N` are ALiBi's slopes, zeros for no bias (no gradient)."""
    return _forward(q_BTNH, k_BTKH, v_BTKH, slopes_N)[0]


def _fwd(q_BTNH, k_BTKH, v_BTKH, slopes_N):
    out_BTNH, lse_BNT = _forward(q_BTNH, k_BTKH, v_BTKH, slopes_N)
    out_BTNH, lse_BNT = checkpoint_name(out_BTNH, REMAT_NAME), checkpoint_name(lse_BNT, REMAT_NAME)
    return out_BTNH, (q_BTNH, k_BTKH, v_BTKH, slopes_N, lse_BNT)


def _bwd(residuals, dout_BTNH):
    q_BTNH, k_BTKH, v_BTKH, slopes_N, lse_BNT = residuals
    H = q_BTNH.shape[-1]
    shapes = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q_BTNH, k_BTKH, v_BTKH))
    call = jax.ffi.ffi_call(BACKWARD, shapes, vmap_method="sequential")
    dq, dk, dv = call(q_BTNH, k_BTKH, v_BTKH, slopes_N, lse_BNT, dout_BTNH, scale=np.float32(H**-0.5))
    return dq, dk, dv, jnp.zeros_like(slopes_N)


causal_attention.defvjp(_fwd, _bwd)


def paged_decode(
    q_BTNH: jax.Array,
    k_PKsH: jax.Array,
    v_PKsH: jax.Array,
    table_BM: jax.Array,
    q_positions_BT: jax.Array,
    k_positions_BS: jax.Array,
    *,
    scale: float,
    softcap: float = 0.0,
    window: int = 0,
    slopes_N: jax.Array | None = None,
) -> jax.Array:
    """Decoding attention over a paged cache read through the page tables (model/cache.py's `Paged`), float32:
    query t of row b reads slot s (page table[b, s // page_size], offset s % page_size) where 0 <= k_positions[b, s]
    <= q_positions[b, t] (and within `window`), logits scale * q.k, soft-capped, minus slope_n * distance (ALiBi).
    XLA:CPU would gather each row's pages into a dense [B, K, S, H] copy and transpose it for the matmul: several
    times the bytes of the keys and values, which is what a decode step is bound by. Queries that read nothing
    (padding) get zeros. Any head_dim (vectors, then a scalar tail)."""
    _library()  # registers the FFI targets
    B, T, N, _ = q_BTNH.shape
    slopes_N = jnp.zeros((N,), jnp.float32) if slopes_N is None else jnp.asarray(slopes_N, jnp.float32)
    shape = jax.ShapeDtypeStruct((B, T, N, v_PKsH.shape[-1]), jnp.float32)
    call = jax.ffi.ffi_call(PAGED, shape, vmap_method="sequential")
    ints = [jnp.asarray(x, jnp.int32) for x in (table_BM, q_positions_BT, k_positions_BS)]
    return call(
        q_BTNH,
        k_PKsH,
        v_PKsH,
        *ints,
        slopes_N,
        scale=np.float32(scale),
        softcap=np.float32(softcap),
        window=np.int32(window),
    )
