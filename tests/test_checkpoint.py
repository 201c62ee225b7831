"""Checkpoints: bit-identical resumption after SIGKILL and SIGTERM (frozen params included), damaged and incompatible
checkpoints, divergence, init_from, restoring onto another device layout, and loading for inference."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import data as data_lib
import tests.toy_kinds  # noqa: F401  (registers model.mlp='toy')
import tests.toy_objectives  # noqa: F401  (registers train.objective='toy_anchored')
from data.tokenizer import ByteTokenizer, HFTokenizer, tokenizer_from_dict, tokenizer_to_dict, train_bpe
from model import Transformer
from tests.conftest import REPO, tiny_run, untrained_workdir
from training import loop
from training.checkpoint import (
    Checkpointer,
    CheckpointError,
    abstract_params,
    checkpoints_dir,
    list_steps,
    load_for_inference,
    meta_for,
    restore_params,
)
from training.config import ConfigError, with_vocab
from training.loop import resume_targets, train
from training.optim import make_optimizer
from training.step import init_state, make_train_step

# train.py's main in a subprocess, with hooks that interrupt it: argv is the mode, a step, then train.py's
# flags. Not measuring the CPU's peak FLOP/s only changes perf/mfu.
DRIVER = """
import os, signal, sys, time
from absl import app
import train
from training import checkpoint, loop

mode, at = sys.argv[1], int(sys.argv[2])
loop.peak_flops = lambda *args: (1e12, "not measured")
save, write, wait = checkpoint.Checkpointer.save, loop.MetricsWriter.write, checkpoint.Checkpointer.wait

def save_then_kill(self, step, *args, **kwargs):
    save(self, step, *args, **kwargs)  # returns once the arrays are on the host; the files come after
    if step == at and mode == "kill-mid-save":
        os.kill(os.getpid(), signal.SIGKILL)

def write_then(self, step, metrics):
    write(self, step, metrics)
    if mode == "slow":
        time.sleep(0.2)
    if mode == "sigterm" and step == at and "train/loss" in metrics:
        os.kill(os.getpid(), signal.SIGTERM)
    if mode == "sigint-twice" and step == at and "train/loss" in metrics:
        os.kill(os.getpid(), signal.SIGINT)
    while mode == "hold" and step == at and not os.path.exists(os.environ["RELEASE"]):
        time.sleep(0.05)

def wait_then(self):
    if mode == "sigint-twice":  # Ctrl-C again while the checkpoint of the stop is being written
        os.kill(os.getpid(), signal.SIGINT)
    wait(self)

checkpoint.Checkpointer.save, loop.MetricsWriter.write, checkpoint.Checkpointer.wait = save_then_kill, write_then, wait_then
sys.argv = ["train.py", *sys.argv[3:]]
app.run(train.main, flags_parser=train.parse_flags)
"""


@pytest.fixture(autouse=True)
def unmeasured_peak(monkeypatch):
    """Skips measuring the CPU's peak FLOP/s (seconds per process); only perf/mfu depends on it."""
    monkeypatch.setattr(loop, "peak_flops", lambda *args: (1e12, "not measured"))


def subprocess_env(**extra: str) -> dict:
    """This session's XLA flags and private token-store cache (set by conftest), plus `extra`."""
    return {**os.environ, "JAX_PLATFORMS": "cpu", **extra}


def curve(workdir, name: str = "train/loss") -> list[tuple[int, float]]:
    path = workdir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [(r["step"], r[name]) for r in rows if name in r]


def damage(directory) -> None:
    for f in directory.rglob("*"):
        if f.is_file():
            f.write_bytes(b"")


