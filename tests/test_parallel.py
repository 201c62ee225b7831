"""Mesh planning without devices: sizes, divisibility checks, the rules table from the config, train.py's
one-line errors and --dry_run, and the realistic configs' parameter counts."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest

from model import param_counts
from parallel.config import DEFAULT_RULES, MeshConfig
from parallel.distributed import DistributedError, initialize
from parallel.layout import plan
from parallel.mesh import MeshError, resolve_sizes
from parallel.sharding import logical_rules
from tests.conftest import REPO, tiny_config, tiny_run
from training.config import ConfigError, resolve, with_vocab


def test_minus_one_takes_the_remaining_devices():
    assert resolve_sizes(MeshConfig(data=-1, fsdp=2, tensor=2), 16) == {
        "data": 4,
        "fsdp": 2,
        "expert": 1,
        "sequence": 1,
        "tensor": 2,
    }
    assert resolve_sizes(MeshConfig(data=2, fsdp=-1), 8)["fsdp"] == 4


@pytest.mark.parametrize(
    "mesh, devices, message",
    [
        (MeshConfig(data=2, fsdp=2), 8, "mesh data=2 x fsdp=2 spans 4 devices but there are 8"),
        (MeshConfig(data=-1, tensor=3), 8, "mesh.data=-1: the other axes span 3 devices, which does not divide the 8"),
        (MeshConfig(data=-1, fsdp=-1), 8, "mesh.data and mesh.fsdp are both -1"),
    ],
)
def test_mesh_that_does_not_fit_the_devices(mesh, devices, message):
    with pytest.raises(MeshError, match=message):
        resolve_sizes(mesh, devices)


@pytest.mark.parametrize(
    "groups, devices, message",
    [
        (
            {"model": {"num_kv_heads": 2}, "mesh": {"data": 1, "tensor": 4}},
            4,
            "model.num_kv_heads=2 does not divide over mesh.tensor=4",
        ),
        (
            {"train": {"batch_size": 4}, "mesh": {"data": 2, "fsdp": 4}},
            8,
            "train.batch_size=4 does not divide over mesh.data=2 x mesh.fsdp=4",
        ),
        (
            {"train": {"batch_size": 8, "grad_accum": 4}, "mesh": {"data": 4}},
            4,
            r"train.batch_size / train.grad_accum=2 does not divide over mesh.data=4",
        ),
        (
            {"data": {"seq_len": 36}, "mesh": {"data": 1, "sequence": 4}},
            4,
            "data.seq_len=36 does not divide into 2 x mesh.sequence=4",
        ),
    ],
)
def test_shapes_that_do_not_divide_over_the_mesh(groups, devices, message):
    """Checked from the config and the device count alone, before a mesh is built (the devices are stand-ins)."""
    with pytest.raises(MeshError, match=message):
        plan(tiny_run(**groups), [object()] * devices)


def test_rules_table_from_the_config():
    c = tiny_config()
    c.mesh.rules.embed = ""  # no ZeRO-3: keep weights whole along d_model
    c.mesh.rules.mlp = "fsdp,tensor"
    rules = resolve(c).mesh.rules
    assert list(rules) == list(DEFAULT_RULES)  # order is precedence; overrides keep their place
    assert rules["embed"] == "" and rules["mlp"] == "fsdp,tensor"
    assert dict(logical_rules(rules))["batch"] == ("data", "fsdp", "expert")
    assert dict(logical_rules(rules))["embed"] is None


@pytest.mark.parametrize(
    "rules, message",
    [
        ({"embedding": "fsdp"}, "mesh.rules.embedding: unknown logical axis"),
        ({"mlp": "model"}, "mesh.rules.mlp='model': unknown mesh axis 'model'"),
        ({"batch": "data,data"}, "a mesh axis appears twice"),
    ],
)
def test_bad_rules_are_config_errors(rules, message):
    c = tiny_config()
    c.mesh.rules = rules
    with pytest.raises(ConfigError, match=message):
        resolve(c)


def test_mesh_sizes_are_checked_with_the_config():
    with pytest.raises(ConfigError, match=r"mesh.tensor=0: must be a positive device count or -1"):
        resolve(tiny_config(mesh={"tensor": 0}))


def test_multi_host_flags_must_come_together():
    with pytest.raises(DistributedError, match="missing --num_processes, --process_id"):
        initialize("localhost:1234", None, None)
    with pytest.raises(DistributedError, match=r"--process_id=2: must be in \[0, --num_processes=2\)"):
        initialize("localhost:1234", 2, 2)
    assert initialize(None, None, None) is False  # one process, no cluster: nothing to join


def run_train(*flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "train.py", "--config=configs/tiny.py", *flags],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_train_py_mesh_error_is_one_line_and_touches_nothing(tmp_path):
    done = run_train(f"--workdir={tmp_path / 'run'}", "--config.mesh.data=3")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == "error: mesh data=3 spans 3 devices but there are 1"
    assert not (tmp_path / "run").exists()


def test_dry_run_plans_for_fake_devices_without_a_workdir(tmp_path):
    done = run_train("--dry_run", "--fake_devices=8", "--config.mesh.data=2", "--config.mesh.fsdp=4")
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "on 8 devices, mesh data=2 x fsdp=4" in out
    for line in (
        "params",
        "optimizer state",
        "temporaries",
        "peak estimate",
        "FLOPs per step",
        "all-gather",
        "all-reduce",
    ):
        assert line in out, out


def test_a_collective_timeout_on_fake_devices_ends_in_one_line(tmp_path, text_corpus):
    """`--fake_devices` trains for real; when XLA stops the run at a collective timeout (here forced: a timeout of
    0 s, so the first collective whose devices do not arrive together), the run ends in one line naming what
    happened and what to do, exit code 1, with XLA's per-thread log in the workdir instead of the terminal."""
    timeouts = (
        "--xla_cpu_collective_call_warn_stuck_timeout_seconds=0 --xla_cpu_collective_call_terminate_timeout_seconds=0"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " " + timeouts}
    workdir = tmp_path / "run"
    flags = ["--fake_devices=8", "--config.mesh.data=8", f"--workdir={workdir}", f"--config.data.corpus={text_corpus}"]
    flags += [
        f"--config.model.{k}={v}"
        for k, v in dict(d_model=32, num_layers=1, num_heads=2, num_kv_heads=2, d_ff=64).items()
    ]
    done = subprocess.run(
        [sys.executable, "train.py", "--config=configs/tiny.py", *flags, "--config.train.peak_flops=1e12"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 1, done.stderr[-3000:]
    assert last.startswith("error: 8 fake CPU devices on ") and "waited more than 0 s" in last, last
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    warned = next(i for i, line in enumerate(lines) if line.startswith("warning: fake CPU devices are waiting"))
    assert lines[warned + 1 :] == [last], done.stderr[-3000:]  # nothing of XLA's or Python's abort in between
    assert not any("rendezvous.cc" in line for line in lines), done.stderr[-3000:]
    assert "Termination timeout" in (workdir / "xla_collectives.log").read_text()


@pytest.mark.parametrize(
    "config, published",
    [
        ("llama_1b", 1_235_814_400),  # meta-llama/Llama-3.2-1B
        ("llama_8b", 8_030_261_248),  # meta-llama/Meta-Llama-3-8B
    ],
)
def test_realistic_configs_have_the_published_parameter_counts(config, published):
    run = with_vocab(resolve(importlib.import_module(f"configs.{config}").get_config()), 128_256)
    assert param_counts(run.model).total == published
