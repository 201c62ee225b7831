"""Runs tests/multidevice/ in a subprocess whose JAX starts with 8 fake CPU devices (this session has one)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

MODULES = sorted(p.name for p in (REPO / "tests" / "multidevice").glob("test_*.py"))
# Seconds each module takes on 2 loaded cores (the longest start first: tests/conftest.py); others: 60.
SECONDS = {"test_experts.py": 135, "test_meshes.py": 95, "test_mtp_mesh.py": 105, "test_sharding.py": 85,
           "test_ring.py": 70, "test_mla_mesh.py": 45, "test_pallas_mesh.py": 70, "test_golden_mesh.py": 40}  # fmt: skip


@pytest.mark.parametrize("module", [pytest.param(m, marks=pytest.mark.slow(SECONDS.get(m, 60))) for m in MODULES])
def test_on_8_devices(module):
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": " ".join([*flags, "--xla_force_host_platform_device_count=8"]),
    }
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", f"tests/multidevice/{module}"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert "passed" in summary and "skipped" not in summary, summary