@pytest.mark.slow(100)
def test_runs_killed_or_preempted_anywhere_resume_bit_identically(tmp_path, text_corpus):
    """One workdir killed and preempted in turn, against an uninterrupted reference run. checkpoint.every=3 with
    log_every=2: SIGKILLed while saving step 6, the run resumes from step 3, whose checkpoint holds step 3's
    metrics, which the resumed run must average into the row it logs at step 4. The toy MLP (tests/toy_kinds.py)
    keeps non-trained state that changes its output: the losses are bit-identical only if the state came back
    exactly (the default SwiGLU is the toy MLP without that state). The toy objective toy_anchored
    (tests/toy_objectives.py) pulls the params toward a frozen copy of the initial ones, saved in every checkpoint:
    the same holds for it, and the last checkpoint's copy is the initial params, bit for bit."""
    groups = {
        "model": {"mlp": "toy"},
        "data": {"corpus": str(text_corpus), "val_fraction": 0.2},
        "train": {"steps": 12, "log_every": 2, "eval_every": 100, "objective": "toy_anchored"},
        "checkpoint": {"every": 3},
    }
    config = tmp_path / "config.py"
    config.write_text(f"import tests.toy_kinds\nimport tests.toy_objectives\nfrom tests.conftest import tiny_config\n\n\ndef get_config(arg=None):\n    return tiny_config(**{groups!r})\n")  # fmt: skip
    # Every run compiles the same programs: a shared compilation cache makes all but the first start quickly.
    env = subprocess_env(JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")  # fmt: skip

    def command(workdir, mode: str, at: int) -> list[str]:
        return [sys.executable, "-c", DRIVER, mode, str(at), f"--config={config}", f"--workdir={workdir}"]

    def run(workdir, mode: str = "run", at: int = 0, returncode: int = 0) -> str:
        done = subprocess.run(command(workdir, mode, at), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
        assert done.returncode == returncode, done.stderr[-3000:]
        return done.stdout

    run(tmp_path / "reference")
    reference = curve(tmp_path / "reference")
    assert [step for step, _ in reference] == [2, 4, 6, 8, 10, 12]
    workdir = tmp_path / "run"

    # SIGKILL from outside, at whatever the run is doing once step 2 is logged.
    proc = subprocess.Popen(command(workdir, "slow", 0), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + 300
    metrics = workdir / "metrics.jsonl"  # read while being written: look for the start of step 2's row
    while not (metrics.exists() and '{"step": 2,' in metrics.read_text()) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.kill()
    assert proc.wait() == -signal.SIGKILL, proc.stderr.read().decode()[-3000:]
    assert max(step for step, _ in curve(workdir)) < 12  # (before the first checkpoint, at step 3, most likely)

    # SIGKILL right after the save of step 6 started: its step directory is still a temporary one.
    run(workdir, "kill-mid-save", 6, returncode=-signal.SIGKILL)
    assert list_steps(workdir) == [3] and list(checkpoints_dir(workdir).glob("6.orbax-checkpoint-tmp*"))

    # SIGTERM: finish the step, write a checkpoint, exit 0. (This run resumed from step 3, mid log interval.)
    assert "preempted at step 10" in run(workdir, "sigterm", 10)
    assert list_steps(workdir)[-2:] == [9, 10] and not list(checkpoints_dir(workdir).glob("*tmp*"))

    run(workdir)
    assert curve(workdir) == reference
    for name in ("eval/loss", "train/toy_aux", "train/anchor"):
        assert curve(workdir, name) == curve(tmp_path / "reference", name), name
    assert curve(workdir, "train/toy_aux") and (checkpoints_dir(workdir) / "12" / "model_state").is_dir()
    assert all(anchor > 0 for _, anchor in curve(workdir, "train/anchor"))

    run_config = with_vocab(tiny_run(**groups), 257)
    model, (tx, _) = Transformer(run_config.model), make_optimizer(run_config.train)
    initial = init_state(model, tx, run_config.train.seed).params
    checkpointer = Checkpointer(checkpoints_dir(workdir))
    frozen = checkpointer.restore(lambda stored: {"frozen": initial}).arrays["frozen"]
    checkpointer.close()
    assert jax.tree.all(jax.tree.map(lambda x, y: bool((np.asarray(x) == np.asarray(y)).all()), frozen, initial))


def test_one_run_per_workdir_and_ctrl_c_saves_once_and_aborts_twice(tmp_path, text_corpus):
    groups = {
        "data": {"corpus": str(text_corpus), "val_fraction": 0.2},
        "train": {"steps": 8, "log_every": 1, "eval_every": 100},
        "checkpoint": {"every": 100},
    }
    config = tmp_path / "config.py"
    config.write_text(f"from tests.conftest import tiny_config\n\n\ndef get_config(arg=None):\n    return tiny_config(**{groups!r})\n")  # fmt: skip
    release, workdir = tmp_path / "release", tmp_path / "run"
    env = subprocess_env(RELEASE=str(release), JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")  # fmt: skip

    def start(mode: str, at: int = 0) -> subprocess.Popen:
        command = [sys.executable, "-c", DRIVER, mode, str(at), f"--config={config}", f"--workdir={workdir}"]
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    # A run that sits after logging step 2 until `release` exists.
    holder = start("hold", 2)
    try:
        lock_and_ctrl_c(holder, start, release, workdir)
    finally:
        holder.kill()
        holder.wait()


def lock_and_ctrl_c(holder, start, release, workdir) -> None:
    metrics = workdir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and '{"step": 2,' in metrics.read_text()) and holder.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    written = metrics.read_bytes()

    # A second run on the same workdir refuses before compiling or writing anything.
    second = start("run")
    out, err = second.communicate(timeout=300)
    assert second.returncode == 2, err[-3000:]
    holder_is = f"pid {holder.pid} on host {socket.gethostname()} since [0-9-]+ [0-9:]+"
    assert re.fullmatch(
        f"error: {re.escape(str(workdir))}: in use by {holder_is}; wait for that run or use another workdir\n", err
    )
    assert "compiled" not in out and metrics.read_bytes() == written

    # Ctrl-C: the step finishes, its checkpoint is written, exit code 0.
    holder.send_signal(signal.SIGINT)
    release.touch()
    out, err = holder.communicate(timeout=300)
    assert holder.returncode == 0, err[-3000:]
    assert "SIGINT: stopped after step 2 and wrote a checkpoint" in out and "preempted at step 2" in out
    assert "Traceback" not in err and list_steps(workdir) == [2] and not (workdir / "train.lock").exists()

    # Ctrl-C twice: the second one, during the checkpoint of step 4, kills the run before that step is complete.
    twice = start("sigint-twice", 4)
    out, err = twice.communicate(timeout=300)
    assert twice.returncode == -signal.SIGINT, err[-3000:]
    assert err.strip().splitlines()[-1] == "SIGINT then SIGINT: aborting without finishing the checkpoint"
    assert list_steps(workdir) == [2] and list(checkpoints_dir(workdir).glob("4.orbax-checkpoint-tmp*"))
    assert (workdir / "train.lock").read_text().startswith(f"pid {twice.pid} on host ")  # left by the dead run

    # The dead run's lock does not block the re-run, which resumes from step 2 and writes each row once.
    again = start("run")
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-3000:]
    assert f"resuming from {checkpoints_dir(workdir) / '2'}" in out and list_steps(workdir) == [2, 8]
    assert not list(checkpoints_dir(workdir).glob("*tmp*")) and not (workdir / "train.lock").exists()
    assert [step for step, _ in curve(workdir)] == list(range(1, 9))


def test_resuming_checks_the_config_and_skips_a_damaged_latest_checkpoint(tmp_path, text_corpus, capsys):
    groups = {
        "data": {"corpus": str(text_corpus), "val_fraction": 0.2},
        "train": {"steps": 10, "eval_every": 100},
        "checkpoint": {"every": 2, "keep": 2, "keep_every": 4},
    }
    handler = signal.getsignal(signal.SIGTERM)
    first = train(tiny_run(**groups), tmp_path, quiet=True)
    assert list_steps(tmp_path) == [4, 8, 10] and signal.getsignal(signal.SIGTERM) is handler
    metrics, config = (tmp_path / "metrics.jsonl").read_bytes(), (tmp_path / "config.json").read_bytes()

    again = train(tiny_run(**groups), tmp_path)
    assert "nothing to train" in capsys.readouterr().out
    assert again.pop("loop_seconds") == 0.0 and first.pop("loop_seconds") > 0
    assert again == first and (tmp_path / "metrics.jsonl").read_bytes() == metrics

    where = checkpoints_dir(tmp_path)
    for group, change, message in [
        ("model", {"d_model": 64}, r"model\.d_model=32 in the checkpoint but 64"),
        ("data", {"seq_len": 16}, r"data\.seq_len=32 in the checkpoint but 16"),
    ]:
        with pytest.raises(CheckpointError, match=f"^{where}: {message}"):
            train(tiny_run(**{**groups, group: {**groups.get(group, {}), **change}}), tmp_path, quiet=True)
    assert (tmp_path / "metrics.jsonl").read_bytes() == metrics and (tmp_path / "config.json").read_bytes() == config

    damage(where / "10" / "params")
    longer = train(tiny_run(**{**groups, "train": {**groups["train"], "steps": 12}}), tmp_path)
    out, err = capsys.readouterr()
    assert f"warning: skipping damaged checkpoint {where / '10'}" in err
    assert f"resuming from {where / '8'}" in out and "train.steps: 10 in the checkpoint, 12 now" in out
    assert longer["step"] == 12 and list_steps(tmp_path) == [4, 8, 10, 12] and list(where.glob("10.damaged-*"))
    assert [step for step, _ in curve(tmp_path)] == [2, 4, 6, 8, 10, 12]

    meta = where / "12" / "meta" / "metadata"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "format_version": 99}))
    with pytest.raises(CheckpointError, match="format_version=99, this code reads format_version=1"):
        train(tiny_run(**groups), tmp_path, quiet=True)
    damage(where)
    metrics = (tmp_path / "metrics.jsonl").read_bytes()
    with pytest.raises(CheckpointError, match=f"^{where}: no checkpoint reads back completely"):
        train(tiny_run(**groups), tmp_path, quiet=True)
    assert (tmp_path / "metrics.jsonl").read_bytes() == metrics


