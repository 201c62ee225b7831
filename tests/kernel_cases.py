"""The attention kernels' cases against the plain-JAX reference, importable without pytest: the Pallas flash attention
forward and gradients (tests/test_flash_attention.py), the Pallas flash-decoding kernel
(tests/test_decode_attention.py), and cuDNN's fused attention. The tests run them on whatever backend they find
(on CPU the Pallas kernels are interpreted); benchmarks/accelerator.py runs the same cases compiled on a GPU.

Each `check_*` returns None when the kernel agrees with the reference and raises AssertionError when it does not.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from model import ModelConfig
from model.attention import cudnn_attention, cudnn_blocker, reference_attention, reference_decode
from model.cache import KVView
from model.kernels.decode_attention import decode_attention
from model.kernels.flash_attention import flash_attention
from model.mask import Mask
from model.positions import AlibiBias

REFERENCE = ModelConfig(causal_blocks=1)
ON_CPU = jax.default_backend() == "cpu"
BLOCK = 8 if ON_CPU else 16  # compiled (Triton) kernels tile by powers of two >= 16; interpreted ones by anything
TOL_F32 = 2e-5 if ON_CPU else 2e-3  # GPUs multiply float32 in TF32 by default
TOL_16 = 3e-2  # bfloat16 and float16 inputs


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
    default_blocks: bool = False  # the kernels' own blocks (training's), not BLOCK


CASES = [
    Case("gqa2-window-softcap-dv", T=13, window=5, softcap=2.0, Dv=8),
    Case("gqa4-documents-alibi", B=2, T=19, N=8, K=2, D=8, documents=True, alibi=True),
    Case("mqa8-padding-alibi-softcap", T=12, S=17, N=8, K=1, padding=True, alibi=True, softcap=3.0),
    Case("mha-not-causal-bf16", T=5, S=19, N=2, K=2, D=12, causal=False, dtype="bfloat16"),
    Case("gqa4-causal-bf16-default-blocks", B=1, T=300, N=8, K=2, D=64, dtype="bfloat16", default_blocks=True),
]
# cuDNN's cases: what it runs (bfloat16, causal over the tokens in order, with or without a window), GQA.
CUDNN_CASES = [
    Case("causal-gqa4-d64-bf16", B=2, T=128, N=8, K=2, D=64, dtype="bfloat16"),
    Case("window-gqa2-d128-bf16", B=1, T=96, N=4, K=2, D=128, window=32, dtype="bfloat16"),
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


def _against_reference(c: Case, ours: Callable, theirs: Callable, q, k, v, mask: Mask, w) -> None:
    """ours(q, k, v) in the case's dtype against theirs(q, k, v) in float32 on the same (rounded) inputs: outputs
    and the gradients of sum(w * out) in q, k and v; zeros for a query that sees no key."""

    def loss(f):
        return lambda q, k, v: (jnp.sum(w * f(q, k, v).astype(jnp.float32)), f(q, k, v))

    (_, out), grads = jax.jit(jax.value_and_grad(loss(ours), (0, 1, 2), has_aux=True))(q, k, v)
    up = [x.astype(jnp.float32) for x in (q, k, v)]
    (_, want), want_grads = jax.jit(jax.value_and_grad(loss(theirs), (0, 1, 2), has_aux=True))(*up)

    sees = np.asarray(mask.allowed()).any(-1)[:, :, None, None]
    tol = TOL_F32 if c.dtype == "float32" else TOL_16
    np.testing.assert_allclose(np.where(sees, out.astype(jnp.float32), 0), np.where(sees, want, 0), atol=tol, rtol=tol)
    assert not np.asarray(out)[~np.broadcast_to(sees, out.shape)].any()  # a query that sees nothing gets zeros
    for name, got, ref in zip("qkv", grads, want_grads):
        assert got.dtype == jnp.dtype(c.dtype), name
        scale = float(jnp.abs(ref).max())
        np.testing.assert_allclose(got.astype(jnp.float32), ref, atol=tol * max(1.0, scale), rtol=tol)


def check_flash(c: Case) -> None:
    """The Pallas flash attention kernels (forward, and the dq and dk/dv kernels) against the reference."""
    q, k, v, mask, w = problem(c)
    bias_fn = AlibiBias(c.N) if c.alibi else None
    slopes = jnp.asarray(bias_fn.slopes) if c.alibi else None

    blocks = {} if c.default_blocks else dict(block_q=BLOCK, block_k=BLOCK)

    def ours(q, k, v):
        return flash_attention(q, k, v, mask, softcap=c.softcap, alibi_slopes=slopes, **blocks)

    def theirs(q, k, v):
        return reference_attention(REFERENCE, q, k, v, mask, bias_fn=bias_fn, softcap=c.softcap)

    _against_reference(c, ours, theirs, q, k, v, mask, w)


def cudnn_config(c: Case) -> ModelConfig:
    return ModelConfig(num_heads=c.N, num_kv_heads=c.K, head_dim=c.D, d_model=c.N * c.D, dtype=c.dtype)


def check_cudnn(c: Case) -> None:
    """model.attention's cuDNN path (jax.nn.dot_product_attention, implementation='cudnn') against the reference;
    only where `cudnn_blocker` lets it run (an NVIDIA GPU)."""
    q, k, v, mask, w = problem(c)
    cfg = cudnn_config(c)
    _against_reference(
        c,
        lambda q, k, v: cudnn_attention(cfg, q, k, v, mask),
        lambda q, k, v: reference_attention(REFERENCE, q, k, v, mask),
        q,
        k,
        v,
        mask,
        w,
    )


@dataclasses.dataclass(frozen=True)
class DecodeCase:
    """B rows of T new queries (N heads) over a decode cache of S slots (K heads of H), row b holding lengths[b]
    tokens; `rolling`: the slots hold the positions shuffled, as a rolling buffer does after wrapping."""

    name: str
    B: int
    T: int
    N: int
    K: int
    window: int = 0
    rolling: bool = False
    alibi: bool = False
    softcap: float = 0.0
    H: int = 16
    S: int = 37
    lengths: tuple[int, ...] = (5, 37, 20)
    num_splits: int = 3
    dtype: str = "float32"
    default_blocks: bool = False  # the kernel's own block_k and num_splits (decoding's), not BLOCK and num_splits


DECODE_CASES = [
    DecodeCase("one-token-gqa4-alibi", B=3, T=1, N=8, K=2, alibi=True),
    # speculative verification (3 queries), MHA, a rolling window, a soft-cap
    DecodeCase("three-queries-mha-rolling-window-softcap", B=2, T=3, N=4, K=4, window=6, rolling=True, softcap=3.0),
    DecodeCase("two-queries-mqa8", B=3, T=2, N=8, K=1),
    DecodeCase("one-token-gqa2-bf16", B=2, T=1, N=4, K=2, S=30, lengths=(30, 9), num_splits=2, dtype="bfloat16"),
    DecodeCase(
        "one-token-gqa4-bf16-default-blocks",
        B=2,
        T=1,
        N=8,
        K=2,
        H=64,
        S=300,
        lengths=(300, 130),
        dtype="bfloat16",
        default_blocks=True,
    ),
]


def cache_problem(B, T, N, K, H, S, lengths, rolling=False, seed=0, dtype=jnp.float32):
    """q [B, T, N, H] and a cache [B, K, S, H] whose row b holds lengths[b] tokens (positions 0.., empty slots -1);
    the T queries are each row's last T tokens. `rolling`: the slots hold the positions shuffled, as a rolling
    buffer does after wrapping."""
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(B, T, N, H)), dtype)
    k = jnp.asarray(rng.normal(size=(B, K, S, H)), dtype)
    v = jnp.asarray(rng.normal(size=(B, K, S, H)), dtype)
    kpos = np.where(np.arange(S)[None] < np.asarray(lengths)[:, None], np.arange(S)[None], -1)
    if rolling:
        kpos = np.stack([rng.permutation(row) for row in kpos])
    qpos = np.asarray(lengths)[:, None] - T + np.arange(T)[None]
    return q, k, v, (jnp.asarray(qpos), jnp.asarray(kpos))


def check_decode(c: DecodeCase) -> None:
    """The Pallas flash-decoding kernel against the reference decode (in float32 on the same rounded inputs)."""
    lengths = c.lengths[: c.B]
    q, k, v, (qpos, kpos) = cache_problem(c.B, c.T, c.N, c.K, c.H, c.S, lengths, c.rolling, dtype=jnp.dtype(c.dtype))
    mask = Mask(qpos, kpos, window=c.window)
    bias_fn = AlibiBias(c.N) if c.alibi else None
    slopes = jnp.asarray(bias_fn.slopes) if c.alibi else None
    blocks = {} if c.default_blocks else dict(block_k=BLOCK, num_splits=c.num_splits)
    kernel = jax.jit(lambda *a: decode_attention(*a, mask, softcap=c.softcap, alibi_slopes=slopes, **blocks))
    got = kernel(q, k, v)
    assert got.dtype == jnp.dtype(c.dtype)
    up = [x.astype(jnp.float32) for x in (q, k, v)]
    reference = lambda q, k, v: reference_decode(REFERENCE, q, KVView(k, v, mask), bias_fn=bias_fn, softcap=c.softcap)  # noqa: E731
    want = jax.jit(reference)(*up)
    tol = TOL_F32 if c.dtype == "float32" else 2e-2
    np.testing.assert_allclose(got.astype(jnp.float32), want, atol=tol, rtol=tol)


@dataclasses.dataclass(frozen=True)
class Check:
    """One named case: `run()` raises AssertionError when the kernel disagrees with the reference; `blocker()` says
    why it cannot run here (None: it can)."""

    name: str
    run: Callable[[], None]
    blocker: Callable[[], str | None] = lambda: None


def all_checks() -> list[Check]:
    """Every case above, named 'flash/<case>', 'decode/<case>' or 'cudnn/<case>'."""
    return (
        [Check(f"flash/{c.name}", lambda c=c: check_flash(c)) for c in CASES]
        + [Check(f"decode/{c.name}", lambda c=c: check_decode(c)) for c in DECODE_CASES]
        + [
            Check(f"cudnn/{c.name}", lambda c=c: check_cudnn(c), lambda c=c: cudnn_blocker(cudnn_config(c)))
            for c in CUDNN_CASES
        ]
    )
