"""Flash-decoding in Pallas: a few new queries per row against the decode cache, split over the cache length.

q [B, T, N, H] (T = 1 when sampling, a few when verifying speculative drafts, the prompt when prefilling) attends
over a cache laid out [B, K, S, H] (model/gqa.py's `KVCache`) whose slots carry positions (-1: empty), so each row
has its own length and a rolling cache's slots need not be in order. The G = N / K query heads sharing a K/V head
and the T queries are stacked into M = T * G rows, so one program reads each cached key once for all of them.

The grid is (batch row, K/V head, row block, split): each split walks its share of the cache in key blocks with an
online softmax in float32, skipping a block whose slots the mask empties for all its rows (empty slots, or keys
after the last query or outside the sliding window: a test of the block's smallest/largest position against the
rows'), and writes its partial output with its log-sum-exp; a final log-sum-exp combine in plain JAX merges the
splits (Dao et al.'s flash-decoding), so a long cache keeps the whole GPU busy even at batch 1.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from model.kernels.flash_attention import (
    BIG,
    NEG_INF,
    check_blocks,
    compiler_params,
    default_interpret,
    dot_f32,
    pad_to,
    pow2,
)
from model.mask import Mask


@dataclasses.dataclass(frozen=True)
class Static:
    scale: float
    softcap: float
    window: int
    block_k: int
    chunk_blocks: int  # key blocks per split
    alibi: bool
    interpret: bool
    count_visits: bool = False  # a debug output: the key blocks each program computed


def _decode_kernel(q_ref, k_ref, v_ref, qpos_ref, kpos_ref, slopes_ref, o_ref, lse_ref, *visits_ref, st: Static):
    split, bk = pl.program_id(3), st.block_k
    q_MD, qpos_M = q_ref[...], qpos_ref[...]
    slope_M1 = slopes_ref[...][:, None] if st.alibi else None
    q_M1 = qpos_M[:, None]
    real_M = qpos_M >= 0
    qmin, qmax = jnp.where(real_M, qpos_M, BIG).min(), jnp.where(real_M, qpos_M, -1).max()
    Mb, Dv = q_MD.shape[0], o_ref.shape[-1]

    def visit(ks, kpos_K, carry):
        acc_MV, m_M, l_M, visits = carry
        s_MK = dot_f32(q_MD, k_ref[ks, :]) * st.scale
        if st.softcap > 0:
            s_MK = st.softcap * jnp.tanh(s_MK / st.softcap)
        k_1K = kpos_K[None, :]
        if st.alibi:
            s_MK = s_MK - slope_M1 * (q_M1 - k_1K).astype(jnp.float32)
        ok_MK = (k_1K <= q_M1) & (k_1K >= 0)
        if st.window:
            ok_MK &= q_M1 - k_1K < st.window
        s_MK = jnp.where(ok_MK, s_MK, NEG_INF)
        m_new_M = jnp.maximum(m_M, s_MK.max(-1))
        p_MK = jnp.where(ok_MK, jnp.exp(s_MK - m_new_M[:, None]), 0.0)
        alpha_M = jnp.exp(m_M - m_new_M)
        v_KV = v_ref[ks, :]
        acc_MV = alpha_M[:, None] * acc_MV + dot_f32(p_MK.astype(v_KV.dtype), v_KV, (1, 0))
        return acc_MV, m_new_M, alpha_M * l_M + p_MK.sum(-1), visits + 1

    def body(j, carry):
        ks = pl.ds((split * st.chunk_blocks + j) * bk, bk)
        kpos_K = kpos_ref[ks]
        real_K = kpos_K >= 0
        kmin, kmax = jnp.where(real_K, kpos_K, BIG).min(), jnp.where(real_K, kpos_K, -1).max()
        seen = (kmax >= 0) & (qmax >= 0) & (kmin <= qmax)
        if st.window:
            seen &= qmin - kmax < st.window
        return lax.cond(seen, functools.partial(visit, ks, kpos_K), lambda c: c, carry)

    init = (jnp.zeros((Mb, Dv), jnp.float32), jnp.full((Mb,), NEG_INF, jnp.float32), jnp.zeros((Mb,), jnp.float32))
    acc_MV, m_M, l_M, visits = lax.fori_loop(0, st.chunk_blocks, body, (*init, jnp.int32(0)))
    seen_M = l_M > 0
    o_ref[...] = acc_MV / jnp.where(seen_M, l_M, 1.0)[:, None]
    lse_ref[...] = jnp.where(seen_M, m_M + jnp.log(jnp.where(seen_M, l_M, 1.0)), NEG_INF)
    if st.count_visits:
        visits_ref[0][...] = jnp.full((1,), visits, jnp.int32)


def _decode(
    q_BTNH,
    k_BKSH,
    v_BKSH,
    mask: Mask,
    scale,
    softcap,
    alibi_slopes,
    block_m,
    block_k,
    num_splits,
    interpret,
    count_visits=False,
):
    """(out [B, T, N, Hv], visits [B, K, row blocks, splits] or None)."""
    B, T, N, H = q_BTNH.shape
    K, S, Hv = k_BKSH.shape[1], k_BKSH.shape[2], v_BKSH.shape[-1]
    if k_BKSH.shape[:3] != v_BKSH.shape[:3] or k_BKSH.shape[-1] != H or k_BKSH.shape[0] != B or N % K:
        raise ValueError(f"q {q_BTNH.shape}, k {k_BKSH.shape}, v {v_BKSH.shape}: want [B, T, N, H], [B, K, S, H]")
    if mask.has_segments:
        raise ValueError("decode_attention: the decode cache keeps no document ids (mask has segments)")
    G, M = N // K, T * N // K
    interpret = default_interpret() if interpret is None else interpret
    bm, bk = min(block_m, max(pow2(M), 16)), min(block_k, max(pow2(S), 16))
    check_blocks(interpret, block_m=bm, block_k=bk)
    splits = max(1, min(num_splits, -(-S // bk)))
    chunk_blocks = -(-S // (splits * bk))
    Mp, Sp = -(-M // bm) * bm, splits * chunk_blocks * bk
    Hp, Hvp = (pow2(d) if interpret else max(16, pow2(d)) for d in (H, Hv))

    # Row m = t * G + g: query t of head k * G + g.
    q_BKMH = q_BTNH.reshape(B, T, K, G, H).transpose(0, 2, 1, 3, 4).reshape(B, K, M, H)
    q_BKMH = pad_to(pad_to(q_BKMH, 2, Mp), 3, Hp)
    k_BKSH = pad_to(pad_to(k_BKSH, 2, Sp), 3, Hp)
    v_BKSH = pad_to(pad_to(v_BKSH, 2, Sp), 3, Hvp)
    qpos_BM = pad_to(jnp.repeat(mask.q_positions_BT.astype(jnp.int32), G, axis=1), 1, Mp, -1)
    kpos_BS = pad_to(mask.k_positions_BS.astype(jnp.int32), 1, Sp, -1)
    slopes_N = jnp.zeros((N,), jnp.float32) if alibi_slopes is None else jnp.asarray(alibi_slopes, jnp.float32)
    slopes_KM = pad_to(jnp.tile(slopes_N.reshape(K, G), (1, T)), 1, Mp)
    st = Static(
        scale=float(H**-0.5 if scale is None else scale),
        softcap=float(softcap or 0.0),
        window=int(mask.window),
        block_k=bk,
        chunk_blocks=chunk_blocks,
        alibi=alibi_slopes is not None,
        interpret=bool(interpret),
        count_visits=count_visits,
    )
    nm = Mp // bm
    visits_spec = pl.BlockSpec((None, None, None, 1), lambda b, h, i, s: (b, h, i, s))
    o, lse, *visits = pl.pallas_call(
        functools.partial(_decode_kernel, st=st),
        grid=(B, K, nm, splits),
        in_specs=[
            pl.BlockSpec((None, None, bm, Hp), lambda b, h, i, s: (b, h, i, 0)),
            pl.BlockSpec((None, None, Sp, Hp), lambda b, h, i, s: (b, h, 0, 0)),
            pl.BlockSpec((None, None, Sp, Hvp), lambda b, h, i, s: (b, h, 0, 0)),
            pl.BlockSpec((None, bm), lambda b, h, i, s: (b, i)),
            pl.BlockSpec((None, Sp), lambda b, h, i, s: (b, 0)),
            pl.BlockSpec((None, bm), lambda b, h, i, s: (h, i)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, bm, Hvp), lambda b, h, i, s: (b, h, s, i, 0)),
            pl.BlockSpec((None, None, None, bm), lambda b, h, i, s: (b, h, s, i)),
            *([visits_spec] if count_visits else []),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((B, K, splits, Mp, Hvp), jnp.float32),
            jax.ShapeDtypeStruct((B, K, splits, Mp), jnp.float32),
            *([jax.ShapeDtypeStruct((B, K, nm, splits), jnp.int32)] if count_visits else []),
        ],
        interpret=st.interpret,
        compiler_params=compiler_params(st.interpret, Hp),
        name="flash_decode",
    )(q_BKMH, k_BKSH, v_BKSH, qpos_BM, kpos_BS, slopes_KM)

    # Combine the splits: weights exp(lse_s - logsumexp_s lse_s) (a split that saw nothing has lse -1e30: weight 0).
    lse_max_BKM = lse.max(axis=2)
    w_BKsM = jnp.exp(lse - lse_max_BKM[:, :, None])
    out_BKMV = jnp.einsum("bksm,bksmv->bkmv", w_BKsM, o) / w_BKsM.sum(axis=2)[..., None]  # the max split's is 1
    out_BKMV = out_BKMV[:, :, :M, :Hv].astype(q_BTNH.dtype)
    return out_BKMV.reshape(B, K, T, G, Hv).transpose(0, 2, 1, 3, 4).reshape(B, T, N, Hv), (visits or [None])[0]


def decode_attention(
    q_BTNH: jax.Array,
    k_BKSH: jax.Array,
    v_BKSH: jax.Array,
    mask: Mask,
    *,
    scale: float | None = None,
    softcap: float | None = None,
    alibi_slopes: jax.Array | None = None,
    block_m: int = 64,
    block_k: int = 128,
    num_splits: int = 16,
    interpret: bool | None = None,
) -> jax.Array:
    """Attention of q [B, T, N, H] over a decode cache k [B, K, S, H], v [B, K, S, Hv] under `mask` (its key
    positions are the cache slots' positions, -1 for empty) -> [B, T, N, Hv]. The cache is cut into at most
    `num_splits` chunks of whole `block_k` blocks. Forward only (decoding takes no gradients)."""
    args = (scale, softcap, alibi_slopes, block_m, block_k, num_splits, interpret)
    return _decode(q_BTNH, k_BKSH, v_BKSH, mask, *args)[0]


def visited_blocks(q_BTNH, k_BKSH, v_BKSH, mask: Mask, **kw) -> jax.Array:
    """[B, K, row blocks, splits]: how many key blocks each program computed (the kernel counts them)."""
    names = ("scale", "softcap", "alibi_slopes", "block_m", "block_k", "num_splits", "interpret")
    defaults = (None, None, None, 64, 128, 16, None)
    return _decode(q_BTNH, k_BKSH, v_BKSH, mask, *(kw.get(n, d) for n, d in zip(names, defaults)), True)[1]
