"""Shared fixtures: tiny configs and a private token-store cache for the whole session."""

from __future__ import annotations

import os
import pathlib

from parallel.cpu_devices import with_fake_device_flags
from tests.xla_flags import with_test_flags

# Tests check semantics, not speed: flags that compile the many tiny programs here faster (tests/xla_flags.py), set
# before JAX starts; the xdist workers inherit them from the main process, which probes them once.
os.environ["XLA_FLAGS"] = with_test_flags(os.environ.get("XLA_FLAGS", ""))

# Collective timeouts long enough for fake devices on a loaded 2-core machine (parallel/cpu_devices.py says why);
# the subprocesses that start 8 fake devices (tests/test_multidevice.py, test_multihost.py) inherit them.
os.environ["XLA_FLAGS"] = with_fake_device_flags(os.environ["XLA_FLAGS"])

import jax  # noqa: E402
import pytest  # noqa: E402

from configs import base  # noqa: E402
from training.config import resolve  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    """Under xdist, the tests marked `slow(seconds)` go to the front, shared out between the workers' first batches
    longest first, each to the worker with the least so far (xdist's load scheduling hands each worker
    len(items) / workers / 4 consecutive tests to begin with, then more as they finish): so no long test starts
    last and leaves the other worker idle."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    slow = sorted(
        (i for i in items if i.get_closest_marker("slow")), key=lambda i: -i.get_closest_marker("slow").args[0]
    )
    if workers < 2 or not slow:
        return
    rest = [i for i in items if not i.get_closest_marker("slow")]
    batches, loads = [[] for _ in range(workers)], [0.0] * workers
    for item in slow:
        w = loads.index(min(loads))
        batches[w].append(item)
        loads[w] += item.get_closest_marker("slow").args[0]
    chunk = max(2, len(items) // workers // 4)
    ordered = []
    for batch in batches:
        fill = max(0, chunk - len(batch))
        ordered += batch + rest[:fill]
        rest = rest[fill:]
    items[:] = ordered + rest


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """One persistent XLA compilation cache for the whole session: its xdist workers and the subprocesses they
    start (train.py runs, 8-device modules) compile the same tiny programs many times (the models' random
    initialisers alone take seconds to compile); from the second time on they load. Kept if the caller chose one."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        yield None
        return
    base = tmp_path_factory.getbasetemp()
    cache = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "jax_cache"
    cache.mkdir(exist_ok=True)
    settings = {
        "jax_compilation_cache_dir": str(cache),
        # Programs that compile faster than this are not written: most of the session's thousands are, and are
        # compiled once; writing each cost ~15 ms (6% of a module's time), more than compiling it again would.
        "jax_persistent_cache_min_compile_time_secs": 0.25,
        "jax_compilation_cache_max_size": 4 << 30,  # > 0: entries are written under a file lock
    }
    for name, value in settings.items():
        jax.config.update(name, value)
        os.environ[name.upper()] = str(value)
    yield cache
    for name in settings:
        os.environ.pop(name.upper(), None)


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Keeps token stores out of the user's cache; shared by every test of the session."""
    cache = tmp_path_factory.mktemp("xdg_cache")
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = old


def tiny_config(**groups):
    """A seconds-to-train ConfigDict; `groups` maps 'model'/'data'/'train' to field overrides."""
    c = base.get_config()
    c.model.update(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=64)
    c.data.update(seq_len=32)
    c.train.update(steps=6, batch_size=4, warmup_steps=2, log_every=2, eval_every=3, eval_batches=2, sample_tokens=0)
    c.train.peak_flops = 1e12  # measuring the CPU's peak takes seconds at -O0; only perf/mfu depends on it
    c.mesh.data = 1  # one device unless a test asks for more (tests/multidevice)
    for group, fields in groups.items():
        c[group].update(fields)
    return c


def tiny_run(**groups):
    return resolve(tiny_config(**groups))


def untrained_workdir(directory, tokenizer, model_overrides: dict | None = None, data: dict | None = None):
    """(run, params) of a workdir whose checkpoint step 0 holds a tiny model's initial params and `tokenizer`
    (what an export reads; no training, so seconds)."""
    import flax.linen as nn

    from model import Transformer, init_variables
    from training.checkpoint import Checkpointer, checkpoints_dir, meta_for
    from training.config import CheckpointConfig, with_vocab

    run = with_vocab(tiny_run(model=model_overrides or {}, data={"seq_len": 64, **(data or {})}), tokenizer.vocab_size)
    init = jax.jit(lambda key: init_variables(Transformer(run.model), key))  # eager: 8 s of tiny compiles
    variables = nn.unbox(init(jax.random.key(0)))
    checkpointer = Checkpointer(checkpoints_dir(directory), CheckpointConfig(async_save=False))
    try:
        checkpointer.save(0, {"params": variables["params"]}, {"step": 0}, meta_for(run, tokenizer))
        checkpointer.wait()
    finally:
        checkpointer.close()
    return run, variables["params"]


def write_corpus(root: pathlib.Path) -> pathlib.Path:
    """`root`/corpus: a directory of a few small Python-like documents."""
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(12):
        body = "".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}\n\n" for j in range(40))
        (corpus / f"mod{i}.py").write_text(body)
    return corpus


@pytest.fixture
def text_corpus(tmp_path) -> pathlib.Path:
    return write_corpus(tmp_path)


@pytest.fixture(scope="session")
def mtp_mla_run(tmp_path_factory) -> tuple[pathlib.Path, dict]:
    """(workdir, train's result) of a 4-step run of a tiny model with MLA attention and 2 sequential MTP heads:
    what infer.py's --speculative=mtp and --mla_decode need (tests/test_speculative.py) and what test_mtp.py
    checks training logs. Trained once per test session (worker)."""
    from training.loop import train

    root = tmp_path_factory.mktemp("mtp_mla")
    mla = {"kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8}
    run = tiny_run(
        model={"attention": "mla", "mla": mla, "mtp": {"num_heads": 2, "style": "sequential"}},
        data={"corpus": str(write_corpus(root)), "seq_len": 16},
        train={"steps": 4, "eval_every": 4, "log_every": 4},
    )
    return root / "run", train(run, root / "run", quiet=True)


@pytest.fixture(scope="session")
def eval_run(tmp_path_factory) -> pathlib.Path:
    """The workdir of a tiny model with a bpe:320 tokenizer and a 128-token context, trained 40 steps on `write_corpus` (whose lines it
    learns to continue, so greedy continuations and multiple-choice answers are not chance), evaluating 8
    documents of stdlib_mc every 20 steps: what the evaluation tests score and read (tests/test_scoring.py,
    tests/test_harness.py). Trained once per test session (worker)."""
    from training.loop import train

    root = tmp_path_factory.mktemp("eval_run")
    run = tiny_run(
        data={"corpus": str(write_corpus(root)), "tokenizer": "bpe:320", "seq_len": 128},
        train={"steps": 40, "lr": 1e-2, "eval_every": 40, "log_every": 20, "eval_tasks": ("stdlib_mc",)}
        | {"eval_tasks_every": 20, "eval_tasks_limit": 8},
    )
    train(run, root / "run", quiet=True)
    return root / "run"
