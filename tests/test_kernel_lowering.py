"""The Pallas attention kernels lower for GPUs (Pallas' Triton lowering) and TPUs (Mosaic), checked on CPU with
jax.export: forward, gradients (the dq and dk/dv kernels through the custom_vjp), flash-decoding and its paged form,
over GQA and MQA, causal attention with a sliding window, document ids, ALiBi, a soft-cap, Dv != D, lengths that are not
multiples of the blocks, bfloat16 and float32. Export runs Pallas' lowering to the Triton / Mosaic custom call
(with jaxlib 0.10.2 it stops at the Triton IR; later jaxlibs run Triton's compiler during the lowering, to
`triton_kernel_call_ffi`). Where libtpu is installed, XLA's TPU compiler also compiles them for a compile-only TPU
(Mosaic's own compiler: the strongest check short of a TPU). The TPU-shaped kernels (128-blocks, head dims padded
to 128, SMEM scalars) are also interpreted against the reference, so what Mosaic is handed computes the right
thing."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from model import ModelConfig
from model.attention import IMPLEMENTATIONS, pallas_blocker, reference_attention, reference_decode
from model.cache import KVView
from model.kernels import flash_attention as flash_lib
from model.kernels.decode_attention import decode_attention
from model.kernels.flash_attention import flash_attention, target
from model.kernels.paged_attention import paged_decode_attention
from model.mask import Mask

# The custom calls each lowering ends in (Triton's: jaxlib <= 0.10.2, later).
REPO = pathlib.Path(__file__).resolve().parents[1]
CUSTOM_CALLS = {"cuda": ("__gpu$xla.gpu.triton", "triton_kernel_call_ffi"), "tpu": ("tpu_custom_call",)}


def kernel_calls(f, platform: str, *args) -> int:
    """How many Pallas kernels jit(f) exported for `platform` calls (its kernels' custom calls allowed)."""
    checks = [export.DisabledSafetyCheck.custom_call(name) for name in CUSTOM_CALLS[platform]]
    text = export.export(jax.jit(f), platforms=[platform], disabled_checks=checks)(*args).mlir_module()
    return sum(
        text.count(f"custom_call @{name}(") + text.count(f'custom_call @"{name}"(') for name in CUSTOM_CALLS[platform]
    )


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    T: int = 200
    S: int | None = None  # None: self-attention over the same T tokens in order
    N: int = 4
    K: int = 2
    D: int = 64
    Dv: int = 64
    window: int = 0
    documents: bool = False
    alibi: bool = False
    softcap: float = 0.0
    dtype: str = "bfloat16"


EVERYTHING = dict(K=1, Dv=32, window=100, documents=True, alibi=True, softcap=5.0, dtype="float32")
CASES = [
    Case("causal-gqa2-bf16"),  # T = 200: no multiple of the blocks
    Case("mqa-window-documents-alibi-softcap-dv-f32", T=256, **EVERYTHING),
    Case("cross-padded-gqa2-f32", T=72, S=300, dtype="float32"),  # queries after 300 keys, the last 7 padding
]


def mask_of(c: Case, B: int = 1) -> Mask:
    if c.S is None:
        pos = np.tile(np.arange(c.T), (B, 1))
        seg = None
        if c.documents:
            seg = (np.arange(c.T) >= c.T // 3).astype(np.int32)[None].repeat(B, 0)
            pos = np.where(seg == 1, pos - c.T // 3, pos)
        return Mask.self_attention(jnp.asarray(pos), None if seg is None else jnp.asarray(seg), window=c.window,
                                   in_order=True)  # fmt: skip
    kpos = np.where(np.arange(c.S) < c.S - 7, np.arange(c.S), -1)[None].repeat(B, 0)  # the last 7 keys padding
    return Mask(jnp.asarray(np.arange(c.S - c.T, c.S)[None].repeat(B, 0)), jnp.asarray(kpos), window=c.window)


def attention_fn(c: Case, platform: str, interpret: bool | None = None):
    slopes = jnp.linspace(0.05, 0.5, c.N) if c.alibi else None
    return lambda q, k, v: flash_attention(
        q, k, v, mask_of(c, q.shape[0]), softcap=c.softcap, alibi_slopes=slopes, platform=platform, interpret=interpret
    )


def shapes(c: Case, B: int = 1):
    S, dt = c.T if c.S is None else c.S, jnp.dtype(c.dtype)
    return (jax.ShapeDtypeStruct((B, c.T, c.N, c.D), dt), jax.ShapeDtypeStruct((B, S, c.K, c.D), dt),
            jax.ShapeDtypeStruct((B, S, c.K, c.Dv), dt))  # fmt: skip


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("c", CASES, ids=lambda c: c.name)
def test_forward_and_gradients_lower_to_the_platforms_kernels(c: Case, platform: str):
    f = attention_fn(c, platform)
    assert kernel_calls(f, platform, *shapes(c)) == 1  # the forward kernel
    grads = jax.grad(lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32)), (0, 1, 2))
    assert kernel_calls(grads, platform, *shapes(c)) == 3  # forward, dq, dk/dv


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize(
    "T, N, K, window, alibi, softcap, dtype",
    [(1, 4, 2, 64, True, 3.0, "bfloat16"), (3, 4, 1, 0, False, 0.0, "float32")],  # sampling; verifying 3 drafts
    ids=["gqa2-window-alibi-softcap-bf16", "mqa-3-queries-f32"],
)
def test_decode_lowers_to_the_platforms_kernel(T, N, K, window, alibi, softcap, dtype, platform):
    B, S, H = 2, 300, 64  # a cache that is no multiple of the key block
    lengths = np.array([[100], [300]])
    kpos = jnp.asarray(np.where(np.arange(S)[None] < lengths, np.arange(S)[None], -1))
    mask = Mask(jnp.asarray(lengths - T + np.arange(T)[None]), kpos, window=window)
    slopes = jnp.linspace(0.05, 0.5, N) if alibi else None
    q = jax.ShapeDtypeStruct((B, T, N, H), jnp.dtype(dtype))
    kv = jax.ShapeDtypeStruct((B, K, S, H), jnp.dtype(dtype))
    f = lambda q, k, v: decode_attention(q, k, v, mask, softcap=softcap, alibi_slopes=slopes, platform=platform)  # noqa: E731
    assert kernel_calls(f, platform, q, kv, kv) == 1


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize(
    "T, K, H, Hv, window, alibi, softcap, dtype",
    [(1, 2, 64, 64, 64, True, 3.0, "bfloat16"), (8, 1, 96, 32, 0, False, 0.0, "float32")],  # sampling; a chunk
    ids=["gqa2-window-alibi-softcap-bf16", "mqa-chunk-of-8-dv-f32"],
)
def test_paged_decode_lowers_to_the_platforms_kernel(T, K, H, Hv, window, alibi, softcap, dtype, platform):
    B, N, P, ps, n = 2, 4, 40, 16, 19  # tables of 19 pages: no multiple of the splits
    lengths = np.array([[100], [300]])
    kpos = jnp.asarray(np.where(np.arange(n * ps)[None] < lengths, np.arange(n * ps)[None], -1))
    mask = Mask(jnp.asarray(lengths - T + np.arange(T)[None]), kpos, window=window)
    slopes = jnp.linspace(0.05, 0.5, N) if alibi else None
    q = jax.ShapeDtypeStruct((B, T, N, H), jnp.dtype(dtype))
    k = jax.ShapeDtypeStruct((P, K, ps, H), jnp.dtype(dtype))
    v = jax.ShapeDtypeStruct((P, K, ps, Hv), jnp.dtype(dtype))
    table = jax.ShapeDtypeStruct((B, n), jnp.int32)
    kw = dict(softcap=softcap, alibi_slopes=slopes, platform=platform)
    f = lambda q, k, v, t: paged_decode_attention(q, k, v, t, mask, **kw)  # noqa: E731
    assert kernel_calls(f, platform, q, k, v, table) == 1


def test_the_kernels_tpu_shapes_interpreted_match_the_reference():
    """What Mosaic is handed (blocks of 128, head dims padded to 128, rows turned into columns through 128-lane
    transposes, SMEM scalars), interpreted on CPU: the reference's outputs and gradients, and its decode."""
    c = CASES[1]
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=s.shape), jnp.float32) for s in shapes(c))
    ours, mask = attention_fn(c, "tpu", interpret=True), mask_of(c)

    def bias_fn(qpos_BT, kpos_BS):  # the slopes of attention_fn, as the reference's [B, N, T, S] bias
        return -jnp.linspace(0.05, 0.5, c.N)[None, :, None, None] * (qpos_BT[:, None, :, None] - kpos_BS[:, None, None])

    theirs = lambda q, k, v: reference_attention(  # noqa: E731
        ModelConfig(causal_blocks=1), q, k, v, mask, bias_fn=bias_fn, softcap=c.softcap
    )
    w = jnp.asarray(rng.normal(size=(1, c.T, c.N, c.Dv)), jnp.float32)
    loss = lambda f: lambda q, k, v: jnp.sum(w * f(q, k, v))  # noqa: E731
    got, want = (jax.jit(jax.value_and_grad(loss(f), (0, 1, 2)))(q, k, v) for f in (ours, theirs))
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for a, b in zip(got[1], want[1]):
        np.testing.assert_allclose(a, b, atol=2e-5 * float(jnp.abs(b).max()), rtol=2e-5)

    lengths = np.array([[40], [130]])
    kpos = jnp.asarray(np.where(np.arange(150)[None] < lengths, np.arange(150)[None], -1))
    dmask = Mask(jnp.asarray(lengths - 1), kpos, window=64)
    qd = jnp.asarray(rng.normal(size=(2, 1, 4, 64)), jnp.float32)
    kd, vd = (jnp.asarray(rng.normal(size=(2, 2, 150, 64)), jnp.float32) for _ in range(2))
    got = jax.jit(lambda *a: decode_attention(*a, dmask, softcap=3.0, platform="tpu", interpret=True))(qd, kd, vd)
    want = reference_decode(ModelConfig(), qd, KVView(kd, vd, dmask), softcap=3.0)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


