"""The Pallas flash-decoding kernel (model/kernels/decode_attention.py), interpreted on CPU, against the plain-JAX
reference decode: ragged per-row cache lengths, rolling caches, GQA groups, a few queries per row (the cases live in
tests/kernel_cases.py, which benchmarks/accelerator.py also runs compiled on a GPU), the blocks it skips, and greedy
sampling with attention_impl='pallas'."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import numpy as np
import pytest

from model import ModelConfig, Transformer, init_variables
from model.kernels.decode_attention import visited_blocks
from model.mask import Mask
from sampling.decode import generate_batch
from sampling.rules import Rules
from tests.kernel_cases import DECODE_CASES, DecodeCase, cache_problem, check_decode


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


def test_greedy_sampling_with_pallas_attention_gives_the_xla_tokens():
    """Left-padded prompts, a full cache (layer 1) and a rolling one (layer 0, windowed), GQA, ALiBi: the same
    greedy continuation."""
    cfg = ModelConfig(
        vocab_size=61, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=48, max_seq_len=24,
        sliding_window=4, global_every=2, position="alibi",
    )  # fmt: skip
    params = nn.unbox(jax.jit(lambda key: init_variables(Transformer(cfg), key))(jax.random.key(0)))["params"]
    prompts = [[3, 7, 9, 11, 2, 5, 8], [4, 6]]
    tokens = {}
    for impl in ("pallas", "xla"):
        model = Transformer(dataclasses.replace(cfg, attention_impl=impl))
        tokens[impl] = generate_batch(model, params, prompts, 6, Rules(temperature=0.0), max_len=16).tokens
    assert tokens["pallas"] == tokens["xla"] and all(len(t) == 6 for t in tokens["pallas"])
