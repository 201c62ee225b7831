"""The serving engine (sampling/engine.py): paged attention against a plain forward pass for every attention kind
and cache, the same tokens alone and in a crowd, prefix sharing, preemption under a tiny pool, per-row sampling
rules against sampling.rules, and its one-line refusals."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sampling.engine as engine_lib
from data.tokenizer import ByteTokenizer
from model import ModelConfig, Transformer, init_variables
from model.runtime import DecodeConfig, Runtime
from sampling.decode import generate_batch, prompt_ids, row_keys
from sampling.engine import Engine, EngineConfig, QueueFull, RequestError, SamplingParams, filtered_rows, sample_rows
from sampling.rules import Rules, filtered, pick
from training.checkpoint import load_for_inference

# Random weights with a large init: greedy continuations that differ from row to row and from step to step.
BASE = dict(vocab_size=257, d_model=32, num_layers=2, num_heads=4, d_ff=64, max_seq_len=64, init_std=0.3)
MLA = dict(attention="mla", mla=dict(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8))
KINDS = {
    "gqa": (ModelConfig(**BASE, num_kv_heads=2), DecodeConfig()),
    "gqa-alibi-int8": (ModelConfig(**BASE, num_kv_heads=1, position="alibi"), DecodeConfig(cache_dtype="int8")),
    "mla-absorbed": (ModelConfig(**BASE, **MLA), DecodeConfig(attention="absorbed")),
    "mla-naive": (ModelConfig(**BASE, **MLA), DecodeConfig(attention="naive")),
    "window": (ModelConfig(**BASE, num_kv_heads=2, sliding_window=6, global_every=2), DecodeConfig()),
}
# Pages of 4 slots, chunks of 8: prompts of 5, 13 and 22 tokens take one, two and three chunks and end mid-page.
SMALL = EngineConfig(max_batch=4, page_size=4, chunk=8, prefill_rows=2, num_pages=64)
TEXTS = ["def", "import numpy", "class Tree(object):\n  "]


def random_params(cfg: ModelConfig, seed: int = 3):
    return jax.device_get(nn.unbox(jax.jit(lambda k: init_variables(Transformer(cfg), k))(jax.random.key(seed))))[
        "params"
    ]


@pytest.mark.parametrize("kind", KINDS)
def test_paged_decoding_gives_a_plain_forward_pass_logprobs(kind):
    """Every prompt token's logprob (chunked prefill over pages) and every generated token's (decoding over
    pages) equal log_softmax of one forward pass over the whole text, without a cache (an int8 cache: within its
    rounding), and the greedy tokens are those of the dense cache (sampling.generate_batch, same DecodeConfig)."""
    cfg, decode = KINDS[kind]
    params, tok = random_params(cfg), ByteTokenizer()
    engine = Engine(Transformer(cfg), params, tok, SMALL, decode)
    prompts = [prompt_ids(tok, t) for t in TEXTS]
    params_of = SamplingParams(max_tokens=20, temperature=0, stop_at_eos=False, logprobs=2, prompt_logprobs=True)
    handles = [engine.submit(p, params_of) for p in prompts]
    engine.run_until_done()
    forward = jax.jit(lambda t: jax.nn.log_softmax(Transformer(cfg).apply({"params": params}, t[None])[0]))
    atol = 0.2 if decode.cache_dtype == "int8" else 1e-4
    dense = Transformer(cfg).clone(rt=Runtime.decoding(decode))
    rows = generate_batch(dense, params, prompts, 20, Rules(temperature=0), max_len=cfg.max_seq_len).tokens
    for prompt, h in zip(prompts, handles):
        assert h.finish_reason == "length" and len(h.tokens) == 20
        full = prompt + h.tokens
        want_TV = np.asarray(forward(jnp.asarray(full)))
        want_T = want_TV[np.arange(len(full) - 1), full[1:]]
        assert h.prompt_logprobs[0] is None and [lp.token for lp in h.prompt_logprobs[1:]] == prompt[1:]
        np.testing.assert_allclose([lp.logprob for lp in h.prompt_logprobs[1:]], want_T[: len(prompt) - 1], atol=atol)
        np.testing.assert_allclose([lp.logprob for lp in h.logprobs], want_T[len(prompt) - 1 :], atol=atol)
        assert [lp.top[0][0] for lp in h.logprobs] == h.tokens  # the most likely token, which greedy picked
        assert len(set(h.tokens)) > 3  # no row repeats one token: a mix-up would show
    assert [h.tokens for h in handles] == rows
    assert len({tuple(h.tokens) for h in handles}) == len(handles)
    for window, pool in engine.pools.items():
        assert pool.held() == 0  # every page is back
        if window:  # a windowed pool frees the pages that slide out: 22 + 20 tokens held at most 3 of 4 slots
            assert pool.peak <= len(prompts) * (-(-window // SMALL.page_size) + 2) < engine.pools[0].peak


@pytest.fixture(scope="module")
def trained(eval_run):
    run, params, tok, _ = load_for_inference(eval_run)
    return run, params, tok


def crowd(tok) -> list[tuple[list[int], SamplingParams]]:
    """Requests of mixed prompt and output lengths, greedy and sampled."""
    lines = [f"def f{i}_{j}(x):\n" for i, j in [(1, 2), (3, 14), (0, 0), (7, 33), (2, 5), (9, 1), (4, 20), (5, 8)]]
    out = []
    for i, line in enumerate(lines):
        rules = dict(temperature=0.0) if i % 2 else dict(temperature=0.9, top_p=0.9, seed=11 + i)
        out.append((prompt_ids(tok, line * (1 + i % 3)), SamplingParams(max_tokens=4 + 5 * i, logprobs=1, **rules)))
    return out


def served(engine: Engine, requests) -> list:
    handles = [engine.submit(p, s) for p, s in requests]
    engine.run_until_done()
    return handles


def run_all(engine: Engine, requests) -> list[list[int]]:
    return [h.tokens for h in served(engine, requests)]


def test_a_request_gets_the_same_tokens_alone_and_in_a_crowd_as_infer(trained):
    """Alone, a prompt prefills in [2, 16] calls; in the crowd also in [4, 8] calls, several prompts each: the same
    bits either way (every prefill shape multiplies 32 token rows), and the same tokens as infer.py's."""
    run, params, tok = trained
    model = Transformer(run.model)
    config = EngineConfig(max_batch=4, page_size=8, chunk=16, prefill_rows=2)
    engine = Engine(model, params, tok, config)
    assert engine.prefill_shapes == [(2, 16), (4, 8)]
    engine.warmup()
    compiled = engine_lib._call._cache_size()
    requests = crowd(tok)
    crowded = served(engine, requests)
    assert engine_lib._call._cache_size() == compiled  # every call shape compiled once, by warmup
    assert engine.stats.calls[4, 8] > 0 and engine.stats.calls[2, 16] > 0
    lone = [served(engine, [r])[0] for r in requests[:4]]
    together, alone = [h.tokens for h in crowded], [h.tokens for h in lone]
    assert together[:4] == alone
    assert [h.logprobs for h in crowded[:4]] == [h.logprobs for h in lone]  # bit for bit
    # what infer.py samples (sampling.generate_batch, a dense cache): greedy and seeded, row 0 of the seed
    for (prompt, p), got in zip(requests[:4], alone):
        rules = Rules(temperature=p.temperature, top_p=p.top_p)
        want = generate_batch(model, params, [prompt], p.max_tokens, rules, max_len=128, eos_id=tok.eod_id, seed=p.seed)
        assert got == want.tokens[0]
    assert len(set(together[1])) > 2  # greedy continuations of the trained model are not one token repeated
    assert engine.pools[0].held() == 0


