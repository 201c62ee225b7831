"""Recorded 20-step train/loss values of configs/tiny.py's model (on a small generated corpus) for each way the
layers can run: the model refactors keep them bit-identical.

    python tests/golden.py               # prints the one-device paths' losses of this checkout
    python tests/golden.py --devices 8   # the 8-device mesh path
    add --record to write them into tests/fixtures/golden_losses.json (only when the math changes on purpose)

tests/test_golden.py runs it as a subprocess (`run`), under the compile flags the losses were recorded with (FLAGS),
not the suite's own (tests/xla_flags.py).

What "exact" means. A run's bits are a function of the program and of the environment that compiles and runs it,
and the fixture records that environment (`machine()`): the jax/jaxlib/numpy versions, the CPU's model, its
instruction-set flags and cache sizes, the cores the process may use, the C++ compiler that builds the CPU
attention kernel, and XLA's compile flags. Two machines sold as the same kind differed here: on the 2-core AMD EPYC
(family 25 model 17) that recorded the values and on another of that kind, the losses agree to step 3 and then drift
by up to 5e-6 relative. Each of these alone changes the bits on one machine: one usable core instead of two
(XLA:CPU's Eigen contractions split their work by thread count), the kernel built for 256-bit instead of 512-bit
vectors (summation order), and XLA's compile flags (FLAGS); background load does not (the same bits with two busy
processes beside the run, and in separate processes). So where the whole fingerprint matches, the losses must be
bit-identical; elsewhere they must agree within `RTOL`, 10x the largest cross-machine drift seen, which a real change
of the math still fails (tests/test_golden.py names the mutations checked).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "golden_losses.json"

# path name -> (model overrides, mesh overrides); "mesh8" runs with 8 devices, the others with one (where
# configs/tiny.py's attention runs as the C++ CPU kernel).
PATHS = {
    "unrolled": ({}, {}),  # configs/tiny.py as it is: scan with every layer unrolled
    "scanned": ({"scan_unroll": 1}, {}),
    "loop": ({"scan_layers": False}, {}),
    "mesh8": ({}, {"data": 2, "fsdp": 2, "tensor": 2}),
}
EIGHT_DEVICES = ("mesh8",)


# Relative tolerance where the environment differs from the recording's (see the module docstring).
RTOL = 5e-5
# The compile flags the losses are recorded and checked under: XLA:CPU's default emitters at LLVM -O0. Not the
# suite's faster-compiling elemental emitters (tests/xla_flags.py): under those, the loop path's losses move by 4e-5
# relative between one usable core and two (4e-7 under these), near RTOL.
FLAGS = "--xla_backend_optimization_level=0"


def _caches() -> str:
    """'L1d:48K L1i:32K L2:2048K L3:32768K' from sysfs (Eigen sizes its matmul blocks by them)."""
    found = []
    for index in sorted(pathlib.Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level, kind, size = ((index / name).read_text().strip() for name in ("level", "type", "size"))
        except OSError:
            continue
        suffix = {"Data": "d", "Instruction": "i"}.get(kind, "")
        found.append(f"L{level}{suffix}:{size}")
    return " ".join(found)


def _compiler() -> str:
    """The first line of `c++ --version` for the compiler that builds the CPU attention kernel."""
    import subprocess

    from model.kernels import cpu_build

    try:
        done = subprocess.run([cpu_build.compiler(), "--version"], capture_output=True, text=True)
        return done.stdout.splitlines()[0] if done.stdout else ""
    except (cpu_build.KernelUnavailable, OSError):
        return "none"


def machine() -> dict:
    """The environment the recorded bits belong to (the module docstring says why each part): what the CPU's
    measured peak is keyed by (training/metrics.py: CPU model, flags, usable cores, jax), and more."""
    import jaxlib
    import numpy

    from tests.xla_flags import compile_flags
    from training.metrics import machine as cpu

    versions = {"jaxlib": jaxlib.__version__, "numpy": numpy.__version__}
    xla = compile_flags(os.environ.get("XLA_FLAGS", ""))
    return {**cpu(), **versions, "caches": _caches(), "cxx": _compiler(), "xla_flags": xla}


def write_corpus(root: pathlib.Path) -> pathlib.Path:
    """A deterministic corpus of Python-like documents (no dependence on the interpreter's stdlib)."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(16):
        body = "".join(f"def f{i}_{j}(x, y={j}):\n    return x * {j} + y - {i}\n\n" for j in range(60))
        (root / f"mod{i:02d}.py").write_text(body)
    return root


def golden_config(path: str):
    from configs import tiny

    model, mesh = PATHS[path]
    c = tiny.get_config()
    c.model.update(model)
    c.data.update(seq_len=64, val_fraction=0.1)
    c.train.update(steps=20, batch_size=8, warmup_steps=5, log_every=1, eval_every=1000, eval_batches=1)
    c.train.update(sample_tokens=0, peak_flops=1e12)
    c.checkpoint.every = 1000
    c.mesh.update({"data": 1, **mesh})
    return c


def losses(path: str, workdir: pathlib.Path) -> list[float]:
    from training.config import resolve
    from training.loop import train

    c = golden_config(path)
    c.data.corpus = str(write_corpus(workdir / "corpus"))
    train(resolve(c), workdir / "run", quiet=True)
    rows = [json.loads(line) for line in (workdir / "run" / "metrics.jsonl").read_text().splitlines()]
    return [row["train/loss"] for row in rows if "train/loss" in row]


def recorded(path: str) -> list[float]:
    return json.loads(FIXTURE.read_text())["losses"][path]


def run(devices: int) -> dict:
    """{"losses": {path: [...]}, "exact": bool} of the paths with `devices` devices, computed by this file in a
    subprocess under FLAGS (the caller's JAX keeps its own flags); "exact": the environment is the recording's."""
    command = [sys.executable, str(pathlib.Path(__file__).resolve()), "--devices", str(devices), "--json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Print (or --record) this checkout's golden losses.")
    parser.add_argument("--devices", type=int, default=1, choices=(1, 8), help="1: the one-device paths; 8: mesh8")
    parser.add_argument("--record", action="store_true", help="write them into tests/fixtures/golden_losses.json")
    parser.add_argument("--json", action="store_true", help="end with one JSON line: the losses, and whether exact")
    args = parser.parse_args()
    devices = args.devices
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from parallel.cpu_devices import with_fake_device_flags

    os.environ["XLA_FLAGS"] = with_fake_device_flags(FLAGS, devices) if devices > 1 else FLAGS
    os.environ["JAX_PLATFORMS"] = "cpu"
    names = [n for n in PATHS if (n in EIGHT_DEVICES) == (devices == 8)]
    fixture = json.loads(FIXTURE.read_text()) if FIXTURE.exists() else {"machine": machine(), "losses": {}}
    exact = fixture["machine"] == machine()
    got = {}
    for name in names:
        with tempfile.TemporaryDirectory() as tmp:
            os.environ["XDG_CACHE_HOME"] = tmp
            got[name] = losses(name, pathlib.Path(tmp))
        print(name, got[name], flush=True)
    if args.record:
        fixture["machine"] = machine()
        fixture["losses"].update(got)
        FIXTURE.write_text(json.dumps(fixture, indent=1) + "\n")
        print(f"wrote {FIXTURE}")
    if args.json:
        print(json.dumps({"losses": got, "exact": exact}))
