"""The train step: one optimizer step as a pure function of (state, batch), and the state it starts from.

The training loop (training/loop.py) jits it for a mesh; tests, benchmarks and experiments call it directly (on a
machine without the data pipeline's packages too: benchmarks/accelerator.py trains on synthetic batches with it).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from model import Transformer, init_variables
from model.aux import weighted_sum
from training.config import TrainConfig
from training.evaluation import Inputs, cross_entropy, variables_of
from training.state import TrainState


def make_train_step(
    model: Transformer, tx: optax.GradientTransformation, schedule, t: TrainConfig, inputs: Inputs | None = None
):
    """One optimizer step. The loss is the main head's cross-entropy (logged as train/loss, so runs with and
    without auxiliary terms compare) plus each auxiliary term times its weight (each logged as train/<name>).
    Non-trained model state (e.g. a router's bias) comes back from the forward pass updated by its rule; with
    gradient accumulation every micro-batch starts from the step's state and their updates are averaged."""
    inputs = inputs or Inputs()

    def loss_fn(params, model_state, tokens_BT1, noise_rng):
        variables = variables_of(params, model_state)
        out, targets_BT = inputs(tokens_BT1, model, variables, mutable=["state"], rngs={"noise": noise_rng})
        out, updated = out
        loss_BT, _ = cross_entropy(out.logits_BTV, targets_BT, t.z_loss, t.label_smoothing)
        loss = jnp.mean(loss_BT)
        total = loss + weighted_sum(out.aux) if any(a.weight for a in out.aux.values()) else loss
        aux = {f"train/{name}": a.value for name, a in out.aux.items()}
        return total, (loss, aux, updated.get("state", model_state))

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        tokens_BT1 = batch["tokens"]
        noise_rng = jax.random.fold_in(state.rng, state.step)  # training-only randomness (e.g. router jitter)
        if t.grad_accum == 1:
            (_, (loss, aux, model_state)), grads = grad_fn(state.params, state.model_state, tokens_BT1, noise_rng)
        else:
            # Micro-batch a takes rows a, a + A, a + 2A, ...: every batch shard holds 1/A of each one.
            micro_ABT1 = tokens_BT1.reshape(-1, t.grad_accum, tokens_BT1.shape[-1]).swapaxes(0, 1)
            micro_rngs = jax.random.split(noise_rng, t.grad_accum)

            def accumulate(carry, micro):
                (_, (loss, aux, model_state)), grads = grad_fn(state.params, state.model_state, *micro)
                return jax.tree.map(jnp.add, carry, (loss, aux, model_state, grads)), None

            shapes = jax.eval_shape(lambda: grad_fn(state.params, state.model_state, micro_ABT1[0], micro_rngs[0]))
            (_, (loss, aux, model_state)), grads = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
            zeros = (loss, aux, model_state, grads)
            (loss, aux, model_state, grads), _ = jax.lax.scan(accumulate, zeros, (micro_ABT1, micro_rngs))
            loss, aux, model_state, grads = jax.tree.map(lambda x: x / t.grad_accum, (loss, aux, model_state, grads))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"train/loss": loss, "train/grad_norm": optax.global_norm(grads), "train/lr": schedule(state.step)}
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, model_state=model_state)
        return new, {**metrics, **aux}

    return train_step


def init_state(
    model: Transformer, tx: optax.GradientTransformation, seed: int, params: Any = None, shardings: Any = None
) -> TrainState:
    """Step 0: the model's initial params (or the given ones, e.g. another run's), its initial non-trained state,
    fresh optimizer state and RNG, created directly in place when `shardings` (a TrainState of shardings) says
    where: the whole model is never built on one device."""
    init_rng, state_rng = jax.random.split(jax.random.key(seed))

    @functools.partial(jax.jit, out_shardings=shardings)
    def init(params):
        variables = nn.unbox(init_variables(model, init_rng))
        params = variables["params"] if params is None else params
        model_state = variables.get("state", {})
        return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), state_rng, model_state)

    return init(params)
