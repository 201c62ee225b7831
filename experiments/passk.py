"""pass@k for generated code: the unbiased estimator of Chen et al. 2021 ("Evaluating Large Language Models Trained
on Code") and a subprocess sandbox that runs each completion against its problem's tests.

    evaluate_samples(problem, completions, ks=(1, 10))  # -> {"n": 10, "c": 3, "pass@1": 0.3, "pass@10": 1.0}

A completion passes when prompt + completion + tests runs to the end in a fresh interpreter. Hugging Face
`evaluate`'s code_eval (what lm-eval's humaneval task calls) does the same, but runs each program in a
multiprocessing child of the evaluating process, after an environment-variable opt-in: here the program gets an
interpreter of its own, in a process group that a timeout kills whole, and an early exit cannot pass.

The sandbox is best effort against accidents (infinite loops, runaway memory or output, `sys.exit` before the
asserts, a stray connection), not a security boundary against hostile code: the program runs as this user, sees
the file system, and can undo the Python-level network block or raise its limits if that user is root. Run
evaluations of untrusted models inside a container or as an unprivileged user: the OS is the real boundary.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import os
import pathlib
import secrets
import signal
import subprocess
import sys
import tempfile

OUTPUT_BYTES = 1 << 20  # RLIMIT_FSIZE: past it a write (stdout included) fails with EFBIG (Python ignores SIGXFSZ)
DETAIL_CHARS = 200
STDERR_CHARS = 2000

# Runs in the child before the program: limits (set here rather than in Popen's preexec_fn, which CPython documents
# as unsafe in a process with threads, as the JAX process evaluating a model is), the network block, then the
# program, and finally a line with the parent's random token that the program cannot print by accident.
# argv: token, address-space bytes, CPU seconds, output bytes.
_HARNESS = """\
import _socket, os, resource, socket, sys, traceback


def _no_network(*args, **kwargs):
    raise OSError("network access is disabled in the pass@k sandbox")


class _NoSocket(socket.socket):  # a subclass, not a function: modules like ssl subclass socket.socket on import
    __init__ = _no_network


