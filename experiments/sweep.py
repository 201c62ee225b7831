"""Sweeps: plan configs, run them (locally or on SLURM), collect results, report ablations.

    python -m experiments.sweep plan experiments/sweeps/isoflop_stdlib.py --out sweeps/iso
    python -m experiments.sweep run sweeps/iso [--executor local|slurm] [--parallel N]
    python -m experiments.sweep collect sweeps/iso     # -> runs.csv, curves.csv
    python -m experiments.sweep report sweeps/iso      # ablations: eval/bpb mean +- std per variant (+ downstream)

A sweep file's `get_sweep()` returns a dict: `config` (a config file, optionally `path:arg`), `overrides`
({"group.field": value} for every run), and either `isoflop` (budgets, sizes, spread, tokens_per_param,
family, and optionally seeds: see experiments/plan.py) or `grid` ({"group.field": [values]}) with `seeds` (an
ablation). Several seeds of an isoFLOP sweep make runs NAME,seed=S; the fit averages them into one point per model.

Each run is a directory SWEEP_DIR/runs/NAME holding `planned.json` (its resolved config and what the
plan says about it); running it trains into that directory with the same code as train.py, so an
interrupted sweep resumes from each run's checkpoints and finished runs (`done.json`) are skipped.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import dataclasses
import importlib.util
import itertools
import json
import math
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

import numpy as np

from data.tokenizer import planned_vocab_size
from experiments.bootstrap import paired_bootstrap
from experiments.plan import Family, PlanError, Planned, plan_budget, plan_optimal, table
from model import flops_per_token, param_counts
from training.cli import where
from training.config import ConfigError, RunConfig, from_dict, resolve, with_vocab

RUNS_CSV = ("name", "params", "params_total", "tokens", "flops", "budget", "loss", "bpb")
CURVES_CSV = ("name", "step", "tokens", "flops", "loss", "bpb")


class SweepError(ValueError):
    """A sweep file, directory or flag that cannot be used (a one-line message)."""


# ----------------------------------------------------------------------------------------------- plan


def load_sweep(path: str) -> dict:
    spec = importlib.util.spec_from_file_location("sweep_file", path)
    if spec is None or not pathlib.Path(path).is_file():
        raise SweepError(f"{path}: no such sweep file")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # a syntax error or anything else the file raises: file:line: message
        raise SweepError(where(e)) from None
    if not hasattr(module, "get_sweep"):
        raise SweepError(f"{path}: defines no get_sweep()")
    try:
        sweep = module.get_sweep()
    except Exception as e:
        raise SweepError(where(e)) from None
    kinds = [k for k in ("isoflop", "grid") if k in sweep]
    if len(kinds) != 1:
        raise SweepError(
            f"{path}: get_sweep() must return exactly one of 'isoflop' or 'grid' (got {kinds or 'neither'})"
        )
    return sweep


def base_config(sweep: dict, overrides: dict | None = None):
    """The sweep's config file with its overrides (and `overrides`) applied, as a ConfigDict."""
    path, _, arg = sweep["config"].partition(":")
    spec = importlib.util.spec_from_file_location("sweep_config", path)
    if spec is None or not pathlib.Path(path).is_file():
        raise SweepError(f"config={sweep['config']!r}: no such config file")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        config = module.get_config(arg or None)
    except Exception as e:
        raise SweepError(f"config={sweep['config']!r}: {where(e)}") from None
    for key, value in {**sweep.get("overrides", {}), **(overrides or {})}.items():
        group, _, field = key.partition(".")
        if group not in config or field not in config[group]:
            raise SweepError(f"override {key!r}: not a config field (use group.field, e.g. model.d_model)")
        config[group][field] = value
    return config


def isoflop_base(sweep: dict) -> tuple[RunConfig, Family]:
    """An isoFLOP sweep's base run (vocabulary size from its tokenizer spec) and its shape family."""
    run = resolve(base_config(sweep))
    return with_vocab(run, planned_vocab_size(run.data.tokenizer)), Family(**sweep["isoflop"].get("family", {}))


