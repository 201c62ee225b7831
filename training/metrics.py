"""Metric sinks (JSON lines and TensorBoard), the clock that times training steps, and the peaks figures are
measured against: FLOP/s for MFU, memory bandwidth for decoding."""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import pathlib
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

# Dense peak FLOP/s per chip by compute dtype (float32 matmuls run as TF32 on these GPUs).
PEAK_FLOPS = {
    "H200": {"bfloat16": 989e12, "float32": 495e12},
    "H100": {"bfloat16": 989e12, "float32": 495e12},
    "A100": {"bfloat16": 312e12, "float32": 156e12},
    "L4": {"bfloat16": 121e12, "float32": 60e12},
    "TPU v4": {"bfloat16": 275e12, "float32": 275e12},
    "TPU v5 lite": {"bfloat16": 197e12, "float32": 197e12},
    "TPU v5p": {"bfloat16": 459e12, "float32": 459e12},
    "TPU v5": {"bfloat16": 459e12, "float32": 459e12},
    "TPU v6 lite": {"bfloat16": 918e12, "float32": 918e12},
}

# Memory bandwidth in bytes/s per chip, what a decode step's cache reads are measured against (the first name found
# in the device kind counts: the PCIe and 40 GB parts before their families).
PEAK_BANDWIDTH = {
    "H200": 4.8e12,
    "H100 PCIe": 2.0e12,
    "H100": 3.35e12,
    "A100-SXM4-40GB": 1.555e12,
    "A100-PCIE-40GB": 1.555e12,
    "A100 80GB PCIe": 1.935e12,
    "A100": 2.039e12,
    "L4": 300e9,
    "TPU v4": 1.2e12,
    "TPU v5 lite": 819e9,
    "TPU v5p": 2.765e12,
    "TPU v5": 2.765e12,
    "TPU v6 lite": 1.64e12,
}


def peak_bandwidth() -> tuple[float, str] | None:
    """(memory bytes/s of one device, where the number comes from), or None where the table has no entry (CPUs)."""
    device = jax.devices()[0]
    for name, bandwidth in PEAK_BANDWIDTH.items():
        if device.platform != "cpu" and name.lower() in device.device_kind.lower():
            return bandwidth, f"table: {name}"
    return None


def matmul_flops(n: int = 2048, repeats: int = 4) -> float:
    """Best observed FLOP/s of an n x n float32 matmul on the default device over `repeats` runs."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, a).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def machine() -> dict:
    """What a CPU's measured peak depends on: the CPU model and its flags, the cores this process may use, and JAX."""
    cpuinfo = pathlib.Path("/proc/cpuinfo").read_text() if pathlib.Path("/proc/cpuinfo").is_file() else ""
    field = lambda name: next(
        (line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith(name)), ""
    )  # noqa: E731
    return {
        "cpu": field("model name") or platform.processor() or platform.machine(),
        "flags": hashlib.sha256(field("flags").encode()).hexdigest()[:16],
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "jax": jax.__version__,
    }


def peak_cache_file(key: dict) -> pathlib.Path:
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return pathlib.Path(base) / "jax-lm" / "peak_flops" / f"{digest}.json"


@functools.cache
def measured_cpu_peak(tries: int = 5) -> tuple[float, str]:
    """(the CPU 'peak', where it comes from): measured once per machine, as the best of `tries` measurements a
    moment apart, and cached under $XDG_CACHE_HOME/jax-lm/peak_flops keyed by `machine()`. A peak measured afresh
    at every start moved with the machine's load (MFU from 25% to 134% between runs of one config)."""
    key = machine()
    path = peak_cache_file(key)
    try:
        return float(json.loads(path.read_text())["peak_flops"]), f"measured float32 matmul, cached in {path}"
    except (OSError, ValueError, KeyError, TypeError):
        pass
    best = 0.0
    for attempt in range(tries):
        if attempt:
            time.sleep(0.2)  # a moment for a burst of other work to pass
        best = max(best, matmul_flops())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"peak_flops": best, **key}, indent=1) + "\n")
        tmp.rename(path)  # another process measuring at the same time writes a whole file too
    except OSError:
        return best, f"measured float32 matmul, best of {tries} (not cached: cannot write {path})"
    return best, f"measured float32 matmul, best of {tries}, cached in {path}"