def test_resuming_with_another_batch_size_continues_the_stream_and_a_rewarm_is_logged(tmp_path, text_corpus, capsys, monkeypatch):  # fmt: skip
    seen, plain = [], data_lib.Data.train_iterator

    class Recorded:  # the loop's iterator, keeping every batch it gives
        def __init__(self, data, *args, **kwargs):
            self.it = plain(data, *args, **kwargs)
            self.get_state, self.set_state = self.it.get_state, self.it.set_state

        def __next__(self):
            seen.append(next(self.it)["tokens"])
            return {"tokens": seen[-1]}

    monkeypatch.setattr(data_lib.Data, "train_iterator", lambda data, *a, **k: Recorded(data, *a, **k))
    groups = {"data": {"corpus": str(text_corpus), "val_fraction": 0.2}, "checkpoint": {"every": 100}}
    train(tiny_run(**groups, train={"steps": 4, "batch_size": 4, "eval_every": 100}), tmp_path)
    first = capsys.readouterr().out
    assert "re-warms" not in first and len(seen) == 4
    train(tiny_run(**groups, train={"steps": 4, "batch_size": 8, "eval_every": 100}), tmp_path)
    assert "nothing to train" in capsys.readouterr().out  # a schedule that did not change says nothing
    result = train(tiny_run(**groups, train={"steps": 7, "batch_size": 8, "eval_every": 100}), tmp_path)
    out = capsys.readouterr().out
    assert result["step"] == 7 and list_steps(tmp_path) == [4, 7]
    assert "train.batch_size: 4 in the checkpoint, 8 now" in out and "continuing at window 16 of the training" in out
    # Cosine over 7 steps instead of 4 (warmup 2, min_lr_ratio 0.1): lr * (0.1 + 0.9 * (1 + cos(pi * s)) / 2).
    lr, s_old, s_new = 1e-3, (4 - 2) / (4 - 2), (4 - 2) / (7 - 2)
    old, new = (lr * (0.1 + 0.45 * (1 + np.cos(np.pi * s))) for s in (s_old, s_new))
    assert f"the learning rate re-warms at step 4: {old:.3g} on the checkpoint's schedule, {new:.3g} on this run's" in out  # fmt: skip
    # 4 batches of 4 then 3 of 8: the first 40 windows of the stream, none read twice, none skipped.
    monkeypatch.setattr(data_lib.Data, "train_iterator", plain)
    stream = data_lib.load(tiny_run(**groups).data, tmp_path).train_iterator(2, seed=0)
    want = np.concatenate([next(stream)["tokens"] for _ in range(20)])
    np.testing.assert_array_equal(np.concatenate(seen), want)


