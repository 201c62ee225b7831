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
that share the K/V head, computing the transposed tile (keys x queries) so no tile is ever transposed
(FlashAttention-2's scheme; no [T, S] matrix is ever stored).

Where the kernels lower (`Target`, from `platform`: jax.default_backend() unless given): 'cpu' interprets them
(how the tests run them), 'gpu' lowers them through Pallas' Triton lowering, 'tpu' through Mosaic. One layout
serves all three, so the interpreted kernels the tests check are the compiled ones: the heads are folded into the
last axis (q [B, T, N * D], a free reshape: no transpose, on GPUs the same strided loads as [B, T, N, D]), so a
block is a [rows, head dim] tile at lane offset n * D; vectors along the sequence (positions, segment ids,
log-sum-exp) are rows [1, X] (lane-dense), and a kernel that loops over blocks reads them as [X / block, 1, block]
(a dynamic index on a leading axis, which Mosaic takes; a dynamic lane offset it may not); the block table and the
ALiBi slopes, read one scalar at a time, live in SMEM on TPUs. Each target pads what its lowering tiles: Triton
blocks and head dims to powers of two >= 16, Mosaic blocks to multiples of 128 and head dims to multiples of 128
(the MXU is 128 wide: a 64-wide head costs it no fewer passes). Lengths that are not multiples of the blocks are
padded inside the wrapper (padding keys have position -1, which no query reads; padded queries read nothing and
are cut off). A query that sees no key at all gets zeros (the plain-JAX reference would average every value).

How this is verified: interpreted on CPU against the reference (tests/test_flash_attention.py), and lowered for
'cuda' (to Triton's custom call) and 'tpu' (to Mosaic's) with jax.export on CPU (tests/test_kernel_lowering.py).
Export runs Pallas' lowering (with jaxlib 0.10.2, to the Triton IR and the Mosaic module the custom calls carry;
later jaxlibs also run Triton's compiler in it). With libtpu installed, the same test file also compiles them through
XLA's TPU compiler (Mosaic included) for a compile-only TPU topology; that passed for v4, v5e, v5p and v6e with
libtpu 0.0.42, and `mosaic_vmem_bytes` agreed with Mosaic's VMEM check at 4k (fits) and 8k tokens (does not).
Once, by hand, the Triton IR of all four kernels (bfloat16 and float32, heads of 64 and 128) compiled to sm_90
cubin with pip's triton 3.9 (a newer Triton than XLA's), each within an H100's shared memory. The kernels have
never run on a GPU or TPU here: their speed and their numerics on hardware are unmeasured.
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
PLATFORMS = {"cpu": "cpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu", "tpu": "tpu"}  # name -> kernel target


def pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pad_to(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
    if x.shape[axis] == size:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


# -- where the kernels lower, and what that lowering needs of blocks and layouts -----------------------------------


@dataclasses.dataclass(frozen=True)
class Target:
    """How the kernels are lowered: `platform` 'cpu', 'gpu' (Pallas' Triton lowering) or 'tpu' (Mosaic), and
    whether they are interpreted instead (always on 'cpu'; elsewhere a debugging aid that keeps the platform's
    blocks and layouts)."""

    platform: str
    interpret: bool

    @property
    def mosaic(self) -> bool:
        return self.platform == "tpu"

    @property
    def lanes(self) -> int:
        """How wide a vector is broadcast to turn a row into a column (Mosaic transposes whole 128-lane tiles)."""
        return 128 if self.mosaic else 1

    @property
    def scalar_space(self):
        """Memory space of the arrays the kernels read one scalar at a time (the block table, ALiBi slopes)."""
        if not self.mosaic:
            return None
        from jax.experimental.pallas import tpu as pltpu

        return pltpu.SMEM

    def block(self, name: str, requested: int, length: int, rows: bool = False) -> int:
        """The block actually used for `length` entries (shrunk for short lengths); ValueError (one line) when the
        lowering cannot tile it. `rows`: a block of decode rows only ever on sublanes (multiples of 16 on TPUs)."""
        if requested < 1:
            raise ValueError(f"{name}={requested}: must be positive")
        if self.mosaic:
            multiple = 16 if rows else 128
            block = min(requested, round_up(length, multiple))
            if block % multiple:
                raise ValueError(f"{name}={requested}: must be a multiple of {multiple} (Mosaic, TPU)")
            return block
        block = min(requested, max(pow2(length), 16))
        if not self.interpret and (block < 16 or block & (block - 1)):
            raise ValueError(f"{name}={requested}: must be a power of two >= 16 (Triton, GPU)")
        return block

    def default_blocks(self, head_bytes: int) -> tuple[int, int]:
        """(block_q, block_k) when not given. Triton: 128 x 64, but 64 x 64 once a head's row takes over 256 bytes
        (float32 heads over 64 wide): compiled for sm_90 by Triton 3.9, the dk/dv kernel's tiles at 128 x 64 with
        a float32 head of 128 take 320 KiB of shared memory, over the 227 KiB an H100 or H200 has (64 x 64: 192)."""
        if self.mosaic:
            return 128, 128
        return (64 if head_bytes > 256 else 128), 64

    def head_dim(self, d: int) -> int:
        """A head dim padded to what the lowering tiles (zeros: q k^T and the kept columns of p v are unchanged)."""
        if self.mosaic:
            return round_up(d, 128)
        return pow2(d) if self.interpret else max(16, pow2(d))

    def compiler_params(self, head_dim: int, grid_rank: int, arbitrary: int = 0):
        """Triton's launch settings (those of jax's own Pallas attention: 8 warps for heads over 64); Mosaic's grid
        axes, parallel (every program writes its own output block), so a TPU may split them across cores, but for
        the last `arbitrary` ones, which run in order (a kernel that accumulates over them in scratch)."""
        if self.interpret:
            return None
        if self.mosaic:
            from jax.experimental.pallas import tpu as pltpu

            axes = (pltpu.PARALLEL,) * (grid_rank - arbitrary) + (pltpu.ARBITRARY,) * arbitrary
            return pltpu.CompilerParams(dimension_semantics=axes)
        from jax.experimental.pallas import triton as plgpu

        return plgpu.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2)


def target(platform: str | None = None, interpret: bool | None = None) -> Target:
    """The target for `platform` ('cpu', 'gpu' or 'cuda', 'tpu'; None: jax.default_backend()): interpreted on CPUs
    unless `interpret` says otherwise."""
    name = jax.default_backend() if platform is None else platform
    if name not in PLATFORMS:
        raise ValueError(f"platform={name!r}: one of {', '.join(PLATFORMS)}")
    kind = PLATFORMS[name]
    return Target(kind, kind == "cpu" if interpret is None else bool(interpret))


VMEM_BUDGET = 16 * 2**20  # bytes a TPU kernel may hold: the smallest default scoped VMEM limit (TPU v5e's)


def mosaic_vmem_bytes(T: int, G: int, D: int, Dv: int, itemsize: int) -> int:
    """An estimate of what the largest TPU kernel holds in VMEM for attention over T tokens, double-buffered: the
    forward and dq kernels keep a K/V head's whole k and v, the dk/dv kernel its G query heads' whole q and dO and
    their log-sum-exp and delta rows (each row padded to 8 sublanes); the tiles themselves are small beside them."""
    T, D, Dv = round_up(T, 128), round_up(D, 128), round_up(Dv, 128)
    kv = T * (D + Dv) * itemsize
    q_do = G * T * (D + Dv) * itemsize + 2 * G * T * 8 * 4
    return 2 * max(kv, q_do)


def column(x_1X: jax.Array, lanes: int) -> jax.Array:
    """[1, X] -> [X, 1], through a [lanes, X] broadcast (Mosaic transposes whole tiles; elsewhere lanes = 1)."""
    return jnp.broadcast_to(x_1X, (lanes, x_1X.shape[1])).T[:, :1]


def row(x_X1: jax.Array, lanes: int) -> jax.Array:
    """[X, 1] -> [1, X] (the inverse of `column`)."""
    return jnp.broadcast_to(x_X1, (x_X1.shape[0], lanes)).T[:1, :]


