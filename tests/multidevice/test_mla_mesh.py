"""Multi-head Latent Attention trains on 8 (fake) devices as on one: data, FSDP and tensor (its heads split as GQA's are, the
shared latent and rope key whole on every device) and ring attention over the sequence (keys [nope | rope] and
values of another width), against the 1-device losses and gradient norms (tests/multidevice/test_meshes.py)."""

from __future__ import annotations

import jax
import pytest

from tests.multidevice.test_meshes import FRESH, assert_same_run, losses

MLA = {
    "attention": "mla",
    "mla": {"q_lora_rank": 16, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 6},
}
MESHES = {
    "2 data x 2 fsdp x 2 tensor": {"data": 2, "fsdp": 2, "tensor": 2},
    "4 sequence x 2 data": {"data": 2, "sequence": 4},
}


@pytest.fixture(scope="module")
def one_device():
    return losses({"data": 1}, jax.devices()[:1], **MLA)


@pytest.mark.parametrize("name", MESHES)
def test_mla_on_a_mesh_gives_one_device_losses_and_gradient_norms(name, one_device):
    assert_same_run(losses(MESHES[name], fresh=name == FRESH, **MLA), one_device)
