"""Flash attention in Pallas: forward and backward kernels tiled over query and key blocks (FlashAttention-2).

    softmax(softcap(scale * q k^T) - slope_n (q_pos - k_pos), masked by a `Mask`) v

with q [B, T, N, D], k [B, S, K, D], v [B, S, K, Dv] (Dv may differ from D, as in MLA). Each program of the
forward grid (batch row, query head, query block) reads its query block and the whole K/V sequence of K/V head
n // (N / K) (the BlockSpec's index map picks it: K/V are never repeated in memory), and walks the key blocks with
an online softmax in float32. A key block that the mask empties for the whole query block (above the causal
diagonal, outside the sliding window, another document, padding) is skipped: `block_table` decides it before the
kernel from each block's first/last index and its smallest/largest position and segment id.

The backward pass is its own two kernels (through `jax.custom_vjp`), recomputing the probabilities from the saved
log-sum-exp: one over query blocks accumulates dq, one over key blocks accumulates dk and dv over the G query heads
that share the K/V head (FlashAttention-2's scheme; no [T, S] matrix is ever stored).

Lengths that are not multiples of the blocks are padded inside the wrapper (padding keys have position -1, which
no query reads; padded queries read nothing and are cut off). Head dims are padded to a power of two (Triton's
tiles). A query that sees no key at all gets zeros (the plain-JAX reference would average every value instead).
`interpret=None` interprets the kernels on CPU (how the tests run them) and compiles them elsewhere (Triton on GPUs).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl

from model.mask import Mask

NEG_INF = -1e30  # masked logits (finite: a row that sees nothing keeps max -1e30 and exp(0) * 0 = 0, never NaN)
REMAT_NAME = "flash_attention"  # the forward's outputs, which remat policies should save (not rerun the kernel)
BIG = 2**30  # larger than any position or segment id


def default_interpret() -> bool:
    return jax.default_backend() == "cpu"


def pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def pad_to(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
    if x.shape[axis] == size:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


def check_blocks(interpret: bool, **blocks: int) -> None:
    """ValueError (one line) for a block size the compiled kernels cannot tile (Triton: powers of two >= 16)."""
    for name, b in blocks.items():
        if b < 1 or (not interpret and (b < 16 or b & (b - 1))):
            raise ValueError(f"{name}={b}: must be a power of two >= 16 (compiled Pallas kernels)")


# -- which blocks the mask leaves anything visible in ------------------------------------------------------------


def _ranges(values_BX: jax.Array, real_BX: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
    """Smallest and largest value of the real entries of each block [B, X / block] (BIG / -1 when none)."""
    B, X = values_BX.shape
    v_BNb, real_BNb = values_BX.reshape(B, X // block, block), real_BX.reshape(B, X // block, block)
    return jnp.where(real_BNb, v_BNb, BIG).min(-1), jnp.where(real_BNb, v_BNb, -1).max(-1)


def block_table(mask: Mask, block_q: int, block_k: int) -> jax.Array:
    """[B, T / block_q, S / block_k] int32: 1 where the mask may leave a (query block, key block) pair something
    visible, 0 where it certainly leaves nothing (the kernels skip those). Positions must be padded to multiples
    of the blocks (-1). Conservative: a pair with a visible entry is never 0."""
    qpos_BT, kpos_BS = mask.q_positions_BT, mask.k_positions_BS
    T, S = qpos_BT.shape[1], kpos_BS.shape[1]
    qmin_BQ, qmax_BQ = _ranges(qpos_BT, qpos_BT >= 0, block_q)
    kmin_BK, kmax_BK = _ranges(kpos_BS, kpos_BS >= 0, block_k)
    q_, k_ = (slice(None), slice(None), None), (slice(None), None, slice(None))
    ok_BQK = (qmax_BQ[q_] >= 0) & (kmax_BK[k_] >= 0) & (kmin_BK[k_] <= qmax_BQ[q_])
    if mask.window:
        ok_BQK &= qmin_BQ[q_] - kmax_BK[k_] < mask.window
    if mask.has_segments:
        qsmin, qsmax = _ranges(mask.q_segments_BT, qpos_BT >= 0, block_q)
        ksmin, ksmax = _ranges(mask.k_segments_BS, kpos_BS >= 0, block_k)
        ok_BQK &= (ksmin[k_] <= qsmax[q_]) & (qsmin[q_] <= ksmax[k_])
    if mask.in_order:  # queries and keys are the same tokens in order: a later index is a later position
        q_first = jnp.arange(T // block_q)[:, None] * block_q
        k_first = jnp.arange(S // block_k)[None, :] * block_k
        ok_BQK &= (k_first <= q_first + block_q - 1)[None]
        if mask.window:
            ok_BQK &= (q_first - (k_first + block_k - 1) < mask.window)[None]
    return ok_BQK.astype(jnp.int32)


# -- the kernels --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Static:
    """What the kernels are specialised on (hashable: a custom_vjp's non-differentiable argument)."""

    scale: float
    softcap: float
    window: int
    block_q: int
    block_k: int
    segments: bool
    alibi: bool
    interpret: bool
    count_visits: bool = False


def dot_f32(a, b, contract=(1, 1)):
    """a @ b^T by default (contract the last dims), float32 accumulation."""
    dims = (((contract[0],), (contract[1],)), ((), ()))
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def scores(st: Static, q_QD, k_KD, qpos_Q, kpos_K, qseg_Q, kseg_K, slope):
    """The logits of one (query block, key block) tile in float32, the mask, and tanh(raw / cap) for the
    soft-cap's derivative (None without a cap). Masked logits are NEG_INF."""
    s_QK = dot_f32(q_QD, k_KD) * st.scale
    tanh_QK = None
    if st.softcap > 0:
        tanh_QK = jnp.tanh(s_QK / st.softcap)
        s_QK = st.softcap * tanh_QK
    q_Q1, k_1K = qpos_Q[:, None], kpos_K[None, :]
    if st.alibi:
        s_QK = s_QK - slope * (q_Q1 - k_1K).astype(jnp.float32)
    ok_QK = (k_1K <= q_Q1) & (k_1K >= 0)
    if st.window:
        ok_QK &= q_Q1 - k_1K < st.window
    if st.segments:
        ok_QK &= qseg_Q[:, None] == kseg_K[None, :]
    return jnp.where(ok_QK, s_QK, NEG_INF), ok_QK, tanh_QK


def _named(names, refs):
    return dict(zip(names, refs, strict=True))


def _forward_kernel(*refs, st: Static, names):
    r = _named(names, refs)
    n, nk = pl.program_id(1), r["table"].shape[0]
    q_QD = r["q"][...]
    qpos_Q = r["qpos"][...]
    qseg_Q = r["qseg"][...] if st.segments else None
    slope = r["slopes"][n] if st.alibi else None
    bq, bk, Dv = q_QD.shape[0], st.block_k, r["o"].shape[-1]

    def visit(j, carry):
        acc_QV, m_Q, l_Q, visits = carry
        ks = pl.ds(j * bk, bk)
        kseg = r["kseg"][ks] if st.segments else None
        s_QK, ok_QK, _ = scores(st, q_QD, r["k"][ks, :], qpos_Q, r["kpos"][ks], qseg_Q, kseg, slope)
        m_new_Q = jnp.maximum(m_Q, s_QK.max(-1))
        p_QK = jnp.where(ok_QK, jnp.exp(s_QK - m_new_Q[:, None]), 0.0)
        alpha_Q = jnp.exp(m_Q - m_new_Q)
        v_KV = r["v"][ks, :]
        acc_QV = alpha_Q[:, None] * acc_QV + dot_f32(p_QK.astype(v_KV.dtype), v_KV, (1, 0))
        return acc_QV, m_new_Q, alpha_Q * l_Q + p_QK.sum(-1), visits + 1

    def body(j, carry):
        return lax.cond(r["table"][j] != 0, functools.partial(visit, j), lambda c: c, carry)

    init = (jnp.zeros((bq, Dv), jnp.float32), jnp.full((bq,), NEG_INF, jnp.float32), jnp.zeros((bq,), jnp.float32))
    acc_QV, m_Q, l_Q, visits = lax.fori_loop(0, nk, body, (*init, jnp.int32(0)))
    seen_Q = l_Q > 0
    r["o"][...] = (acc_QV / jnp.where(seen_Q, l_Q, 1.0)[:, None]).astype(r["o"].dtype)
    r["lse"][...] = jnp.where(seen_Q, m_Q + jnp.log(jnp.where(seen_Q, l_Q, 1.0)), -NEG_INF)
    if st.count_visits:
        r["visits"][...] = jnp.full((1,), visits, jnp.int32)


def _mask_inputs(st: Static, qpos, kpos, qseg, kseg, slopes, q_spec, k_spec, slopes_spec):
    """The (name, array, BlockSpec) of the mask's inputs the kernels take."""
    out = [("qpos", qpos, q_spec), ("kpos", kpos, k_spec)]
    if st.segments:
        out += [("qseg", qseg, q_spec), ("kseg", kseg, k_spec)]
    if st.alibi:
        out += [("slopes", slopes, slopes_spec)]
    return out


def compiler_params(interpret: bool, head_dim: int):
    """Triton's launch settings on GPUs (those of jax's own Pallas attention: 8 warps for heads over 64)."""
    if interpret or jax.default_backend() != "gpu":
        return None
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2)


