"""Speculative decoding: a drafter proposes k tokens per row, one forward pass of the target model verifies them
all, and exact rejection sampling keeps the output distributed as the target's (Leviathan et al. 2023; Chen et
al. 2023).

Drafters (`MTPDrafter`: the target's own multi-token prediction heads, model/mtp.py; `ModelDrafter`: a smaller
model with the same tokenizer, autoregressively with its own cache) share one protocol: `prefill` after the
target has read the prompts, `propose` (k drafts and the distributions q they were drawn from) and `observe`
(the target's verify pass). A round: the target reads the pending token and the k drafts in one call against
its cache (queries at k + 1 positions); draft i is accepted with probability min(1, p_i(x) / q_i(x)); at the
first rejection a token is drawn from norm(max(0, p_i - q_i)), after k acceptances a bonus token from p_{k+1};
every cache then rewinds past what was rejected (model/cache.py). p and q are both taken under the sampling
rules (temperature, top-k, top-p, min-p; sampling/rules.py), so temperature 0 (one-hot p and q) gives plain
greedy decoding's tokens exactly.

Each row keeps its own length (`n_B`: the buffer index of its pending token, sampled but not yet read by the
target); every shape is fixed, so a whole generation is one `lax.while_loop`.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from model import Transformer, unstack_layers
from model import mtp as mtp_lib
from model.cache import init_cache, rewind
from model.runtime import DecodeConfig, Runtime
from sampling.decode import DEFAULT_RULES, left_pad, row_keys
from sampling.rules import Rules, filtered


def probs(logits_BTV: jax.Array, rules: Rules) -> jax.Array:
    """The distribution `pick` draws from under `rules`, as probabilities (temperature 0: one-hot greedy)."""
    V = logits_BTV.shape[-1]
    flat_NV = logits_BTV.reshape(-1, V)
    if rules.temperature == 0:
        out_NV = jax.nn.one_hot(jnp.argmax(flat_NV, axis=-1), V, dtype=jnp.float32)
    else:
        out_NV = jax.nn.softmax(filtered(flat_NV, rules), axis=-1)
    return out_NV.reshape(logits_BTV.shape)


def draw(keys_B: jax.Array, probs_BV: jax.Array) -> jax.Array:
    """One token per row from unnormalised probabilities."""
    return jax.vmap(jax.random.categorical)(keys_B, jnp.log(probs_BV)).astype(jnp.int32)


def _round_keys(row_keys_B, step, tag: int):
    return jax.vmap(lambda key: jax.random.fold_in(jax.random.fold_in(key, step), tag))(row_keys_B)


def _gather_BC(x_BL, idx_BC):
    return jnp.take_along_axis(x_BL, jnp.clip(idx_BC, 0, x_BL.shape[1] - 1), axis=1)


def _positions(idx_BC, pad_B):
    """Token positions of buffer indices (left padding: index - pad; padding itself -1)."""
    return jnp.where(idx_BC >= pad_B[:, None], idx_BC - pad_B[:, None], -1).astype(jnp.int32)


def _set_BC(x_BL, idx_BC, values_BC):
    rows_BC = jnp.broadcast_to(jnp.arange(x_BL.shape[0])[:, None], idx_BC.shape)
    return x_BL.at[rows_BC, jnp.clip(idx_BC, 0, x_BL.shape[1] - 1)].set(values_BC)


@dataclasses.dataclass(frozen=True)
class MTPDrafter:
    """Drafts with the target's MTP heads: depth d, run at the pending token's predecessor, drafts the token d
    after the pending one (so k <= cfg.mtp.num_heads). The heads' blocks keep caches in step with the target's:
    each round they re-read, from the last index whose inputs were all final, a fixed chunk of k + lag indices
    (`lag`: how far past an index the heads read; the rest of the chunk is padding), then rewind to the new
    last final index. The target's last-layer hidden states are kept per buffer index for them."""

    cfg: object  # the target's ModelConfig
    k: int
    decode: DecodeConfig = DecodeConfig()  # the target's (the heads' blocks are its kinds)

    @property
    def runtime(self) -> Runtime:
        """How the heads decode: as the target does, with room to rewind a chunk."""
        return Runtime.decoding(dataclasses.replace(self.decode, max_rewind=self.chunk))

    @property
    def lag(self) -> int:
        return max(1, mtp_lib.lookahead(self.cfg))

    @property
    def chunk(self) -> int:
        return self.k + self.lag

    def params_of(self, target_params, draft_params):
        return mtp_lib.Drafter.params_of(target_params)

    def prefill(self, dparams, tokens_BP, positions_BP, out, size):
        B, P = tokens_BP.shape
        drafter = mtp_lib.Drafter(self.cfg, self.runtime)
        trunk_BLD = jnp.zeros((B, size, self.cfg.d_model), out.hidden_BTD.dtype).at[:, :P].set(out.hidden_BTD)
        dummy = (jnp.zeros((B, size, self.cfg.d_model)), jnp.zeros((B, size, self.cfg.mtp.num_heads + 1), jnp.int32))
        cache = drafter.init(jax.random.key(0), *dummy, jnp.zeros((B, size), jnp.int32))["cache"]
        return {"trunk": trunk_BLD, "cache": cache, "start": jnp.zeros((B,), jnp.int32)}

    def propose(self, dparams, state, tokens_BL, n_B, pad_B, keys_B, rules, chunk=None):
        chunk = chunk or self.chunk
        A = self.cfg.mtp.num_heads + 1
        start_B = state["start"]
        idx_BC = start_B[:, None] + jnp.arange(chunk)
        valid_BC = idx_BC <= (n_B - 1)[:, None]
        trunk_BCD = jnp.take_along_axis(
            state["trunk"], jnp.clip(idx_BC, 0, state["trunk"].shape[1] - 1)[..., None], axis=1
        )
        ahead_idx_BCA = idx_BC[..., None] + 1 + jnp.arange(A)
        ahead_BCA = jnp.stack([_gather_BC(tokens_BL, ahead_idx_BCA[..., j]) for j in range(A)], axis=-1)
        positions_BC = jnp.where(valid_BC, _positions(idx_BC, pad_B), -1)
        last_B = jnp.clip(n_B - 1 - start_B, 0, chunk - 1)  # the pending token's predecessor, in the chunk
        rows_B = jnp.arange(tokens_BL.shape[0])

        def choose(d, logits_BCV, ahead_BCA):
            token_B = draw(jax.vmap(jax.random.fold_in, (0, None))(keys_B, d), probs(logits_BCV[rows_B, last_B], rules))
            lands_BCA = ahead_idx_BCA == (n_B + d)[:, None, None]  # every place a later depth reads it
            return jnp.where(lands_BCA, token_B[:, None, None], ahead_BCA)

        cache = rewind(state["cache"], start_B)
        drafter = mtp_lib.Drafter(self.cfg, self.runtime)
        (logits_KBCV, ahead_BCA), variables = drafter.apply(
            {"params": dparams, "cache": cache}, trunk_BCD, ahead_BCA, positions_BC, choose, mutable=["cache"]
        )
        drafts_BK = ahead_BCA[rows_B, last_B, 1 : self.k + 1]
        q_BKV = probs(jnp.moveaxis(logits_KBCV[: self.k, rows_B, last_B], 0, 1), rules)
        final_B = jnp.maximum(n_B + 1 - self.lag, 0)  # indices before this read only final tokens
        state = {**state, "cache": rewind(variables["cache"], final_B), "start": final_B}
        return drafts_BK, q_BKV, state

    def observe(self, state, n_B, out):
        idx_BC = n_B[:, None] + jnp.arange(out.hidden_BTD.shape[1])
        rows_BC = jnp.broadcast_to(jnp.arange(idx_BC.shape[0])[:, None], idx_BC.shape)
        trunk = state["trunk"].at[rows_BC, jnp.clip(idx_BC, 0, state["trunk"].shape[1] - 1)].set(out.hidden_BTD)
        return {**state, "trunk": trunk}


