"""The Pallas kernels on a mesh (parallel/hooks.py's per-device wrapper): every device runs the kernel on its own
batch rows and heads inside `jax.shard_map`, so a sharded run trains as one device with XLA's attention does, and
no q, k or v is gathered around the kernel. (Interpreted on CPU: the smallest shapes.)"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from model.attention import IMPLEMENTATIONS
from model.mask import Mask
from model.positions import AlibiBias
from parallel.hooks import attention_for
from parallel.layout import model_for, plan
from parallel.mesh import MeshError
from parallel.sharding import global_batch
from tests.conftest import tiny_run
from tests.multidevice.test_meshes import EOD, text_batches
from training.config import with_vocab
from training.loop import jit_train_step
from training.optim import make_optimizer
from training.state import abstract_state, shardings_of
from training.step import init_state

MESH = {"data": 2, "fsdp": 2, "tensor": 2}
# GQA (4 query heads over 2 K/V heads: one K/V head and its two query heads per tensor shard), ALiBi (each shard
# must add its own heads' slopes), documents every 37 bytes, a sliding window on every other layer, a soft-cap.
MODEL = dict(num_heads=4, num_kv_heads=2, position="alibi", sliding_window=12, global_every=2, attn_logit_softcap=20.0)
STEPS = {"steps": 3, "batch_size": 4, "log_every": 1, "eval_every": 3, "eval_batches": 1}


def losses(impl: str, mesh: dict, devices=None) -> dict[str, np.ndarray]:
    run = tiny_run(model={**MODEL, "attention_impl": impl}, train=STEPS, mesh=mesh, data={"document_mask": True})
    run = with_vocab(run, 257)
    batches = text_batches(run.data.seq_len)[:3, :4].copy()
    batches.reshape(-1)[::37] = EOD
    layout = plan(run, devices)
    with layout.activate():
        model, (tx, schedule) = model_for(run.model, layout), make_optimizer(run.train)
        shardings = shardings_of(abstract_state(model, tx, layout))
        state = init_state(model, tx, run.train.seed, shardings=shardings)
        step = jit_train_step(model, tx, schedule, run, layout, shardings, EOD)
        out = []
        for tokens in batches:
            state, metrics = step(state, global_batch({"tokens": tokens}, layout.batch))
            out.append({k: metrics[k] for k in ("train/loss", "train/grad_norm")})
    out = jax.device_get(out)
    return {k: np.asarray([m[k] for m in out]) for k in out[0]}


def test_pallas_on_data_fsdp_tensor_mesh_gives_one_device_xla_losses_and_gradient_norms():
    want = losses("xla", {"data": 1}, jax.devices()[:1])
    got = losses("pallas", MESH)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, err_msg=key)


def _layout(mesh=MESH, **model):
    return plan(tiny_run(model={"attention_impl": "pallas", **model}, mesh=mesh))


def test_no_all_gather_of_q_k_v_around_the_kernel():
    """Forward and backward of the wrapped kernel on batch- and head-sharded q, k, v compile to no all-gather (nor
    any other collective moving them): each device reads only its own rows and heads."""
    layout = _layout()
    cfg = tiny_run(model={"attention_impl": "pallas", **MODEL}).model
    impl = attention_for(cfg, layout)
    B, T, N, K, H = 4, 16, 4, 2, 8
    spec = NamedSharding(layout.mesh, PartitionSpec(("data", "fsdp"), None, "tensor", None))
    q, k, v = (jax.device_put(jnp.ones((B, T, n, H)), spec) for n in (N, K, K))
    mask = Mask.self_attention(jnp.broadcast_to(jnp.arange(T), (B, T)), in_order=True)

    def compiled(impl):
        def loss(q, k, v):
            return impl.attend(cfg, q, k, v, mask, bias_fn=AlibiBias(N)).sum()

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile().as_text()

    hlo = compiled(impl)
    assert "all-gather" not in hlo and "all-to-all" not in hlo and "collective-permute" not in hlo
    assert "all-gather" in compiled(IMPLEMENTATIONS["pallas"])  # unwrapped, XLA gathers the kernel's inputs


def test_head_counts_that_do_not_split_and_sequence_parallelism():
    # K/V heads kept whole by the rules but query heads split: the kernel would split a GQA group.
    rules = {"kv_heads": ""}
    with pytest.raises(MeshError, match=r"model.num_kv_heads=2 must|num_kv_heads=2 and") as e:
        _layout({"data": 2, "tensor": 4, "rules": rules}, num_heads=8, num_kv_heads=2)
    assert "\n" not in str(e.value) and "attention_impl='pallas'" in str(e.value)
    # mesh.sequence > 1: ring attention, whatever model.attention_impl names.
    layout = _layout({"data": 2, "sequence": 4})
    cfg = tiny_run(model={"attention_impl": "pallas"}).model
    ring = attention_for(cfg, layout)
    assert ring is not None and ring.attend is not IMPLEMENTATIONS["pallas"].attend
    assert attention_for(dataclasses.replace(cfg, attention_impl="xla"), _layout({"data": 4, "tensor": 2})) is None
