"""Sampling rules against NumPy, the K/V cache against recomputation and a plain forward pass, beam
search against brute force, and infer.py end to end on a trained checkpoint."""

from __future__ import annotations

import dataclasses
import fcntl
import itertools
import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data import corpus
from model import ModelConfig, Transformer
from sampling import Rules, generate_batch
from sampling.beam import beam_search
from sampling.rules import filtered, min_p_filter, pick, top_k_filter, top_p_filter
from sampling.runner import Watcher, cut_at_stop, prompt_ids, unescape
from tests.conftest import REPO, tiny_run
from tests.xla_flags import compile_flags
from training.checkpoint import load_for_inference
from training.loop import train

LOGITS = np.log(np.array([[0.05, 0.4, 0.1, 0.25, 0.2], [0.5, 0.1, 0.15, 0.05, 0.2]], np.float32))


def kept(filtered_logits) -> np.ndarray:
    return np.isfinite(np.asarray(filtered_logits))


def test_top_k_keeps_the_k_largest():
    want = np.zeros_like(LOGITS, bool)
    for row, order in enumerate(np.argsort(-LOGITS, axis=-1)):
        want[row, order[:2]] = True
    np.testing.assert_array_equal(kept(top_k_filter(jnp.asarray(LOGITS), 2)), want)
    assert kept(top_k_filter(jnp.asarray(LOGITS), 0)).all()


@pytest.mark.parametrize("p", [0.3, 0.45, 0.6, 0.66, 0.75, 0.9, 0.97, 1.0])  # none on a boundary
def test_top_p_keeps_the_smallest_set_whose_mass_reaches_p(p):
    probs = np.exp(LOGITS.astype(np.float64))
    for row in range(len(probs)):
        # brute force: the smallest subsets of tokens whose mass reaches p, then the most probable of those
        best = None
        for size in range(1, probs.shape[1] + 1):
            subsets = [
                s for s in itertools.combinations(range(probs.shape[1]), size) if probs[row, list(s)].sum() >= p - 1e-7
            ]
            if subsets:
                best = max(subsets, key=lambda s: probs[row, list(s)].sum())
                break
        want = np.zeros(probs.shape[1], bool)
        want[list(best)] = True
        np.testing.assert_array_equal(kept(top_p_filter(jnp.asarray(LOGITS), p))[row], want, err_msg=f"row {row}")


def test_min_p_keeps_tokens_at_least_min_p_times_the_most_likely():
    probs = np.exp(LOGITS)
    want = probs >= 0.45 * probs.max(axis=-1, keepdims=True)
    np.testing.assert_array_equal(kept(min_p_filter(jnp.asarray(LOGITS), 0.45)), want)
    assert kept(min_p_filter(jnp.asarray(LOGITS), 0.0)).all()


def test_temperature_scales_logits_and_zero_is_greedy():
    got = np.asarray(jax.nn.softmax(filtered(jnp.asarray(LOGITS), Rules(temperature=0.5))))
    want = np.exp(LOGITS / 0.5) / np.exp(LOGITS / 0.5).sum(-1, keepdims=True)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    keys = jax.random.split(jax.random.key(0), 2)
    np.testing.assert_array_equal(pick(jnp.asarray(LOGITS), keys, Rules(temperature=0)), LOGITS.argmax(-1))


def test_draws_follow_the_filtered_distribution():
    rules = Rules(temperature=1.0, top_k=3)
    n = 4000
    keys = jax.random.split(jax.random.key(1), n)
    logits = jnp.broadcast_to(jnp.asarray(LOGITS[0]), (n, 5))
    counts = np.bincount(np.asarray(pick(logits, keys, rules)), minlength=5) / n
    probs = np.exp(LOGITS[0]) * (np.argsort(np.argsort(-LOGITS[0])) < 3)
    np.testing.assert_allclose(counts, probs / probs.sum(), atol=0.03)


