"""Quantization-aware training (training/qat.py): the straight-through gradient, what a QAT run's checkpoint
quantizes to, train.qat.start_step, and the config errors."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest

import data as data_lib
from model import Transformer
from model.quant.params import dequantize_params, fake_quantize_params, quantize_params
from model.quant.schemes import Spec
from tests.conftest import tiny_config, tiny_run
from training.checkpoint import load_for_inference
from training.config import ConfigError, QATConfig, resolve, with_vocab
from training.evaluation import Inputs, evaluate, make_eval_step
from training.loop import train
from training.objectives import OBJECTIVES
from training.optim import make_optimizer
from training.qat import check, forward_weights
from training.step import init_state, make_train_step

INT4 = {"scheme": "int4", "group_size": 32}


def test_the_gradient_passes_straight_through_to_the_loss_gradient_at_the_rounded_weights():
    """d loss / d w through the fake quantization is the plain gradient of the loss at the rounded weights, which
    come from quantize + dequantize here (not from fake_quantize's code); the train step's loss and gradient norm
    under QAT are a plain step's at those weights."""
    run = with_vocab(tiny_run(train={"batch_size": 2, "qat": INT4}), 64)
    model = Transformer(run.model)
    spec = Spec("int4", 32, run.train.qat.skip)
    params = init_state(model, make_optimizer(run.train)[0], seed=0).params
    rounded = dequantize_params(run.model, quantize_params(run.model, params, spec))
    batch = {"tokens": jax.random.randint(jax.random.key(1), (2, run.data.seq_len + 1), 0, 64)}

    def loss(p):
        return OBJECTIVES["lm"].loss(model, Inputs(), run.train, {"params": p}, {}, batch, {}).total

    weights = forward_weights(run.model, run.train.qat)
    qat_loss, qat_grads = jax.jit(jax.value_and_grad(lambda p: loss(weights(p, 0))))(params)
    want_loss, want_grads = jax.jit(jax.value_and_grad(loss))(rounded)
    np.testing.assert_allclose(qat_loss, want_loss, rtol=1e-6)
    for got, want in zip(jax.tree.leaves(qat_grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    float_grads = jax.jit(jax.grad(loss))(params)  # the rounding moves the gradient: the comparison can tell them apart
    assert not np.allclose(
        float_grads["layers"]["mlp"]["down"]["kernel"], want_grads["layers"]["mlp"]["down"]["kernel"]
    )

    plain = dataclasses.replace(run.train, qat=QATConfig())
    tx, schedule = make_optimizer(run.train)
    metrics = [
        jax.jit(make_train_step(model, tx, schedule, t))(init_state(model, tx, 0, p), batch)[1]
        for t, p in ((run.train, params), (plain, rounded))
    ]
    for name in ("train/loss", "train/grad_norm"):
        np.testing.assert_allclose(metrics[0][name], metrics[1][name], rtol=1e-5, err_msg=name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, text_corpus_module):
    """Workdirs of two 6-step runs of one config: float, and int4 g32 QAT from step 4 on (logging every step)."""
    root = tmp_path_factory.mktemp("qat")
    groups = {"data": {"corpus": str(text_corpus_module), "val_fraction": 0.2}}
    train_cfg = {"log_every": 1, "eval_every": 3}
    plain = tiny_run(**groups, train=train_cfg)
    qat = tiny_run(**groups, train=train_cfg | {"qat": INT4 | {"start_step": 4}})
    train(plain, root / "float", quiet=True)
    train(qat, root / "qat", quiet=True)
    return root / "float", root / "qat"


@pytest.fixture(scope="module")
def text_corpus_module(tmp_path_factory):
    from tests.conftest import write_corpus

    return write_corpus(tmp_path_factory.mktemp("corpus"))


def metric(workdir, name):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[name] for r in rows if name in r}


def test_losses_before_start_step_are_a_float_runs_bit_for_bit_and_differ_after(runs):
    """The train step taken with 4 steps behind it is the first under QAT (logged as step 5); the eval after 3
    steps is still float, the one after 6 reads the rounded weights."""
    plain, qat = (metric(w, "train/loss") for w in runs)
    assert list(plain) == list(qat) == [1, 2, 3, 4, 5, 6]
    assert [plain[s] == qat[s] for s in plain] == [True] * 4 + [False] * 2
    plain, qat = (metric(w, "eval/loss") for w in runs)
    assert plain[3] == qat[3] and plain[6] != qat[6]


def test_a_qat_checkpoint_quantizes_to_the_weights_it_trained_and_evaluated_with(runs):
    """quantize_params of the final checkpoint (int4 g32, as trained): the same codes as quantizing the
    fake-quantized params, the logits of the QAT forward, and the run's last eval/loss."""
    run, params, tokenizer, step = load_for_inference(runs[1])
    assert step == 6
    spec = Spec("int4", 32, run.train.qat.skip)
    quantized = quantize_params(run.model, params, spec)
    rounded = fake_quantize_params(run.model, params, spec)
    assert jax.tree.structure(quantized) == jax.tree.structure(again := quantize_params(run.model, rounded, spec))
    for a, b in zip(jax.tree.leaves(quantized), jax.tree.leaves(again)):
        np.testing.assert_array_equal(a, b)

    model = Transformer(run.model)
    tokens = jax.random.randint(jax.random.key(0), (2, run.data.seq_len), 0, run.model.vocab_size)
    np.testing.assert_allclose(
        model.apply({"params": quantized}, tokens), model.apply({"params": rounded}, tokens), atol=1e-5
    )

    t = run.train
    val_batches = data_lib.load(run.data, runs[1]).validation_batches(t.batch_size, t.eval_batches)
    eval_step = jax.jit(make_eval_step(model, tokenizer.token_bytes))
    logged = metric(runs[1], "eval/loss")[6]
    assert evaluate(eval_step, quantized, val_batches)["eval/loss"] == pytest.approx(logged, rel=1e-5)
    assert evaluate(eval_step, params, val_batches)["eval/loss"] != pytest.approx(logged, rel=1e-5)


def test_bad_qat_settings_are_one_line_config_errors_before_anything_is_written(tmp_path):
    with pytest.raises(ConfigError, match=r"^train\.qat\.scheme='int3': .*int8, int4, int8-zp, int4-zp, nf4$"):
        resolve(tiny_config(train={"qat": {"scheme": "int3"}}))
    with pytest.raises(ConfigError, match=r"^train\.qat\.group_size=48: .*32, 64, 128"):
        resolve(tiny_config(train={"qat": {"scheme": "int4", "group_size": 48}}))
    # tiny's projections from d_model=32 channels cannot take groups of 64 (its MLP's down projection could).
    run = tiny_run(train={"qat": {"scheme": "int8", "group_size": 64}})
    with pytest.raises(ConfigError) as error:
        check(run)
    message = str(error.value)
    assert "\n" not in message and message.startswith("train.qat.group_size=64: embed/embedding: quant group 64")
    assert message.endswith("(allowed for this model: -1, 0, 32)")
    with pytest.raises(ConfigError, match="train.qat.group_size=64"):
        train(run, tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()
    check(tiny_run(train={"qat": {"scheme": "int8", "group_size": 64, "skip": ("embed", "attn", "gate", "up")}}))