def _call(kernel, st: Static, grid, inputs, outputs, name):
    """pallas_call over (name, array, spec) inputs and (name, ShapeDtypeStruct, spec) outputs; returns a dict."""
    names = tuple(n for n, _, _ in inputs) + tuple(n for n, _, _ in outputs)
    outs = pl.pallas_call(
        functools.partial(kernel, st=st, names=names),
        grid=grid,
        in_specs=[s for _, _, s in inputs],
        out_specs=[s for _, _, s in outputs],
        out_shape=[a for _, a, _ in outputs],
        interpret=st.interpret,
        compiler_params=compiler_params(st.interpret, inputs[0][1].shape[-1]),
        name=name,
    )(*[a for _, a, _ in inputs])
    return dict(zip((n for n, _, _ in outputs), outs, strict=True))


def _forward(st: Static, q, k, v, qpos, kpos, qseg, kseg, slopes, table):
    """(out [B, T, N, Dv], lse [B, N, T] float32, visits [B, N, T / block_q] or None) on padded inputs."""
    B, T, N, D = q.shape
    S, K, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G, bq, bk = N // K, st.block_q, st.block_k
    nq, nk = T // bq, S // bk
    row = lambda b, n, i: (b, 0)  # noqa: E731
    inputs = [
        ("q", q, pl.BlockSpec((None, bq, None, D), lambda b, n, i: (b, i, n, 0))),
        ("k", k, pl.BlockSpec((None, S, None, D), lambda b, n, i: (b, 0, n // G, 0))),
        ("v", v, pl.BlockSpec((None, S, None, Dv), lambda b, n, i: (b, 0, n // G, 0))),
        *_mask_inputs(
            st,
            qpos,
            kpos,
            qseg,
            kseg,
            slopes,
            pl.BlockSpec((None, bq), lambda b, n, i: (b, i)),
            pl.BlockSpec((None, S), row),
            pl.BlockSpec((N,), lambda b, n, i: (0,)),
        ),  # fmt: skip
        ("table", table, pl.BlockSpec((None, None, nk), lambda b, n, i: (b, i, 0))),
    ]
    outputs = [
        ("o", jax.ShapeDtypeStruct((B, T, N, Dv), q.dtype), pl.BlockSpec((None, bq, None, Dv), inputs[0][2].index_map)),
        (
            "lse",
            jax.ShapeDtypeStruct((B, N, T), jnp.float32),
            pl.BlockSpec((None, None, bq), lambda b, n, i: (b, n, i)),
        ),
    ]
    if st.count_visits:
        spec = pl.BlockSpec((None, None, 1), lambda b, n, i: (b, n, i))
        outputs.append(("visits", jax.ShapeDtypeStruct((B, N, nq), jnp.int32), spec))
    out = _call(_forward_kernel, st, (B, N, nq), inputs, outputs, "flash_attention_fwd")
    return out["o"], out["lse"], out.get("visits")


def _dq_kernel(*refs, st: Static, names):
    r = _named(names, refs)
    n, nk = pl.program_id(1), r["table"].shape[0]
    q_QD, do_QV = r["q"][...], r["do"][...]
    lse_Q, delta_Q = r["lse"][...], r["delta"][...]
    qpos_Q = r["qpos"][...]
    qseg_Q = r["qseg"][...] if st.segments else None
    slope = r["slopes"][n] if st.alibi else None
    bk = st.block_k

    def visit(j, dq_QD):
        ks = pl.ds(j * bk, bk)
        k_KD, v_KV = r["k"][ks, :], r["v"][ks, :]
        kseg = r["kseg"][ks] if st.segments else None
        s_QK, ok_QK, tanh_QK = scores(st, q_QD, k_KD, qpos_Q, r["kpos"][ks], qseg_Q, kseg, slope)
        p_QK = jnp.where(ok_QK, jnp.exp(s_QK - lse_Q[:, None]), 0.0)
        ds_QK = p_QK * (dot_f32(do_QV, v_KV) - delta_Q[:, None])
        if tanh_QK is not None:  # d/dx [c tanh(x / c)] = 1 - tanh(x / c)^2
            ds_QK = ds_QK * (1.0 - tanh_QK * tanh_QK)
        return dq_QD + dot_f32(ds_QK.astype(k_KD.dtype), k_KD, (1, 0))

    def body(j, dq_QD):
        return lax.cond(r["table"][j] != 0, functools.partial(visit, j), lambda c: c, dq_QD)

    dq_QD = lax.fori_loop(0, nk, body, jnp.zeros(q_QD.shape, jnp.float32))
    r["dq"][...] = (dq_QD * st.scale).astype(r["dq"].dtype)


def _dkv_kernel(*refs, st: Static, names):
    r = _named(names, refs)
    kh = pl.program_id(1)
    G, nq = r["q"].shape[1], r["table"].shape[0]
    k_KD, v_KV = r["k"][...], r["v"][...]
    kpos_K = r["kpos"][...]
    kseg_K = r["kseg"][...] if st.segments else None
    bq = st.block_q

    def head(g, carry):
        slope = r["slopes"][kh * G + g] if st.alibi else None

        def visit(i, carry):
            dk_KD, dv_KV = carry
            qs = pl.ds(i * bq, bq)
            q_QD, do_QV = r["q"][qs, g, :], r["do"][qs, g, :]
            lse_Q, delta_Q = r["lse"][g, qs], r["delta"][g, qs]
            qseg = r["qseg"][qs] if st.segments else None
            s_QK, ok_QK, tanh_QK = scores(st, q_QD, k_KD, r["qpos"][qs], kpos_K, qseg, kseg_K, slope)
            p_QK = jnp.where(ok_QK, jnp.exp(s_QK - lse_Q[:, None]), 0.0)
            dv_KV = dv_KV + dot_f32(p_QK.astype(do_QV.dtype), do_QV, (0, 0))
            ds_QK = p_QK * (dot_f32(do_QV, v_KV) - delta_Q[:, None])
            if tanh_QK is not None:
                ds_QK = ds_QK * (1.0 - tanh_QK * tanh_QK)
            return dk_KD + dot_f32(ds_QK.astype(q_QD.dtype), q_QD, (0, 0)), dv_KV

        def body(i, carry):
            return lax.cond(r["table"][i] != 0, functools.partial(visit, i), lambda c: c, carry)

        return lax.fori_loop(0, nq, body, carry)

    init = (jnp.zeros(k_KD.shape, jnp.float32), jnp.zeros(v_KV.shape, jnp.float32))
    dk_KD, dv_KV = lax.fori_loop(0, G, head, init)
    r["dk"][...] = (dk_KD * st.scale).astype(r["dk"].dtype)
    r["dv"][...] = dv_KV.astype(r["dv"].dtype)


def _backward(st: Static, q, k, v, qpos, kpos, qseg, kseg, slopes, table, o, lse, do):
    B, T, N, D = q.shape
    S, K, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G, bq, bk = N // K, st.block_q, st.block_k
    nq, nk = T // bq, S // bk
    delta = jnp.einsum("btnv,btnv->bnt", o.astype(jnp.float32), do.astype(jnp.float32))
    slopes_spec = lambda: pl.BlockSpec((N,), lambda b, h, i: (0,))  # noqa: E731

    q_block = pl.BlockSpec((None, bq, None, D), lambda b, n, i: (b, i, n, 0))
    row_block = pl.BlockSpec((None, None, bq), lambda b, n, i: (b, n, i))
    dq_inputs = [
        ("q", q, q_block),
        ("k", k, pl.BlockSpec((None, S, None, D), lambda b, n, i: (b, 0, n // G, 0))),
        ("v", v, pl.BlockSpec((None, S, None, Dv), lambda b, n, i: (b, 0, n // G, 0))),
        ("do", do, pl.BlockSpec((None, bq, None, Dv), lambda b, n, i: (b, i, n, 0))),
        ("lse", lse, row_block),
        ("delta", delta, row_block),
        *_mask_inputs(
            st,
            qpos,
            kpos,
            qseg,
            kseg,
            slopes,
            pl.BlockSpec((None, bq), lambda b, n, i: (b, i)),
            pl.BlockSpec((None, S), lambda b, n, i: (b, 0)),
            slopes_spec(),
        ),  # fmt: skip
        ("table", table, pl.BlockSpec((None, None, nk), lambda b, n, i: (b, i, 0))),
    ]
    dq = _call(
        _dq_kernel, st, (B, N, nq), dq_inputs, [("dq", jax.ShapeDtypeStruct(q.shape, q.dtype), q_block)], "flash_dq"
    )["dq"]

    k_block = pl.BlockSpec((None, bk, None, D), lambda b, h, j: (b, j, h, 0))
    v_block = pl.BlockSpec((None, bk, None, Dv), lambda b, h, j: (b, j, h, 0))
    group_rows = pl.BlockSpec((None, G, T), lambda b, h, j: (b, h, 0))  # the G query heads of K/V head h
    dkv_inputs = [
        ("q", q, pl.BlockSpec((None, T, G, D), lambda b, h, j: (b, 0, h, 0))),
        ("k", k, k_block),
        ("v", v, v_block),
        ("do", do, pl.BlockSpec((None, T, G, Dv), lambda b, h, j: (b, 0, h, 0))),
        ("lse", lse, group_rows),
        ("delta", delta, group_rows),
        *_mask_inputs(
            st,
            qpos,
            kpos,
            qseg,
            kseg,
            slopes,
            pl.BlockSpec((None, T), lambda b, h, j: (b, 0)),
            pl.BlockSpec((None, bk), lambda b, h, j: (b, j)),
            slopes_spec(),
        ),  # fmt: skip
        ("table", table.transpose(0, 2, 1), pl.BlockSpec((None, None, nq), lambda b, h, j: (b, j, 0))),
    ]
    outputs = [
        ("dk", jax.ShapeDtypeStruct(k.shape, k.dtype), k_block),
        ("dv", jax.ShapeDtypeStruct(v.shape, v.dtype), v_block),
    ]
    out = _call(_dkv_kernel, st, (B, K, nk), dkv_inputs, outputs, "flash_dkv")
    return dq, out["dk"], out["dv"]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(st: Static, q, k, v, qpos, kpos, qseg, kseg, slopes, table):
    return _forward(st, q, k, v, qpos, kpos, qseg, kseg, slopes, table)[0]


def _flash_fwd(st, q, k, v, qpos, kpos, qseg, kseg, slopes, table):
    o, lse, _ = _forward(st, q, k, v, qpos, kpos, qseg, kseg, slopes, table)
    o, lse = checkpoint_name(o, REMAT_NAME), checkpoint_name(lse, REMAT_NAME)
    return o, (q, k, v, qpos, kpos, qseg, kseg, slopes, table, o, lse)


def _flash_bwd(st, residuals, do):
    q, k, v, qpos, kpos, qseg, kseg, slopes, table, o, lse = residuals
    dq, dk, dv = _backward(st, q, k, v, qpos, kpos, qseg, kseg, slopes, table, o, lse, do)
    return dq, dk, dv, None, None, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _prepare(q, k, v, mask: Mask, scale, softcap, alibi_slopes, block_q, block_k, interpret, count_visits):
    """Checks shapes, pads every length to its blocks and head dims to powers of two; (Static, padded args)."""
    B, T, N, D = q.shape
    S, K, Dv = k.shape[1], k.shape[2], v.shape[-1]
    if k.shape[:3] != v.shape[:3] or k.shape[-1] != D or k.shape[0] != B or N % K:
        raise ValueError(
            f"q {q.shape}, k {k.shape}, v {v.shape}: want [B, T, N, D], [B, S, K, D], [B, S, K, Dv], K | N"
        )
    interpret = default_interpret() if interpret is None else interpret
    bq, bk = min(block_q, max(pow2(T), 16)), min(block_k, max(pow2(S), 16))
    check_blocks(interpret, block_q=bq, block_k=bk)
    Tp, Sp = -(-T // bq) * bq, -(-S // bk) * bk
    Dp, Dvp = (pow2(d) if interpret else max(16, pow2(d)) for d in (D, Dv))
    q = pad_to(pad_to(q, 1, Tp), 3, Dp)
    k = pad_to(pad_to(k, 1, Sp), 3, Dp)
    v = pad_to(pad_to(v, 1, Sp), 3, Dvp)
    qseg = kseg = None
    if mask.has_segments:
        qseg = pad_to(mask.q_segments_BT.astype(jnp.int32), 1, Tp)
        kseg = pad_to(mask.k_segments_BS.astype(jnp.int32), 1, Sp)
    padded = Mask(
        pad_to(mask.q_positions_BT.astype(jnp.int32), 1, Tp, -1),
        pad_to(mask.k_positions_BS.astype(jnp.int32), 1, Sp, -1),
        qseg,
        kseg,
        mask.window,
        mask.in_order,
    )
    table = block_table(padded, bq, bk)
    slopes = jnp.zeros((N,), jnp.float32) if alibi_slopes is None else jnp.asarray(alibi_slopes, jnp.float32)
    st = Static(
        scale=float(D**-0.5 if scale is None else scale),
        softcap=float(softcap or 0.0),
        window=int(mask.window),
        block_q=bq,
        block_k=bk,
        segments=mask.has_segments,
        alibi=alibi_slopes is not None,
        interpret=bool(interpret),
        count_visits=count_visits,
    )
    return st, (q, k, v, padded.q_positions_BT, padded.k_positions_BS, qseg, kseg, slopes, table)


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: Mask,
    *,
    scale: float | None = None,
    softcap: float | None = None,
    alibi_slopes: jax.Array | None = None,
    block_q: int = 128,
    block_k: int = 64,
    interpret: bool | None = None,
) -> jax.Array:
    """Attention of q [B, T, N, D] over k [B, S, K, D], v [B, S, K, Dv] under `mask` -> [B, T, N, Dv].

    `scale` defaults to D^-0.5; `softcap` (None or 0: off) caps the scaled logits as cap * tanh(x / cap);
    `alibi_slopes` [N] adds -slope_n (q_pos - k_pos) (no gradient). Differentiable in q, k and v."""
    T, Dv = q.shape[1], v.shape[-1]
    st, args = _prepare(q, k, v, mask, scale, softcap, alibi_slopes, block_q, block_k, interpret, False)
    return _flash(st, *args)[:, :T, :, :Dv]


def visited_blocks(q, k, v, mask: Mask, *, block_q: int = 128, block_k: int = 64, interpret=None, **kw) -> jax.Array:
    """[B, N, ceil(T / block_q)]: how many key blocks the forward kernel computed for each query block (a debug
    output of the kernel itself, so tests can prove the skipped blocks are skipped)."""
    st, args = _prepare(
        q, k, v, mask, kw.get("scale"), kw.get("softcap"), kw.get("alibi_slopes"), block_q, block_k, interpret, True
    )
    return _forward(st, *args)[2]
