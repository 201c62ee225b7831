"""Parameters and optimizer state on 8 (fake) devices: split as the rules table says, per-device memory
falling as 1/(fsdp x tensor), and a checkpoint moving between meshes."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest

from model import Transformer
from parallel.layout import plan
from tests.conftest import tiny_run
from tests.multidevice.test_meshes import MODEL, STEPS
from training.dry_run import dry_run
from training.loop import train
from training.optim import make_optimizer
from training.state import abstract_state
from training.step import init_state


def losses(workdir) -> dict[int, float]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def test_params_and_optimizer_state_are_split_as_the_rules_say():
    run = tiny_run(model=MODEL, train=STEPS, mesh={"data": 1, "fsdp": 2, "tensor": 4})
    layout = plan(run)
    with layout.activate():
        model, (tx, _) = Transformer(run.model), make_optimizer(run.train)
        shardings = jax.tree.map(lambda x: x.sharding, abstract_state(model, tx, layout))
        state = init_state(model, tx, 0, shardings=shardings)
    layer = state.params["layers"]
    D, N, K, H, F, L = 32, 8, 4, 4, 64, 2

    def shard(x):
        shapes = {s.data.shape for s in x.addressable_shards}
        assert len(shapes) == 1
        return shapes.pop()

    # embed -> fsdp (2), heads / kv_heads / mlp -> tensor (4), layers and head_dim whole.
    assert shard(layer["attn"]["query"]["kernel"]) == (L, D // 2, N // 4, H)
    assert shard(layer["attn"]["key"]["kernel"]) == (L, D // 2, K // 4, H)
    assert shard(layer["attn"]["out"]["kernel"]) == (L, N // 4, H, D // 2)
    assert shard(layer["mlp"]["gate"]["kernel"]) == (L, D // 2, F // 4)
    assert shard(layer["mlp"]["down"]["kernel"]) == (L, F // 4, D // 2)
    assert shard(layer["attn_norm"]["scale"]) == (L, D // 2)
    assert shard(state.params["embed"]["embedding"]) == (257, D // 2)  # 257 tokens do not split 4 ways
    # AdamW's moments are split exactly like their params (ZeRO-3); the step counter is replicated.
    adam = state.opt_state[1][0]
    assert shard(adam.mu["layers"]["mlp"]["down"]["kernel"]) == (L, F // 4, D // 2)
    assert shard(adam.nu["layers"]["attn"]["query"]["kernel"]) == (L, D // 2, N // 4, H)
    assert adam.count.sharding.is_fully_replicated


def test_per_device_params_and_optimizer_memory_fall_as_one_over_fsdp_times_tensor():
    """From XLA's own memory analysis of the compiled step: argument bytes minus the batch."""
    # One causal attention block: the arguments' bytes do not depend on it, the compile time does.
    model = {"d_model": 64, "num_heads": 8, "num_kv_heads": 8, "d_ff": 256, "num_layers": 2, "causal_blocks": 1}
    data = {"tokenizer": "bpe:512", "seq_len": 32}  # a vocabulary that splits over tensor too

    def state_bytes(mesh):
        run = tiny_run(model=model, data=data, train={"batch_size": 8}, mesh=mesh)
        plan_ = dry_run(run)
        batch_bytes = 8 * 33 * 4 // plan_["mesh"]["data"] // plan_["mesh"]["fsdp"]
        return plan_["bytes_per_device"]["arguments"] - batch_bytes, plan_

    full, _ = state_bytes({"data": 8})
    for mesh, shards in [
        ({"data": 4, "fsdp": 2}, 2),
        ({"data": 1, "fsdp": 2, "tensor": 4}, 8),
        ({"data": 2, "tensor": 4}, 4),
    ]:
        got, plan_ = state_bytes(mesh)
        # Norm scales split over fsdp only and the step counters not at all: a few per cent.
        assert got == pytest.approx(full / shards, rel=0.05), (mesh, got, full)
        exact = plan_["bytes_per_device"]["params"] + plan_["bytes_per_device"]["optimizer_state"]
        assert got == pytest.approx(exact, rel=0.01)


def test_checkpoint_from_one_mesh_continues_on_another(tmp_path, text_corpus):
    """Steps 3..4 resumed on (8 data) from a (2 fsdp x 4 tensor) checkpoint at step 2 give the losses of the
    uninterrupted run. (A small corpus: tokenizing the standard library takes longer than the training.)"""
    steps = {**STEPS, "steps": 4, "eval_every": 100}
    checkpoint = {"every": 2, "keep": 5, "async_save": False}
    data = {"corpus": str(text_corpus), "val_fraction": 0.2}

    def run(mesh):
        return tiny_run(model=MODEL, train=steps, checkpoint=checkpoint, data=data, mesh=mesh)

    train(run({"data": 1, "fsdp": 2, "tensor": 4}), tmp_path, quiet=True)
    want = losses(tmp_path)
    shutil.rmtree(tmp_path / "checkpoints" / "4")
    result = train(run({"data": 8}), tmp_path, quiet=True)
    got = losses(tmp_path)
    assert result["step"] == 4 and sorted(got) == list(range(1, 5))
    np.testing.assert_allclose([got[s] for s in (3, 4)], [want[s] for s in (3, 4)], rtol=1e-5)


def test_a_hugging_face_checkpoint_loads_onto_the_mesh_shard_by_shard(tmp_path):
    """Each device gets its own slice of every tensor, as the rules table places it; the logits are the file's."""
    pytest.importorskip("transformers")
    import model as model_lib
    from tests.test_hf import build, ids
    from training import hf

    build("llama", tmp_path)
    _, whole, _ = hf.load(tmp_path)
    cfg = model_lib.hf.read_config(tmp_path)[0].from_hf(json.loads((tmp_path / "config.json").read_text()))
    run = tiny_run(model={"d_model": 64, "num_heads": 4, "num_kv_heads": 2}, mesh={"data": 2, "fsdp": 2, "tensor": 2})
    layout = plan(run)
    _, sharded, _ = hf.load(tmp_path, layout)
    want = jax.tree.map(
        lambda x: x.sharding, abstract_state(Transformer(cfg), make_optimizer(run.train)[0], layout).params
    )
    query = sharded["layers"]["attn"]["query"]["kernel"]
    assert query.sharding == want["layers"]["attn"]["query"]["kernel"]
    assert {s.data.shape for s in query.addressable_shards} == {(2, 32, 2, 16)}  # embed / fsdp, heads / tensor
    jax.tree.map(lambda x, s: x.sharding == s or pytest.fail(f"{x.sharding} != {s}"), sharded, want)
    x = ids()
    expected = model_lib.logits(cfg, whole, x)
    with layout.activate():
        np.testing.assert_allclose(model_lib.logits(cfg, sharded, x), expected, atol=1e-5)
