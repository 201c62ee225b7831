"""What a train step minimises: one function per objective, selected by `train.objective` in `OBJECTIVES`.

An objective names the batch fields it reads (the data pipeline yields exactly those: data/pipeline.py `FIELDS`),
whether it needs a frozen model beside the trained one, and its loss. The train step (training/step.py)
differentiates `Loss.total` with respect to the trainable params, logs `Loss.loss` as train/loss and the rest of
`Loss.metrics` as they are named; nothing outside this table branches on an objective's name.
"""

from __future__ import annotations

import dataclasses
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


# (model, inputs, train config, variables {"params", "state"?}, frozen params ({} unless the objective asks for them),
# batch, rngs) -> Loss. The first three are fixed for a run; the rest are traced.
LossFn = Callable[[Transformer, Inputs, "TrainConfig", dict, Any, dict, dict], Loss]


@dataclasses.dataclass(frozen=True)
class Objective:
    loss: LossFn
    fields: tuple[str, ...] = ("tokens",)  # batch fields the loss reads, beside the eval batches' own
    # True: the state holds a frozen copy of the params the run starts from (train.init_from's, or the fresh
    # init), given to the loss (a reference model, as DPO's is).
    frozen: bool = False


def weighted_mean(x_BT: jax.Array, weights_BT: jax.Array) -> jax.Array:
    """sum(w * x) / sum(w); 0 (and no gradient) when the weights sum to 0, as a batch with nothing to learn from."""
    weights_BT = weights_BT.astype(jnp.float32)
    total = jnp.sum(weights_BT)
    return jnp.sum(weights_BT * x_BT) / jnp.where(total > 0, total, 1.0)


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
    total = loss + weighted_sum(out.aux) if any(a.weight for a in out.aux.values()) else loss
    metrics = {f"train/{name}": a.value for name, a in out.aux.items()}
    return Loss(total, loss, metrics, updated.get("state", variables.get("state", {})))


OBJECTIVES: dict[str, Objective] = {
    "lm": Objective(lm),
    # Supervised fine-tuning on data.format='chat': the packed conversations' assistant tokens (lm's weighted mean).
    "sft": Objective(lm, fields=("tokens", "loss_weights", "segment_ids")),
}
