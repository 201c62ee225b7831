"""MoE training steps on 8 (fake) devices: experts sharded over the `expert` mesh axis (with data and FSDP axes)
give the 1-device losses, for both routers and both dispatch modes. The sharding is GSPMD's, from the logical
axis names (`experts` -> `expert`); routing, capacity and the balancing bias stay global, so the math is the
1-device math."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from parallel.sharding import global_batch
from tests.conftest import tiny_run
from tests.multidevice.test_meshes import text_batches
from training.config import with_vocab
from training.layout import abstract_state, model_for, plan, shardings_of
from training.loop import init_state, jit_train_step
from training.optim import make_optimizer

MODEL = {"d_model": 32, "num_heads": 4, "num_kv_heads": 2, "d_ff": 64, "mlp": "moe"}
STEPS = {"steps": 5, "batch_size": 8, "log_every": 1, "eval_every": 5, "eval_batches": 1}
ROUTINGS = {
    "softmax dropless": {"num_experts": 4, "top_k": 2, "d_ff_expert": 32, "z_loss_weight": 1e-3},
    "sigmoid capacity": {"num_experts": 4, "top_k": 2, "d_ff_expert": 32, "router": "sigmoid", "n_group": 2,
                         "topk_group": 1, "num_shared_experts": 1, "bias_update_rate": 0.01, "dispatch": "capacity",
                         "capacity_factor": 1.0},
}  # fmt: skip
MESHES = {"4 expert x 2 data": {"data": 2, "expert": 4}, "2 expert x 2 fsdp x 2 data": {"data": 2, "fsdp": 2, "expert": 2}}


def losses(mesh: dict, moe: dict, devices=None) -> np.ndarray:
    run = with_vocab(tiny_run(model={**MODEL, "moe": moe}, train=STEPS, mesh=mesh), 257)
    layout = plan(run, devices)
    with layout.activate():
        model, (tx, schedule) = model_for(run.model, layout), make_optimizer(run.train)
        shardings = shardings_of(abstract_state(model, tx, layout))
        state = init_state(model, tx, run.train.seed, shardings=shardings)
        step = jit_train_step(model, tx, schedule, run, layout, shardings)
        out = []
        for tokens in text_batches(run.data.seq_len)[: run.train.steps]:
            state, metrics = step(state, global_batch({"tokens": tokens}, layout.batch))
            out.append([metrics["train/loss"], metrics["train/moe_aux_loss"], metrics["train/moe_max_load"]])
    return np.asarray(jax.device_get(out))


@pytest.mark.parametrize("routing", ROUTINGS, ids=ROUTINGS.keys())
def test_expert_meshes_give_the_one_device_losses(routing):
    want = losses({"data": 1}, ROUTINGS[routing], jax.devices()[:1])
    assert want[-1, 0] < want[0, 0]
    for name, mesh in MESHES.items():
        np.testing.assert_allclose(losses(mesh, ROUTINGS[routing]), want, rtol=1e-5, err_msg=name)
