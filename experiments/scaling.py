"""Chinchilla scaling-law fits over finished runs: `python -m experiments.scaling fit runs.csv --out FIT_DIR`, and
`python -m experiments.scaling backtest runs.csv`: how well fits on the smaller budgets predict the larger ones.

Owns the three estimates of Hoffmann et al. 2022 ("Training Compute-Optimal Large Language Models") of how a
compute budget C should be split between parameters N and training tokens D, and how they are reported:
  approach 1: the lower envelope of the training curves -> power laws N_opt = k_N C^a, D_opt = k_D C^b;
  approach 2: a parabola in log N through each isoFLOP group of runs -> its minimum -> the same power laws, and
              one for the minima's loss, L_opt = k_L C^loss_exponent (Kaplan et al.'s L(C)), and a line in ln C
              through the same minima, L_opt = loss_ln_intercept + loss_ln_slope ln C (far above the irreducible
              loss, where small runs sit, the minima fall by a near-constant amount per e-fold of compute);
  approach 3: L(N, D) = E + A/N^alpha + B/D^beta by Huber regression on log-loss, and its frontier;
bootstrap intervals for the exponents, fit.json, the plots and a printed summary. Runs of one model with several seeds
(the same budget, params and tokens) are averaged into one point before any of it.

Compute is what the runs say they spent: when runs.csv has the model's own FLOPs (attention and the output head on
top of 6N, which dominate at small N), FLOPs per token are fitted as 6N + c N^q and every optimum spends its budget
by that count; without a `flops` column it is C = 6ND, as in Hoffmann et al.

Inputs are CSVs: runs.csv needs `params, tokens, loss` (optional `name`, `flops` = 6*params*tokens by default,
`budget` labelling isoFLOP groups; approach 2 groups by `flops` without it, which only works where each group's
FLOPs agree within GROUP_GAP_DECADES); curves.csv needs `name, tokens, loss` (optional `step`, `flops`). Every
function takes plain arrays, so sweeps can fit runs they hold in memory (`Runs(...)` then `fit_runs`).
"""

from __future__ import annotations

import os

# L-BFGS-B on five parameters spends most of its time in OpenBLAS handing tiny products to threads: 5-10x slower
# on a busy machine. OpenBLAS reads this once, when scipy first loads it, so it must come before the imports.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import csv  # noqa: E402
import dataclasses  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
import re  # noqa: E402

import matplotlib  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from scipy.optimize import minimize, minimize_scalar  # noqa: E402

from training.cli import fail  # noqa: E402

HUBER_DELTA = 1e-3
# The starting grid of Hoffmann et al. (their appendix D.2), over theta = (a, b, e, alpha, beta).
GRID_A = GRID_B = (0.0, 5.0, 10.0, 15.0, 20.0, 25.0)
GRID_E = (-1.0, -0.5, 0.0, 0.5, 1.0)
GRID_ALPHA = GRID_BETA = (0.0, 0.5, 1.0, 1.5, 2.0)
# Runs without a `budget` column are grouped by FLOPs; neighbours closer than this (in decades, i.e. 12%) share one.
GROUP_GAP_DECADES = 0.05
PLOTS = ("isoflops.png", "frontier.png", "contours.png")


class ScalingError(ValueError):
    """Bad input to a fit; the message is one line naming the file, column, budget or value at fault."""


# --- inputs ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Runs:
    """Finished runs, one entry per run. `flops` defaults to 6*params*tokens; `budget` labels isoFLOP groups."""

    params: np.ndarray
    tokens: np.ndarray
    loss: np.ndarray
    flops: np.ndarray | None = None
    budget: np.ndarray | None = None
    name: np.ndarray | None = None

    def __post_init__(self):
        for field in ("params", "tokens", "loss", "flops"):
            if (value := getattr(self, field)) is not None:
                object.__setattr__(self, field, np.asarray(value, dtype=float))
        if self.flops is None:
            object.__setattr__(self, "flops", 6.0 * self.params * self.tokens)
        for field in ("budget", "name"):
            if (value := getattr(self, field)) is not None:
                object.__setattr__(self, field, np.asarray(value, dtype=str))

    def __len__(self) -> int:
        return len(self.loss)

    def take(self, index: np.ndarray) -> Runs:
        """The runs at `index`; repeats are allowed, as the bootstrap resamples with replacement."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return Runs(**{k: None if v is None else v[index] for k, v in fields.items()})


@dataclasses.dataclass(frozen=True)
class Curves:
    """Points of training curves: the run `name` each belongs to, that run's `params`, and tokens/flops/loss so far."""

    name: np.ndarray
    params: np.ndarray
    tokens: np.ndarray
    flops: np.ndarray
    loss: np.ndarray


def _read_rows(path: pathlib.Path, required: tuple[str, ...]) -> tuple[list[str], list[tuple[int, dict]]]:
    """The header and (line number, row) pairs of a CSV, once it is known to exist and to have `required` columns."""
    if not path.is_file():
        raise ScalingError(f"{path}: no such file")
    with path.open(newline="") as f:
        reader = csv.DictReader(f, skipinitialspace=True)
        header = [h.strip() for h in reader.fieldnames or []]
        reader.fieldnames = header
        rows = [(reader.line_num, row) for row in reader]
    missing = [c for c in required if c not in header]
    if missing:
        raise ScalingError(f"{path}: missing required column {missing[0]!r} (columns: {', '.join(header) or 'none'})")
    if not rows:
        raise ScalingError(f"{path}: no rows")
    return header, rows


