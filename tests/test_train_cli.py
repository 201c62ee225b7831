"""What README promises of train.py and its config, end to end: exit codes 1 (divergence) and 2 (an incompatible
checkpoint), init_from given a checkpoints/ or step directory, a dry run that never allocates the model or reads the
corpus, data.text_field, and README's example config arguments."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import jax
import pytest

from data import DataConfig, load
from tests.conftest import REPO, tiny_run
from tests.xla_flags import compile_flags
from training import loop
from training.checkpoint import checkpoints_dir, list_steps, load_for_inference
from training.dry_run import dry_run
from training.loop import train
from training.step import init_state


@pytest.fixture(autouse=True)
def unmeasured_peak(monkeypatch):
    monkeypatch.setattr(loop, "peak_flops", lambda *args: (1e12, "not measured"))


def train_py(config, workdir, *flags: str) -> subprocess.CompletedProcess:
    # The suite's fast-compiling flags (tests/xla_flags.py): these runs check exit codes and messages, not bits.
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": compile_flags(os.environ["XLA_FLAGS"])}
    command = [sys.executable, "train.py", f"--config={config}", f"--workdir={workdir}", *flags]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_train_py_exits_1_on_divergence_and_2_on_an_incompatible_checkpoint(tmp_path, text_corpus):
    groups = {"data": {"corpus": str(text_corpus), "val_fraction": 0.2}, "train": {"steps": 4, "log_every": 1}}
    config = tmp_path / "config.py"
    config.write_text(f"from tests.conftest import tiny_config\n\n\ndef get_config(arg=None):\n    return tiny_config(**{groups!r})\n")  # fmt: skip
    diverged = train_py(config, tmp_path / "diverged", "--config.train.lr=1e6", "--config.checkpoint.every=1")
    assert diverged.returncode == 1, diverged.stderr[-3000:]
    # (tqdm may redraw its bar after the error, on the same terminal line)
    message = r"error: step \d+: train/(loss|grad_norm) is (nan|inf|-inf); stopping \(the last checkpoint, step \d+, is intact\)"
    assert re.search(message, diverged.stderr), diverged.stderr[-2000:]
    assert list_steps(tmp_path / "diverged")  # step 1's loss is finite: its checkpoint is the last good one
    for step in list_steps(tmp_path / "diverged"):  # no checkpoint of the diverged state
        params = load_for_inference(tmp_path / "diverged", step)[1]
        assert all(bool(jax.numpy.isfinite(p).all()) for p in jax.tree.leaves(params)), step

    # Resuming the diverged run's last good checkpoint with another model refuses before training; the other model
    # is set by a nested key on the command line (README: `model.moe.top_k=4`), which reaches the model's config.
    metrics = (tmp_path / "diverged" / "metrics.jsonl").read_bytes()
    other = train_py(config, tmp_path / "diverged", "--config.model.moe.top_k=4")
    assert other.returncode == 2, other.stderr[-3000:]
    last = other.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "model.moe={" in last, other.stderr
    stored, given = last.split(" in the checkpoint but ")
    assert "'top_k': 2," in stored and "'top_k': 4," in given, last
    assert (tmp_path / "diverged" / "metrics.jsonl").read_bytes() == metrics


def test_init_from_takes_a_checkpoints_directory_or_one_step_directory(tmp_path, text_corpus, monkeypatch):
    data = {"corpus": str(text_corpus), "val_fraction": 0.2}
    source = tmp_path / "source"
    train(tiny_run(data=data, train={"steps": 4, "eval_every": 100}, checkpoint={"every": 2}), source, quiet=True)
    given = []
    monkeypatch.setattr(loop, "init_state", lambda *a, **k: given.append(a[3]) or init_state(*a, **k))
    for path, step in [(checkpoints_dir(source), 4), (checkpoints_dir(source) / "2", 2)]:
        run = tiny_run(data=data, train={"steps": 1, "warmup_steps": 0, "eval_every": 100, "init_from": str(path)})
        train(run, tmp_path / f"from_{path.name}", quiet=True)
        want = load_for_inference(source, step)[1]
        assert jax.tree.all(jax.tree.map(lambda x, y: bool((x == y).all()), given[-1], want)), path


def test_a_dry_run_neither_allocates_the_model_nor_reads_the_corpus():
    """182 GB of params and Adam state, more than this machine holds, planned from a corpus that does not exist."""
    model = {"d_model": 16384, "num_heads": 128, "num_kv_heads": 8, "num_layers": 4, "d_ff": 65536}
    run = tiny_run(model=model, data={"corpus": "/nonexistent/corpus", "seq_len": 32}, train={"batch_size": 1})
    plan = dry_run(run)
    held = plan["bytes_per_device"]["params"] + plan["bytes_per_device"]["optimizer_state"]
    assert held > os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), held
    assert plan["params"] == 15_170_961_408


def test_data_text_field_names_the_jsonl_field_that_holds_the_text(tmp_path):
    docs = [f"def f{i}(x):\n    return {i}\n" * 4 for i in range(10)]
    lines = [json.dumps({"body": text, "text": "WRONG FIELD"}) for text in docs]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n")
    cfg = DataConfig(corpus=str(tmp_path / "docs.jsonl"), text_field="body", seq_len=8, val_fraction=0.2,
                     cache_dir=str(tmp_path / "cache"))  # fmt: skip
    data = load(cfg, tmp_path / "wd")
    stream = bytes(int(t) for t in list(data.store.train) + list(data.store.val) if t != data.tokenizer.eod_id)
    assert b"WRONG" not in stream and len(stream) == sum(len(d.encode()) for d in docs)


def test_what_readme_tells_users_to_run_is_installed_with_the_package():
    """README: `tensorboard --logdir runs` after `pip install -e .` (tensorboardX only writes the event files)."""
    import importlib.util
    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(re.match(r"tensorboard\b(?!X)", d) for d in deps), deps
    assert importlib.util.find_spec("tensorboard") is not None
