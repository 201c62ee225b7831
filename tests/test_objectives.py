"""Post-training objectives (training/objectives.py): sft, dpo, orpo and distill, each against a reference of its
own (TRL's losses on the same log-probabilities, NumPy, the zero-step identity) and their config errors."""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import Transformer
from tests.conftest import tiny_config, tiny_run
from tests.test_training import LogitsAsParams
from training.config import ConfigError, resolve, with_vocab
from training.evaluation import Inputs
from training.objectives import OBJECTIVES, Teacher, distill_loss_BT, dpo_loss, orpo_loss
from training.optim import make_optimizer
from training.step import init_state, make_train_step

try:  # the references of the first tests; the test extra installs them
    import torch
    import trl  # noqa: F401
except ImportError:
    torch = None
needs_trl = pytest.mark.skipif(torch is None, reason="needs trl and torch (pip install -e '.[test]')")


# --- TRL's losses, called on given log-probabilities ------------------------------------------------------------


def trl_dpo(chosen, rejected, ref_chosen, ref_rejected, beta, loss_type="sigmoid", label_smoothing=0.0):
    """(loss, d loss / d [chosen, rejected], metrics) of TRL's DPOTrainer._compute_loss (trl 1.16), the policy's
    sequence log-probabilities coming from a stand-in model (one token per row) and the reference's precomputed."""
    from trl import DPOTrainer

    B = len(chosen)
    logps = torch.tensor(np.concatenate([chosen, rejected]), dtype=torch.float64, requires_grad=True)
    zeros = torch.zeros(2 * B, 1, dtype=torch.float64)

    class Model:
        training = True

        def __call__(self, **kwargs):
            return types.SimpleNamespace(
                log_probs=logps[:, None], entropy=zeros, mean_logits=zeros, is_top1=zeros.bool()
            )

    model = Model()
    trainer = types.SimpleNamespace(
        model=model,
        accelerator=types.SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x, gather=lambda x: x),
        aux_loss_enabled=False,
        precompute_ref_logps=True,
        ld_alpha=None,
        f_divergence_type="reverse_kl",
        beta=beta,
        label_smoothing=label_smoothing,
        loss_types=[loss_type],
        loss_weights=[1.0],
        use_weighting=False,
        _metrics=collections.defaultdict(lambda: collections.defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    ones = torch.ones(2 * B, 2, dtype=torch.long)  # one completion token per row after the shift
    inputs = {
        "input_ids": ones,
        "attention_mask": ones,
        "completion_mask": ones,
        "ref_chosen_logps": torch.tensor(ref_chosen, dtype=torch.float64),
        "ref_rejected_logps": torch.tensor(ref_rejected, dtype=torch.float64),
    }
    loss = DPOTrainer._compute_loss(trainer, model, inputs, False)
    loss.backward()
    return loss.item(), logps.grad.numpy(), {k: v[-1] for k, v in trainer._metrics["train"].items()}


def trl_conservative_dpo(chosen, rejected, ref_chosen, ref_rejected, beta, label_smoothing):
    """TRL 1.16's sigmoid loss has no label smoothing any more; its 'aot_unpaired' loss is conservative DPO's
    -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h) after sorting each side's log-ratios over the batch, which
    for one pair is the identity: so each pair on its own, averaged."""
    B = len(chosen)
    losses, grads = [], np.zeros(2 * B)
    for i in range(B):
        one = lambda x: x[i : i + 1]  # noqa: E731
        loss, grad, _ = trl_dpo(
            *map(one, (chosen, rejected, ref_chosen, ref_rejected)), beta, "aot_unpaired", label_smoothing
        )
        losses.append(loss)
        grads[[i, B + i]] = grad / B
    return float(np.mean(losses)), grads


def random_logps(seed: int, B: int = 6) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=B) * 4 - 30).astype(np.float32) for _ in range(4)]