def _positive_column(path: pathlib.Path, rows: list[tuple[int, dict]], column: str) -> np.ndarray:
    """One positive finite number per row: logs of every one of them are taken."""
    values = np.empty(len(rows))
    for i, (line, row) in enumerate(rows):
        text = (row.get(column) or "").strip()
        try:
            values[i] = float(text)
        except ValueError:
            values[i] = math.nan
        if not (math.isfinite(values[i]) and values[i] > 0):
            raise ScalingError(f"{path} line {line}: {column}={text!r} is not a positive number")
    return values


def _label_column(path: pathlib.Path, rows: list[tuple[int, dict]], column: str) -> np.ndarray:
    labels = [(line, (row.get(column) or "").strip()) for line, row in rows]
    for line, label in labels:
        if not label:
            raise ScalingError(f"{path} line {line}: {column} is empty")
    return np.array([label for _, label in labels], dtype=str)


def load_runs(path: str | pathlib.Path) -> Runs:
    """runs.csv -> Runs; only `params, tokens, loss` are required (approach 2 also needs `budget` or `flops`
    to group the runs by budget, unless their budgets were counted as 6ND)."""
    path = pathlib.Path(path)
    header, rows = _read_rows(path, ("params", "tokens", "loss"))
    numbers = {c: _positive_column(path, rows, c) for c in ("params", "tokens", "loss", "flops") if c in header}
    # A sweep that is not an isoFLOP design writes an empty budget for every run: then FLOPs group them.
    has_budget = any((row.get("budget") or "").strip() for _, row in rows)
    labels = {
        c: _label_column(path, rows, c) for c in ("budget", "name") if c in header and (c != "budget" or has_budget)
    }
    return Runs(**numbers, **labels)


def load_curves(path: str | pathlib.Path, runs: Runs) -> Curves:
    """curves.csv -> Curves, each point given the params of the run named in its `name` column."""
    path = pathlib.Path(path)
    header, rows = _read_rows(path, ("name", "tokens", "loss"))
    if runs.name is None:
        raise ScalingError(f"{path}: the runs have no 'name' column to match the curves' names against")
    params_of = dict(zip(runs.name.tolist(), runs.params.tolist()))
    names = _label_column(path, rows, "name")
    for (line, _), name in zip(rows, names):
        if name not in params_of:
            raise ScalingError(f"{path} line {line}: name={name!r} is not a run")
    params = np.array([params_of[n] for n in names])
    tokens = _positive_column(path, rows, "tokens")
    flops = _positive_column(path, rows, "flops") if "flops" in header else 6.0 * params * tokens
    return Curves(names, params, tokens, flops, _positive_column(path, rows, "loss"))


# --- seeds: repeats of one model are averaged into one point --------------------------------------------------------


def _point_keys(runs: Runs) -> list[tuple]:
    budget = runs.budget if runs.budget is not None else [""] * len(runs)
    return list(zip(budget, runs.params.tolist(), runs.tokens.tolist()))


def _point_name(names: list[str]) -> str:
    """The runs' common name once a trailing ',seed=S' is dropped (as experiments.sweep names seeds), else the first."""
    stems = {re.sub(r",seed=[^,]*$", "", name) for name in names}
    return stems.pop() if len(stems) == 1 else names[0]


def average_repeats(runs: Runs) -> Runs:
    """Runs sharing budget, params and tokens are one model trained with several seeds: one point for each, with
    their mean loss, so that every parabola, bootstrap resample and parametric fit counts each model once, however
    many seeds it had. Runs without repeats come back unchanged."""
    keys = _point_keys(runs)
    if len(set(keys)) == len(keys):
        return runs
    groups = {key: [] for key in keys}
    for i, key in enumerate(keys):
        groups[key].append(i)
    members = list(groups.values())
    mean = lambda values: np.array([np.mean(values[idx]) for idx in members])
    first = lambda values: None if values is None else values[[idx[0] for idx in members]]
    names = None if runs.name is None else np.array([_point_name(runs.name[idx].tolist()) for idx in members])
    return Runs(mean(runs.params), mean(runs.tokens), mean(runs.loss), mean(runs.flops), first(runs.budget), names)


def seed_spread(runs: Runs) -> dict | None:
    """How much seeds of one model scatter: the pooled standard deviation of their final losses (None without
    repeats)."""
    keys = _point_keys(runs)
    groups = {}
    for key, loss in zip(keys, runs.loss.tolist()):
        groups.setdefault(key, []).append(loss)
    repeated = [np.array(v) for v in groups.values() if len(v) > 1]
    if not repeated:
        return None
    squares = sum(float(np.sum((v - v.mean()) ** 2)) for v in repeated)
    counts = [len(v) for v in groups.values()]
    return {
        "runs": len(runs),
        "points": len(groups),
        "seeds_per_point": [min(counts), max(counts)],
        "loss_std": math.sqrt(squares / sum(len(v) - 1 for v in repeated)),
    }


