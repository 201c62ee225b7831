"""Runs tests/multidevice/ in subprocesses whose JAX starts with 8 fake CPU devices (this session has one).

The modules run in two groups, one subprocess each (a JAX start-up, and the programs modules share, paid once per
group rather than once per module); under xdist the two go to different workers first (tests/conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

MODULES = sorted(p.name for p in (REPO / "tests" / "multidevice").glob("test_*.py"))
# Seconds each module takes on 2 loaded cores (measured one module per process, 2026-12-06); a module not listed
# counts 60. The groups balance these.
SECONDS = {"test_experts.py": 108, "test_meshes.py": 71, "test_mtp_mesh.py": 27, "test_sharding.py": 41,
           "test_ring.py": 59, "test_mla_mesh.py": 47, "test_pallas_mesh.py": 69, "test_sharded_decode.py": 105}  # fmt: skip


def groups(modules: list[str], count: int = 2) -> list[list[str]]:
    """`modules` shared out longest first, each to the group with the least so far."""
    out, loads = [[] for _ in range(count)], [0] * count
    for module in sorted(modules, key=lambda m: -SECONDS.get(m, 60)):
        i = loads.index(min(loads))
        out[i].append(module)
        loads[i] += SECONDS.get(module, 60)
    return [sorted(g) for g in out if g]


GROUPS = groups(MODULES)


@pytest.mark.parametrize(
    "group",
    [pytest.param(g, marks=pytest.mark.slow(sum(SECONDS.get(m, 60) for m in g))) for g in GROUPS],
    ids=["+".join(m.removeprefix("test_").removesuffix(".py") for m in g) for g in GROUPS],
)
def test_on_8_devices(group):
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": " ".join([*flags, "--xla_force_host_platform_device_count=8"]),
    }
    paths = [f"tests/multidevice/{m}" for m in group]
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfE", *paths]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    assert done.returncode == 0, done.stdout[-8000:] + done.stderr[-3000:]
    assert "passed" in summary and "skipped" not in summary, summary