@needs_trl
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_dpo_loss_its_gradient_and_metrics_match_trl(label_smoothing):
    chosen, rejected, ref_chosen, ref_rejected = random_logps(0)
    beta = 0.3

    def loss(c, r):
        return dpo_loss(c, r, jnp.asarray(ref_chosen), jnp.asarray(ref_rejected), beta, label_smoothing)

    (got, metrics), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(chosen, rejected)
    got_grad = np.concatenate(grads)
    if label_smoothing == 0:
        want, want_grad, trl_metrics = trl_dpo(chosen, rejected, ref_chosen, ref_rejected, beta)
        assert float(metrics["train/dpo_margin"]) == pytest.approx(trl_metrics["rewards/margins"], abs=1e-5)
        assert float(metrics["train/dpo_accuracy"]) == pytest.approx(trl_metrics["rewards/accuracies"])
        assert float(metrics["train/chosen_logp"]) == pytest.approx(trl_metrics["logps/chosen"], rel=1e-6)
        assert float(metrics["train/rejected_logp"]) == pytest.approx(trl_metrics["logps/rejected"], rel=1e-6)
    else:
        want, want_grad = trl_conservative_dpo(chosen, rejected, ref_chosen, ref_rejected, beta, label_smoothing)
    assert float(got) == pytest.approx(want, abs=1e-6)
    np.testing.assert_allclose(got_grad, want_grad, atol=1e-6)


@needs_trl
def test_orpo_loss_and_its_gradient_match_trl():
    """TRL's odds_ratio_loss on the same mean log-probabilities, composed as its get_batch_loss_metrics does:
    nll - mean(lambda * log sigmoid(log odds ratio))."""
    with warnings.catch_warnings():  # trl.experimental says it may change: the pinned version is the reference
        warnings.simplefilter("ignore")
        from trl.experimental.orpo import ORPOTrainer

    rng = np.random.default_rng(1)
    # Mean log-probabilities per token, on both sides of -log 2 where log(1 - p) switches form.
    chosen, rejected = (-rng.uniform(0.05, 3.0, size=8).astype(np.float32) for _ in range(2))
    nll, lam = np.float32(1.7), 0.25

    got, grads = jax.value_and_grad(lambda *a: orpo_loss(*a, lam)[0], argnums=(0, 1, 2))(nll, chosen, rejected)
    t_nll, t_chosen, t_rejected = (
        torch.tensor(np.asarray(x, np.float64), requires_grad=True) for x in (nll, chosen, rejected)
    )
    trainer = types.SimpleNamespace(beta=lam, accelerator=types.SimpleNamespace(device="cpu"))
    losses = ORPOTrainer.odds_ratio_loss(trainer, t_chosen, t_rejected)[0]
    want = t_nll - losses.mean()
    want.backward()
    assert float(got) == pytest.approx(want.item(), abs=1e-6)
    for g, t in zip(grads, (t_nll, t_chosen, t_rejected)):
        np.testing.assert_allclose(g, t.grad.numpy(), atol=1e-6)


# --- the objectives on a batch: which tokens they read ----------------------------------------------------------


def pair_batch(seed: int, B: int = 3, T: int = 7, V: int = 11) -> dict:
    """A preference batch: each row a prompt of 2-3 tokens, then a response, then padding (weights 0)."""
    rng = np.random.default_rng(seed)
    batch = {}
    for side in ("chosen", "rejected"):
        batch[side] = rng.integers(0, V, size=(B, T + 1)).astype(np.int32)
        prompt, end = rng.integers(1, 3, size=B), rng.integers(4, T + 1, size=B)
        t = np.arange(T)
        batch[f"{side}_weights"] = ((t >= prompt[:, None]) & (t < end[:, None])).astype(np.float32)
    return batch


def numpy_logps(logits_BTV: np.ndarray, tokens_BT1: np.ndarray) -> np.ndarray:
    logits = logits_BTV.astype(np.float64)
    log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    return np.take_along_axis(logits, tokens_BT1[:, 1:, None], -1)[..., 0] - log_z


