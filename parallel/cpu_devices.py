"""Fake CPU devices: trying a mesh on one machine, with collective timeouts that survive a loaded CPU.

`--xla_force_host_platform_device_count=N` (train.py's `--fake_devices=N` sets it) makes XLA:CPU show N devices,
each a set of threads sharing the host's cores. XLA:CPU aborts a process whose devices wait longer than its
timeouts for each other at a collective (defaults: a warning at 20 s, abort at 40 s), and on a loaded 2-core machine
a rendezvous can starve that long without any deadlock. Finding (issue 23, an 8-device data=2 x sequence=4 ring run
aborted at a collective-permute while some devices sat in an all-gather): it is starvation, not a program-order
deadlock. Every device runs the same SPMD program, and XLA:CPU's thunk executor chains all collective thunks of a
program on one shared "collective communicator" resource so each device launches them in HLO order
(xla/backends/cpu/runtime/resource_use.h); what differs is when each device's threads get a core. So wherever the
device count is forced, the timeouts are raised (`raise_collective_timeouts`). The flag names are the ones jaxlib
0.10's XLA accepts (checked with `strings` on libjax_common.so and by starting JAX with each).

If a collective still times out (a real hang, or a machine loaded for minutes), XLA logs every waiting thread and
aborts the process; no Python code runs after that. `supervise` therefore runs the command as a child process,
passes its output through, keeps XLA's rendezvous lines out of the terminal (they go to a log file), and turns the
abort into one line that says what happened and what to do.

Imports no JAX: it must run before JAX starts its CPU client.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

COUNT_FLAG = "--xla_force_host_platform_device_count"
TERMINATE_FLAG = "--xla_cpu_collective_call_terminate_timeout_seconds"
TIMEOUT_XLA_FLAGS = (
    "--xla_cpu_collective_call_warn_stuck_timeout_seconds=120",
    f"{TERMINATE_FLAG}=900",
    "--xla_cpu_collective_timeout_seconds=900",
)
SUPERVISED = "JAX_LM_SUPERVISED"  # set in the child, so it does not supervise itself
# XLA's log lines from its rendezvous (glog's prefix: severity, date, time, thread, file:line).
RENDEZVOUS_LINE = re.compile(r"^[IWEF]\d{4} [\d:.]+\s+\d+ rendezvous\.cc:\d+\] ?(.*)$")


def with_fake_device_flags(xla_flags: str, count: int | None = None) -> str:
    """`xla_flags` (an XLA_FLAGS value) plus the collective timeouts above, and `count` fake CPU devices
    when given (replacing any device count already there); flags already set are kept."""
    kept = [f for f in xla_flags.split() if count is None or COUNT_FLAG not in f]
    names = {f.split("=")[0] for f in kept}
    kept += [f for f in TIMEOUT_XLA_FLAGS if f.split("=")[0] not in names]
    if count is not None:
        kept.append(f"{COUNT_FLAG}={count}")
    return " ".join(kept)


def forced_device_count(environ=os.environ) -> int | None:
    """The device count XLA_FLAGS forces on the host platform, or None."""
    found = re.findall(COUNT_FLAG + r"=(\d+)", environ.get("XLA_FLAGS", ""))
    return int(found[-1]) if found else None


def raise_collective_timeouts() -> None:
    """Raises XLA:CPU's collective timeouts wherever the host platform's device count is forced (before JAX starts)."""
    if forced_device_count() is not None:
        os.environ["XLA_FLAGS"] = with_fake_device_flags(os.environ.get("XLA_FLAGS", ""))


def _terminate_seconds() -> str:
    found = re.findall(TERMINATE_FLAG + r"=(\d+)", os.environ.get("XLA_FLAGS", ""))
    return found[-1] if found else "40"


def supervise(command: list[str], log_path: str) -> int:
    """Runs `command` as a child with the same stdout, its stderr passed through except XLA's rendezvous lines
    (appended to `log_path`), SIGINT and SIGTERM forwarded once (the child is in its own process group, so a
    Ctrl-C reaches it through this process only). Returns the exit code to use: the child's, or 1 after one
    `error:` line when XLA aborted it at a collective timeout."""
    child = subprocess.Popen(command, env={**os.environ, SUPERVISED: "1"}, stderr=subprocess.PIPE, process_group=0)
    forward = lambda signum, frame: child.send_signal(signum)  # noqa: E731
    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    stuck, timed_out, pending, log = None, None, b"", None
    try:
        while chunk := os.read(child.stderr.fileno(), 1 << 16):
            pending += chunk
            *pieces, pending = re.split(rb"(?<=[\r\n])", pending)
            if pending and not pending.startswith((b"I", b"W", b"E", b"F")):  # a progress bar being drawn
                pieces, pending = [*pieces, pending], b""
            for piece in pieces:
                text = piece.decode(errors="replace")
                match = RENDEZVOUS_LINE.match(text)
                if timed_out:  # the abort's stack traces (glog's, Python's faulthandler's) go to the log too
                    log.write(text)
                    continue
                if not match:
                    sys.stderr.write(text)
                    sys.stderr.flush()
                    continue
                if log is None:
                    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
                    log = open(log_path, "a")
                log.write(text)
                if "may be stuck" in text and stuck is None:
                    stuck = match.group(1)
                    print(f"\nwarning: fake CPU devices are waiting at a collective ({_what(stuck)}); XLA's log: "
                          f"{log_path}", file=sys.stderr, flush=True)  # fmt: skip
                if "Termination timeout" in text:
                    timed_out = timed_out or match.group(1)
        code = child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if log:
            log.close()
    if timed_out and code < 0:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        print(f"\nerror: {forced_device_count()} fake CPU devices on {cores} cores waited more than "
              f"{_terminate_seconds()} s for each other at a collective ({_what(timed_out)}) and XLA stopped the run: "
              f"the machine is too loaded for this many fake devices; rerun (it resumes) with less load beside it or "
              f"fewer devices, or raise {TERMINATE_FLAG} in XLA_FLAGS (XLA's log: {log_path})",
              file=sys.stderr, flush=True)  # fmt: skip
        return 1
    return code if code >= 0 else 128 - code


def _what(message: str) -> str:
    """'all reduce' of XLA's "... for `all reduce RendezvousKey{...}` ..." message."""
    found = re.search(r"`([\w -]+?) RendezvousKey", message)
    return found.group(1) if found else "a collective"