@dataclasses.dataclass(frozen=True)
class ModelDrafter:
    """Drafts with a separate (smaller) model of the same vocabulary, one token at a time with its own cache. Each
    round it rewinds to the pending token's predecessor and reads it and the pending token (the predecessor may
    be an accepted draft it never read), then drafts k - 1 more one by one."""

    model: Transformer  # the drafter, decoding (rt.decode set), layers unrolled
    k: int

    def params_of(self, target_params, draft_params):
        return unstack_layers(draft_params, self.model.cfg)

    def prefill(self, dparams, tokens_BP, positions_BP, out, size):
        cache = init_cache(self.model, tokens_BP.shape[0], size)
        _, variables = self.model.apply({"params": dparams, "cache": cache}, tokens_BP, positions_BP, mutable=["cache"])
        return {"cache": variables["cache"]}

    def propose(self, dparams, state, tokens_BL, n_B, pad_B, keys_B, rules, chunk=None):
        def step(cache, tokens_BT, idx_BT, i):
            logits_BTV, variables = self.model.apply(
                {"params": dparams, "cache": cache}, tokens_BT, _positions(idx_BT, pad_B), mutable=["cache"]
            )
            q_BV = probs(logits_BTV[:, -1], rules)
            return variables["cache"], draw(jax.vmap(jax.random.fold_in, (0, None))(keys_B, i), q_BV), q_BV

        idx_B2 = n_B[:, None] + jnp.arange(-1, 1)
        cache, token_B, q_BV = step(rewind(state["cache"], n_B - 1), _gather_BC(tokens_BL, idx_B2), idx_B2, 1)

        def body(carry, i):
            cache, token_B = carry
            cache, next_B, q_BV = step(cache, token_B[:, None], (n_B + i - 1)[:, None], i)
            return (cache, next_B), (next_B, q_BV)

        (cache, _), (rest_KB, rest_KBV) = jax.lax.scan(body, (cache, token_B), jnp.arange(2, self.k + 1))
        drafts_BK = jnp.concatenate([token_B[:, None], rest_KB.T], axis=1)
        q_BKV = jnp.concatenate([q_BV[:, None], jnp.moveaxis(rest_KBV, 0, 1)], axis=1)
        return drafts_BK, q_BKV, {"cache": cache}

    def observe(self, state, n_B, out):
        return state


