"""The XLA flags every test process compiles with: the suite compiles thousands of tiny programs, each run a few
times, and checks semantics, not speed, so compile time is what these flags cut.

- `--xla_backend_optimization_level=0`: LLVM at -O0; tiny programs compile ~3x faster.
- `--xla_cpu_use_fusion_emitters=false`: XLA:CPU's elemental IR emitters instead of its MLIR fusion emitters. A tiny
  model's train step compiles in 0.6 s instead of 1.7 s and runs 20 steps in 0.18 s instead of 0.14 s; three test
  files (test_model, test_sampling, test_engine) take 301 s instead of 365 s, and two 8-device modules 92 s instead of
  131 s (this 2-core VM, jax 0.10.2, 2026-12-07). XLA aborts a process on a flag it does not know, so this one is
  added only where a probe process shows this XLA accepts it.

The elemental emitters round differently and their results depend more on the thread count (tests/golden.py's loop
path moves by 4e-5 relative between one usable core and two, 4e-7 under the default emitters), so the golden losses
are recorded and checked under their own flags, in a subprocess (golden.FLAGS); the suite's other comparisons are
with references at tolerances far above that, or between processes that share the suite's flags.

Imports no JAX: tests/conftest.py sets XLA_FLAGS before JAX starts, and the xdist workers and every subprocess a
test starts inherit them.
"""

from __future__ import annotations

import os
import subprocess
import sys

FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")
REFUSED = "JAX_LM_TEST_XLA_FLAGS_REFUSED"  # set by with_test_flags for the processes it starts
PROBED = ("--xla_cpu_use_fusion_emitters",)  # an XLA:CPU option of recent XLA, which a later one may drop


def name(flag: str) -> str:
    return flag.split("=")[0]


def accepted(flag: str) -> bool:
    """Whether a JAX process starts its CPU client with `flag` in XLA_FLAGS (about a second)."""
    env = {**os.environ, "XLA_FLAGS": flag, "JAX_PLATFORMS": "cpu"}
    probe = [sys.executable, "-c", "import jax; jax.devices()"]
    return subprocess.run(probe, env=env, capture_output=True, timeout=120).returncode == 0


def with_test_flags(xla_flags: str) -> str:
    """`xla_flags` (an XLA_FLAGS value) plus each of FLAGS it does not set already (the caller's choice is kept).
    Probes once per session: the processes it starts inherit REFUSED, naming the flags this XLA does not accept."""
    names = {name(f) for f in xla_flags.split()}
    refused = set(os.environ.get(REFUSED, "").split())
    added = []
    for flag in FLAGS:
        if name(flag) in names or name(flag) in refused:
            continue
        if name(flag) in PROBED and not accepted(flag):
            refused.add(name(flag))
            continue
        added.append(flag)
    os.environ[REFUSED] = " ".join(sorted(refused))
    return " ".join([*xla_flags.split(), *added])


def compile_flags(xla_flags: str) -> str:
    """The flags of `xla_flags` that FLAGS names, in FLAGS' order: what a subprocess test passes on, and what
    tests/golden.py counts in a recording's environment."""
    given = {name(f): f for f in xla_flags.split()}
    return " ".join(given[name(f)] for f in FLAGS if name(f) in given)
