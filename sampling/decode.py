"""Batched generation: prefill the prompts into a static K/V cache, then decode in a `lax.while_loop`.

Prompts of different lengths are left-padded to the longest; padding gets position -1, which no
token attends to, so each row continues exactly as its prompt would alone. Every shape is fixed up
front (the cache holds `max_len` slots), so nothing re-traces while decoding. `kv_cache=False` runs
the same loop by recomputing the whole buffer each step (the reference the cache is tested against).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from model import ModelConfig, Transformer, unstack_layers
from model.cache import LAYOUTS, init_cache
from model.kinds import ATTENTION_KINDS
from model.runtime import DecodeConfig, Runtime
from model.weights import FORMATS
from sampling.rules import Rules, pick

# on_token(tokens_B, step) -> stop_B: called on the host with each new token of every row while
# decoding (for streaming and stop strings); rows where it returns True stop.
OnToken = Callable[[np.ndarray, int], np.ndarray]


@dataclasses.dataclass
class Generation:
    tokens: list[list[int]]  # each row's continuation, cut before its end-of-document token
    prefill_tokens: int  # prompt tokens processed (padding included)
    prefill_seconds: float
    decode_tokens: int  # tokens generated (batch rows x steps run)
    decode_seconds: float


def for_inference(model: Transformer, kv_cache: bool = True) -> Transformer:
    """The same network for sampling: remat off (no backward pass), layers unrolled (inside the decode
    loop a scanned stack would copy its stacked cache every step), with the cache as `model.rt.decode` says
    (default: `DecodeConfig()`) or without one (`kv_cache=False`: each step recomputes), reading weights in the
    decode config's format. Its params are `unrolled(params)`, taken inside the jitted programs (slicing there is
    free)."""
    decode = model.rt.decode or DecodeConfig()
    rt = Runtime(decode=decode if kv_cache else None, hooks=model.rt.hooks, weights=decode.weights)
    return Transformer(dataclasses.replace(model.cfg, remat="none", scan_layers=False), rt)


def with_rewind(model: Transformer, max_rewind: int) -> Transformer:
    """`model` (decoding) with room to rewind rows by `max_rewind` tokens (speculative decoding)."""
    decode = dataclasses.replace(model.rt.decode or DecodeConfig(), max_rewind=max_rewind)
    return model.clone(rt=dataclasses.replace(model.rt, decode=decode))


def decode_errors(cfg: ModelConfig, decode: DecodeConfig) -> list[tuple[bool, str, object, str]]:
    """(condition that must hold, option, value, what is allowed) for decoding `cfg` as `decode` says: checked
    before anything compiles (infer.py names the options as its flags)."""
    variants = sorted({v for s in cfg.layer_specs() for v in ATTENTION_KINDS[s.attention].decode_variants})
    kinds = sorted({s.attention for s in cfg.layer_specs()})
    return [
        (
            decode.attention in ("", *variants),
            "attention",
            decode.attention,
            f"model.attention={'/'.join(kinds)} decodes as: {', '.join(variants) or 'its one way (no variants)'}",
        ),
        (decode.weights in FORMATS, "weights", decode.weights, f"one of {', '.join(FORMATS)}"),
        (decode.cache in LAYOUTS, "cache", decode.cache, f"one of {', '.join(LAYOUTS)}"),
        (
            decode.cache_dtype in ("", "float32", "bfloat16", "float16", "int8"),
            "cache_dtype",
            decode.cache_dtype,
            "'' (the compute dtype), float32, bfloat16, float16 or int8 (per token and head, scales kept)",
        ),
        (decode.max_rewind >= 0, "max_rewind", decode.max_rewind, "must be >= 0"),
    ]


def unrolled(weights, model: Transformer) -> dict:
    """The variables the unrolled sampling network applies: `weights` are params, or {"params", "state"} for a
    model that keeps non-trained state (e.g. a router's bias; what training.checkpoint.load_for_inference gives)."""
    if isinstance(weights, dict) and "params" in weights:
        return {name: unstack_layers(tree, model.cfg) for name, tree in weights.items()}
    return {"params": unstack_layers(weights, model.cfg)}


def prompt_ids(tokenizer, text: str) -> list[int]:
    """A prompt starts a document: it follows the end-of-document token, as documents do in training (or, for a
    tokenizer whose template starts documents with other tokens, such as a BOS token, those)."""
    return [*tokenizer.document_start, *tokenizer.encode(text)]


def left_pad(prompts: list[list[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """tokens [B, P] and positions [B, P] (-1 on padding) for prompts left-padded to the longest."""
    P = max(len(p) for p in prompts)
    tokens = np.full((len(prompts), P), pad_id, np.int32)
    positions = np.full((len(prompts), P), -1, np.int32)
    for b, p in enumerate(prompts):
        tokens[b, P - len(p) :] = p
        positions[b, P - len(p) :] = np.arange(len(p))
    return tokens, positions


DEFAULT_RULES = Rules()
DONE = -1  # the "token" of a row that has stopped


def _choose(logits_BV, step, row_keys_B, done_B, eos_id, rules: Rules, on_token: OnToken | None):
    """The next token of every row (DONE for rows that have stopped) and which rows are now done."""
    keys_B = jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys_B, step)
    token_B = jnp.where(done_B, DONE, pick(logits_BV, keys_B, rules))
    done_B = done_B | (token_B == eos_id)
    if on_token is not None:
        stop_B = io_callback(on_token, jax.ShapeDtypeStruct(done_B.shape, jnp.bool_), token_B, step)
        done_B = done_B | stop_B
    return token_B, done_B


@functools.partial(jax.jit, static_argnames=("model", "max_len"))
def _prefill(params, tokens_BP, positions_BP, *, model: Transformer, max_len: int):
    """Runs the prompts through a fresh cache: (last logits, cache, next positions)."""
    cache = init_cache(model, tokens_BP.shape[0], max_len)
    weights = unrolled(params, model)
    logits_BPV, variables = model.apply({**weights, "cache": cache}, tokens_BP, positions_BP, mutable=["cache"])
    return logits_BPV[:, -1], variables["cache"], positions_BP[:, -1] + 1


@functools.partial(jax.jit, static_argnames=("model", "rules", "steps", "on_token"))
def _decode_cached(params, cache, logits_BV, positions_B, seed, first_row, eos_id, *, model, rules, steps, on_token):
    B, weights = logits_BV.shape[0], unrolled(params, model)
    row_keys_B = row_keys(seed, B, first_row)

    def cond(carry):
        step, _, _, _, _, done_B = carry
        return (step < steps) & ~jnp.all(done_B)

    def body(carry):
        step, logits_BV, cache, positions_B, out_BN, done_B = carry
        token_B, done_B = _choose(logits_BV, step, row_keys_B, done_B, eos_id, rules, on_token)
        out_BN = out_BN.at[:, step].set(token_B)
        logits_B1V, variables = model.apply(
            {**weights, "cache": cache},
            jnp.maximum(token_B, 0)[:, None],
            positions_B[:, None],
            mutable=["cache"],
        )
        return step + 1, logits_B1V[:, 0], variables["cache"], positions_B + 1, out_BN, done_B

    init = (0, logits_BV, cache, positions_B, jnp.zeros((B, steps), jnp.int32), jnp.zeros((B,), jnp.bool_))
    step, _, _, _, out_BN, _ = jax.lax.while_loop(cond, body, init)
    return out_BN, step


@functools.partial(jax.jit, static_argnames=("model", "rules", "steps", "on_token"))
def _decode_recompute(
    params, tokens_BL, positions_BL, start, seed, first_row, eos_id, *, model, rules, steps, on_token
):
    """Like `_decode_cached`, but each step reruns the model over the whole [B, max_len] buffer."""
    B, weights = tokens_BL.shape[0], unrolled(params, model)
    row_keys_B = row_keys(seed, B, first_row)

    def cond(carry):
        step, _, _, _, done_B = carry
        return (step < steps) & ~jnp.all(done_B)

    def body(carry):
        step, tokens_BL, positions_BL, out_BN, done_B = carry
        last = start + step - 1
        logits_BV = jax.lax.dynamic_index_in_dim(model.apply(weights, tokens_BL, positions_BL), last, 1, False)
        token_B, done_B = _choose(logits_BV, step, row_keys_B, done_B, eos_id, rules, on_token)
        out_BN = out_BN.at[:, step].set(token_B)
        tokens_BL = tokens_BL.at[:, last + 1].set(jnp.maximum(token_B, 0))
        positions_BL = positions_BL.at[:, last + 1].set(positions_BL[:, last] + 1)
        return step + 1, tokens_BL, positions_BL, out_BN, done_B

    init = (0, tokens_BL, positions_BL, jnp.zeros((B, steps), jnp.int32), jnp.zeros((B,), jnp.bool_))
    step, _, _, out_BN, _ = jax.lax.while_loop(cond, body, init)
    return out_BN, step


def row_keys(seed, batch: int, first_row=0) -> jax.Array:
    """Row r samples with its own stream fold_in(key(seed), r), whatever else is in the batch."""
    rows = first_row + jnp.arange(batch)
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(seed), rows)


def _timed(fn, *args):
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - start


def generate_batch(
    model: Transformer,
    params,
    prompts: list[list[int]],
    max_new_tokens: int,
    rules: Rules = DEFAULT_RULES,
    *,
    max_len: int,
    eos_id: int = -1,
    seed: int = 0,
    first_row: int = 0,
    kv_cache: bool = True,
    on_token: OnToken | None = None,
) -> Generation:
    """Continues every prompt by up to `max_new_tokens` tokens, stopping a row at `eos_id` (-1: never).

    `max_len` is the cache size: the longest prompt plus the new tokens must fit in it (the caller
    checks the prompt; new tokens stop when the cache is full). Row b draws from the random stream of
    row `first_row + b` (so a long list of prompts can go in batches). Timings exclude compilation.
    """
    tokens_BP, positions_BP = left_pad(prompts)
    B, P = tokens_BP.shape
    steps = min(max_new_tokens, max_len - P)
    if steps < 1:
        raise ValueError(f"a prompt of {P} tokens leaves no room in a cache of max_len={max_len}")
    statics = dict(rules=rules, steps=steps, on_token=on_token)
    sampling_args = (np.uint32(seed), np.int32(first_row), np.int32(eos_id))
    net = for_inference(model, kv_cache)
    if kv_cache:
        prefill = _prefill.lower(params, tokens_BP, positions_BP, model=net, max_len=max_len).compile()
        (logits_BV, cache, positions_B), prefill_seconds = _timed(prefill, params, tokens_BP, positions_BP)
        args = (params, cache, logits_BV, positions_B, *sampling_args)
        decode = _decode_cached.lower(*args, model=net, **statics).compile()
    else:
        tokens_BL = np.zeros((B, max_len), np.int32)
        positions_BL = np.full((B, max_len), -1, np.int32)
        tokens_BL[:, :P], positions_BL[:, :P] = tokens_BP, positions_BP
        prefill_seconds = 0.0  # the first decode step does the prompt's work
        args = (params, tokens_BL, positions_BL, np.int32(P), *sampling_args)
        decode = _decode_recompute.lower(*args, model=net, **statics).compile()
    (out_BN, steps_run), decode_seconds = _timed(decode, *args)
    out_BN, steps_run = np.asarray(out_BN), int(steps_run)
    return Generation(
        tokens=[_until(row[:steps_run].tolist(), eos_id) for row in out_BN],
        prefill_tokens=B * P if kv_cache else 0,
        prefill_seconds=prefill_seconds,
        decode_tokens=B * steps_run,
        decode_seconds=decode_seconds,
    )


def _until(ids: list[int], eos_id: int) -> list[int]:
    """The tokens before the first end-of-document, keeping a token that tripped a stop."""
    for i, token in enumerate(ids):
        if token in (eos_id, DONE):
            return ids[:i]
    return ids


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
    """One prompt's continuation within the model's context (the sample printed after training)."""
    context = model.cfg.max_seq_len
    prompt_ids = list(prompt_ids)[-(context - 1) :] or [0]
    rules = Rules(temperature=temperature, top_k=top_k)
    out = generate_batch(model, params, [prompt_ids], new_tokens, rules, max_len=context, seed=seed)
    return out.tokens[0]
