"""Scaling-law fits recover a known law from noisy synthetic runs; the CLI writes fit.json and plots, or fails in one
line with exit code 2."""

from __future__ import annotations

import csv
import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

from experiments import scaling
from tests.conftest import REPO

# Chinchilla's published fit (Hoffmann et al. 2022, approach 3), the law the synthetic runs are drawn from.
TRUE = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
BUDGETS = np.geomspace(1e17, 1e20, 4)


def true_law() -> dict:
    alpha, beta = TRUE["alpha"], TRUE["beta"]
    g = (alpha * TRUE["A"] / (beta * TRUE["B"])) ** (1 / (alpha + beta))
    return {**TRUE, "a": beta / (alpha + beta), "b": alpha / (alpha + beta), "G": g}


def true_optimal_params(flops: float) -> float:
    return scaling.optimal_frontier(true_law(), [flops])[0]["params"]


def synthetic_runs(per_budget: int = 9, sigma: float = 0.003, seed: int = 0) -> scaling.Runs:
    """An isoFLOP design: per budget, sizes log-spaced over a decade either side of the optimum, D = C / 6N."""
    rng = np.random.default_rng(seed)
    params = np.concatenate([true_optimal_params(c) * np.logspace(-1, 1, per_budget) for c in BUDGETS])
    flops = np.repeat(BUDGETS, per_budget)
    tokens = flops / (6 * params)
    loss = scaling.parametric_loss(TRUE, params, tokens) * np.exp(rng.normal(0, sigma, params.size))
    return scaling.Runs(params=params, tokens=tokens, loss=loss, budget=[f"{c:.3g}" for c in flops])


def synthetic_curves(sizes: int = 16, points: int = 60) -> scaling.Curves:
    """Each model's curve follows the law as if every point were a finished run, from 1e16 to 1e21 FLOPs."""
    params = np.repeat(np.geomspace(3e6, 3e10, sizes), points)
    tokens = np.concatenate([np.geomspace(1e16 / (6 * n), 1e21 / (6 * n), points) for n in params[::points]])
    names = np.repeat([f"m{i}" for i in range(sizes)], points)
    loss = scaling.parametric_loss(TRUE, params, tokens)
    return scaling.Curves(names, params, tokens, 6 * params * tokens, loss)


@pytest.fixture(scope="module")
def runs() -> scaling.Runs:
    return synthetic_runs()


@pytest.fixture(scope="module")
def law(runs) -> dict:
    return scaling.fit_approach3(runs)


def test_approach3_recovers_exponents_and_the_optimal_size_far_out(law):
    assert law["alpha"] == pytest.approx(TRUE["alpha"], abs=0.02)
    assert law["beta"] == pytest.approx(TRUE["beta"], abs=0.02)
    far = 100 * BUDGETS[-1]
    assert true_optimal_params(far) == pytest.approx(scaling.optimal_frontier(law, [far])[0]["params"], rel=0.1)


def test_optimal_frontier_spends_the_budget_and_beats_its_neighbours(law):
    (row,) = scaling.optimal_frontier(law, [1e21])
    assert 6 * row["params"] * row["tokens"] == pytest.approx(1e21)
    for scale in (0.8, 1.25):
        n = row["params"] * scale
        assert scaling.parametric_loss(law, n, 1e21 / (6 * n)) > row["loss"]