@pytest.mark.parametrize("reference", ["frozen", "none"])
def test_dpo_reads_the_weighted_response_logps_of_each_side(reference):
    """The objective's DPO terms are the sums of w * log p over each side's targets (LogitsAsParams: the logits are
    the params), chosen rows first; the reference's from the frozen params, or 0."""
    B, T, V = 3, 7, 11
    batch = pair_batch(0, B, T, V)
    rng = np.random.default_rng(2)
    policy, ref = (rng.normal(size=(2 * B, T, V)).astype(np.float32) * 2 for _ in range(2))
    t = dataclasses.replace(tiny_run().train, objective="dpo")
    t = dataclasses.replace(t, dpo=dataclasses.replace(t.dpo, beta=0.5, reference=reference))
    out = OBJECTIVES["dpo"].loss(LogitsAsParams(), Inputs(), t, {"params": policy}, ref, batch, {})

    tokens = np.concatenate([batch["chosen"], batch["rejected"]])
    weights = np.concatenate([batch["chosen_weights"], batch["rejected_weights"]])
    sums = lambda logits: (weights * numpy_logps(logits, tokens)).sum(1)  # noqa: E731
    c, r = np.split(sums(policy), 2)
    rc, rr = np.split(sums(ref), 2) if reference == "frozen" else (np.zeros(B), np.zeros(B))
    want = np.mean(-np.log(1 / (1 + np.exp(-0.5 * ((c - rc) - (r - rr))))))
    assert float(out.total) == float(out.loss) == pytest.approx(want, rel=1e-5)
    assert float(out.metrics["train/chosen_logp"]) == pytest.approx(c.mean(), rel=1e-5)
    assert float(out.metrics["train/rejected_logp"]) == pytest.approx(r.mean(), rel=1e-5)
    assert float(out.metrics["train/dpo_margin"]) == pytest.approx(0.5 * ((c - rc) - (r - rr)).mean(), abs=1e-5)


def test_orpo_reads_the_chosen_responses_nll_and_each_sides_mean_logp():
    B, T, V = 3, 7, 11
    batch = pair_batch(1, B, T, V)
    policy = np.random.default_rng(3).normal(size=(2 * B, T, V)).astype(np.float32)
    t = dataclasses.replace(tiny_run().train, objective="orpo")
    out = OBJECTIVES["orpo"].loss(LogitsAsParams(), Inputs(), t, {"params": policy}, {}, batch, {})

    tokens = np.concatenate([batch["chosen"], batch["rejected"]])
    weights = np.concatenate([batch["chosen_weights"], batch["rejected_weights"]])
    logp = numpy_logps(policy, tokens)
    nll = -(weights[:B] * logp[:B]).sum() / weights[:B].sum()
    c, r = np.split((weights * logp).sum(1) / weights.sum(1), 2)
    log_odds = (c - r) - (np.log1p(-np.exp(c)) - np.log1p(-np.exp(r)))
    want = nll - t.orpo.lambda_ * np.mean(-np.log1p(np.exp(-log_odds)))
    assert float(out.metrics["train/orpo_nll"]) == pytest.approx(nll, rel=1e-5)
    assert float(out.loss) == pytest.approx(want, rel=1e-5)


def test_dpo_of_a_policy_that_is_its_reference_is_log_2():
    """At step 0 the policy is the frozen reference: every log-ratio is 0, so the loss is log 2 and the margin 0,
    through the real train step on a tiny model with chosen and rejected in one forward."""
    run = with_vocab(tiny_run(data={"format": "preference"}, train={"objective": "dpo", "batch_size": 2}), 64)
    model, (tx, schedule) = Transformer(run.model), make_optimizer(run.train, run.model)
    state = init_state(model, tx, seed=0, frozen=True)
    batch = {k: jnp.asarray(v) for k, v in pair_batch(4, B=2, T=run.data.seq_len, V=64).items()}
    new, metrics = jax.jit(make_train_step(model, tx, schedule, run.train))(state, batch)
    assert float(metrics["train/loss"]) == pytest.approx(math.log(2), abs=1e-6)
    assert float(metrics["train/dpo_margin"]) == 0.0 and float(metrics["train/dpo_accuracy"]) == 0.0
    assert float(metrics["train/chosen_logp"]) < 0 and float(metrics["train/grad_norm"]) > 0
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), new.frozen, state.frozen))


