"""Attention implementations: one math, several ways to compute it, chosen by `model.attention_impl`.

Every implementation computes

    softmax(softcap(scale * q k^T) + bias, masked by a `Mask`) v

with q [B, T, N, D], k [B, S, K, D], v [B, S, K, Dv]: query head n reads K/V head n // (N / K) (MHA, GQA and MQA
are one code path, and K/V are never repeated in memory). `IMPLEMENTATIONS` maps a name to an `Implementation`:
a function saying why it cannot run a config here (or None) and the attention itself. The plain-JAX reference
('xla') always runs; 'pallas' runs the Pallas kernels (model/kernels: flash attention for training, flash-decoding
for the decode cache), lowered through Pallas' Triton lowering on GPUs and through Mosaic on TPUs, interpreted on
CPUs (how the tests check them against the reference; tests/test_kernel_lowering.py exports both lowerings on CPU
and, with libtpu installed, compiles the TPU one; they have never run on a GPU or TPU here), 'cudnn' cuDNN's fused
attention; 'auto' takes the first of the platform's `AUTO_ORDER` that can. Ring attention (parallel/ring.py) is an
`Implementation` too, built where the mesh is known and handed to the model; there too a `per_device`
implementation (a kernel XLA cannot split) is wrapped to run on each device's shard.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from model.cache import KVView
from model.kernels import cpu_attention, decode_attention, flash_attention, paged_attention
from model.mask import Mask
from model.positions import POSITIONS, AlibiBias

if TYPE_CHECKING:  # model.config imports the kinds (model/kinds.py), which build on this module
    from model.config import ModelConfig

NEG_INF = -1e30

# (q_positions_BT, k_positions_BS) -> additive bias [B, N, T, S], e.g. `model.positions.AlibiBias(N)`.
BiasFn = Callable[[jax.Array, jax.Array], jax.Array]


def _logits(q_BKMH, k_BKSH, bias_BKMS, softcap: float):
    logits_BKMS = jnp.einsum("bkmh,bksh->bkms", q_BKMH, k_BKSH, preferred_element_type=jnp.float32)
    if softcap > 0:
        logits_BKMS = softcap * jnp.tanh(logits_BKMS / softcap)
    return logits_BKMS + bias_BKMS


def _probs(q_BKMH, k_BKSH, mask_BMS, bias_BKMS, softcap):
    logits_BKMS = _logits(q_BKMH, k_BKSH, bias_BKMS, softcap)
    return jax.nn.softmax(jnp.where(mask_BMS[:, None], logits_BKMS, NEG_INF), axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention_core(q_BKMH, k_BKSH, v_BKSH, mask_BMS, bias_BKMS, softcap):
    """softmax(softcap(q k^T) + bias, masked) v per K/V head; M = group_size * T query rows per K/V head.

    `mask`, `bias` and `softcap` are constants (no gradient). The backward pass is the textbook one (dS = P * (dP -
    rowsum(dP * P)), times softcap's tanh' when capped), written out because XLA:CPU runs it more than twice as fast
    as autodiff's version of the same math.
    """
    probs_BKMS = _probs(q_BKMH, k_BKSH, mask_BMS, bias_BKMS, softcap)
    return jnp.einsum("bkms,bksh->bkmh", probs_BKMS.astype(v_BKSH.dtype), v_BKSH)


def _attention_core_fwd(q_BKMH, k_BKSH, v_BKSH, mask_BMS, bias_BKMS, softcap):
    probs_BKMS = _probs(q_BKMH, k_BKSH, mask_BMS, bias_BKMS, softcap)
    out_BKMH = jnp.einsum("bkms,bksh->bkmh", probs_BKMS.astype(v_BKSH.dtype), v_BKSH)
    return out_BKMH, (q_BKMH, k_BKSH, v_BKSH, probs_BKMS)


def _attention_core_bwd(softcap, residuals, dout_BKMH):
    q_BKMH, k_BKSH, v_BKSH, probs_BKMS = residuals
    dv_BKSH = jnp.einsum("bkms,bkmh->bksh", probs_BKMS.astype(dout_BKMH.dtype), dout_BKMH)
    dprobs_BKMS = jnp.einsum("bkmh,bksh->bkms", dout_BKMH, v_BKSH, preferred_element_type=jnp.float32)
    dlogits_BKMS = probs_BKMS * (dprobs_BKMS - jnp.sum(dprobs_BKMS * probs_BKMS, axis=-1, keepdims=True))
    if softcap > 0:  # d/dx [c tanh(x / c)] = 1 - tanh(x / c)^2, recomputed rather than kept
        raw_BKMS = jnp.einsum("bkmh,bksh->bkms", q_BKMH, k_BKSH, preferred_element_type=jnp.float32)
        dlogits_BKMS = dlogits_BKMS * (1 - jnp.square(jnp.tanh(raw_BKMS / softcap)))
    dlogits_BKMS = dlogits_BKMS.astype(q_BKMH.dtype)
    dq_BKMH = jnp.einsum("bkms,bksh->bkmh", dlogits_BKMS, k_BKSH)
    dk_BKSH = jnp.einsum("bkms,bkmh->bksh", dlogits_BKMS, q_BKMH)
    return dq_BKMH, dk_BKSH, dv_BKSH, None, None


_attention_core.defvjp(_attention_core_fwd, _attention_core_bwd)


def attend_kv_major(
    q_BTNH: jax.Array,
    k_BKSH: jax.Array,
    v_BKSH: jax.Array,
    mask_BTS: jax.Array,
    bias_BNTS: jax.Array | None = None,
    *,
    softcap: float = 0.0,
    scale: float | None = None,
) -> jax.Array:
    """The reference math with keys and values laid out [B, K, S, H] (as the decode cache keeps them) and an
    explicit [B, T, S] boolean mask; logits and softmax in float32.

    The G = N / K query heads sharing a K/V head are stacked along the row axis, so each K/V head
    is one [G*T, H] x [H, S] product and K/V are never repeated.
    """
    B, T, N, H = q_BTNH.shape
    K, S, Hv = k_BKSH.shape[1], k_BKSH.shape[2], v_BKSH.shape[-1]
    G = N // K
    scale = H**-0.5 if scale is None else scale
    q_BKMH = (q_BTNH * scale).reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, H)
    mask_BMS = jnp.tile(mask_BTS, (1, G, 1))
    bias_BKMS = jnp.zeros((1, 1, 1, 1), jnp.float32) if bias_BNTS is None else bias_BNTS.reshape(B, K, G * T, S)
    out_BKMH = _attention_core(q_BKMH, k_BKSH, v_BKSH, mask_BMS, bias_BKMS, float(softcap))
    return out_BKMH.reshape(B, K, G, T, Hv).transpose(0, 3, 1, 2, 4).reshape(B, T, N, Hv)


def reference_attention(
    cfg: ModelConfig,
    q_BTNH: jax.Array,
    k_BSKH: jax.Array,
    v_BSKH: jax.Array,
    mask: Mask,
    *,
    bias_fn: BiasFn | None = None,
    softcap: float = 0.0,
    scale: float | None = None,
) -> jax.Array:
    """Plain JAX. When queries and keys are the same tokens in order (`mask.in_order`), the queries are cut into
    `cfg.causal_blocks` blocks and block i reads only the keys from its first query's window start to its last
    query, skipping the fully masked rest (4 blocks skip 3/8 of causal attention's matmuls and softmax)."""
    k_BKSH, v_BKSH = k_BSKH.transpose(0, 2, 1, 3), v_BSKH.transpose(0, 2, 1, 3)
    kw = dict(softcap=softcap, scale=scale)
    T = q_BTNH.shape[1]
    if not mask.in_order or cfg.causal_blocks <= 1:
        bias = bias_fn(mask.q_positions_BT, mask.k_positions_BS) if bias_fn is not None else None
        return attend_kv_major(q_BTNH, k_BKSH, v_BKSH, mask.allowed(), bias, **kw)
    blocks = min(cfg.causal_blocks, T)  # a window shorter than the blocks: one query per block
    ends = [round(T * (i + 1) / blocks) for i in range(blocks)]
    outs, start = [], 0
    for end in ends:
        # In order, a key more than `window` tokens before a query is outside its window whatever the positions.
        first = max(0, start - mask.window + 1) if mask.window else 0
        block = mask.queries(start, end).keys(first, end)
        bias = bias_fn(block.q_positions_BT, block.k_positions_BS) if bias_fn is not None else None
        k, v = k_BKSH[:, :, first:end], v_BKSH[:, :, first:end]
        outs.append(attend_kv_major(q_BTNH[:, start:end], k, v, block.allowed(), bias, **kw))
        start = end
    return jnp.concatenate(outs, axis=1)


def reference_decode(cfg, q_BTNH, view: KVView, *, bias_fn=None, softcap=0.0, scale=None):
    """Attention of new queries over a decode cache's keys and values (`view.mask` says which slots are visible)."""
    (k_BKSH, v_BKSH), mask = view.dense(), view.mask
    bias = bias_fn(mask.q_positions_BT, mask.k_positions_BS) if bias_fn is not None else None
    return attend_kv_major(q_BTNH, k_BKSH, v_BKSH, mask.allowed(), bias, softcap=softcap, scale=scale)


def cpu_kernel_blocker(cfg: ModelConfig, documents: bool = False) -> str | None:
    """Why the C++ CPU kernel (model/kernels/cpu_attention) cannot run this model's training attention here,
    or None when it can: one CPU device (the kernel does not shard), float32, ALiBi or no bias, a plain causal
    mask, and a head_dim that fits the CPU's vector width."""
    if jax.default_backend() != "cpu":
        return f"backend is {jax.default_backend()}, not cpu"
    if jax.device_count() != 1:
        return f"{jax.device_count()} devices (the kernel runs on one)"
    if POSITIONS[cfg.position].bias not in (None, AlibiBias):
        return f"position {cfg.position!r} adds a bias other than ALiBi's"
    if cfg.sliding_window:
        return f"model.sliding_window={cfg.sliding_window} (the kernel masks causally only)"
    if documents:
        return "data.document_mask=True (the kernel masks causally only)"
    if cfg.attn_logit_softcap:
        return f"model.attn_logit_softcap={cfg.attn_logit_softcap} (the kernel does not cap logits)"
    return cpu_attention.supports(cfg.resolved_head_dim, cfg.dtype)


def cpu_kernel_attention(cfg, q_BTNH, k_BSKH, v_BSKH, mask: Mask, *, bias_fn=None, softcap=0.0, scale=None):
    """The C++ kernel where the mask is plain causal over the tokens in order; the reference elsewhere (decoding,
    permuted layouts), which the kernel does not cover."""
    H = q_BTNH.shape[-1]
    plain = mask.in_order and not mask.window and not mask.has_segments and not softcap
    if not plain or (scale is not None and scale != H**-0.5) or v_BSKH.shape[-1] != H:
        return reference_attention(cfg, q_BTNH, k_BSKH, v_BSKH, mask, bias_fn=bias_fn, softcap=softcap, scale=scale)
    N = q_BTNH.shape[2]
    slopes_N = bias_fn.slopes if bias_fn is not None else [0.0] * N
    return cpu_attention.causal_attention(q_BTNH, k_BSKH, v_BSKH, jnp.asarray(slopes_N, jnp.float32))


def cpu_kernel_decode(cfg, q_BTNH, view: KVView, *, bias_fn=None, softcap=0.0, scale=None):
    """Decoding attention over a paged layout's float32 pages as the C++ kernel (reading pages through the page
    tables: XLA would gather and transpose a dense copy of every row's keys and values first); the reference over
    the view's dense arrays elsewhere (rows, int8 pages, a bias other than ALiBi, several devices)."""
    pages = view.pages
    paged = pages is not None and pages.k_PKsH.dtype == jnp.float32 and pages.v_PKsH.dtype == jnp.float32
    plain_bias = isinstance(bias_fn, (type(None), AlibiBias))
    if not (
        paged and q_BTNH.dtype == jnp.float32 and plain_bias and jax.device_count() == 1 and cpu_attention.available()
    ):
        return reference_decode(cfg, q_BTNH, view, bias_fn=bias_fn, softcap=softcap, scale=scale)
    mask = view.mask
    return cpu_attention.paged_decode(
        q_BTNH,
        pages.k_PKsH,
        pages.v_PKsH,
        pages.table_BM,
        mask.q_positions_BT,
        mask.k_positions_BS,
        scale=q_BTNH.shape[-1] ** -0.5 if scale is None else scale,
        softcap=softcap,
        window=mask.window,
        slopes_N=_slopes(bias_fn),
    )


def _slopes(bias_fn: BiasFn | None):
    return None if bias_fn is None else jnp.asarray(bias_fn.slopes, jnp.float32)


def pallas_blocker(cfg: ModelConfig, documents: bool = False) -> str | None:
    """Why the Pallas kernels (model/kernels/flash_attention, decode_attention) cannot run `cfg` here, or None:
    GPUs lower them through Pallas' Triton lowering, TPUs through Mosaic (where a head's whole sequence must fit
    in VMEM), a CPU interprets them (slow, for tests); ALiBi or no bias. Any device count: a kernel is a per-device
    program (XLA splits neither a Triton nor a Mosaic call), so on a mesh parallel/hooks.py runs it inside
    `jax.shard_map` on each device's batch rows and heads (`Implementation.per_device`). Both lowerings are
    checked on CPU (tests/test_kernel_lowering.py: export, and Mosaic's compiler where libtpu is installed);
    neither has run on hardware here."""
    backend = jax.default_backend()
    if backend not in ("cpu", "gpu", "tpu"):
        return f"backend is {backend} (the kernels lower for GPUs (Triton) and TPUs (Mosaic); CPUs interpret them)"
    if backend == "tpu":
        D, itemsize = cfg.resolved_head_dim, jnp.dtype(cfg.dtype).itemsize
        need = flash_attention.mosaic_vmem_bytes(cfg.max_seq_len, cfg.group_size, D, D, itemsize)
        if need > flash_attention.VMEM_BUDGET:
            return (
                f"model.max_seq_len={cfg.max_seq_len}: the TPU kernels would hold ~{need / 2**20:.0f} MiB of a head's"
                f" whole sequence in VMEM (over {flash_attention.VMEM_BUDGET // 2**20} MiB)"
            )
    if POSITIONS[cfg.position].bias not in (None, AlibiBias):
        return f"position {cfg.position!r} adds a bias other than ALiBi's"
    return None


def pallas_attention(cfg, q_BTNH, k_BSKH, v_BSKH, mask: Mask, *, bias_fn=None, softcap=0.0, scale=None):
    """Training and evaluation attention as Pallas flash attention (every part of the mask, GQA, soft-cap, ALiBi)."""
    kw = dict(scale=scale, softcap=softcap, alibi_slopes=_slopes(bias_fn))
    return flash_attention.flash_attention(q_BTNH, k_BSKH, v_BSKH, mask, **kw)


def pallas_decode(cfg, q_BTNH, view: KVView, *, bias_fn=None, softcap=0.0, scale=None):
    """Decoding attention as Pallas flash-decoding (per-row lengths, split cache): over a paged layout's pages
    through its page tables where they hold floats, else over the view's dense [B, K, S, H] keys and values."""
    kw = dict(scale=scale, softcap=softcap, alibi_slopes=_slopes(bias_fn))
    pages = view.pages
    if pages is not None and jnp.issubdtype(pages.k_PKsH.dtype, jnp.floating):
        return paged_attention.paged_decode_attention(
            q_BTNH, pages.k_PKsH, pages.v_PKsH, pages.table_BM, view.mask, **kw
        )
    return decode_attention.decode_attention(q_BTNH, *view.dense(), view.mask, **kw)


def cudnn_blocker(cfg: ModelConfig, documents: bool = False) -> str | None:
    """Why `jax.nn.dot_product_attention(implementation='cudnn')` cannot run `cfg`'s training attention here, or
    None: an NVIDIA GPU, bfloat16 or float16, a causal mask with at most a sliding window (no document ids), no
    soft-cap, no bias, a head_dim cuDNN's fused kernels take."""
    if jax.default_backend() != "gpu":
        return f"backend is {jax.default_backend()} (cuDNN's fused attention runs on NVIDIA GPUs)"
    if cfg.dtype not in ("bfloat16", "float16"):
        return f"compute dtype {cfg.dtype} (cuDNN's fused attention takes bfloat16 or float16)"
    if documents:
        return "data.document_mask=True (jax.nn.dot_product_attention takes no document ids)"
    if cfg.attn_logit_softcap:
        return f"model.attn_logit_softcap={cfg.attn_logit_softcap} (cuDNN does not cap logits)"
    if POSITIONS[cfg.position].bias is not None:
        return f"position {cfg.position!r} adds a bias (cuDNN would read it as a [B, N, T, S] array)"
    if cfg.resolved_head_dim % 8 or cfg.resolved_head_dim > 256:
        return f"head_dim {cfg.resolved_head_dim} (cuDNN takes multiples of 8 up to 256)"
    return None


def cudnn_attention(cfg, q_BTNH, k_BSKH, v_BSKH, mask: Mask, *, bias_fn=None, softcap=0.0, scale=None):
    """cuDNN's fused attention where the mask is causal over the tokens in order (with a sliding window); the
    reference elsewhere (permuted or padded layouts, which cuDNN's causal mask does not describe)."""
    plain = mask.in_order and not mask.has_segments and not softcap and bias_fn is None
    if not plain or v_BSKH.shape[-1] != q_BTNH.shape[-1]:
        return reference_attention(cfg, q_BTNH, k_BSKH, v_BSKH, mask, bias_fn=bias_fn, softcap=softcap, scale=scale)
    window = (mask.window - 1, 0) if mask.window else None
    return jax.nn.dot_product_attention(
        q_BTNH, k_BSKH, v_BSKH, scale=scale, is_causal=True, local_window_size=window, implementation="cudnn"
    )


@dataclasses.dataclass(frozen=True)
class Implementation:
    """An attention implementation: `blocker(cfg, documents)` says why it cannot run `cfg`'s attention on this
    backend (None: it can), `attend(cfg, q_BTNH, k_BSKH, v_BSKH, mask, *, bias_fn, softcap, scale)` computes it
    over a layer's own tokens, `decode(cfg, q_BTNH, view, *, bias_fn, softcap, scale)` over a decode cache's keys
    and values (a `model.cache.KVView`: dense [B, K, S, H] for rows; a paged layout's pages, which an
    implementation that cannot read pages gathers with `view.dense()`).

    `per_device`: `attend` is one device's program (a Pallas or custom call) that XLA cannot split over a mesh
    (it would gather every input onto each device); parallel/hooks.py then runs it on each device's own batch
    rows and heads inside `jax.shard_map`, handing it a bias function over those heads only."""

    blocker: Callable[[ModelConfig, bool], str | None]
    attend: Callable[..., jax.Array]
    decode: Callable[..., jax.Array] = reference_decode
    per_device: bool = False


IMPLEMENTATIONS: dict[str, Implementation] = {
    "xla": Implementation(lambda cfg, documents=False: None, reference_attention),
    "cpu_kernel": Implementation(cpu_kernel_blocker, cpu_kernel_attention, cpu_kernel_decode),
    "pallas": Implementation(pallas_blocker, pallas_attention, pallas_decode, per_device=True),
    "cudnn": Implementation(cudnn_blocker, cudnn_attention),  # decoding: the reference (T = 1 is not cuDNN's case)
}
# What 'auto' tries on each platform (jax.default_backend()), fastest first; the reference last (it always runs).
# An order is set from measurements: on CPUs the C++ kernel (BENCHMARKS.md). On GPUs and TPUs nothing is measured
# yet, so only the reference: benchmarks/accelerator.py measures 'pallas', 'cudnn' and 'xla' (llama_1b's training
# MFU and attention TFLOP/s) and writes the order its figures give as accelerator.json's "auto_order", to copy here.
# Never 'pallas' on CPUs (interpreted there, for tests).
AUTO_ORDER: dict[str, tuple[str, ...]] = {"cpu": ("cpu_kernel", "xla"), "gpu": ("xla",), "tpu": ("xla",)}
ATTENTION_IMPLS = ("auto", *IMPLEMENTATIONS)  # the values model.attention_impl takes


def choose(cfg: ModelConfig, documents: bool = False) -> Implementation:
    """The implementation `cfg.attention_impl` names, or for 'auto' the first of this platform's AUTO_ORDER that can
    run here; ValueError (one line) when the named one cannot."""
    if cfg.attention_impl == "auto":
        order = AUTO_ORDER.get(jax.default_backend(), ("xla",))
        return next(IMPLEMENTATIONS[n] for n in order if IMPLEMENTATIONS[n].blocker(cfg, documents) is None)
    impl = IMPLEMENTATIONS[cfg.attention_impl]
    if (reason := impl.blocker(cfg, documents)) is not None:
        allowed = ", ".join(
            n for n in ATTENTION_IMPLS if n == "auto" or IMPLEMENTATIONS[n].blocker(cfg, documents) is None
        )
        raise ValueError(
            f"model.attention_impl={cfg.attention_impl!r} cannot run here: {reason} (allowed here: {allowed})"
        )
    return impl
