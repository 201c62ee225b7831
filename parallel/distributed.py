"""Multi-host start-up: one `jax.distributed.initialize` per process, before JAX touches a device.

Either from explicit flags (coordinator address, process count, this process's id), or, with none given,
from a cluster that JAX recognises on its own (SLURM, Open MPI, Cloud TPU pods). A lone process
without flags runs single-host as usual.
"""

from __future__ import annotations

import os

import jax


class DistributedError(ValueError):
    """Inconsistent multi-host flags (a one-line message)."""


def cluster_detected() -> bool:
    """True inside a multi-process job that `jax.distributed.initialize()` can configure by itself."""
    env = os.environ
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_STEP_NODELIST" in env:
        return True
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return True
    return "," in env.get("TPU_WORKER_HOSTNAMES", "")


def initialize(coordinator_address: str | None, num_processes: int | None, process_id: int | None) -> bool:
    """Joins this process to a multi-process JAX job; returns False (and does nothing) for a single process.

    On CPU the processes exchange collectives through gloo, so several local processes (each with fake
    devices) form one mesh, as in the tests.
    """
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes, "process_id": process_id}
    if any(v is not None for v in given.values()):
        missing = [f"--{name}" for name, value in given.items() if value is None]
        if missing:
            raise DistributedError(
                f"multi-host needs --coordinator_address, --num_processes and --process_id; missing {', '.join(missing)}"
            )
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise DistributedError(f"--process_id={process_id}: must be in [0, --num_processes={num_processes})")
        if num_processes == 1:
            return False
    elif not cluster_detected():
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return True
