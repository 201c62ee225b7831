"""Two processes (4 fake CPU devices each, gloo collectives) form one 8-device mesh through train.py's
multi-host flags and train exactly as one process with 8 devices does."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO
from training.checkpoint import list_steps

FLAGS = [
    "--config=configs/tiny.py",
    "--config.model.d_model=32",
    "--config.model.num_layers=2",
    "--config.model.num_heads=8",
    "--config.model.num_kv_heads=4",
    "--config.model.d_ff=64",
    "--config.model.remat=none",
    "--config.data.seq_len=32",
    "--config.train.steps=6",
    "--config.train.batch_size=8",
    "--config.train.warmup_steps=2",
    "--config.train.log_every=1",
    "--config.train.eval_every=6",
    "--config.train.eval_batches=1",
    "--config.train.sample_tokens=8",
    "--config.checkpoint.every=3",
    "--config.mesh.data=2",
    "--config.mesh.fsdp=4",
    "--config.train.peak_flops=1e12",  # skips measuring the CPU (seconds per process)
]


def env_with_devices(count: int) -> dict:
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        # Backend optimisations off (both sides alike): the comparison is between these processes, not a recording.
        "XLA_FLAGS": " ".join(
            [*flags, f"--xla_force_host_platform_device_count={count}", "--xla_backend_optimization_level=0"]
        ),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def rows(workdir) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow(70)
def test_two_processes_train_like_one(tmp_path):
    one = tmp_path / "one"
    single = subprocess.Popen(
        [sys.executable, "train.py", *FLAGS, f"--workdir={one}"],
        cwd=REPO,
        env=env_with_devices(8),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    two, port = tmp_path / "two", free_port()
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "train.py",
                *FLAGS,
                f"--workdir={two}",
                f"--coordinator_address=localhost:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            ],
            cwd=REPO,
            env=env_with_devices(4),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in [single, *processes]]
    for p, out in zip([single, *processes], outputs):
        assert p.returncode == 0, out[-4000:]
    assert "2 process(es)" in outputs[1] and "over 8 devices" in outputs[1]

    want, got = rows(one), rows(two)
    assert [r["step"] for r in got] == [r["step"] for r in want]  # process 0 alone writes: no duplicate rows
    loss = lambda rs: [r["train/loss"] for r in rs if "train/loss" in r]  # noqa: E731
    np.testing.assert_allclose(loss(got), loss(want), rtol=1e-5)
    np.testing.assert_allclose(got[-1]["eval/loss"], want[-1]["eval/loss"], rtol=1e-5)
    assert list_steps(two) == [3, 6]  # both processes wrote their shards of each checkpoint
    assert (two / "samples.txt").read_text() == (one / "samples.txt").read_text()