def average_curves(curves: Curves, runs: Runs) -> Curves:
    """The training curves of each point of `average_repeats(runs)`: at every token count, the mean loss over the
    seeds that evaluated there, under the point's name."""
    keys = _point_keys(runs)
    if runs.name is None or len(set(keys)) == len(keys):
        return curves
    point_of = {}
    for key, name in zip(keys, runs.name.tolist()):
        point_of.setdefault(key, []).append(name)
    renamed = {name: _point_name(names) for names in point_of.values() for name in names}
    sums = {}
    for name, params, tokens, flops, loss in zip(curves.name, curves.params, curves.tokens, curves.flops, curves.loss):
        entry = sums.setdefault((renamed[str(name)], float(tokens)), [params, flops, 0.0, 0])
        entry[2] += loss
        entry[3] += 1
    rows = [(name, p, t, f, total / n) for (name, t), (p, f, total, n) in sums.items()]
    return Curves(*(np.array(column) for column in zip(*rows)))


# --- FLOPs per token -------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PerToken:
    """Training FLOPs per token as a function of params N: 6N + c N^q (c = 0: Chinchilla's C = 6ND)."""

    c: float = 0.0
    q: float = 1.0

    def __call__(self, params):
        params = np.asarray(params, dtype=float)
        return 6.0 * params + self.c * np.power(params, self.q)


def fit_per_token(runs: Runs) -> PerToken:
    """Least squares in log-log through each run's FLOPs per token beyond 6N; 6N itself when the runs add nothing.
    Runs that count less than 6N somewhere (another accounting) get one constant multiple of N instead."""
    per_token = runs.flops / runs.tokens
    extra = per_token - 6.0 * runs.params
    if np.all(np.abs(extra) <= 1e-6 * per_token):
        return PerToken()
    if np.all(extra > 0) and len(np.unique(runs.params)) > 1:
        q, log_c = np.polyfit(np.log(runs.params), np.log(extra), 1)
        return PerToken(float(np.exp(log_c)), float(q))
    return PerToken(float(np.median(per_token / runs.params)) - 6.0, 1.0)


# --- approach 2: isoFLOP parabolas ----------------------------------------------------------------------------------


def isoflop_groups(runs: Runs) -> list[tuple[str, np.ndarray]]:
    """(label, run indices) for each compute budget, smallest first.

    The `budget` column decides when present. Otherwise runs whose FLOPs lie within GROUP_GAP_DECADES of a neighbour
    form one group, so that tokens rounded to whole batches do not split a budget.
    """
    if runs.budget is not None:
        groups = [(label, np.flatnonzero(runs.budget == label)) for label in np.unique(runs.budget)]
    else:
        order = np.argsort(runs.flops)
        cluster = np.concatenate([[0], np.cumsum(np.diff(np.log10(runs.flops[order])) > GROUP_GAP_DECADES)])
        groups = [(None, order[cluster == k]) for k in range(cluster[-1] + 1)]
        groups = [(f"{_geomean(runs.flops[idx]):.3g}", idx) for _, idx in groups]
    return sorted(groups, key=lambda group: _geomean(runs.flops[group[1]]))


def _geomean(x: np.ndarray) -> float:
    return float(np.exp(np.mean(np.log(x))))


def fit_power_laws(flops: np.ndarray, params: np.ndarray, tokens: np.ndarray) -> dict:
    """Least squares in log-log: N_opt = k_N * C^a and D_opt = k_D * C^b."""
    a, log_k_n = np.polyfit(np.log(flops), np.log(params), 1)
    b, log_k_d = np.polyfit(np.log(flops), np.log(tokens), 1)
    return {"a": float(a), "k_N": float(np.exp(log_k_n)), "b": float(b), "k_D": float(np.exp(log_k_d))}


def fit_isoflop(label: str, runs: Runs, per_token: PerToken = PerToken()) -> dict:
    """The minimum of the parabola loss = c2 x^2 + c1 x + c0 in x = ln(params) through runs sharing a budget.

    Tokens at the minimum are what the budget buys there: C / per_token(N_opt).
    """
    if len(np.unique(runs.params)) < 3:
        raise ScalingError(f"budget {label}: {len(np.unique(runs.params))} distinct params; a parabola needs 3")
    x = np.log(runs.params)
    c2, c1, c0 = np.polyfit(x, runs.loss, 2)
    if c2 <= 0:
        raise ScalingError(f"budget {label}: loss vs log params curves down (x^2 coefficient {c2:.3g}), no minimum")
    x_opt = -c1 / (2 * c2)
    if c0 + c1 * x_opt + c2 * x_opt**2 <= 0:  # a vertex far outside the runs, as a bootstrap resample can give
        raise ScalingError(f"budget {label}: the parabola's minimum is at loss <= 0 (params {math.exp(x_opt):.3g})")
    flops = _geomean(runs.flops)
    params = math.exp(x_opt)
    return {
        "budget": label,
        "flops": flops,
        "params": params,
        "tokens": float(flops / per_token(params)),
        "loss": float(c0 + c1 * x_opt + c2 * x_opt**2),
        "runs": len(runs),
        "interior": bool(x.min() <= x_opt <= x.max()),
        "parabola_ln_params": [float(c2), float(c1), float(c0)],
    }


