"""The batched scorer (sampling/scoring.py) against one request at a time: log-likelihoods with shared contexts,
rolling windows, generation until stop strings."""

from __future__ import annotations

import numpy as np
import pytest

from sampling import scoring
from sampling.scoring import GenerateRequest, Scorer


@pytest.fixture(scope="module")
def scorer(eval_run) -> Scorer:
    return Scorer.load(workdir=eval_run, batch_size=8)[0]


def _requests(tok, rng) -> list[tuple[list[int], list[int]]]:
    """Multiple-choice questions (one context, four continuations each) of varied lengths, shuffled; one whose
    context is longer than the model's window; continuations that are the greedy ones among them."""
    text = "".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}\n\n" for i in range(6) for j in range(5))
    ids = tok.encode(text)
    out = []
    for _ in range(6):
        start, size = rng.integers(0, len(ids) - 40), rng.integers(1, 24)
        ctx = ids[start : start + size]
        for c in range(4):
            length = int(rng.integers(1, 6))
            cont = ids[start + size : start + size + length] if c == 0 else list(rng.integers(0, 300, length))
            out.append((ctx, cont))
    L = 128  # the model's window
    out.append((ids[: L + 10], ids[L + 10 : L + 13]))  # 12 tokens are cut from the left
    out.append((ids[:2], ids[2 : L + 12]))  # a continuation longer than the window: its last L tokens are scored
    return [out[i] for i in rng.permutation(len(out))]


def test_loglikelihood_equals_one_request_at_a_time(scorer, monkeypatch):
    requests = _requests(scorer.tokenizer, np.random.default_rng(0))
    prefilled, plain = [], []
    cached, alone = scoring._score, scoring._score_plain
    monkeypatch.setattr(
        scoring, "_score", lambda w, ctx, *a, **k: prefilled.append(ctx.shape) or cached(w, ctx, *a, **k)
    )
    monkeypatch.setattr(scoring, "_score_plain", lambda w, t, *a, **k: plain.append(t.shape) or alone(w, t, *a, **k))
    got = scorer.loglikelihood(requests)
    want = [scorer.naive_loglikelihood(ctx, cont) for ctx, cont in requests]
    np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], rtol=1e-5, atol=1e-5)
    assert [g[1] for g in got] == [w[1] for w in want]
    assert 3 <= sum(w[1] for w in want) < len(want)  # some continuations are the greedy ones, not all
    assert scorer.truncated == 2
    # Questions whose context is long enough next to their continuations share one prefill through the cache (two
    # questions of 4 per batch of 8 rows); the others, and the single requests, run as plain rows.
    shared = {tuple(c) for c, k in requests if Scorer._share(len(c), [len(k2) for c2, k2 in requests if c2 == c])}
    assert 1 <= len(shared) < 6 and len(prefilled) == -(-len(shared) // 2) and plain
    assert sum(b for b, _ in plain) >= len(requests) - 4 * len(shared)


def test_rolling_loglikelihood_scores_each_token_once(scorer):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    tok, L = scorer.tokenizer, scorer.max_length
    docs = [tok.encode("def f(x):\n    return x * 3 + 1\n\n" * k) for k in (1, 12, 40)]
    assert len(docs[-1]) > 2 * L  # several windows
    got = scorer.loglikelihood_rolling(docs, tok.eod_id)
    for doc, total in zip(docs, got):
        windows = map(make_disjoint_window, get_rolling_token_windows(doc, tok.eod_id, L, 1))
        want = sum(scorer.naive_loglikelihood(ctx, cont)[0] for ctx, cont in windows)
        np.testing.assert_allclose(total, want, rtol=1e-5)
    # A stride of 32: every window scores 32 new tokens after up to 96 of context.
    doc, stride = docs[-1], 32
    full = [tok.eod_id, *doc]
    want = sum(
        scorer.naive_loglikelihood(full[max(0, min(a + stride, len(doc)) - L) : a + 1], full[a + 1 : a + stride + 1])[0]
        for a in range(0, len(doc), stride)
    )
    np.testing.assert_allclose(scorer.loglikelihood_rolling([doc], tok.eod_id, stride=stride)[0], want, rtol=1e-5)
    assert abs(want - got[-1]) > 1e-3  # more context changes the score: the stride is not ignored


def test_generate_until_stop_strings_equals_a_greedy_loop(scorer):
    tok = scorer.tokenizer
    prompts = ["def f3_", "def f1_2(x):\n", "    return x *", "def"]
    requests = [GenerateRequest(tok.encode(p), until=("\n",), max_new_tokens=12) for p in prompts]
    requests.append(GenerateRequest(tok.encode(prompts[0]), until=(), max_new_tokens=5))
    got = scorer.generate(requests)
    for request, text in zip(requests, got):
        ids = list(request.context)
        for _ in range(request.max_new_tokens):  # naive greedy: one full forward per token
            ids.append(int(np.argmax(scorer.naive_logits(ids)[-1])))
        new = ids[len(request.context) :]
        want = tok.decode(new[: new.index(tok.eod_id)] if tok.eod_id in new else new)
        assert text == (want.split("\n")[0] if request.until else want)
    assert len({t for t in got if t}) >= 3  # the rows differ


def test_bad_requests_are_one_line_errors(scorer):
    with pytest.raises(ValueError, match="request 0: context and continuation must be non-empty"):
        scorer.loglikelihood([([], [1])])
    with pytest.raises(ValueError, match="stride=0: must be in"):
        scorer.loglikelihood_rolling([[1, 2]], 0, stride=0)
