"""Flash-decoding in Pallas: a few new queries per row against the decode cache, split over the cache length.

q [B, T, N, H] (T = 1 when sampling, a few when verifying speculative drafts, the prompt when prefilling) attends
over a cache laid out [B, K, S, H] (model/gqa.py's keys and values in model/cache.py's `Rows` layout) whose
slots carry positions (-1: empty), so each row has its own length and a rolling cache's slots need not be in order. The G = N / K query heads sharing a K/V head
and the T queries are stacked into M = T * G rows, so one program reads each cached key once for all of them.

The grid is (batch row, K/V head, row block, split): each split walks its share of the cache in key blocks with an
online softmax in float32, skipping a block whose slots the mask empties for all its rows (empty slots, or keys
after the last query or outside the sliding window: flash attention's `block_table`, decided before the kernel
from each block's smallest/largest position), and writes its partial output with its log-sum-exp; a final
log-sum-exp combine in plain JAX merges the splits (Dao et al.'s flash-decoding), so a long cache keeps the whole
GPU busy even at batch 1. paged_attention.py builds the same kernel over a paged cache from the pieces here (the
online softmax step, the query rows, the combine).

It lowers where flash attention's kernels do (`flash_attention.Target`: interpreted on CPUs, Pallas' Triton lowering
on GPUs, Mosaic on TPUs) with the same conventions: the rows' positions, ALiBi slopes and log-sum-exp are columns
[M, 1] (M is a few rows), the slots' positions rows [S / block, 1, block] read by a leading-axis index, the block
table in SMEM on TPUs. Verified by interpretation on CPU (tests/test_decode_attention.py), by export for 'cuda'
and 'tpu' on CPU and, with libtpu installed, by Mosaic's compiler for a compile-only TPU (tests/test_kernel_lowering.py;
flash_attention.py's docstring says what else was compiled once by hand): never run on a GPU or TPU here.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from model.kernels.flash_attention import (
    NEG_INF,
    Target,
    as_blocks,
    block_table,
    dot_nn,
    dot_nt,
    pad_to,
    round_up,
    target,
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
    target: Target
    count_visits: bool = False  # a debug output: the key blocks each program computed


def empty_carry(rows: int, width: int):
    """The online softmax's state before any key: (output accumulator, running max, running sum)."""
    return (
        jnp.zeros((rows, width), jnp.float32),
        jnp.full((rows, 1), NEG_INF, jnp.float32),
        jnp.zeros((rows, 1), jnp.float32),
    )


def online_step(st: Static, q_MD, q_M1, slope_M1, k_KD, v_KV, k_1K, carry):
    """The state after one key block: keys k_KD, values v_KV at positions k_1K, seen by rows q_MD at q_M1."""
    acc_MV, m_M1, l_M1 = carry
    s_MK = dot_nt(q_MD, k_KD) * st.scale
    if st.softcap > 0:
        s_MK = st.softcap * jnp.tanh(s_MK / st.softcap)
    if st.alibi:
        s_MK = s_MK - slope_M1 * (q_M1 - k_1K).astype(jnp.float32)
    ok_MK = (k_1K <= q_M1) & (jnp.broadcast_to(k_1K, s_MK.shape) >= 0)  # no broadcast of bools
    if st.window:
        ok_MK &= q_M1 - k_1K < st.window
    s_MK = jnp.where(ok_MK, s_MK, NEG_INF)
    m_new_M1 = jnp.maximum(m_M1, s_MK.max(-1, keepdims=True))
    p_MK = jnp.where(ok_MK, jnp.exp(s_MK - m_new_M1), 0.0)
    alpha_M1 = jnp.exp(m_M1 - m_new_M1)
    acc_MV = alpha_M1 * acc_MV + dot_nn(p_MK.astype(v_KV.dtype), v_KV)
    return acc_MV, m_new_M1, alpha_M1 * l_M1 + p_MK.sum(-1, keepdims=True)


def write_split(carry, o_ref, lse_ref):
    """A split's normalised output and log-sum-exp (-1e30, weight 0 in the combine, where it saw no key)."""
    acc_MV, m_M1, l_M1 = carry
    seen_M1 = l_M1 > 0
    l_M1 = jnp.where(seen_M1, l_M1, 1.0)
    o_ref[...] = acc_MV / l_M1
    lse_ref[...] = jnp.where(seen_M1, m_M1 + jnp.log(l_M1), NEG_INF)


