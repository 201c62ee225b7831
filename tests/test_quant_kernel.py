"""The C++ CPU kernel for quantized matmuls (model/kernels/cpu_quant_matmul) against NumPy's x @ dequantize(W)
read from the stored codes here, the model's choice between it and `tiled_matmul`, greedy decoding through it, and
the fallback where no compiler builds it."""

from __future__ import annotations

import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import ModelConfig, Transformer, init_variables, weights
from model.kernels import cpu_quant_matmul
from model.quant import params as qp
from model.quant import schemes
from model.quant.schemes import Spec
from sampling import Rules, generate_batch
from tests.conftest import REPO

needs_kernel = pytest.mark.skipif(not cpu_quant_matmul.available(), reason="the C++ kernel does not build here")
RNG = np.random.default_rng(0)

# (M, K, N): one and a few rows (fewer than, as many as and more than a register tile holds); K not a multiple of
# 256, split in 3 or 5 groups of 32; N with whole blocks of 4 vectors, fewer vectors, and columns after the last
# whole vector (the scalar tail), down to N smaller than one vector.
SHAPES = [(1, 96, 37), (5, 160, 40), (16, 64, 200), (5, 64, 7), (1, 384, 67)]


def numpy_dequantize(stored: dict, scheme: str) -> np.ndarray:
    """float64 [K, N] from the stored arrays: int4 byte row i holds input channels 2i (low nibble) and 2i + 1
    (high nibble) as two's complement nibbles; float16 scales, one row per group of K / rows input channels."""
    q = np.asarray(stored["q"])
    if scheme == "int4":
        nibbles = np.stack([q & 0xF, q >> 4], axis=1).reshape(2 * q.shape[0], q.shape[1]).astype(np.int64)
        codes = np.where(nibbles > 7, nibbles - 16, nibbles)
    else:
        codes = q.astype(np.int64)
    scales = np.asarray(stored["scale"]).astype(np.float64)
    return codes * np.repeat(scales, codes.shape[0] // scales.shape[0], axis=0)


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("scheme,group", [("int8", 0), ("int8", 32), ("int4", 0), ("int4", 32)])
def test_kernel_matches_numpy_matmul_by_the_dequantized_weight(scheme, group, shape):
    M, K, N = shape
    w = RNG.standard_normal((K, N)).astype(np.float32)
    x = RNG.standard_normal((M, K)).astype(np.float32)
    stored = schemes.quantize(jnp.asarray(w), scheme, group)
    assert stored["scale"].dtype == jnp.float16 and stored["scale"].shape == (K // (group or K), N)
    want = x.astype(np.float64) @ numpy_dequantize(stored, scheme)
    got = np.asarray(jax.jit(cpu_quant_matmul.quant_matmul, static_argnums=2)(jnp.asarray(x), stored, scheme))
    assert got.dtype == np.float32 and got.shape == (M, N)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def kernel_calls(f, *args) -> int:
    text = jax.jit(f).lower(*args).as_text()
    return sum(text.count(target) for target in cpu_quant_matmul.TARGETS.values())


@needs_kernel
def test_the_model_multiplies_by_the_kernel_for_a_few_rows_of_int8_and_int4_only():
    """`codes_matmul` takes the kernel for up to MAX_ROWS rows of int8/int4 codes, `tiled_matmul` otherwise
    (more rows, other schemes), with the same products within float rounding."""
    K, N = 128, 48
    w = jnp.asarray(RNG.standard_normal((K, N)).astype(np.float32))
    for scheme, group in [("int8", 0), ("int4", 32), ("int4-zp", 32), ("nf4", 64)]:
        stored = schemes.quantize(w, scheme, group)
        for rows in (1, cpu_quant_matmul.MAX_ROWS, cpu_quant_matmul.MAX_ROWS + 1):
            x = jnp.asarray(RNG.standard_normal((rows, K)).astype(np.float32))
            f = lambda x, s, scheme=scheme: weights.codes_matmul(x, s, scheme)  # noqa: E731
            uses_kernel = scheme in ("int8", "int4") and rows <= cpu_quant_matmul.MAX_ROWS
            assert kernel_calls(f, x, stored) == uses_kernel, (scheme, rows)
            want = jax.jit(weights.tiled_matmul, static_argnums=2)(x, stored, scheme)
            np.testing.assert_allclose(np.asarray(jax.jit(f)(x, stored)), np.asarray(want), rtol=1e-5, atol=1e-5)


# Random weights with a large init (greedy continuations differ from row to row and step to step); vocab 257:
# the tied head's N leaves a scalar tail; d_ff 96: the down projection has 3 groups of 32.
DECODER = ModelConfig(
    vocab_size=257, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=96, max_seq_len=64, init_std=0.3
)


@needs_kernel
@pytest.mark.parametrize("scheme,group", [("int8", 0), ("int4", 32)])
def test_greedy_decoding_through_the_kernel_gives_the_tiled_matmuls_tokens(scheme, group, monkeypatch):
    model = Transformer(DECODER)
    variables = nn.unbox(jax.jit(lambda: init_variables(model, jax.random.key(3)))())
    params = qp.quantize_params(DECODER, variables, Spec(scheme, group))["params"]
    prompts = [[5, 9, 11], [200, 3, 3, 17, 64], [1]]

    def decode():
        jax.clear_caches()  # the two paths trace differently from the same arguments
        out = generate_batch(model, params, prompts, 12, Rules(temperature=0), max_len=32)
        tokens = jnp.zeros((1, 4), jnp.int32)
        return out.tokens, kernel_calls(lambda p: model.apply({"params": p}, tokens), params)

    kernel_tokens, calls = decode()
    monkeypatch.setattr(cpu_quant_matmul, "unavailable_reason", lambda: "switched off")
    tiled_tokens, no_calls = decode()
    jax.clear_caches()
    assert calls > 0 and no_calls == 0
    assert kernel_tokens == tiled_tokens
    assert len({t for row in kernel_tokens for t in row}) > 6  # not one token repeated


def test_without_a_compiler_quantized_matmuls_fall_back_to_the_tiled_matmul(tmp_path):
    script = """
import jax, jax.numpy as jnp, numpy as np
from model import weights
from model.kernels import cpu_quant_matmul
from model.quant import schemes
assert not cpu_quant_matmul.available() and "compiling" in cpu_quant_matmul.unavailable_reason()
stored = schemes.quantize(jnp.asarray(np.random.default_rng(0).standard_normal((64, 24)), jnp.float32), "int8", 0)
x = jnp.ones((1, 64), jnp.float32)
f = jax.jit(weights.codes_matmul, static_argnums=2)
assert "cpu_quant_matmul" not in f.lower(x, stored, "int8").as_text()
np.testing.assert_array_equal(f(x, stored, "int8"), jax.jit(weights.tiled_matmul, static_argnums=2)(x, stored, "int8"))
print("ok")
"""
    env = {**os.environ, "CXX": "false", "XDG_CACHE_HOME": str(tmp_path), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
