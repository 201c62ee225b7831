"""glibc's allocator set up for XLA:CPU at process start-up, so each train step reuses the last one's memory.

XLA:CPU allocates a step's large temporaries (the logits, the layer scan's stacked residuals: tens of MB each)
with malloc and frees them when the step ends. By default glibc serves blocks this large with mmap (or from a
worker thread's own arena, which falls back to mmap) and returns them to the kernel when they are freed, so every
step faults the same memory in again, one zeroed page at a time: about 100k page faults a step for
configs/bench_10m.py, 8% of the CPU's time. One arena, no mmap'd blocks and no trimming keep freed blocks in the
heap for the next step (BENCHMARKS.md: 1.075x faster steps for bench_10m, 1.19x for tiny, on a 2-core CPU). The heap then stays at its
peak size, which is what a training process needs again next step anyway. It is for training processes only:
decoding runs many small steps whose allocations then contend for the one arena (benchmarks/decode.py: batch-32
decoding ~9% slower), so infer.py keeps glibc's defaults.

`reuse_freed_memory()` must run before JAX starts its CPU client: XLA's threads pick their arena at their first
malloc. It changes nothing where the run is not CPU-only (an accelerator plugin is installed, or JAX_PLATFORMS
names another platform), outside Linux/glibc, where the environment already sets a MALLOC_* variable (the user's
choice wins), or with JAX_LM_MALLOC=system (glibc's defaults, e.g. for an A/B of this policy).
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import pkgutil
import platform
import sys

# mallopt(3) parameters (glibc's malloc.h) and the values set.
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
POLICY = {
    M_ARENA_MAX: 1,  # every thread allocates from the main heap (a thread arena would mmap the largest blocks)
    M_MMAP_MAX: 0,  # no block is served by mmap, so none goes back to the kernel when freed
    M_TRIM_THRESHOLD: 2**31 - 1,  # never shrink the heap: the next step needs the same memory again
}


# The same policy as glibc's environment variables, for processes that are not ours (e.g. benchmarks' peers).
ENVIRONMENT = {
    "MALLOC_ARENA_MAX": M_ARENA_MAX,
    "MALLOC_MMAP_MAX_": M_MMAP_MAX,
    "MALLOC_TRIM_THRESHOLD_": M_TRIM_THRESHOLD,
}


def environment() -> dict[str, str]:
    """`POLICY` as environment variables that glibc reads when a process starts."""
    return {name: str(POLICY[param]) for name, param in ENVIRONMENT.items()}


def accelerator_plugins() -> list[str]:
    """Accelerator back ends JAX could start here (PJRT plugins it discovers, libtpu), without starting any."""
    names = [ep.name for ep in importlib.metadata.entry_points(group="jax_plugins")]
    try:
        import jax_plugins  # namespace package of path-based plugins

        names += [name for _, name, _ in pkgutil.iter_modules(jax_plugins.__path__)]
    except ImportError:
        pass
    if importlib.util.find_spec("libtpu") is not None:
        names.append("libtpu")
    return sorted(set(names))


def blocker() -> str | None:
    """Why the policy should not be applied in this process, or None when it should."""
    if os.environ.get("JAX_LM_MALLOC") == "system":
        return "JAX_LM_MALLOC=system"
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return f"not Linux with glibc ({sys.platform}, {platform.libc_ver()[0] or 'unknown libc'})"
    if set_by_user := sorted(k for k in os.environ if k.startswith("MALLOC_")):
        return f"{', '.join(set_by_user)} set in the environment"
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        if {p.strip() for p in platforms.split(",")} != {"cpu"}:
            return f"JAX_PLATFORMS={platforms}"
    elif plugins := accelerator_plugins():
        return f"accelerator plugins installed ({', '.join(plugins)})"
    return None


def reuse_freed_memory() -> str | None:
    """Applies `POLICY` with mallopt where `blocker` finds nothing; returns None if applied, else why not."""
    if (reason := blocker()) is not None:
        return reason
    mallopt = ctypes.CDLL("libc.so.6").mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    failed = [param for param, value in POLICY.items() if mallopt(param, value) != 1]
    return f"mallopt refused parameters {failed}" if failed else None