def accept(p_BKV, q_BKV, drafts_BK, keys_B):
    """Rejection sampling of k drafts against the target's k + 1 distributions p (p_BKV has k + 1 rows): (how many
    leading drafts are accepted, which were, the next token: from norm(max(0, p - q)) at the first rejection,
    from the last p after k acceptances)."""
    B, K1, V = p_BKV.shape
    k = K1 - 1
    p_draft_BK = jnp.take_along_axis(p_BKV[:, :k], drafts_BK[..., None], axis=-1)[..., 0]
    q_draft_BK = jnp.take_along_axis(q_BKV, drafts_BK[..., None], axis=-1)[..., 0]
    u_BK = jax.vmap(lambda key: jax.random.uniform(jax.random.fold_in(key, 0), (k,)))(keys_B)
    ok_BK = jnp.cumprod(u_BK * q_draft_BK < p_draft_BK, axis=1).astype(bool)  # u < p / q, without dividing
    accepted_B = jnp.sum(ok_BK, axis=1)
    rows_B = jnp.arange(B)
    p_BV = p_BKV[rows_B, accepted_B]
    q_BV = jnp.concatenate([q_BKV, jnp.zeros((B, 1, V), q_BKV.dtype)], axis=1)[rows_B, accepted_B]
    residual_BV = jnp.maximum(p_BV - q_BV, 0.0)
    residual_BV = jnp.where(jnp.sum(residual_BV, -1, keepdims=True) > 0, residual_BV, p_BV)  # p == q: never rejected
    next_B = draw(jax.vmap(jax.random.fold_in, (0, None))(keys_B, 1), residual_BV)
    return accepted_B, ok_BK, next_B


@dataclasses.dataclass
class SpeculativeGeneration:
    tokens: list[list[int]]  # each row's continuation, cut before its end-of-document token
    accepted_K: np.ndarray  # per draft position: drafts accepted
    proposed_K: np.ndarray  # per draft position: drafts verified (rows x rounds that ran for them)
    rounds: int
    prefill_seconds: float
    decode_tokens: int
    decode_seconds: float

    @property
    def acceptance_K(self) -> np.ndarray:
        """Acceptance rate per draft position (draft i counts only when drafts 1..i-1 were accepted)."""
        return self.accepted_K / np.maximum(self.proposed_K, 1)

    @property
    def tokens_per_round(self) -> float:
        return self.decode_tokens / max(self.rounds, 1)


