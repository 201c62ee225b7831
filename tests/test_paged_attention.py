"""The Pallas paged flash-decoding kernel (model/kernels/paged_attention.py), interpreted on CPU both ways it lowers
(the Triton-shaped loop over a pool, and the Mosaic-shaped page grid whose index maps read the prefetched table),
against the plain-JAX reference decode on the gathered cache: rows of different lengths on shuffled pages with null
entries, one token or a prefill chunk with padding queries, GQA, MQA, MHA, ALiBi, a soft-cap, a sliding window,
Dv != D and MLA's absorbed layout. Pages no query sees (the null page, unused and freed pages, pages left behind by
the window) hold NaN in the kernel's pools: reading one would poison the output. Also: page sizes a lowering
cannot tile are refused in one line, and model.attention's 'pallas' decode reads a view's pages. The C++ CPU kernel
(model/kernels/cpu_attention.cc's paged decode, what the engine runs on CPUs) against the same reference."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import ModelConfig
from model.attention import cpu_kernel_decode, pallas_decode, reference_decode
from model.cache import KVView, Paged
from model.kernels import cpu_attention
from model.kernels.paged_attention import paged_decode_attention
from model.mask import Mask
from model.positions import AlibiBias

REFERENCE = ModelConfig(causal_blocks=1)


@dataclasses.dataclass(frozen=True)
class PagedCase:
    """Rows holding lengths[b] tokens on pages of `page_size` slots (pages drawn shuffled from a pool), each row's
    table `max_pages` long (0: the null page); the T queries are each row's last T tokens, the last `padding` of
    row 0 padding (-1); the first `freed` pages of row 1 freed (null entries, as an engine frees what a sliding
    window left behind)."""

    name: str
    T: int = 1
    N: int = 4
    K: int = 2
    H: int = 16
    Hv: int = 16
    lengths: tuple[int, ...] = (5, 37, 20)
    window: int = 0
    alibi: bool = False
    softcap: float = 0.0
    padding: int = 0
    freed: int = 0
    shared_kv: bool = False  # MLA's absorbed layout: one pool is both keys and values
    page_size: int = 8
    max_pages: int = 6
    num_splits: int = 3
    dtype: str = "float32"


CASES = [
    PagedCase("one-token-gqa2-alibi", alibi=True),
    PagedCase("chunk-gqa2-padding-softcap", T=8, lengths=(13, 37, 20), padding=3, softcap=3.0),
    PagedCase("one-token-mqa-window-freed", K=1, lengths=(40, 45, 17), window=12, freed=3),
    PagedCase(
        "chunk-mha-window-freed-alibi", T=8, N=2, K=2, lengths=(30, 48), window=10, padding=2, freed=2, alibi=True
    ),
    PagedCase("one-token-gqa4-dv8", N=8, K=2, Hv=8, num_splits=2),
    PagedCase("mla-absorbed-one-head-of-24", K=1, H=24, Hv=24, shared_kv=True),
    PagedCase("one-token-gqa2-bf16", lengths=(48, 9, 26), dtype="bfloat16"),
]


def gathered(pool_PKsH, table_BM):
    """The dense [B, K, max_pages * page_size, H] cache a page table describes."""
    B, n = table_BM.shape
    _, K, ps, H = pool_PKsH.shape
    return pool_PKsH[table_BM].transpose(0, 2, 1, 3, 4).reshape(B, K, n * ps, H)


def paged_problem(c: PagedCase, seed: int = 0):
    """(q, k pool, v pool, table, mask, kernel's k pool, kernel's v pool): the kernel's pools hold NaN on every page
    no query reads."""
    rng = np.random.default_rng(seed)
    B, ps, n = len(c.lengths), c.page_size, c.max_pages
    used = [-(-length // ps) for length in c.lengths]
    P = 1 + sum(used) + 3  # the null page, the rows' pages, 3 unused
    ids = iter(rng.permutation(np.arange(1, P)))
    table = np.zeros((B, n), np.int32)
    for b, pages in enumerate(used):
        table[b, :pages] = [next(ids) for _ in range(pages)]
    table[1, : c.freed] = 0
    slot = np.arange(n * ps)
    kpos = np.where((slot < np.asarray(c.lengths)[:, None]) & (table[:, slot // ps] != 0), slot, -1)
    qpos = np.asarray(c.lengths)[:, None] - c.T + np.arange(c.T)
    qpos[0, c.T - c.padding :] = -1
    mask = Mask(jnp.asarray(qpos), jnp.asarray(kpos), window=c.window)

    dt = jnp.dtype(c.dtype)
    q = jnp.asarray(rng.normal(size=(B, c.T, c.N, c.H)), dt)
    k = jnp.asarray(rng.normal(size=(P, c.K, ps, c.H)), dt)
    v = k if c.shared_kv else jnp.asarray(rng.normal(size=(P, c.K, ps, c.Hv)), dt)
    seen_BS = np.asarray(mask.allowed()).any(1)
    read = np.zeros(P, bool)
    np.logical_or.at(read, table.reshape(-1), seen_BS.reshape(B, n, ps).any(-1).reshape(-1))
    poison = lambda pool: jnp.where(jnp.asarray(read)[:, None, None, None], pool, jnp.nan)  # noqa: E731
    return q, k, v, jnp.asarray(table), mask, poison(k), poison(v)


def check_paged(c: PagedCase, platform: str) -> None:
    q, k, v, table, mask, k_kernel, v_kernel = paged_problem(c)
    bias_fn = AlibiBias(c.N) if c.alibi else None
    slopes = jnp.asarray(bias_fn.slopes) if c.alibi else None
    kw = dict(softcap=c.softcap, alibi_slopes=slopes, num_splits=c.num_splits, platform=platform, interpret=True)
    got = jax.jit(lambda q, k, v, t: paged_decode_attention(q, k, v, t, mask, **kw))(q, k_kernel, v_kernel, table)
    assert got.shape == (*q.shape[:3], c.Hv) and got.dtype == q.dtype
    up = [x.astype(jnp.float32) for x in (q, k, v)]
    view = KVView(gathered(up[1], table), gathered(up[2], table), mask)
    want = reference_decode(REFERENCE, up[0], view, bias_fn=bias_fn, softcap=c.softcap)
    sees = np.asarray(mask.allowed()).any(-1)  # padding queries' outputs are unused
    tol = 2e-5 if c.dtype == "float32" else 2e-2
    np.testing.assert_allclose(np.asarray(got, np.float32)[sees], np.asarray(want)[sees], atol=tol, rtol=tol)


@pytest.mark.parametrize("platform", ["cpu", "tpu"], ids=["loop", "tpu-grid"])
@pytest.mark.parametrize("c", CASES, ids=lambda c: c.name)
def test_paged_kernel_matches_the_reference_on_the_gathered_cache(c: PagedCase, platform: str):
    check_paged(c, platform)


def test_a_page_the_lowering_cannot_tile_is_refused_in_one_line():
    q, mask = jnp.zeros((1, 1, 2, 64)), Mask(jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 24), jnp.int32))
    pool, table = jnp.zeros((4, 2, 8, 64)), jnp.zeros((1, 3), jnp.int32)
    with pytest.raises(ValueError, match=r"^page_size=8: must be a power of two >= 16 \(Triton, GPU\)$"):
        paged_decode_attention(q, pool, pool, table, mask, platform="gpu")
    pool, table = jnp.zeros((4, 2, 12, 64)), jnp.zeros((1, 2), jnp.int32)
    with pytest.raises(ValueError, match=r"^page_size=12: must be a multiple of 8 \(Mosaic, TPU\)$"):
        paged_decode_attention(q, pool, pool, table, mask, platform="tpu")


def test_pallas_decode_reads_a_views_float_pages_and_the_dense_arrays_otherwise():
    """The dense arrays of a view with float pages are NaN (the kernel must read the pages); int8 pages are NaN-free
    codes the kernel must not read (the dense arrays are the dequantized view)."""
    c = CASES[0]
    q, k, v, table, mask, _, _ = paged_problem(c)
    want = reference_decode(REFERENCE, q, KVView(gathered(k, table), gathered(v, table), mask))
    nan = jnp.full(gathered(k, table).shape, jnp.nan)
    got = pallas_decode(REFERENCE, q, KVView(nan, nan, mask, Paged(k, v, table)))
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
    codes = jnp.zeros(k.shape, jnp.int8)
    got = pallas_decode(REFERENCE, q, KVView(gathered(k, table), gathered(v, table), mask, Paged(codes, codes, table)))
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.skipif(not cpu_attention.available(), reason="the C++ kernel does not build here")
@pytest.mark.parametrize("c", [c for c in CASES if c.dtype == "float32"], ids=lambda c: c.name)
def test_cpu_kernel_matches_the_reference_on_the_gathered_cache(c: PagedCase):
    """Through model.attention's 'cpu_kernel' decode, as the model calls it: the view's dense arrays are NaN (the
    kernel must read the pages), and the pools hold NaN on every page no query reads."""
    q, k, v, table, mask, k_kernel, v_kernel = paged_problem(c)
    bias_fn = AlibiBias(c.N) if c.alibi else None
    scale = c.H**-0.5 if not c.shared_kv else 0.3  # MLA passes its own scale
    nan = jnp.full(gathered(k, table).shape[:3] + (1,), jnp.nan)
    view = KVView(nan, nan, mask, Paged(k_kernel, v_kernel, table))
    got = jax.jit(lambda q, view: cpu_kernel_decode(REFERENCE, q, view, bias_fn=bias_fn, softcap=c.softcap, scale=scale))(q, view)  # fmt: skip
    want = reference_decode(REFERENCE, q, KVView(gathered(k, table), gathered(v, table), mask), bias_fn=bias_fn, softcap=c.softcap, scale=scale)  # fmt: skip
    sees = np.asarray(mask.allowed()).any(-1)
    np.testing.assert_allclose(np.asarray(got)[sees], np.asarray(want)[sees], atol=2e-5, rtol=2e-5)
    assert not np.isnan(np.asarray(got)).any()  # padding queries get zeros


def test_cpu_kernel_decode_reads_dense_arrays_where_the_pages_are_not_float32():
    c = CASES[0]
    q, k, v, table, mask, _, _ = paged_problem(c)
    view = KVView(gathered(k, table), gathered(v, table), mask)
    want = reference_decode(REFERENCE, q, view)
    codes = jnp.zeros(k.shape, jnp.int8)
    got = cpu_kernel_decode(REFERENCE, q, view.replace(pages=Paged(codes, codes, table)))
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
