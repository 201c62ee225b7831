"""Throughput and MFU as the loop reports them (training/metrics.py, the logging part of training/loop.py)."""

from __future__ import annotations

import json
import shutil
import time

import jax
import pytest

from tests.conftest import tiny_run
from training import loop
from training.checkpoint import Checkpointer
from training.metrics import MetricsWriter, mfu_warning


def rows_of(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def between_steps(monkeypatch):
    """Seconds the loop spends in eval, saves and metric writes, timed here from when their inputs are ready
    (the still-running step is waited for first, so its time is not counted here)."""
    spent = {"seconds": 0.0}

    def timed(fn, ready):
        def wrapper(*args, **kwargs):
            jax.block_until_ready(ready(*args))
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent["seconds"] += time.perf_counter() - start

        return wrapper

    monkeypatch.setattr(loop, "evaluate", timed(loop.evaluate, lambda fn, params, batches, *rest: params))
    monkeypatch.setattr(Checkpointer, "save", timed(Checkpointer.save, lambda self, step, arrays, *rest: arrays))
    monkeypatch.setattr(MetricsWriter, "write", timed(MetricsWriter.write, lambda *args: ()))
    return spent


def check_throughput(run, workdir, result, spent, after_step=0):
    """sum(tokens) / sum(step times) of the logged rows against tokens / (the loop's wall time less what it
    spent outside the steps)."""
    tokens_per_step = run.train.batch_size * run.data.seq_len
    rows = [r for r in rows_of(workdir) if "perf/step_time" in r and r["step"] > after_step]
    steps = [r["step"] for r in rows]
    counts = [b - a for a, b in zip([after_step, *steps], steps)]
    assert sum(counts) == result["step"] - after_step
    tokens = sum(n * tokens_per_step for n in counts)
    step_seconds = sum(n * r["perf/step_time"] for n, r in zip(counts, rows))
    for r in rows:  # each row: tokens/s x step time = the tokens of one step
        assert r["perf/tokens_per_sec"] * r["perf/step_time"] == pytest.approx(tokens_per_step)
        assert r["perf/peak_flops"] == run.train.peak_flops  # one device
    training_seconds = result["loop_seconds"] - spent["seconds"]
    assert training_seconds > 0
    assert tokens / step_seconds == pytest.approx(tokens / training_seconds, rel=0.1)


# Steps of a few ms, like eval and saves: what was mismeasured shows at full size.
MODEL = {"d_model": 64, "num_heads": 4, "num_kv_heads": 4, "d_ff": 256}


def test_tokens_per_sec_times_training_time_is_the_tokens_trained(tmp_path, text_corpus, between_steps, capsys):
    """With an eval and a save after every step; the peak is set far too low, so MFU > 1 must be flagged."""
    run = tiny_run(
        model=MODEL,
        data={"corpus": str(text_corpus), "val_fraction": 0.2, "seq_len": 64},
        train={"steps": 12, "batch_size": 8, "log_every": 2, "eval_every": 1, "eval_batches": 2, "peak_flops": 1e6},
        checkpoint={"every": 1},
    )
    result = loop.train(run, tmp_path, quiet=True)
    check_throughput(run, tmp_path, result, between_steps)
    rows = [r for r in rows_of(tmp_path) if "perf/step_time" in r]
    assert rows[0]["perf/peak_source"] == "train.peak_flops"
    assert all("perf/peak_source" not in r for r in rows[1:])
    assert all(r["perf/mfu"] > 1 for r in rows)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "perf/mfu=" in line]
    assert len(warnings) == 1 and "0.001 GFLOP/s (train.peak_flops) is too low" in warnings[0]


def test_mfu_warning_names_the_peak():
    assert mfu_warning(0.99, 1e12, "train.peak_flops") is None
    line = mfu_warning(2.6, 1.5e11, "measured float32 matmul")
    assert "\n" not in line and "perf/mfu=2.60" in line and "150 GFLOP/s (measured float32 matmul)" in line


def test_a_resumed_interval_counts_only_the_steps_it_timed(tmp_path, text_corpus, between_steps):
    """Resuming between two log steps restores the interval's earlier per-step metrics; they were timed by
    the process that ran them, not by this one."""
    run = tiny_run(
        model=MODEL,
        data={"corpus": str(text_corpus), "val_fraction": 0.2, "seq_len": 64},
        train={"steps": 12, "batch_size": 8, "log_every": 4, "eval_every": 12},
        checkpoint={"every": 3, "keep": 10},
    )
    loop.train(run, tmp_path, quiet=True)
    for step in (9, 12):  # resume from step 6, whose log interval (5-8) holds steps 5 and 6 already
        shutil.rmtree(tmp_path / "checkpoints" / str(step))
    between_steps["seconds"] = 0.0
    result = loop.train(run, tmp_path, quiet=True)
    check_throughput(run, tmp_path, result, between_steps, after_step=6)


def test_the_cpu_peak_is_measured_once_per_machine_and_cached(tmp_path, monkeypatch):
    """The best of several measurements, written under $XDG_CACHE_HOME/jax-lm and read back by later starts; a
    machine that differs (here: another JAX version) measures its own."""
    from training import metrics

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(metrics.time, "sleep", lambda s: None)
    calls = []
    monkeypatch.setattr(metrics, "matmul_flops", lambda: calls.append(1) or [2e9, 5e9, 3e9, 1e9, 4e9][len(calls) % 5])
    metrics.measured_cpu_peak.cache_clear()
    peak, source = metrics.measured_cpu_peak()
    assert peak == 5e9 and len(calls) == 5 and "best of 5" in source and str(tmp_path / "jax-lm") in source
    metrics.measured_cpu_peak.cache_clear()  # a new process
    cached = metrics.peak_cache_file(metrics.machine())
    assert metrics.measured_cpu_peak() == (5e9, f"measured float32 matmul, cached in {cached}") and len(calls) == 5
    monkeypatch.setattr(metrics.jax, "__version__", "0.0.0")
    metrics.measured_cpu_peak.cache_clear()
    assert metrics.measured_cpu_peak()[0] == 5e9 and len(calls) == 10
    metrics.measured_cpu_peak.cache_clear()