def test_the_target_follows_the_platform_and_refuses_blocks_it_cannot_tile():
    assert target() == flash_lib.Target("cpu", interpret=True)  # this machine: interpreted
    assert target("cuda") == target("gpu") == flash_lib.Target("gpu", interpret=False)
    from jax.experimental.pallas import tpu as pltpu
    from jax.experimental.pallas import triton as plgpu

    assert isinstance(target("gpu").compiler_params(64, 3), plgpu.CompilerParams)
    assert isinstance(target("tpu").compiler_params(64, 3), pltpu.CompilerParams)
    q = jnp.zeros((1, 256, 4, 64), jnp.bfloat16)
    k = jnp.zeros((1, 256, 2, 64), jnp.bfloat16)
    mask = Mask.self_attention(jnp.arange(256)[None], in_order=True)
    with pytest.raises(ValueError, match=r"^block_k=64: must be a multiple of 128 \(Mosaic, TPU\)$"):
        flash_attention(q, k, k, mask, block_k=64, platform="tpu")  # before anything is traced
    with pytest.raises(ValueError, match=r"^block_q=48: must be a power of two >= 16 \(Triton, GPU\)$"):
        flash_attention(q, k, k, mask, block_q=48, platform="gpu")
    with pytest.raises(ValueError, match=r"^platform='metal': one of"):
        target("metal")


