"""Quantization-aware training (`train.qat`): the weights a run's forward pass reads at a step.

From step `start_step` on (the optimizer steps taken so far: `TrainState.step`), every weight `skip` does not keep in
float is read fake-quantized (model.quant.params.fake_quantize_params: exactly the values quantizing it with the
scheme stores, the gradient passing straight through to the float param), by the train step's loss and by what the
loop evaluates (eval/bpb, train.eval_tasks, the end-of-run sample): what the model will be deployed as. Before
`start_step`, the float params as they are.

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

from model.config import ModelConfig
from model.quant import params as quant_params
from model.quant.schemes import GROUPS, QuantError, Spec
from training.config import ConfigError, QATConfig, RunConfig

Weights = Callable[[Any, jax.Array], Any]  # (params, step) -> the params the forward pass reads


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


def forward_weights(cfg: ModelConfig, q: QATConfig) -> Weights:
    """(params, step) -> the params the forward pass reads at `step` (traced or not)."""
    spec = spec_of(q)
    if spec is None:
        return lambda params, step: params
    if q.start_step == 0:
        return lambda params, step: quant_params.fake_quantize_params(cfg, params, spec)

    def weights(params, step):
        rounded = quant_params.fake_quantize_params(cfg, params, spec)
        on = jnp.asarray(step) >= q.start_step
        return jax.tree.map(lambda r, p: p if r is p else jnp.where(on, r, p), rounded, params)

    return weights


def jit_forward_weights(cfg: ModelConfig, q: QATConfig, shardings: Any) -> Weights:
    """`forward_weights` compiled once, its output placed as `shardings` (the params') say; without QAT the params
    themselves (a compiled identity would copy them)."""
    if spec_of(q) is None:
        return forward_weights(cfg, q)
    return jax.jit(forward_weights(cfg, q), out_shardings=shardings)
