"""Expert parallelism on 8 (fake) devices: experts sharded over the `expert` mesh axis (with data and FSDP axes),
assignments moved by parallel/expert.py's all-to-all, give the 1-device layer outputs and gradients and the
1-device training losses, for both routers and both dispatch modes (capacity ones dropping some assignments)."""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.moe import MoE, capacity
from model.runtime import TRAINING, Hooks
from parallel.config import MeshConfig
from parallel.expert import expert_parallel
from parallel.layout import model_for, plan
from parallel.mesh import make_mesh
from parallel.sharding import global_batch
from tests.conftest import tiny_run
from tests.multidevice.test_meshes import text_batches
from training.config import with_vocab
from training.loop import jit_train_step
from training.optim import make_optimizer
from training.state import abstract_state, shardings_of
from training.step import init_state

# One layer and one causal attention block: the expert exchange runs per layer, and each of the six train steps
# this module compiles (a routing on one device and on each mesh) costs the fewer seconds (on the shared
# fake-device CPUs, tracing and compiling are the time).
MODEL = {"d_model": 32, "num_layers": 1, "num_heads": 4, "num_kv_heads": 2, "d_ff": 64, "mlp": "moe",
         "causal_blocks": 1}  # fmt: skip
# One config for every run here, train() ones included: the same mesh then lowers the same train step (loaded from
# the suite's compilation cache the second time).
STEPS = {"steps": 4, "batch_size": 8, "log_every": 1, "eval_every": 100, "eval_batches": 1}
ROUTINGS = {
    "softmax dropless": {"num_experts": 4, "top_k": 2, "d_ff_expert": 32, "z_loss_weight": 1e-3},
    "sigmoid capacity": {"num_experts": 4, "top_k": 2, "d_ff_expert": 32, "router": "sigmoid", "n_group": 2,
                         "topk_group": 1, "num_shared_experts": 1, "bias_update_rate": 0.01, "dispatch": "capacity",
                         "capacity_factor": 1.0},
}  # fmt: skip
MESHES = {
    "4 expert x 2 data": {"data": 2, "expert": 4},
    "2 expert x 2 fsdp x 2 data": {"data": 2, "fsdp": 2, "expert": 2},
}
LOGGED = ("train/loss", "train/moe_aux_loss", "train/moe_max_load", "train/moe_dropped_frac")


def run_for(mesh: dict, moe: dict, **groups):
    return with_vocab(tiny_run(model={**MODEL, "moe": moe}, train=STEPS, mesh=mesh, **groups), 257)


@functools.cache
def initial_state(routing: str):
    """`routing`'s initial train state, made on one device: every layout starts from a copy of it, so the random
    initialiser (seconds to compile) is compiled once, not once per mesh."""
    run = run_for({"data": 1}, ROUTINGS[routing])
    layout = plan(run, jax.devices()[:1])
    with layout.activate():
        model, (tx, _) = model_for(run.model, layout), make_optimizer(run.train, run.model)
        return init_state(model, tx, run.train.seed, shardings=shardings_of(abstract_state(model, tx, layout)))


def losses(mesh: dict, routing: str, devices=None, fresh: bool = False) -> np.ndarray:
    """LOGGED at each step of training on fixed text batches, on `mesh` over `devices` (default: all 8), from a
    copy of the 1-device initial state, or (`fresh`) from the sharded initialiser run on this mesh."""
    run = run_for(mesh, ROUTINGS[routing])
    layout = plan(run, devices)
    copy = None if fresh else jax.tree.map(lambda x: x.copy(), initial_state(routing))  # the step donates its state
    with layout.activate():
        model, (tx, schedule) = model_for(run.model, layout), make_optimizer(run.train, run.model)
        shardings = shardings_of(abstract_state(model, tx, layout))
        if fresh:
            state = init_state(model, tx, run.train.seed, shardings=shardings)
        else:
            state = jax.device_put(copy, shardings)
        step = jit_train_step(model, tx, schedule, run, layout, shardings)
        out = []
        for tokens in text_batches(run.data.seq_len)[: run.train.steps]:
            state, metrics = step(state, global_batch({"tokens": tokens}, layout.batch))
            out.append([metrics[k] for k in LOGGED])
    return np.asarray(jax.device_get(out))


