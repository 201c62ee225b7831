"""Speculative decoding (sampling/speculative.py): greedy output is plain greedy's for both drafters and several k,
the MTP drafter accepts exactly the drafts a full forward pass of its heads predicts, rejection sampling draws
from the target's distribution (chi-squared) where the draft's differs, and a rejected draft leaves the cache as if
never written; infer.py's --speculative=mtp|draft end to end."""

from __future__ import annotations

import functools
import itertools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from model import ModelConfig, Transformer, init_variables, unstack_layers
from model import heads as heads_lib
from model.cache import init_cache, rewind
from model.mtp import MTPConfig
from sampling import Rules, generate_batch
from sampling import speculative as spec
from sampling.decode import for_inference, with_rewind

GREEDY = Rules(temperature=0)
PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [9, 8], [4]]
STEPS, MAX_LEN = 14, 32


@functools.cache
def model(style: str = "", heads: int = 0, vocab: int = 50, layers: int = 2, seed: int = 1):
    cfg = ModelConfig(vocab_size=vocab, d_model=32, num_layers=layers, num_heads=4, num_kv_heads=2, d_ff=64,
                      max_seq_len=MAX_LEN, init_std=0.5,
                      mtp=MTPConfig(num_heads=heads, style=style or "sequential"))  # fmt: skip
    net = Transformer(cfg)
    return net, nn.unbox(jax.jit(lambda key: init_variables(net, key))(jax.random.key(seed))["params"])


@functools.cache
def plain(style: str, heads: int):
    """Plain greedy continuations, 4 tokens longer than the speculative ones (what the last round verifies)."""
    net, params = model(style, heads)
    return generate_batch(net, params, PROMPTS, STEPS + 4, GREEDY, max_len=MAX_LEN).tokens


@functools.cache
def heads_forward(net):
    """Jitted: each MTP depth's argmax at every position of a window [1, W] (one forward pass of the heads)."""
    K = net.cfg.mtp.num_heads

    def drafts(params, tokens):
        ahead = heads_lib.ahead(tokens, K + 1)
        out = net.apply({"params": params}, tokens[:, : -K - 1], ahead_BTA=ahead, method=Transformer.forward)
        return jnp.argmax(out.extra["mtp"][:, 0], -1)

    return jax.jit(drafts)


def simulated_acceptance(net, params, sequence: list[int], prompt_len: int, k: int) -> np.ndarray:
    """Per draft position, how many drafts greedy MTP drafting of STEPS tokens gets accepted on `sequence`
    (prompt + greedy output), from one full forward pass of the heads over it: each round drafts depth d's argmax
    at the pending token's predecessor; draft d is kept when it and those before it are the next tokens."""
    K = net.cfg.mtp.num_heads
    # Zeros after the sequence (the same length for every prompt: one compiled forward) change no earlier position.
    tokens = np.asarray(sequence + [0] * (MAX_LEN + K + 1 - len(sequence)), np.int32)[None]  # [1, MAX_LEN + K + 1]
    drafts_KT = np.asarray(heads_forward(net)(params, jnp.asarray(tokens)))
    accepted, n = np.zeros(k, int), prompt_len
    while n - prompt_len + 1 < STEPS:
        a = 0
        while a < k and drafts_KT[a, n - 1] == sequence[n + a + 1]:
            a += 1
        accepted[:a] += 1
        n += a + 1
    return accepted


@pytest.mark.parametrize("style, heads, k", [("sequential", 2, 1), ("sequential", 2, 2), ("parallel", 2, 2)])
def test_mtp_greedy_is_plain_greedy_and_accepts_what_the_heads_predict(style, heads, k):
    net, params = model(style, heads)
    out = spec.generate(net, params, PROMPTS, STEPS, GREEDY, drafter=spec.MTPDrafter(net.cfg, k), max_len=MAX_LEN)
    assert out.tokens == [t[:STEPS] for t in plain(style, heads)]
    want = sum(simulated_acceptance(net, params, p + t, len(p), k) for p, t in zip(PROMPTS, plain(style, heads)))
    # Rows are left-padded to the longest prompt; the simulation runs each alone: the same drafts either way.
    np.testing.assert_array_equal(out.accepted_K, want)