def _decode_kernel(q_ref, k_ref, v_ref, qpos_ref, kpos_ref, slopes_ref, table_ref, o_ref, lse_ref, *visits_ref, st):
    split, bk = pl.program_id(3), st.block_k
    q_MD, q_M1 = q_ref[...], qpos_ref[...]
    slope_M1 = slopes_ref[...] if st.alibi else None

    def visit(j, carry):
        ks = pl.ds(pl.multiple_of(j * bk, bk), bk)
        state = online_step(st, q_MD, q_M1, slope_M1, k_ref[ks, :], v_ref[ks, :], kpos_ref[j], carry[:3])
        return *state, carry[3] + 1

    def body(j, carry):
        j = split * st.chunk_blocks + j
        return lax.cond(table_ref[0, j] != 0, functools.partial(visit, j), lambda c: c, carry)

    init = (*empty_carry(q_MD.shape[0], o_ref.shape[-1]), jnp.int32(0))
    *state, visits = lax.fori_loop(0, st.chunk_blocks, body, init)
    write_split(state, o_ref, lse_ref)
    if st.count_visits:  # a debug output of interpreted kernels
        visits_ref[0][...] = jnp.full((1,), visits, jnp.int32)


def row_block(tgt: Target, block_m: int | None, M: int) -> int:
    """The block of stacked query rows: `block_m`, by default 64 (128 on TPUs), shrunk for fewer rows."""
    return tgt.block("block_m", (128 if tgt.mosaic else 64) if block_m is None else block_m, M, rows=True)


def stack_queries(q_BTNH, mask: Mask, alibi_slopes, K: int, Mp: int, Hp: int):
    """q [B, T, N, H] as K/V-head-major rows (row m = t * G + g: query t of head k * G + g) padded to [B, K, Mp, Hp],
    with each row's position [B, Mp] (-1: padding) and ALiBi slope [K, Mp]."""
    B, T, N, H = q_BTNH.shape
    G, M = N // K, T * N // K
    q_BKMH = q_BTNH.reshape(B, T, K, G, H).transpose(0, 2, 1, 3, 4).reshape(B, K, M, H)
    q_BKMH = pad_to(pad_to(q_BKMH, 2, Mp), 3, Hp)
    qpos_BM = pad_to(jnp.repeat(mask.q_positions_BT.astype(jnp.int32), G, axis=1), 1, Mp, -1)
    slopes_N = jnp.zeros((N,), jnp.float32) if alibi_slopes is None else jnp.asarray(alibi_slopes, jnp.float32)
    slopes_KM = pad_to(jnp.tile(slopes_N.reshape(K, G), (1, T)), 1, Mp)
    return q_BKMH, qpos_BM, slopes_KM