def random_model(position: str = "rope", scan: bool = True, vocab: int = 50, seq: int = 48):
    cfg = ModelConfig(vocab_size=vocab, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=64,
                      max_seq_len=seq, init_std=0.5, position=position, scan_layers=scan)  # fmt: skip
    return init_params(Transformer(cfg))


def init_params(model):
    return model, jax.jit(model.init)(jax.random.key(1), jnp.zeros((1, 8), jnp.int32))["params"]


def plain_greedy(model, params, prompt: list[int], steps: int, length: int) -> list[int]:
    """Greedy decoding by the training forward pass on an unpadded buffer, no cache, no -1 positions."""
    forward = jax.jit(lambda buf: model.apply({"params": params}, buf))
    buf = np.zeros((1, length), np.int32)
    buf[0, : len(prompt)] = prompt
    for i in range(len(prompt), len(prompt) + steps):
        buf[0, i] = int(np.argmax(forward(buf)[0, i - 1]))
    return buf[0, len(prompt) : len(prompt) + steps].tolist()


@pytest.mark.parametrize("position,scan", [("rope", True), ("alibi", False), ("learned", True)])
def test_batched_cached_decoding_matches_each_prompt_alone(position, scan):
    """Left padding (positions -1) and the cache change nothing: each row is what its prompt gives alone."""
    model, params = random_model(position, scan)
    prompts, steps, greedy = [[1, 2, 3, 4, 5, 6, 7], [9, 8], [4]], 12, Rules(temperature=0)
    batch = generate_batch(model, params, prompts, steps, greedy, max_len=40)
    for prompt, tokens in zip(prompts, batch.tokens):
        assert tokens == plain_greedy(model, params, prompt, steps, 40)
    if position == "rope":
        recomputed = generate_batch(model, params, prompts, steps, greedy, max_len=40, kv_cache=False)
        assert batch.tokens == recomputed.tokens


def test_rows_stop_at_end_of_document_and_keep_their_own_random_stream():
    model, params = random_model()
    rules = Rules(temperature=1.0)
    together = generate_batch(model, params, [[1, 2], [3]], 10, rules, max_len=32, seed=3)
    second = generate_batch(model, params, [[3]], 10, rules, max_len=32, seed=3, first_row=1)
    assert together.tokens[1] == second.tokens[0]
    eos = together.tokens[0][4]
    stopped = generate_batch(model, params, [[1, 2], [3]], 10, rules, max_len=32, seed=3, eos_id=eos)
    assert stopped.tokens[0] == together.tokens[0][: together.tokens[0].index(eos)]


def brute_force_best(model, params, prompt, steps, vocab, eos_id=-1):
    """The highest total log-probability continuation over all sequences (ending early at eos_id)."""
    seqs = np.array(list(itertools.product(range(vocab), repeat=steps)), np.int32)
    full = np.concatenate([np.tile(prompt, (len(seqs), 1)), seqs], axis=1)
    logits = jax.jit(model.apply)({"params": params}, jnp.asarray(full))
    logp = np.asarray(jax.nn.log_softmax(logits, -1), np.float64)
    step_logp = np.take_along_axis(logp[:, len(prompt) - 1 : -1], seqs[..., None], -1)[..., 0]
    best = {}
    for seq, lp in zip(seqs.tolist(), step_logp):
        end = seq.index(eos_id) + 1 if eos_id in seq else steps
        key = tuple(seq[:end])
        best[key] = lp[:end].sum()
    top = max(best, key=best.get)
    return [t for t in top if t != eos_id], best[top]


