"""Objectives for tests of the seam (training/objectives.py). Importing this module registers them:

- train.objective='toy_second_half': lm whose loss weights zero the first half of every window's targets;
- train.objective='toy_anchored': lm plus ANCHOR times the squared distance of the params from the frozen ones the
  run started from (L2-SP; logged as train/anchor), so a run whose frozen tree was lost or mangled on resume trains
  differently.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from training.objectives import OBJECTIVES, Loss, Objective, lm

ANCHOR = 0.5


def second_half_weights(batch: dict) -> jax.Array:
    """[B, T] weights, 0 for the first T // 2 targets of each window and 1 for the rest."""
    B, T = batch["tokens"].shape[0], batch["tokens"].shape[1] - 1
    return jnp.broadcast_to((jnp.arange(T) >= T // 2).astype(jnp.float32), (B, T))


def second_half(model, inputs, t, variables, frozen, batch, rngs) -> Loss:
    return lm(model, inputs, t, variables, frozen, {**batch, "loss_weights": second_half_weights(batch)}, rngs)


def anchored(model, inputs, t, variables, frozen, batch, rngs) -> Loss:
    out = lm(model, inputs, t, variables, frozen, batch, rngs)
    distances = jax.tree.map(lambda p, p0: jnp.sum(jnp.square(p - p0)), variables["params"], frozen)
    anchor = sum(jax.tree.leaves(distances))
    return Loss(out.total + ANCHOR * anchor, out.loss, {**out.metrics, "train/anchor": anchor}, out.model_state)


OBJECTIVES["toy_second_half"] = Objective(second_half)
OBJECTIVES["toy_anchored"] = Objective(anchored, frozen=True)