def test_a_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, text_corpus, monkeypatch):  # fmt: skip
    def diverging_at_step_5(*args, **kwargs):
        step_fn = make_train_step(*args, **kwargs)

        def train_step(state, batch):
            state, metrics = step_fn(state, batch)
            bad = state.step == 5
            params = jax.tree.map(lambda p: jnp.where(bad, jnp.nan, p), state.params)
            loss = jnp.where(bad, jnp.nan, metrics["train/loss"])
            return state.replace(params=params), {**metrics, "train/loss": loss}

        return train_step

    monkeypatch.setattr(loop, "make_train_step", diverging_at_step_5)
    run = tiny_run(
        data={"corpus": str(text_corpus), "val_fraction": 0.2},
        train={"steps": 8, "log_every": 4, "eval_every": 100},
        checkpoint={"every": 3},
    )
    with pytest.raises(FloatingPointError, match=r"step 5: train/loss is nan; stopping \(the last checkpoint, step 3"):
        train(run, tmp_path, quiet=True)  # logs at step 4 (all finite), saves at 3 and would at 6
    assert list_steps(tmp_path) == [3]
    _, params, _, _ = load_for_inference(tmp_path)
    assert all(bool(jnp.isfinite(p).all()) for p in jax.tree.leaves(params))


def test_init_from_takes_another_runs_params_and_load_for_inference_finds_steps(tmp_path, text_corpus, capsys):
    data = {"corpus": str(text_corpus), "val_fraction": 0.2}
    a = tmp_path / "a"
    train(tiny_run(data=data, train={"steps": 4, "eval_every": 100}, checkpoint={"every": 2}), a, quiet=True)

    run, params, tokenizer, step = load_for_inference(a)
    assert step == 4 and run.model.vocab_size == 257 and isinstance(tokenizer, ByteTokenizer)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), params) == jax.tree.map(
        lambda x: (x.shape, x.dtype), abstract_params(run.model)
    )
    assert (
        load_for_inference(checkpoints_dir(a) / "2")[3] == 2 and load_for_inference(checkpoints_dir(a), step=2)[3] == 2
    )
    assert list_steps(a) == list_steps(checkpoints_dir(a)) == [2, 4]
    for path, step, message in [
        (tmp_path / "missing", None, "no such directory"),
        (text_corpus, None, "no checkpoints"),
        (a, 3, r"no checkpoint for step 3 \(steps: 2, 4\)"),
    ]:
        with pytest.raises(CheckpointError, match=message):
            load_for_inference(path, step)

    given = []

    def spy(model, tx, seed, params=None, shardings=None, frozen=False, train=None):
        given.append(params)
        return init_state(model, tx, seed, params, shardings, frozen, train)

    # b's objective keeps a frozen copy of the params it starts from: a's, which its checkpoints point to.
    b_train = {"steps": 2, "eval_every": 100, "init_from": str(a), "objective": "toy_anchored"}
    b = tiny_run(data=data, train=b_train, checkpoint={"every": 2})
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "init_state", spy)
        train(b, tmp_path / "b")
    assert f"initialising params from {checkpoints_dir(a) / '4'}" in capsys.readouterr().out
    assert jax.tree.all(jax.tree.map(lambda x, y: bool((x == y).all()), given[-1], params))
    checkpointer = Checkpointer(checkpoints_dir(tmp_path / "b"))
    restored = checkpointer.restore(lambda stored: resume_targets(stored, checkpointer.directory, stored))
    checkpointer.close()
    counts = [int(x) for x in jax.tree.leaves(restored.arrays["opt_state"]) if x.dtype == jnp.int32]
    assert counts and all(c == 2 for c in counts)  # a fresh optimizer state, 2 steps old (a's was 4)
    assert restored.train["frozen_from"] == str(checkpoints_dir(a) / "4")
    assert not (restored.path / "frozen").exists()  # not saved twice

    reloaded = []

    def frozen_spy(*args):
        reloaded.append(loop_restored_frozen(*args))
        return reloaded[-1]

    loop_restored_frozen = loop.restored_frozen
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "restored_frozen", frozen_spy)
        train(b, tmp_path / "b")
    assert f"train.init_from={str(a)!r} ignored" in capsys.readouterr().out
    assert jax.tree.all(jax.tree.map(lambda x, y: bool((x == y).all()), reloaded[-1], params))
    regrouped = dataclasses.replace(
        b, model=dataclasses.replace(b.model, causal_blocks=1, scan_unroll=2)
    )  # same params
    train(regrouped, tmp_path / "b")
    assert "resuming from" in capsys.readouterr().out
    wider = tiny_run(data=data, model={"d_ff": 128}, train={"init_from": str(a)})
    with pytest.raises(CheckpointError, match=r"model\.d_ff=64 in the checkpoint but 128"):
        train(wider, tmp_path / "c", quiet=True)
    assert not (tmp_path / "c").exists()


