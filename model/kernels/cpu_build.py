"""Building and loading the C++ CPU kernels (cpu_attention.cc, cpu_quant_matmul.cc) that XLA calls through its FFI.

A kernel's source is compiled on first use with the machine's C++ compiler (`$CXX`, else `c++`) for this CPU
(`-march=native`) and cached under `$XDG_CACHE_HOME/jax-lm/kernels`, keyed by the source (and the headers beside
it, e.g. cpu_vector.h), the compiler, jaxlib's FFI headers and the CPU; the shared library is then loaded and its handlers registered as XLA FFI targets. Where no
compiler is found or the build fails, `KernelUnavailable` says why, and each kernel's `available()` is False.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile

import jax

FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno")


class KernelUnavailable(RuntimeError):
    """A kernel could not be built or loaded here (no compiler, not x86/ARM Linux or macOS, ...)."""


def _cpu_fingerprint() -> str:
    try:
        info = pathlib.Path("/proc/cpuinfo").read_text()
        lines = [line for line in info.splitlines() if line.startswith(("model name", "flags", "Features"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


def cache_dir() -> pathlib.Path:
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "jax-lm" / "kernels"


def compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not cxx:
        raise KernelUnavailable("no C++ compiler found (set $CXX or install g++/clang++)")
    return cxx


@functools.cache
def library(source: pathlib.Path, targets: tuple[tuple[str, str], ...]) -> ctypes.CDLL:
    """Builds `source` (once per source/CPU/compiler) and loads it, registering each (FFI target name, exported
    handler symbol) of `targets` for XLA:CPU."""
    cxx = compiler()
    include = jax.ffi.include_dir()
    headers = [h.read_text() for h in sorted(source.parent.glob("*.h"))]  # what the sources include
    key = hashlib.sha256(
        "\0".join([source.read_text(), *headers, cxx, " ".join(FLAGS), jax.__version__, _cpu_fingerprint()]).encode()
    ).hexdigest()[:16]
    path = cache_dir() / f"{source.stem}-{key}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            built = pathlib.Path(tmp) / path.name
            proc = subprocess.run(
                [cxx, *FLAGS, "-I", include, "-I", str(source.parent), str(source), "-o", str(built)],
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                first = (proc.stderr.strip().splitlines() or ["(no output)"])[0]
                raise KernelUnavailable(f"compiling {source.name} with {cxx} failed: {first}")
            os.replace(built, path)  # atomic: concurrent builders each install a complete file
    lib = ctypes.CDLL(str(path))
    for target, symbol in targets:
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    return lib