def _net(model: Transformer, rewind_room: int) -> Transformer:
    from sampling.decode import for_inference, with_rewind

    return with_rewind(for_inference(model), rewind_room)


@functools.partial(jax.jit, static_argnames=("target", "drafter", "rules", "size"))
def _prefill(tparams, dparams, tokens_BP, positions_BP, pad_B, seed, first_row, *, target, drafter, rules, size):
    B, P = tokens_BP.shape
    tparams = unstack_layers(tparams, target.cfg)
    dparams = drafter.params_of(tparams, dparams)
    cache = init_cache(target, B, size)
    out, variables = target.apply(
        {"params": tparams, "cache": cache}, tokens_BP, positions_BP, mutable=["cache"], method=Transformer.forward
    )
    keys_B = row_keys(seed, B, first_row)
    first_B = draw(_round_keys(keys_B, 0, 0), probs(out.logits_BTV[:, -1], rules))
    tokens_BL = jnp.zeros((B, size), jnp.int32).at[:, :P].set(tokens_BP).at[:, P].set(first_B)
    n_B = jnp.full((B,), P, jnp.int32)
    state = drafter.prefill(dparams, tokens_BP, positions_BP, out, size)
    drafts_BK, q_BKV, state = drafter.propose(
        dparams, state, tokens_BL, n_B, pad_B, _round_keys(keys_B, 0, 1), rules, chunk=P
    )
    tokens_BL = _set_BC(tokens_BL, n_B[:, None] + 1 + jnp.arange(drafter.k), drafts_BK)
    return variables["cache"], tokens_BL, q_BKV, state


@functools.partial(jax.jit, static_argnames=("target", "drafter", "rules", "steps", "prompt_len"))
def _decode(tparams, dparams, cache, tokens_BL, q_BKV, state, pad_B, seed, first_row, eos_id, *, target, drafter,
            rules, steps, prompt_len):  # fmt: skip
    B, k = tokens_BL.shape[0], drafter.k
    tparams = unstack_layers(tparams, target.cfg)
    dparams = drafter.params_of(tparams, dparams)
    keys_B = row_keys(seed, B, first_row)
    n0_B = jnp.full((B,), prompt_len, jnp.int32)
    done0_B = (tokens_BL[:, prompt_len] == eos_id) | (steps <= 1)

    def cond(carry):
        return ~jnp.all(carry[-1])

    def body(carry):
        step, cache, tokens_BL, q_BKV, state, n_B, accepted_K, proposed_K, done_B = carry
        idx_BK1 = n_B[:, None] + jnp.arange(k + 1)
        out, variables = target.apply(
            {"params": tparams, "cache": cache},
            _gather_BC(tokens_BL, idx_BK1),
            _positions(idx_BK1, pad_B),
            mutable=["cache"],
            method=Transformer.forward,
        )
        drafts_BK = _gather_BC(tokens_BL, idx_BK1[:, 1:])
        a_B, ok_BK, next_B = accept(probs(out.logits_BTV, rules), q_BKV, drafts_BK, _round_keys(keys_B, step, 2))
        live_B = ~done_B
        a_B = jnp.where(live_B, a_B, 0)
        new_n_B = jnp.where(live_B, n_B + a_B + 1, n_B)
        tokens_BL = jnp.where(live_B[:, None], _set_BC(tokens_BL, new_n_B[:, None], next_B[:, None]), tokens_BL)
        cache = rewind(variables["cache"], new_n_B)
        accepted_K = accepted_K + jnp.sum(ok_BK & live_B[:, None], axis=0)
        proposed_K = proposed_K + jnp.sum(jnp.concatenate([live_B[:, None], ok_BK[:, :-1]], 1) & live_B[:, None], 0)
        emitted_BK1 = (jnp.arange(1, k + 2) <= (a_B + 1)[:, None]) & live_B[:, None]
        eos_B = jnp.any(emitted_BK1 & (_gather_BC(tokens_BL, idx_BK1 + 1) == eos_id), axis=1)
        done_B = done_B | eos_B | (new_n_B - prompt_len + 1 >= steps)
        state = drafter.observe(state, n_B, out)
        drafts_BK, q_BKV, state = drafter.propose(
            dparams, state, tokens_BL, new_n_B, pad_B, _round_keys(keys_B, step, 1), rules
        )
        tokens_BL = _set_BC(tokens_BL, new_n_B[:, None] + 1 + jnp.arange(k), drafts_BK)
        return step + 1, cache, tokens_BL, q_BKV, state, new_n_B, accepted_K, proposed_K, done_B

    zeros_K = jnp.zeros((k,), jnp.int32)
    init = (1, cache, tokens_BL, q_BKV, state, n0_B, zeros_K, zeros_K, done0_B)
    step, _, tokens_BL, _, _, n_B, accepted_K, proposed_K, _ = jax.lax.while_loop(cond, body, init)
    return tokens_BL, n_B, accepted_K, proposed_K, step - 1