def test_a_run_from_another_runs_params_reads_text_with_that_runs_tokenizer(tmp_path, text_corpus):
    """train.init_from with data.tokenizer='bpe:N' takes the source's N-token BPE (one trained on the new corpus
    would give the embeddings' ids to other strings); a tokenizer with other ids is one line before any write."""
    theirs = HFTokenizer(train_bpe([f"def f{i}(x):\n    return x * {i}\n" for i in range(50)], 300), "bpe:300")
    untrained_workdir(tmp_path / "a", theirs)
    run = tiny_run(
        data={"corpus": str(text_corpus), "tokenizer": "bpe:300", "seq_len": 64, "val_fraction": 0.2},
        train={"init_from": str(tmp_path / "a")},
    )
    text = sorted(text_corpus.rglob("*.py"))[0].read_text()[:400]
    corpus_bpe = data_lib.load(run.data, tmp_path / "fresh").tokenizer  # what data.load alone would train
    assert corpus_bpe.encode(text) != theirs.encode(text)
    loop.start_tokenizer(run, restore_params(tmp_path / "a"), tmp_path / "b")
    ours = data_lib.load(run.data, tmp_path / "b").tokenizer
    assert ours.encode(text) == theirs.encode(text) and ours.fingerprint == theirs.fingerprint

    for spec in ("bytes", "bpe:320"):
        other = dataclasses.replace(run, data=dataclasses.replace(run.data, tokenizer=spec))
        message = rf"data\.tokenizer='{spec}': train\.init_from=.* was trained with 'bpe:300' \(300 tokens\)"
        with pytest.raises(ConfigError, match=message + r".*use data\.tokenizer='bpe:300'$"):
            train(other, tmp_path / "c", quiet=True)
        assert not (tmp_path / "c").exists()


