"""The C++ CPU attention kernel (model/kernels) against NumPy and plain-JAX attention, in and out of the model."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import ModelConfig, Transformer
from model.attention import IMPLEMENTATIONS, choose, cpu_kernel_blocker
from model.kernels import cpu_attention
from model.positions import alibi_slopes
from tests.conftest import REPO

needs_kernel = pytest.mark.skipif(not cpu_attention.available(), reason="the C++ kernel does not build here")

# (B, T, N, K, H): MHA, GQA, MQA; T below, at and above the kernel's 2W-key tiles and its 32-row chunks.
SHAPES = [(2, 37, 4, 2, 16), (1, 100, 3, 1, 32), (2, 64, 2, 2, 64), (1, 5, 2, 2, 16), (1, 130, 4, 4, 32)]


def numpy_attention(q, k, v, slopes):
    """softmax(q k^T / sqrt(H) - slope (i - j)) v over j <= i, in float64; query head n reads K/V head n // G."""
    B, T, N, H = q.shape
    G = N // k.shape[2]
    kk, vv = np.repeat(k, G, axis=2).astype(np.float64), np.repeat(v, G, axis=2).astype(np.float64)
    i, j = np.arange(T)[:, None], np.arange(T)[None]
    s = np.einsum("btnh,bsnh->bnts", q.astype(np.float64), kk) / np.sqrt(H) - slopes[None, :, None, None] * (i - j)
    s = np.where(j <= i, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bnts,bsnh->btnh", p / p.sum(-1, keepdims=True), vv)


def jax_attention(q, k, v, slopes):
    """The same in plain JAX (float32), for autodiff's gradients."""
    B, T, N, H = q.shape
    G = N // k.shape[2]
    kk, vv = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)
    i, j = jnp.arange(T)[:, None], jnp.arange(T)[None]
    s = jnp.einsum("btnh,bsnh->bnts", q, kk) / np.sqrt(H) - slopes[None, :, None, None] * (i - j)
    return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(jnp.where(j <= i, s, -1e30), -1), vv)


def random_qkv(shape, seed=0):
    B, T, N, K, H = shape
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) for s in ((B, T, N, H), (B, T, K, H), (B, T, K, H))]


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("alibi", [False, True])
def test_kernel_matches_numpy_attention(shape, alibi):
    q, k, v = random_qkv(shape)
    N = shape[2]
    slopes = alibi_slopes(N) if alibi else np.zeros(N, np.float32)
    out = jax.jit(cpu_attention.causal_attention)(q, k, v, slopes)
    np.testing.assert_allclose(np.asarray(out), numpy_attention(q, k, v, slopes), atol=2e-6, rtol=1e-5)


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("alibi", [False, True])
def test_kernel_gradients_match_autodiff_of_plain_attention(shape, alibi):
    q, k, v = random_qkv(shape)
    N = shape[2]
    slopes = jnp.asarray(alibi_slopes(N) if alibi else np.zeros(N, np.float32))
    w = np.random.default_rng(1).standard_normal(q.shape).astype(np.float32)
    grad = lambda f: jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v, slopes) * w), argnums=(0, 1, 2)))(q, k, v)
    for got, want in zip(grad(cpu_attention.causal_attention), grad(jax_attention)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-4)


CFG = ModelConfig(vocab_size=64, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=128, max_seq_len=40)


@needs_kernel
@pytest.mark.parametrize("position, remat", [("rope", "none"), ("alibi", "dots")])  # each position, each remat
def test_model_with_kernel_matches_model_with_xla_attention(position, remat):
    """Same params, same loss and gradients, whichever implementation runs the attention (the kernel under the remat
    policy, XLA's attention without one: remat changes no value)."""
    cfgs = {
        "cpu_kernel": dataclasses.replace(CFG, position=position, remat=remat, attention_impl="cpu_kernel"),
        "xla": dataclasses.replace(CFG, position=position, attention_impl="xla"),
    }
    tokens = jax.random.randint(jax.random.key(1), (2, 40), 0, CFG.vocab_size)
    params = nn.unbox(jax.jit(Transformer(cfgs["xla"]).init)(jax.random.key(0), tokens)["params"])

    def loss_and_grad(cfg):
        loss = lambda p: jnp.mean(jax.nn.log_softmax(Transformer(cfg).apply({"params": p}, tokens))[..., 3])
        return jax.jit(jax.value_and_grad(loss))(params)

    (loss_k, grad_k), (loss_x, grad_x) = loss_and_grad(cfgs["cpu_kernel"]), loss_and_grad(cfgs["xla"])
    np.testing.assert_allclose(loss_k, loss_x, rtol=1e-6)
    for got, want in zip(jax.tree.leaves(grad_k), jax.tree.leaves(grad_x)):
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-4)