def fit_approach2(runs: Runs) -> dict:
    """Per-budget parabola minima, then power laws through them: N_opt, D_opt and the loss at the optimum."""
    per_token = fit_per_token(runs)
    try:
        budgets = [fit_isoflop(label, runs.take(idx), per_token) for label, idx in isoflop_groups(runs)]
    except ScalingError as e:
        if runs.budget is not None:
            raise
        raise ScalingError(
            f"{e} (with no `budget` column, runs are grouped by FLOPs, 6*params*tokens where there is no `flops` "
            "column: give runs.csv the `budget` each run was planned for, or the FLOPs it spent)"
        ) from None
    if len(budgets) < 2:
        raise ScalingError(f"approach 2 needs runs at 2 or more budgets; found {len(budgets)}")
    column = lambda key: np.array([b[key] for b in budgets])
    loss_exponent, log_k_l = np.polyfit(np.log(column("flops")), np.log(column("loss")), 1)
    ln_slope, ln_intercept = np.polyfit(np.log(column("flops")), column("loss"), 1)
    return {
        **fit_power_laws(column("flops"), column("params"), column("tokens")),
        "loss_exponent": float(loss_exponent),
        "k_L": float(np.exp(log_k_l)),
        "loss_ln_slope": float(ln_slope),
        "loss_ln_intercept": float(ln_intercept),
        "budgets": budgets,
    }


def optimal_loss(approach2: dict, flops):
    """Approach 2's loss at the compute-optimal point of budget `flops`: k_L C^loss_exponent."""
    return approach2["k_L"] * np.power(flops, approach2["loss_exponent"])


def optimal_loss_ln(approach2: dict, flops):
    """Approach 2's loss at the compute-optimal point of budget `flops` on the line in ln C through the minima."""
    return approach2["loss_ln_intercept"] + approach2["loss_ln_slope"] * np.log(flops)


# --- approach 3: parametric fit -------------------------------------------------------------------------------------


def chinchilla_grid() -> np.ndarray:
    """Starting points (S, 5) over theta = (a, b, e, alpha, beta), with A = e^a, B = e^b, E = e^e."""
    return np.array(list(itertools.product(GRID_A, GRID_B, GRID_E, GRID_ALPHA, GRID_BETA)), dtype=float)


def _predict_log_loss(theta, log_n, log_d) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """log L = LSE(a - alpha log N, b - beta log D, e), and the softmax weights of its three terms.

    theta's entries may be scalars or (S, 1) columns, to score S starting points at once.
    """
    a, b, e, alpha, beta = theta
    terms = (a - alpha * log_n, b - beta * log_d, e + 0 * log_n)
    top = np.maximum(np.maximum(terms[0], terms[1]), terms[2])
    exps = [np.exp(t - top) for t in terms]
    total = exps[0] + exps[1] + exps[2]
    return top + np.log(total), tuple(x / total for x in exps)


