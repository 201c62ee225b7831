"""The Pallas flash attention kernels (model/kernels/flash_attention.py), interpreted on CPU, against the plain-JAX
reference attention: outputs and gradients over every part of the mask, the blocks they skip, and a model's
gradients with attention_impl='pallas'."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import ModelConfig, Transformer, init_variables
from model.attention import AUTO_ORDER, IMPLEMENTATIONS, choose, reference_attention
from model.kernels import cpu_attention
from model.kernels import flash_attention as flash_lib
from model.kernels.flash_attention import flash_attention, visited_blocks
from model.mask import Mask
from model.positions import AlibiBias
from tests.conftest import tiny_run
from training.config import ConfigError
from training.evaluation import Inputs, cross_entropy

REFERENCE = ModelConfig(causal_blocks=1)
ON_CPU = jax.default_backend() == "cpu"
BLOCK = 8 if ON_CPU else 16  # compiled (Triton) kernels tile by powers of two >= 16; interpreted ones by anything
TOL_F32 = 2e-5 if ON_CPU else 2e-3  # GPUs multiply float32 in TF32 by default


@dataclasses.dataclass(frozen=True)
class Case:
    """One attention problem: B rows of T queries over S keys, N query heads over K K/V heads."""

    name: str
    B: int = 2
    T: int = 13
    S: int | None = None  # None: self-attention (S = T, same tokens in order)
    N: int = 4
    K: int = 2
    D: int = 16
    Dv: int | None = None
    window: int = 0
    documents: bool = False
    alibi: bool = False
    softcap: float = 0.0
    causal: bool = True  # False: every query sees every (real) key
    padding: bool = False  # ragged rows: trailing keys and queries with position -1
    dtype: str = "float32"


CASES = [
    Case("gqa2-window-softcap-dv", T=13, window=5, softcap=2.0, Dv=8),
    Case("gqa4-documents-alibi", B=2, T=19, N=8, K=2, D=8, documents=True, alibi=True),
    Case("mqa8-padding-alibi-softcap", T=12, S=17, N=8, K=1, padding=True, alibi=True, softcap=3.0),
    Case("mha-not-causal-bf16", T=5, S=19, N=2, K=2, D=12, causal=False, dtype="bfloat16"),
]


def random_documents(rng, B, T):
    seg = np.zeros((B, T), np.int32)
    for b in range(B):
        for cut in np.sort(rng.choice(np.arange(1, T), size=2, replace=False)):
            seg[b, cut:] += 1
    starts = np.array([[np.argmax(seg[b] == seg[b, t]) for t in range(T)] for b in range(B)])
    return seg, (np.arange(T) - starts).astype(np.int32)


def problem(c: Case, seed: int = 0):
    """(q, k, v, mask, weights of the output rows that see a key) for a case."""
    rng = np.random.default_rng(seed)
    S = c.T if c.S is None else c.S
    dt = jnp.dtype(c.dtype)
    q = jnp.asarray(rng.normal(size=(c.B, c.T, c.N, c.D)), dt)
    k = jnp.asarray(rng.normal(size=(c.B, S, c.K, c.D)), dt)
    v = jnp.asarray(rng.normal(size=(c.B, S, c.K, c.Dv or c.D)), dt)
    if c.S is None:
        seg, pos = random_documents(rng, c.B, c.T) if c.documents else (None, np.tile(np.arange(c.T), (c.B, 1)))
        mask = Mask.self_attention(jnp.asarray(pos), None if seg is None else jnp.asarray(seg), window=c.window)
        mask = mask.replace(in_order=True)
    else:  # the queries are the last T of S tokens (or, not causal, after all of them)
        kpos = np.tile(np.arange(S), (c.B, 1))
        qpos = np.tile(np.arange(S - c.T, S) + (0 if c.causal else S), (c.B, 1))
        if c.padding:
            kpos[0, S - 4 :] = -1
            qpos[1, :3] = -1
        mask = Mask(jnp.asarray(qpos), jnp.asarray(kpos), window=c.window)
    sees_BT = np.asarray(mask.allowed()).any(-1)
    w = rng.normal(size=(c.B, c.T, c.N, c.Dv or c.D)) * sees_BT[:, :, None, None]
    return q, k, v, mask, jnp.asarray(w, jnp.float32)


@pytest.mark.parametrize("c", CASES, ids=lambda c: c.name)
def test_forward_and_gradients_match_the_reference(c: Case):
    q, k, v, mask, w = problem(c)
    bias_fn = AlibiBias(c.N) if c.alibi else None
    slopes = jnp.asarray(bias_fn.slopes) if c.alibi else None

    def loss(f):
        return lambda q, k, v: (jnp.sum(w * f(q, k, v).astype(jnp.float32)), f(q, k, v))

    ours = lambda q, k, v: flash_attention(  # noqa: E731
        q, k, v, mask, softcap=c.softcap, alibi_slopes=slopes, block_q=BLOCK, block_k=BLOCK
    )
    theirs = lambda q, k, v: reference_attention(REFERENCE, q, k, v, mask, bias_fn=bias_fn, softcap=c.softcap)  # noqa: E731
    (_, out), grads = jax.jit(jax.value_and_grad(loss(ours), (0, 1, 2), has_aux=True))(q, k, v)
    up = [x.astype(jnp.float32) for x in (q, k, v)]  # the reference in float32 on the same (rounded) inputs
    (_, want), want_grads = jax.jit(jax.value_and_grad(loss(theirs), (0, 1, 2), has_aux=True))(*up)

    sees = np.asarray(mask.allowed()).any(-1)[:, :, None, None]
    tol = dict(atol=TOL_F32, rtol=TOL_F32) if c.dtype == "float32" else dict(atol=3e-2, rtol=3e-2)
    np.testing.assert_allclose(np.where(sees, out.astype(jnp.float32), 0), np.where(sees, want, 0), **tol)
    assert not np.asarray(out)[~np.broadcast_to(sees, out.shape)].any()  # a query that sees nothing gets zeros
    for name, got, ref in zip("qkv", grads, want_grads):
        assert got.dtype == jnp.dtype(c.dtype), name
        scale = float(jnp.abs(ref).max())
        np.testing.assert_allclose(got.astype(jnp.float32), ref, atol=tol["atol"] * max(1.0, scale), rtol=tol["rtol"])


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
    assert "pallas" not in AUTO_ORDER  # interpreted on CPUs: never chosen for you
    with pytest.raises(ValueError, match=r"attention_impl='cudnn' cannot run here: backend is cpu .*allowed here:"):
        choose(dataclasses.replace(cfg, attention_impl="cudnn"))
    from training.layout import plan

    with pytest.raises(ConfigError, match="attention_impl='cudnn' cannot run here: backend is cpu") as e:
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