def sized_run(run: RunConfig, planned: Planned) -> RunConfig:
    """`run` with the planned model shape and step count (warmup capped at a tenth of the steps)."""
    train = dataclasses.replace(
        run.train, steps=planned.steps, warmup_steps=min(run.train.warmup_steps, planned.steps // 10)
    )
    return dataclasses.replace(run, model=dataclasses.replace(run.model, **planned.model), train=train)


def seeded(name: str, run: RunConfig, seed: int | None) -> tuple[str, RunConfig]:
    """A run repeated with another `train.seed` (new initialisation, new data order) is named NAME,seed=S;
    `seed=None` keeps the run and its name as they are."""
    if seed is None:
        return name, run
    return f"{name},seed={seed}", dataclasses.replace(run, train=dataclasses.replace(run.train, seed=int(seed)))


def _seeds(value, where: str) -> list[int | None]:
    if value is None:
        return [None]
    if not (isinstance(value, (list, tuple)) and value and all(isinstance(s, int) for s in value)):
        raise SweepError(f"{where}={value!r}: must be a non-empty list of integer seeds, e.g. [0, 1, 2]")
    if len(set(value)) != len(value):
        raise SweepError(f"{where}={value!r}: a seed is repeated")
    return list(value)


def plan_isoflop(sweep: dict) -> list[tuple[str, RunConfig, dict]]:
    iso = sweep["isoflop"]
    run, family = isoflop_base(sweep)
    seeds = _seeds(iso.get("seeds"), "isoflop.seeds")
    planned = []
    for budget in iso["budgets"]:
        for p in plan_budget(
            run.model,
            family,
            float(budget),
            sizes=iso.get("sizes", 5),
            spread=iso.get("spread", 4.0),
            tokens_per_param=iso.get("tokens_per_param", 20.0),
            seq_len=run.data.seq_len,
            batch_size=run.train.batch_size,
        ):
            for seed in seeds:
                name, sized = seeded(p.name, sized_run(run, p), seed)
                planned.append((name, sized, {"budget": p.budget, **dataclasses.asdict(p), "seed": sized.train.seed}))
    return planned


def plan_grid(sweep: dict) -> list[tuple[str, RunConfig, dict]]:
    """The grid's product of values; the key "config" varies the config file itself (labelled by its name)."""
    grid, seeds = sweep["grid"], _seeds(sweep.get("seeds", [0]), "seeds")
    planned = []
    for values in itertools.product(*grid.values()):
        variant = dict(zip(grid, values))
        label = ",".join(
            f"config={pathlib.Path(v).stem}" if k == "config" else f"{k.split('.')[-1]}={v}" for k, v in variant.items()
        )
        fields = {k: v for k, v in variant.items() if k != "config"}
        run = resolve(base_config({**sweep, "config": variant.get("config", sweep["config"])}, fields))
        for seed in seeds:
            name, seeded_run = seeded(label.replace("/", "_"), run, seed)
            info = {"variant": variant, "label": label, "seed": seed, **cost(seeded_run)}
            planned.append((name, seeded_run, info))
    return planned


def cost(run: RunConfig) -> dict:
    """Steps, training tokens and FLOPs (the model's own count) of a run, as planned."""
    run = with_vocab(run, planned_vocab_size(run.data.tokenizer))
    tokens = run.train.steps * run.train.batch_size * run.data.seq_len
    return {
        "steps": run.train.steps,
        "tokens": tokens,
        "flops": float(tokens * flops_per_token(run.model, run.data.seq_len)),
    }


def plan_verification(
    sweep_file: str, fit_json: str, budget: float, out: pathlib.Path, seeds: list[int] | None = None
) -> dict:
    """Predict-then-verify: plans the one run of an isoFLOP sweep's family that the fitted law (approach 3 of
    `fit_json`) predicts is compute-optimal at `budget`, with the predicted eval loss in its planned.json: approach
    3's L(N, D) of that run (`predicted_loss`) and, when the fit has them, approach 2's loss at the budget as a power
    law (`predicted_loss_approach2`) and as a line in ln C (`predicted_loss_approach2_ln`).

    `seeds` (default: the sweep's isoflop.seeds, if any) plans that run once per seed, to be compared as a mean:
    `report` prints the predictions against it."""
    sweep = load_sweep(sweep_file)
    if "isoflop" not in sweep:
        raise SweepError(f"{sweep_file}: not an isoFLOP sweep")
    try:
        fitted = json.loads(pathlib.Path(fit_json).read_text())
        law = fitted["approach3"]
    except (OSError, KeyError) as e:
        raise SweepError(f"{fit_json}: no approach3 fit ({e})") from None
    seeds = _seeds(seeds if seeds is not None else sweep["isoflop"].get("seeds"), "seeds")
    run, family = isoflop_base(sweep)
    best, loss = plan_optimal(run.model, family, budget, law, seq_len=run.data.seq_len, batch_size=run.train.batch_size)
    sized = sized_run(run, best)
    info = {"budget": best.budget, **dataclasses.asdict(best), "predicted_loss": loss, "fit": str(fit_json)}
    two = fitted.get("approach2") or {}
    from experiments.scaling import optimal_loss, optimal_loss_ln

    if "k_L" in two:
        info["predicted_loss_approach2"] = float(optimal_loss(two, budget))
    if "loss_ln_slope" in two:
        info["predicted_loss_approach2_ln"] = float(optimal_loss_ln(two, budget))
    runs = [seeded(best.name, sized, seed) for seed in seeds]
    _check_replanned(out, runs)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(
        json.dumps({"file": sweep_file, "sweep": sweep, "verify": info}, indent=2, default=str) + "\n"
    )
    for name, seeded_run in runs:
        _write_planned(out, name, seeded_run, {**info, "seed": seeded_run.train.seed})
    return {"name": best.name, **info, "runs": [name for name, _ in runs]}


def _check_replanned(out: pathlib.Path, runs) -> None:
    for name, run, *_ in runs:
        existing = out / "runs" / name / "planned.json"
        if existing.exists() and json.loads(existing.read_text())["config"] != run.to_dict():
            raise SweepError(f"{existing}: already planned with another config; use a new --out")


def _write_planned(out: pathlib.Path, name: str, run: RunConfig, info: dict) -> None:
    run_dir = out / "runs" / name
    run_dir.mkdir(parents=True, exist_ok=True)
    entry = {**info, "name": name, "config": run.to_dict()}  # a seeded run is named NAME,seed=S, its model NAME
    (run_dir / "planned.json").write_text(json.dumps(entry, indent=2) + "\n")


def plan(sweep_file: str, out: pathlib.Path) -> list[dict]:
    """Writes SWEEP_DIR/sweep.json and one runs/NAME/planned.json per run; returns the rows planned."""
    sweep = load_sweep(sweep_file)
    planned = plan_isoflop(sweep) if "isoflop" in sweep else plan_grid(sweep)
    _check_replanned(out, planned)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps({"file": sweep_file, "sweep": sweep}, indent=2, default=str) + "\n")
    for name, run, info in planned:
        _write_planned(out, name, run, info)
    return [{**info, "name": name} for name, _, info in planned]