def test_beam_search_finds_the_brute_force_best_sequence():
    vocab, steps = 5, 3
    model, params = init_params(Transformer(dataclasses.replace(random_model(vocab=vocab)[0].cfg, init_std=1.0)))
    for eos_id in (-1, 2):  # without and with an end token that finishes beams early
        want, want_score = brute_force_best(model, params, [1, 3], steps, vocab, eos_id)
        # vocab^(steps - 1) beams keep every prefix, so beam search is exact here
        beams = beam_search(model, params, [1, 3], steps, vocab ** (steps - 1), max_len=16, eos_id=eos_id)
        assert beams.tokens[0] == want, eos_id
        assert beams.scores[0] == pytest.approx(want_score, abs=1e-4)
        assert beams.scores == sorted(beams.scores, reverse=True)
        greedy = generate_batch(model, params, [[1, 3]], steps, Rules(temperature=0), max_len=16, eos_id=eos_id)
        assert beam_search(model, params, [1, 3], steps, 1, max_len=16, eos_id=eos_id).tokens[0] == greedy.tokens[0]


def test_stop_strings_typed_in_a_shell_read_backslash_n_and_t_as_newline_and_tab():
    # What bash passes for --stop "\n\n", --stop 'a\tb', --stop '\\n' and --stop 'C:\x'.
    assert unescape("\\n\\n") == "\n\n" and unescape("a\\tb") == "a\tb"
    assert unescape("\\\\n") == "\\n" and unescape("C:\\x") == "C:\\x" and unescape("\n") == "\n"


def test_stop_strings_cut_and_stop_rows():
    assert cut_at_stop("abc\ndef", ("\n",)) == "abc"
    assert cut_at_stop("abcdef", ("ef", "cd")) == "ab"

    class Chars:
        eod_id = 0

        def decode(self, ids):
            return "".join(chr(i) for i in ids)

    watcher = Watcher(Chars(), rows=2, stops=("yz",), eos_id=0, echo=None)
    assert not watcher(np.array([ord("x"), ord("y")]), 0).any()
    assert watcher(np.array([ord("y"), ord("z")]), 1).tolist() == [False, True]  # row 1 now reads "yz"


# ---------------------------------------------------------------- a trained checkpoint and infer.py


def session_dir(tmp_path_factory) -> pathlib.Path:
    """The temp directory pytest made for this session, shared by its pytest-xdist workers (each worker's own is a
    folder popen-gwN in it); unlike its parent, no later session sees it."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A tiny run trained on two documents; the second is the whole validation split. Checkpoints at steps 30
    and 60. Trained once per test session: pytest-xdist workers share it through a lock in the session's temp dir."""
    root = session_dir(tmp_path_factory) / "trained_checkpoint"
    root.mkdir(exist_ok=True)
    with (root / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "done").exists():
            _train_checkpoint(root)
            (root / "done").touch()
    return root / "run", root / "corpus"


def _train_checkpoint(root):
    docs = root / "corpus"
    docs.mkdir()
    (docs / "a.py").write_text("".join(f"def f{j}(x):\n    return x * {j}\n\n" for j in range(300)))
    (docs / "b.py").write_text("".join(f"def g{j}(y):\n    return y + {j}\n\n" for j in range(12)))
    run = tiny_run(
        data={"corpus": str(docs), "val_fraction": 0.001},
        train={"steps": 60, "lr": 3e-3, "eval_every": 60, "log_every": 20, "eval_batches": 16},
        checkpoint={"every": 30},
    )
    train(run, root / "run", quiet=True)


def test_the_trained_checkpoint_belongs_to_this_session(trained, tmp_path_factory):
    """A checkpoint an earlier session trained (with older code) is never reused: it lives in this session's temp
    directory, which pytest makes afresh (under xdist, the one holding the workers' popen-gwN folders)."""
    workdir, _ = trained
    base = tmp_path_factory.getbasetemp()
    if worker := os.environ.get("PYTEST_XDIST_WORKER"):
        assert base.name == f"popen-{worker}"
        base = base.parent
    assert workdir.is_relative_to(base), (workdir, base)


