"""What a train step minimises: one function per objective, selected by `train.objective` in `OBJECTIVES`.

An objective names the batch fields it reads (the data pipeline yields exactly those: data/pipeline.py `FIELDS`),
whether it needs a frozen model beside the trained one (a copy of the starting params, or another model: a
teacher), and its loss. The train step (training/step.py) differentiates `Loss.total` with respect to the
trainable params, logs `Loss.loss` as train/loss and the rest of `Loss.metrics` as they are named; nothing outside
this table branches on an objective's name.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp

from model import Transformer
from model.aux import weighted_sum
from training.evaluation import Inputs, cross_entropy

if TYPE_CHECKING:
    from training.config import TrainConfig


class Loss(NamedTuple):
    total: jax.Array  # what the step differentiates
    loss: jax.Array  # logged as train/loss, so runs with and without auxiliary terms compare
    metrics: dict[str, jax.Array]  # further scalars, logged under their names (e.g. train/moe_aux_loss)
    model_state: Any  # the model's non-trained state as the forward pass updated it ({} for a model without any)


# (model, inputs, train config, variables {"params", "state"?}, frozen params ({} unless the objective asks for them;
# a `Teacher` for one with a teacher), batch, rngs) -> Loss. The first three are fixed for a run; the rest are traced.
LossFn = Callable[[Transformer, Inputs, "TrainConfig", dict, Any, dict, dict], Loss]


@dataclasses.dataclass(frozen=True)
class Objective:
    loss: LossFn
    fields: tuple[str, ...] = ("tokens",)  # batch fields the loss reads, beside the eval batches' own
    # True: the state holds a frozen copy of the params the run starts from (train.init_from's, or the fresh
    # init), given to the loss (a reference model, as DPO's is).
    frozen: bool = False
    # True: the loss gets a `Teacher` as its frozen argument, another model (train.distill's) and its variables,
    # loaded read-only by the loop (training/loop.py `load_teacher`).
    teacher: bool = False


class Teacher(NamedTuple):
    """A frozen model of its own config (size, kinds) beside the trained one; it shares the tokenizer."""

    model: Transformer  # static: bound when the step is made
    variables: dict  # {"params", "state"?}: traced, the train state's `frozen`


def weighted_mean(x_BT: jax.Array, weights_BT: jax.Array) -> jax.Array:
    """sum(w * x) / sum(w); 0 (and no gradient) when the weights sum to 0, as a batch with nothing to learn from."""
    weights_BT = weights_BT.astype(jnp.float32)
    total = jnp.sum(weights_BT)
    return jnp.sum(weights_BT * x_BT) / jnp.where(total > 0, total, 1.0)


def with_aux(loss: jax.Array, aux: dict) -> jax.Array:
    """The loss plus each auxiliary term of the forward pass times its weight."""
    return loss + weighted_sum(aux) if any(a.weight for a in aux.values()) else loss


def aux_metrics(aux: dict) -> dict[str, jax.Array]:
    return {f"train/{name}": a.value for name, a in aux.items()}


def lm(model: Transformer, inputs: Inputs, t: TrainConfig, variables: dict, frozen, batch: dict, rngs: dict) -> Loss:
    """Next-token cross-entropy of the main head (with train.z_loss and train.label_smoothing), the mean over
    target tokens, or with `loss_weights` [B, T] in the batch (one per target) their weighted mean
    (`weighted_mean`; under train.grad_accum, each micro-batch's, averaged); plus each auxiliary term of the
    forward pass times its weight (each logged as train/<name>)."""
    del frozen
    (out, updated), targets_BT = inputs(
        batch["tokens"], model, variables, segments_BT=batch.get("segment_ids"), mutable=["state"], rngs=rngs
    )
    loss_BT, _ = cross_entropy(out.logits_BTV, targets_BT, t.z_loss, t.label_smoothing)
    if "loss_weights" in batch:
        loss = weighted_mean(loss_BT, inputs.permute(batch["loss_weights"]))
    else:
        loss = jnp.mean(loss_BT)
    return Loss(with_aux(loss, out.aux), loss, aux_metrics(out.aux), updated.get("state", variables.get("state", {})))


PAIR_FIELDS = ("chosen", "chosen_weights", "rejected", "rejected_weights")


def pair_logps(
    model: Transformer, inputs: Inputs, variables: dict, batch: dict, rngs: dict
) -> tuple[jax.Array, jax.Array, jax.Array, dict]:
    """(per-token log-probabilities of the targets [2B, T], their weights [2B, T] (chosen rows first, then
    rejected), the forward's aux terms, the updated variables) from one forward over both halves of each pair,
    concatenated on the batch axis. Each row is one pair's side with positions from 0 (segment ids 0: no
    documents found inside, whatever data.document_mask says); the main head only."""
    tokens_BT1 = jnp.concatenate([batch["chosen"], batch["rejected"]])
    weights_BT = jnp.concatenate([batch["chosen_weights"], batch["rejected_weights"]])
    segments_BT = jnp.zeros((tokens_BT1.shape[0], tokens_BT1.shape[1] - 1), jnp.int32)
    inputs = inputs.for_eval()
    (out, updated), targets_BT = inputs(tokens_BT1, model, variables, segments_BT, mutable=["state"], rngs=rngs)
    _, nll_BT = cross_entropy(out.logits_BTV, targets_BT)
    return -nll_BT, inputs.permute(weights_BT).astype(jnp.float32), out.aux, updated


def halves(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(chosen rows, rejected rows) of a [2B, ...] array from `pair_logps`."""
    return jnp.split(x, 2)


def dpo_loss(
    chosen_B: jax.Array,
    rejected_B: jax.Array,
    ref_chosen_B: jax.Array,
    ref_rejected_B: jax.Array,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Rafailov et al.'s DPO loss over sequence log-probabilities, the mean over pairs of
    -log sigmoid(beta * h), h = (chosen - ref_chosen) - (rejected - ref_rejected); with label smoothing e, conservative
    DPO (the preference flipped with probability e): -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h), as TRL's
    sigmoid loss was. Metrics: the implicit rewards' margin beta * h and how often it is > 0, the policy's mean
    sequence log-probabilities."""
    chosen_reward_B = beta * (chosen_B - ref_chosen_B)
    rejected_reward_B = beta * (rejected_B - ref_rejected_B)
    logits_B = chosen_reward_B - rejected_reward_B
    losses_B = -(1 - label_smoothing) * jax.nn.log_sigmoid(logits_B) - label_smoothing * jax.nn.log_sigmoid(-logits_B)
    margin_B = jax.lax.stop_gradient(logits_B)
    metrics = {
        "train/dpo_margin": jnp.mean(margin_B),
        "train/dpo_accuracy": jnp.mean((margin_B > 0).astype(jnp.float32)),
        "train/chosen_logp": jnp.mean(jax.lax.stop_gradient(chosen_B)),
        "train/rejected_logp": jnp.mean(jax.lax.stop_gradient(rejected_B)),
    }
    return jnp.mean(losses_B), metrics


def dpo(model: Transformer, inputs: Inputs, t: TrainConfig, variables: dict, frozen, batch: dict, rngs: dict) -> Loss:
    """DPO (`dpo_loss`, train.dpo) on the pairs' summed response log-probabilities, the reference's from the
    frozen copy of the starting params (train.dpo.reference='frozen') or 0 ('none': reference-free)."""
    logp_BT, weights_BT, aux, updated = pair_logps(model, inputs, variables, batch, rngs)
    chosen_B, rejected_B = halves(jnp.sum(weights_BT * logp_BT, axis=1))
    if t.dpo.reference == "frozen":
        reference = {**variables, "params": frozen}
        ref_logp_BT, _, _, _ = pair_logps(model, inputs, reference, batch, rngs)
        ref_chosen_B, ref_rejected_B = halves(jax.lax.stop_gradient(jnp.sum(weights_BT * ref_logp_BT, axis=1)))
    else:
        ref_chosen_B = ref_rejected_B = jnp.zeros_like(chosen_B)
    loss, metrics = dpo_loss(chosen_B, rejected_B, ref_chosen_B, ref_rejected_B, t.dpo.beta, t.dpo.label_smoothing)
    state = updated.get("state", variables.get("state", {}))
    return Loss(with_aux(loss, aux), loss, {**metrics, **aux_metrics(aux)}, state)


def log1mexp(x: jax.Array) -> jax.Array:
    """log(1 - exp(x)) for x < 0: log1p(-exp(x)) below -log 2 and log(-expm1(x)) above, each where it keeps its
    digits (Maechler 2012; TRL's `log1mexp` too)."""
    return jnp.where(x < -math.log(2), jnp.log1p(-jnp.exp(x)), jnp.log(-jnp.expm1(x)))


# The largest mean log-probability the odds read: at 0 (a response predicted with certainty, or a row with no
# response tokens) log(1 - p) is -inf, and its gradient NaN.
MAX_MEAN_LOGP = -1e-6


def orpo_loss(
    nll: jax.Array, chosen_mean_B: jax.Array, rejected_mean_B: jax.Array, lambda_: float
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Hong et al.'s ORPO loss: the chosen responses' NLL minus lambda times the mean over pairs of
    log sigmoid(log odds(chosen) - log odds(rejected)), odds(y) = p / (1 - p) of the length-normalised (mean per
    token) log-probability p, as TRL's `odds_ratio_loss`."""
    chosen_mean_B = jnp.minimum(chosen_mean_B, MAX_MEAN_LOGP)
    rejected_mean_B = jnp.minimum(rejected_mean_B, MAX_MEAN_LOGP)
    log_odds_B = (chosen_mean_B - rejected_mean_B) - (log1mexp(chosen_mean_B) - log1mexp(rejected_mean_B))
    ratio = jnp.mean(jax.nn.log_sigmoid(log_odds_B))
    metrics = {"train/orpo_nll": nll, "train/orpo_log_odds": jnp.mean(jax.lax.stop_gradient(log_odds_B))}
    return nll - lambda_ * ratio, metrics


def orpo(model: Transformer, inputs: Inputs, t: TrainConfig, variables: dict, frozen, batch: dict, rngs: dict) -> Loss:
    """ORPO (`orpo_loss`, train.orpo.lambda): no reference model. The NLL is the mean over the chosen responses'
    tokens (TRL's covers the prompts too); the odds read each response's mean log-probability per token."""
    del frozen
    logp_BT, weights_BT, aux, updated = pair_logps(model, inputs, variables, batch, rngs)
    chosen_w_BT, _ = halves(weights_BT)
    nll = weighted_mean(-halves(logp_BT)[0], chosen_w_BT)
    sums_B, counts_B = jnp.sum(weights_BT * logp_BT, axis=1), jnp.sum(weights_BT, axis=1)
    chosen_mean_B, rejected_mean_B = halves(sums_B / jnp.maximum(counts_B, 1.0))
    loss, metrics = orpo_loss(nll, chosen_mean_B, rejected_mean_B, t.orpo.lambda_)
    chosen_B, rejected_B = halves(jax.lax.stop_gradient(sums_B))
    metrics |= {"train/chosen_logp": jnp.mean(chosen_B), "train/rejected_logp": jnp.mean(rejected_B)}
    state = updated.get("state", variables.get("state", {}))
    return Loss(with_aux(loss, aux), loss, {**metrics, **aux_metrics(aux)}, state)


def distill_loss_BT(
    student_BTV: jax.Array, teacher_BTV: jax.Array, targets_BT: jax.Array, temperature: float, alpha: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(loss, KL, cross-entropy), each float32 [B, T]: Hinton et al.'s
    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, target),
    the T^2 keeping the soft targets' gradients on the scale of the hard ones' as T changes. Logits past the
    smaller vocabulary (rows of a padded embedding that no token of the shared tokenizer uses) are dropped."""
    V = min(student_BTV.shape[-1], teacher_BTV.shape[-1])
    student_BTV, teacher_BTV = student_BTV[..., :V].astype(jnp.float32), teacher_BTV[..., :V].astype(jnp.float32)
    log_p_BTV = jax.nn.log_softmax(teacher_BTV / temperature, axis=-1)
    log_q_BTV = jax.nn.log_softmax(student_BTV / temperature, axis=-1)
    kl_BT = jnp.sum(jnp.exp(log_p_BTV) * (log_p_BTV - log_q_BTV), axis=-1)
    _, nll_BT = cross_entropy(student_BTV, targets_BT)
    return alpha * temperature**2 * kl_BT + (1 - alpha) * nll_BT, kl_BT, nll_BT


def distill(
    model: Transformer, inputs: Inputs, t: TrainConfig, variables: dict, frozen, batch: dict, rngs: dict
) -> Loss:
    """Distillation from `frozen`, a `Teacher` (train.distill): `distill_loss_BT`'s weighted mean over the targets
    (`loss_weights`: a pretraining stream's are all 1), logging the KL (train/distill_kl) and the cross-entropy
    (train/distill_ce) beside it. The student's extra heads (model.mtp) train on their own losses as under lm; the
    teacher's main head alone is read."""
    teacher: Teacher = frozen
    segments_BT = batch.get("segment_ids")
    tokens_BT1 = batch["tokens"]
    (out, updated), targets_BT = inputs(tokens_BT1, model, variables, segments_BT, mutable=["state"], rngs=rngs)
    windows_BT1 = tokens_BT1[:, : targets_BT.shape[1] + 1]  # without the extra heads' further targets
    teacher_out, _ = inputs.for_eval()(windows_BT1, teacher.model, teacher.variables, segments_BT)
    teacher_BTV = jax.lax.stop_gradient(teacher_out.logits_BTV)
    d = t.distill
    loss_BT, kl_BT, nll_BT = distill_loss_BT(out.logits_BTV, teacher_BTV, targets_BT, d.temperature, d.alpha)
    weights_BT = inputs.permute(batch["loss_weights"])
    loss = weighted_mean(loss_BT, weights_BT)
    metrics = {
        "train/distill_kl": weighted_mean(kl_BT, weights_BT),
        "train/distill_ce": weighted_mean(nll_BT, weights_BT),
    }
    state = updated.get("state", variables.get("state", {}))
    return Loss(with_aux(loss, out.aux), loss, {**metrics, **aux_metrics(out.aux)}, state)


OBJECTIVES: dict[str, Objective] = {
    "lm": Objective(lm),
    # Supervised fine-tuning on data.format='chat': the packed conversations' assistant tokens (lm's weighted mean).
    "sft": Objective(lm, fields=("tokens", "loss_weights", "segment_ids")),
    "dpo": Objective(dpo, fields=PAIR_FIELDS, frozen=True),
    "orpo": Objective(orpo, fields=PAIR_FIELDS),
    "distill": Objective(distill, fields=("tokens", "loss_weights"), teacher=True),
}
