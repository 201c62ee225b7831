"""The Pallas flash-decoding kernel (model/kernels/decode_attention.py), interpreted on CPU, against the plain-JAX
reference decode: ragged per-row cache lengths, rolling caches, GQA groups, a few queries per row (the cases live in
tests/kernel_cases.py, which benchmarks/accelerator.py also runs compiled on a GPU), the blocks it skips, and greedy
decoding with attention_impl='pallas' against recomputation."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import numpy as np
import pytest

from model import ModelConfig, Transformer, init_variables
from model.kernels.decode_attention import visited_blocks
from model.mask import Mask
from tests.kernel_cases import DECODE_CASES, DecodeCase, cache_problem, check_decode
from tests.test_variants import distinct_prompts, greedy_against_recomputation


@pytest.mark.parametrize("c", DECODE_CASES, ids=lambda c: c.name)
def test_decode_kernel_matches_the_reference(c: DecodeCase):
    check_decode(c)


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
