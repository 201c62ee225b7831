"""Train a language model from a config.

    python train.py --config configs/tiny.py --workdir runs/tiny --config.train.steps=500

Re-running the same command with the same workdir resumes from its latest complete checkpoint. SIGTERM
(preemption) or Ctrl-C finishes the current step, writes a checkpoint and exits with code 0 (a second Ctrl-C
abandons that checkpoint). A workdir holds one run at a time: a second run there exits with code 2.

The mesh comes from `config.mesh` (e.g. --config.mesh.fsdp=8). On several hosts, start one process per host
with --coordinator_address, --num_processes and --process_id (or let SLURM / Cloud TPU set them).
`--dry_run` compiles the step for the mesh on abstract shapes and prints per-device memory, FLOPs and
collectives instead of training. `--fake_devices=N` runs (or plans) on N fake CPU devices: the way to try a mesh on a
laptop; such runs get long collective timeouts, and a collective that still times out ends in one line
(parallel/cpu_devices.py).

Bad config values, data inputs, meshes or checkpoints print one line and exit with code 2; a diverged run
(non-finite loss) exits with code 1.
"""

from __future__ import annotations

import functools
import os
import sys

from absl import app, flags, logging

from data import DataError
from parallel.cpu_devices import (
    SUPERVISED,
    forced_device_count,
    raise_collective_timeouts,
    supervise,
    with_fake_device_flags,
)
from parallel.distributed import DistributedError, initialize
from parallel.mesh import MeshError
from training.allocator import reuse_freed_memory
from training.checkpoint import CheckpointError
from training.cli import define_config_file, fail
from training.cli import parse_flags as parse_any_flags
from training.config import ConfigError, resolve
from training.dry_run import dry_run, report
from training.loop import run_summary, train
from training.workdir import WorkdirError

_CONFIG = define_config_file("config", "configs/tiny.py", "Config file (a get_config(arg) module).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, samples and the resolved config.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Compile the train step for the mesh and print the plan; no training.")
_FAKE_DEVICES = flags.DEFINE_integer(
    "fake_devices", None, "Run (or with --dry_run plan) on this many fake CPU devices."
)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host: how many processes take part.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's index in [0, num_processes).")


# What a bad --config file or override raises while absl loads it.
CONFIG_ERRORS = (ValueError, KeyError, AttributeError, TypeError, FileNotFoundError)
parse_flags = functools.partial(parse_any_flags, config_errors=CONFIG_ERRORS)


def use_fake_devices(count: int) -> None:
    """Makes JAX see `count` CPU devices; must run before JAX starts its backends."""
    if count < 1:
        fail(f"--fake_devices={count}: must be >= 1")
    os.environ["XLA_FLAGS"] = with_fake_device_flags(os.environ.get("XLA_FLAGS", ""), count)  # and longer timeouts
    os.environ["JAX_PLATFORMS"] = "cpu"


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])}")
    reuse_freed_memory()  # before JAX starts its CPU client (training/allocator.py)
    if _FAKE_DEVICES.value is not None:
        use_fake_devices(_FAKE_DEVICES.value)
    if not _WORKDIR.value and not _DRY_RUN.value:
        fail("--workdir is required")
    raise_collective_timeouts()  # wherever XLA_FLAGS forces the device count
    if forced_device_count() is not None and not _DRY_RUN.value and not os.environ.get(SUPERVISED):
        # XLA aborts a run whose collective times out: a parent process turns that into one line.
        sys.exit(supervise([sys.executable, *sys.argv], os.path.join(_WORKDIR.value, "xla_collectives.log")))
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
    try:
        run = resolve(_CONFIG.value)
        if _DRY_RUN.value:
            print(report(dry_run(run)))
            return
        initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
        result = train(run, _WORKDIR.value)
    except (ConfigError, DataError, CheckpointError, MeshError, DistributedError, WorkdirError) as e:
        fail(str(e))
    except FloatingPointError as e:  # a diverged run: one line, not a traceback
        fail(str(e), code=1)
    print(run_summary(result))
    if result["preempted"]:
        print(f"preempted at step {result['step']}; re-run the same command to resume")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