def _huber(residual: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Huber loss and its derivative: r^2/2 within delta, delta(|r| - delta/2) beyond."""
    slope = np.clip(residual, -delta, delta)
    return slope * (residual - slope / 2), slope


def huber_objective(theta: np.ndarray, log_n, log_d, log_loss, delta: float = HUBER_DELTA) -> tuple[float, np.ndarray]:
    """sum Huber(LSE(...) - log L) / delta and its gradient in theta.

    Dividing by delta moves no minimum but brings the gradients to O(1), where L-BFGS-B's default tolerances fit.
    """
    predicted, (w_n, w_d, w_e) = _predict_log_loss(theta, log_n, log_d)
    value, slope = _huber(predicted - log_loss, delta)
    grad = np.array([slope @ w_n, slope @ w_d, slope @ w_e, -(slope * w_n) @ log_n, -(slope * w_d) @ log_d])
    return float(value.sum()) / delta, grad / delta


def _screen(starts: np.ndarray, log_n, log_d, log_loss, keep: int) -> np.ndarray:
    """The `keep` starting points with the lowest objective, scored all at once.

    L-BFGS from each of the 4500 grid points takes minutes; the best-scoring few reach the same optimum in seconds.
    """
    predicted, _ = _predict_log_loss(starts.T[:, :, None], log_n, log_d)
    value, _ = _huber(predicted - log_loss, HUBER_DELTA)
    return starts[np.argsort(value.sum(axis=1), kind="stable")[:keep]]


def fit_approach3(runs: Runs, starts: np.ndarray | None = None, refine: int | None = 32) -> dict:
    """E, A, B, alpha, beta of L(N, D) = E + A/N^alpha + B/D^beta, as Hoffmann et al. fit them.

    L-BFGS-B from each of `starts` (default: their grid) minimises the Huber loss of log-loss residuals; the best
    optimum is kept. `refine` limits L-BFGS to that many of the starts with the lowest objective (None: all).
    """
    if len(runs) < 5:
        raise ScalingError(f"approach 3 fits 5 parameters and needs at least 5 runs; found {len(runs)}")
    starts = chinchilla_grid() if starts is None else np.asarray(starts, dtype=float).reshape(-1, 5)
    data = (np.log(runs.params), np.log(runs.tokens), np.log(runs.loss))
    if refine is not None:
        starts = _screen(starts, *data, keep=refine)
    results = [minimize(huber_objective, s, args=data, jac=True, method="L-BFGS-B") for s in starts]
    best = min(results, key=lambda r: r.fun)
    return _parametric(best.x, huber=best.fun * HUBER_DELTA, starts=len(starts))


def _parametric(theta: np.ndarray, huber: float, starts: int) -> dict:
    """The fitted law's coefficients, plus its frontier's exponents a, b and constant G."""
    a, b, e, alpha, beta = (float(v) for v in theta)
    if not (alpha > 0 and beta > 0):
        raise ScalingError(f"approach 3: fitted alpha={alpha:.3g}, beta={beta:.3g}; loss must fall in both N and D")
    g = (alpha * math.exp(a) / (beta * math.exp(b))) ** (1 / (alpha + beta))
    return {
        "E": math.exp(e),
        "A": math.exp(a),
        "B": math.exp(b),
        "alpha": alpha,
        "beta": beta,
        "a": beta / (alpha + beta),
        "b": alpha / (alpha + beta),
        "G": g,
        "huber": huber,
        "starts": starts,
    }


def _theta(law: dict) -> np.ndarray:
    return np.array([math.log(law["A"]), math.log(law["B"]), math.log(law["E"]), law["alpha"], law["beta"]])


def parametric_loss(law: dict, params, tokens):
    """L(N, D) = E + A/N^alpha + B/D^beta."""
    return law["E"] + law["A"] / np.power(params, law["alpha"]) + law["B"] / np.power(tokens, law["beta"])


def optimal_frontier(law: dict, budgets, per_token: PerToken = PerToken()) -> list[dict]:
    """Compute-optimal N, D and loss per budget under approach 3's law, each spending its budget: C = per_token(N) D.

    With C = 6ND this is the closed form N_opt = G (C/6)^(beta/(alpha+beta)), D_opt = G^-1 (C/6)^(alpha/(alpha+beta));
    otherwise the minimum over N of L(N, C / per_token(N)), searched on a grid of ln N and then refined.
    """
    rows = []
    for flops in np.asarray(budgets, dtype=float).ravel():
        if per_token.c == 0.0:
            params = law["G"] * (flops / 6) ** law["a"]
            tokens = (flops / 6) ** law["b"] / law["G"]
        else:
            params = _optimal_params(law, flops, per_token)
            tokens = float(flops / per_token(params))
        loss = parametric_loss(law, params, tokens)
        rows.append({"flops": float(flops), "params": float(params), "tokens": float(tokens), "loss": float(loss)})
    return rows


def _optimal_params(law: dict, flops: float, per_token: PerToken) -> float:
    """argmin over N of L(N, C / per_token(N)), N from 1 up to the size whose one token costs C / 6."""
    loss = lambda x: parametric_loss(law, np.exp(x), flops / per_token(np.exp(x)))
    xs = np.linspace(0.0, math.log(flops / 6.0), 4001)
    i = int(np.argmin(loss(xs)))
    bounds = (xs[max(i - 1, 0)], xs[min(i + 1, len(xs) - 1)])
    return float(np.exp(minimize_scalar(loss, bounds=bounds, method="bounded", options={"xatol": 1e-9}).x))


def frontier_budgets(flops: np.ndarray, beyond: float = 1000.0, per_decade: int = 2) -> np.ndarray:
    """Budgets log-spaced from the smallest of `flops` to `beyond` times the largest."""
    lo, hi = float(np.min(flops)), float(np.max(flops)) * beyond
    return np.geomspace(lo, hi, max(2, round(per_decade * math.log10(hi / lo)) + 1))


# --- approach 1: lower envelope of training curves ------------------------------------------------------------------


def fit_approach1(curves: Curves, levels: int = 40) -> dict:
    """At FLOP levels spanning the curves, the run with the lowest loss there; power laws through those runs.

    Each run's loss, and its tokens, are interpolated in log FLOPs at the level. A level counts only when its winner is
    neither the smallest nor the largest model that reached it: there the optimum may lie beyond the models trained,
    and the envelope would pin it to the edge.
    """
    runs = [_curve(curves, curves.name == name) for name in np.unique(curves.name)]
    lo, hi = min(r["log_flops"][0] for r in runs), max(r["log_flops"][-1] for r in runs)
    rows = []
    for log_c in np.linspace(lo, hi, levels):
        reached = [r for r in runs if r["log_flops"][0] <= log_c <= r["log_flops"][-1]]
        if len(reached) < 3:
            continue
        losses = [np.interp(log_c, r["log_flops"], r["loss"]) for r in reached]
        best = reached[int(np.argmin(losses))]
        if best["params"] in (min(r["params"] for r in reached), max(r["params"] for r in reached)):
            continue
        tokens = math.exp(np.interp(log_c, best["log_flops"], best["log_tokens"]))
        row = {"flops": math.exp(log_c), "params": best["params"], "tokens": tokens, "loss": float(min(losses))}
        rows.append({**row, "name": best["name"]})
    if len(rows) < 2:
        raise ScalingError(f"curves: {len(rows)} FLOP levels have a winner between smaller and larger models; need 2")
    column = lambda key: np.array([r[key] for r in rows])
    return {**fit_power_laws(column("flops"), column("params"), column("tokens")), "levels": rows}


def _curve(curves: Curves, mask: np.ndarray) -> dict:
    order = np.argsort(curves.flops[mask])
    return {
        "name": str(curves.name[mask][0]),
        "params": float(curves.params[mask][0]),
        "log_flops": np.log(curves.flops[mask][order]),
        "log_tokens": np.log(curves.tokens[mask][order]),
        "loss": curves.loss[mask][order],
    }


# --- bootstrap --------------------------------------------------------------------------------------------------------


def bootstrap(runs: Runs, law: dict, samples: int = 100, seed: int = 0, percentiles=(5.0, 95.0)) -> dict:
    """Percentile intervals of approach 2's a, b and approach 3's alpha, beta over resampled runs.

    Runs are resampled with replacement within each isoFLOP group, so every parabola keeps its number of runs.
    Approach 3 refits start from the full-data optimum `law` (and two nearby exponents), not the whole grid.
    A resample whose fit fails (e.g. fewer than 3 distinct params in a group) is dropped; `ok` counts the rest.
    """
    rng = np.random.default_rng(seed)
    groups = [idx for _, idx in isoflop_groups(runs)]
    theta = _theta(law)
    starts = np.stack([theta, theta * [1, 1, 1, 0.8, 0.8], theta * [1, 1, 1, 1.25, 1.25]])
    draws = []
    for _ in range(samples):
        sample = runs.take(np.concatenate([rng.choice(idx, size=len(idx)) for idx in groups]))
        try:
            two, three = fit_approach2(sample), fit_approach3(sample, starts=starts, refine=None)
        except ScalingError:
            continue
        draws.append((two["a"], two["b"], three["alpha"], three["beta"]))
    draws = np.array(draws).reshape(-1, 4)
    interval = lambda j: [float(v) for v in np.percentile(draws[:, j], percentiles)] if len(draws) > 1 else None
    return {
        "samples": samples,
        "ok": len(draws),
        "seed": seed,
        "percentiles": [float(p) for p in percentiles],
        "approach2": {"a": interval(0), "b": interval(1)},
        "approach3": {"alpha": interval(2), "beta": interval(3)},
    }


# --- the whole fit ----------------------------------------------------------------------------------------------------


def fit_runs(runs: Runs, curves: Curves | None = None, samples: int = 100, seed: int = 0) -> dict:
    """Every approach on runs held in memory: the dict that fit.json holds. Seeds of one model are averaged first
    (`average_repeats`); `seeds` reports how much they scatter."""
    spread = seed_spread(runs)
    if curves is not None:
        curves = average_curves(curves, runs)
    runs, count = average_repeats(runs), len(runs)
    two = fit_approach2(runs)
    three = fit_approach3(runs)
    per_token = fit_per_token(runs)
    budgets = frontier_budgets(np.array([b["flops"] for b in two["budgets"]]))
    one, skipped = None, None
    if curves is not None:
        try:
            one = fit_approach1(curves)
        except ScalingError as e:  # optional: the curves may not cross enough FLOP levels with an interior winner
            skipped = str(e)
    return {
        "runs": count,
        "points": len(runs),
        "seeds": spread,
        "approach1": one,
        "approach1_skipped": skipped,
        "approach2": two,
        "approach3": three,
        "bootstrap": bootstrap(runs, three, samples, seed) if samples > 0 else None,
        "flops_per_token": {"formula": "6N + c N^q", **dataclasses.asdict(per_token)},
        "optimal": optimal_frontier(three, budgets, per_token),
    }


def fit(
    runs_csv: str | pathlib.Path,
    out_dir: str | pathlib.Path,
    curves: str | pathlib.Path | None = None,
    samples: int = 100,
    seed: int = 0,
) -> dict:
    """Fits runs.csv (and curves: `curves`, else a curves.csv beside it, if any); writes fit.json and PLOTS."""
    runs_csv, out_dir = pathlib.Path(runs_csv), pathlib.Path(out_dir)
    blocking = next((p for p in (out_dir, *out_dir.parents) if p.exists()), None)  # checked before fitting
    if blocking is not None and not blocking.is_dir():
        raise ScalingError(f"--out={str(out_dir)!r}: {blocking} is a file, not a directory; choose another --out")
    runs = load_runs(runs_csv)
    if curves is None and (runs_csv.parent / "curves.csv").is_file():
        curves = runs_csv.parent / "curves.csv"
    result = fit_runs(runs, load_curves(curves, runs) if curves is not None else None, samples, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "fit.json").write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    plot_isoflops(runs, result["approach2"], out_dir / "isoflops.png")
    runs = average_repeats(runs)
    plot_frontier(result, out_dir / "frontier.png")
    plot_contours(runs, result["approach3"], out_dir / "contours.png", fit_per_token(runs))
    return result


# --- backtest: would the fit have predicted the larger budgets? ------------------------------------------------------


def backtest(runs: Runs) -> list[dict]:
    """Fits on the k smallest isoFLOP budgets (k = 2 .. all but one) and predicts the loss at the optimum of every
    larger one, as a predict-then-verify run would: approach 3's frontier, approach 2's power law and its line in
    ln C. The target is that budget's own parabola minimum. One row per (k, held-out budget), with relative errors;
    budgets are named by their FLOPs (`fitted_on`, `flops`) and by their label (`budget`)."""
    runs = average_repeats(runs)
    groups = isoflop_groups(runs)
    if len(groups) < 3:
        raise ScalingError(f"a backtest needs runs at 3 or more budgets; found {len(groups)}")
    per_token = fit_per_token(runs)
    targets = [fit_isoflop(label, runs.take(idx), per_token) for label, idx in groups]
    rows = []
    for k in range(2, len(groups)):
        seen = runs.take(np.concatenate([idx for _, idx in groups[:k]]))
        two, three = fit_approach2(seen), fit_approach3(seen)
        for target in targets[k:]:
            (frontier,) = optimal_frontier(three, [target["flops"]], fit_per_token(seen))
            predicted = {
                "approach3": frontier["loss"],
                "approach2": float(optimal_loss(two, target["flops"])),
                "approach2_ln": float(optimal_loss_ln(two, target["flops"])),
            }
            rows.append(
                {
                    "fitted_on": [t["flops"] for t in targets[:k]],
                    "budget": str(target["budget"]),
                    "flops": target["flops"],
                    "loss": target["loss"],
                    "predicted": predicted,
                    "error": {key: value / target["loss"] - 1.0 for key, value in predicted.items()},
                }
            )
    return rows


def backtest_table(rows: list[dict]) -> str:
    """Markdown: one line per held-out budget, the three predictions with their errors against its minimum."""
    lines = [
        "| fitted on | predicts | observed minimum | approach 3 | approach 2, C^c | approach 2, ln C |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        cells = [
            f"{row['predicted'][k]:.4f} ({row['error'][k]:+.1%})" for k in ("approach3", "approach2", "approach2_ln")
        ]
        fitted = ", ".join(f"{flops:.3g}" for flops in row["fitted_on"])
        lines.append(f"| {fitted} | {row['flops']:.3g} | {row['loss']:.4f} | {' | '.join(cells)} |")
    return "\n".join(lines)


# --- plots (matplotlib's Figure renders PNGs with Agg, without pyplot or a display) --------------------------------


def _colors(n: int) -> list:
    return list(matplotlib.colormaps["viridis"](np.linspace(0.0, 0.9, n)))


def plot_isoflops(runs: Runs, approach2: dict, path: str | pathlib.Path) -> None:
    """Loss vs params per budget, with each fitted parabola and its minimum; with several seeds per model, their
    mean (the point the fit uses) and each seed's own loss as a small open circle."""
    fig = Figure(figsize=(7, 5))
    ax = fig.subplots()
    points = average_repeats(runs)
    if points is not runs:
        for (_, idx), color in zip(isoflop_groups(runs), _colors(len(approach2["budgets"]))):
            ax.scatter(runs.params[idx], runs.loss[idx], s=10, facecolors="none", edgecolors=color, linewidths=0.6)
    runs = points
    groups = isoflop_groups(runs)
    for (_, idx), budget, color in zip(groups, approach2["budgets"], _colors(len(groups))):
        x = np.linspace(np.log(runs.params[idx]).min(), np.log(runs.params[idx]).max(), 100)
        ax.scatter(runs.params[idx], runs.loss[idx], color=color, s=14)
        ax.plot(np.exp(x), np.polyval(budget["parabola_ln_params"], x), color=color, label=f"C={budget['flops']:.2g}")
        ax.scatter([budget["params"]], [budget["loss"]], color=color, marker="*", s=120, edgecolor="black")
    ax.set(xscale="log", xlabel="parameters N", ylabel="loss", title="isoFLOP curves (approach 2)")
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=120, bbox_inches="tight")


