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

from model import Transformer, init_variables, lora
from model.quant.params import scheme_of
from training.config import TrainConfig
from training.evaluation import Inputs, variables_of
from training.objectives import OBJECTIVES, Teacher
from training.optim import trainable_mask
from training.qat import CLIP_RANGE, clip_optimizer, forward_weights, init_qat, learns_clips
from training.state import TrainState


def make_train_step(
    model: Transformer,
    tx: optax.GradientTransformation,
    schedule,
    t: TrainConfig,
    inputs: Inputs | None = None,
    teacher: Transformer | None = None,
):
    """One optimizer step on `train.objective`'s loss (training/objectives.py), logged as train/loss, with its
    other metrics beside it. Only the params `train.trainable` selects get gradients (the others are constants
    of the loss, so none is computed for them) and change. Non-trained model state (e.g. a router's bias) comes back
    from the forward pass updated by its rule; with gradient accumulation every micro-batch starts from the step's
    state and their updates are averaged. Under `train.qat` the loss reads the weights fake-quantized from
    `train.qat.start_step` on (training/qat.py), the gradient reaching the float params straight through (and, under
    `train.qat.clip_lr`, the state's clipping factors, which their own Adam steps).
    An objective with a teacher (`Objective.teacher`) gets `teacher` and the state's frozen variables as a
    `Teacher`."""
    inputs = inputs or Inputs()
    objective = OBJECTIVES[t.objective]
    weights = forward_weights(model.cfg, t.qat)
    clip_tx = clip_optimizer(t) if learns_clips(t.qat) else None

    def loss_fn(trained, model_state, frozen, step, batch, noise_rng):
        params, clips = trained
        if t.trainable:
            train_mask = trainable_mask(t.trainable, params)
            params = jax.tree.map(lambda p, train: p if train else jax.lax.stop_gradient(p), params, train_mask)
        variables = variables_of(weights(params, step, clips), model_state)
        if objective.teacher:
            frozen = Teacher(teacher, frozen)
        out = objective.loss(model, inputs, t, variables, frozen, batch, {"noise": noise_rng})
        return out.total, (out.loss, out.metrics, out.model_state)

    differentiated = jax.value_and_grad(loss_fn, has_aux=True, allow_int=True)

    def grad_fn(trained, *args):
        """The frozen integer leaves (QLoRA's NF4 codes) get zero gradients of their own dtype (jax's float0
        cannot be added, averaged or handed to the optimizer)."""
        out, grads = differentiated(trained, *args)
        zero_ints = lambda g, p: jnp.zeros_like(p) if g.dtype == jax.dtypes.float0 else g  # noqa: E731
        return out, jax.tree.map(zero_ints, grads, trained)

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        noise_rng = jax.random.fold_in(state.rng, state.step)  # training-only randomness (e.g. router jitter)
        fixed = ((state.params, state.qat.get("clips", {})), state.model_state, state.frozen, state.step)
        if t.grad_accum == 1:
            (_, (loss, aux, model_state)), grads = grad_fn(*fixed, batch, noise_rng)
        else:
            # Micro-batch a takes rows a, a + A, a + 2A, ...: every batch shard holds 1/A of each one.
            micro_batches = jax.tree.map(lambda x: x.reshape(-1, t.grad_accum, *x.shape[1:]).swapaxes(0, 1), batch)
            micro_rngs = jax.random.split(noise_rng, t.grad_accum)

            def accumulate(carry, micro):
                (_, (loss, aux, model_state)), grads = grad_fn(*fixed, *micro)
                return jax.tree.map(jnp.add, carry, (loss, aux, model_state, grads)), None

            first = jax.tree.map(lambda x: x[0], micro_batches)
            shapes = jax.eval_shape(lambda: grad_fn(*fixed, first, micro_rngs[0]))
            (_, (loss, aux, model_state)), grads = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
            zeros = (loss, aux, model_state, grads)
            (loss, aux, model_state, grads), _ = jax.lax.scan(accumulate, zeros, (micro_batches, micro_rngs))
            loss, aux, model_state, grads = jax.tree.map(lambda x: x / t.grad_accum, (loss, aux, model_state, grads))
        grads, clip_grads = grads
        qat = state.qat
        if clip_tx is not None:
            clip_updates, clip_opt_state = clip_tx.update(clip_grads, qat["opt_state"], qat["clips"])
            clips = jax.tree.map(lambda c: jnp.clip(c, *CLIP_RANGE), optax.apply_updates(qat["clips"], clip_updates))
            qat = {"clips": clips, "opt_state": clip_opt_state}
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        trained = grads
        if t.trainable:  # the frozen leaves' bits as they were (p + 0 would turn -0.0 into 0.0)
            train_mask = trainable_mask(t.trainable, params)
            params = jax.tree.map(lambda new, old, train: new if train else old, params, state.params, train_mask)
            trained = [g for g, train in zip(jax.tree.leaves(grads), jax.tree.leaves(train_mask)) if train]
        # The frozen leaves' gradients are zeros (QLoRA's float8 scales too, which take no part in a float32 sum).
        metrics = {"train/loss": loss, "train/grad_norm": optax.global_norm(trained), "train/lr": schedule(state.step)}
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, model_state=model_state, qat=qat)
        return new, {**metrics, **aux}

    return train_step


def init_state(
    model: Transformer,
    tx: optax.GradientTransformation,
    seed: int,
    params: Any = None,
    shardings: Any = None,
    frozen: bool = False,
    train: TrainConfig | None = None,
) -> TrainState:
    """Step 0: the model's initial params (or the given ones, e.g. another run's), its initial non-trained state,
    fresh optimizer state and RNG, created directly in place when `shardings` (a TrainState of shardings) says
    where: the whole model is never built on one device. With `frozen`, also a frozen copy of those params.
    Under `model.lora`, given params without adapters get fresh ones (B = 0), and the base is quantized as
    `model.lora.base_quant` says (QLoRA). With `train` (the run's config), train.qat's clipping factors where it
    learns them (at 1, with fresh Adam state)."""
    init_rng, state_rng = jax.random.split(jax.random.key(seed))

    @functools.partial(jax.jit, out_shardings=shardings)
    def init(params):
        variables = nn.unbox(init_variables(model, init_rng))
        params = variables["params"] if params is None else params
        if model.cfg.lora.rank:
            params = lora.combine(lora.adapters(variables["params"]), params)
            params = params if scheme_of(params) else lora.quantize_base(model.cfg, params)
        model_state = variables.get("state", {})
        copy = jax.tree.map(jnp.copy, params) if frozen else {}  # its own buffers: the train step donates the state
        qat = {} if train is None else init_qat(model.cfg, train, params)
        return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), state_rng, model_state, copy, qat)

    return init(params)
