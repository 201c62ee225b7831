"""Beam search over the K/V cache: keeps the `beam_size` prefixes of highest total log-probability.

A beam that emits the end-of-document token is finished: its score stays fixed and it takes one
slot, continuing with end-of-document at no cost. Scores are plain sums of log-probabilities (no
length penalty), so the result is the highest-probability sequence among those the beam kept; with
beam_size >= vocab^(steps - 1) that is the exact argmax over all sequences.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from model import Transformer
from model.cache import init_cache, select_rows
from sampling.decode import for_inference, unrolled


@dataclasses.dataclass
class Beams:
    tokens: list[list[int]]  # best first, each cut before its end-of-document token
    scores: list[float]  # total log-probability of each continuation (end-of-document included)
    steps: int  # decoding steps run
    seconds: float  # prefill and decoding, compilation excluded


@functools.partial(jax.jit, static_argnames=("model", "beam_size", "steps", "max_len"))
def _beam_search(params, prompt_1P, eos_id, *, model: Transformer, beam_size: int, steps: int, max_len: int):
    W, P, weights = beam_size, prompt_1P.shape[1], unrolled(params, model)
    tokens_WP = jnp.broadcast_to(prompt_1P, (W, P))
    positions_WP = jnp.broadcast_to(jnp.arange(P), (W, P))
    logits_WPV, variables = model.apply(
        {**weights, "cache": init_cache(model, W, max_len)}, tokens_WP, positions_WP, mutable=["cache"]
    )
    V = logits_WPV.shape[-1]
    # Only beam 0 is live at first, so the first expansion does not pick the same token W times.
    scores_W = jnp.full((W,), -jnp.inf).at[0].set(0.0)
    after_eos_V = jnp.full((V,), -jnp.inf).at[jnp.maximum(eos_id, 0)].set(0.0)

    def step(i, carry):
        logits_WV, cache, scores_W, seqs_WN, finished_W = carry
        logprobs_WV = jax.nn.log_softmax(logits_WV, axis=-1)
        logprobs_WV = jnp.where(finished_W[:, None], after_eos_V, logprobs_WV)
        scores_W, flat_W = jax.lax.top_k((scores_W[:, None] + logprobs_WV).reshape(-1), W)
        parent_W, token_W = flat_W // V, (flat_W % V).astype(jnp.int32)
        seqs_WN = seqs_WN[parent_W].at[:, i].set(token_W)
        finished_W = finished_W[parent_W] | (token_W == eos_id)
        cache = select_rows(cache, parent_W)
        logits_W1V, variables = model.apply(
            {**weights, "cache": cache}, token_W[:, None], jnp.full((W, 1), P + i), mutable=["cache"]
        )
        return logits_W1V[:, 0], variables["cache"], scores_W, seqs_WN, finished_W

    init = (logits_WPV[:, -1], variables["cache"], scores_W, jnp.zeros((W, steps), jnp.int32), jnp.zeros(W, bool))
    _, _, scores_W, seqs_WN, _ = jax.lax.fori_loop(0, steps, step, init)
    return seqs_WN, scores_W  # top_k leaves the beams sorted best first


def beam_search(
    model: Transformer,
    params,
    prompt_ids: list[int],
    max_new_tokens: int,
    beam_size: int,
    *,
    max_len: int,
    eos_id: int = -1,
) -> Beams:
    """The `beam_size` best continuations of one prompt, best first (eos_id -1: no end token)."""
    steps = min(max_new_tokens, max_len - len(prompt_ids))
    if steps < 1:
        raise ValueError(f"a prompt of {len(prompt_ids)} tokens leaves no room in a cache of max_len={max_len}")
    net = for_inference(model)
    prompt_1P = np.asarray([prompt_ids], np.int32)
    args = (params, prompt_1P, np.int32(eos_id))
    search = _beam_search.lower(*args, model=net, beam_size=beam_size, steps=steps, max_len=max_len).compile()
    start = time.perf_counter()
    seqs_WN, scores_W = jax.block_until_ready(search(*args))
    seconds = time.perf_counter() - start
    kept = [
        (seq, score)
        for seq, score in zip(np.asarray(seqs_WN).tolist(), np.asarray(scores_W).tolist())
        if np.isfinite(score)
    ]  # more beams than distinct sequences leaves some empty (-inf)
    tokens = [s[: s.index(eos_id)] if eos_id in s else s for s, _ in kept]
    return Beams(tokens, [score for _, score in kept], steps, seconds)