def test_pallas_is_allowed_on_a_tpu_and_refused_in_one_line_where_its_blocks_outgrow_vmem(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    cfg = ModelConfig(attention_impl="pallas", max_seq_len=2048)
    assert IMPLEMENTATIONS["pallas"].blocker is pallas_blocker
    assert pallas_blocker(cfg) is None
    reason = pallas_blocker(dataclasses.replace(cfg, max_seq_len=65536))
    assert reason.startswith("model.max_seq_len=65536: ") and "VMEM" in reason and "\n" not in reason


TPU_COMPILE = """
import jax, jax.numpy as jnp
from jax.experimental import topologies
from model.kernels import flash_attention as flash_lib
from model.kernels.decode_attention import decode_attention
from model.kernels.paged_attention import paged_decode_attention
from model.mask import Mask
from tests.test_kernel_lowering import CASES, attention_fn, shapes

device = topologies.get_topology_desc("v5e:2x2", "tpu").devices[0]  # compile-only: no TPU attached
sharding = jax.sharding.SingleDeviceSharding(device)
on_tpu = lambda *structs: [jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding) for s in structs]
for c in CASES:
    f = attention_fn(c, "tpu")
    grads = jax.grad(lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32)), (0, 1, 2))
    jax.jit(grads).lower(*on_tpu(*shapes(c))).compile()
kpos = jnp.where(jnp.arange(300)[None] < jnp.array([[100], [300]]), jnp.arange(300)[None], -1)
mask = Mask(jnp.array([[99], [299]]), kpos, window=64)
dec = lambda q, k, v: decode_attention(q, k, v, mask, softcap=3.0, alibi_slopes=jnp.ones(4), platform="tpu")
q, kv = jax.ShapeDtypeStruct((2, 1, 4, 64), jnp.bfloat16), jax.ShapeDtypeStruct((2, 2, 300, 64), jnp.bfloat16)
jax.jit(dec).lower(*on_tpu(q, kv, kv)).compile()
for T, dtype in ((1, jnp.bfloat16), (8, jnp.float32)):  # paged: 19 pages of 16 slots, a page per grid step
    kpos = jnp.where(jnp.arange(304)[None] < jnp.array([[100], [300]]), jnp.arange(304)[None], -1)
    mask = Mask(jnp.array([[100], [300]]) - T + jnp.arange(T)[None], kpos, window=64)
    paged = lambda q, k, v, t: paged_decode_attention(q, k, v, t, mask, softcap=3.0, alibi_slopes=jnp.ones(4),
                                                      platform="tpu")
    q, pool = jax.ShapeDtypeStruct((2, T, 4, 64), dtype), jax.ShapeDtypeStruct((40, 2, 16, 64), dtype)
    jax.jit(paged).lower(*on_tpu(q, pool, pool, jax.ShapeDtypeStruct((2, 19), jnp.int32))).compile()
for T, fits in ((4096, True), (8192, False)):  # the blocker's estimate against Mosaic's own VMEM check
    est = flash_lib.mosaic_vmem_bytes(T, 2, 128, 128, 2)
    assert (est <= flash_lib.VMEM_BUDGET) == fits, (T, est)
    mask = Mask.self_attention(jnp.arange(T)[None], in_order=True)
    attend = lambda q, k, v: flash_lib.flash_attention(q, k, v, mask, platform="tpu")
    g = jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32)), (0, 1, 2))
    structs = [jax.ShapeDtypeStruct((1, T, n, 128), jnp.bfloat16) for n in (4, 2, 2)]
    try:
        jax.jit(g).lower(*on_tpu(*structs)).compile()
        compiled = True
    except Exception as e:
        assert "vmem" in str(e).lower(), e
        compiled = False
    assert compiled == fits, T
print("compiled for TPU v5e")
"""


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu (jax[tpu]) is not installed here")
def test_the_kernels_compile_for_a_tpu_without_one():
    """With libtpu installed, XLA's TPU compiler runs on a CPU-only machine for a compile-only TPU topology: Mosaic
    itself compiles the kernels (gradients over the cases above, decode, paged decode), and a head's sequence just over the
    blocker's VMEM budget fails Mosaic's VMEM check where one under it compiles."""
    env = {
        **os.environ,
        "TPU_SKIP_MDS_QUERY": "1",
        "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",  # a pytest process that found libtpu may hold its lockfile
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    run = subprocess.run([sys.executable, "-c", TPU_COMPILE], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "compiled for TPU v5e" in run.stdout, run.stderr[-3000:]