@pytest.mark.parametrize("routing", ROUTINGS, ids=ROUTINGS.keys())
def test_expert_meshes_give_the_one_device_losses(routing):
    want = losses({"data": 1}, routing, jax.devices()[:1])
    assert want[-1, 0] < want[0, 0]  # the losses move: each step's update reaches the next step's loss
    dropped = want[:, LOGGED.index("train/moe_dropped_frac")]
    assert (dropped > 0).all() if ROUTINGS[routing].get("dispatch") == "capacity" else (dropped == 0).all()
    for name, mesh in MESHES.items():  # one mesh initialises its sharded experts in place: the same weights
        got = losses(mesh, routing, fresh=name == "2 expert x 2 fsdp x 2 data")
        np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=name)


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name):
    """jax.lax.ragged_all_to_all as its docstring's pseudocode defines it, from a dense all-to-all of whole pieces:
    XLA:CPU has no ragged all-to-all, so the ragged exchange's offsets and sizes are checked through this."""
    R, n = operand.shape[0], input_offsets.shape[0]
    r = jnp.arange(R)
    trailing = (1,) * (operand.ndim - 1)

    def piece(offset, size):  # operand[offset : offset + size] at the front of R rows
        return jnp.where((r < size).reshape(-1, *trailing), operand[jnp.clip(offset + r, 0, R - 1)], 0)

    pieces = jax.lax.all_to_all(jax.vmap(piece)(input_offsets, send_sizes), axis_name, 0, 0, tiled=True)
    lands = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)
    result = output
    for i in range(n):
        rows = jnp.where(r < recv_sizes[i], lands[i] + r, output.shape[0])  # past the end: not written
        result = result.at[rows].set(pieces[i], mode="drop")
    return result


def test_the_emulated_ragged_all_to_all_gives_the_documented_example():
    mesh = make_mesh(MeshConfig(data=1, expert=2), jax.devices()[:2])
    args = {
        "operand": [[1, 2, 2], [3, 4, 0]], "output": [[0, 0, 0, 0]] * 2, "input_offsets": [[0, 1], [0, 1]],
        "send_sizes": [[1, 2], [1, 1]], "output_offsets": [[0, 0], [1, 2]], "recv_sizes": [[1, 1], [2, 1]],
    }  # fmt: skip
    local = lambda *a: emulated_ragged_all_to_all(*(x[0] for x in a), axis_name="expert")[None]  # noqa: E731
    spec = jax.sharding.PartitionSpec("expert")
    got = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=spec, out_specs=spec))(
        *(jnp.asarray(v, jnp.int32) for v in args.values())
    )
    np.testing.assert_array_equal(got, [[1, 3, 0, 0], [2, 2, 4, 0]])


EXCHANGES = {"padded": {"exchange": "padded"}, "ragged": {"exchange": "ragged", "ragged": emulated_ragged_all_to_all}}


def layer_config(**moe):
    from tests.test_moe import CFG

    return dataclasses.replace(CFG, moe=dataclasses.replace(CFG.moe, **moe))


def layer_loss(cfg, rt=TRAINING):
    def loss(v, x):
        y, aux = MoE(cfg, rt).apply(v, x)
        return jnp.sum(y**2), aux["moe_dropped_frac"].value

    return jax.value_and_grad(loss, has_aux=True)


@functools.cache
def one_device_layer(dispatch: str, factor: float):
    """(cfg, variables, x, ((loss, dropped), grads)) of the MoE layer on one device, jitted (shared by the
    exchanges; eagerly every op would compile on its own)."""
    cfg = layer_config(dispatch=dispatch, capacity_factor=factor, num_shared_experts=1)
    x = jax.random.normal(jax.random.key(0), (8, 8, 32))
    variables = nn.unbox(jax.jit(MoE(cfg).init)(jax.random.key(1), x))
    with jax.default_device(jax.devices()[0]):
        return cfg, variables, x, jax.jit(layer_loss(cfg))(variables, x)