@needs_kernel
@pytest.mark.parametrize("remat,calls", [("none", 1), ("dots", 1), ("dots_no_batch", 1), ("full", 2)])
def test_remat_policies_keep_the_kernels_output_instead_of_rerunning_it(remat, calls):
    cfg = dataclasses.replace(CFG, remat=remat, attention_impl="cpu_kernel")
    tokens = jnp.zeros((2, 16), jnp.int32)
    params = jax.jit(Transformer(cfg).init)(jax.random.key(0), tokens)
    text = jax.jit(jax.grad(lambda p: Transformer(cfg).apply(p, tokens).sum())).lower(params).as_text()
    assert text.count(cpu_attention.FORWARD) == calls
    assert text.count(cpu_attention.BACKWARD) == 1


def use_cpu_kernel(cfg: ModelConfig) -> bool:
    return choose(cfg) is IMPLEMENTATIONS["cpu_kernel"]


@needs_kernel
def test_auto_uses_the_kernel_only_where_it_can_run():
    assert use_cpu_kernel(CFG)  # head_dim 16, float32, one CPU device
    assert not use_cpu_kernel(dataclasses.replace(CFG, attention_impl="xla"))
    for changes, reason in [({"dtype": "bfloat16"}, "bfloat16"), ({"d_model": 40, "num_heads": 4}, "head_dim 10")]:
        cfg = dataclasses.replace(CFG, **changes)
        assert reason in cpu_kernel_blocker(cfg) and not use_cpu_kernel(cfg)
        with pytest.raises(ValueError, match=f"attention_impl='cpu_kernel' cannot run here: .*{reason}"):
            use_cpu_kernel(dataclasses.replace(cfg, attention_impl="cpu_kernel"))


def test_without_a_compiler_auto_falls_back_to_xla(tmp_path):
    """No compiler: the kernel reports why, 'auto' runs XLA's attention and gives the same logits."""
    script = f"""
import dataclasses, jax, jax.numpy as jnp, numpy as np
from model import ModelConfig, Transformer
from model.attention import IMPLEMENTATIONS, choose
from model.kernels import cpu_attention
cfg = ModelConfig(**{dataclasses.asdict(CFG)!r})
assert not cpu_attention.available() and "compiling" in cpu_attention.unavailable_reason()
assert choose(cfg) is IMPLEMENTATIONS["xla"]
tokens = jnp.zeros((1, 8), jnp.int32)
params = jax.jit(Transformer(cfg).init)(jax.random.key(0), tokens)
a = jax.jit(Transformer(cfg).apply)(params, tokens)
b = jax.jit(Transformer(dataclasses.replace(cfg, attention_impl="xla")).apply)(params, tokens)
np.testing.assert_array_equal(a, b)
print("ok")
"""
    env = {**os.environ, "CXX": "false", "XDG_CACHE_HOME": str(tmp_path), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


@needs_kernel
def test_training_with_cpu_kernel_where_it_cannot_run_is_a_one_line_error_before_any_output(tmp_path):
    from parallel.mesh import MeshError
    from tests.conftest import tiny_run
    from training.loop import train

    run = tiny_run(model={"attention_impl": "cpu_kernel", "dtype": "bfloat16"})
    with pytest.raises(MeshError, match="model.attention_impl='cpu_kernel' cannot run here: compute dtype bfloat16"):
        train(run, tmp_path / "run")
    assert not (tmp_path / "run").exists()