def _main(token, memory_bytes, cpu_s, output_bytes):
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))  # SIGXCPU at the soft limit, SIGKILL at the hard
    for kind, value in ((resource.RLIMIT_AS, memory_bytes), (resource.RLIMIT_FSIZE, output_bytes),
                        (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(kind, (value, value))
    socket.socket = socket.SocketType = _socket.socket = _socket.SocketType = _NoSocket
    for module in (socket, _socket):
        for name in ("socketpair", "fromfd", "create_connection", "create_server", "getaddrinfo"):
            if hasattr(module, name):
                setattr(module, name, _no_network)
    sys.argv = ["program.py"]
    with open("program.py", encoding="utf-8") as f:
        source = f.read()
    scope = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        exec(compile(source, "program.py", "exec"), scope)
    except SystemExit:
        raise  # no token line: the parent reports an early exit
    except BaseException as error:
        scope.clear()  # frees what a memory bomb holds, so the report below can be written
        traceback.print_exc()
        line = f"{type(error).__name__}: {error}".splitlines()[0] if str(error) else type(error).__name__
        print(token, "failed", line, flush=True)
        os._exit(1)
    print(token, "passed", flush=True)
    os._exit(0)  # skips the program's atexit hooks and threads, which could still print after the token


_main(sys.argv[1], *map(int, sys.argv[2:]))
"""


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How one program ended. status: 'passed', 'failed' (an assertion or other exception, MemoryError and the
    output limit included), 'timeout' (wall clock or CPU limit), 'crashed' (killed by a signal: a segfault, the OOM
    killer) or 'exit' (left before the tests finished: `sys.exit`, `os._exit`). detail: one line saying why;
    stderr: its tail, for reading failures."""

    passed: bool
    status: str
    detail: str
    stderr: str = ""


def pass_at_k(n: int, c: int, k: int) -> float:
    """The chance that at least one of k samples drawn without replacement from n, c of them correct, is correct:
    1 - C(n-c, k) / C(n, k), as the product 1 - prod_{i=n-c+1}^{n} (1 - k/i), which neither overflows nor loses
    precision the way the binomials do for large n."""
    if n < 1:
        raise ValueError(f"pass@k needs n >= 1 samples, got n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n={n} correct samples, got c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n={n}, got k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def _one_line(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= DETAIL_CHARS else line[: DETAIL_CHARS - 3] + "..."


def run_tests(program: str, *, timeout_s: float = 5.0, memory_mb: int = 512) -> Outcome:
    """Run `program` (code and its asserts) in a fresh isolated interpreter (`python -I`) in a scratch directory
    removed afterwards, stdin empty, environment bare (no proxies, no PYTHON* variables), with memory, CPU and
    output limits; after `timeout_s` of wall clock the whole process group is killed. It passes only if the
    harness prints the parent's random token after the program finished, so `sys.exit(0)` or `os._exit(0)` in
    generated code fails. Every call is independent: a crash or a stray child of one cannot affect the next."""
    token = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="passk-") as scratch:
        root = pathlib.Path(scratch)
        (root / "program.py").write_text(program, encoding="utf-8")
        (root / "harness.py").write_text(_HARNESS, encoding="utf-8")
        limits = (memory_mb << 20, math.ceil(timeout_s) + 1, OUTPUT_BYTES)
        env = {"PATH": os.defpath, "HOME": scratch, "TMPDIR": scratch}
        # Files rather than pipes: RLIMIT_FSIZE bounds what they can hold, and a grandchild keeping them open
        # cannot block the parent.
        with open(root / "stdout", "w+b") as out, open(root / "stderr", "w+b") as err:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-X", "utf8", "harness.py", token, *map(str, limits)],
                cwd=scratch,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,  # its own process group, so the kill below reaches its children too
            )
            try:
                returncode = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                returncode = None
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            stdout_bytes, stderr_bytes = (root / "stdout").read_bytes(), (root / "stderr").read_bytes()
    stdout = stdout_bytes.decode("utf-8", "replace")
    stderr = stderr_bytes.decode("utf-8", "replace")[-STDERR_CHARS:]
    if returncode is None:
        return Outcome(False, "timeout", f"still running after {timeout_s:g} s; process group killed", stderr)
    if returncode < 0:
        name = signal.Signals(-returncode).name
        status = "timeout" if name == "SIGXCPU" else "crashed"
        return Outcome(False, status, f"killed by {name}", stderr)
    reports = [line[len(token) + 1 :] for line in stdout.splitlines() if line.startswith(token + " ")]
    if reports and reports[-1] == "passed" and returncode == 0:
        return Outcome(True, "passed", "all tests ran", stderr)
    if reports and reports[-1].startswith("failed "):
        return Outcome(False, "failed", _one_line(reports[-1].removeprefix("failed ")), stderr)
    if max(len(stdout_bytes), len(stderr_bytes)) >= OUTPUT_BYTES:  # the write past the limit raised EFBIG
        return Outcome(False, "failed", f"wrote {OUTPUT_BYTES} bytes of output, the limit", stderr)
    last_line = (stderr.strip().splitlines() or [""])[-1]  # e.g. the message of sys.exit("...")
    detail = f"exited with code {returncode} before the tests finished" + (f": {last_line}" if last_line else "")
    return Outcome(False, "exit", _one_line(detail), stderr)


def evaluate_samples(
    problem: dict, completions: list[str], ks: tuple[int, ...] = (1, 10), *, timeout_s: float = 5.0
) -> dict:
    """Run each completion as `problem["prompt"] + completion + problem["tests"]` in the sandbox, one process per
    core at a time, and estimate pass@k from the n completions, c of which passed: {"n", "c", "pass@K" for each K
    in ks with K <= n}."""
    programs = [f"{problem['prompt']}{completion}\n\n{problem['tests']}\n" for completion in completions]
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        outcomes = list(pool.map(lambda program: run_tests(program, timeout_s=timeout_s), programs))
    n, c = len(outcomes), sum(outcome.passed for outcome in outcomes)
    return {"n": n, "c": c, **{f"pass@{k}": pass_at_k(n, c, k) for k in ks if k <= n}}
