"""Sharded training steps on 8 (fake) devices: every mesh, ring attention included, gives the 1-device
losses and gradient norms on learnable text (on uniform random tokens the loss sits at ln V, where a wrong attention
backward barely moves it). (End-to-end train() runs on meshes: test_sharding.py and tests/test_multihost.py.)"""

from __future__ import annotations

import functools
import json

import jax
import numpy as np
import pytest

from data.corpus import stdlib_files
from parallel.layout import model_for, plan
from parallel.sharding import global_batch
from tests.conftest import tiny_run
from training.config import with_vocab
from training.loop import jit_train_step
from training.optim import make_optimizer
from training.state import abstract_state, shardings_of
from training.step import init_state

# GQA (8 query heads over 4 K/V heads) so tensor=4 still leaves whole K/V heads on each device. One causal
# attention block: the meshes are what is tested, and the train steps (tracing and compiling them is the time here)
# are the smaller (blocked attention on a mesh: tests/test_golden.py, mesh8).
MODEL = {"d_model": 32, "num_heads": 8, "num_kv_heads": 4, "d_ff": 64, "causal_blocks": 1}
STEPS = {"steps": 10, "batch_size": 8, "log_every": 1, "eval_every": 10, "eval_batches": 1}

EOD = 256  # the byte tokenizer's end-of-document id

MESHES = {
    "8 data": {"data": 8},
    "2 data x 4 fsdp": {"data": 2, "fsdp": 4},
    "2 fsdp x 4 tensor": {"data": 1, "fsdp": 2, "tensor": 4},
    "2 data x 2 fsdp x 2 tensor": {"data": 2, "fsdp": 2, "tensor": 2},
    "4 sequence x 2 data": {"data": 2, "sequence": 4},
}
FRESH = "2 data x 2 fsdp x 2 tensor"  # the mesh that initialises its (fsdp- and tensor-split) params in place


@functools.cache
def text_batches(seq_len: int) -> np.ndarray:
    """10 batches of 8 windows of consecutive UTF-8 bytes of the standard library's sources: learnable text."""
    _, files = stdlib_files()
    stream = np.frombuffer(b"".join(f.read_bytes() for f in files[:40]), np.uint8).astype(np.int32)
    need = 10 * 8 * (seq_len + 1)
    assert len(stream) >= need
    return stream[:need].reshape(10, 8, seq_len + 1)


def run_for(mesh: dict, data: dict | None = None, **model):
    return with_vocab(tiny_run(model={**MODEL, **model}, train=STEPS, mesh=mesh, data=data or {}), 257)


@functools.cache
def _one_device_state(options: str):
    data, model = json.loads(options)
    run = run_for({"data": 1}, data, **model)
    layout = plan(run, jax.devices()[:1])
    with layout.activate():
        model_, (tx, _) = model_for(run.model, layout), make_optimizer(run.train)
        return init_state(model_, tx, run.train.seed, shardings=shardings_of(abstract_state(model_, tx, layout)))


def start(mesh: dict, devices=None, data: dict | None = None, fresh: bool = False, **model):
    """(run, layout, model, tx, schedule, shardings, initial state) of a run on `mesh` over `devices` (default:
    all 8). The state is a copy of the one made once per config on one device (the random initialiser takes
    seconds to compile: once per config, not once per mesh), or (`fresh`) the initialiser run sharded on this mesh:
    a mesh that does so shows that it makes the 1-device weights."""
    run = run_for(mesh, data, **model)
    copy = None if fresh else jax.tree.map(lambda x: x.copy(), _one_device_state(json.dumps([data or {}, model])))
    layout = plan(run, devices)
    with layout.activate():
        model_, (tx, schedule) = model_for(run.model, layout), make_optimizer(run.train)
        shardings = shardings_of(abstract_state(model_, tx, layout))
        if fresh:
            state = init_state(model_, tx, run.train.seed, shardings=shardings)
        else:
            state = jax.device_put(copy, shardings)  # the train step donates its state: a copy each time
    return run, layout, model_, tx, schedule, shardings, state


def losses(mesh: dict, devices=None, data=None, fresh: bool = False, **model) -> dict[str, np.ndarray]:
    """train/loss and train/grad_norm of 10 steps on fixed text batches, on `mesh` over `devices` (default: all 8),
    from `start`'s initial state. With data.document_mask the text is cut into documents by end-of-document tokens
    every 37 bytes. (AdamW's update barely depends on a gradient's scale: the gradient's norm at every step is what
    catches a leaf whose gradient is off by a factor, the losses one whose direction is.)"""
    run, layout, model_, tx, schedule, shardings, state = start(mesh, devices, data, fresh, **model)
    batches = text_batches(run.data.seq_len)
    if run.data.document_mask:
        batches = batches.copy()
        batches.reshape(-1)[::37] = EOD
    with layout.activate():
        step = jit_train_step(model_, tx, schedule, run, layout, shardings, EOD)
        out = []
        for tokens in batches:
            state, metrics = step(state, global_batch({"tokens": tokens}, layout.batch))
            out.append({k: metrics[k] for k in ("train/loss", "train/grad_norm")})
    out = jax.device_get(out)
    return {k: np.asarray([m[k] for m in out]) for k in out[0]}


def assert_same_run(got, want):
    assert want["train/loss"][-1] < want["train/loss"][0] - 0.1  # the text is learnable: the loss falls
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, err_msg=key)


@pytest.fixture(scope="module")
def one_device():
    return losses({"data": 1}, jax.devices()[:1])


@pytest.mark.parametrize("name", MESHES)
def test_mesh_gives_one_device_losses_and_gradient_norms(name, one_device):
    assert_same_run(losses(MESHES[name], fresh=name == FRESH), one_device)


def test_ring_attention_keeps_documents_windows_and_alibi_apart():
    """Document ids and restarting positions travel round the ring with the keys, windows mask by position, and
    ALiBi's bias, computed per block from the positions, follows the tokens through the zig-zag order: the
    sequence-sharded run trains as one device does."""
    options = dict(data={"document_mask": True}, sliding_window=12, global_every=2, attn_logit_softcap=20.0,
                   position="alibi")  # fmt: skip
    want = losses({"data": 1}, jax.devices()[:1], **options)
    assert_same_run(losses({"data": 2, "sequence": 4}, **options), want)
