"""The Pallas flash attention kernels (model/kernels/flash_attention.py), interpreted on CPU, against the plain-JAX
reference attention: outputs and gradients over every part of the mask (the cases live in tests/kernel_cases.py,
which benchmarks/accelerator.py also runs compiled on a GPU), the blocks they skip, and a model's gradients
with attention_impl='pallas'."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import ModelConfig, Transformer, init_variables
from model.attention import AUTO_ORDER, IMPLEMENTATIONS, choose, cudnn_blocker
from model.kernels import cpu_attention
from model.kernels import flash_attention as flash_lib
from model.kernels.flash_attention import visited_blocks
from model.mask import Mask
from tests.conftest import tiny_run
from tests.kernel_cases import CASES, CUDNN_CASES, Case, check_cudnn, check_flash, cudnn_config
from training.evaluation import Inputs, cross_entropy


@pytest.mark.parametrize("c", CASES, ids=lambda c: c.name)
def test_forward_and_gradients_match_the_reference(c: Case):
    check_flash(c)


@pytest.mark.parametrize("c", CUDNN_CASES, ids=lambda c: c.name)
def test_cudnn_matches_the_reference(c: Case):
    """cuDNN's fused attention, where it runs (an NVIDIA GPU; benchmarks/accelerator.py runs these there)."""
    if (reason := cudnn_blocker(cudnn_config(c))) is not None:
        pytest.skip(reason)
    check_cudnn(c)


def brute_force_visible_blocks(mask: Mask, T: int, S: int, block: int) -> np.ndarray:
    """[B, T / block]: key blocks holding an entry some query of the block may read (NumPy over the full mask)."""
    allowed = np.asarray(mask.allowed())
    B = allowed.shape[0]
    tiles = allowed.reshape(B, T // block, block, S // block, block).any(axis=(2, 4))
    return tiles.sum(-1)


def test_blocks_the_mask_empties_are_not_computed():
    """Causal, documents and a window over 32 tokens in blocks of 8: the kernel computes exactly the key blocks
    with a visible entry (1, 2, 3, 4 for plain causal: 10 of 16) and skips the rest."""
    T, N, D = 32, 2, 8
    q = k = v = jnp.ones((2, T, N, D), jnp.float32)
    pos = np.tile(np.arange(T), (2, 1))
    seg = np.zeros((2, T), np.int32)
    seg[1, 16:] = 1  # row 1: two documents of 16, positions restarting
    pos[1, 16:] -= 16
    docs = Mask.self_attention(jnp.asarray(pos), jnp.asarray(seg), in_order=True)
    window = Mask.self_attention(jnp.asarray(np.tile(np.arange(T), (2, 1))), window=9, in_order=True)
    for mask, want in [(docs, [[1, 2, 3, 4], [1, 2, 1, 2]]), (window, [[1, 2, 2, 2], [1, 2, 2, 2]])]:
        visits = np.asarray(visited_blocks(q, k, v, mask, block_q=8, block_k=8, interpret=True))
        np.testing.assert_array_equal(visits, np.broadcast_to(np.asarray(want)[:, None], visits.shape))
        np.testing.assert_array_equal(visits[:, 0], brute_force_visible_blocks(mask, T, T, 8))


def test_pallas_selected_by_config_and_cudnn_refused_on_cpu_in_one_line(monkeypatch):
    monkeypatch.setattr(cpu_attention, "unavailable_reason", lambda: "not built here")  # (building it takes seconds)
    cfg = ModelConfig(attention_impl="pallas")
    assert choose(cfg, documents=True) is IMPLEMENTATIONS["pallas"]
    assert "pallas" not in AUTO_ORDER["cpu"]  # interpreted on CPUs: never chosen for you
    with pytest.raises(ValueError, match=r"attention_impl='cudnn' cannot run here: backend is cpu .*allowed here:"):
        choose(dataclasses.replace(cfg, attention_impl="cudnn"))
    from parallel.layout import plan
    from parallel.mesh import MeshError

    with pytest.raises(MeshError, match="attention_impl='cudnn' cannot run here: backend is cpu") as e:
        plan(tiny_run(model={"attention_impl": "cudnn"}))
    assert "\n" not in str(e.value)


def test_a_models_loss_and_gradients_with_pallas_attention_equal_xlas():
    """A float32 model (GQA, ALiBi, a soft-cap, documents): the kernels' loss and the gradient of every weight equal
    the reference's jax.grad (gradients themselves, not optimizer steps: Adam's normalised steps hide a gradient that
    is off by a constant factor)."""
    cfg = ModelConfig(
        vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=64, max_seq_len=16,
        position="alibi", attn_logit_softcap=4.0,
    )  # fmt: skip
    tokens = jax.random.randint(jax.random.key(0), (2, 17), 0, 64).at[:, 5].set(0)  # an end of document mid-window
    params = nn.unbox(jax.jit(lambda key: init_variables(Transformer(cfg), key))(jax.random.key(1)))["params"]
    got = {}
    for impl in ("pallas", "xla"):
        model = Transformer(dataclasses.replace(cfg, attention_impl=impl))

        def loss(params, model=model):
            out, targets_BT = Inputs(eod_id=0)(tokens, model, {"params": params})
            return jnp.mean(cross_entropy(out.logits_BTV, targets_BT)[0])

        got[impl] = jax.jit(jax.value_and_grad(loss))(params)
    (loss_pallas, grads_pallas), (loss_xla, grads_xla) = got["pallas"], got["xla"]
    np.testing.assert_allclose(loss_pallas, loss_xla, rtol=1e-6)
    for (path, g), want in zip(jax.tree_util.tree_leaves_with_path(grads_pallas), jax.tree.leaves(grads_xla)):
        scale = float(jnp.abs(want).max())
        np.testing.assert_allclose(g, want, atol=1e-5 * scale, rtol=1e-4, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("remat, saved", [("dots", 4), ("dots_no_batch", 4), ("full", 0)])
def test_remat_policies_save_the_kernels_output_and_lse_instead_of_rerunning_it(remat, saved, capsys):
    """Bar 'full', a rematerialised layer keeps the forward kernel's output and log-sum-exp (2 layers x 2)."""
    cfg = ModelConfig(
        vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=64, max_seq_len=16,
        attention_impl="pallas", scan_layers=False, remat=remat,
    )  # fmt: skip
    tokens = jnp.zeros((2, 16), jnp.int32)
    params = jax.eval_shape(Transformer(cfg).init, jax.random.key(0), tokens)  # tracing needs only shapes
    jax.ad_checkpoint.print_saved_residuals(lambda p: Transformer(cfg).apply(p, tokens).sum(), params)
    assert capsys.readouterr().out.count(f"named '{flash_lib.REMAT_NAME}'") == saved