def test_flops_per_token_come_from_the_runs_and_the_frontier_spends_them(law):
    """Runs that report the model's own FLOPs (6N plus a head and attention term) move every optimum; it must still
    be the best N on the budget line, as a brute-force scan of L(N, C / F(N)) over a dense grid of N finds it."""
    c, q = 6 * 4096.0, 0.4  # e.g. an output head's 6 * vocab * d_model with d_model ~ N^0.4
    n = np.geomspace(1e5, 1e8, 12)
    tokens = np.geomspace(1e9, 1e7, 12)
    runs = scaling.Runs(params=n, tokens=tokens, loss=np.ones(12), flops=(6 * n + c * n**q) * tokens)
    per_token = scaling.fit_per_token(runs)
    assert per_token.c == pytest.approx(c, rel=1e-6) and per_token.q == pytest.approx(q, rel=1e-6)
    assert scaling.fit_per_token(scaling.Runs(params=n, tokens=tokens, loss=np.ones(12))) == scaling.PerToken()

    for flops in (1e16, 1e19):
        (row,) = scaling.optimal_frontier(law, [flops], per_token)
        assert (6 * row["params"] + c * row["params"] ** q) * row["tokens"] == pytest.approx(flops)
        grid = np.geomspace(1e3, 1e10, 400_001)
        brute = grid[np.argmin(scaling.parametric_loss(law, grid, flops / (6 * grid + c * grid**q)))]
        assert row["params"] == pytest.approx(brute, rel=1e-3)
        (closed,) = scaling.optimal_frontier(law, [flops])  # C = 6ND: the same budget buys more tokens there
        assert row["loss"] > closed["loss"] and row["tokens"] < closed["tokens"]


def test_approach2_exponents_match_the_law(runs):
    two = scaling.fit_approach2(runs)
    assert two["a"] == pytest.approx(true_law()["a"], abs=0.03)
    assert two["a"] + two["b"] == pytest.approx(1.0, abs=1e-6)
    assert [b["runs"] for b in two["budgets"]] == [9] * len(BUDGETS)
    assert all(b["interior"] for b in two["budgets"])


def test_approach2_loss_law_follows_the_true_optimal_losses(runs):
    """L_opt = k_L C^c through the parabola minima, against the slope of the true law's optimal losses."""
    two = scaling.fit_approach2(runs)
    truth = [row["loss"] for row in scaling.optimal_frontier(true_law(), BUDGETS[[0, -1]])]
    slope = np.log(truth[1] / truth[0]) / np.log(BUDGETS[-1] / BUDGETS[0])
    assert two["loss_exponent"] == pytest.approx(slope, rel=0.05)
    # A parabola through sizes a decade either side of the optimum dips ~2% below the true (non-parabolic) minimum.
    assert scaling.optimal_loss(two, BUDGETS[-1]) == pytest.approx(truth[1], rel=0.03)


def test_approach2_line_in_ln_flops_through_minima_that_fall_linearly():
    """Minima placed exactly on L = 12 - 0.3 ln C (a per-budget parabola in ln N around a known N_opt): the line
    through the fitted minima recovers the slope and intercept, and extrapolates 4x beyond the largest budget."""
    budgets = np.array([1e12, 3e12, 1e13])
    x = np.linspace(-1.5, 1.5, 7)
    rows = [
        (c, 1e4 * (c / 1e12) ** 0.6 * np.exp(xi), 12.0 - 0.3 * np.log(c) + 0.1 * xi**2) for c in budgets for xi in x
    ]
    flops, params, loss = (np.array(col) for col in zip(*rows))
    runs = scaling.Runs(params=params, tokens=flops / (6 * params), loss=loss, flops=flops, budget=flops)
    two = scaling.fit_approach2(runs)
    assert two["loss_ln_slope"] == pytest.approx(-0.3, rel=1e-6)
    assert two["loss_ln_intercept"] == pytest.approx(12.0, rel=1e-6)
    assert scaling.optimal_loss_ln(two, 4e13) == pytest.approx(12.0 - 0.3 * np.log(4e13), rel=1e-6)
    # The power law through the same minima bends away from the line: it is the wrong form for such data.
    assert scaling.optimal_loss(two, 4e13) > scaling.optimal_loss_ln(two, 4e13) + 0.01


def test_approach2_groups_by_flops_without_a_budget_column(runs):
    unlabelled = scaling.Runs(params=runs.params, tokens=np.round(runs.tokens), loss=runs.loss)
    assert scaling.fit_approach2(unlabelled)["a"] == pytest.approx(scaling.fit_approach2(runs)["a"], abs=1e-4)