def plot_frontier(result: dict, path: str | pathlib.Path) -> None:
    """N_opt(C) and D_opt(C), log-log: each approach's points and power law."""
    fig = Figure(figsize=(11, 4.5))
    axes = fig.subplots(1, 2)
    optimal = result["optimal"]
    flops = np.array([row["flops"] for row in optimal])
    fitted = (
        ("approach 1", result["approach1"], "levels", "tab:green"),
        ("approach 2", result["approach2"], "budgets", "tab:blue"),
    )
    for ax, quantity, exponent, coefficient in zip(axes, ("params", "tokens"), ("a", "b"), ("k_N", "k_D")):
        for label, approach, points, color in fitted:
            if approach is None:
                continue
            xs, ys = [p["flops"] for p in approach[points]], [p[quantity] for p in approach[points]]
            ax.scatter(xs, ys, color=color, s=14)
            law = approach[coefficient] * flops ** approach[exponent]
            ax.plot(flops, law, color=color, label=f"{label}: C^{approach[exponent]:.3f}")
        three, measured = result["approach3"], (result.get("flops_per_token") or {}).get("c")
        label = "approach 3 (FLOPs per token of the runs)" if measured else f"approach 3: C^{three[exponent]:.3f}"
        ax.plot(flops, [row[quantity] for row in optimal], "k--", label=label)
        ax.set(xscale="log", yscale="log", xlabel="FLOPs C", ylabel=f"optimal {quantity}")
        ax.legend(fontsize="small")
    fig.savefig(path, dpi=120, bbox_inches="tight")