def test_several_decode_steps_per_call_give_the_tokens_of_one(trained):
    """decode_steps=4: each decode call samples up to 4 tokens a row, feeding each back in. The same tokens and
    finish reasons as one step a call (greedy and seeded; max_tokens that are no multiple of 4; a row that fills
    max_len; a stop string mid-call), logprobs within float rounding, every page back."""
    run, params, tok = trained
    model = Transformer(run.model)
    requests = crowd(tok)
    fill = 63 - len(requests[2][0])  # to max_len=63 exactly
    requests[2] = (requests[2][0], dataclasses.replace(requests[2][1], max_tokens=fill, stop_at_eos=False))
    requests.append((prompt_ids(tok, "def f1_2(x):\n"), SamplingParams(max_tokens=40, temperature=0, stop=["x"])))
    got, calls = {}, {}
    for steps in (1, 4):
        config = EngineConfig(
            max_batch=4, page_size=8, chunk=16, prefill_rows=2, max_len=63, decode_steps=steps, prefix_caching=False
        )
        engine = Engine(model, params, tok, config)
        handles = served(engine, requests)
        got[steps] = [(h.tokens, h.text, h.finish_reason) for h in handles], [h.logprobs for h in handles]
        assert engine.pools[0].held() == 0
        calls[steps] = engine.stats.prompt_tokens, engine.stats.calls[4, 1]
    assert calls[4][0] == calls[1][0] and calls[4][1] < calls[1][1] / 2  # no token computed twice, fewer calls
    assert got[4][0] == got[1][0]
    assert {reason for _, _, reason in got[4][0]} == {"length", "stop"}
    assert len(requests[2][0]) + len(got[4][0][2][0]) == 63 and fill % 4  # (max_len; no multiple of the steps)
    for a, b in zip(got[4][1], got[1][1]):
        np.testing.assert_allclose([lp.logprob for lp in a], [lp.logprob for lp in b], atol=1e-5)