def peak_flops_per_device(dtype: str) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the number comes from)."""
    device = jax.devices()[0]
    if device.platform != "cpu":
        for name, peaks in PEAK_FLOPS.items():
            if name.lower() in device.device_kind.lower():
                return peaks.get(dtype, peaks["bfloat16"]), f"table: {name} {dtype}"
    return measured_cpu_peak()


def peak_flops(dtype: str, num_devices: int, per_device: float = 0.0) -> tuple[float, str]:
    """(peak FLOP/s of all `num_devices` together, where the number comes from); `per_device` > 0 overrides
    the table. On CPU the matmul measured on one device already uses every core of its host, so the
    peak is per process: fake devices of one host share the same cores."""
    if per_device > 0:
        return per_device * num_devices, "train.peak_flops"
    peak, source = peak_flops_per_device(dtype)
    if jax.devices()[0].platform == "cpu":
        return peak * jax.process_count(), source
    return peak * num_devices, source


class StepClock:
    """Wall time spent in training steps, excluding what the loop does between them (eval, saves, logs).

    Steps are dispatched asynchronously, so a pause first waits for the last dispatched step: the time that
    step still takes counts as training, not as the eval or save that follows. Every step counted since the
    last `interval()` shares the interval's time, so (tokens per step x steps) / seconds is what the steps
    really ran at, and the seconds of all intervals add up to the training wall time.
    """

    def __init__(self):
        self.seconds = 0.0  # of the current interval, up to the last pause
        self.steps = 0  # dispatched in the current interval
        self.total_seconds = 0.0  # of every interval so far
        self.running_since: float | None = time.perf_counter()

    def step(self) -> None:
        self.steps += 1

    def pause(self, result) -> None:
        """Stops the clock once `result` (the last step's output) is ready; a no-op when already paused."""
        if self.running_since is None:
            return
        jax.block_until_ready(result)
        elapsed = time.perf_counter() - self.running_since
        self.seconds += elapsed
        self.total_seconds += elapsed
        self.running_since = None

    def resume(self) -> None:
        if self.running_since is None:
            self.running_since = time.perf_counter()

    def interval(self, result) -> tuple[float, int]:
        """(seconds, steps) since the last call, the clock paused on `result`; starts the next interval."""
        self.pause(result)
        out = (self.seconds, self.steps)
        self.seconds, self.steps = 0.0, 0
        return out


def mfu_warning(mfu: float, peak: float, source: str) -> str | None:
    """The line to print when an MFU above 1 shows that the peak it was divided by is too low."""
    if mfu <= 1:
        return None
    return (
        f"warning: perf/mfu={mfu:.2f} > 1, so the peak of {peak / 1e9:,.4g} GFLOP/s ({source}) is too low "
        "(on CPU it is measured once per machine, under the load it had then: delete the cached file it names to "
        "measure again); set train.peak_flops to the real per-device peak"
    )


def summary_writer() -> type:
    """tensorboardX's SummaryWriter, imported without PyTorch: where torch is installed, tensorboardX imports it at
    once (a second of every run's start-up, 1.0 s of 1.5 s here) only to accept torch tensors, which we never pass."""
    blocked = "torch" not in sys.modules
    if blocked:
        sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX expects
    try:
        from tensorboardX import SummaryWriter
    finally:
        if blocked:
            del sys.modules["torch"]
    return SummaryWriter


class MetricsWriter:
    """Appends `{"step": s, name: value, ...}` lines to metrics.jsonl and scalars to TensorBoard."""

    def __init__(self, workdir: pathlib.Path, enabled: bool = True):
        self.enabled = enabled
        self.path = workdir / "metrics.jsonl"
        self.tb = None
        if enabled:
            self.tb = summary_writer()(str(workdir / "tensorboard"))

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _scalar(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        for name, value in row.items():
            if name != "step" and isinstance(value, (int, float)):
                self.tb.add_scalar(name, value, step)
        self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _scalar(v):
    if isinstance(v, (np.ndarray, jax.Array)):
        v = v.item()
    return float(v) if isinstance(v, (float, np.floating)) else v