def plot_contours(runs: Runs, law: dict, path: str | pathlib.Path, per_token: PerToken = PerToken()) -> None:
    """Loss contours of the parametric fit over (N, D), with the runs, their isoFLOP lines and the frontier."""
    fig = Figure(figsize=(7, 5.5))
    ax = fig.subplots()
    n_grid = np.geomspace(runs.params.min() / 3, runs.params.max() * 3, 200)
    d_grid = np.geomspace(runs.tokens.min() / 3, runs.tokens.max() * 3, 200)
    loss = parametric_loss(law, n_grid[None, :], d_grid[:, None])
    levels = np.geomspace(loss.min(), np.percentile(loss, 90), 14)
    contours = ax.contour(n_grid, d_grid, loss, levels=levels, cmap="viridis_r", linewidths=0.8)
    ax.clabel(contours, fontsize="x-small", fmt="%.2f")
    groups = isoflop_groups(runs)
    for (_, idx), color in zip(groups, _colors(len(groups))):
        ax.plot(n_grid, _geomean(runs.flops[idx]) / per_token(n_grid), color=color, lw=0.6, ls=":")
    shade = {"cmap": "viridis_r", "vmin": levels[0], "vmax": levels[-1]}
    ax.scatter(runs.params, runs.tokens, c=runs.loss, **shade, edgecolor="black", s=18, zorder=3)
    corners = per_token(n_grid[[0, -1]]) * d_grid[[0, -1]]
    frontier = optimal_frontier(law, np.geomspace(corners[0], corners[1], 50), per_token)
    frontier_n, frontier_d = [r["params"] for r in frontier], [r["tokens"] for r in frontier]
    ax.plot(frontier_n, frontier_d, "r-", label="compute-optimal (approach 3)")
    ax.set(xscale="log", yscale="log", xlim=(n_grid[0], n_grid[-1]), ylim=(d_grid[0], d_grid[-1]))
    ax.set(xlabel="parameters N", ylabel="tokens D", title="L(N, D) = E + A/N^alpha + B/D^beta")
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=120, bbox_inches="tight")