def test_tokenizers_round_trip_through_checkpoint_meta():
    texts = [f"def f{i}(x):\n    return x + {i}\n" for i in range(50)]
    bpe = HFTokenizer(train_bpe(texts, 300), "bpe:300")
    rebuilt = tokenizer_from_dict(json.loads(json.dumps(tokenizer_to_dict(bpe))))
    assert rebuilt.fingerprint == bpe.fingerprint and rebuilt.encode(texts[3]) == bpe.encode(texts[3])
    assert rebuilt.eod_id == bpe.eod_id and (rebuilt.token_bytes == bpe.token_bytes).all()
    assert isinstance(tokenizer_from_dict(tokenizer_to_dict(ByteTokenizer())), ByteTokenizer)


# argv: a checkpoints directory written on one device, one to write, the expected arrays (.npz). Restores the
# first sharded over 8 devices, checks it, and saves it from there into the second.
ACROSS_LAYOUTS = """
import sys
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from training.checkpoint import Checkpointer
from training.config import CheckpointConfig

want = dict(np.load(sys.argv[3]))
mesh = Mesh(np.array(jax.devices()), ("data",))

def spread(leaf):
    axes = [i for i, n in enumerate(leaf.shape) if n % 8 == 0]
    return NamedSharding(mesh, P(*[None] * axes[0], "data") if axes else P())

source = Checkpointer(sys.argv[1])
restored = source.restore(lambda run: {"params": {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in want.items()}}, shardings=spread)
assert len(jax.devices()) == 8
for name, leaf in restored.arrays["params"].items():
    assert leaf.sharding == spread(leaf), (name, leaf.sharding)
    np.testing.assert_array_equal(np.asarray(leaf), want[name])
assert not restored.arrays["params"]["kernel"].sharding.is_fully_replicated
target = Checkpointer(sys.argv[2], CheckpointConfig())
target.save(restored.step, restored.arrays, restored.train, restored.meta)
target.close()
"""


def test_a_checkpoint_restores_onto_another_device_layout(tmp_path):
    rng = np.random.default_rng(0)
    params = {
        "kernel": rng.normal(size=(6, 16)).astype(np.float32),
        "bias": rng.normal(size=(5,)).astype(np.float32),
        "count": np.int32(7),
    }
    np.savez(tmp_path / "want.npz", **params)
    meta = meta_for(with_vocab(tiny_run(), 257), ByteTokenizer())
    one = Checkpointer(tmp_path / "one", tiny_run().checkpoint)
    one.save(3, {"params": jax.device_put(params)}, {"step": 3}, meta)
    one.close()

    script = [sys.executable, "-c", ACROSS_LAYOUTS, *(str(tmp_path / p) for p in ("one", "eight", "want.npz"))]
    env = subprocess_env(XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")
    done = subprocess.run(script, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    eight = Checkpointer(tmp_path / "eight")
    restored = eight.restore(lambda run: {"params": params})
    eight.close()
    assert restored.step == 3 and restored.train == {"step": 3}
    for name, leaf in restored.arrays["params"].items():
        assert leaf.sharding == jax.sharding.SingleDeviceSharding(jax.devices()[0])
        np.testing.assert_array_equal(np.asarray(leaf), params[name])


def test_a_checkpoint_from_before_window_positions_resumes_at_its_batch_count_times_its_batch_size():
    old = types.SimpleNamespace(train={"data": {"next_index": 5}}, run=tiny_run(train={"batch_size": 4}))
    new = types.SimpleNamespace(train={"data": {"windows": 20}}, run=tiny_run(train={"batch_size": 8}))
    assert loop.stream_position(old) == loop.stream_position(new) == 20