def most_rows_one_device_sends_one_expert(cfg, variables, x, devices: int) -> int:
    """In NumPy: the softmax router's kept assignments (each expert's first `capacity` in assignment order, choice
    by choice, token by token), counted per (device holding the token, expert)."""
    from tests.test_moe import np_softmax, np_topk

    T = x.shape[0] * x.shape[1]
    router = np.asarray(variables["params"]["router"], np.float64)
    experts_A = np_topk(np_softmax(np.asarray(x, np.float64).reshape(T, -1) @ router), cfg.moe.top_k).T.ravel()
    token_A = np.tile(np.arange(T), cfg.moe.top_k)
    rank_A = np.asarray([np.sum(experts_A[:a] == e) for a, e in enumerate(experts_A)])
    kept = rank_A < capacity(cfg.moe, experts_A.size)
    sent = np.zeros((devices, cfg.moe.num_experts), int)
    np.add.at(sent, (token_A[kept] // (T // devices), experts_A[kept]), 1)
    return int(sent.max())


@pytest.mark.parametrize(
    "dispatch, factor, exchange",
    [("dropless", 1.0, "padded"), ("capacity", 0.125, "padded"), ("dropless", 1.0, "ragged")],
)
def test_the_all_to_all_layer_gives_the_one_device_output_and_gradients(dispatch, factor, exchange):
    cfg, variables, x, ((want, dropped), want_grads) = one_device_layer(dispatch, factor)
    assert (dropped > 0) == (dispatch == "capacity")
    if dispatch == "capacity":  # a capacity of 4, all of it one expert's rows from one device: the chunk is full
        assert most_rows_one_device_sends_one_expert(cfg, variables, x, 8) == capacity(cfg.moe, 128) == 4
    mesh = make_mesh(MeshConfig(data=2, expert=4))
    hook = expert_parallel(mesh, ("data", "fsdp", "expert"), **EXCHANGES[exchange])
    with jax.set_mesh(mesh):
        (got, _), grads = jax.jit(layer_loss(cfg, dataclasses.replace(TRAINING, hooks=Hooks(experts=hook))))(
            variables, x
        )
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-7)


def test_each_device_computes_one_chunk_per_source_not_every_local_expert_over_every_slot(monkeypatch):
    """Dropless, 8 experts on (4 expert x 2 data): each device holds 8 tokens x top-2 = 16 assignments and 2
    experts; it receives 4 chunks of 16 rows and its grouped matmul is sized for those 64 rows (plus tile padding),
    where a slot per (expert, source) for every assignment would make 2 x 4 x 16 = 128."""
    from model import moe as moe_lib

    cfg = layer_config(num_experts=8, dispatch="dropless")
    x = jax.ShapeDtypeStruct((8, 8, 32), jnp.float32)
    variables = nn.unbox(jax.eval_shape(MoE(cfg).init, jax.random.key(1), x))  # lowering needs only shapes
    sizes, grouped = [], moe_lib.grouped_rows

    def recording(num_experts, experts_A, backend=None):
        sizes.append((num_experts, experts_A.shape[0]))
        return grouped(num_experts, experts_A, backend)

    monkeypatch.setattr(moe_lib, "grouped_rows", recording)
    mesh = make_mesh(MeshConfig(data=2, expert=4))
    rt = dataclasses.replace(TRAINING, hooks=Hooks(experts=expert_parallel(mesh, ("data", "fsdp", "expert"))))
    with jax.set_mesh(mesh):
        jax.jit(lambda v, x: MoE(cfg, rt).apply(v, x)).lower(variables, x)
    assert sizes == [(8, 128), (2, 64)]  # the global routing's grouping, then one device's received rows


def test_a_checkpoint_from_an_expert_mesh_continues_on_another_mesh(tmp_path, text_corpus):
    """Steps 3..4 resumed on (2 expert x 2 fsdp x 2 data) from a (4 expert x 2 data) checkpoint at step 2 give the
    losses of the uninterrupted run: the experts' weights, their optimizer state and the routers' correction bias
    (non-trained state) move between the meshes. (A small corpus: tokenizing the standard library takes longer
    than the training.)"""
    import json
    import shutil

    from training.loop import train

    def run(mesh):  # the config test_expert_meshes_give_the_one_device_losses trains on the same mesh
        checkpoint = {"every": 2, "keep": 5, "async_save": False}
        data = {"corpus": str(text_corpus), "val_fraction": 0.2}
        return run_for(mesh, ROUTINGS["sigmoid capacity"], checkpoint=checkpoint, data=data)

    def losses_in(workdir):
        rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}

    workdir = tmp_path / "run"
    train(run(MESHES["4 expert x 2 data"]), workdir, quiet=True)
    want = losses_in(workdir)
    shutil.rmtree(workdir / "checkpoints" / "4")
    result = train(run(MESHES["2 expert x 2 fsdp x 2 data"]), workdir, quiet=True)
    got = losses_in(workdir)
    assert result["step"] == 4 and sorted(got) == list(range(1, 5))
    np.testing.assert_allclose([got[s] for s in (3, 4)], [want[s] for s in (3, 4)], rtol=1e-5)
