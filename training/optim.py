"""Learning-rate schedules (one function each, selected in `SCHEDULES`), the AdamW optimizer, and which params it
trains (`train.trainable`)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import optax

if TYPE_CHECKING:
    from model import ModelConfig
    from training.config import TrainConfig

Schedule = Callable[[jax.Array], jax.Array]


def _warmup(t: TrainConfig, step) -> jax.Array:
    return jnp.minimum(1.0, (step + 1) / max(t.warmup_steps, 1))


def cosine(t: TrainConfig) -> Schedule:
    """Linear warmup to lr, then a half cosine down to min_lr_ratio * lr at the last step."""

    def schedule(step):
        progress = jnp.clip((step - t.warmup_steps) / max(t.steps - t.warmup_steps, 1), 0.0, 1.0)
        decay = t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + jnp.cos(jnp.pi * progress))
        return t.lr * jnp.where(step < t.warmup_steps, _warmup(t, step), decay)

    return schedule


def wsd(t: TrainConfig) -> Schedule:
    """Warmup-stable-decay: warmup, constant lr, then linear decay over the last decay_fraction of steps."""
    decay_start = t.steps - round(t.decay_fraction * t.steps)

    def schedule(step):
        progress = jnp.clip((step - decay_start) / max(t.steps - decay_start, 1), 0.0, 1.0)
        decay = 1.0 - (1 - t.min_lr_ratio) * progress
        return t.lr * jnp.minimum(_warmup(t, step), decay)

    return schedule


def constant(t: TrainConfig) -> Schedule:
    return lambda step: t.lr * _warmup(t, step)


SCHEDULES: dict[str, Callable[[TrainConfig], Schedule]] = {"cosine": cosine, "wsd": wsd, "constant": constant}

NO_DECAY = ("scale", "bias")  # norm gains and biases


def decay_mask(params):
    """True for weights that get weight decay: everything but norm scales and biases."""
    return jax.tree_util.tree_map_with_path(lambda path, _: getattr(path[-1], "key", None) not in NO_DECAY, params)


def is_hidden_matrix(path) -> bool:
    """A projection's kernel inside the layers (not the embedding, the norms or the output head)."""
    keys = [getattr(k, "key", None) for k in path]
    return keys[-1] == "kernel" and "head" not in keys


def mup_learning_rates(width_mult: float) -> optax.GradientTransformation:
    """muP for Adam: hidden matrices take lr / width_mult; embeddings, norms and the head keep lr."""

    def update(updates, state, params=None):
        del params
        scaled = jax.tree_util.tree_map_with_path(lambda p, u: u / width_mult if is_hidden_matrix(p) else u, updates)
        return scaled, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def path_name(path) -> str:
    """A parameter's path as train.trainable's patterns see it: its keys joined by '/', e.g. layers/mlp/up/kernel."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def trainable_mask(patterns: tuple[str, ...], params):
    """True for the params that train: those whose path (`path_name`) some pattern matches anywhere (re.search;
    anchor with ^ and $ for whole paths), all of them when there are no patterns."""
    compiled = [re.compile(p) for p in patterns]
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not compiled or any(p.search(path_name(path)) for p in compiled), params
    )


def unmatched(patterns: tuple[str, ...], params) -> list[str]:
    """The patterns that select no parameter of `params` (arrays or abstract ones)."""
    names = [path_name(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]
    return [p for p in patterns if not any(re.search(p, name) for name in names)]


def lora_plus(tx: optax.GradientTransformation, ratio: float) -> optax.GradientTransformation:
    """LoRA+ (Hayou et al. 2024): `tx` with the B factors' steps, weight decay included, times `ratio`, which is AdamW
    with B's learning rate `ratio` times A's (peft's loraplus_lr_ratio). It keeps `tx`'s state as it is, so a run
    resumes with another ratio."""

    def update(updates, state, params=None):
        updates, state = tx.update(updates, state, params)
        scale = lambda p, u: u * ratio if path_name(p).endswith("_lora_b") else u  # noqa: E731
        return jax.tree_util.tree_map_with_path(scale, updates), state

    return optax.GradientTransformation(tx.init, update)


def make_optimizer(t: TrainConfig, model: ModelConfig | None = None) -> tuple[optax.GradientTransformation, Schedule]:
    """Global-norm clipping then AdamW on `schedule`; under muP (`model.parametrization='mup'`) the hidden
    matrices' steps, weight decay included, are scaled by 1 / width_mult, and with LoRA+ (`model.lora.lr_ratio`)
    the B factors' by the ratio. With `train.trainable`, only the params it selects: the others get zero updates
    and no optimizer state (`optax.multi_transform` hands each transform only its own leaves, so the clipping norm
    is the trainable ones' too)."""
    schedule = SCHEDULES[t.schedule](t)
    adamw = optax.adamw(schedule, b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay, mask=decay_mask)
    clip = optax.clip_by_global_norm(t.grad_clip) if t.grad_clip > 0 else optax.identity()
    if model is not None and model.parametrization == "mup":
        tx = optax.chain(clip, adamw, mup_learning_rates(model.width_mult))
    else:
        tx = optax.chain(clip, adamw)
    if model is not None and model.lora.rank and model.lora.lr_ratio != 1:
        tx = lora_plus(tx, model.lora.lr_ratio)
    if not t.trainable:
        return tx, schedule

    def labels(params):
        return jax.tree.map(lambda train: "train" if train else "frozen", trainable_mask(t.trainable, params))

    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels), schedule
