"""The Pallas flash-decoding kernel (model/kernels/decode_attention.py), interpreted on CPU, against the plain-JAX
reference decode: ragged per-row cache lengths, rolling caches, GQA groups, a few queries per row, the blocks it
skips, and greedy decoding with attention_impl='pallas'."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import ModelConfig, Transformer, init_variables
from model.attention import reference_decode
from model.kernels.decode_attention import decode_attention, visited_blocks
from model.mask import Mask
from model.positions import AlibiBias
from tests.test_variants import distinct_prompts, greedy_against_recomputation

REFERENCE = ModelConfig()
ON_CPU = jax.default_backend() == "cpu"
BLOCK = 8 if ON_CPU else 16  # compiled (Triton) kernels tile by powers of two >= 16; interpreted ones by anything
TOL_F32 = 2e-5 if ON_CPU else 2e-3  # GPUs multiply float32 in TF32 by default


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


@pytest.mark.parametrize(
    "B, T, N, K, window, rolling, alibi, softcap",
    [
        (3, 1, 8, 2, 0, False, True, 0.0),  # one new token per row, GQA 4, ALiBi
        (2, 3, 4, 4, 6, True, False, 3.0),  # speculative verification (3 queries), MHA, rolling window, soft-cap
        (3, 2, 8, 1, 0, False, False, 0.0),  # MQA: 8 heads on one K/V head
    ],
)
def test_decode_kernel_matches_the_reference_with_ragged_lengths(B, T, N, K, window, rolling, alibi, softcap):
    H, S = 16, 37
    lengths = [5, 37, 20][:B]
    q, k, v, (qpos, kpos) = cache_problem(B, T, N, K, H, S, lengths, rolling)
    mask = Mask(qpos, kpos, window=window)
    bias_fn = AlibiBias(N) if alibi else None
    slopes = jnp.asarray(bias_fn.slopes) if alibi else None
    kernel = jax.jit(
        lambda *a: decode_attention(*a, mask, softcap=softcap, alibi_slopes=slopes, block_k=BLOCK, num_splits=3)
    )
    got = kernel(q, k, v)
    want = jax.jit(lambda *a: reference_decode(REFERENCE, *a, mask, bias_fn=bias_fn, softcap=softcap))(q, k, v)
    np.testing.assert_allclose(got, want, atol=TOL_F32, rtol=TOL_F32)


def test_decode_kernel_in_bfloat16():
    q, k, v, (qpos, kpos) = cache_problem(2, 1, 4, 2, 16, 30, [30, 9], dtype=jnp.bfloat16)
    mask = Mask(qpos, kpos)
    got = jax.jit(lambda *a: decode_attention(*a, mask, block_k=BLOCK, num_splits=2))(q, k, v)
    assert got.dtype == jnp.bfloat16
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    want = jax.jit(lambda *a: reference_decode(REFERENCE, *a, mask))(*f32)
    np.testing.assert_allclose(got.astype(jnp.float32), want, atol=2e-2, rtol=2e-2)


def test_decode_skips_the_blocks_past_each_rows_length():
    """A cache of 48 slots in 6 blocks of 8, 3 splits of 2 blocks: a row of 5 tokens computes 1 block, one of 17
    computes 3, a full one 6; a window of 8 leaves the query at 16 the blocks of keys 8-23, the one at 47 only
    40-47."""
    q, k, v, (qpos, kpos) = cache_problem(3, 1, 2, 1, 8, 48, [5, 17, 48])
    visits = np.asarray(visited_blocks(q, k, v, Mask(qpos, kpos), block_k=8, num_splits=3, interpret=True))[:, 0, 0]
    np.testing.assert_array_equal(visits, [[1, 0, 0], [2, 1, 0], [2, 2, 2]])
    visits = np.asarray(visited_blocks(q, k, v, Mask(qpos, kpos, window=8), block_k=8, num_splits=3, interpret=True))[
        :, 0, 0
    ]
    np.testing.assert_array_equal(visits.sum(-1), [1, 2, 1])


def test_greedy_decoding_with_pallas_attention_equals_xla_recomputation():
    """Left-padded prompts, a full cache (layer 1) and a rolling one (layer 0, windowed), GQA, ALiBi: every step's
    logits through the kernel and the cache equal XLA's forward pass without a cache."""
    cfg = ModelConfig(
        vocab_size=61, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=48, max_seq_len=24,
        sliding_window=4, global_every=2, position="alibi", tie_embeddings=False,
    )  # fmt: skip
    params = nn.unbox(jax.jit(lambda key: init_variables(Transformer(cfg), key))(jax.random.key(0)))["params"]
    prompts = distinct_prompts(cfg.vocab_size, [7, 2])
    pallas = dataclasses.replace(cfg, attention_impl="pallas")
    greedy_against_recomputation(pallas, params, prompts, 8, max_len=16, reference_cfg=cfg)
