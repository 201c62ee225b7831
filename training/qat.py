"""Quantization-aware training (`train.qat`): the weights a run's forward pass reads at a step.

From step `start_step` on (the optimizer steps taken so far: `TrainState.step`), every weight `skip` does not keep in
float is read fake-quantized (model.quant.params.fake_quantize_params: exactly the values quantizing it with the
scheme stores, the gradient passing straight through to the float param), by the train step's loss and by what the
loop evaluates (eval/bpb, train.eval_tasks, the end-of-run sample): what the model will be deployed as. Before
`start_step`, the float params as they are.

With `clip_lr` > 0 each group's range is also multiplied by a learned clipping factor (model.quant.schemes.
fake_quantize_clipped: LSQ's gradients, OmniQuant's learnable weight clipping): the factors start at 1 (the scheme's
own scales), are kept in CLIP_RANGE, live in the train state's `qat` entry beside their Adam state (`init_qat`, `clip_optimizer`), are saved
as the checkpoint's `qat` item, and are what quantizing the checkpoint uses (`load_clips`, training/quantize.py).
They are replicated on every device (1/G of the quantized weights' size, G the group size).

One compiled train step serves every step: with `start_step` 0 the weights are always fake-quantized; with a later
one a traced select on the step picks the float or the rounded weights (computing both is a few elementwise passes
over the weights, small beside the matmuls, and keeps the step free of a conditional's host round trip). The
select returns the float params' own values, so the loss before `start_step` is a plain run's, bit for bit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from model.config import ModelConfig
from model.quant import params as quant_params
from model.quant.schemes import GROUPS, QuantError, Spec
from training.config import ConfigError, QATConfig, RunConfig, TrainConfig
from training.optim import SCHEDULES

Weights = Callable[..., Any]  # (params, step, clips=None) -> the params the forward pass reads


def spec_of(q: QATConfig) -> Spec | None:
    """The quantization `q` trains for (None: QAT off)."""
    if not q.scheme:
        return None
    return Spec(q.scheme, q.group_size if q.group_size >= 0 else None, q.skip)


def check(run: RunConfig) -> None:
    """ConfigError (one line, naming the weight and the group sizes that fit) when a weight's input width cannot be
    split into train.qat's groups; reads only the model's abstract shapes."""
    spec = spec_of(run.train.qat)
    if spec is None:
        return
    try:
        quant_params.check(run.model, spec)
    except QuantError as e:
        fits = [g for g in (-1, *GROUPS) if _fits(run.model, dataclasses.replace(spec, group=None if g < 0 else g))]
        allowed = f"allowed for this model: {', '.join(map(str, fits))}" if fits else "no group size fits this model"
        raise ConfigError(f"train.qat.group_size={run.train.qat.group_size}: {e} ({allowed})") from None


def _fits(cfg: ModelConfig, spec: Spec) -> bool:
    try:
        quant_params.check(cfg, spec)
    except QuantError:
        return False
    return True


# Where the learned factors are kept after every step (projected Adam): at most 1, so a group is clipped, never
# widened, and its extreme value lands on the end code; that keeps an int8/int4 group of 32 exactly what ggml's
# q8_0/q4_0 quantizer makes of the rounded values (the GGUF export), as the scheme's own scales are. The floor keeps
# every scale positive (int4's sign convention puts the group's extreme on code -8).
CLIP_RANGE = (0.01, 1.0)


def learns_clips(q: QATConfig) -> bool:
    return bool(q.scheme) and q.clip_lr > 0


def forward_weights(cfg: ModelConfig, q: QATConfig) -> Weights:
    """(params, step, clips) -> the params the forward pass reads at `step` (traced or not); `clips`: the learned
    clipping factors (the state's qat["clips"]) under `clip_lr`, else unused."""
    spec = spec_of(q)
    if spec is None:
        return lambda params, step, clips=None: params

    def rounded(params, clips):
        return quant_params.fake_quantize_params(cfg, params, spec, clips if learns_clips(q) else None)

    if q.start_step == 0:
        return lambda params, step, clips=None: rounded(params, clips)

    def weights(params, step, clips=None):
        fq = rounded(params, clips)
        on = jnp.asarray(step) >= q.start_step
        return jax.tree.map(lambda r, p: p if r is p else jnp.where(on, r, p), fq, params)

    return weights


def jit_forward_weights(cfg: ModelConfig, q: QATConfig, shardings: Any) -> Weights:
    """`forward_weights` compiled once, its output placed as `shardings` (the params') say; without QAT the params
    themselves (a compiled identity would copy them)."""
    if spec_of(q) is None:
        return forward_weights(cfg, q)
    return jax.jit(forward_weights(cfg, q), out_shardings=shardings)


def clip_optimizer(t: TrainConfig) -> optax.GradientTransformation:
    """Adam on the clipping factors: peak `train.qat.clip_lr`, the run's schedule's shape, no weight decay (a
    factor's place to rest is 1, not 0) and no gradient clipping (the params' global norm is theirs alone)."""
    schedule = SCHEDULES[t.schedule](t)
    return optax.adam(lambda step: schedule(step) * (t.qat.clip_lr / t.lr), b1=t.b1, b2=t.b2, eps=t.eps)


def init_qat(cfg: ModelConfig, t: TrainConfig, params: Any) -> dict:
    """The train state's `qat` entry: {"clips", "opt_state"} under `clip_lr`, else {}."""
    if not learns_clips(t.qat):
        return {}
    clips = quant_params.initial_clips(cfg, params, spec_of(t.qat))
    return {"clips": clips, "opt_state": clip_optimizer(t).init(clips)}


def abstract_qat(cfg: ModelConfig, t: TrainConfig, params: Any, sharding: Any = None) -> dict:
    """`init_qat`'s shapes (placed on `sharding` where given) from the params' abstract ones."""
    abstract = jax.eval_shape(lambda p: init_qat(cfg, t, p), params)
    if sharding is None:
        return abstract
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract)
