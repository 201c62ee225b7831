"""Sweeps: isoFLOP planning against the model's FLOPs accounting, and an ablation sweep run end to end
(local processes, resumption, submitit's local executor), collected and reported."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments import sweep as sweep_lib
from model import flops_per_token, param_counts
from tests.conftest import REPO
from tests.xla_flags import compile_flags
from training.config import from_dict

TINY = {
    "model.d_model": 32,
    "model.num_layers": 2,
    "model.num_heads": 4,
    "model.num_kv_heads": 4,
    "model.d_ff": 64,
    "model.remat": "none",
    "data.seq_len": 32,
    "train.batch_size": 4,
    "train.warmup_steps": 1,
    "train.log_every": 2,
    "train.eval_every": 100,
    "train.eval_batches": 1,
    "train.sample_tokens": 0,
    "train.peak_flops": 1e12,
}


def write_sweep(path, body: dict) -> str:
    path.write_text(f"def get_sweep():\n    return {body!r}\n")
    return str(path)


def cli(*args: str) -> subprocess.CompletedProcess:
    # The suite's fast-compiling flags (tests/xla_flags.py): these runs' programs compile once each and run a few steps.
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": compile_flags(os.environ["XLA_FLAGS"])}
    return subprocess.run(
        [sys.executable, "-m", "experiments.sweep", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_isoflop_plan_spends_each_budget_on_log_spaced_sizes(tmp_path):
    budgets = [3e12, 1e13, 2.5e13]
    file = write_sweep(
        tmp_path / "iso.py",
        {
            "config": "configs/tiny.py",
            "overrides": {"data.tokenizer": "bpe:2048"},
            "isoflop": {"budgets": budgets, "sizes": 5, "spread": 4.0, "family": {"head_dim": 16, "ffn_multiple": 16}},
        },
    )
    done = cli("plan", file, "--out", str(tmp_path / "iso"))
    assert done.returncode == 0, done.stderr
    assert "| run | budget | params (non-emb.)" in done.stdout and "15 runs planned" in done.stdout
    for budget in budgets:
        planned = [json.loads(p.read_text()) for p in (tmp_path / "iso" / "runs").glob("*/planned.json")]
        planned = [p for p in planned if p["budget"] == budget]
        assert len(planned) == 5
        assert all(p["name"].startswith(f"C{budget:.3g}_N".replace("+", "")) for p in planned)  # C2.5e13_N...
        sizes = []
        for p in planned:
            run = from_dict(p["config"])
            assert run.model.vocab_size == 2048
            # FLOPs from the model's own accounting (attention and the output head included), not 6N.
            flops = (
                flops_per_token(run.model, run.data.seq_len) * run.train.steps * run.train.batch_size * run.data.seq_len
            )
            assert p["flops"] == pytest.approx(flops) and abs(flops - budget) / budget <= 0.02
            assert p["params"] == param_counts(run.model).non_embedding and p["tokens"] == p["steps"] * 16 * 256
            sizes.append(p["params"])
        sizes = np.sort(sizes)
        expected = math.sqrt(budget / (6 * 20))
        assert sizes[0] < expected < sizes[-1]
        ratios = sizes[1:] / sizes[:-1]
        assert np.all(ratios > 1.3) and np.all(ratios < 3.5)  # roughly even steps in log N

    # `run` starts the largest budgets first and, within one, the runs with the most steps (the longest).
    order = sweep_lib.longest_first(sweep_lib.run_dirs(tmp_path / "iso"))
    keys = [(p["budget"], p["steps"]) for p in (json.loads((d / "planned.json").read_text()) for d in order)]
    assert keys == sorted(keys, reverse=True) and keys[0][0] == 2.5e13 and keys[-1][0] == 3e12


def test_plan_rejects_a_budget_too_small_to_spend_within_2_percent(tmp_path):
    file = write_sweep(tmp_path / "iso.py", {"config": "configs/tiny.py", "isoflop": {"budgets": [1e9], "sizes": 5}})
    done = cli("plan", file, "--out", str(tmp_path / "iso"))
    assert done.returncode == 2 and done.stderr.startswith("error: budget 1e+09:")
    assert not (tmp_path / "iso").exists()


@pytest.mark.slow(110)
def test_ablation_sweep_runs_resumes_collects_and_reports(tmp_path, capsys, monkeypatch):
    """`run` in processes, as a sweep runs (each run its own process, two at a time, then submitit's executor);
    `plan`, `collect` and `report` in-process: their exit codes and one-line errors are test_plan_rejects_...'s."""
    grid = {"model.position": ["rope", "none"]}
    file = write_sweep(
        tmp_path / "ablate.py",
        {
            "config": "configs/tiny.py",
            "overrides": {**TINY, "train.steps": 4, "checkpoint.every": 2},
            "grid": grid,
            "seeds": [0, 1],
        },
    )
    out = tmp_path / "ablate"
    monkeypatch.chdir(REPO)  # the sweep's config path is relative to the repo, as `cli` runs it
    assert sweep_lib.main(["plan", file, "--out", str(out)]) == 0
    planned = capsys.readouterr().out
    # Steps, tokens and FLOPs per run (6 x matmul params + attention, by hand for this model), and their total.
    d, layers, ff, seq, vocab = 32, 2, 64, 32, 257
    per_token = 6 * (layers * (4 * d * d + 3 * d * ff) + d * vocab) + 3 * layers * 4 * seq * d
    flops = 4 * 4 * seq * per_token
    assert f"| position=rope,seed=0 | position=rope | 0 | 4 | 512 | {flops:.3e} |" in planned
    assert f"4 runs planned in {out}: {4 * flops:.3e} training FLOPs in all" in planned
    done = cli("run", str(out), "--parallel", "2")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 runs: 0 done already, 4 to run" in done.stdout and "[4/4]" in done.stdout
    assert "  position=rope,seed=0: train: 100%" in done.stdout  # each run's progress, as it trains
    log = (out / "runs" / "position=rope,seed=0" / "log.txt").read_text()
    assert "compiled the train step" in log and "train: 100%" in log and "\r" not in log

    # An interrupted run (no done.json) resumes from its checkpoint, here through submitit's local executor
    # (the SLURM code path); the finished ones are skipped.
    resumed = out / "runs" / "position=none,seed=1"
    (resumed / "done.json").unlink()
    done = cli("run", str(out), "--executor", "submitit-local")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 runs: 3 done already, 1 to run" in done.stdout and (resumed / "done.json").exists()

    assert sweep_lib.main(["collect", str(out)]) == 0
    with open(out / "curves.csv") as f:
        curves = list(csv.DictReader(f))
    want = []  # every eval of every run: tokens and FLOPs so far
    for run_dir in sorted((out / "runs").iterdir()):
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        for r in (r for r in rows if "eval/loss" in r):
            want.append((run_dir.name, r["step"], r["step"] * 128, r["step"] * 128 * per_token, r["eval/loss"]))
    got = [(c["name"], int(c["step"]), int(c["tokens"]), float(c["flops"]), float(c["loss"])) for c in curves]
    assert [g[:4] for g in sorted(got)] == [w[:4] for w in sorted(want)] and len(got) == 4
    assert [g[4] for g in sorted(got)] == pytest.approx([w[4] for w in sorted(want)])

    capsys.readouterr()
    assert sweep_lib.main(["report", str(out)]) == 0
    reported = capsys.readouterr().out
    with open(out / "runs.csv") as f:
        rows = list(csv.DictReader(f))
    assert {"name", "params", "params_total", "tokens", "flops", "budget", "loss", "bpb"} <= set(rows[0])
    for row in rows:  # the final eval of each run's own metrics
        metrics = [json.loads(line) for line in (out / "runs" / row["name"] / "metrics.jsonl").read_text().splitlines()]
        assert float(row["bpb"]) == pytest.approx([m for m in metrics if "eval/bpb" in m][-1]["eval/bpb"])
        assert int(row["tokens"]) == 4 * 4 * 32
    for variant in ("position=rope", "position=none"):
        bpbs = [float(r["bpb"]) for r in rows if r["label"] == variant]
        line = next(line for line in reported.splitlines() if line.startswith(f"| {variant} |"))
        assert f"{np.mean(bpbs):.4f} +- {np.std(bpbs, ddof=1):.4f} | 2 |" in line
    assert (out / "report.png").stat().st_size > 0 and (out / "curves.csv").exists()


def test_a_runs_output_is_relayed_line_by_line_with_its_progress_bar_once_per_interval():
    import io

    now = [0.0]
    out = (
        b"resuming from ckpt\n\rtrain:   0%| 0/9\rtrain:  11%| 1/9\rtrain:  22%| 2/9\r      \rstep 2: eval/loss 3.1\n"
        b"\rtrain:  22%| 2/9\rtrain:  33%| 3/9\rtrain: 100%| 9/9\ntrain/loss=2.9  eval/loss=3\n"
    )
    chunks = [out[i : i + 5] for i in range(0, len(out), 5)]  # as a pipe may cut it

    def ticking():
        for chunk in chunks:
            now[0] += 1.0
            yield chunk

    log, shown = io.StringIO(), []
    sweep_lib.relay(ticking(), log, shown.append, every=30.0, clock=lambda: now[0])
    assert shown == ["train:   0%| 0/9", "train: 100%| 9/9"]
    assert log.getvalue().splitlines() == [
        "resuming from ckpt",
        "train:   0%| 0/9",
        "step 2: eval/loss 3.1",
        "train: 100%| 9/9",
        "train/loss=2.9  eval/loss=3",
    ]
    shown.clear()
    sweep_lib.relay(iter(chunks), io.StringIO(), shown.append, every=0.0)
    assert len(shown) == 6  # every state of the bar, when asked for every one


def test_a_one_seed_ablation_reports_no_spread(tmp_path, monkeypatch):
    rows = [
        {"label": "position=rope", "bpb": 2.0},
        {"label": "position=none", "bpb": 2.1},
        {"label": "position=none", "bpb": 2.3},
    ]
    monkeypatch.setattr(sweep_lib, "collect", lambda sweep_dir: rows)
    monkeypatch.setattr(sweep_lib, "_bar_plot", lambda stats, path: None)
    text = sweep_lib.report(tmp_path)
    assert "| position=rope | 2.0000 +- n/a | 1 |" in text and "| position=none | 2.2000 +- 0.1414 | 2 |" in text
    assert "nan" not in text


def test_bad_sweep_inputs_are_one_line_errors(tmp_path):
    assert sweep_lib.main(["run", str(tmp_path / "nothing")]) == 2
    bad = write_sweep(tmp_path / "bad.py", {"config": "configs/tiny.py", "overrides": {"model.width": 3}, "grid": {}})
    done = cli("plan", bad, "--out", str(tmp_path / "x"))
    assert (
        done.returncode == 2
        and done.stderr.strip()
        == "error: override 'model.width': not a config field (use group.field, e.g. model.d_model)"
    )


def test_runs_of_a_sweep_share_one_trained_bpe_tokenizer(tmp_path, text_corpus):
    grid = {"model.num_kv_heads": [4, 2]}
    overrides = {**TINY, "data.corpus": str(text_corpus), "data.tokenizer": "bpe:300", "data.val_fraction": 0.2}
    file = write_sweep(tmp_path / "s.py", {"config": "configs/tiny.py", "overrides": overrides, "grid": grid})
    out = tmp_path / "s"
    sweep_lib.plan(file, out)
    dirs = sweep_lib.run_dirs(out)
    sweep_lib.share_tokenizer(out, dirs)
    trained = (out / "tokenizer.json").read_text()
    assert all((d / "tokenizer.json").read_text() == trained for d in dirs) and len(dirs) == 2


def test_plan_optimal_picks_the_family_member_the_law_predicts_best(tmp_path):
    """Against a brute-force search over the same family with the law written out here."""
    from experiments.plan import Family, PlanError, plan_one
    from model import ModelConfig

    law = {"E": 1.5, "A": 80.0, "B": 900.0, "alpha": 0.35, "beta": 0.3}
    file = write_sweep(
        tmp_path / "iso.py",
        {"config": "configs/tiny.py", "isoflop": {"budgets": [1e12], "family": {"head_dim": 16, "ffn_multiple": 16}}},
    )
    loss_law = {"k_L": 40.0, "loss_exponent": -0.08, "loss_ln_slope": -0.3, "loss_ln_intercept": 12.0}
    (tmp_path / "fit.json").write_text(json.dumps({"approach3": law, "approach2": loss_law}))
    done = cli(
        "plan-optimal", file, "--fit", str(tmp_path / "fit.json"), "--budget", "4e12", "--out", str(tmp_path / "v")
    )
    assert done.returncode == 0, done.stderr
    (planned,) = [json.loads(p.read_text()) for p in (tmp_path / "v" / "runs").glob("*/planned.json")]

    base = ModelConfig(vocab_size=257, max_seq_len=256)
    family = Family(head_dim=16, ffn_multiple=16)
    losses = {}
    for target in np.geomspace(1e3, 1e8, 400):
        try:
            p = plan_one(base, family, 4e12, float(target), seq_len=256, batch_size=16)
        except PlanError:
            continue
        losses[p.params] = law["E"] + law["A"] / p.params ** law["alpha"] + law["B"] / p.tokens ** law["beta"]
    best = min(losses, key=losses.get)
    assert planned["params"] == best and planned["predicted_loss"] == pytest.approx(losses[best])
    assert planned["predicted_loss_approach2"] == pytest.approx(40.0 * 4e12**-0.08)
    assert planned["predicted_loss_approach2_ln"] == pytest.approx(12.0 - 0.3 * np.log(4e12))
    assert abs(planned["flops"] - 4e12) / 4e12 <= 0.02
    assert from_dict(planned["config"]).train.steps == planned["steps"]


def test_isoflop_seeds_repeat_each_model_and_verification_reports_their_mean(tmp_path):
    """`isoflop.seeds` plans every model once per seed (NAME,seed=S, the same model and steps, train.seed = S);
    plan-optimal repeats its run over the seeds; the report compares each prediction with the seeds' mean."""
    iso = {"budgets": [1e12], "sizes": 5, "seeds": [0, 3], "family": {"head_dim": 16, "ffn_multiple": 16}}
    file = write_sweep(tmp_path / "iso.py", {"config": "configs/tiny.py", "isoflop": iso})
    rows = sweep_lib.plan(file, tmp_path / "iso")
    assert len(rows) == 10
    planned = {p.parent.name: json.loads(p.read_text()) for p in (tmp_path / "iso" / "runs").glob("*/planned.json")}
    for name, p in planned.items():
        stem, _, seed = name.partition(",seed=")
        twin = planned[f"{stem},seed={3 if seed == '0' else 0}"]
        assert from_dict(p["config"]).train.seed == int(seed) == p["seed"]
        assert p["config"]["model"] == twin["config"]["model"] and p["steps"] == twin["steps"]
        assert p["name"] == name
    assert sorted(r["name"] for r in rows) == sorted(planned) and f"| {name} |" in sweep_lib._plan_table(rows)

    with pytest.raises(sweep_lib.SweepError, match=r"isoflop.seeds=\[1, 1\]: a seed is repeated"):
        sweep_lib.plan(
            write_sweep(tmp_path / "bad.py", {"config": "configs/tiny.py", "isoflop": {**iso, "seeds": [1, 1]}}),
            tmp_path / "b",
        )

    (tmp_path / "fit.json").write_text(
        json.dumps({"approach3": {"E": 1.5, "A": 80.0, "B": 900.0, "alpha": 0.35, "beta": 0.3}})
    )
    info = sweep_lib.plan_verification(file, str(tmp_path / "fit.json"), 4e12, tmp_path / "v", seeds=[0, 1, 2])
    assert info["runs"] == [f"{info['name']},seed={s}" for s in (0, 1, 2)]
    for s in (0, 1, 2):
        p = json.loads((tmp_path / "v" / "runs" / f"{info['name']},seed={s}" / "planned.json").read_text())
        assert from_dict(p["config"]).train.seed == s and p["predicted_loss"] == info["predicted_loss"]

    observed = [2.60, 2.47, 2.50]  # mean 2.5233, std 0.06807, standard error 0.03930
    rows = [
        {"loss": loss, "seed": s, "predicted_loss": 2.46, "predicted_loss_approach2": 2.557}
        for s, loss in enumerate(observed)
    ]
    text = sweep_lib.verification_report(rows)
    assert text.startswith("observed eval/loss: 2.5233 +- 0.0393 over 3 run(s): 2.6000 (seed 0)")
    assert "| approach 3, L(N, D) of the planned run | 2.4600 | -2.5% | -1.6 |" in text
    assert "| approach 2, L_opt as a power law in C | 2.5570 | +1.3% | +0.9 |" in text


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "experiments" / "sweeps").glob("*.py")))
def test_every_committed_sweep_file_plans(tmp_path, name):
    """The sweep files behind RESULTS.md (the GPU one included) plan without error: every run resolves to a
    valid config, and every isoFLOP run spends its budget within 2% by the model's own accounting."""
    rows = sweep_lib.plan(str(REPO / "experiments" / "sweeps" / f"{name}.py"), tmp_path / name)
    assert rows
    for row in rows:
        planned = json.loads((tmp_path / name / "runs" / row["name"] / "planned.json").read_text())
        run = from_dict(planned["config"])
        if "budget" in planned:
            per_step = run.train.batch_size * run.data.seq_len * flops_per_token(run.model, run.data.seq_len)
            assert abs(per_step * run.train.steps - planned["budget"]) <= 0.02 * planned["budget"]


