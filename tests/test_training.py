"""Loss, objectives, schedules, optimizer masking, trainable subsets, gradient accumulation, metrics, determinism and
learning."""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import data as data_lib
import tests.toy_objectives  # noqa: F401  (registers train.objective='toy_second_half')
from model import Transformer
from model.transformer import Output
from tests.conftest import tiny_run
from training.config import with_vocab
from training.evaluation import Inputs, cross_entropy, evaluate, make_eval_step
from training.loop import train
from training.objectives import OBJECTIVES
from training.optim import SCHEDULES, decay_mask, make_optimizer, trainable_mask
from training.step import init_state, make_train_step


def test_cross_entropy_matches_numpy_with_z_loss_and_label_smoothing():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 11)).astype(np.float32) * 3
    targets = rng.integers(0, 11, size=(2, 3))
    log_z = np.log(np.exp(logits.astype(np.float64)).sum(-1))
    logp = logits - log_z[..., None]
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    smooth = 0.1
    want = (1 - smooth) * nll + smooth * (-logp.mean(-1)) + 1e-3 * log_z**2
    loss, got_nll = cross_entropy(jnp.asarray(logits), jnp.asarray(targets), z_loss=1e-3, label_smoothing=smooth)
    np.testing.assert_allclose(got_nll, nll, rtol=1e-5)
    np.testing.assert_allclose(loss, want, rtol=1e-5)


class LogitsAsParams:
    """A stand-in model whose logits are its params: the gradient of an objective's loss with respect to them."""

    def apply(self, variables, *args, mutable=(), **kwargs):
        out = Output(variables["params"], None, {})
        return (out, {}) if mutable else out


def test_an_objective_weighs_its_targets_and_its_loss_and_logit_gradient_match_numpy():
    """tests/toy_objectives.py's toy_second_half (lm with the first half of every window's targets weighted 0),
    through the train step: its loss is the NumPy weighted mean of the NumPy cross-entropy of the model's logits,
    and its gradient with respect to the logits is w * (softmax - onehot) / sum(w)."""
    run = with_vocab(tiny_run(train={"objective": "toy_second_half", "batch_size": 2}), 64)
    t, T = run.train, run.data.seq_len
    model, (tx, schedule) = Transformer(run.model), make_optimizer(run.train)
    state = init_state(model, tx, seed=0)
    tokens = jax.random.randint(jax.random.key(1), (2, T + 1), 0, 64)
    out, _ = jax.jit(lambda p: Inputs()(tokens, model, {"params": p}))(state.params)  # jitted: eager is slow
    logits = np.asarray(out.logits_BTV, np.float64)
    targets = np.asarray(tokens[:, 1:])
    log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nll = log_z - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    w = np.broadcast_to(np.arange(T) >= T // 2, (2, T)).astype(np.float64)
    _, metrics = jax.jit(make_train_step(model, tx, schedule, t))(state, {"tokens": tokens})
    assert float(metrics["train/loss"]) == pytest.approx((w * nll).sum() / w.sum(), rel=1e-5)

    def loss(logits_BTV):
        batch = {"tokens": tokens}
        return OBJECTIVES["toy_second_half"].loss(LogitsAsParams(), Inputs(), t, {"params": logits_BTV}, {}, batch, {})

    grad = jax.grad(lambda x: loss(x).total)(out.logits_BTV)
    softmax = np.exp(logits - log_z[..., None])
    onehot = np.eye(64)[targets]
    np.testing.assert_allclose(grad, w[..., None] * (softmax - onehot) / w.sum(), atol=1e-7)


def test_only_the_trainable_params_change_and_only_they_get_optimizer_state():
    """train.trainable selects the MLPs and the final norm: after a step only those params moved, the optimizer
    state holds AdamW's two moments for them and nothing for the rest, and muP's scaling and weight decay's mask
    give the selected leaves the updates they get without a mask."""
    patterns = ("layers/mlp/", "^final_norm")
    run = with_vocab(tiny_run(train={"trainable": patterns, "batch_size": 2}), 64)
    model, (tx, schedule) = Transformer(run.model), make_optimizer(run.train)
    state = init_state(model, tx, seed=0)
    tokens = jax.random.randint(jax.random.key(1), (2, run.data.seq_len + 1), 0, 64)
    new, metrics = jax.jit(make_train_step(model, tx, schedule, run.train))(state, {"tokens": tokens})
    mask = trainable_mask(patterns, state.params)
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), state.params, new.params)
    assert changed == mask and 0 < sum(jax.tree.leaves(mask)) < len(jax.tree.leaves(mask))
    selected = sum(p.size for p, m in zip(jax.tree.leaves(state.params), jax.tree.leaves(mask)) if m)
    assert sum(x.size for x in jax.tree.leaves(new.opt_state)) == 2 * selected + 2  # + Adam's and the lr's counters
    assert np.isfinite(metrics["train/grad_norm"])

    mup = dataclasses.replace(run.model, parametrization="mup", mup_base_width=16)
    no_clip = dataclasses.replace(run.train, grad_clip=0.0)
    grads = jax.tree.map(jnp.ones_like, state.params)
    updates = []
    for t in (no_clip, dataclasses.replace(no_clip, trainable=())):
        mup_tx, _ = make_optimizer(t, mup)
        updates.append(mup_tx.update(grads, mup_tx.init(state.params), state.params)[0])
    for masked, full, m in zip(*map(jax.tree.leaves, (*updates, mask))):
        np.testing.assert_array_equal(masked, full if m else np.zeros_like(full))