def test_prefix_sharing_gives_the_same_tokens_with_fewer_pages(trained):
    run, params, tok = trained
    system = "def f3_14(x):\n    return x * 14 + 3\n\ndef f3_15(x):\n    return x * 15 + 3\n\n"
    prompts = [prompt_ids(tok, system + f"def f{i}_") for i in range(5)]
    prompts.append(prompts[0][: len(prompts[0]) // 8 * 8])  # whole pages, every one cached: its last is recomputed
    requests = [(p, SamplingParams(max_tokens=10, temperature=0)) for p in prompts]
    got = {}
    for caching in (False, True):
        config = EngineConfig(max_batch=2, page_size=8, chunk=16, prefill_rows=1, prefix_caching=caching)
        engine = Engine(Transformer(run.model), params, tok, config)
        got[caching] = (run_all(engine, requests), engine.pools[0].allocations, engine.stats)
    assert got[True][0] == got[False][0]
    shared = len(prompt_ids(tok, system)) // 8  # full pages of the common prefix
    # the first two rows fill them once; the whole-page prompt recomputes its last
    assert got[True][1] <= got[False][1] - (len(requests) - 2) * shared + 1
    assert got[True][2].prefix_hit_tokens >= ((len(requests) - 2) * shared - 1) * 8 > 0
    assert got[True][2].prompt_tokens < got[False][2].prompt_tokens


def test_preemption_under_a_tiny_pool_completes_every_request(trained):
    run, params, tok = trained
    requests = [(p, dataclasses.replace(s, temperature=0.0, prompt_logprobs=True)) for p, s in crowd(tok)]
    roomy = EngineConfig(max_batch=4, page_size=8, chunk=16, prefill_rows=2)
    engine = Engine(Transformer(run.model), params, tok, roomy)
    alone = [engine.submit(p, s) for p, s in requests]
    engine.run_until_done()
    # room for about two rows: the others are preempted, freed and recomputed, the oldest always runs
    tiny = Engine(Transformer(run.model), params, tok, dataclasses.replace(roomy, num_pages=12))
    handles = [tiny.submit(p, s) for p, s in requests]
    tiny.run_until_done()
    assert tiny.stats.preemptions > 0
    assert all(h.finish_reason in ("length", "stop") for h in handles)
    assert [h.tokens for h in handles] == [h.tokens for h in alone]
    for h, want in zip(handles, alone):  # a prompt's logprobs, begun and then recomputed, are handed out once
        assert len(h.prompt_logprobs) == len(h.prompt)
        np.testing.assert_allclose(
            [lp.logprob for lp in h.prompt_logprobs[1:]], [lp.logprob for lp in want.prompt_logprobs[1:]], atol=1e-5
        )
    assert tiny.pools[0].held() == 0
    prompt = (requests[3][0] + requests[5][0])[:60]  # four chunks
    h = tiny.submit(prompt, SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=True))
    tiny.step()  # its first chunk
    tiny._preempt(tiny.running[0])
    tiny.run_until_done()
    assert len(h.prompt_logprobs) == len(prompt) and h.prompt_logprobs[0] is None


@pytest.mark.parametrize("wait", [0, 2])
def test_a_prefill_call_less_than_half_full_waits_at_most_prefill_wait_steps(wait):
    """While a row decodes, a 3-token prompt (3 of a prefill call's 16 slots) waits `wait` steps for more prompts; a
    prompt that fills half the call, or one with no row decoding beside it, runs at once."""
    cfg, _ = KINDS["gqa"]
    engine = Engine(
        Transformer(cfg), random_params(cfg), ByteTokenizer(), dataclasses.replace(SMALL, prefill_wait=wait)
    )
    greedy = SamplingParams(max_tokens=30, temperature=0, stop_at_eos=False)
    engine.submit([1, 2, 3], greedy)
    engine.step()  # nothing decodes yet: its prefill runs at once
    assert sum(n for (rows, width), n in engine.stats.calls.items() if width > 1) == 1
    short = engine.submit([4, 5, 6], greedy)
    prefills = []
    for _ in range(wait + 1):
        engine.step()
        prefills.append(sum(n for (rows, width), n in engine.stats.calls.items() if width > 1))
    assert prefills == [1] * wait + [2] and short.tokens  # it waited `wait` steps, then ran
    engine.submit(list(range(10, 18)), greedy)  # 8 of 16 slots: half full
    engine.step()
    assert sum(n for (rows, width), n in engine.stats.calls.items() if width > 1) == 3


def test_each_row_samples_by_its_own_rules_as_pick_does():
    # scaled so that the tail's probability mass rounds away: a filter a row does not ask for would drop tokens
    logits_BV = jax.random.normal(jax.random.key(0), (7, 50)) * 12
    rules = [Rules(0.0), Rules(0.7), Rules(1.0, top_k=5), Rules(0.9, top_p=0.6), Rules(1.3, min_p=0.1)]
    rules += [Rules(0.8, 3, 0.8, 0.05), Rules(1.0, 50, 1.0, 0.0)]
    rules_B4 = jnp.asarray([(r.temperature, r.top_k, r.top_p, r.min_p) for r in rules], jnp.float32)
    got_BV = np.asarray(filtered_rows(logits_BV, rules_B4))
    for b, r in enumerate(rules[1:], 1):
        np.testing.assert_array_equal(got_BV[b], np.asarray(filtered(logits_BV[b : b + 1], r))[0])
    for step in range(20):
        keys_B = jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys(7, len(rules)), step)
        got = np.asarray(sample_rows(logits_BV, rules_B4, keys_B))
        want = [int(pick(logits_BV[b : b + 1], keys_B[b : b + 1], r)[0]) for b, r in enumerate(rules)]
        np.testing.assert_array_equal(got, want)