def combine_splits(o_BKsMV, lse_BKsM1, q_BTNH, Hv: int) -> jax.Array:
    """[B, T, N, Hv] from each split's output and log-sum-exp: weights exp(lse_s - logsumexp_s lse_s) (a split that
    saw nothing has lse -1e30: weight 0)."""
    B, T, N, _ = q_BTNH.shape
    K = o_BKsMV.shape[1]
    G, M = N // K, T * N // K
    lse_BKsM = lse_BKsM1[..., 0]
    w_BKsM = jnp.exp(lse_BKsM - lse_BKsM.max(axis=2)[:, :, None])
    out_BKMV = jnp.einsum("bksm,bksmv->bkmv", w_BKsM, o_BKsMV) / w_BKsM.sum(axis=2)[..., None]  # the max split's is 1
    out_BKMV = out_BKMV[:, :, :M, :Hv].astype(q_BTNH.dtype)
    return out_BKMV.reshape(B, K, T, G, Hv).transpose(0, 2, 1, 3, 4).reshape(B, T, N, Hv)


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
    platform,
    count_visits=False,
):
    """(out [B, T, N, Hv], visits [B, K, row blocks, splits] or None)."""
    B, T, N, H = q_BTNH.shape
    K, S, Hv = k_BKSH.shape[1], k_BKSH.shape[2], v_BKSH.shape[-1]
    if k_BKSH.shape[:3] != v_BKSH.shape[:3] or k_BKSH.shape[-1] != H or k_BKSH.shape[0] != B or N % K:
        raise ValueError(f"q {q_BTNH.shape}, k {k_BKSH.shape}, v {v_BKSH.shape}: want [B, T, N, H], [B, K, S, H]")
    if mask.has_segments:
        raise ValueError("decode_attention: the decode cache keeps no document ids (mask has segments)")
    M = T * N // K
    tgt = target(platform, interpret)
    bm = row_block(tgt, block_m, M)
    bk = tgt.block("block_k", block_k, S)
    splits = max(1, min(num_splits, -(-S // bk)))
    chunk_blocks = -(-S // (splits * bk))
    Mp, Sp = round_up(M, bm), splits * chunk_blocks * bk
    Hp, Hvp = tgt.head_dim(H), tgt.head_dim(Hv)

    q_BKMH, qpos_BM, slopes_KM = stack_queries(q_BTNH, mask, alibi_slopes, K, Mp, Hp)
    k_BKSH = pad_to(pad_to(k_BKSH, 2, Sp), 3, Hp)
    v_BKSH = pad_to(pad_to(v_BKSH, 2, Sp), 3, Hvp)
    kpos_BS = pad_to(mask.k_positions_BS.astype(jnp.int32), 1, Sp, -1)
    table_BMS = block_table(Mask(qpos_BM, kpos_BS, window=mask.window), bm, bk)
    st = Static(
        scale=float(H**-0.5 if scale is None else scale),
        softcap=float(softcap or 0.0),
        window=int(mask.window),
        block_k=bk,
        chunk_blocks=chunk_blocks,
        alibi=alibi_slopes is not None,
        target=tgt,
        count_visits=count_visits,
    )
    nm, nk = Mp // bm, Sp // bk
    visits_spec = pl.BlockSpec((None, None, None, 1), lambda b, h, i, s: (b, h, i, s))
    grid = (B, K, nm, splits)
    o, lse, *visits = pl.pallas_call(
        functools.partial(_decode_kernel, st=st),
        grid=grid,
        in_specs=[
            pl.BlockSpec((None, None, bm, Hp), lambda b, h, i, s: (b, h, i, 0)),
            pl.BlockSpec((None, None, Sp, Hp), lambda b, h, i, s: (b, h, 0, 0)),
            pl.BlockSpec((None, None, Sp, Hvp), lambda b, h, i, s: (b, h, 0, 0)),
            pl.BlockSpec((None, bm, 1), lambda b, h, i, s: (b, i, 0)),
            pl.BlockSpec((None, nk, 1, bk), lambda b, h, i, s: (b, 0, 0, 0)),
            pl.BlockSpec((None, bm, 1), lambda b, h, i, s: (h, i, 0)),
            pl.BlockSpec((None, None, 1, nk), lambda b, h, i, s: (b, i, 0, 0), memory_space=tgt.scalar_space),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, bm, Hvp), lambda b, h, i, s: (b, h, s, i, 0)),
            pl.BlockSpec((None, None, None, bm, 1), lambda b, h, i, s: (b, h, s, i, 0)),
            *([visits_spec] if count_visits else []),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((B, K, splits, Mp, Hvp), jnp.float32),
            jax.ShapeDtypeStruct((B, K, splits, Mp, 1), jnp.float32),
            *([jax.ShapeDtypeStruct((B, K, nm, splits), jnp.int32)] if count_visits else []),
        ],
        interpret=tgt.interpret,
        compiler_params=tgt.compiler_params(Hp, len(grid)),
        name="flash_decode",
    )(q_BKMH, k_BKSH, v_BKSH, qpos_BM[:, :, None], as_blocks(kpos_BS, bk), slopes_KM[:, :, None], table_BMS[:, :, None])
    return combine_splits(o, lse, q_BTNH, Hv), (visits or [None])[0]


def decode_attention(
    q_BTNH: jax.Array,
    k_BKSH: jax.Array,
    v_BKSH: jax.Array,
    mask: Mask,
    *,
    scale: float | None = None,
    softcap: float | None = None,
    alibi_slopes: jax.Array | None = None,
    block_m: int | None = None,
    block_k: int = 128,
    num_splits: int = 16,
    interpret: bool | None = None,
    platform: str | None = None,
) -> jax.Array:
    """Attention of q [B, T, N, H] over a decode cache k [B, K, S, H], v [B, K, S, Hv] under `mask` (its key
    positions are the cache slots' positions, -1 for empty) -> [B, T, N, Hv]. The cache is cut into at most
    `num_splits` chunks of whole `block_k` blocks; rows come in blocks of `block_m` (default 64, 128 on TPUs).
    `platform` picks the lowering (flash_attention.target). Forward only (decoding takes no gradients)."""
    args = (scale, softcap, alibi_slopes, block_m, block_k, num_splits, interpret, platform)
    return _decode(q_BTNH, k_BKSH, v_BKSH, mask, *args)[0]


def visited_blocks(q_BTNH, k_BKSH, v_BKSH, mask: Mask, **kw) -> jax.Array:
    """[B, K, row blocks, splits]: how many key blocks each program computed (the kernel counts them)."""
    names = ("scale", "softcap", "alibi_slopes", "block_m", "block_k", "num_splits", "interpret", "platform")
    defaults = (None, None, None, None, 128, 16, None, None)
    return _decode(q_BTNH, k_BKSH, v_BKSH, mask, *(kw.get(n, d) for n, d in zip(names, defaults)), True)[1]