def test_schedules_follow_their_formulas():
    t = tiny_run(train={"lr": 1.0, "steps": 100, "warmup_steps": 10, "min_lr_ratio": 0.1, "decay_fraction": 0.2}).train
    cos, wsd, const = (SCHEDULES[n](t) for n in ("cosine", "wsd", "constant"))
    assert float(cos(0)) == pytest.approx(0.1) and float(cos(9)) == pytest.approx(1.0)
    assert float(cos(55)) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert float(cos(100)) == pytest.approx(0.1)
    assert float(wsd(50)) == pytest.approx(1.0) and float(wsd(80)) == pytest.approx(1.0)
    assert float(wsd(90)) == pytest.approx(1 - 0.9 * 0.5) and float(wsd(100)) == pytest.approx(0.1)
    assert float(const(5)) == pytest.approx(0.6) and float(const(99)) == pytest.approx(1.0)


def test_weight_decay_skips_norm_scales_and_biases():
    params = {"layers": {"attn_norm": {"scale": jnp.ones((2, 4))}, "mlp": {"up": {"kernel": jnp.ones((2, 4, 8))}}},
              "ln": {"scale": jnp.ones(4), "bias": jnp.zeros(4)}, "embed": {"embedding": jnp.ones((5, 4))}}  # fmt: skip
    mask = decay_mask(params)
    assert mask["layers"]["mlp"]["up"]["kernel"] and mask["embed"]["embedding"]
    assert not mask["layers"]["attn_norm"]["scale"] and not mask["ln"]["scale"] and not mask["ln"]["bias"]


def test_gradient_accumulation_equals_one_big_batch():
    run = with_vocab(tiny_run(train={"batch_size": 8, "grad_clip": 0.0}), 64)
    tokens = jax.random.randint(jax.random.key(0), (8, run.data.seq_len + 1), 0, 64)
    results = []
    for accum in (1, 4):
        t = run.train.__class__(**{**run.train.__dict__, "grad_accum": accum})
        model, (tx, schedule) = Transformer(run.model), make_optimizer(t)
        state = init_state(model, tx, seed=0)
        state, metrics = jax.jit(make_train_step(model, tx, schedule, t))(state, {"tokens": tokens})
        results.append((state.params, metrics["train/loss"], metrics["train/grad_norm"]))
    np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-6)
    np.testing.assert_allclose(results[0][2], results[1][2], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(results[0][0]), jax.tree.leaves(results[1][0])):
        np.testing.assert_allclose(a, b, atol=1e-4)  # Adam steps are ~lr = 1e-3 per element