# --- report and CLI ---------------------------------------------------------------------------------------------------


def _exponent(value: float, interval: list[float] | None) -> str:
    return f"{value:.3f}" + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "")


def summary(result: dict, rows: int = 5) -> str:
    """A few readable lines: exponents with their bootstrap intervals, the parametric law, some optimal budgets."""
    boot = result["bootstrap"]
    interval = lambda approach, key: boot[approach][key] if boot else None
    one, two, three = result["approach1"], result["approach2"], result["approach3"]
    if boot:
        lo, hi = boot["percentiles"]
        lines = [f"{result['runs']} runs; intervals: [{lo:g}%, {hi:g}%] over {boot['ok']} bootstrap resamples"]
    else:
        lines = [f"{result['runs']} runs; no bootstrap"]
    if result.get("seeds"):
        seeds = result["seeds"]
        low, high = seeds["seeds_per_point"]
        per = f"{low}" if low == high else f"{low}-{high}"
        lines.append(
            f"seeds averaged: {seeds['runs']} runs -> {seeds['points']} models ({per} seeds each); "
            f"seeds of one model scatter by {seeds['loss_std']:.4f} (pooled std of the final loss)"
        )
    if one is None and result.get("approach1_skipped"):
        lines.append(f"approach 1 skipped: {result['approach1_skipped']}")
    if one is not None:
        lines.append(
            f"approach 1 ({len(one['levels'])} FLOP levels): N_opt ~ C^{one['a']:.3f}, D_opt ~ C^{one['b']:.3f}"
        )
    a, b = _exponent(two["a"], interval("approach2", "a")), _exponent(two["b"], interval("approach2", "b"))
    lines.append(
        f"approach 2 ({len(two['budgets'])} budgets): N_opt ~ C^{a}, D_opt ~ C^{b}, L_opt ~ C^{two['loss_exponent']:.4f}"
    )
    if "loss_ln_slope" in two:
        lines.append(f"            or L_opt = {two['loss_ln_intercept']:.4g} {two['loss_ln_slope']:+.4f} ln C")
    alpha = _exponent(three["alpha"], interval("approach3", "alpha"))
    beta = _exponent(three["beta"], interval("approach3", "beta"))
    lines.append(f"approach 3: L = {three['E']:.3f} + {three['A']:.4g}/N^{alpha} + {three['B']:.4g}/D^{beta}")
    lines.append(f"            N_opt ~ C^{three['a']:.3f}, D_opt ~ C^{three['b']:.3f} as C = 6ND")
    per_token = result.get("flops_per_token") or {}
    if per_token.get("c"):
        lines.append(
            f"FLOPs per token from the runs: 6N + {per_token['c']:.4g} N^{per_token['q']:.3f} (the optima below)"
        )
    lines.append(f"{'FLOPs':>10} {'params':>10} {'tokens':>10} {'tokens/param':>12} {'loss':>7}")
    optimal = result["optimal"]
    for i in np.unique(np.linspace(0, len(optimal) - 1, rows).round().astype(int)):
        r = optimal[i]
        ratio = r["tokens"] / r["params"]
        lines.append(f"{r['flops']:10.3g} {r['params']:10.3g} {r['tokens']:10.3g} {ratio:12.1f} {r['loss']:7.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.scaling", description="Chinchilla scaling-law fits over finished runs"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    fit_cmd = commands.add_parser("fit", help="fit runs.csv; write fit.json and plots to --out")
    fit_cmd.add_argument("runs_csv", help="runs with columns params, tokens, loss [, name, flops, budget]")
    fit_cmd.add_argument("--out", required=True, help="directory for fit.json and the PNGs")
    fit_cmd.add_argument(
        "--curves", help="name, step, tokens, flops, loss per eval; default: curves.csv beside runs_csv"
    )
    fit_cmd.add_argument("--bootstrap", type=int, default=100, help="resamples for the exponents' intervals (0: none)")
    fit_cmd.add_argument("--seed", type=int, default=0)
    back_cmd = commands.add_parser(
        "backtest", help="fit on the smaller budgets, predict the larger ones' optimal loss; print a markdown table"
    )
    back_cmd.add_argument("runs_csv", help="isoFLOP runs at 3 or more budgets")
    back_cmd.add_argument("--out", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    try:
        if args.command == "backtest":
            rows = backtest(load_runs(args.runs_csv))
        else:
            result = fit(args.runs_csv, args.out, args.curves, args.bootstrap, args.seed)
    except ScalingError as e:
        fail(str(e))
    if args.command == "backtest":
        print(backtest_table(rows))
        if args.out:
            pathlib.Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
            print(f"wrote {args.out}")
        return
    print(summary(result))
    print(f"wrote {pathlib.Path(args.out) / 'fit.json'}, {', '.join(PLOTS)}")


if __name__ == "__main__":
    main()