def test_cache_and_recompute_agree_on_a_trained_checkpoint(trained):
    workdir, _ = trained
    run, params, tokenizer, step = load_for_inference(workdir)
    assert step == 60
    model = Transformer(run.model)
    prompts = [prompt_ids(tokenizer, p) for p in ("def f1", "def g2(y):\n    return", "\n")]
    greedy = Rules(temperature=0)
    # 8 new tokens fit after the longest prompt, so every row runs all 8 steps
    cached = generate_batch(model, params, prompts, 8, greedy, max_len=run.model.max_seq_len)
    recomputed = generate_batch(model, params, prompts, 8, greedy, max_len=run.model.max_seq_len, kv_cache=False)
    assert cached.tokens == recomputed.tokens
    assert all(len(t) == 8 for t in cached.tokens)
    for prompt, tokens in zip(prompts, cached.tokens):
        assert tokens == plain_greedy(model, params, prompt, 8, run.model.max_seq_len)


def run_infer(*args):
    env = {**os.environ, "XLA_FLAGS": compile_flags(os.environ["XLA_FLAGS"])}
    return subprocess.run([sys.executable, "infer.py", *args], cwd=REPO, capture_output=True, text=True, env=env)


def test_infer_streams_a_sample_and_reports_speeds(trained):
    workdir, _ = trained
    out = run_infer("--workdir", str(workdir), "--prompt", "def f", "--max_new_tokens", "20", "--temperature", "0")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("def f") and len(out.stdout) > len("def f\n")
    assert "prefill:" in out.stderr and "decode:" in out.stderr and "tokens/s" in out.stderr


def test_infer_score_equals_the_training_eval_of_the_same_text(trained):
    workdir, docs = trained
    _, val = corpus.split_documents(str(docs), "text", 0.001)
    assert [d.text for d in val] == [(docs / "b.py").read_text()]
    out = run_infer("--workdir", str(workdir), "--score", str(docs / "b.py"))
    assert out.returncode == 0, out.stderr
    scored = json.loads(out.stdout)
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    evaluated = [r for r in rows if "eval/loss" in r][-1]
    for key in ("eval/loss", "eval/ppl", "eval/bpb"):
        assert scored[key] == pytest.approx(evaluated[key], rel=1e-5), key
    assert scored["eval/ppl"] == pytest.approx(math.exp(scored["eval/loss"]))


@pytest.mark.parametrize(
    "args,match",
    [
        (["--temperature", "-1", "--prompt", "x"], "--temperature=-1.0"),
        (["--top_p", "0", "--prompt", "x"], "--top_p=0.0"),
        (["--top_p", "1.5", "--prompt", "x"], "--top_p=1.5"),
        (["--top_k", "-2", "--prompt", "x"], "--top_k=-2"),
        (["--beam_size", "0", "--prompt", "x"], "--beam_size=0"),
        (["--prompt", "a longer prompt", "--max_len", "4"], "does not fit in --max_len=4"),
        (["--prompt", "x", "--step", "7"], "no checkpoint for step 7"),
        (["--prompt", "x", "--workdir", "/nonexistent/run"], "/nonexistent/run"),
        (["--prompt", "x", "--workdir", str(REPO / "configs")], "no checkpoints"),
        (["--prompt", "x", "--num_samples", "3", "--beam_size", "2"], "--num_samples=3"),
        (
            ["--prompt", "x", "--mla_decode", "naive"],
            "--mla_decode='naive': model.attention=gqa decodes as: its one way",
        ),
    ],
)
def test_infer_bad_input_is_one_line_and_exit_code_2(trained, args, match):
    workdir, _ = trained
    out = run_infer("--workdir", str(workdir), *args)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and match in lines[-1], out.stderr


