"""Flash-decoding in Pallas over a paged cache: the keys and values are read a page at a time through each row's page
table, never gathered into a dense [B, K, S, H] copy.

q [B, T, N, H] (T = 1 when sampling, a chunk when prefilling) attends over pools of pages k [P, K, page_size, H],
v [P, K, page_size, Hv] (model/cache.py's `Paged`): row b's slot s is page table[b, s // page_size], offset
s % page_size, and `mask.k_positions_BS` [B, max_pages * page_size] gives every slot's position (-1: invisible; page
0 is the null page, whose slots always are). Everything but where a key block comes from is decode_attention.py's:
the G = N / K query heads of a K/V head and the T queries stacked into M = T * G rows, the grid (batch row, K/V
head, row block, split), the online softmax in float32 over key blocks (here: one page each), the blocks the mask
empties skipped (`block_table` from each page's smallest/largest position: the null page and unwritten pages are
never read), and the log-sum-exp combine of the splits. The same results as `decode_attention` on the gathered
dense arrays.

It lowers two ways, as the page table can be read there:
- Pallas' Triton lowering (GPUs; also how the CPU interprets it): one program walks its split's pages in a loop,
  reading a page's id from the table and then that page of the whole pool (a dynamic index on its leading axis:
  pointer arithmetic in Triton, as jax's own GPU paged attention does; Triton has no scalar prefetch).
- Mosaic (TPUs): a pool does not fit in VMEM, so the pages are a fifth grid axis, run in order, and the page table
  is prefetched into SMEM (`PrefetchScalarGridSpec`), where the K/V BlockSpecs' index maps read it: Pallas' pipeline
  then copies each step's page from HBM while the one before is computed (the idea of jax's TPU paged attention,
  which copies its pages by hand). The online softmax's state lives in VMEM scratch between steps. A page that no
  row block visits names the last page fetched, so its step copies nothing. The flat table (B x max_pages words)
  sits whole in SMEM, which is small: how large a batch of tables fits is unmeasured.
Pages must be blocks the lowering tiles (`page_block`): powers of two >= 16 for Triton, multiples of 8 for Mosaic.
A head dim the lowering does not tile is zero-padded as decode_attention's is, which here copies the whole pools.

Verified by interpretation on CPU, both ways (the Triton-shaped loop, and the Mosaic-shaped grid with its scalar
prefetch and scratch, `platform='tpu'`), against the reference decode on the gathered cache
(tests/test_paged_attention.py), by export for 'cuda' and 'tpu' on CPU and, with libtpu installed, by Mosaic's
compiler for a compile-only TPU (tests/test_kernel_lowering.py). Once, by hand: Mosaic (libtpu 0.0.42) compiled the
grid for v4, v5e, v5p and v6e, and pip's Triton 3.8 compiled the loop's Triton IR to sm_90 cubin (bfloat16, float16
and float32, heads of 64 to 576 wide, at most 64 KiB of shared memory). Never run on a GPU or TPU here: its speed
and its numerics on hardware are unmeasured.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from model.kernels.decode_attention import (
    Static,
    combine_splits,
    empty_carry,
    online_step,
    row_block,
    stack_queries,
    write_split,
)
from model.kernels.flash_attention import Target, as_blocks, block_table, pad_to, round_up, target
from model.mask import Mask


def page_block(tgt: Target, page_size: int) -> int:
    """A page as the key block; ValueError (one line) where the lowering cannot tile it. Triton: powers of two >= 16
    (`Target.block`). Mosaic compiled every page size tried (3 to 128, v4 to v6e), but a page that is no multiple
    of 8 rows leaves part of an 8-row sublane tile empty at every step: multiples of 8."""
    if tgt.mosaic and page_size % 8:
        raise ValueError(f"page_size={page_size}: must be a multiple of 8 (Mosaic, TPU)")
    return page_size if tgt.mosaic else tgt.block("page_size", page_size, page_size)


def _loop_kernel(q_ref, k_ref, v_ref, qpos_ref, kpos_ref, slopes_ref, pages_ref, o_ref, lse_ref, *, st):
    """One split's pages in a loop; k_ref/v_ref are the K/V head's whole pool [P, page_size, H]."""
    split = pl.program_id(3)
    q_MD, q_M1 = q_ref[...], qpos_ref[...]
    slope_M1 = slopes_ref[...] if st.alibi else None

    def body(j, carry):
        j = split * st.chunk_blocks + j
        page = pages_ref[0, j]  # -1: a page the mask empties

        def visit(carry):
            return online_step(st, q_MD, q_M1, slope_M1, k_ref[page], v_ref[page], kpos_ref[j], carry)

        return lax.cond(page >= 0, visit, lambda c: c, carry)

    state = lax.fori_loop(0, st.chunk_blocks, body, empty_carry(q_MD.shape[0], o_ref.shape[-1]))
    write_split(state, o_ref, lse_ref)


def _grid_kernel(
    fetch_ref, q_ref, k_ref, v_ref, qpos_ref, kpos_ref, slopes_ref, pages_ref, o_ref, lse_ref, *state_refs, st
):
    """One page per step (grid axis 4); k_ref/v_ref are the page the index maps fetched [page_size, H]."""
    split, j = pl.program_id(3), pl.program_id(4)

    @pl.when(j == 0)
    def _():
        for ref, x in zip(state_refs, empty_carry(*state_refs[0].shape)):
            ref[...] = x

    @pl.when(pages_ref[0, split * st.chunk_blocks + j] >= 0)
    def _():
        slope_M1 = slopes_ref[...] if st.alibi else None
        carry = tuple(ref[...] for ref in state_refs)
        carry = online_step(st, q_ref[...], qpos_ref[...], slope_M1, k_ref[...], v_ref[...], kpos_ref[...], carry)
        for ref, x in zip(state_refs, carry):
            ref[...] = x

    @pl.when(j == st.chunk_blocks - 1)
    def _():
        write_split(tuple(ref[...] for ref in state_refs), o_ref, lse_ref)


def paged_decode_attention(
    q_BTNH: jax.Array,
    k_PKsH: jax.Array,
    v_PKsH: jax.Array,
    table_BM: jax.Array,
    mask: Mask,
    *,
    scale: float | None = None,
    softcap: float | None = None,
    alibi_slopes: jax.Array | None = None,
    block_m: int | None = None,
    num_splits: int = 16,
    interpret: bool | None = None,
    platform: str | None = None,
) -> jax.Array:
    """Attention of q [B, T, N, H] over the pages k [P, K, page_size, H], v [P, K, page_size, Hv] that each row's
    page table [B, max_pages] names, under `mask` (its key positions [B, max_pages * page_size] are the slots'
    positions, -1 for invisible ones) -> [B, T, N, Hv]: `decode_attention.decode_attention` on the gathered cache.
    The table is cut into at most `num_splits` chunks of pages; rows come in blocks of `block_m` (default 64, 128 on
    TPUs). `platform` picks the lowering (flash_attention.target). Forward only."""
    B, T, N, H = q_BTNH.shape
    _, K, ps, Hv = v_PKsH.shape
    n = table_BM.shape[1]
    if k_PKsH.shape[:3] != v_PKsH.shape[:3] or k_PKsH.shape[-1] != H or table_BM.shape[0] != B or N % K:
        raise ValueError(
            f"q {q_BTNH.shape}, k {k_PKsH.shape}, v {v_PKsH.shape}, table {table_BM.shape}: want "
            "[B, T, N, H], [P, K, page_size, H], [P, K, page_size, Hv], [B, max_pages]"
        )
    if mask.k_positions_BS.shape != (B, n * ps):
        raise ValueError(f"key positions {mask.k_positions_BS.shape}: want [B, max_pages * page_size] = {(B, n * ps)}")
    if mask.has_segments:
        raise ValueError("paged_decode_attention: the decode cache keeps no document ids (mask has segments)")
    M = T * N // K
    tgt = target(platform, interpret)
    ps = page_block(tgt, ps)
    bm = row_block(tgt, block_m, M)
    chunk = -(-n // max(1, min(num_splits, n)))
    splits = -(-n // chunk)  # none left empty
    Mp, n_pad = round_up(M, bm), splits * chunk
    Hp, Hvp = tgt.head_dim(H), tgt.head_dim(Hv)

    q_BKMH, qpos_BM, slopes_KM = stack_queries(q_BTNH, mask, alibi_slopes, K, Mp, Hp)
    k_PKsH, v_PKsH = pad_to(k_PKsH, 3, Hp), pad_to(v_PKsH, 3, Hvp)
    kpos_BS = pad_to(mask.k_positions_BS.astype(jnp.int32), 1, n_pad * ps, -1)
    table_Bn = pad_to(table_BM.astype(jnp.int32), 1, n_pad)  # padding entries: the null page, never visited
    visit_BMn = block_table(Mask(qpos_BM, kpos_BS, window=mask.window), bm, ps)
    pages_BMn = jnp.where(visit_BMn != 0, table_Bn[:, None], -1)
    st = Static(
        scale=float(H**-0.5 if scale is None else scale),
        softcap=float(softcap or 0.0),
        window=int(mask.window),
        block_k=ps,
        chunk_blocks=chunk,
        alibi=alibi_slopes is not None,
        target=tgt,
    )
    args = (q_BKMH, k_PKsH, v_PKsH, qpos_BM[:, :, None], as_blocks(kpos_BS, ps), slopes_KM[:, :, None])
    shape = [
        jax.ShapeDtypeStruct((B, K, splits, Mp, Hvp), jnp.float32),
        jax.ShapeDtypeStruct((B, K, splits, Mp, 1), jnp.float32),
    ]
    nm = Mp // bm
    if not tgt.mosaic:
        o, lse = pl.pallas_call(
            functools.partial(_loop_kernel, st=st),
            grid=(B, K, nm, splits),
            in_specs=[
                pl.BlockSpec((None, None, bm, Hp), lambda b, h, i, s: (b, h, i, 0)),
                pl.BlockSpec((k_PKsH.shape[0], None, ps, Hp), lambda b, h, i, s: (0, h, 0, 0)),
                pl.BlockSpec((v_PKsH.shape[0], None, ps, Hvp), lambda b, h, i, s: (0, h, 0, 0)),
                pl.BlockSpec((None, bm, 1), lambda b, h, i, s: (b, i, 0)),
                pl.BlockSpec((None, n_pad, 1, ps), lambda b, h, i, s: (b, 0, 0, 0)),
                pl.BlockSpec((None, bm, 1), lambda b, h, i, s: (h, i, 0)),
                pl.BlockSpec((None, None, 1, n_pad), lambda b, h, i, s: (b, i, 0, 0)),
            ],
            out_specs=[
                pl.BlockSpec((None, None, None, bm, Hvp), lambda b, h, i, s: (b, h, s, i, 0)),
                pl.BlockSpec((None, None, None, bm, 1), lambda b, h, i, s: (b, h, s, i, 0)),
            ],
            out_shape=shape,
            interpret=tgt.interpret,
            compiler_params=tgt.compiler_params(Hp, 4),
            name="paged_flash_decode",
        )(*args, pages_BMn[:, :, None])
        return combine_splits(o, lse, q_BTNH, Hv)

    # A page no row block visits names the last one fetched before it: the pipeline sees the same block, copies nothing.
    last_Bn = lax.cummax(jnp.where(visit_BMn.any(1), jnp.arange(n_pad), 0), axis=1)
    fetch_N = jnp.take_along_axis(table_Bn, last_Bn, axis=1).reshape(-1)  # flat: SMEM pads a 2-D array's rows
    from jax.experimental.pallas import tpu as pltpu

    def page(b, h, i, s, j, fetch):
        return fetch[b * n_pad + s * chunk + j], h, 0, 0

    o, lse = pl.pallas_call(
        functools.partial(_grid_kernel, st=st),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(B, K, nm, splits, chunk),
            in_specs=[
                pl.BlockSpec((None, None, bm, Hp), lambda b, h, i, s, j, f: (b, h, i, 0)),
                pl.BlockSpec((None, None, ps, Hp), page),
                pl.BlockSpec((None, None, ps, Hvp), page),
                pl.BlockSpec((None, bm, 1), lambda b, h, i, s, j, f: (b, i, 0)),
                pl.BlockSpec((None, None, 1, ps), lambda b, h, i, s, j, f: (b, s * chunk + j, 0, 0)),
                pl.BlockSpec((None, bm, 1), lambda b, h, i, s, j, f: (h, i, 0)),
                pl.BlockSpec((None, None, 1, n_pad), lambda b, h, i, s, j, f: (b, i, 0, 0), memory_space=pltpu.SMEM),
            ],
            out_specs=[
                pl.BlockSpec((None, None, None, bm, Hvp), lambda b, h, i, s, j, f: (b, h, s, i, 0)),
                pl.BlockSpec((None, None, None, bm, 1), lambda b, h, i, s, j, f: (b, h, s, i, 0)),
            ],
            scratch_shapes=[
                pltpu.VMEM((bm, Hvp), jnp.float32),
                pltpu.VMEM((bm, 1), jnp.float32),
                pltpu.VMEM((bm, 1), jnp.float32),
            ],
        ),
        out_shape=shape,
        interpret=tgt.interpret,
        compiler_params=tgt.compiler_params(Hp, 5, arbitrary=1),
        name="paged_flash_decode",
    )(fetch_N, *args, pages_BMn[:, :, None])
    return combine_splits(o, lse, q_BTNH, Hv)