def as_blocks(x_BX: jax.Array, block: int) -> jax.Array:
    """[B, X] -> [B, X / block, 1, block]: rows a kernel reads block by block with a leading-axis index."""
    B, X = x_BX.shape
    return x_BX.reshape(B, X // block, 1, block)


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
    target: Target
    count_visits: bool = False


def dot_nt(a, b):
    """a @ b^T in float32."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def dot_nn(a, b):
    """a @ b in float32."""
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def scores(st: Static, s, qpos, kpos, qseg, kseg, slope):
    """The logits of one tile from its raw products `s` (queries x keys, or keys x queries in the dk/dv kernel:
    the positions and segment ids come as a column and a row that broadcast to the tile either way), in float32,
    the mask, and tanh(raw / cap) for the soft-cap's derivative (None without a cap). Masked logits are NEG_INF."""
    s = s * st.scale
    tanh = None
    if st.softcap > 0:
        tanh = jnp.tanh(s / st.softcap)
        s = st.softcap * tanh
    if st.alibi:
        s = s - slope * (qpos - kpos).astype(jnp.float32)
    ok = (kpos <= qpos) & (jnp.broadcast_to(kpos, s.shape) >= 0)  # compare at full size: no broadcast of bools
    if st.window:
        ok &= qpos - kpos < st.window
    if st.segments:
        ok &= qseg == kseg
    return jnp.where(ok, s, NEG_INF), ok, tanh


def kv_head(n, G: int):
    """The K/V head query head n reads (lax.div: n >= 0, and `//` on a traced int lowers through `sign`, which
    Mosaic's lowering asks the attached TPU about)."""
    return lax.div(n, G)


def _named(names, refs):
    return dict(zip(names, refs, strict=True))


def _forward_kernel(*refs, st: Static, names):
    r = _named(names, refs)
    n, nk, lanes = pl.program_id(1), r["table"].shape[-1], st.target.lanes
    q_QD = r["q"][...]
    qpos_Q1 = column(r["qpos"][...], lanes)
    qseg_Q1 = column(r["qseg"][...], lanes) if st.segments else None
    slope = r["slopes"][n] if st.alibi else None
    bq, bk, Dv = q_QD.shape[0], st.block_k, r["o"].shape[-1]

    def visit(j, carry):
        acc_QV, m_Q1, l_Q1, visits = carry
        ks = pl.ds(pl.multiple_of(j * bk, bk), bk)
        kseg_1K = r["kseg"][j] if st.segments else None
        s_QK = dot_nt(q_QD, r["k"][ks, :])
        s_QK, ok_QK, _ = scores(st, s_QK, qpos_Q1, r["kpos"][j], qseg_Q1, kseg_1K, slope)
        m_new_Q1 = jnp.maximum(m_Q1, s_QK.max(-1, keepdims=True))
        p_QK = jnp.where(ok_QK, jnp.exp(s_QK - m_new_Q1), 0.0)
        alpha_Q1 = jnp.exp(m_Q1 - m_new_Q1)
        v_KV = r["v"][ks, :]
        acc_QV = alpha_Q1 * acc_QV + dot_nn(p_QK.astype(v_KV.dtype), v_KV)
        return acc_QV, m_new_Q1, alpha_Q1 * l_Q1 + p_QK.sum(-1, keepdims=True), visits + 1

    def body(j, carry):
        return lax.cond(r["table"][0, j] != 0, functools.partial(visit, j), lambda c: c, carry)

    init = (jnp.zeros((bq, Dv), jnp.float32), jnp.full((bq, 1), NEG_INF, jnp.float32), jnp.zeros((bq, 1), jnp.float32))
    acc_QV, m_Q1, l_Q1, visits = lax.fori_loop(0, nk, body, (*init, jnp.int32(0)))
    seen_Q1 = l_Q1 > 0
    l_Q1 = jnp.where(seen_Q1, l_Q1, 1.0)
    r["o"][...] = (acc_QV / l_Q1).astype(r["o"].dtype)
    r["lse"][...] = row(jnp.where(seen_Q1, m_Q1 + jnp.log(l_Q1), -NEG_INF), lanes)
    if st.count_visits:  # a debug output of interpreted kernels (its [1] block is no tile Mosaic lowers)
        r["visits"][...] = jnp.full((1,), visits, jnp.int32)


def _mask_inputs(st: Static, qpos, kpos, qseg, kseg, slopes, q_spec, k_spec, slopes_spec):
    """The (name, array, BlockSpec) of the mask's inputs the kernels take."""
    out = [("qpos", qpos, q_spec), ("kpos", kpos, k_spec)]
    if st.segments:
        out += [("qseg", qseg, q_spec), ("kseg", kseg, k_spec)]
    if st.alibi:
        out += [("slopes", slopes, slopes_spec)]
    return out


def _call(kernel, st: Static, grid, inputs, outputs, name, head_dim):
    """pallas_call over (name, array, spec) inputs and (name, ShapeDtypeStruct, spec) outputs; returns a dict."""
    names = tuple(n for n, _, _ in inputs) + tuple(n for n, _, _ in outputs)
    outs = pl.pallas_call(
        functools.partial(kernel, st=st, names=names),
        grid=grid,
        in_specs=[s for _, _, s in inputs],
        out_specs=[s for _, _, s in outputs],
        out_shape=[a for _, a, _ in outputs],
        interpret=st.target.interpret,
        compiler_params=st.target.compiler_params(head_dim, len(grid)),
        name=name,
    )(*[a for _, a, _ in inputs])
    return dict(zip((n for n, _, _ in outputs), outs, strict=True))


@dataclasses.dataclass(frozen=True)
class Dims:
    """The padded sizes of one problem (static)."""

    B: int
    T: int
    S: int
    N: int
    K: int
    D: int
    Dv: int

    @property
    def G(self) -> int:
        return self.N // self.K


def _forward(st: Static, dims: Dims, q, k, v, qpos, kpos, qseg, kseg, slopes, table):
    """(out [B, T, N * Dv], lse [B, N, 1, T] float32, visits [B, N, T / block_q] or None) on padded inputs:
    q [B, T, N * D], k [B, S, K * D], v [B, S, K * Dv], positions and segment ids [B, 1, T] / [B, 1, S]."""
    B, T, S, N, D, Dv, G = dims.B, dims.T, dims.S, dims.N, dims.D, dims.Dv, dims.G
    bq, bk = st.block_q, st.block_k
    nq, nk = T // bq, S // bk
    q_block = pl.BlockSpec((None, bq, D), lambda b, n, i: (b, i, n))
    inputs = [
        ("q", q, q_block),
        ("k", k, pl.BlockSpec((None, S, D), lambda b, n, i: (b, 0, kv_head(n, G)))),
        ("v", v, pl.BlockSpec((None, S, Dv), lambda b, n, i: (b, 0, kv_head(n, G)))),
        *_mask_inputs(
            st,
            qpos,
            as_blocks(kpos[:, 0], bk),
            qseg,
            None if kseg is None else as_blocks(kseg[:, 0], bk),
            slopes,
            pl.BlockSpec((None, 1, bq), lambda b, n, i: (b, 0, i)),
            pl.BlockSpec((None, nk, 1, bk), lambda b, n, i: (b, 0, 0, 0)),
            pl.BlockSpec((N,), lambda b, n, i: (0,), memory_space=st.target.scalar_space),
        ),  # fmt: skip
        (
            "table",
            table[:, :, None, :],
            pl.BlockSpec((None, None, 1, nk), lambda b, n, i: (b, i, 0, 0), memory_space=st.target.scalar_space),
        ),
    ]
    outputs = [
        ("o", jax.ShapeDtypeStruct((B, T, N * Dv), q.dtype), pl.BlockSpec((None, bq, Dv), lambda b, n, i: (b, i, n))),
        (
            "lse",
            jax.ShapeDtypeStruct((B, N, 1, T), jnp.float32),
            pl.BlockSpec((None, None, 1, bq), lambda b, n, i: (b, n, 0, i)),
        ),
    ]
    if st.count_visits:
        spec = pl.BlockSpec((None, None, 1), lambda b, n, i: (b, n, i))
        outputs.append(("visits", jax.ShapeDtypeStruct((B, N, nq), jnp.int32), spec))
    out = _call(_forward_kernel, st, (B, N, nq), inputs, outputs, "flash_attention_fwd", D)
    return out["o"], out["lse"], out.get("visits")


def _dq_kernel(*refs, st: Static, names):
    r = _named(names, refs)
    n, nk, lanes = pl.program_id(1), r["table"].shape[-1], st.target.lanes
    q_QD, do_QV = r["q"][...], r["do"][...]
    lse_Q1, delta_Q1 = column(r["lse"][...], lanes), column(r["delta"][...], lanes)
    qpos_Q1 = column(r["qpos"][...], lanes)
    qseg_Q1 = column(r["qseg"][...], lanes) if st.segments else None
    slope = r["slopes"][n] if st.alibi else None
    bk = st.block_k

    def visit(j, dq_QD):
        ks = pl.ds(pl.multiple_of(j * bk, bk), bk)
        k_KD, v_KV = r["k"][ks, :], r["v"][ks, :]
        kseg_1K = r["kseg"][j] if st.segments else None
        s_QK, ok_QK, tanh_QK = scores(st, dot_nt(q_QD, k_KD), qpos_Q1, r["kpos"][j], qseg_Q1, kseg_1K, slope)
        p_QK = jnp.where(ok_QK, jnp.exp(s_QK - lse_Q1), 0.0)
        ds_QK = p_QK * (dot_nt(do_QV, v_KV) - delta_Q1)
        if tanh_QK is not None:  # d/dx [c tanh(x / c)] = 1 - tanh(x / c)^2
            ds_QK = ds_QK * (1.0 - tanh_QK * tanh_QK)
        return dq_QD + dot_nn(ds_QK.astype(k_KD.dtype), k_KD)

    def body(j, dq_QD):
        return lax.cond(r["table"][0, j] != 0, functools.partial(visit, j), lambda c: c, dq_QD)

    dq_QD = lax.fori_loop(0, nk, body, jnp.zeros(q_QD.shape, jnp.float32))
    r["dq"][...] = (dq_QD * st.scale).astype(r["dq"].dtype)


def _dkv_kernel(*refs, st: Static, names, G: int):
    """dk, dv of one key block of K/V head h, over the G query heads that share it; the tile is keys x queries
    (s^T = k q^T), so p^T v-style products need no transpose and the query-side vectors are rows."""
    r = _named(names, refs)
    h, nq, lanes = pl.program_id(1), r["table"].shape[-1], st.target.lanes
    k_KD, v_KV = r["k"][...], r["v"][...]
    D, Dv = k_KD.shape[-1], v_KV.shape[-1]
    kpos_K1 = column(r["kpos"][...], lanes)
    kseg_K1 = column(r["kseg"][...], lanes) if st.segments else None
    bq = st.block_q
    carry = (jnp.zeros(k_KD.shape, jnp.float32), jnp.zeros(v_KV.shape, jnp.float32))
    for g in range(G):  # unrolled: head g's columns of q and do are a static lane slice
        slope = r["slopes"][h * G + g] if st.alibi else None

        def visit(i, carry, g=g, slope=slope):
            dk_KD, dv_KV = carry
            qs = pl.ds(pl.multiple_of(i * bq, bq), bq)
            q_QD, do_QV = r["q"][qs, g * D : (g + 1) * D], r["do"][qs, g * Dv : (g + 1) * Dv]
            lse_1Q, delta_1Q = r["lse"][g, i], r["delta"][g, i]
            qseg_1Q = r["qseg"][i] if st.segments else None
            s_KQ, ok_KQ, tanh_KQ = scores(st, dot_nt(k_KD, q_QD), r["qpos"][i], kpos_K1, qseg_1Q, kseg_K1, slope)
            p_KQ = jnp.where(ok_KQ, jnp.exp(s_KQ - lse_1Q), 0.0)
            dv_KV = dv_KV + dot_nn(p_KQ.astype(do_QV.dtype), do_QV)
            ds_KQ = p_KQ * (dot_nt(v_KV, do_QV) - delta_1Q)
            if tanh_KQ is not None:
                ds_KQ = ds_KQ * (1.0 - tanh_KQ * tanh_KQ)
            return dk_KD + dot_nn(ds_KQ.astype(q_QD.dtype), q_QD), dv_KV

        def body(i, carry, visit=visit):
            return lax.cond(r["table"][0, i] != 0, functools.partial(visit, i), lambda c: c, carry)

        carry = lax.fori_loop(0, nq, body, carry)
    dk_KD, dv_KV = carry
    r["dk"][...] = (dk_KD * st.scale).astype(r["dk"].dtype)
    r["dv"][...] = dv_KV.astype(r["dv"].dtype)


def _backward(st: Static, dims: Dims, q, k, v, qpos, kpos, qseg, kseg, slopes, table, o, lse, do):
    B, T, S, N, K, D, Dv, G = dims.B, dims.T, dims.S, dims.N, dims.K, dims.D, dims.Dv, dims.G
    bq, bk = st.block_q, st.block_k
    nq, nk = T // bq, S // bk
    o_BTNV, do_BTNV = o.reshape(B, T, N, Dv), do.reshape(B, T, N, Dv)
    delta = jnp.einsum("btnv,btnv->bnt", o_BTNV.astype(jnp.float32), do_BTNV.astype(jnp.float32))[:, :, None]
    space = st.target.scalar_space
    slopes_spec = lambda: pl.BlockSpec((N,), lambda b, h, i: (0,), memory_space=space)  # noqa: E731

    q_block = pl.BlockSpec((None, bq, D), lambda b, n, i: (b, i, n))
    row_block = pl.BlockSpec((None, None, 1, bq), lambda b, n, i: (b, n, 0, i))
    dq_inputs = [
        ("q", q, q_block),
        ("k", k, pl.BlockSpec((None, S, D), lambda b, n, i: (b, 0, kv_head(n, G)))),
        ("v", v, pl.BlockSpec((None, S, Dv), lambda b, n, i: (b, 0, kv_head(n, G)))),
        ("do", do, pl.BlockSpec((None, bq, Dv), lambda b, n, i: (b, i, n))),
        ("lse", lse, row_block),
        ("delta", delta, row_block),
        *_mask_inputs(
            st,
            qpos,
            as_blocks(kpos[:, 0], bk),
            qseg,
            None if kseg is None else as_blocks(kseg[:, 0], bk),
            slopes,
            pl.BlockSpec((None, 1, bq), lambda b, n, i: (b, 0, i)),
            pl.BlockSpec((None, nk, 1, bk), lambda b, n, i: (b, 0, 0, 0)),
            slopes_spec(),
        ),  # fmt: skip
        (
            "table",
            table[:, :, None, :],
            pl.BlockSpec((None, None, 1, nk), lambda b, n, i: (b, i, 0, 0), memory_space=space),
        ),
    ]
    dq_out = [("dq", jax.ShapeDtypeStruct(q.shape, q.dtype), q_block)]
    dq = _call(_dq_kernel, st, (B, N, nq), dq_inputs, dq_out, "flash_dq", D)["dq"]

    k_block = pl.BlockSpec((None, bk, D), lambda b, h, j: (b, j, h))
    v_block = pl.BlockSpec((None, bk, Dv), lambda b, h, j: (b, j, h))
    group_rows = pl.BlockSpec((None, G, nq, 1, bq), lambda b, h, j: (b, h, 0, 0, 0))  # the G heads of K/V head h
    dkv_inputs = [
        ("q", q, pl.BlockSpec((None, T, G * D), lambda b, h, j: (b, 0, h))),
        ("k", k, k_block),
        ("v", v, v_block),
        ("do", do, pl.BlockSpec((None, T, G * Dv), lambda b, h, j: (b, 0, h))),
        ("lse", lse.reshape(B, N, nq, 1, bq), group_rows),
        ("delta", delta.reshape(B, N, nq, 1, bq), group_rows),
        *_mask_inputs(
            st,
            as_blocks(qpos[:, 0], bq),
            kpos,
            None if qseg is None else as_blocks(qseg[:, 0], bq),
            kseg,
            slopes,
            pl.BlockSpec((None, nq, 1, bq), lambda b, h, j: (b, 0, 0, 0)),
            pl.BlockSpec((None, 1, bk), lambda b, h, j: (b, 0, j)),
            slopes_spec(),
        ),  # fmt: skip
        (
            "table",
            table.transpose(0, 2, 1)[:, :, None, :],
            pl.BlockSpec((None, None, 1, nq), lambda b, h, j: (b, j, 0, 0), memory_space=space),
        ),
    ]
    outputs = [
        ("dk", jax.ShapeDtypeStruct(k.shape, k.dtype), k_block),
        ("dv", jax.ShapeDtypeStruct(v.shape, v.dtype), v_block),
    ]
    out = _call(functools.partial(_dkv_kernel, G=G), st, (B, K, nk), dkv_inputs, outputs, "flash_dkv", D)
    return dq, out["dk"], out["dv"]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _flash(st: Static, dims: Dims, q, k, v, qpos, kpos, qseg, kseg, slopes, table):
    return _forward(st, dims, q, k, v, qpos, kpos, qseg, kseg, slopes, table)[0]


def _flash_fwd(st, dims, q, k, v, qpos, kpos, qseg, kseg, slopes, table):
    o, lse, _ = _forward(st, dims, q, k, v, qpos, kpos, qseg, kseg, slopes, table)
    o, lse = checkpoint_name(o, REMAT_NAME), checkpoint_name(lse, REMAT_NAME)
    return o, (q, k, v, qpos, kpos, qseg, kseg, slopes, table, o, lse)


def _flash_bwd(st, dims, residuals, do):
    q, k, v, qpos, kpos, qseg, kseg, slopes, table, o, lse = residuals
    dq, dk, dv = _backward(st, dims, q, k, v, qpos, kpos, qseg, kseg, slopes, table, o, lse, do)
    return dq, dk, dv, None, None, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _prepare(q, k, v, mask: Mask, scale, softcap, alibi_slopes, block_q, block_k, tgt: Target, count_visits):
    """Checks shapes, pads lengths to the blocks and head dims to the target's tiles, folds the heads into the last
    axis; (Static, Dims, padded args)."""
    B, T, N, D = q.shape
    S, K, Dv = k.shape[1], k.shape[2], v.shape[-1]
    if k.shape[:3] != v.shape[:3] or k.shape[-1] != D or k.shape[0] != B or N % K:
        raise ValueError(
            f"q {q.shape}, k {k.shape}, v {v.shape}: want [B, T, N, D], [B, S, K, D], [B, S, K, Dv], K | N"
        )
    default_q, default_k = tgt.default_blocks(q.dtype.itemsize * tgt.head_dim(max(D, Dv)))
    bq = tgt.block("block_q", default_q if block_q is None else block_q, T)
    bk = tgt.block("block_k", default_k if block_k is None else block_k, S)
    Tp, Sp = round_up(T, bq), round_up(S, bk)
    dims = Dims(B, Tp, Sp, N, K, tgt.head_dim(D), tgt.head_dim(Dv))
    q = pad_to(pad_to(q, 1, Tp), 3, dims.D).reshape(B, Tp, N * dims.D)
    k = pad_to(pad_to(k, 1, Sp), 3, dims.D).reshape(B, Sp, K * dims.D)
    v = pad_to(pad_to(v, 1, Sp), 3, dims.Dv).reshape(B, Sp, K * dims.Dv)
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
        target=tgt,
        count_visits=count_visits,
    )
    rows = lambda x: None if x is None else x[:, None, :]  # noqa: E731  [B, X] -> [B, 1, X]
    args = (q, k, v, rows(padded.q_positions_BT), rows(padded.k_positions_BS), rows(qseg), rows(kseg), slopes, table)
    return st, dims, args


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: Mask,
    *,
    scale: float | None = None,
    softcap: float | None = None,
    alibi_slopes: jax.Array | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    interpret: bool | None = None,
    platform: str | None = None,
) -> jax.Array:
    """Attention of q [B, T, N, D] over k [B, S, K, D], v [B, S, K, Dv] under `mask` -> [B, T, N, Dv].

    `scale` defaults to D^-0.5; `softcap` (None or 0: off) caps the scaled logits as cap * tanh(x / cap);
    `alibi_slopes` [N] adds -slope_n (q_pos - k_pos) (no gradient). Blocks default to `Target.default_blocks`.
    `platform` picks the lowering (`target`; None: the default backend). Differentiable in q, k and v."""
    B, T, N, _ = q.shape
    Dv = v.shape[-1]
    tgt = target(platform, interpret)
    st, dims, args = _prepare(q, k, v, mask, scale, softcap, alibi_slopes, block_q, block_k, tgt, False)
    return _flash(st, dims, *args).reshape(B, dims.T, N, dims.Dv)[:, :T, :, :Dv]


def visited_blocks(
    q, k, v, mask: Mask, *, block_q: int | None = None, block_k: int | None = None, interpret=None, platform=None, **kw
) -> jax.Array:
    """[B, N, ceil(T / block_q)]: how many key blocks the forward kernel computed for each query block (a debug
    output of the kernel itself, so tests can prove the skipped blocks are skipped)."""
    tgt = target(platform, interpret)
    st, dims, args = _prepare(
        q, k, v, mask, kw.get("scale"), kw.get("softcap"), kw.get("alibi_slopes"), block_q, block_k, tgt, True
    )
    return _forward(st, dims, *args)[2]