@pytest.mark.parametrize("k", [1, 3])
def test_draft_model_greedy_is_plain_greedy(k):
    net, params = model("sequential", 2)
    draft, draft_params = model(layers=1, seed=7)
    drafter = spec.ModelDrafter(draft, k)
    out = spec.generate(
        net, params, PROMPTS, STEPS, GREEDY, drafter=drafter, draft_params=draft_params, max_len=MAX_LEN
    )
    assert out.tokens == [t[:STEPS] for t in plain("sequential", 2)]
    # The target drafting for itself: every draft is accepted, k + 1 tokens a round.
    itself = spec.generate(net, params, PROMPTS, STEPS, GREEDY, drafter=spec.ModelDrafter(net, k),
                           draft_params=params, max_len=MAX_LEN)  # fmt: skip
    assert itself.tokens == out.tokens and (itself.acceptance_K == 1).all()


def chi2_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson's test of `counts` against `probs`, cells expecting under 5 draws pooled into one."""
    expected = probs / probs.sum() * counts.sum()
    small = expected < 5
    counts = np.append(counts[~small], counts[small].sum())
    expected = np.append(expected[~small], expected[small].sum())
    return stats.chisquare(counts, expected).pvalue


def test_rejection_sampling_draws_from_the_target_distribution():
    """One round of accept(): the first emitted token follows p exactly, whatever q the draft came from."""
    p_V = np.array([0.45, 0.25, 0.15, 0.1, 0.05])
    q_V = np.array([0.05, 0.1, 0.15, 0.3, 0.4])
    n = 20000
    keys_B = jax.random.split(jax.random.key(3), n)
    drafts_B = jax.vmap(lambda key: jax.random.categorical(jax.random.fold_in(key, 9), jnp.log(q_V)))(keys_B)
    p_BKV = jnp.broadcast_to(jnp.asarray(p_V, jnp.float32), (n, 2, 5))
    q_BKV = jnp.broadcast_to(jnp.asarray(q_V, jnp.float32), (n, 1, 5))
    a_B, _, next_B = jax.jit(spec.accept)(p_BKV, q_BKV, drafts_B[:, None].astype(jnp.int32), keys_B)
    first_B = np.where(np.asarray(a_B) == 1, np.asarray(drafts_B), np.asarray(next_B))
    counts = np.bincount(first_B, minlength=5)
    assert stats.chisquare(counts, p_V * n).pvalue > 1e-3
    assert stats.chisquare(np.bincount(np.asarray(drafts_B), minlength=5), p_V * n).pvalue < 1e-12


def test_speculative_sampling_follows_the_target_model_not_the_draft():
    """Many rows of one prompt, three sampled tokens each (the last two from a verify round with k = 2): their
    joint frequencies match the target model's distribution over all vocab^3 continuations, not the draft's."""
    V, rules, prompt, n = 4, Rules(temperature=1.0), [1, 2], 3000
    net, params = model(vocab=V, seed=4)
    draft, draft_params = model(vocab=V, layers=1, seed=5)

    def exact(m, p):
        seqs = np.array(list(itertools.product(range(V), repeat=3)), np.int32)
        full = np.concatenate([np.tile(prompt, (len(seqs), 1)), seqs], 1)
        logp = np.asarray(jax.nn.log_softmax(jax.jit(m.apply)({"params": p}, jnp.asarray(full)), -1), np.float64)
        steps = np.take_along_axis(logp[:, len(prompt) - 1 : -1], seqs[..., None], -1)[..., 0]
        return np.exp(steps.sum(1))

    drafter = spec.ModelDrafter(draft, 2)
    out = spec.generate(net, params, [prompt] * n, 3, rules, drafter=drafter, draft_params=draft_params,
                        max_len=8, seed=11)  # fmt: skip
    cells = np.array([np.ravel_multi_index(t, (V,) * 3) for t in out.tokens])
    counts = np.bincount(cells, minlength=V**3)
    target, drafts = exact(net, params), exact(draft, draft_params)
    assert chi2_pvalue(counts, target) > 1e-3
    assert chi2_pvalue(counts, drafts) < 1e-6
    assert 0 < out.acceptance_K[0] < 1  # the drafts were really rejected some of the time