# --- sft and distill --------------------------------------------------------------------------------------------


def test_sft_is_the_weighted_mean_of_the_weighted_tokens_cross_entropy():
    B, T, V = 2, 9, 13
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(B, T, V)).astype(np.float32) * 2
    tokens = rng.integers(0, V, size=(B, T + 1)).astype(np.int32)
    weights = (rng.uniform(size=(B, T)) < 0.4).astype(np.float32)
    batch = {"tokens": tokens, "loss_weights": weights, "segment_ids": np.zeros((B, T), np.int32)}
    assert OBJECTIVES["sft"].fields == ("tokens", "loss_weights", "segment_ids")
    t = dataclasses.replace(tiny_run().train, objective="sft")
    out = OBJECTIVES["sft"].loss(LogitsAsParams(), Inputs(), t, {"params": logits}, {}, batch, {})
    nll = -numpy_logps(logits, tokens)
    assert float(out.loss) == pytest.approx(nll[weights > 0].mean(), rel=1e-5)


def numpy_log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


@pytest.mark.parametrize("temperature,alpha", [(2.0, 0.7), (0.5, 1.0), (3.0, 0.0)])
def test_distillation_is_hintons_mix_of_the_tempered_kl_and_the_cross_entropy(temperature, alpha):
    """Per token alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE against NumPy, and the objective's
    weighted mean of it with a teacher of a larger (padded) vocabulary."""
    B, T, V = 2, 5, 17
    rng = np.random.default_rng(6)
    student, teacher = rng.normal(size=(B, T, V)) * 2, rng.normal(size=(B, T, V + 3)) * 2
    tokens = rng.integers(0, V, size=(B, T + 1)).astype(np.int32)
    p_log, q_log = numpy_log_softmax(teacher[..., :V] / temperature), numpy_log_softmax(student / temperature)
    kl = (np.exp(p_log) * (p_log - q_log)).sum(-1)
    ce = -np.take_along_axis(numpy_log_softmax(student), tokens[:, 1:, None], -1)[..., 0]
    want_BT = alpha * temperature**2 * kl + (1 - alpha) * ce
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    loss_BT, kl_BT, _ = distill_loss_BT(f32(student), f32(teacher), tokens[:, 1:], temperature, alpha)
    np.testing.assert_allclose(kl_BT, kl, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(loss_BT, want_BT, rtol=1e-4, atol=1e-6)

    weights = (rng.uniform(size=(B, T)) < 0.6).astype(np.float32)
    t = tiny_run().train
    t = dataclasses.replace(t, distill=dataclasses.replace(t.distill, temperature=temperature, alpha=alpha))
    batch = {"tokens": tokens, "loss_weights": weights}
    out = OBJECTIVES["distill"].loss(
        LogitsAsParams(),
        Inputs(),
        t,
        {"params": f32(student)},
        Teacher(LogitsAsParams(), {"params": f32(teacher)}),
        batch,
        {},
    )
    assert float(out.loss) == pytest.approx((weights * want_BT).sum() / weights.sum(), rel=1e-4)


# --- config -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "train,message",
    [
        ({"dpo": {"beta": 0.0}}, "train.dpo.beta=0.0: must be > 0"),
        ({"dpo": {"label_smoothing": 0.5}}, "train.dpo.label_smoothing=0.5: must be in [0, 0.5)"),
        ({"dpo": {"label_smoothing": -0.1}}, "train.dpo.label_smoothing=-0.1: must be in [0, 0.5)"),
        ({"dpo": {"reference": "policy"}}, "train.dpo.reference='policy': allowed: frozen, none"),
        ({"orpo": {"lambda": -1.0}}, "train.orpo.lambda=-1.0: must be >= 0"),
        ({"orpo": {"lambda_": 1.0}}, "train.orpo.lambda_: unknown key (allowed: lambda)"),
        ({"distill": {"temperature": 0.0}}, "train.distill.temperature=0.0: must be > 0"),
        ({"distill": {"alpha": 1.5}}, "train.distill.alpha=1.5: must be in [0, 1]"),
        (
            {"objective": "distill"},
            "train.distill.teacher_workdir='': train.objective='distill' needs exactly one of",
        ),
    ],
)
def test_bad_objective_values_are_one_line_config_errors(train, message):
    config = tiny_config()
    for key, value in train.items():
        if isinstance(value, dict):
            config.train[key].update(value)
        else:
            config.train[key] = value
    with pytest.raises(ConfigError) as e:
        resolve(config)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_the_objective_groups_resolve_and_orpo_reads_the_lambda_key():
    config = tiny_config(data={"format": "preference"}, train={"objective": "orpo"})
    config.train.orpo["lambda"] = 0.5
    config.train.dpo.update(beta=0.2, label_smoothing=0.1, reference="none")
    run = resolve(config)
    assert run.train.orpo.lambda_ == 0.5 and run.train.dpo.reference == "none"
    with pytest.raises(ConfigError, match="needs data.document_mask=True"):
        resolve(tiny_config(train={"objective": "sft"}))
    assert resolve(tiny_config(train={"objective": "sft"}, data={"document_mask": True})).train.objective == "sft"