# ------------------------------------------------------------------------------------------------ run


def run_dirs(sweep_dir: pathlib.Path) -> list[pathlib.Path]:
    dirs = sorted(p.parent for p in (sweep_dir / "runs").glob("*/planned.json"))
    if not dirs:
        raise SweepError(
            f"{sweep_dir}: no planned runs (run `python -m experiments.sweep plan ... --out {sweep_dir}` first)"
        )
    return dirs


def longest_first(dirs: list[pathlib.Path]) -> list[pathlib.Path]:
    """Runs ordered by budget (planned FLOPs where there is none), then steps, largest first: with fewer slots than
    runs (`--parallel`), the long runs start at once instead of trailing behind the short ones at the end."""

    def size(d: pathlib.Path) -> tuple[float, int]:
        info = json.loads((d / "planned.json").read_text())
        return info.get("budget") or info.get("flops") or 0.0, info.get("steps") or 0

    return sorted(dirs, key=size, reverse=True)


def run_one(run_dir: str | pathlib.Path) -> dict:
    """Trains (or resumes) one planned run in its directory, then marks it done; what each executor runs."""
    from training.allocator import reuse_freed_memory

    reuse_freed_memory()  # before JAX starts, in the executors' fresh processes (training/allocator.py)
    from training.loop import train

    run_dir = pathlib.Path(run_dir)
    planned = json.loads((run_dir / "planned.json").read_text())
    result = train(from_dict(planned["config"]), run_dir)  # its lines and progress bar: the run's log.txt
    if result.get("preempted"):
        return result
    (run_dir / "done.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def share_tokenizer(sweep_dir: pathlib.Path, dirs: list[pathlib.Path]) -> None:
    """Runs with a `bpe:N` tokenizer would each train the same one on the same corpus: train it (and build
    the token store) once in the sweep directory and give every run a copy, which train() then reuses."""
    configs = [from_dict(json.loads((d / "planned.json").read_text())["config"]).data for d in dirs]
    specs = {(c.corpus, c.tokenizer, c.val_fraction, c.text_field) for c in configs}
    if len(specs) != 1 or not configs[0].tokenizer.startswith("bpe:"):
        return
    import data as data_lib

    print(f"training the shared {configs[0].tokenizer} tokenizer in {sweep_dir}", flush=True)
    data_lib.load(configs[0], sweep_dir)
    for d in dirs:
        if not (d / "tokenizer.json").exists():
            shutil.copyfile(sweep_dir / "tokenizer.json", d / "tokenizer.json")


PROGRESS_EVERY = 30.0  # seconds between a run's progress-bar lines in its log.txt and on the sweep's terminal


def _local(run_dir: pathlib.Path) -> int:
    """One run in its own process, as a cluster job would be; its output goes to run_dir/log.txt as it comes, and
    its progress bar also to this terminal (`relay`)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "experiments.sweep", "run-one", str(run_dir)]
    with open(run_dir / "log.txt", "a") as log:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        show = lambda line: print(f"  {run_dir.name}: {line}", flush=True)  # noqa: E731
        relay(iter(lambda: process.stdout.read1(1 << 16), b""), log, show)
        return process.wait()


def relay(chunks, log, show, every: float = PROGRESS_EVERY, clock=time.monotonic) -> None:
    """Writes a run's output (`chunks` of bytes) to `log` line by line as it arrives. A progress bar redraws itself
    after each carriage return: of its states, one per `every` seconds and the last become lines of `log` and go to
    `show`, so the log (and the terminal of a sweep running several runs at once) gets a line per interval, not one
    per step."""
    pending, bar, shown_at = "", "", -math.inf

    def line(text: str) -> None:
        log.write(text + "\n")
        log.flush()

    for chunk in chunks:
        pending += chunk.decode("utf-8", errors="replace")
        *parts, pending = re.split(r"([\r\n])", pending)  # text, separator, text, separator, ...
        for text, end in zip(parts[::2], parts[1::2]):
            text = text.rstrip()
            if not text:  # what clears a bar before a line is written
                continue
            if end == "\r":  # a state of the bar, redrawn by the next one
                bar = text
                if clock() - shown_at >= every:
                    line(text)
                    show(text)
                    shown_at = clock()
            elif bar and text.split(":")[0] == bar.split(":")[0]:  # the bar's last state, left on its line at close
                line(text)
                show(text)
                bar = ""
            else:
                line(text)
    if pending.strip():
        line(pending.rstrip())


def run(sweep_dir: pathlib.Path, executor: str = "local", parallel: int = 1, slurm: dict | None = None) -> dict:
    """Runs every planned run that is not done; returns {"done": [...], "failed": [...], "skipped": [...]}."""
    dirs = run_dirs(sweep_dir)
    todo = longest_first([d for d in dirs if not (d / "done.json").exists()])
    skipped = [d.name for d in dirs if d not in todo]
    print(
        f"{len(dirs)} runs: {len(skipped)} done already, {len(todo)} to run ({executor}, {parallel} at a time)",
        flush=True,
    )
    outcome = {"done": [], "failed": [], "skipped": skipped}
    share_tokenizer(sweep_dir, todo)
    start = time.perf_counter()

    def finished(run_dir: pathlib.Path, ok: bool) -> None:
        outcome["done" if ok else "failed"].append(run_dir.name)
        count = len(outcome["done"]) + len(outcome["failed"])
        status = "done" if ok else f"FAILED (see {run_dir / 'log.txt'})"
        print(f"[{count}/{len(todo)}] {run_dir.name}: {status}  ({time.perf_counter() - start:.0f}s)", flush=True)

    if executor == "local":
        with concurrent.futures.ThreadPoolExecutor(max_workers=parallel) as pool:
            futures = {pool.submit(_local, d): d for d in todo}
            for future in concurrent.futures.as_completed(futures):
                finished(futures[future], future.result() == 0)
    elif executor in ("slurm", "submitit-local"):
        import submitit

        cluster = "slurm" if executor == "slurm" else "local"
        submitter = submitit.AutoExecutor(folder=str(sweep_dir / "submitit"), cluster=cluster)
        submitter.update_parameters(**(slurm or {}))
        if cluster == "local":
            submitter.update_parameters(timeout_min=(slurm or {}).get("timeout_min", 60))
        jobs = [(d, submitter.submit(run_one, str(d))) for d in todo]
        for d, job in jobs:
            try:
                job.result()
                finished(d, True)
            except Exception as e:  # submitit re-raises the job's failure
                (d / "log.txt").write_text(str(e))
                finished(d, False)
    else:
        raise SweepError(f"--executor={executor!r}: allowed: local, slurm, submitit-local")
    return outcome


# -------------------------------------------------------------------------------------------- collect


def _metrics(run_dir: pathlib.Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def collect(sweep_dir: pathlib.Path) -> list[dict]:
    """Writes runs.csv (final eval of every finished run) and curves.csv (every eval) into the sweep dir."""
    rows, curves = [], []
    for run_dir in run_dirs(sweep_dir):
        if not (run_dir / "done.json").exists():
            continue
        planned = json.loads((run_dir / "planned.json").read_text())
        run = from_dict(json.loads((run_dir / "config.json").read_text()))  # as trained: the real vocabulary size
        counts = param_counts(run.model)
        per_token = flops_per_token(run.model, run.data.seq_len)
        tokens_per_step = run.train.batch_size * run.data.seq_len
        metrics = _metrics(run_dir)
        evals = [m for m in metrics if "eval/loss" in m]
        for m in evals:
            tokens = m["step"] * tokens_per_step
            curves.append(
                {
                    "name": run_dir.name,
                    "step": m["step"],
                    "tokens": tokens,
                    "flops": tokens * per_token,
                    "loss": m["eval/loss"],
                    "bpb": m["eval/bpb"],
                }
            )
        tokens = run.train.steps * tokens_per_step
        row = {
            "name": run_dir.name,
            "params": counts.active_non_embedding,  # what each token uses (MoE: below params_total)
            "params_total": counts.total,
            "tokens": tokens,
            "flops": tokens * per_token,
            "budget": planned.get("budget", ""),
            "loss": evals[-1]["eval/loss"],
            "bpb": evals[-1]["eval/bpb"],
            "seed": run.train.seed,
        }
        row.update({k: v for k, v in planned.items() if k.startswith("predicted_loss")})
        if "variant" in planned:
            row["label"] = planned["label"]
        row.update(downstream_aggregates(run_dir, metrics))
        rows.append(row)
    if not rows:
        raise SweepError(f"{sweep_dir}: no finished runs to collect")
    _write_csv(sweep_dir / "runs.csv", rows)
    _write_csv(sweep_dir / "curves.csv", curves)
    return rows


def downstream_aggregates(run_dir: pathlib.Path, metrics: list[dict]) -> dict[str, float]:
    """A run's latest downstream scores as runs.csv columns `<task>/<metric>`: the last metrics.jsonl record with
    `eval/<task>/<metric>` keys (the aggregates as the training hook logged them), else downstream.json (a
    per-document metric's mean, an aggregate-only one such as perplexity as it is); none without either."""
    for record in reversed(metrics):
        found = {k.removeprefix("eval/"): v for k, v in record.items() if k.startswith("eval/") and k.count("/") == 2}
        if found:
            return found
    path = run_dir / "downstream.json"
    if not path.exists():
        return {}
    found = {}
    for task, scores in json.loads(path.read_text()).get("tasks", {}).items():
        for metric, value in scores.items():
            if isinstance(value, dict):
                if value:
                    found[f"{task}/{metric}"] = float(np.mean([float(v) for v in value.values()]))
            elif value is not None:
                found[f"{task}/{metric}"] = float(value)
    return found


def _write_csv(path: pathlib.Path, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


# --------------------------------------------------------------------------------------------- report


def report(sweep_dir: pathlib.Path) -> str:
    """An ablation's eval/bpb mean +- std (over seeds) per variant as a markdown table, with a bar plot
    (report.png); or, for a `plan-optimal` sweep, its predictions against the observed eval loss (report.md).

    Where runs have a downstream.json (`train.eval_tasks`), the table gains each per-document task metric's mean
    per variant, and a second table sets each variant against the grid's first (`downstream_report`)."""
    rows = collect(sweep_dir)
    if any(key.startswith("predicted_loss") for key in rows[0]):
        text = verification_report(rows)
        (sweep_dir / "report.md").write_text(text + "\n")
        return text
    if "label" not in rows[0]:
        raise SweepError(f"{sweep_dir}: not an ablation (a grid sweep); fit an isoFLOP sweep with experiments.scaling")
    by_label: dict[str, list[float]] = {}
    for row in rows:
        by_label.setdefault(row["label"], []).append(row["bpb"])
    stats = {
        label: (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else math.nan, len(v))
        for label, v in by_label.items()
    }
    scores = per_document_scores(sweep_dir, rows)
    columns = sorted({metric for by_metric in scores.values() for metric in by_metric})
    lines = [
        "| variant | eval/bpb (mean +- std) | seeds |" + "".join(f" {c} |" for c in columns),
        "| --- | --- | --- |" + " --- |" * len(columns),
    ]
    for label, (mean, std, n) in sorted(stats.items(), key=lambda kv: kv[1][0]):
        spread = f"{std:.4f}" if n > 1 else "n/a"  # one seed has no spread to show
        runs = scores.get(label, {})
        means = [
            f"{np.mean([np.mean(list(r.values())) for r in runs[c]]):.4f}" if c in runs else "n/a" for c in columns
        ]
        lines.append(f"| {label} | {mean:.4f} +- {spread} | {n} |" + "".join(f" {m} |" for m in means))
    if columns:
        lines += ["", *downstream_report(sweep_dir, rows, scores, columns)]
    text = "\n".join(lines)
    (sweep_dir / "report.md").write_text(text + "\n")
    _bar_plot(stats, sweep_dir / "report.png")
    return text


def per_document_scores(sweep_dir: pathlib.Path, rows: list[dict]) -> dict[str, dict[str, list[dict[str, float]]]]:
    """label -> `task/metric` -> one {doc_id: score} per run of the variant whose downstream.json has that metric
    per document (the means over documents: acc, exact_match, ...; not aggregate-only ones such as perplexity)."""
    scores: dict[str, dict[str, list[dict[str, float]]]] = {}
    for row in rows:
        path = sweep_dir / "runs" / row["name"] / "downstream.json" if "name" in row else None
        if path is None or not path.exists():
            continue
        for task, metrics in json.loads(path.read_text()).get("tasks", {}).items():
            for metric, values in metrics.items():
                if isinstance(values, dict) and values:
                    run = {str(doc): float(v) for doc, v in values.items()}
                    scores.setdefault(row["label"], {}).setdefault(f"{task}/{metric}", []).append(run)
    return scores


def grid_order(sweep_dir: pathlib.Path) -> list[str]:
    """Every planned variant's label in the order plan_grid enumerates the grid (itertools.product of sweep.json's
    grid values), read back from sweep.json and each run's planned.json."""
    grid = json.loads((sweep_dir / "sweep.json").read_text())["sweep"]["grid"]
    variants = {}
    for run_dir in run_dirs(sweep_dir):
        planned = json.loads((run_dir / "planned.json").read_text())
        variants[planned["label"]] = planned["variant"]
    try:
        return sorted(variants, key=lambda label: tuple(grid[k].index(variants[label][k]) for k in grid))
    except (KeyError, ValueError):
        raise SweepError(f"{sweep_dir}: a run's planned variant is not a point of sweep.json's grid") from None


def downstream_report(sweep_dir: pathlib.Path, rows: list[dict], scores: dict, columns: list[str]) -> list[str]:
    """Each variant minus the baseline (the grid's first variant with finished runs) per task metric, with a 95%
    paired-bootstrap interval over the documents that every run of both variants scored (doc_ids matched; a run
    without that metric is left out); each document's score is first averaged over its variant's seeds
    (experiments/bootstrap.py)."""
    finished = {row["label"] for row in rows}
    planned = grid_order(sweep_dir)
    order = [label for label in planned if label in finished]
    baseline = order[0]
    which = "the grid's first variant" if baseline == planned[0] else "the grid's first variant with finished runs"
    lines = [
        f"Downstream: each variant minus the baseline {baseline} ({which}), on the documents scored in every run of "
        "both; each document's score averaged over seeds; 95% paired bootstrap interval over documents (10,000 "
        "resamples), * where it excludes 0.",
        "",
        f"| variant | metric | difference vs {baseline} [95% interval] | documents |",
        "| --- | --- | --- | --- |",
    ]
    base = scores.get(baseline, {})
    for label in order[1:]:
        for column in columns:
            a_runs, b_runs = base.get(column, []), scores.get(label, {}).get(column, [])
            shared = sorted(set.intersection(*(set(run) for run in a_runs + b_runs))) if a_runs and b_runs else []
            if not shared:
                lines.append(f"| {label} | {column} | n/a | 0 |")
                continue
            a_SD = np.array([[run[doc] for doc in shared] for run in a_runs])
            b_SD = np.array([[run[doc] for doc in shared] for run in b_runs])
            lines.append(f"| {label} | {column} | {paired_bootstrap(a_SD, b_SD)} | {len(shared)} |")
    return lines


PREDICTORS = {
    "predicted_loss": "approach 3, L(N, D) of the planned run",
    "predicted_loss_approach2": "approach 2, L_opt as a power law in C",
    "predicted_loss_approach2_ln": "approach 2, L_opt as a line in ln C",
}


def verification_report(rows: list[dict]) -> str:
    """Each prediction of a predict-then-verify sweep against the observed final eval loss: the one run's, or
    the mean over its seeds with the standard error of that mean (the sample std / sqrt(seeds))."""
    rows = sorted(rows, key=lambda r: int(r["seed"]))
    losses = np.array([float(r["loss"]) for r in rows])
    mean = float(np.mean(losses))
    sem = float(np.std(losses, ddof=1) / math.sqrt(len(losses))) if len(losses) > 1 else math.nan
    seeds = ", ".join(f"{loss:.4f} (seed {r['seed']})" for loss, r in zip(losses, rows))
    observed = f"{mean:.4f}" + (f" +- {sem:.4f}" if len(losses) > 1 else "")
    lines = [
        f"observed eval/loss: {observed} over {len(losses)} run(s): {seeds}",
        "",
        "| predictor | predicted | vs observed | in standard errors |",
        "| --- | --- | --- | --- |",
    ]
    for key, what in PREDICTORS.items():
        if key in rows[0]:
            predicted = float(rows[0][key])
            z = f"{(predicted - mean) / sem:+.1f}" if len(losses) > 1 and sem > 0 else "n/a"
            lines.append(f"| {what} | {predicted:.4f} | {(predicted - mean) / mean:+.1%} | {z} |")
    return "\n".join(lines)


def _bar_plot(stats: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted(stats, key=lambda k: stats[k][0])
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(labels)), 3.5))
    means = [stats[k][0] for k in labels]
    errors = [0 if math.isnan(stats[k][1]) else stats[k][1] for k in labels]
    ax.bar(range(len(labels)), means, yerr=errors, capsize=4, color="tab:blue")
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
    ax.set_ylabel("eval/bpb")
    low = min(m - e for m, e in zip(means, errors))
    ax.set_ylim(low - 0.05 * abs(low), None)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.sweep", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="write one resolved config per run and print the plan")
    p.add_argument("sweep_file")
    p.add_argument("--out", required=True)
    p = sub.add_parser("plan-optimal", help="plan the run a fit predicts is compute-optimal at --budget")
    p.add_argument("sweep_file")
    p.add_argument("--fit", required=True, help="fit.json of `python -m experiments.scaling fit`")
    p.add_argument("--budget", type=float, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", help="comma-separated train.seed values, one run each (default: the sweep's seeds)")
    p = sub.add_parser("run", help="run every planned run not yet done")
    p.add_argument("sweep_dir")
    p.add_argument("--executor", default="local", choices=("local", "slurm", "submitit-local"))
    p.add_argument("--parallel", type=int, default=1, help="local: runs at a time")
    p.add_argument(
        "--slurm", default="{}", help='submitit parameters as JSON, e.g. {"slurm_partition": "gpu", "gpus_per_node": 8}'
    )
    p = sub.add_parser("run-one", help=argparse.SUPPRESS)
    p.add_argument("run_dir")
    for name in ("collect", "report"):
        sub.add_parser(name).add_argument("sweep_dir")
    args = parser.parse_args(argv)
    try:
        if args.command == "plan":
            rows = plan(args.sweep_file, pathlib.Path(args.out))
            print(_plan_table(rows))
            total = sum(r["flops"] for r in rows)
            print(f"{len(rows)} runs planned in {args.out}: {total:.3e} training FLOPs in all")
        elif args.command == "plan-optimal":
            seeds = _parse_seeds(args.seeds) if args.seeds is not None else None
            info = plan_verification(args.sweep_file, args.fit, args.budget, pathlib.Path(args.out), seeds)
            print(_plan_table([info]))
            others = {"predicted_loss_approach2": "C^c", "predicted_loss_approach2_ln": "ln C"}
            also = [f"{info[key]:.4f} as {form}" for key, form in others.items() if key in info]
            also = f" (approach 2's L_opt: {', '.join(also)})" if also else ""
            print(
                f"predicted eval/loss {info['predicted_loss']:.4f}{also}; "
                f"{len(info['runs'])} run(s); run with: python -m experiments.sweep run {args.out}"
            )
        elif args.command == "run":
            if args.parallel < 1:
                raise SweepError(f"--parallel={args.parallel}: must be >= 1")
            outcome = run(pathlib.Path(args.sweep_dir), args.executor, args.parallel, json.loads(args.slurm))
            print(
                f"done {len(outcome['done'])}, failed {len(outcome['failed'])}, skipped (done before) {len(outcome['skipped'])}"
            )
            return 1 if outcome["failed"] else 0
        elif args.command == "run-one":
            run_one(args.run_dir)
        elif args.command == "collect":
            rows = collect(pathlib.Path(args.sweep_dir))
            print(f"{len(rows)} runs -> {pathlib.Path(args.sweep_dir) / 'runs.csv'}")
        elif args.command == "report":
            print(report(pathlib.Path(args.sweep_dir)))
    except (SweepError, PlanError, ConfigError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _parse_seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",")]
    except ValueError:
        raise SweepError(f"--seeds={text!r}: must be comma-separated integers, e.g. 0,1,2") from None


def _plan_table(rows: list[dict]) -> str:
    if "params" in rows[0]:
        return table([Planned(**{f.name: r[f.name] for f in dataclasses.fields(Planned)}) for r in rows])
    lines = ["| run | variant | seed | steps | tokens | FLOPs |", "| --- | --- | --- | --- | --- | --- |"]
    lines += [
        f"| {r['name']} | {r['label']} | {r['seed']} | {r['steps']:,} | {r['tokens']:,} | {r['flops']:.3e} |"
        for r in rows
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
