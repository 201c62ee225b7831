"""isoFLOP planning: for each compute budget, models of one shape family spanning size N around the
expected optimum, each trained on the number of tokens D that spends the budget, FLOPs counted by the
model's own accounting (6N plus attention, not 6N alone).

A family fixes how a model grows: d_model ~ aspect * num_layers, a fixed head_dim, d_ff a fixed
multiple of d_model. For a target N the planner picks the layer count the aspect ratio implies, then
the width that brings non-embedding params closest to N; D then follows from the budget. N counts the params
each token uses (`ParamCounts.active_non_embedding`): an MoE family is sized by its active params and records its
total ones (`Planned.params_total`).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from model import ModelConfig, flops_per_token, param_counts

MAX_BUDGET_ERROR = 0.02  # every planned run spends its budget within 2%


class PlanError(ValueError):
    """A sweep that cannot be planned as asked (a one-line message)."""


@dataclasses.dataclass(frozen=True)
class Family:
    aspect: float = 32.0  # d_model / num_layers
    head_dim: int = 32
    ffn_ratio: float = 8 / 3  # d_ff / d_model (SwiGLU's usual 8/3)
    ffn_multiple: int = 32  # d_ff rounded to a multiple of this
    kv_group: int = 1  # query heads per K/V head (1: MHA)
    min_layers: int = 1

    def shape(self, num_layers: int, d_model: int) -> dict:
        heads = d_model // self.head_dim
        d_ff = max(self.ffn_multiple, round(self.ffn_ratio * d_model / self.ffn_multiple) * self.ffn_multiple)
        return {
            "num_layers": num_layers,
            "d_model": d_model,
            "num_heads": heads,
            "num_kv_heads": max(1, heads // self.kv_group),
            "head_dim": self.head_dim,
            "d_ff": d_ff,
        }


@dataclasses.dataclass(frozen=True)
class Planned:
    name: str
    budget: float
    model: dict  # model config fields of this size
    params: int  # active non-embedding (all of them for a dense model)
    params_total: int
    tokens: int
    steps: int
    flops: float

    @property
    def tokens_per_param(self) -> float:
        return self.tokens / self.params


def sized(base: ModelConfig, family: Family, target_params: float) -> ModelConfig:
    """The family member nearest `target_params` non-embedding params: the layer count the aspect ratio
    implies (N ~ 12 L d^2 with d = aspect L), then the width (a whole number of heads) closest in N."""
    layers = max(family.min_layers, round((target_params / (12 * family.aspect**2)) ** (1 / 3)))
    width = math.sqrt(target_params / (12 * layers)) / family.head_dim
    best = None
    for heads in {max(family.kv_group, math.floor(width)), max(family.kv_group, math.ceil(width))}:
        heads -= heads % family.kv_group
        cfg = dataclasses.replace(base, **family.shape(layers, heads * family.head_dim))
        error = abs(math.log(param_counts(cfg).active_non_embedding / target_params))
        if best is None or error < best[0]:
            best = (error, cfg)
    return best[1]


def expected_optimum(base: ModelConfig, family: Family, budget: float, tokens_per_param: float, seq_len: int) -> float:
    """The family's N whose budget buys tokens_per_param * N tokens (Chinchilla's D = 20 N by default), with
    the model's real FLOPs per token: at small N the output head and attention make that well above 6N."""
    n = math.sqrt(budget / (6 * tokens_per_param))  # the 6N answer, as a start
    for _ in range(30):
        per_token = flops_per_token(sized(base, family, n), seq_len)
        n = math.sqrt(n * budget / (per_token * tokens_per_param))  # geometric damping of N <- C / (F(N) tpp)
    return n


def plan_one(
    base: ModelConfig, family: Family, budget: float, target: float, *, seq_len: int, batch_size: int
) -> Planned:
    """The family member nearest `target` params, trained for the steps that spend `budget` (within 2%)."""
    cfg = sized(base, family, target)
    counts = param_counts(cfg)
    per_step = flops_per_token(cfg, seq_len) * batch_size * seq_len
    steps = round(budget / per_step)
    flops = steps * per_step
    if steps < 1 or abs(flops - budget) / budget > MAX_BUDGET_ERROR:
        raise PlanError(
            f"budget {budget:.3g}: a {counts.active_non_embedding:,}-param model takes {per_step:.3g} FLOPs per step, "
            f"so {max(steps, 1)} steps spend {max(steps, 1) * per_step:.3g} (more than 2% off); "
            "use a smaller train.batch_size or a larger budget"
        )
    shape = {k: getattr(cfg, k) for k in ("num_layers", "d_model", "num_heads", "num_kv_heads", "head_dim", "d_ff")}
    name = f"C{budget:.3g}_N{counts.active_non_embedding}".replace("+", "")  # C1e12_N..., C2.5e12_N...
    return Planned(
        name, budget, shape, counts.active_non_embedding, counts.total, steps * batch_size * seq_len, steps, flops
    )


def plan_optimal(
    base: ModelConfig, family: Family, budget: float, law: dict, *, seq_len: int, batch_size: int
) -> tuple[Planned, float]:
    """The family member a fitted L(N, D) = E + A/N^alpha + B/D^beta (approach 3's `law`, N non-embedding)
    predicts best at `budget`, with D from the model's real FLOPs per token; returns it and its predicted loss."""

    def predicted(p: Planned) -> float:
        return law["E"] + law["A"] / p.params ** law["alpha"] + law["B"] / p.tokens ** law["beta"]

    expected = expected_optimum(base, family, budget, 20.0, seq_len)
    candidates = {}
    for target in np.geomspace(expected / 30, expected * 30, 120):
        try:
            planned = plan_one(base, family, budget, float(target), seq_len=seq_len, batch_size=batch_size)
        except PlanError:
            continue  # too large a model for the budget to be spent within 2%
        candidates.setdefault(planned.params, planned)
    best = min(candidates.values(), key=predicted)
    return best, predicted(best)


def plan_budget(
    base: ModelConfig,
    family: Family,
    budget: float,
    *,
    sizes: int,
    spread: float,
    tokens_per_param: float,
    seq_len: int,
    batch_size: int,
) -> list[Planned]:
    """`sizes` distinct models log-spaced over [N*/spread, N* spread] around the expected optimum N*, each with
    the steps that spend `budget`."""
    expected = expected_optimum(base, family, budget, tokens_per_param, seq_len)
    runs: dict[int, Planned] = {}
    for target in np.geomspace(expected / spread, expected * spread, sizes):
        planned = plan_one(base, family, budget, float(target), seq_len=seq_len, batch_size=batch_size)
        runs.setdefault(planned.params, planned)
    if len(runs) < sizes:
        raise PlanError(
            f"budget {budget:.3g}: only {len(runs)} distinct model sizes between {expected / spread:,.0f} and "
            f"{expected * spread:,.0f} params for sizes={sizes}; widen the spread or use a smaller head_dim"
        )
    return sorted(runs.values(), key=lambda r: r.params)


def table(planned: list[Planned]) -> str:
    """The plan as a markdown table."""
    lines = [
        "| run | budget | params (non-emb.) | params (total) | layers x d_model | tokens | steps | tokens/param | FLOPs |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in planned:
        lines.append(
            f"| {r.name} | {r.budget:.2e} | {r.params:,} | {r.params_total:,} | {r.model['num_layers']} x {r.model['d_model']} "
            f"| {r.tokens:,} | {r.steps:,} | {r.tokens_per_param:.1f} | {r.flops:.3e} |"
        )
    return "\n".join(lines)