# --- distillation through the training loop ---------------------------------------------------------------------


def test_distill_trains_from_a_teacher_workdir_of_another_size_and_resumes_without_storing_it(tmp_path, text_corpus):
    """A student of the tiny config distils from a teacher of another width and depth (untrained: any distribution
    will do), read-only from its workdir: the KL is logged, the student's checkpoints name the teacher's step
    directory instead of holding its params, and a resumed run reloads it. A teacher with another tokenizer is
    refused in one line naming both."""
    from data.tokenizer import ByteTokenizer, HFTokenizer, train_bpe
    from tests.conftest import untrained_workdir
    from training import hf
    from training.checkpoint import Checkpointer, checkpoints_dir
    from training.loop import train

    teacher_dir = tmp_path / "teacher"
    untrained_workdir(teacher_dir, ByteTokenizer(), {"d_model": 48, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1})
    distill = {"teacher_workdir": str(teacher_dir), "temperature": 2.0, "alpha": 0.5}
    data = {"corpus": str(text_corpus), "val_fraction": 0.2}
    run = tiny_run(data=data, train={"objective": "distill", "distill": distill, "steps": 2, "eval_every": 2})
    result = train(run, tmp_path / "student", quiet=True)
    assert result["step"] == 2 and result["train/distill_kl"] > 0 and np.isfinite(result["train/loss"])
    checkpointer = Checkpointer(checkpoints_dir(tmp_path / "student"))
    try:
        restored = checkpointer.restore(lambda stored: {}, step=2)
        assert restored.train["frozen_from"] == str(teacher_dir / "checkpoints" / "0")
        assert not (restored.path / "frozen").exists()
    finally:
        checkpointer.close()
    resumed = train(
        dataclasses.replace(run, train=dataclasses.replace(run.train, steps=3)), tmp_path / "student", quiet=True
    )
    assert resumed["step"] == 3 and np.isfinite(resumed["train/distill_kl"])

    hf_dir = tmp_path / "teacher_hf"
    hf.export(teacher_dir, hf_dir)  # the byte tokenizer as tokenizer.json: the same tokenizer
    from_hf = dataclasses.replace(run.train.distill, teacher_workdir="", teacher_hf_dir=str(hf_dir))
    result = train(dataclasses.replace(run, train=dataclasses.replace(run.train, distill=from_hf)), tmp_path / "s1")
    assert result["step"] == 2 and result["train/distill_kl"] > 0

    other = tmp_path / "bpe_teacher"
    untrained_workdir(other, HFTokenizer(train_bpe(["def f(x):\n    return x\n"] * 20, 280), "bpe:280"))
    mismatched = dataclasses.replace(run.train.distill, teacher_workdir=str(other))
    with pytest.raises(ConfigError) as e:
        train(dataclasses.replace(run, train=dataclasses.replace(run.train, distill=mismatched)), tmp_path / "s2")
    assert "the teacher's tokenizer 'bpe:280' is not the student's data.tokenizer='bytes'" in str(e.value)
    assert "\n" not in str(e.value)


