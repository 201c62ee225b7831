"""FLOPs accounting against XLA's own count, term by term: configs that differ in one dimension only change one
term of model.flops_per_token, and that change must be what XLA counts for the same change."""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from model import ModelConfig, Transformer, flops_per_token

# causal_blocks=1: attention computes the whole T x T square, as the count does (MFU's convention).
BASE = ModelConfig(vocab_size=512, d_model=128, num_layers=2, num_heads=4, num_kv_heads=4, d_ff=512,
                   max_seq_len=64, scan_layers=False, attention_impl="xla", causal_blocks=1)  # fmt: skip
B = 2


@functools.cache
def xla_flops_per_token(cfg: ModelConfig) -> float:
    """XLA's cost analysis of one training step's gradient, per token."""
    T = cfg.max_seq_len
    model = Transformer(cfg)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, T), jnp.int32))["params"])

    def loss(p, tokens):
        logits = model.apply({"params": p}, tokens[:, :-1])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))

    cost = jax.jit(jax.grad(loss)).lower(params, jnp.zeros((B, T + 1), jnp.int32)).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"] / (B * T)


# XLA also counts elementwise work (softmax, norms, activations; ~2.4% on top of the attention matmuls, under 1% on
# top of the others), which the count leaves out: ours / XLA's must sit just below 1, never above it.
@pytest.mark.parametrize(
    "term, change, lowest",
    [
        ("attention (seq_len)", {"max_seq_len": 128}, 0.95),
        ("MLP (d_ff)", {"d_ff": 1024}, 0.98),
        ("output head (vocab_size)", {"vocab_size": 1024}, 0.98),
        ("K/V projections (num_kv_heads)", {"num_kv_heads": 1}, 0.98),
    ],
)
def test_each_term_of_the_flops_count_matches_what_xla_counts_for_it(term, change, lowest):
    other = dataclasses.replace(BASE, **change)
    ours = flops_per_token(other, other.max_seq_len) - flops_per_token(BASE, BASE.max_seq_len)
    theirs = xla_flops_per_token(other) - xla_flops_per_token(BASE)
    assert lowest <= ours / theirs <= 1.0, (term, ours, theirs)


def test_the_whole_count_is_xlas_less_its_elementwise_work():
    ratio = flops_per_token(BASE, BASE.max_seq_len) / xla_flops_per_token(BASE)
    assert 0.98 <= ratio <= 1.0, ratio