def test_an_ablation_with_downstream_tasks_reports_paired_differences(tmp_path):
    """Two variants x 2 seeds of finished runs faked on disk (planned.json, config.json, metrics.jsonl, done.json,
    downstream.json): the report table gains each per-document metric's mean, and a second table each variant
    minus the grid's first (position=rope, though runs/ lists position=none first) over the shared documents."""
    from experiments.bootstrap import paired_bootstrap

    file = write_sweep(
        tmp_path / "ablate.py",
        {"config": "configs/tiny.py", "overrides": TINY, "grid": {"model.position": ["rope", "none"]}, "seeds": [0, 1]},
    )
    out = tmp_path / "ablate"
    sweep_lib.plan(file, out)
    rng = np.random.default_rng(0)
    easy_D = rng.random(200)  # how easy each document is: the same documents are easy for every run
    scores = {}  # run name -> task -> metric -> {doc_id: score}
    for run_dir in sweep_lib.run_dirs(out):
        planned = json.loads((run_dir / "planned.json").read_text())
        better = 0.15 if planned["label"] == "position=none" else 0.0
        noise_D = rng.normal(0.0, 0.03, 200)  # a seed's own per-document noise
        docs = range(199) if run_dir.name == "position=none,seed=1" else range(200)  # a document it did not score
        acc = {str(d): float(easy_D[d] + noise_D[d] > 0.6 - better) for d in docs}
        same = {str(d): float(easy_D[d] > 0.5) for d in docs}  # no difference between the variants
        scores[run_dir.name] = {"stdlib_mc": {"acc": acc, "acc_norm": same}, "stdlib_lambada": {"acc": same}}
        downstream = {"stdlib_mc": {"acc": acc, "acc_norm": same}, "stdlib_lambada": {"acc": same, "perplexity": 12.5}}
        (run_dir / "downstream.json").write_text(json.dumps({"step": 4, "tasks": downstream}))
        (run_dir / "config.json").write_text(json.dumps(planned["config"]))
        record = {"step": 4, "eval/loss": 2.0 + better, "eval/bpb": 3.0 + better + 0.01 * planned["seed"]}
        if (
            planned["seed"] == 1
        ):  # the aggregates logged beside eval/bpb (the others' runs.csv columns: downstream.json)
            record.update({"eval/stdlib_mc/acc": 0.125, "eval/stdlib_lambada/perplexity": 11.0})
        (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 2, "eval/loss": 4.0, "eval/bpb": 5.0}) + "\n")
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        (run_dir / "done.json").write_text("{}")

    text = sweep_lib.report(out)
    assert (out / "report.md").read_text() == text + "\n"
    lines = text.splitlines()
    assert (
        lines[0]
        == "| variant | eval/bpb (mean +- std) | seeds | stdlib_lambada/acc | stdlib_mc/acc | stdlib_mc/acc_norm |"
    )
    mean = lambda name, task, metric: np.mean(list(scores[name][task][metric].values()))
    for label in ("position=rope", "position=none"):
        names = [f"{label},seed={s}" for s in (0, 1)]
        cells = [
            np.mean([mean(n, *key.split()) for n in names])
            for key in ("stdlib_lambada acc", "stdlib_mc acc", "stdlib_mc acc_norm")
        ]
        bpb = 3.0 + (0.15 if label == "position=none" else 0.0) + 0.005
        want = f"| {label} | {bpb:.4f} +- 0.0071 | 2 | " + " | ".join(f"{c:.4f}" for c in cells) + " |"
        assert want in lines

    assert "each variant minus the baseline position=rope (the grid's first variant)" in text
    header = lines.index("| variant | metric | difference vs position=rope [95% interval] | documents |")
    table = {line.split(" | ")[1]: line for line in lines[header + 2 :]}
    assert sorted(table) == ["stdlib_lambada/acc", "stdlib_mc/acc", "stdlib_mc/acc_norm"]
    # Documents scored by every run of both variants (doc 199 is missing from one), each averaged over seeds.
    shared = [str(d) for d in range(199)]
    seeds = lambda label: np.array(
        [[scores[f"{label},seed={s}"]["stdlib_mc"]["acc"][d] for d in shared] for s in (0, 1)]
    )
    a_SD, b_SD = seeds("position=rope"), seeds("position=none")
    difference = b_SD.mean() - a_SD.mean()
    assert difference > 0.1  # position=none got right what rope did and more: the sign is none - rope
    assert table["stdlib_mc/acc"] == f"| position=none | stdlib_mc/acc | {paired_bootstrap(a_SD, b_SD)} | 199 |"
    assert (
        table["stdlib_mc/acc"].split(" | ")[2].startswith(f"{difference:+.3f} [") and " * |" in table["stdlib_mc/acc"]
    )
    assert table["stdlib_mc/acc_norm"] == "| position=none | stdlib_mc/acc_norm | +0.000 [+0.000, +0.000] | 199 |"

    with open(out / "runs.csv") as f:
        rows = {row["name"]: row for row in csv.DictReader(f)}
    for name, row in rows.items():
        if name.endswith("seed=1"):  # the last metrics.jsonl record with eval/<task>/<metric> keys
            assert (row["stdlib_mc/acc"], row["stdlib_lambada/perplexity"], row["stdlib_mc/acc_norm"]) == (
                "0.125",
                "11.0",
                "",
            )
        else:  # downstream.json: a per-document metric's mean, an aggregate-only one as it is
            assert float(row["stdlib_mc/acc"]) == pytest.approx(mean(name, "stdlib_mc", "acc"))
            assert float(row["stdlib_lambada/perplexity"]) == 12.5
