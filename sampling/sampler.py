"""Autoregressive sampling from a trained Transformer, fully jitted.

Each step reruns the model over a fixed-size token buffer (shapes never change, so nothing
re-traces); causality makes the unwritten tail of the buffer irrelevant to the position sampled.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from model import Transformer


def sample_logits(logits_BV: jax.Array, rng: jax.Array, temperature: float, top_k: int) -> jax.Array:
    """Greedy at temperature 0; otherwise softmax(logits / temperature), optionally over the top k."""
    if temperature == 0:
        return jnp.argmax(logits_BV, axis=-1)
    logits_BV = logits_BV / temperature
    if top_k > 0:
        kth_BV = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_BV, -jnp.inf, logits_BV)
    return jax.random.categorical(rng, logits_BV, axis=-1)


@functools.partial(jax.jit, static_argnames=("model", "prompt_len", "new_tokens", "temperature", "top_k"))
def _generate(model, params, buffer_BT, rng, prompt_len, new_tokens, temperature, top_k):
    def step(i, carry):
        buffer_BT, rng = carry
        rng, key = jax.random.split(rng)
        logits_BV = model.apply({"params": params}, buffer_BT)[:, i - 1]
        token_B = sample_logits(logits_BV, key, temperature, top_k)
        return buffer_BT.at[:, i].set(token_B.astype(buffer_BT.dtype)), rng

    buffer_BT, _ = jax.lax.fori_loop(prompt_len, prompt_len + new_tokens, step, (buffer_BT, rng))
    return buffer_BT


def generate(
    model: Transformer,
    params,
    prompt_ids: list[int],
    new_tokens: int,
    *,
    temperature: float = 0.8,
    top_k: int = 0,
    seed: int = 0,
) -> list[int]:
    """Continues `prompt_ids` by up to `new_tokens` ids (fewer if the model's context runs out)."""
    context = model.cfg.max_seq_len
    prompt_ids = list(prompt_ids)[-(context - 1) :] or [0]
    new_tokens = min(new_tokens, context - len(prompt_ids))
    buffer = jnp.zeros((1, context), jnp.int32).at[0, : len(prompt_ids)].set(jnp.asarray(prompt_ids, jnp.int32))
    out = _generate(model, params, buffer, jax.random.key(seed), len(prompt_ids), new_tokens, temperature, top_k)
    return [int(t) for t in out[0, len(prompt_ids) : len(prompt_ids) + new_tokens]]
