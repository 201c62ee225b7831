"""muP: hidden init and Adam learning rates scale with width as Tensor Programs V prescribes, and a
coordinate check: logits stay O(1) across widths under muP after a few Adam steps but grow under SP."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import Transformer
from tests.conftest import tiny_run
from training.config import with_vocab
from training.optim import make_optimizer
from training.step import init_state, make_train_step

BASE = 32


def run_at(width: int, parametrization: str, **train):
    model = {
        "d_model": width,
        "num_heads": width // 16,
        "num_kv_heads": width // 16,
        "head_dim": 16,
        "d_ff": 4 * width,
        "num_layers": 2,
        "parametrization": parametrization,
        "mup_base_width": BASE,
        "tie_embeddings": False,
    }
    train = {"lr": 1e-2, "warmup_steps": 0, "weight_decay": 0.0, "grad_clip": 0.0, "schedule": "constant", **train}
    return with_vocab(tiny_run(model=model, train=train), 257)


def test_hidden_init_and_learning_rates_scale_with_width():
    run = run_at(256, "mup", weight_decay=0.1)  # width_mult 8
    params = init_state(Transformer(run.model), make_optimizer(run.train, run.model)[0], 0).params
    layers = params["layers"]
    assert float(jnp.std(layers["mlp"]["up"]["kernel"])) == pytest.approx(0.02 / 8**0.5, rel=0.05)
    assert float(jnp.std(params["embed"]["embedding"])) == pytest.approx(0.02, rel=0.05)
    assert float(jnp.std(params["head"]["kernel"])) == pytest.approx(0.02, rel=0.05)

    grads = jax.tree.map(jnp.ones_like, params)
    updates = {}
    for p in ("sp", "mup"):
        tx, _ = make_optimizer(run_at(256, p, weight_decay=0.1).train, run_at(256, p).model)
        updates[p] = jax.jit(lambda grads, params: tx.update(grads, tx.init(params), params)[0])(grads, params)
    ratio = jax.tree.map(lambda m, s: float(jnp.mean(m / s)), updates["mup"], updates["sp"])
    assert ratio["layers"]["attn"]["query"]["kernel"] == pytest.approx(1 / 8)  # weight decay scaled with it
    assert ratio["layers"]["mlp"]["down"]["kernel"] == pytest.approx(1 / 8)
    assert ratio["embed"]["embedding"] == pytest.approx(1.0)
    assert ratio["head"]["kernel"] == pytest.approx(1.0)
    assert ratio["layers"]["attn_norm"]["scale"] == pytest.approx(1.0)


def logits_change(width: int, parametrization: str, seeds=(0, 1), steps: int = 5) -> float:
    """RMS of how far Adam moved the logits in `steps` steps on a fixed batch, averaged over seeds."""
    run = run_at(width, parametrization)
    model, (tx, schedule) = Transformer(run.model), make_optimizer(run.train, run.model)
    logits = jax.jit(lambda params, tokens: model.apply({"params": params}, tokens[:, :-1]))
    step = jax.jit(make_train_step(model, tx, schedule, run.train))
    init = jax.jit(lambda seed: init_state(model, tx, seed))  # init_state's program, compiled once for all seeds
    changes = []
    for seed in seeds:
        state = init(seed)
        tokens = np.random.default_rng(seed).integers(0, 257, (4, run.data.seq_len + 1)).astype(np.int32)
        before = logits(state.params, tokens)
        for _ in range(steps):
            state, _ = step(state, {"tokens": tokens})
        changes.append(float(jnp.sqrt(jnp.mean((logits(state.params, tokens) - before) ** 2))))
    return float(np.mean(changes))


def test_coordinate_check_flat_under_mup_growing_under_sp():
    widths = (32, 128, 512)
    change = {p: np.array([logits_change(w, p) for w in widths]) for p in ("sp", "mup")}
    assert change["sp"][0] == pytest.approx(change["mup"][0], rel=1e-5)  # the same model at the base width
    assert change["sp"][-1] / change["sp"][0] > 4  # SP: the logits' update grows with width
    assert np.all(change["mup"] / change["mup"][0] > 0.3) and np.all(change["mup"] / change["mup"][0] < 1.5), change