_COMPILED: dict = {}  # (program, statics, argument shapes) -> executable: a benchmark's prompts of one length compile once


def _compiled(fn, args, **statics):
    shapes = tuple((np.shape(x), np.result_type(x)) for x in jax.tree.leaves(args))
    key = (fn, tuple(sorted(statics.items())), jax.tree.structure(args), shapes)
    if key not in _COMPILED:
        _COMPILED[key] = fn.lower(*args, **statics).compile()
    return _COMPILED[key]


def _timed(fn, *args):
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - start


def generate(
    target: Transformer,
    params,
    prompts: list[list[int]],
    max_new_tokens: int,
    rules: Rules = DEFAULT_RULES,
    *,
    drafter: MTPDrafter | ModelDrafter,
    draft_params=None,
    max_len: int,
    eos_id: int = -1,
    seed: int = 0,
    first_row: int = 0,
) -> SpeculativeGeneration:
    """Continues every prompt by up to `max_new_tokens` tokens (as `sampling.generate_batch` does, the same
    tokens at temperature 0), drafting `drafter.k` tokens per round. `draft_params`: a ModelDrafter's params
    (an MTPDrafter uses the target's). Timings exclude compilation."""
    tokens_BP, positions_BP = left_pad(prompts)
    B, P = tokens_BP.shape
    steps = min(max_new_tokens, max_len - P)
    if steps < 1:
        raise ValueError(f"a prompt of {P} tokens leaves no room in a cache of max_len={max_len}")
    size = max_len + drafter.k + 2  # a verify pass reads k tokens past the last one kept
    net = _net(target, drafter.k + 1)
    if isinstance(drafter, ModelDrafter):
        drafter = dataclasses.replace(drafter, model=_net(drafter.model, drafter.k + 1))
    pad_B = jnp.asarray(P - np.array([len(p) for p in prompts]), jnp.int32)
    sampling = (np.uint32(seed), np.int32(first_row))
    statics = dict(target=net, drafter=drafter, rules=rules)
    args = (params, draft_params, tokens_BP, positions_BP, pad_B, *sampling)
    prefill = _compiled(_prefill, args, **statics, size=size)
    (cache, tokens_BL, q_BKV, state), prefill_seconds = _timed(prefill, *args)
    args = (params, draft_params, cache, tokens_BL, q_BKV, state, pad_B, *sampling, np.int32(eos_id))
    decode = _compiled(_decode, args, **statics, steps=steps, prompt_len=P)
    (tokens_BL, n_B, accepted_K, proposed_K, rounds), decode_seconds = _timed(decode, *args)
    tokens_BL, n_B = np.asarray(tokens_BL), np.asarray(n_B)
    rows = [_until(tokens_BL[b, P : P + min(steps, n_B[b] - P + 1)].tolist(), eos_id) for b in range(B)]
    return SpeculativeGeneration(
        tokens=rows,
        accepted_K=np.asarray(accepted_K),
        proposed_K=np.asarray(proposed_K),
        rounds=int(rounds),
        prefill_seconds=prefill_seconds,
        decode_tokens=sum(len(r) for r in rows),
        decode_seconds=decode_seconds,
    )


def _until(ids: list[int], eos_id: int) -> list[int]:
    return ids[: ids.index(eos_id)] if eos_id in ids else ids
