"""training/allocator: XLA:CPU's per-step buffers stop faulting in fresh pages once the policy is applied, and the
policy stays off where it does not belong."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from tests.conftest import REPO
from training import allocator

# A jitted step whose 64 MiB temporary (the [4096, 4096] product) XLA:CPU allocates and frees on every call: the
# median of the minor page faults per call, after warm-up, with and without the policy. (With it, the heap still
# grows now and then in its first tens of calls while its free blocks settle into place, hence the median.)
PROBE = """
import json, resource, statistics, sys
from training.allocator import reuse_freed_memory
why = reuse_freed_memory() if sys.argv[1] == "on" else "off"
import jax, jax.numpy as jnp
step = jax.jit(lambda a, b: jnp.tanh(a @ b) @ a)
a, b = jnp.ones((4096, 64)) / 64, jnp.ones((64, 4096))
faults = []
for i in range(20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step(a, b).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"why": why, "faults_per_call": statistics.median(faults[5:])}))
"""


def probe(mode: str, **extra_env: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "JAX_LM_MALLOC"}
    env.update(JAX_PLATFORMS="cpu", **extra_env)
    done = subprocess.run(
        [sys.executable, "-c", PROBE, mode], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


GLIBC = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_policy_stops_per_step_page_faults():
    off, on = probe("off"), probe("on")
    assert on["why"] is None
    # 64 MiB is 16,384 pages of 4 KiB: without the policy each call faults most of them in again.
    assert off["faults_per_call"] > 4000, off
    assert on["faults_per_call"] < 200, on
    # The same policy as environment variables (how benchmarks/vs_torch.py gives it to PyTorch).
    assert probe("off", **allocator.environment())["faults_per_call"] < 200


def test_blocker(monkeypatch):
    for key in [k for k in os.environ if k.startswith("MALLOC_") or k == "JAX_LM_MALLOC"]:
        monkeypatch.delenv(key)
    monkeypatch.setattr(allocator, "accelerator_plugins", lambda: [])
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    if not GLIBC:
        assert allocator.blocker().startswith("not Linux with glibc")
        return
    assert allocator.blocker() is None
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert allocator.blocker() == "JAX_PLATFORMS=cuda,cpu"
    monkeypatch.delenv("JAX_PLATFORMS")
    assert allocator.blocker() is None
    monkeypatch.setattr(allocator, "accelerator_plugins", lambda: ["xla_cuda12"])
    assert allocator.blocker() == "accelerator plugins installed (xla_cuda12)"
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # forcing CPU wins over installed plugins
    assert allocator.blocker() is None
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert allocator.blocker() == "MALLOC_ARENA_MAX set in the environment"
    monkeypatch.setenv("JAX_LM_MALLOC", "system")
    assert allocator.blocker() == "JAX_LM_MALLOC=system"