def read_metrics(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_metrics_have_the_documented_names_and_the_same_config_and_seed_give_bit_identical_losses(tmp_path, text_corpus):  # fmt: skip
    """Two runs of one config and seed (the first also checked for the documented metric names), and a third
    with another seed."""
    run = tiny_run(data={"corpus": str(text_corpus), "val_fraction": 0.2})
    result = train(run, tmp_path / "a", quiet=True)
    rows = read_metrics(tmp_path / "a")
    train_names = {"train/loss", "train/grad_norm", "train/lr", "perf/tokens_per_sec", "perf/mfu", "perf/step_time"}
    assert [r["step"] for r in rows if "train/loss" in r] == [2, 4, 6]
    assert [r["step"] for r in rows if "eval/loss" in r] == [3, 6]
    assert all(train_names <= r.keys() for r in rows if "train/loss" in r)
    ev = next(r for r in rows if "eval/loss" in r)
    assert ev["eval/ppl"] == pytest.approx(math.exp(ev["eval/loss"]))
    # Byte tokenizer: bits per byte = nats per token / ln 2 * (tokens / bytes), with EOD tokens costing 0 bytes.
    assert ev["eval/bpb"] >= ev["eval/loss"] / math.log(2)
    assert 0 < result["perf/mfu"] < 1.5 and result["step"] == 6
    assert list((tmp_path / "a" / "tensorboard").iterdir())
    saved = json.loads((tmp_path / "a" / "config.json").read_text())
    assert saved["model"]["vocab_size"] == 257 and saved["data"]["corpus"] == str(text_corpus)

    def metric(workdir, name):
        return [r[name] for r in read_metrics(workdir) if name in r]

    train(run, tmp_path / "b", quiet=True)
    for name in ("train/loss", "eval/loss"):
        assert metric(tmp_path / "b", name) == metric(tmp_path / "a", name), name
    assert len(metric(tmp_path / "a", "train/loss")) == 3
    other = tiny_run(data={"corpus": str(text_corpus), "val_fraction": 0.2}, train={"seed": 1})
    train(other, tmp_path / "c", quiet=True)
    assert metric(tmp_path / "c", "train/loss") != metric(tmp_path / "a", "train/loss")


def test_a_tiny_run_on_the_stdlib_lowers_eval_bpb(tmp_path):
    run = tiny_run(
        model={"d_model": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "d_ff": 192},
        data={"corpus": "stdlib", "seq_len": 64},
        train={
            "steps": 150,
            "batch_size": 16,
            "lr": 3e-3,
            "warmup_steps": 15,
            "log_every": 50,
            "eval_every": 150,
            "eval_batches": 4,
        },
    )
    data = data_lib.load(run.data, tmp_path)
    vocab_run = with_vocab(run, data.tokenizer.vocab_size)
    model, (tx, _) = Transformer(vocab_run.model), make_optimizer(run.train)
    batches = data.validation_batches(run.train.batch_size, run.train.eval_batches)
    start = evaluate(
        jax.jit(make_eval_step(model, data.tokenizer.token_bytes)), init_state(model, tx, 0).params, batches
    )
    result = train(run, tmp_path, quiet=True)
    assert start["eval/bpb"] > 7.5  # ~log2(257) for an untrained byte model
    assert result["eval/bpb"] < 0.5 * start["eval/bpb"], (start, result)


def test_eval_bpb_is_bits_per_utf8_byte_of_the_scored_text_on_a_bpe_run(tmp_path, text_corpus):
    """Pinned against a byte count of the validation text, on a BPE run where bits per byte and bits per token
    differ by the bytes-per-token ratio: bpb = (mean nll x scored tokens) / ln 2 / bytes of the scored tokens."""
    from data.corpus import split_documents
    from data.pipeline import covering_starts

    run = tiny_run(
        data={"corpus": str(text_corpus), "val_fraction": 0.2, "tokenizer": "bpe:300"},
        train={"steps": 2, "eval_every": 2, "eval_batches": 64},
    )
    result = train(run, tmp_path, quiet=True)
    tokenizer = data_lib.load(run.data, tmp_path).tokenizer
    _, val = split_documents(str(text_corpus), "text", 0.2)
    stream = [t for doc in val for t in tokenizer.encode(doc.text) + [tokenizer.eod_id]]
    assert len(covering_starts(len(stream), 32)) <= 4 * 64  # every target of the split is scored once
    # Every token but the first is a target; end-of-document tokens stand for no bytes.
    text_bytes = sum(len(doc.text.encode("utf-8")) for doc in val)
    target_bytes = text_bytes - len(tokenizer.decode(stream[:1]).encode("utf-8"))
    want = result["eval/loss"] * (len(stream) - 1) / math.log(2) / target_bytes
    assert result["eval/bpb"] == pytest.approx(want, rel=1e-5)
    assert text_bytes / len(stream) > 1.5  # per token would be off by this factor

    # Window by window (what benchmarks/quant_bpb.py's paired comparison resamples): one entry per scored window,
    # the bytes adding up to the text's, the nats to the loss the run logged.
    from training.checkpoint import load_for_inference
    from training.evaluation import window_scores

    loaded, params, _, _ = load_for_inference(tmp_path)
    step = jax.jit(make_eval_step(Transformer(loaded.model), tokenizer.token_bytes, per_window=True))
    batches = data_lib.load(run.data, tmp_path).validation_batches(run.train.batch_size, 64)
    nll_W, bytes_W = window_scores(step, params, batches)
    assert nll_W.shape == bytes_W.shape == (sum(len(b["tokens"]) for b in batches),)
    assert bytes_W.sum() == target_bytes
    assert nll_W.sum() == pytest.approx(result["eval/loss"] * (len(stream) - 1), rel=1e-5)
