"""x @ dequantize(W) from int8 and int4 codes on XLA:CPU as a C++ kernel (cpu_quant_matmul.cc), through XLA's FFI.

Decoding multiplies a few rows (the batch) by every weight, so its speed is the speed of reading the weights.
XLA:CPU does not fuse a dequantization into its dot: `model.weights.tiled_matmul`, the reference, converts each tile
of codes to float32 in memory first. The kernel converts codes in registers and accumulates in float32, reading each
code byte once; it takes the `int8` and `int4` schemes (model/quant/schemes.py) with any group size, codes and
float16 scales as stored, and up to `MAX_ROWS` rows (beyond, XLA's blocked matmul of dequantized tiles is faster).

The source is compiled on first use for this CPU and cached (model/kernels/cpu_build.py). Where no compiler is
found, `available()` is False and quantized weights are multiplied by `tiled_matmul`.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import pathlib

import jax
import jax.numpy as jnp

from model.kernels import cpu_build
from model.kernels.cpu_build import KernelUnavailable

SOURCE = pathlib.Path(__file__).with_name("cpu_quant_matmul.cc")
TARGETS = {"int8": "jax_lm_cpu_quant_matmul_int8", "int4": "jax_lm_cpu_quant_matmul_int4"}  # scheme -> FFI target
SYMBOLS = {"int8": "JaxLmCpuQuantMatmulInt8", "int4": "JaxLmCpuQuantMatmulInt4"}
MAX_ROWS = 16  # rows up to which the kernel is used (BENCHMARKS.md, "Quantization (issue #31)")


def _library() -> ctypes.CDLL:
    """The kernel's shared library, built and its FFI targets registered on first use."""
    return cpu_build.library(SOURCE, tuple((TARGETS[s], SYMBOLS[s]) for s in TARGETS))


@functools.cache
def unavailable_reason() -> str | None:
    """None when the kernel builds and loads here, else why not (logged once)."""
    try:
        fn = _library().JaxLmCpuQuantMatmulVectorWidth
        fn.restype = ctypes.c_int
        fn()
    except (KernelUnavailable, OSError, AttributeError) as e:
        logging.warning("C++ CPU quantized matmul unavailable, using tiled_matmul: %s", e)
        return str(e)
    return None


def available() -> bool:
    return unavailable_reason() is None


def blocker(rows: int, stored: dict, scheme: str) -> str | None:
    """Why the kernel does not multiply `rows` rows by this stored weight (`schemes.quantize`'s arrays of one
    matrix), or None when it does."""
    if scheme not in TARGETS:
        return f"scheme {scheme} (the kernel reads int8 and int4)"
    if rows > MAX_ROWS:
        return f"{rows} rows (the kernel is for at most {MAX_ROWS})"
    if stored["q"].ndim != 2 or stored["scale"].dtype != jnp.float16:
        return "not one matrix of codes with float16 scales"
    if jax.default_backend() != "cpu" or jax.device_count() != 1:
        return f"{jax.device_count()} {jax.default_backend()} devices (the kernel runs on one CPU)"
    return unavailable_reason()


def quant_matmul(x_MK: jax.Array, stored: dict, scheme: str) -> jax.Array:
    """float32 x_MK @ dequantize(stored) [M, N] for an `int8` or `int4` matrix (see `blocker`): float32 products
    summed in float32 group by group, so equal to the reference within float rounding."""
    _library()  # registers the FFI targets
    M, N = x_MK.shape[0], stored["q"].shape[1]
    call = jax.ffi.ffi_call(TARGETS[scheme], jax.ShapeDtypeStruct((M, N), jnp.float32), vmap_method="sequential")
    return call(x_MK.astype(jnp.float32), stored["q"], stored["scale"])