def test_requests_that_cannot_run_are_one_line_errors():
    cfg, _ = KINDS["gqa"]
    engine = Engine(Transformer(cfg), random_params(cfg), ByteTokenizer(), dataclasses.replace(SMALL, max_queue=2))
    bad = {
        "positions; this model's context is 64": ([1] * 60, SamplingParams(max_tokens=10)),
        r"temperature=-1: must be >= 0": ([1], SamplingParams(temperature=-1)),
        r"top_p=0: must be in \(0, 1\]": ([1], SamplingParams(top_p=0)),
        r"logprobs=6: must be in \[0, 5\]": ([1], SamplingParams(logprobs=6)),
        "prompt is empty": ([], SamplingParams()),
        r"prompt token 257: ids must be in \[0, 257\)": ([1, 257], SamplingParams()),
        "max_tokens=0 asks for nothing": ([1], SamplingParams(max_tokens=0)),
    }
    for message, (prompt, params) in bad.items():
        with pytest.raises(RequestError, match=message):
            engine.submit(prompt, params)
    engine.submit([1, 2], SamplingParams())
    engine.submit([1, 2], SamplingParams())
    with pytest.raises(QueueFull, match="max_queue=2"):
        engine.submit([1, 2], SamplingParams())
    with pytest.raises(ValueError, match="max_batch=0: must be >= 1"):
        Engine(Transformer(cfg), None, ByteTokenizer(), EngineConfig(max_batch=0))


def test_the_engine_thread_streams_cancels_recovers_and_drains():
    cfg, decode = KINDS["gqa"]
    tok = ByteTokenizer()
    engine = Engine(Transformer(cfg), random_params(cfg), tok, SMALL, decode)
    assert not engine.serving()
    engine.start()
    assert engine.serving()
    greedy = SamplingParams(max_tokens=8, temperature=0, stop_at_eos=False)
    long = engine.submit(prompt_ids(tok, TEXTS[2]), dataclasses.replace(greedy, max_tokens=40))
    events = []
    streamed = engine.submit(prompt_ids(tok, TEXTS[1]), greedy, on_event=events.append).wait(60)
    assert "".join(e.text for e in events) == streamed.text and sum(len(e.tokens) for e in events) == 8
    assert [e.finish_reason for e in events][-1] == "length" and all(e.finish_reason is None for e in events[:-1])
    engine.cancel(long)
    assert long.wait(60).finish_reason == "cancelled" and len(long.tokens) < 40

    calls = engine._run

    def fails_once(*args):
        engine._run = calls
        raise RuntimeError("injected")

    engine._run = fails_once  # a failed step ends the requests in flight; the engine serves the next ones
    assert engine.submit(prompt_ids(tok, "x"), greedy).wait(60).finish_reason == "error"
    after = [engine.submit(prompt_ids(tok, t), greedy) for t in TEXTS]
    engine.stop(drain=True, timeout=120)  # waits for the requests already submitted
    assert all(h.done.is_set() and h.finish_reason == "length" for h in after)
    assert [h.tokens for h in after[1:2]] == [streamed.tokens]
    assert engine.pools[0].held() == 0 and not engine.serving()
    with pytest.raises(QueueFull, match="shutting down"):
        engine.submit([1], greedy)
