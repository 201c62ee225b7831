"""Sharded training steps on 8 (fake) devices: every mesh, ring attention included, gives the 1-device
losses. (End-to-end train() runs on meshes: test_sharding.py and tests/test_multihost.py.)"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from parallel.sharding import global_batch
from tests.conftest import tiny_run
from training.config import with_vocab
from training.layout import abstract_state, model_for, plan, shardings_of
from training.loop import init_state, jit_train_step
from training.optim import make_optimizer

# GQA (8 query heads over 4 K/V heads) so tensor=4 still leaves whole K/V heads on each device.
MODEL = {"d_model": 32, "num_heads": 8, "num_kv_heads": 4, "d_ff": 64}
STEPS = {"steps": 10, "batch_size": 8, "log_every": 1, "eval_every": 10, "eval_batches": 1}

MESHES = {
    "8 data": {"data": 8},
    "2 data x 4 fsdp": {"data": 2, "fsdp": 4},
    "2 fsdp x 4 tensor": {"data": 1, "fsdp": 2, "tensor": 4},
    "2 data x 2 fsdp x 2 tensor": {"data": 2, "fsdp": 2, "tensor": 2},
    "4 sequence x 2 data": {"data": 2, "sequence": 4},
}


def losses(mesh: dict, devices=None, **model) -> np.ndarray:
    """train/loss of 10 steps on fixed random batches, on `mesh` over `devices` (default: all 8)."""
    run = with_vocab(tiny_run(model={**MODEL, **model}, train=STEPS, mesh=mesh), 257)
    batches = np.random.default_rng(0).integers(0, 257, (10, 8, run.data.seq_len + 1)).astype(np.int32)
    layout = plan(run, devices)
    with layout.activate():
        model_, (tx, schedule) = model_for(run.model, layout), make_optimizer(run.train)
        shardings = shardings_of(abstract_state(model_, tx, layout))
        state = init_state(model_, tx, run.train.seed, shardings=shardings)
        step = jit_train_step(model_, tx, schedule, run, layout, shardings)
        out = []
        for tokens in batches:
            state, metrics = step(state, global_batch({"tokens": tokens}, layout.batch))
            out.append(metrics["train/loss"])
    return np.asarray(jax.device_get(out))


@pytest.fixture(scope="module")
def one_device():
    return losses({"data": 1}, jax.devices()[:1])


@pytest.mark.parametrize("mesh", MESHES.values(), ids=MESHES.keys())
def test_mesh_gives_one_device_losses(mesh, one_device):
    np.testing.assert_allclose(losses(mesh), one_device, rtol=1e-5)


def test_ring_attention_carries_alibi():
    """ALiBi's bias, computed per block from the positions, follows the tokens through the zig-zag order."""
    want = losses({"data": 1}, jax.devices()[:1], position="alibi")
    np.testing.assert_allclose(losses({"data": 2, "sequence": 4}, position="alibi"), want, rtol=1e-5)
