"""Multi-token prediction heads train on the 8-device meshes (data x fsdp x tensor, and sequence-split ring
attention, whose zig-zag order the heads' further targets follow) with the 1-device losses, train/mtp_loss
included."""

from __future__ import annotations

import jax
import numpy as np

from parallel.sharding import global_batch
from tests.multidevice.test_meshes import EOD, FRESH, start, text_batches
from training.loop import jit_train_step

HEADS = 2


def losses(mesh: dict, style: str, devices=None, fresh: bool = False) -> dict[str, np.ndarray]:
    """train/loss and train/mtp_loss_<d> of 10 steps on fixed text windows of seq_len + 1 + HEADS tokens, from a
    copy of the 1-device initial state or (`fresh`) the initialiser run on this mesh (test_meshes.start)."""
    mtp = {"num_heads": HEADS, "style": style}
    run, layout, model_, tx, schedule, shardings, state = start(mesh, devices, fresh=fresh, mtp=mtp)
    batches = text_batches(run.data.seq_len + HEADS)
    with layout.activate():
        step = jit_train_step(model_, tx, schedule, run, layout, shardings, EOD)
        out = []
        for tokens in batches:
            state, metrics = step(state, global_batch({"tokens": tokens}, layout.batch))
            out.append({k: v for k, v in metrics.items() if "loss" in k})
    out = jax.device_get(out)
    return {k: np.asarray([m[k] for m in out]) for k in out[0]}


MESHES = {
    "2 data x 2 fsdp x 2 tensor": {"data": 2, "fsdp": 2, "tensor": 2},
    "4 sequence x 2 data": {"data": 2, "sequence": 4},
}


def test_mtp_trains_on_meshes_with_the_one_device_losses():
    """The sequential style only: its heads hold every kind of param the parallel ones have (a block per depth) and
    more (a projection and norms per depth), split by the same rules; tests/test_mtp.py checks both styles' math."""
    style = "sequential"
    want = losses({"data": 1}, style, jax.devices()[:1])
    assert set(want) == {"train/loss", "train/mtp_loss", "train/mtp_loss_1", "train/mtp_loss_2"}
    assert want["train/mtp_loss"][-1] < want["train/mtp_loss"][0] - 0.1  # the heads learn
    for name, mesh in MESHES.items():
        # One mesh initialises in place: the sequential heads' params (a block, a projection and norms per depth:
        # every kind the parallel heads have, and more) split as the rules say give the 1-device weights.
        got = losses(mesh, style, fresh=name == FRESH)
        for key in want:
            np.testing.assert_allclose(got[key], want[key], rtol=2e-5, err_msg=f"{name}: {key}")