def test_a_rejected_draft_leaves_the_cache_as_if_never_written():
    net, params = model("sequential", 2)
    dec = with_rewind(for_inference(net), 4)
    params = unstack_layers(params, net.cfg)
    step = jax.jit(lambda c, t, p: dec.apply({"params": params, "cache": c}, t, p, mutable=["cache"]))
    prompt = jnp.asarray([[3, 1, 4, 1, 5]])
    cache = jax.jit(lambda: init_cache(dec, 1, 16))()
    _, v = step(cache, prompt, jnp.arange(5)[None])
    # Speculative: the next token and three drafts, then all drafts rejected and the next token kept.
    _, spec_v = step(v["cache"], jnp.asarray([[9, 2, 6, 5]]), jnp.arange(5, 9)[None])
    rewound = rewind(spec_v["cache"], jnp.asarray([6]))
    # Plain: only the next token.
    _, plain_v = step(v["cache"], jnp.asarray([[9]]), jnp.asarray([[5]]))
    for got, want in zip(jax.tree.leaves(rewound), jax.tree.leaves(plain_v["cache"])):
        if got.ndim == 4:  # keys / values: the written slots agree (to rounding: slot 5's layer-2 key was computed
            # beside the drafts), the rest is never read (position -1)
            np.testing.assert_allclose(got[:, :, :6], want[:, :, :6], rtol=1e-4, atol=1e-4)
        else:  # slot positions (the rejected ones empty again) and tokens written: exactly
            np.testing.assert_array_equal(got, want)
    got_logits, _ = step(rewound, jnp.asarray([[7, 7]]), jnp.asarray([[6, 7]]))
    want_logits, _ = step(plain_v["cache"], jnp.asarray([[7, 7]]), jnp.asarray([[6, 7]]))
    np.testing.assert_allclose(got_logits, want_logits, rtol=1e-4, atol=1e-4)


def test_draft_tokens_default_to_one_per_mtp_head_and_4_for_a_draft_model():
    """infer.py --speculative=mtp on configs/ablations/mtp.py (one head) needs no --draft_tokens."""
    from sampling.runner import draft_tokens

    cfg = ModelConfig(mtp=MTPConfig(num_heads=1))
    assert draft_tokens(cfg, 0, "mtp") == 1 and draft_tokens(cfg, 0, "draft") == 4
    assert draft_tokens(ModelConfig(mtp=MTPConfig(num_heads=2)), 0, "mtp") == 2 and draft_tokens(cfg, 3, "draft") == 3
    # README: k <= model.mtp.num_heads (infer.py prints the message as its one `error:` line, exit code 2).
    with pytest.raises(ValueError, match=r"--draft_tokens=3: model.mtp.num_heads=2 MTP heads, each drafting one"):
        draft_tokens(ModelConfig(mtp=MTPConfig(num_heads=2)), 3, "mtp")
    with pytest.raises(ValueError, match=r"no MTP heads \(model.mtp.num_heads=0\)"):
        draft_tokens(ModelConfig(), 0, "mtp")


# ------------------------------------------------------------------------------------------------ infer.py


def test_infer_speculative_mtp_and_draft_give_greedy_tokens_report_acceptance_and_keep_k_within_the_heads(
    mtp_mla_run,
):
    """README: `--speculative=mtp --draft_tokens k` (k <= model.mtp.num_heads) and `--speculative=draft
    --draft_workdir W2` sample through sampling/runner.py, print the samples, and report the acceptance rate per
    draft position and tokens/s against plain decoding; with --temperature 0 the tokens are plain greedy's. The MTP
    run also decodes with --mla_decode=naive (the draft run: the default, absorbed), so the two runs' equal text says
    both MLA decoders and both drafters give the greedy tokens; the model drafting for itself has every draft
    accepted."""
    from tests.test_cli import run_cli

    workdir, _ = mtp_mla_run
    common = ("infer.py", f"--workdir={workdir}", "--prompt=def f", "--temperature=0", "--max_new_tokens=8", "--noeos")
    mtp = run_cli(*common, "--speculative=mtp", "--mla_decode=naive")  # k: one per head (2)
    draft = run_cli(*common, "--speculative=draft", f"--draft_workdir={workdir}", "--draft_tokens=3")
    for done in (mtp, draft):
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.startswith("def f") and len(done.stdout) > len("def f\n"), done.stdout
    assert mtp.stdout == draft.stdout
    rate = r"acceptance per draft position \[{}\], [\d.]+ tokens per verify round \| decode [\d,]+ tokens/s vs plain [\d,]+ tokens/s \([\d.]+x\)"  # noqa: E501
    assert re.search(r"speculative \(mtp heads, k=2\): " + rate.format(r"[\d.]+ [\d.]+"), mtp.stderr), mtp.stderr
    assert re.search(r"speculative \(draft model, k=3\): " + rate.format("1.000 1.000 1.000"), draft.stderr), (
        draft.stderr
    )
