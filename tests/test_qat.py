"""Quantization-aware training (training/qat.py): the straight-through gradient, what a QAT run's checkpoint
quantizes to, train.qat.start_step, learned clipping (train.qat.clip_lr: its rounding and LSQ gradients against
NumPy, the factors a run learns, saves, resumes and quantizes with), and the config errors."""

from __future__ import annotations

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import data as data_lib
from model import Transformer
from model.quant import schemes
from model.quant.params import dequantize_params, fake_quantize_params, quantize_params
from model.quant.schemes import QuantError, Spec
from tests.conftest import tiny_config, tiny_run
from tests.test_quant import np_f16, np_roundf, reference
from training.checkpoint import load_clips, load_for_inference
from training.config import ConfigError, QATConfig, resolve, with_vocab
from training.evaluation import Inputs, evaluate, make_eval_step
from training.loop import train
from training.objectives import OBJECTIVES
from training.optim import make_optimizer
from training.qat import CLIP_RANGE, check, forward_weights
from training.quantize import Request, quantize_run
from training.step import init_state, make_train_step

INT4 = {"scheme": "int4", "group_size": 32}
RNG = np.random.default_rng(3)


def clipped_inputs(K=64, N=6, G=32):
    """Two stacked matrices [2, K, N] with columns of different spreads, and clipping factors [2, K/G, N] in
    [0.55, 1.35] (some clip, some widen the range)."""
    w = RNG.standard_normal((2, K, N)).astype(np.float32) * np.linspace(0.02, 1.5, N, dtype=np.float32)
    w[1, :, 1] = np.abs(w[1, :, 1])  # a one-signed column: the zero point's range still holds 0
    clip = RNG.uniform(0.55, 1.35, (2, K // G, N)).astype(np.float32)
    return w, clip


@pytest.mark.parametrize("scheme", schemes.SCHEMES)
def test_learned_clipping_rounds_to_the_numpy_formula_and_to_what_quantizing_stores(scheme):
    """fake_quantize_clipped's values are, bit for bit, the dequantized arrays quantize_clipped stores (what the
    checkpoint deploys as), and each scheme's NumPy formula with the group's range scaled by its factor; with every
    factor 1 they are round to nearest's."""
    w, clip = clipped_inputs()
    got = np.asarray(schemes.fake_quantize_clipped(jnp.asarray(w), scheme, 32, jnp.asarray(clip)))
    stored = schemes.quantize_clipped(jnp.asarray(w), scheme, 32, jnp.asarray(clip))
    np.testing.assert_array_equal(got, np.asarray(schemes.dequantize(stored, scheme)))
    for i in range(2):
        want = reference(w[i], scheme, 32, clip[i])
        if scheme == "nf4":  # its stored scales go through float8 (test_quant): the levels before that step
            q, scale, _ = schemes.codes_and_scales(jnp.asarray(w[i]), scheme, 32, jnp.asarray(clip[i]))
            np.testing.assert_allclose(schemes.values_of(q, scheme, scale), want, rtol=1e-6, atol=1e-7)
        else:
            np.testing.assert_array_equal(got[i], want)
    assert not np.array_equal(got, np.asarray(schemes.dequantize(schemes.quantize(jnp.asarray(w), scheme, 32), scheme)))
    ones = jnp.ones_like(jnp.asarray(clip))
    np.testing.assert_array_equal(
        np.asarray(schemes.fake_quantize_clipped(jnp.asarray(w), scheme, 32, ones)),
        np.asarray(schemes.fake_quantize(jnp.asarray(w), scheme, 32)),
    )


@pytest.mark.parametrize("scheme", ["int8", "int4", "int4-zp"])
def test_learned_clipping_gradients_are_lsqs(scheme):
    """The gradients of sum(c * fake_quantize_clipped(w, a)) against LSQ's formulas in NumPy: d/dw = c where w/s
    lies inside the clipped code range, 0 where it is clipped; d/da = sum over the group of c * (q - w/s) inside
    and c * (q - z) outside, times d s / d a (the group's unclipped scale: the f16 rounding passes straight)."""
    K, N, G = 64, 6, 32
    w, clip = (x[0] for x in clipped_inputs(K, N, G))
    c = RNG.standard_normal((K, N)).astype(np.float32)

    def total(w, a):
        return jnp.sum(jnp.asarray(c) * schemes.fake_quantize_clipped(w, scheme, G, a))

    grad_w, grad_a = jax.grad(total, argnums=(0, 1))(jnp.asarray(w), jnp.asarray(clip))
    want_w, want_a = np.zeros_like(w), np.zeros_like(clip)
    clipped_somewhere = False
    for g in range(K // G):
        for n in range(N):
            x, a, cg = w[g * G : (g + 1) * G, n], clip[g, n], c[g * G : (g + 1) * G, n]
            z = np.float32(0)
            if scheme == "int8":
                base, lo_code, hi_code = np.abs(x).max() / np.float32(127), -127, 127
            elif scheme == "int4":
                base, lo_code, hi_code = x[np.argmax(np.abs(x))] / np.float32(-8), -8, 7
            else:
                lo, hi = min(x.min(), 0), max(x.max(), 0)
                base, lo_code, hi_code = (hi - lo) / np.float32(15), 0, 15
                z = np.clip(np_roundf(-lo * a / np_f16(base * a)), 0, 15)
            s = np_f16(base * a)
            u = x / s + z
            inside = (u >= lo_code) & (u <= hi_code)
            q = np.clip(np.floor(u + 0.5) if scheme == "int4" else np_roundf(u), lo_code, hi_code)
            want_w[g * G : (g + 1) * G, n] = cg * inside
            want_a[g, n] = np.sum(cg * np.where(inside, q - u, q - z)) * base
            clipped_somewhere |= not inside.all()
    assert clipped_somewhere  # the factors below 1 clip: both branches are exercised
    np.testing.assert_allclose(np.asarray(grad_w), want_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(grad_a), want_a, rtol=1e-4, atol=1e-5)


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

    # The train step, on the data's cross-entropy and distilling from a float teacher (QAT fitted to the float model,
    # BENCHMARKS.md): under QAT, a plain step's loss and gradient norm at the rounded weights.
    plain = dataclasses.replace(run.train, qat=QATConfig())
    tx, schedule = make_optimizer(run.train)
    teacher = {"params": init_state(model, tx, seed=1).params}  # another model: the student's target differs
    batch["loss_weights"] = np.ones((2, run.data.seq_len), np.float32)
    for objective in ("lm", "distill"):
        metrics = []
        for t, p in ((run.train, params), (plain, rounded)):
            t = dataclasses.replace(t, objective=objective)
            state = init_state(model, tx, 0, p)
            state = state.replace(frozen=teacher) if objective == "distill" else state
            step = make_train_step(model, tx, schedule, t, teacher=model if objective == "distill" else None)
            metrics.append(jax.jit(step)(state, batch)[1])
        for name in ("train/loss", "train/grad_norm"):
            np.testing.assert_allclose(metrics[0][name], metrics[1][name], rtol=1e-5, err_msg=f"{objective} {name}")
    assert "train/distill_kl" in metrics[0]


def run_of(corpus, qat: dict | None = None):
    """The 6-step config the `runs` share (logging every step, a checkpoint every 3), with `qat` as train.qat."""
    groups = {"data": {"corpus": str(corpus), "val_fraction": 0.2}, "checkpoint": {"every": 3}}
    return tiny_run(**groups, train={"log_every": 1, "eval_every": 3} | ({"qat": qat} if qat else {}))


LEARNED = INT4 | {"start_step": 2, "clip_lr": 0.05}  # learned clipping from the third step on


@pytest.fixture(scope="module")
def runs(tmp_path_factory, text_corpus_module):
    """Workdirs of three 6-step runs of one config: float, int4 g32 QAT from step 4 on, and int4 g32 QAT with
    learned clipping factors from step 2 on."""
    root = tmp_path_factory.mktemp("qat")
    train(run_of(text_corpus_module), root / "float", quiet=True)
    train(run_of(text_corpus_module, INT4 | {"start_step": 4}), root / "qat", quiet=True)
    train(run_of(text_corpus_module, LEARNED), root / "clipped", quiet=True)
    return root / "float", root / "qat", root / "clipped"


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
    plain, qat = (metric(w, "train/loss") for w in runs[:2])
    assert list(plain) == list(qat) == [1, 2, 3, 4, 5, 6]
    assert [plain[s] == qat[s] for s in plain] == [True] * 4 + [False] * 2
    plain, qat = (metric(w, "eval/loss") for w in runs[:2])
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


def test_learned_clips_train_resume_and_quantize_to_what_the_run_evaluated_with(runs, text_corpus_module, tmp_path):
    """A run with train.qat.clip_lr: float until its start step, then the factors move from 1; its checkpoint keeps
    them (`qat` item), quantizing it as model.quant and infer.py --quant do uses them and gives the run's last
    eval/loss (round to nearest's scales would not), and a run resumed from step 3 ends bit for bit where the
    uninterrupted one did, factors and their Adam state included."""
    float_dir, absmax_dir, clip_dir = runs
    plain, clipped = metric(float_dir, "train/loss"), metric(clip_dir, "train/loss")
    assert [plain[s] == clipped[s] for s in plain] == [True] * 2 + [False] * 4
    assert load_clips(float_dir) is None and load_clips(absmax_dir) is None
    run, params, tokenizer, step = load_for_inference(clip_dir)
    clips = load_clips(clip_dir)
    factors = np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(clips)])
    assert step == 6 and factors.dtype == np.float32 and np.abs(factors - 1).max() > 0.05
    assert factors.min() >= CLIP_RANGE[0] and factors.max() <= CLIP_RANGE[1]

    qat_run, quantized = quantize_run(run, params, tokenizer, Request("int4", 32, skip=run.train.qat.skip), clips)
    assert qat_run.quant.method == "qat"
    t = run.train
    val_batches = data_lib.load(run.data, clip_dir).validation_batches(t.batch_size, t.eval_batches)
    eval_step = jax.jit(make_eval_step(Transformer(run.model), tokenizer.token_bytes))
    logged = metric(clip_dir, "eval/loss")[6]
    assert evaluate(eval_step, quantized, val_batches)["eval/loss"] == pytest.approx(logged, rel=1e-5)
    rtn = quantize_params(run.model, params, Spec("int4", 32, run.train.qat.skip))
    assert evaluate(eval_step, rtn, val_batches)["eval/loss"] != pytest.approx(logged, rel=1e-5)
    with pytest.raises(QuantError, match="learned clipping factors"):
        quantize_run(run, params, tokenizer, Request("int4", 32, skip=run.train.qat.skip))

    resumed = tmp_path / "resumed"
    shutil.copytree(clip_dir, resumed)
    shutil.rmtree(resumed / "checkpoints" / "6")
    train(run_of(text_corpus_module, LEARNED), resumed, quiet=True)
    assert metric(resumed, "train/loss") == clipped
    for a, b in zip(
        jax.tree.leaves((params, clips)), jax.tree.leaves((load_for_inference(resumed)[1], load_clips(resumed)))
    ):
        np.testing.assert_array_equal(a, b)

    switched_on = tmp_path / "switched_on"  # learned clipping from step 3 of a float run: factors from 1 there
    shutil.copytree(float_dir, switched_on)
    shutil.rmtree(switched_on / "checkpoints" / "6")
    train(run_of(text_corpus_module, LEARNED), switched_on, quiet=True)
    assert metric(switched_on, "train/loss")[3] == plain[3] and metric(switched_on, "train/loss")[4] != clipped[4]
    factors = np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(load_clips(switched_on))])
    assert np.abs(factors - 1).max() > 0.05


def test_bad_qat_settings_are_one_line_config_errors_before_anything_is_written(tmp_path):
    with pytest.raises(ConfigError, match=r"^train\.qat\.clip_lr=-0\.1: must be >= 0"):
        resolve(tiny_config(train={"qat": INT4 | {"clip_lr": -0.1}}))
    with pytest.raises(ConfigError, match=r"^train\.qat\.clip_lr=0\.01: needs train\.qat\.scheme$"):
        resolve(tiny_config(train={"qat": {"clip_lr": 0.01}}))
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