def test_a_dry_run_plans_dpo_with_pair_windows_and_refuses_a_teacher_in_one_line():
    """The pair fields are [B, T+1] windows like `tokens`; distillation's teacher is not planned yet."""
    from training.dry_run import dry_run

    data = {"corpus": "/nonexistent/corpus", "format": "preference"}
    plan = dry_run(tiny_run(data=data, train={"objective": "dpo", "batch_size": 2}))
    assert plan["params"] > 0
    teacher = {"objective": "distill", "distill": {"teacher_workdir": "/nonexistent/teacher"}}
    with pytest.raises(ConfigError, match=r"^train.objective='distill': the dry run does not plan a teacher yet"):
        dry_run(tiny_run(train=teacher))


# --- dpo and orpo through the training loop, on data.format='preference' ----------------------------------------


def test_dpo_and_orpo_train_on_a_preference_corpus(tmp_path):
    """Through train.py's loop on TRL-style preference records: DPO's first step, the policy still its frozen
    reference, logs train/loss log 2 and margin 0, and later steps move the margin; stopped at step 2 and resumed,
    a DPO run logs the same bits (its frozen reference comes back from the checkpoint); ORPO trains on the same
    pairs."""
    records = [
        {"prompt": f"def f{i}(x):", "chosen": f" return x + {i}", "rejected": f" return x - {i}{'0' * (i % 3)}"}
        for i in range(40)
    ]
    corpus = tmp_path / "prefs.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in records))
    data = {"corpus": str(corpus), "format": "preference", "seq_len": 32, "val_fraction": 0.1}
    train_cfg = {"steps": 3, "log_every": 1, "eval_every": 3, "lr": 1e-2, "warmup_steps": 0, "schedule": "constant"}
    from training.loop import train

    run = tiny_run(data=data, train={**train_cfg, "objective": "dpo"})
    train(run, tmp_path / "dpo", quiet=True)
    rows = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in logged] == [1, 2, 3]
    assert logged[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-6) and logged[0]["train/dpo_margin"] == 0
    assert logged[-1]["train/dpo_margin"] != 0 and logged[-1]["train/chosen_logp"] < 0
    for steps in (2, 3):  # the same run stopped after step 2 (a checkpoint at every step), then resumed
        run = tiny_run(data=data, train={**train_cfg, "objective": "dpo", "steps": steps}, checkpoint={"every": 1})
        train(run, tmp_path / "dpo_resumed", quiet=True)
    resumed = [json.loads(line) for line in (tmp_path / "dpo_resumed" / "metrics.jsonl").read_text().splitlines()]
    trained = lambda rows: [{k: v for k, v in r.items() if k.startswith("train/")} for r in rows if "train/loss" in r]  # noqa: E731
    assert trained(resumed) == trained(logged)
    run = tiny_run(data=data, train={**train_cfg, "objective": "orpo"})
    result = train(run, tmp_path / "orpo", quiet=True)
    assert np.isfinite(result["train/loss"]) and result["train/orpo_nll"] > 0