def test_approach1_lower_envelope_finds_the_exponents():
    one = scaling.fit_approach1(synthetic_curves())
    assert one["a"] == pytest.approx(true_law()["a"], abs=0.03)
    assert one["b"] == pytest.approx(true_law()["b"], abs=0.03)


def test_bootstrap_intervals_are_ordered_and_near_the_truth(runs, law):
    boot = scaling.bootstrap(runs, law, samples=20, seed=1)
    assert boot["ok"] == 20
    for approach, key, truth in [("approach2", "a", true_law()["a"]), ("approach3", "alpha", TRUE["alpha"])]:
        lo, hi = boot[approach][key]
        assert lo <= hi and lo - 0.03 < truth < hi + 0.03


def write_csv(path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_runs_csv(path, runs: scaling.Runs, columns=("name", "params", "tokens", "loss", "budget")) -> None:
    write_csv(path, [{c: getattr(runs, c)[i] for c in columns} for i in range(len(runs))])


def run_cli(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "experiments.scaling", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)


def test_cli_writes_fit_json_and_plots(tmp_path, runs):
    write_runs_csv(tmp_path / "runs.csv", runs, columns=("params", "tokens", "loss", "budget"))
    out = tmp_path / "fit"
    done = run_cli("fit", str(tmp_path / "runs.csv"), "--out", str(out), "--bootstrap", "5")
    assert done.returncode == 0, done.stderr
    assert "approach 3" in done.stdout
    result = json.loads((out / "fit.json").read_text())
    assert {"a", "b", "k_N", "k_D", "budgets"} <= set(result["approach2"])
    assert {"E", "A", "B", "alpha", "beta"} <= set(result["approach3"])
    assert result["approach1"] is None and result["bootstrap"]["ok"] == 5
    assert all(set(row) == {"flops", "params", "tokens", "loss"} for row in result["optimal"])
    assert result["optimal"][-1]["flops"] == pytest.approx(1000 * BUDGETS[-1], rel=1e-3)
    for plot in scaling.PLOTS:
        assert (out / plot).stat().st_size > 0


def test_backtest_predicts_each_larger_budget_from_the_smaller_ones(tmp_path, runs):
    """Runs drawn from a known law with a floor E: approach 3 fitted on the smaller budgets lands near the true law's
    optimal loss at the larger ones (an independent reference), closer than approach 2's floorless forms, which
    extrapolate the not-yet-flattening minima; each row's target is that budget's own parabola minimum."""
    rows = scaling.backtest(runs)
    labels = [f"{c:.3g}" for c in BUDGETS]
    assert [(row["fitted_on"], row["budget"]) for row in rows] == [
        (pytest.approx(BUDGETS[:2]), labels[2]),
        (pytest.approx(BUDGETS[:2]), labels[3]),
        (pytest.approx(BUDGETS[:3]), labels[3]),
    ]
    for row in rows:
        (truth,) = scaling.optimal_frontier(true_law(), [row["flops"]])
        assert row["predicted"]["approach3"] == pytest.approx(truth["loss"], rel=0.015)
        assert abs(row["error"]["approach3"]) < min(abs(row["error"]["approach2"]), abs(row["error"]["approach2_ln"]))
        assert row["error"]["approach2_ln"] == pytest.approx(row["predicted"]["approach2_ln"] / row["loss"] - 1)
    (truth,) = scaling.optimal_frontier(true_law(), [BUDGETS[3]])  # from three budgets: within 0.5%
    assert rows[-1]["predicted"]["approach3"] == pytest.approx(truth["loss"], rel=0.005)
    held_out = runs.take(np.flatnonzero(runs.budget == labels[3]))
    assert rows[-1]["loss"] == pytest.approx(scaling.fit_isoflop(labels[3], held_out)["loss"])

    write_runs_csv(tmp_path / "runs.csv", runs, columns=("params", "tokens", "loss", "budget"))
    done = run_cli("backtest", str(tmp_path / "runs.csv"), "--out", str(tmp_path / "backtest.json"))
    assert done.returncode == 0, done.stderr
    assert "| 1e+17, 1e+18 | 1e+19 |" in done.stdout
    assert len(json.loads((tmp_path / "backtest.json").read_text())) == 3

    two_budgets = runs.take(np.flatnonzero(np.isin(runs.budget, labels[:2])))
    with pytest.raises(scaling.ScalingError, match="3 or more budgets; found 2"):
        scaling.backtest(two_budgets)


def test_curves_csv_beside_runs_csv_gives_approach1(tmp_path, runs):
    """Each isoFLOP run's own training curve, as a sweep writes them: evals from 1% of its tokens to the end."""
    named = dataclasses.replace(runs, name=[f"run{i}" for i in range(len(runs))])
    write_runs_csv(tmp_path / "runs.csv", named)
    points = []
    for name, params, tokens in zip(named.name, named.params, named.tokens):
        for step, seen in enumerate(np.geomspace(tokens / 100, tokens, 20), start=1):
            loss = scaling.parametric_loss(TRUE, params, seen)
            points.append({"name": name, "step": step, "tokens": seen, "flops": 6 * params * seen, "loss": loss})
    write_csv(tmp_path / "curves.csv", points)
    result = scaling.fit(tmp_path / "runs.csv", tmp_path / "fit", samples=0)
    assert result["approach1"]["a"] == pytest.approx(true_law()["a"], abs=0.05)
    assert result["bootstrap"] is None


def test_seeds_of_one_model_are_averaged_into_one_point(tmp_path, runs):
    """Three seeds per model (names NAME,seed=S as sweeps write them): the fit sees each model once, at the mean of
    its seeds' losses (computed here with NumPy), so it equals the fit of those means; the seeds' scatter is their
    pooled standard deviation; the curves are averaged per model at each token count."""
    rng = np.random.default_rng(3)
    seeds, n = 3, len(runs)
    noise = rng.normal(0, 0.02, (seeds, n))
    names = [f"run{i},seed={s}" for s in range(seeds) for i in range(n)]
    repeated = scaling.Runs(
        params=np.tile(runs.params, seeds),
        tokens=np.tile(runs.tokens, seeds),
        loss=(runs.loss * (1 + noise)).ravel(),
        budget=np.tile(runs.budget, seeds),
        name=names,
    )
    means = dataclasses.replace(runs, loss=(runs.loss * (1 + noise)).mean(axis=0), name=[f"run{i}" for i in range(n)])
    points = scaling.average_repeats(repeated)
    assert len(points) == n and points.name.tolist() == means.name.tolist()
    np.testing.assert_allclose(points.loss, means.loss, rtol=1e-12)
    np.testing.assert_allclose(points.params, means.params, rtol=1e-12)
    assert scaling.average_repeats(means) is means  # nothing to average

    fitted, reference = scaling.fit_runs(repeated, samples=0), scaling.fit_runs(means, samples=0)
    assert fitted["runs"] == seeds * n and fitted["points"] == n and reference["seeds"] is None
    assert fitted["approach2"]["a"] == pytest.approx(reference["approach2"]["a"], rel=1e-9)
    assert fitted["approach3"]["alpha"] == pytest.approx(reference["approach3"]["alpha"], rel=1e-6)
    pooled = np.sqrt(np.mean(np.var((runs.loss * (1 + noise)), axis=0, ddof=1)))
    assert fitted["seeds"] == {
        "runs": seeds * n,
        "points": n,
        "seeds_per_point": [3, 3],
        "loss_std": pytest.approx(pooled),
    }
    backtest = scaling.backtest(repeated)
    assert [row["loss"] for row in backtest] == pytest.approx([row["loss"] for row in scaling.backtest(means)])

    steps = np.array([0.25, 0.5, 1.0])
    curves = scaling.Curves(
        name=np.repeat(names, len(steps)),
        params=np.repeat(repeated.params, len(steps)),
        tokens=np.outer(repeated.tokens, steps).ravel(),
        flops=np.outer(6 * repeated.params * repeated.tokens, steps).ravel(),
        loss=np.outer(repeated.loss, 1 / steps).ravel(),
    )
    averaged = scaling.average_curves(curves, repeated)
    assert len(averaged.loss) == n * len(steps)
    at = (averaged.name == "run5") & (averaged.tokens == runs.tokens[5] * 0.5)
    assert averaged.loss[at] == pytest.approx(2 * means.loss[5])

    write_runs_csv(tmp_path / "runs.csv", repeated)
    done = run_cli("fit", str(tmp_path / "runs.csv"), "--out", str(tmp_path / "fit"), "--bootstrap", "0")
    assert done.returncode == 0, done.stderr
    assert f"seeds averaged: {seeds * n} runs -> {n} models (3 seeds each)" in done.stdout


@pytest.mark.parametrize(
    "header, row, message",
    [
        (("params", "tokens"), (1e8, 1e9), "missing required column 'loss'"),
        (("params", "tokens", "loss"), (1e8, -5, 3.0), "tokens='-5' is not a positive number"),
        (("params", "tokens", "loss", "budget"), (1e8, 1e9, 3.0, "1e18"), "budget 1e18: 1 distinct params"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, header, row, message):
    write_csv(tmp_path / "runs.csv", [dict(zip(header, row))])
    done = run_cli("fit", str(tmp_path / "runs.csv"), "--out", str(tmp_path / "fit"))
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and message in done.stderr and done.stderr.count("\n") == 1


def test_missing_file_is_a_scaling_error(tmp_path):
    with pytest.raises(scaling.ScalingError, match="no such file"):
        scaling.load_runs(tmp_path / "nope.csv")


def test_a_parabola_whose_minimum_is_below_zero_loss_is_rejected():
    """Three runs (N = 1, e, e^2) on loss = 0.01 (ln N - 20)^2 - 2: all positive, but the vertex (N = e^20) sits at
    loss -2, where no power law can go; the fit refuses it (a bootstrap resample then drops it) instead of taking
    log(-2)."""
    x = np.array([0.0, 1.0, 2.0])
    runs = scaling.Runs(params=np.exp(x), tokens=np.full(3, 1e9), loss=0.01 * (x - 20) ** 2 - 2)
    assert np.all(runs.loss > 0)
    with pytest.raises(scaling.ScalingError, match="minimum is at loss <= 0"):
        scaling.fit_isoflop("1e18", runs)


def test_runs_whose_flops_are_not_6nd_need_their_budget_or_flops_to_be_grouped(runs):
    """A sweep's runs spend their budget by the model's own count (attention, the output head): 6ND then differs
    across one budget's runs, so without a `budget` or `flops` column approach 2 cannot tell which runs share one."""
    flops = np.repeat(BUDGETS, len(runs) // len(BUDGETS))
    tokens = flops / (6 * runs.params + 3e9)  # a fixed 3 GFLOP per token on top of 6N
    real = scaling.Runs(params=runs.params, tokens=tokens, loss=runs.loss, flops=flops)
    labelled = scaling.Runs(params=runs.params, tokens=tokens, loss=runs.loss, flops=flops, budget=runs.budget)
    assert scaling.fit_approach2(real)["a"] == pytest.approx(scaling.fit_approach2(labelled)["a"], abs=1e-6)
    with pytest.raises(scaling.ScalingError, match=r"no `budget` column.*give runs.csv the `budget`"):
        scaling.fit_approach2(scaling.Runs(params=runs.params, tokens=tokens, loss=runs.loss))
