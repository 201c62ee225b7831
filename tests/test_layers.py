"""Norms, MLPs and sinusoidal positions against NumPy, as the README and the papers define them."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import ModelConfig
from model.layers import MLPS, NORMS
from model.positions import sinusoidal_table

CFG = ModelConfig(d_model=16, d_ff=24, num_layers=2, init_std=0.3)
X = np.random.default_rng(0).normal(size=(2, 3, 16)).astype(np.float32) * 2 + 0.5


def random_params(module, x):
    """The module's params, every leaf redrawn at random (norm scales and biases start at 1 and 0)."""
    params = jax.jit(module.init)(jax.random.key(0), jnp.asarray(x))["params"]
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    leaves = [jax.random.normal(k, leaf.shape, leaf.dtype) for k, leaf in zip(keys, leaves)]
    return jax.tree.unflatten(tree, leaves)


def value(tree):
    """The array under a Flax param (boxed with logical axis names or not)."""
    return np.asarray(getattr(tree, "value", tree), np.float64)


def test_rmsnorm_and_layernorm_match_numpy():
    eps, x = CFG.norm_eps, X.astype(np.float64)
    rms = NORMS["rmsnorm"](CFG)
    p = random_params(rms, X)
    want = x / np.sqrt(np.mean(x**2, -1, keepdims=True) + eps) * value(p["scale"])
    np.testing.assert_allclose(rms.apply({"params": p}, X), want, rtol=2e-5, atol=2e-5)

    ln = NORMS["layernorm"](CFG)
    p = random_params(ln, X)
    centred = x - x.mean(-1, keepdims=True)
    want = centred / np.sqrt(np.var(x, -1, keepdims=True) + eps) * value(p["scale"]) + value(p["bias"])
    np.testing.assert_allclose(ln.apply({"params": p}, X), want, rtol=2e-5, atol=2e-5)


def silu(z):
    return z / (1 + np.exp(-z))


def gelu_tanh(z):
    """GELU's tanh form (Hendrycks & Gimpel 2016; GPT-2's), which nn.gelu computes by default."""
    return 0.5 * z * (1 + np.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))


@pytest.mark.parametrize("kind", ["swiglu", "gelu"])
def test_mlps_match_numpy(kind):
    mlp = MLPS[kind](CFG)
    p = random_params(mlp, X)
    x = X.astype(np.float64)
    w = {name: value(p[name]["kernel"]) for name in p}
    if kind == "swiglu":  # Shazeer 2020: down(silu(x W_gate) * (x W_up))
        want = (silu(x @ w["gate"]) * (x @ w["up"])) @ w["down"]
    else:
        want = gelu_tanh(x @ w["up"]) @ w["down"]
    y, aux = mlp.apply({"params": p}, X)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)
    assert aux == {}  # dense MLPs have no auxiliary terms


def test_sinusoidal_positions_are_vaswanis_with_sin_then_cos_halves():
    """PE(p, i) = sin(p / 10000^(2i/d)) for the first d/2 channels and cos of the same angles for the rest."""
    d, positions = 12, np.array([[0, 1, 5, 100, 1000]])
    got = np.asarray(sinusoidal_table(jnp.asarray(positions), d))
    angles = positions[..., None] / 10_000.0 ** (2 * np.arange(d // 2) / d)
    np.testing.assert_allclose(got, np.concatenate([np.sin(angles), np.cos(angles)], -1), atol=1e-4)
    assert got.shape == (1, 5, d) and got[0, 0, : d // 2].tolist() == [0.0] * (d // 2)
