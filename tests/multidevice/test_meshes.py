"""Sharded training steps on 8 (fake) devices: every mesh, ring attention included, gives the 1-device
gradients and losses on learnable text (on uniform random tokens the loss sits at ln V, where a wrong attention
backward barely moves it). (End-to-end train() runs on meshes: test_sharding.py and tests/test_multihost.py.)"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data.corpus import stdlib_files
from parallel.sharding import global_batch
from tests.conftest import tiny_run
from training.config import with_vocab
from training.layout import abstract_state, model_for, plan, sequence_order, shardings_of
from training.loop import init_state, jit_train_step
from training.optim import make_optimizer

# GQA (8 query heads over 4 K/V heads) so tensor=4 still leaves whole K/V heads on each device.
MODEL = {"d_model": 32, "num_heads": 8, "num_kv_heads": 4, "d_ff": 64}
STEPS = {"steps": 10, "batch_size": 8, "log_every": 1, "eval_every": 10, "eval_batches": 1}

EOD = 256  # the byte tokenizer's end-of-document id

MESHES = {
    "8 data": {"data": 8},
    "2 data x 4 fsdp": {"data": 2, "fsdp": 4},
    "2 fsdp x 4 tensor": {"data": 1, "fsdp": 2, "tensor": 4},
    "2 data x 2 fsdp x 2 tensor": {"data": 2, "fsdp": 2, "tensor": 2},
    "4 sequence x 2 data": {"data": 2, "sequence": 4},
}


@functools.cache
def text_batches(seq_len: int) -> np.ndarray:
    """10 batches of 8 windows of consecutive UTF-8 bytes of the standard library's sources: learnable text."""
    _, files = stdlib_files()
    stream = np.frombuffer(b"".join(f.read_bytes() for f in files[:40]), np.uint8).astype(np.int32)
    need = 10 * 8 * (seq_len + 1)
    assert len(stream) >= need
    return stream[:need].reshape(10, 8, seq_len + 1)


def gradients(model_, params, tokens_BT1, order_T):
    """The mean next-token loss's gradient, in the order the layout lays tokens out (ring attention: zig-zag)."""
    inputs_BT, targets_BT, positions_BT = tokens_BT1[:, :-1], tokens_BT1[:, 1:], None
    if order_T is not None:
        inputs_BT, targets_BT = inputs_BT[:, order_T], targets_BT[:, order_T]
        positions_BT = jnp.broadcast_to(jnp.asarray(order_T), inputs_BT.shape)

    def loss(p):
        logits_BTV = model_.apply({"params": p}, inputs_BT, positions_BT)
        logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32))
        return -jnp.mean(jnp.take_along_axis(logp_BTV, targets_BT[..., None], -1))

    return jax.jit(jax.grad(loss))(params)


def losses(mesh: dict, devices=None, data=None, **model) -> tuple[np.ndarray, dict]:
    """train/loss of 10 steps on fixed text batches, and the gradient at the initial params on the first, on
    `mesh` over `devices` (default: all 8). With data.document_mask the text is cut into documents by
    end-of-document tokens every 37 bytes."""
    run = with_vocab(tiny_run(model={**MODEL, **model}, train=STEPS, mesh=mesh, data=data or {}), 257)
    batches = text_batches(run.data.seq_len)
    if run.data.document_mask:
        batches = batches.copy()
        batches.reshape(-1)[::37] = EOD
    layout = plan(run, devices)
    with layout.activate():
        model_, (tx, schedule) = model_for(run.model, layout), make_optimizer(run.train)
        shardings = shardings_of(abstract_state(model_, tx, layout))
        state = init_state(model_, tx, run.train.seed, shardings=shardings)
        first = global_batch({"tokens": batches[0]}, layout.batch)["tokens"]
        grads = jax.device_get(gradients(model_, state.params, first, sequence_order(run.data.seq_len, layout)))
        step = jit_train_step(model_, tx, schedule, run, layout, shardings, EOD)
        out = []
        for tokens in batches:
            state, metrics = step(state, global_batch({"tokens": tokens}, layout.batch))
            out.append(metrics["train/loss"])
    return np.asarray(jax.device_get(out)), grads


def assert_same_run(got, want):
    (got_losses, got_grads), (want_losses, want_grads) = got, want
    assert want_losses[-1] < want_losses[0] - 0.1  # the text is learnable: the loss falls
    np.testing.assert_allclose(got_losses, want_losses, rtol=1e-5)
    for path, g in jax.tree_util.tree_leaves_with_path(got_grads):
        w = np.asarray(_at(want_grads, path))
        scale = np.abs(w).max()
        assert np.abs(np.asarray(g) - w).max() <= 1e-4 * scale, (jax.tree_util.keystr(path), np.abs(g - w).max(), scale)


def _at(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


@pytest.fixture(scope="module")
def one_device():
    return losses({"data": 1}, jax.devices()[:1])


@pytest.mark.parametrize("mesh", MESHES.values(), ids=MESHES.keys())
def test_mesh_gives_one_device_gradients_and_losses(mesh, one_device):
    assert_same_run(losses(mesh), one_device)


def test_ring_attention_carries_alibi():
    """ALiBi's bias, computed per block from the positions, follows the tokens through the zig-zag order."""
    want = losses({"data": 1}, jax.devices()[:1], position="alibi")
    assert_same_run(losses({"data": 2, "sequence": 4}, position="alibi"), want)


def test_ring_attention_keeps_documents_and_sliding_windows_apart():
    """Document ids and restarting positions travel round the ring with the keys, and windows mask by position:
    the sequence-sharded run trains as one device does."""
    options = dict(data={"document_mask": True}, sliding_window=12, global_every=2, attn_logit_softcap=20.0)
    want = losses({"data": 1}, jax.devices()[:1], **options)
    assert_same_run(losses({"data": 2, "sequence": 4}, **options), want)
