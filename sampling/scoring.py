"""Scoring for evaluation: log-likelihoods of continuations, rolling log-likelihoods of long documents, and
generation until stop strings, over token ids, batched and exact.

Requests are grouped by context. A context shared by several continuations (a multiple-choice question's
choices) is prefilled once into a decode cache (model/cache.py), whose rows are then copied to each continuation: one
context forward plus one short forward per choice. The rest (single requests, rolling windows, and groups whose
context is too short for sharing to pay: CACHE_COST) run as plain right-padded rows, one forward each, which on a CPU
is the faster path per token. Either way requests are sorted by length and cut into batches padded to bucketed
shapes, so a whole task compiles a handful of programs; results come back in the caller's order. Only the positions
that predict a continuation's tokens go through the output head. Each result equals the one-request computation (a
plain forward of context + continuation) to float32 rounding (tests/test_scoring.py).

The harness adapter (experiments/harness.py) turns lm-eval's text requests into these; `Scorer.load` gives a
scorer of a workdir or a Hugging Face directory, on one device or on a mesh (`mesh='data=2,tensor=4'`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from model import ModelConfig, Transformer
from model.cache import init_cache, select_rows
from model.runtime import DecodeConfig, Runtime
from parallel import decoding
from parallel.layout import Layout
from sampling.decode import for_inference, generate_batch, unrolled
from sampling.rules import Rules
from sampling.runner import Watcher, cut_at_stop


@dataclasses.dataclass(frozen=True)
class GenerateRequest:
    """Continue `context` (token ids) until a stop string, the end-of-document token or `max_new_tokens`."""

    context: Sequence[int]
    until: tuple[str, ...] = ()
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0
    top_p: float = 1.0


def bucket(n: int, cap: int | None = None) -> int:
    """`n` rounded up to a power of two (at least 8), at most `cap` (but not below `n`): the padded size of a batch
    of rows."""
    size = max(8, 1 << (max(n, 1) - 1).bit_length())
    return max(n, min(size, cap)) if cap is not None else size


def length_bucket(n: int) -> int:
    """`n` tokens rounded up to one of 8 sizes per power of two (at least 8): padding wastes at most 1/8 of a
    sequence axis, and a task's lengths still fall into a handful of compiled shapes."""
    step = max(8, 1 << max(0, (max(n, 1) - 1).bit_length() - 3))
    return -(-n // step) * step


# The cache path costs up to about twice a plain forward per token on a CPU (dense attention over the cache's slots
# and its writes, where a plain forward runs the causal kernel; the longer the context, the more): a group of n
# continuations (C tokens each at most) sharing a P-token context goes through it when 2 (P + n C) < n (P + C). On
# stdlib_mc with configs/tiny.py (bytes, and bpe:2048) 2 did as well as 1.25 or 1.5, within a 2-core VM's noise, and
# better than never sharing.
CACHE_COST = 2.0


@dataclasses.dataclass
class Scorer:
    """A model loaded for scoring. `max_length` is the most tokens one forward sees (default: the model's context):
    longer requests lose tokens from the left, as lm-eval's models do, and are counted in `truncated`."""

    cfg: ModelConfig
    weights: object
    tokenizer: object
    batch_size: int = 32
    layout: Layout | None = None
    decode: DecodeConfig = DecodeConfig()
    max_length: int = 0
    truncated: int = 0

    def __post_init__(self):
        self.max_length = self.max_length or self.cfg.max_seq_len
        self.model = for_inference(Transformer(self.cfg, Runtime.decoding(self.decode)))
        self.plain = for_inference(Transformer(self.cfg), kv_cache=False)
        if self.layout is not None:
            self.weights = decoding.place_weights(self.weights, self.cfg, self.layout)
        self.shards = 1 if self.layout is None else decoding.row_shards(self.layout)

    @classmethod
    def load(
        cls, *, workdir=None, hf_dir=None, step: int | None = None, mesh: str = "", batch_size: int = 32, **kw
    ) -> tuple[Scorer, object]:
        """(scorer, run config) of a workdir's checkpoint (latest, or `step`) or of a Hugging Face directory."""
        from training import hf
        from training.checkpoint import load_for_inference

        if (workdir is None) == (hf_dir is None):
            raise ValueError("give exactly one of workdir or hf_dir")
        if hf_dir is not None:
            run, weights, tokenizer = hf.load(hf_dir)
        else:
            run, weights, tokenizer, _ = load_for_inference(workdir, step)
        layout = decoding.decode_layout(run.model, mesh) if mesh else None
        return cls(run.model, weights, tokenizer, batch_size=batch_size, layout=layout, **kw), run

    def _active(self):
        return self.layout.activate() if self.layout is not None else contextlib.nullcontext()

    def _rows(self, n: int) -> int:
        """Rows of a batch of `n`: a power of two up to the batch size, a multiple of the mesh's row shards."""
        rows = bucket(n, cap=max(self.batch_size, n))
        return -(-rows // self.shards) * self.shards

    # ------------------------------------------------------------------------------------ log-likelihood

    def loglikelihood(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[tuple[float, bool]]:
        """(log P(continuation | context), whether the continuation is the greedy one) of each (context ids,
        continuation ids) pair; contexts must be non-empty. A pair longer than max_length + 1 tokens keeps its last
        max_length + 1 (the first is only conditioned on), so a continuation longer than max_length has only its
        last max_length tokens scored (lm-eval's `hf` model refuses those)."""
        keep = self.max_length + 1
        groups: dict[tuple[int, ...], list[int]] = {}
        conts = []
        for i, (ctx, cont) in enumerate(requests):
            ctx, cont = list(ctx), list(cont)
            if not ctx or not cont:
                raise ValueError(f"request {i}: context and continuation must be non-empty")
            if len(ctx) + len(cont) > keep:
                self.truncated += 1
                tokens, scored = (ctx + cont)[-keep:], min(len(cont), self.max_length)
                ctx, cont = tokens[:-scored], tokens[-scored:]
            groups.setdefault(tuple(ctx), []).append(i)
            conts.append(cont)
        shared = [c for c, members in groups.items() if self._share(len(c), [len(conts[i]) for i in members])]
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        for batch in self._batches(shared, groups, conts):
            members = [(g, i) for g, c in enumerate(batch) for i in groups[c]]
            scores = self._score_batch([list(c) for c in batch], [(g, conts[i]) for g, i in members])
            for (_, i), score in zip(members, scores):
                out[i] = score
        shared_set = set(shared)
        single = [(list(c), i) for c, members in groups.items() if c not in shared_set for i in members]
        single.sort(key=lambda ci: -(len(ci[0]) + len(conts[ci[1]])))
        for first in range(0, len(single), self.batch_size):
            chunk = single[first : first + self.batch_size]
            for (_, i), score in zip(chunk, self._plain_batch([(c, conts[i]) for c, i in chunk])):
                out[i] = score
        return out  # type: ignore[return-value]

    @staticmethod
    def _share(context: int, continuations: list[int]) -> bool:
        """Whether a context's continuations go through the cache path (see CACHE_COST)."""
        n, longest = len(continuations), max(continuations)
        return n > 1 and CACHE_COST * (context + n * longest) < n * (context + longest)

    def _batches(self, shared: list, groups: dict, conts: list) -> list[list[tuple[int, ...]]]:
        """Shared contexts, longest first, cut into batches of at most batch_size continuations (a group is never
        split)."""
        order = sorted(shared, key=lambda c: (-len(c), -max(len(conts[i]) for i in groups[c])))
        batches, rows = [], 0
        for ctx in order:
            if batches and rows + len(groups[ctx]) <= self.batch_size:
                batches[-1].append(ctx)
                rows += len(groups[ctx])
            else:
                batches.append([ctx])
                rows = len(groups[ctx])
        return batches

    def _plain_batch(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """Scores (context, continuation) pairs by one plain forward of each row, right-padded."""
        T = min(length_bucket(max(len(c) + len(k) - 1 for c, k in pairs)), self.max_length)
        B = self._rows(len(pairs))
        tokens_BT = np.zeros((B, T + 1), np.int32)
        start_B, len_B = np.ones(B, np.int32), np.zeros(B, np.int32)
        for b, (c, k) in enumerate(pairs):
            tokens_BT[b, : len(c) + len(k)] = c + k
            start_B[b], len_B[b] = len(c), len(k)
        with self._active():
            scored = min(length_bucket(max(len(k) for _, k in pairs)), T)
            logprob_B, greedy_B = _score_plain(self.weights, tokens_BT, start_B, len_B, model=self.plain, scored=scored)
        logprob_B, greedy_B = np.asarray(logprob_B), np.asarray(greedy_B)
        return [(float(logprob_B[b]), bool(greedy_B[b])) for b in range(len(pairs))]

    def _score_batch(self, contexts: list[list[int]], conts: list[tuple[int, list[int]]]) -> list[tuple[float, bool]]:
        """Scores continuations (each naming its context's index) of a batch of contexts."""
        P = length_bucket(max(len(c) for c in contexts))
        C = length_bucket(max(len(c) for _, c in conts))
        G, N = self._rows(len(contexts)), self._rows(len(conts))
        ctx_GP = np.zeros((G, P), np.int32)
        ctx_pos_GP = np.full((G, P), -1, np.int32)
        for g, c in enumerate(contexts):
            ctx_GP[g, P - len(c) :] = c
            ctx_pos_GP[g, P - len(c) :] = np.arange(len(c))
        ctx_GP[len(contexts) :], ctx_pos_GP[len(contexts) :] = ctx_GP[0], ctx_pos_GP[0]  # padding rows
        cont_NC = np.zeros((N, C), np.int32)
        row_N = np.zeros(N, np.int32)
        len_N = np.zeros(N, np.int32)
        for n, (g, c) in enumerate(conts):
            cont_NC[n, : len(c)], row_N[n], len_N[n] = c, g, len(c)
        start_N = np.array([len(contexts[g]) for g in row_N[: len(conts)]] + [1] * (N - len(conts)), np.int32)
        with self._active():
            logprob_N, greedy_N = _score(
                self.weights, ctx_GP, ctx_pos_GP, cont_NC, row_N, start_N, len_N, model=self.model
            )
        logprob_N, greedy_N = np.asarray(logprob_N), np.asarray(greedy_N)
        return [(float(logprob_N[n]), bool(greedy_N[n])) for n in range(len(conts))]

    def loglikelihood_rolling(
        self, documents: Sequence[Sequence[int]], prefix: int, stride: int | None = None
    ) -> list[float]:
        """log P(document) of each document (token ids), conditioned at its start on `prefix` (the token a
        document follows) and scored in windows of max_length tokens: each window scores the next `stride` tokens
        (default max_length) with as much left context as fits, so every token is scored once. With the default
        stride the windows are lm-eval's (`get_rolling_token_windows` with context_len=1)."""
        stride = self.max_length if stride is None else stride
        if not 1 <= stride <= self.max_length:
            raise ValueError(f"stride={stride}: must be in [1, max_length={self.max_length}]")
        pieces, owner = [], []
        for d, doc in enumerate(documents):
            full = [prefix, *doc]
            for a in range(0, len(doc), stride):
                b = min(a + stride, len(doc))
                first = max(0, b - self.max_length)
                pieces.append((full[first : a + 1], full[a + 1 : b + 1]))
                owner.append(d)
        truncated = self.truncated  # windows never truncate; keep the count about requests
        scores = self.loglikelihood(pieces)
        self.truncated = truncated
        totals = [0.0] * len(documents)
        for d, (logprob, _) in zip(owner, scores):
            totals[d] += logprob
        return totals

    # ---------------------------------------------------------------------------------------- generation

    def generate(self, requests: Sequence[GenerateRequest], seed: int = 0) -> list[str]:
        """Each request's continuation as text, cut before its first stop string (and the end-of-document
        token). Contexts longer than max_length - max_new_tokens lose tokens from the left (counted in
        `truncated`). Requests with the same sampling settings go in batches, longest first; row r of the whole
        list samples from its own random stream (so the same request repeated gives different samples)."""
        by_settings: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            if r.max_new_tokens < 1:
                raise ValueError(f"request {i}: max_new_tokens={r.max_new_tokens} must be >= 1")
            key = (r.until, r.max_new_tokens, r.temperature, r.top_k, r.top_p)
            by_settings.setdefault(key, []).append(i)
        out: list[str | None] = [None] * len(requests)
        for (until, new, temperature, top_k, top_p), members in by_settings.items():
            room = max(self.max_length - new, 1)
            contexts = {}
            for i in members:
                ctx = list(requests[i].context)
                if len(ctx) > room:
                    self.truncated += 1
                    ctx = ctx[-room:]
                contexts[i] = ctx
            members = sorted(members, key=lambda i: -len(contexts[i]))
            rules = Rules(temperature=temperature, top_k=top_k, top_p=top_p)
            for first in range(0, len(members), self.batch_size):
                chunk = members[first : first + self.batch_size]
                prompts = [contexts[i] for i in chunk]
                prompts += [prompts[-1]] * (self._rows(len(prompts)) - len(prompts))
                max_len = length_bucket(max(len(p) for p in prompts) + new)
                watcher = Watcher(self.tokenizer, len(prompts), until, self.tokenizer.eod_id, None) if until else None
                with self._active():
                    generation = generate_batch(
                        self.model,
                        self.weights,
                        prompts,
                        new,
                        rules,
                        max_len=max_len,
                        eos_id=self.tokenizer.eod_id,
                        seed=seed,
                        first_row=min(chunk),
                        on_token=watcher,
                    )
                for i, tokens in zip(chunk, generation.tokens):
                    out[i] = cut_at_stop(self.tokenizer.decode(tokens), until)
        return out  # type: ignore[return-value]

    # ------------------------------------------------------------------------------------------ reference

    def naive_loglikelihood(self, context: Sequence[int], continuation: Sequence[int]) -> tuple[float, bool]:
        """One request alone: a plain causal forward of context + continuation from position 0 (no cache, no left
        padding; zeros after it, which no earlier position sees, so every request runs one program). The reference
        the batched path is tested against."""
        tokens = (list(context) + list(continuation))[-(self.max_length + 1) :]
        logits_TV = self.naive_logits(tokens[:-1])
        logprobs_TV = logits_TV - _logsumexp(logits_TV)
        C = min(len(continuation), self.max_length)
        targets = np.asarray(tokens[-C:])
        rows = logprobs_TV[-C:]
        return float(rows[np.arange(C), targets].sum()), bool((rows.argmax(-1) == targets).all())

    def naive_logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits [T, V] of `tokens` (at most max_length) from a plain forward of one row."""
        row = np.zeros((1, self.max_length), np.int32)
        row[0, : len(tokens)] = tokens
        return np.asarray(_forward(self.weights, row, model=self.plain))[0, : len(tokens)]


def _logsumexp(x_TV: np.ndarray) -> np.ndarray:
    m = x_TV.max(-1, keepdims=True)
    return m + np.log(np.exp(x_TV - m).sum(-1, keepdims=True))


@functools.partial(jax.jit, static_argnames=("model",))
def _forward(weights, tokens_BT, *, model: Transformer):
    return model.apply(unrolled(weights, model), tokens_BT)


@functools.partial(jax.jit, static_argnames=("model", "scored"))
def _score_plain(weights, tokens_BT1, start_B, len_B, *, model: Transformer, scored: int):
    """Rows [B, T+1] of context + continuation (right-padded), a plain forward of all but the last token, the head
    run only at the `scored` positions from each continuation's first prediction on: (sum of each continuation's
    log-probs [B], whether each of its tokens was the argmax [B])."""
    inputs_BT, targets_BT = tokens_BT1[:, :-1], tokens_BT1[:, 1:]
    T = inputs_BT.shape[1]
    at_BK = jnp.minimum(start_B[:, None] - 1 + jnp.arange(scored), T - 1)
    out = model.apply(unrolled(weights, model), inputs_BT, logits_at_BK=at_BK, method=Transformer.forward)
    logits_BKV = out.logits_BTV.astype(jnp.float32)
    target_BK = jnp.take_along_axis(targets_BT, at_BK, axis=1)
    logprobs_BK = jnp.take_along_axis(jax.nn.log_softmax(logits_BKV, axis=-1), target_BK[..., None], -1)[..., 0]
    valid_BK = jnp.arange(scored) < len_B[:, None]
    hit_BK = jnp.argmax(logits_BKV, axis=-1) == target_BK
    return jnp.sum(jnp.where(valid_BK, logprobs_BK, 0.0), axis=1), jnp.all(hit_BK | ~valid_BK, axis=1)


@functools.partial(jax.jit, static_argnames=("model",))
def _score(weights, ctx_GP, ctx_pos_GP, cont_NC, row_N, start_N, len_N, *, model: Transformer):
    """Prefills the contexts [G, P] (left-padded) into a cache, copies each continuation's context row, and runs
    the continuations [N, C] (right-padded) through it: (sum of the continuations' log-probs [N], whether each
    token was the argmax [N])."""
    G, P = ctx_GP.shape
    N, C = cont_NC.shape
    variables = unrolled(weights, model)
    cache = init_cache(model, G, P + C)
    last_G1 = jnp.full((G, 1), P - 1)  # only the context's last position predicts (the first continuation token)
    out, mutated = model.apply(
        {**variables, "cache": cache}, ctx_GP, ctx_pos_GP, logits_at_BK=last_G1, method=Transformer.forward,
        mutable=["cache"],
    )  # fmt: skip
    cache = select_rows(mutated["cache"], row_N)
    positions_NC = start_N[:, None] + jnp.arange(C)
    logits_NCV, _ = model.apply({**variables, "cache": cache}, cont_NC, positions_NC, mutable=["cache"])
    # The first continuation token is predicted by the context's last position, the rest by the continuation's.
    logits_NCV = jnp.concatenate([out.logits_BTV[row_N], logits_NCV[:, :-1]], axis=1).astype(jnp.float32)
    logprobs_NCV = jax.nn.log_softmax(logits_NCV, axis=-1)
    target_NC = jnp.take_along_axis(logprobs_NCV, cont_NC[..., None], axis=-1)[..., 0]
    valid_NC = jnp.arange(C) < len_N[:, None]
    hit_NC = jnp.argmax(logits_NCV, axis=-1) == cont_NC
    return jnp.sum(jnp.where(valid_NC, target_NC, 0.0), axis=1), jnp.all(hit_NC | ~valid_NC, axis=1)