def as_read(text: str) -> str:
    """`text` as run_infer reads it back: text mode turns "\\r" and "\\r\\n" (which random bytes can hold) into "\\n"."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def loaded(workdir, step=None):
    run, params, tokenizer, _ = load_for_inference(workdir, step)
    return Transformer(run.model), params, tokenizer, run.model.max_seq_len


def test_infer_prompt_file_num_samples_batch_size_and_a_stop_typed_in_bash(trained, tmp_path):
    """Three prompts (a blank line skipped) x 2 samples decoded 4 rows at a time, stopped at --stop "\\n\\n" as
    bash passes it (a backslash and an n, twice): each sample is its row of one batch of all six, cut before the
    first blank line."""
    workdir, _ = trained
    prompts = ["def f1", "def g", "    return"]
    (tmp_path / "prompts.txt").write_text(f"{prompts[0]}\n\n{prompts[1]}\n{prompts[2]}\n")
    flags = [
        "--num_samples",
        "2",
        "--batch_size",
        "4",
        "--max_new_tokens",
        "16",
        "--temperature",
        "0.8",
        "--top_k",
        "3",
    ]
    out = run_infer("--workdir", str(workdir), "--prompt_file", str(tmp_path / "prompts.txt"), *flags, "--seed", "5", "--stop", r"\n\n")  # fmt: skip
    assert out.returncode == 0, out.stderr
    model, params, tokenizer, max_len = loaded(workdir)
    rows = [prompt_ids(tokenizer, prompt) for prompt in prompts for _ in range(2)]
    rules = Rules(temperature=0.8, top_k=3)
    samples = generate_batch(model, params, rows, 16, rules, max_len=max_len, eos_id=tokenizer.eod_id, seed=5).tokens
    texts = [tokenizer.decode(tokens) for tokens in samples]
    want = [f"=== prompt {r // 2 + 1}/3, sample {r % 2 + 1}/2 ===\n{prompts[r // 2]}{text.split(chr(10) * 2)[0]}\n" for r, text in enumerate(texts)]  # fmt: skip
    assert out.stdout == as_read("".join(want))
    assert any("\n\n" in text for text in texts)  # the stop string did cut a sample


def test_infer_step_noeos_and_recomputing_without_the_cache(trained):
    """--step 30 samples from the earlier checkpoint; --noeos keeps going past end-of-document tokens (about 1 in
    200 draws here, so 32 samples draw some); and --kv_cache=false gives what the cached decoder gives."""
    workdir, _ = trained
    model, params, tokenizer, max_len = loaded(workdir, 30)
    rows = [prompt_ids(tokenizer, "def ")] * 32
    cached = generate_batch(model, params, rows, 24, Rules(temperature=1.0), max_len=max_len).tokens
    assert any(tokenizer.eod_id in tokens for tokens in cached), "no sample drew an end-of-document token"
    flags = ["--num_samples", "32", "--max_new_tokens", "24", "--temperature", "1.0", "--noeos", "--kv_cache=false"]
    out = run_infer("--workdir", str(workdir), "--step", "30", "--prompt", "def ", *flags)
    assert out.returncode == 0, out.stderr
    assert f"loaded step 30 from {workdir}" in out.stderr
    want = [f"=== prompt 1/1, sample {j + 1}/32 ===\ndef {tokenizer.decode(t)}\n" for j, t in enumerate(cached)]
    assert all(len(t) == 24 for t in cached) and out.stdout == as_read("".join(want))


def test_infer_beam_search_prints_the_best_beams(trained):
    workdir, _ = trained
    model, params, tokenizer, max_len = loaded(workdir)
    ids = prompt_ids(tokenizer, "def g")
    beams = beam_search(model, params, ids, 8, 3, max_len=max_len, eos_id=tokenizer.eod_id)
    out = run_infer("--workdir", str(workdir), "--prompt", "def g", "--beam_size", "3", "--num_samples", "2", "--max_new_tokens", "8")  # fmt: skip
    assert out.returncode == 0, out.stderr
    want = [
        f"=== prompt 1/1, beam {j + 1} (log-prob {beams.scores[j]:.3f}) ===\ndef g{tokenizer.decode(beams.tokens[j])}\n"
        for j in range(2)
    ]
    assert out.stdout == as_read("".join(want)) and beams.scores[0] >= beams.scores[1]


NUMPY_STEPS = {  # each on a row of float64 logits with -inf for removed tokens
    "temperature": lambda z, r: z / r.temperature,
    "top_k": lambda z, r: np.where(z >= np.sort(z)[-r.top_k], z, -np.inf),
    "top_p": lambda z, r: np.where(nucleus(z, r.top_p), z, -np.inf),
    "min_p": lambda z, r: np.where(np.exp(z - z.max()) >= r.min_p, z, -np.inf),
}


def nucleus(z: np.ndarray, p: float) -> np.ndarray:
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    keep = np.zeros(len(z), bool)
    keep[order[np.cumsum(probs[order]) - probs[order] < p]] = True
    return keep


def numpy_kept(logits: np.ndarray, rules: Rules, order) -> np.ndarray:
    z = logits.astype(np.float64)
    for step in order:
        z = NUMPY_STEPS[step](z, rules)
    return np.isfinite(z)


def test_rules_apply_temperature_then_top_k_then_top_p_then_min_p():
    """Two cases that together tell every order of the four steps apart, but for top-k before temperature (the
    same thing: temperature keeps the ranking): the order README states is the one applied."""
    logits = np.log(np.array([0.3, 0.25, 0.2, 0.12, 0.08, 0.05]))
    cases = [
        Rules(temperature=0.5, top_k=2, top_p=0.5, min_p=0.3),
        Rules(temperature=2.0, top_k=4, top_p=0.3, min_p=0.7),
    ]
    stated = ("temperature", "top_k", "top_p", "min_p")
    for rules in cases:
        got = kept(filtered(jnp.asarray(logits[None], jnp.float32), rules))[0]
        np.testing.assert_array_equal(got, numpy_kept(logits, rules, stated), err_msg=str(rules))
    for order in itertools.permutations(stated):
        same = all(np.array_equal(numpy_kept(logits, r, order), numpy_kept(logits, r, stated)) for r in cases)
        assert same == (order in (stated, ("top_k", "temperature", "top_p", "min_p"))), order


def test_decoding_feeds_the_model_each_tokens_absolute_position(monkeypatch):
    """RoPE (and ALiBi) cannot see a shift of every position, so the positions the decoder hands the model are
    checked directly: padding -1 and 0..len-1 at prefill, then len, len + 1, ... per step; and each step's cached
    logits are those of a full forward pass over the unpadded sequence at its true positions."""
    import sampling.decode as decode

    seen = []

    class Spy(Transformer):
        def __call__(self, tokens_BT, positions_BT=None):
            logits_BTV = super().__call__(tokens_BT, positions_BT)
            if positions_BT is None:  # the init that only sizes the cache
                return logits_BTV
            jax.debug.callback(lambda *a: seen.append([np.asarray(x) for x in a]), positions_BT, logits_BTV)  # fmt: skip
            return logits_BTV

    monkeypatch.setattr(decode, "Transformer", Spy)
    model, params = random_model("rope")
    prompts, steps = [[5, 6, 7, 8], [9, 3]], 5
    out = generate_batch(model, params, prompts, steps, Rules(temperature=0), max_len=16)
    (prefill_pos, _), *decoded = seen
    np.testing.assert_array_equal(prefill_pos, [[0, 1, 2, 3], [-1, -1, 0, 1]])
    assert len(decoded) == steps  # the last step's forward pass runs too; its token is never drawn
    full = np.zeros((2, 9), np.int32)  # each row unpadded, from position 0 (zeros after it: causal, unread)
    for b, prompt in enumerate(prompts):
        full[b, : len(prompt) + steps] = prompt + out.tokens[b]
    full_logits = jax.jit(model.apply)({"params": params}, full)
    for s, (positions, logits) in enumerate(decoded):
        np.testing.assert_array_equal(positions[:, 0], [len(p) + s for p in prompts])
        for b, prompt in enumerate(prompts):
            np.testing.assert_allclose(logits[b, 0], full_logits[b, len(prompt) + s], rtol=1e-4, atol=1e-4)
