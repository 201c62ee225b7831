"""One command that proves the accelerator paths, made to run unattended in the few minutes a GPU is lent:

    python benchmarks/accelerator.py --out DIR [--budget_s 480] [--smoke] [--stages kernels,attention,...]

Runs, in this order:
1. kernels: the cases of tests/kernel_cases.py compiled on the accelerator (Pallas flash attention forward and
   gradients, Pallas flash-decoding, cuDNN's fused attention), each against the plain-JAX reference: pass/fail.
2. attention: forward and forward+backward TFLOP/s of causal bf16 attention, T in {1k, 4k, 16k}, head dims {64, 128},
   16 query heads on 4 K/V heads, batch x T = --tokens, for the 'pallas', 'cudnn' and 'xla' entries of
   model.attention.IMPLEMENTATIONS (FlashAttention's count: 4 B N T^2 D / 2 forward, 3.5x that forward+backward).
   decode: each implementation's decode step (32 query heads on 8 K/V heads of 128) over a full cache, batch {1, 32},
   context {1k, 8k}: the cache bytes read per second, and their share of the device's memory bandwidth.
3. training: MFU of configs/llama_1b.py with each attention implementation that can run, and of
   configs/llama_1b_moe.py and configs/llama_1b_mla.py (attention 'auto'): --train_steps steps after compiling
   and one warm-up step, bf16, --train_batch rows of the config's sequence length, on synthetic token batches
   (random ids; no tokenizer, corpus or data pipeline). FLOPs: model.flops_per_token (6N active + attention).
4. grouped_matmul: the MoE grouped matmul (`jax.lax.ragged_dot`, what model/moe.py runs on accelerators) against
   one dense matmul of the same useful FLOPs, forward and forward+backward, at llama_1b_moe's shapes.

Every item checks the budget first and is recorded as skipped (with the reason) once the budget cannot pay for it;
DIR/accelerator.json (every figure, the device, versions, what was skipped and why, the attention order the figures
suggest for model.attention.AUTO_ORDER) and DIR/accelerator.md (tables for BENCHMARKS.md) are rewritten after every
item, so a run cut short still leaves what it measured. Timings are medians of --repeats calls of a compiled
function, compilation excluded. --smoke runs every stage at toy sizes on CPU (kernels interpreted) in about a
minute (under two on a busy 2-core machine); tests/test_accelerator.py runs it.

Needs only jax (with its GPU or TPU plugin), flax, optax, numpy and ml_collections (configs/*.py; a pure-Python wheel
to carry to a bare GPU image): never grain, tokenizers or tqdm. What is missing is said in one line. docs/accelerators.md: how to run it on a lent GPU, and the wheels train.py would need there.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import importlib.util
import json
import math
import os
import pathlib
import statistics
import sys
import tempfile
import time
import traceback

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's packages, whether or not the project is installed

REQUIRED = ("jax", "flax", "optax", "numpy", "ml_collections")


def missing(modules) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


if __name__ == "__main__" and (gone := missing(REQUIRED)):
    sys.exit(f"missing: {', '.join(gone)} (pip install them; docs/accelerators.md lists the wheels to carry)")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from model import ModelConfig, Transformer, flops_per_token, param_counts  # noqa: E402
from model.attention import IMPLEMENTATIONS, choose  # noqa: E402
from model.cache import KVView  # noqa: E402
from model.mask import Mask  # noqa: E402
from training.metrics import matmul_flops, peak_bandwidth, peak_flops_per_device  # noqa: E402

ATTENTION_IMPLS = ("pallas", "cudnn", "xla")
TRAIN_RUNS = [("llama_1b", impl) for impl in IMPLEMENTATIONS] + [("llama_1b_moe", "auto"), ("llama_1b_mla", "auto")]


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What each stage measures, and about how many seconds one item takes (the budget check)."""

    attention: tuple[tuple[int, int], ...]  # (T, head dim)
    heads: tuple[int, int]  # (query heads, K/V heads)
    tokens: int  # batch x T of each attention shape
    decode_batches: tuple[int, ...]
    decode_contexts: tuple[int, ...]
    decode_heads: tuple[int, int, int]  # (query heads, K/V heads, head dim)
    train_batch: int
    train_steps: int
    grouped: tuple[int, int, int, int]  # (groups, rows, k, n)
    repeats: int
    seconds: dict  # stage -> about how long one of its items takes


FULL = Sizes(
    attention=tuple((T, D) for T in (1024, 4096, 16384) for D in (64, 128)),
    heads=(16, 4),
    tokens=32768,
    decode_batches=(1, 32),
    decode_contexts=(1024, 8192),
    decode_heads=(32, 8, 128),
    train_batch=4,
    train_steps=20,
    grouped=(16, 4 * 4096 * 6, 2048, 1024),  # llama_1b_moe: 16 experts, 4 x 4096 tokens x top-6, 2048 -> 1024
    repeats=10,
    seconds=dict(kernels=15, attention=20, decode=10, training=100, grouped_matmul=15),
)
SMOKE = Sizes(
    attention=((64, 16),),
    heads=(4, 1),
    tokens=128,
    decode_batches=(1, 2),
    decode_contexts=(64, 128),
    decode_heads=(4, 1, 16),
    train_batch=2,
    train_steps=2,
    grouped=(4, 256, 32, 64),
    repeats=2,
    seconds=dict(kernels=5, attention=3, decode=2, training=10, grouped_matmul=2),
)


class Skip(Exception):
    """An item that cannot run here (a blocker, a missing package): recorded as skipped with this reason."""


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}".rstrip(": ")


class Report:
    """The figures so far, rewritten to DIR/accelerator.json and DIR/accelerator.md after every item."""

    def __init__(self, out: pathlib.Path, budget_s: float, smoke: bool, sizes: Sizes):
        self.out, self.budget_s, self.sizes, self.start = out, budget_s, sizes, time.perf_counter()
        device = jax.devices()[0]
        self.data = {
            "date": datetime.date.today().isoformat(),
            "device": device.device_kind,
            "platform": device.platform,
            "device_count": jax.device_count(),
            "jax": jax.__version__,
            "jaxlib": importlib.import_module("jaxlib").__version__,
            "python": sys.version.split()[0],
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "smoke": smoke,
            "budget_s": budget_s,
            "elapsed_s": 0.0,
            "peaks": {},
            "stages": {stage: [] for stage in STAGES},
            "skipped": [],  # "<stage> <item>: <why>", for every row skipped
            "failed": [],  # the same for every row that failed (raised, or a kernel case that disagreed)
            "auto_order": None,
        }

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)

    def item(self, stage: str, key: dict, fn) -> dict:
        """Runs fn() -> figures and records key + figures; or key + 'skipped' (no budget left for it, a blocker)
        or key + 'failed' (what it raised; a kernel case that disagrees with the reference fails)."""
        label = " ".join(f"{k}={v}" for k, v in key.items())
        needs = self.sizes.seconds[stage]
        begin = time.perf_counter()
        if (left := self.left()) < needs:
            row = {
                **key,
                "skipped": f"budget: {max(left, 0):.0f}s of {self.budget_s:.0f}s left, an item needs ~{needs}s",
            }
        else:
            try:
                row = {**key, **fn()}
            except Skip as e:
                row = {**key, "skipped": str(e)}
            except Exception as e:  # a kernel that fails to lower, an out-of-memory: say which, measure the rest
                row = {**key, "failed": one_line(e)}
                if stage == "kernels":
                    row["passed"] = False
                traceback.print_exc(limit=3, file=sys.stderr)
        row.setdefault("seconds", round(time.perf_counter() - begin, 2))
        for outcome in ("skipped", "failed"):
            if outcome in row:
                self.data[outcome].append(f"{stage} {label}: {row[outcome]}")
        self.data["stages"][stage].append(row)
        if "skipped" in row:
            status = f"skipped: {row['skipped']}"
        elif "failed" in row:
            status = f"FAILED: {row['failed']}"
        else:
            status = ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items() if k not in key
            )
        print(f"[{stage}] {label}: {status}", flush=True)
        self.write()
        return row

    def write(self) -> None:
        self.data["elapsed_s"] = round(time.perf_counter() - self.start, 1)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "accelerator.json").write_text(json.dumps(self.data, indent=1) + "\n")
        (self.out / "accelerator.md").write_text(markdown(self.data))


def seconds_per_call(f, *args, repeats: int) -> float:
    """Median wall time of a compiled f(*args) (compilation and the first call excluded)."""
    compiled = jax.jit(f).lower(*args).compile()
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def load_kernel_cases():
    """tests/kernel_cases.py by its path: a `tests` package installed on the machine must not shadow it."""
    spec = importlib.util.spec_from_file_location("kernel_cases", REPO / "tests" / "kernel_cases.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the module's annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def kernels_stage(report: Report) -> None:
    checks = load_kernel_cases().all_checks()
    if report.data["smoke"]:  # on CPU the test suite runs every case (interpreted); the smoke run checks the stage
        kinds = {check.name.split("/")[0] for check in checks}
        checks = [next(c for c in checks if c.name.startswith(f"{kind}/")) for kind in sorted(kinds)]
    for check in checks:

        def run(check=check):
            if (reason := check.blocker()) is not None:
                raise Skip(reason)
            try:
                check.run()
            except AssertionError as e:
                return {"passed": False, "failed": one_line(e)}
            return {"passed": True}

        report.item("kernels", {"case": check.name}, run)


def random_array(rng, shape, dtype):
    return jnp.asarray(rng.standard_normal(shape, np.float32), dtype)


def attention_stage(report: Report) -> None:
    N, K = report.sizes.heads
    rng = np.random.default_rng(0)
    for T, D in report.sizes.attention:
        B = max(1, report.sizes.tokens // T)
        cfg = ModelConfig(d_model=N * D, num_heads=N, num_kv_heads=K, head_dim=D, dtype="bfloat16", max_seq_len=T)
        q = random_array(rng, (B, T, N, D), jnp.bfloat16)
        k, v = (random_array(rng, (B, T, K, D), jnp.bfloat16) for _ in range(2))
        mask = Mask.self_attention(jnp.broadcast_to(jnp.arange(T), (B, T)), in_order=True)
        fwd_flops = 4 * B * N * T * T * D / 2

        for name in ATTENTION_IMPLS:

            def run(name=name):
                impl = IMPLEMENTATIONS[name]
                if (reason := impl.blocker(cfg, False)) is not None:
                    raise Skip(reason)
                f = lambda q, k, v: impl.attend(cfg, q, k, v, mask)  # noqa: E731
                both = jax.grad(lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32)), (0, 1, 2))
                t_fwd = seconds_per_call(f, q, k, v, repeats=report.sizes.repeats)
                t_both = seconds_per_call(both, q, k, v, repeats=report.sizes.repeats)
                return {
                    "fwd_tflops": fwd_flops / t_fwd / 1e12,
                    "fwd_bwd_tflops": 3.5 * fwd_flops / t_both / 1e12,
                    "fwd_ms": t_fwd * 1e3,
                    "fwd_bwd_ms": t_both * 1e3,
                }

            report.item("attention", {"T": T, "D": D, "batch": B, "impl": name}, run)


def decode_stage(report: Report) -> None:
    N, K, H = report.sizes.decode_heads
    rng = np.random.default_rng(0)
    bandwidth = report.data["peaks"].get("bandwidth")
    for B in report.sizes.decode_batches:
        for S in report.sizes.decode_contexts:
            cfg = ModelConfig(d_model=N * H, num_heads=N, num_kv_heads=K, head_dim=H, dtype="bfloat16", max_seq_len=S)
            q = random_array(rng, (B, 1, N, H), jnp.bfloat16)
            k, v = (random_array(rng, (B, K, S, H), jnp.bfloat16) for _ in range(2))
            mask = Mask(jnp.full((B, 1), S - 1), jnp.broadcast_to(jnp.arange(S), (B, S)))  # full caches
            cache_bytes = 2 * B * K * S * H * jnp.dtype(jnp.bfloat16).itemsize

            for name in ("pallas", "xla"):

                def run(name=name):
                    impl = IMPLEMENTATIONS[name]
                    if (reason := impl.blocker(cfg, False)) is not None:
                        raise Skip(reason)
                    t = seconds_per_call(
                        lambda q, k, v: impl.decode(cfg, q, KVView(k, v, mask)), q, k, v, repeats=report.sizes.repeats
                    )
                    row = {"step_ms": t * 1e3, "cache_gb_per_s": cache_bytes / t / 1e9}
                    if bandwidth:
                        row["of_bandwidth"] = cache_bytes / t / bandwidth
                    return row

                report.item("decode", {"batch": B, "context": S, "impl": name}, run)


def toy(config) -> None:
    """A config shrunk to seconds on a CPU, keeping its kinds (MoE, MLA, remat, dtype)."""
    config.model.update(d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, d_ff=128)
    moe = config.model.moe
    moe.update(num_experts=4, top_k=2, d_ff_expert=32, num_shared_experts=min(1, moe.num_shared_experts))
    moe.update(first_dense_layers=min(1, moe.first_dense_layers), n_group=1, topk_group=1)
    config.model.mla.update(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16)
    config.data.update(seq_len=32, tokenizer="bpe:512")


def vocab_size(spec: str) -> int:
    """data.tokenizer.planned_vocab_size for 'bpe:N', without the tokenizers package."""
    if not spec.startswith("bpe:"):
        raise Skip(f"data.tokenizer={spec!r}: the benchmark plans only 'bpe:N' vocabularies")
    return int(spec.removeprefix("bpe:"))


def train_figures(report: Report, config_name: str, attention_impl: str) -> dict:
    from training.config import resolve, with_vocab
    from training.optim import make_optimizer
    from training.step import init_state, make_train_step

    config = importlib.import_module(f"configs.{config_name}").get_config()
    if report.data["smoke"]:
        toy(config)
    config.model.attention_impl = attention_impl
    config.train.batch_size = report.sizes.train_batch
    run = resolve(config)
    run = with_vocab(run, vocab_size(run.data.tokenizer))
    if attention_impl != "auto" and (reason := IMPLEMENTATIONS[attention_impl].blocker(run.model, False)):
        raise Skip(reason)
    chosen = choose(run.model)
    model, (tx, schedule) = Transformer(run.model), make_optimizer(run.train)
    state = init_state(model, tx, seed=0)
    B, T = report.sizes.train_batch, run.data.seq_len
    batch = {"tokens": jax.random.randint(jax.random.key(1), (B, T + 1), 0, run.model.vocab_size)}
    start = time.perf_counter()
    step = jax.jit(make_train_step(model, tx, schedule, run.train), donate_argnums=0).lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    state, metrics = step(state, batch)  # warm-up
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(report.sizes.train_steps):
        state, metrics = step(state, batch)
    loss = float(jax.block_until_ready(metrics)["train/loss"])
    step_s = (time.perf_counter() - start) / report.sizes.train_steps
    if not math.isfinite(loss):
        raise FloatingPointError(f"train/loss is {loss} after {report.sizes.train_steps + 1} steps")
    flops = flops_per_token(run.model, T) * B * T
    return {
        "ran": next(name for name, impl in IMPLEMENTATIONS.items() if impl is chosen),
        "active_params": param_counts(run.model).active,
        "tokens_per_step": B * T,
        "compile_s": compile_s,
        "step_s": step_s,
        "tokens_per_s": B * T / step_s,
        "mfu": flops / step_s / peak_flops(report, run.model.dtype),
        "loss": loss,
    }


def peak_flops(report: Report, dtype: str) -> float:
    """Peak FLOP/s of one device for `dtype` (training.metrics' table on accelerators, a measured matmul on CPUs),
    recorded in the report's peaks."""
    peaks = report.data["peaks"]
    if f"flops_{dtype}" not in peaks:
        if jax.default_backend() == "cpu":
            found = matmul_flops(256 if report.data["smoke"] else 2048), "measured float32 matmul"
        else:
            found = peak_flops_per_device(dtype)
        peaks[f"flops_{dtype}"], peaks[f"flops_{dtype}_source"] = found
    return peaks[f"flops_{dtype}"]


def training_stage(report: Report) -> None:
    for config_name, impl in TRAIN_RUNS:
        report.item(
            "training",
            {"config": config_name, "attention_impl": impl},
            lambda c=config_name, i=impl: train_figures(report, c, i),
        )


def grouped_matmul_stage(report: Report) -> None:
    E, M, K, N = report.sizes.grouped
    rng = np.random.default_rng(0)
    counts_E = jnp.asarray(np.bincount(rng.integers(0, E, M), minlength=E), jnp.int32)  # as a router splits rows
    x_MK, dy_MN = random_array(rng, (M, K), jnp.bfloat16), random_array(rng, (M, N), jnp.bfloat16)
    w_EKN = random_array(rng, (E, K, N), jnp.bfloat16) / math.sqrt(K)
    cases = {
        "dense": (lambda x, w: x @ w, w_EKN[0]),
        "ragged_dot": (lambda x, w: jax.lax.ragged_dot(x, w, counts_E), w_EKN),
    }
    for mode, passes in (("forward", 1), ("forward+backward", 3)):
        dense_s = None
        for name, (f, w) in cases.items():

            def run(f=f, w=w, name=name, passes=passes):
                nonlocal dense_s
                g = f if passes == 1 else (lambda x, w, f=f: jax.vjp(f, x, w)[1](dy_MN))
                t = seconds_per_call(g, x_MK, w, repeats=report.sizes.repeats)
                dense_s = t if name == "dense" else dense_s
                row = {"tflops": passes * 2 * M * K * N / t / 1e12, "ms": t * 1e3}
                if dense_s:
                    row["vs_dense"] = dense_s / t
                return row

            key = {"mode": mode, "impl": name, "groups": E, "shape": f"{M} x {K} x {N}"}
            report.item("grouped_matmul", key, run)


def suggested_auto_order(data: dict) -> dict | None:
    """The order of attention implementations the figures give, fastest first, up to the reference 'xla' (which
    always runs, so nothing after it is ever tried): from llama_1b's training MFU, else from attention's
    forward+backward TFLOP/s (geometric mean over the shapes every measured implementation ran)."""
    trained = {r["ran"]: r["mfu"] for r in data["stages"]["training"] if r.get("config") == "llama_1b" and "mfu" in r}
    if trained:
        speed, source = trained, "llama_1b training MFU"
    else:
        rows = [r for r in data["stages"]["attention"] if "fwd_bwd_tflops" in r]
        shapes = {(r["T"], r["D"]) for r in rows}
        per_impl: dict[str, list[float]] = {}
        for r in rows:
            per_impl.setdefault(r["impl"], []).append(r["fwd_bwd_tflops"])
        speed = {n: math.exp(statistics.mean(map(math.log, v))) for n, v in per_impl.items() if len(v) == len(shapes)}
        source = "attention forward+backward TFLOP/s"
    if not speed:
        return None
    order = sorted(speed, key=lambda n: -speed[n])
    order = order[: order.index("xla") + 1] if "xla" in order else [*order, "xla"]
    return {"platform": data["platform"], "order": order, "from": source}


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """A markdown table; a skipped or failed row says so in its first figure column."""
    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |", "|" + " --- |" * len(columns)]
    for r in rows:
        cells, said = [], False
        for _, key, fmt in columns:
            if key in r and not (key == "passed" and "failed" in r):
                cells.append(format(r[key], fmt) if fmt else str(r[key]))
            elif not said and ("skipped" in r or "failed" in r):
                cells.append(f"skipped: {r['skipped']}" if "skipped" in r else f"**failed**: {r['failed']}")
                said = True
            else:
                cells.append("")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(data: dict) -> str:
    s = data["stages"]
    peaks = data["peaks"]
    out = [
        f"## Accelerator check: {data['device']} ({data['platform']}), {data['date']}",
        "",
        f"`python benchmarks/accelerator.py{' --smoke' if data['smoke'] else ''}`: jax {data['jax']}, jaxlib"
        f" {data['jaxlib']}, {data['elapsed_s']:.0f}s of a {data['budget_s']:.0f}s budget"
        + (" (**smoke: toy sizes on CPU, the figures mean nothing**)" if data["smoke"] else "")
        + ". Peaks: "
        + (", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in peaks.items()) or "none")
        + ".",
        "",
        "### 1. Kernels against the reference (compiled; interpreted on CPU)",
        "",
        table(s["kernels"], [("case", "case", ""), ("passed", "passed", ""), ("seconds", "seconds", ".1f")]),
        "",
        "### 2. Attention, causal, bf16 (TFLOP/s: FlashAttention's count)",
        "",
        table(
            s["attention"],
            [
                ("T", "T", ""),
                ("D", "D", ""),
                ("batch", "batch", ""),
                ("impl", "impl", ""),
                ("fwd TFLOP/s", "fwd_tflops", ".3g"),
                ("fwd+bwd TFLOP/s", "fwd_bwd_tflops", ".3g"),
                ("fwd ms", "fwd_ms", ".3g"),
                ("fwd+bwd ms", "fwd_bwd_ms", ".3g"),
            ],
        ),  # fmt: skip
        "",
        "### 2. Decode step over a full bf16 cache",
        "",
        table(
            s["decode"],
            [
                ("context", "context", ""),
                ("batch", "batch", ""),
                ("impl", "impl", ""),
                ("step ms", "step_ms", ".3g"),
                ("cache GB/s", "cache_gb_per_s", ".4g"),
                ("of bandwidth", "of_bandwidth", ".1%"),
            ],
        ),  # fmt: skip
        "",
        "### 3. Training MFU (synthetic tokens, one device)",
        "",
        table(
            s["training"],
            [
                ("config", "config", ""),
                ("attention_impl", "attention_impl", ""),
                ("ran", "ran", ""),
                ("active params", "active_params", ",d"),
                ("tokens/step", "tokens_per_step", ",d"),
                ("step s", "step_s", ".3g"),
                ("tokens/s", "tokens_per_s", ",.0f"),
                ("MFU", "mfu", ".1%"),
                ("compile s", "compile_s", ".0f"),
            ],
        ),  # fmt: skip
        "",
        "### 4. MoE grouped matmul (useful TFLOP/s) against one dense matmul of the same FLOPs",
        "",
        table(
            s["grouped_matmul"],
            [
                ("mode", "mode", ""),
                ("impl", "impl", ""),
                ("groups", "groups", ""),
                ("rows x k x n", "shape", ""),
                ("TFLOP/s", "tflops", ".3g"),
                ("ms", "ms", ".3g"),
                ("vs dense", "vs_dense", ".2f"),
            ],
        ),  # fmt: skip
        "",
    ]
    if data["auto_order"]:
        a = data["auto_order"]
        out += [f"'auto' from {a['from']}: `AUTO_ORDER[{a['platform']!r}] = {tuple(a['order'])!r}`", ""]
        out[-2] += " (toy sizes: not to copy)" if data["smoke"] else " (model/attention.py)"
    for outcome in ("failed", "skipped"):
        if data[outcome]:
            out += [f"{outcome.capitalize()}:", "", *[f"- {line}" for line in data[outcome]], ""]
    return "\n".join(out)


def summary(data: dict, out: pathlib.Path) -> str:
    s = data["stages"]
    k = s["kernels"]
    lines = [
        f"{data['device']} ({data['platform']}), jax {data['jax']}: {data['elapsed_s']:.0f}s of {data['budget_s']:.0f}s",
        f"kernels: {sum(r.get('passed') is True for r in k)} passed, {sum(r.get('passed') is False for r in k)} failed,"
        f" {sum('skipped' in r for r in k)} skipped",
    ]
    for r in s["training"]:
        if "mfu" in r:
            lines.append(f"training {r['config']} ({r['ran']}): MFU {r['mfu']:.1%}, {r['tokens_per_s']:,.0f} tokens/s")
    for r in s["grouped_matmul"]:
        if r["impl"] == "ragged_dot" and "vs_dense" in r:
            lines.append(f"ragged_dot {r['mode']}: {r['tflops']:.3g} TFLOP/s, {r['vs_dense']:.2f}x the dense matmul")
    if data["auto_order"]:
        toy = " (toy sizes: not to copy)" if data["smoke"] else ""
        lines.append(f"auto ({data['auto_order']['from']}): {' > '.join(data['auto_order']['order'])}{toy}")
    lines += [
        f"skipped: {len(data['skipped'])} items, failed: {len(data['failed'])}",
        f"wrote {out / 'accelerator.json'} and {out / 'accelerator.md'}",
    ]
    return "\n".join(lines)


STAGE_RUNS = {
    "kernels": kernels_stage,
    "attention": attention_stage,
    "decode": decode_stage,
    "training": training_stage,
    "grouped_matmul": grouped_matmul_stage,
}
STAGES = tuple(STAGE_RUNS)  # in the order they run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=pathlib.Path, help="where accelerator.json and .md go")
    parser.add_argument("--budget_s", type=float, default=480.0, help="stop starting items after this long")
    parser.add_argument("--smoke", action="store_true", help="toy sizes on CPU, kernels interpreted (checks it runs)")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {', '.join(STAGES)}")
    parser.add_argument("--tokens", type=int, default=FULL.tokens, help="batch x T of each attention shape")
    parser.add_argument("--train_batch", type=int, default=FULL.train_batch, help="rows per training step")
    parser.add_argument("--train_steps", type=int, default=FULL.train_steps, help="timed steps per training run")
    parser.add_argument("--repeats", type=int, default=FULL.repeats, help="timed calls per kernel figure")
    args = parser.parse_args()
    stages = args.stages.split(",")
    if unknown := set(stages) - set(STAGES):
        parser.error(f"--stages: unknown {', '.join(sorted(unknown))} (of {', '.join(STAGES)})")
    if args.smoke:  # semantics, not speed: LLVM's -O0 compiles the toy programs several times faster
        jax.config.update("jax_platforms", "cpu")
        if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
            os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
        sizes = SMOKE
    else:
        sizes = dataclasses.replace(
            FULL, tokens=args.tokens, train_batch=args.train_batch, train_steps=args.train_steps, repeats=args.repeats
        )
        if not jax.config.jax_compilation_cache_dir:  # a rerun on the same machine loads what the last one compiled
            jax.config.update("jax_compilation_cache_dir", str(pathlib.Path(tempfile.gettempdir()) / "jax_cache"))
    report = Report(args.out, args.budget_s, args.smoke, sizes)
    if jax.default_backend() == "cpu" and not args.smoke:
        report.data["error"] = "no accelerator: jax's backend is cpu"
        report.write()
        sys.exit(
            "backend is cpu: jax finds no GPU or TPU (is its CUDA plugin installed? `pip list | grep jax`;"
            " docs/accelerators.md); --smoke runs toy sizes on CPU"
        )
    if bandwidth := peak_bandwidth():
        report.data["peaks"]["bandwidth"], report.data["peaks"]["bandwidth_source"] = bandwidth
    else:
        report.data["peaks"]["bandwidth_source"] = f"none known for {report.data['device']} (training/metrics.py)"
    print(f"{report.data['device']} ({report.data['platform']}), jax {jax.__version__}, budget {args.budget_s:.0f}s")
    for stage in STAGES:
        if stage in stages:
            STAGE_RUNS[stage](report)
    report.data["auto_order"] = suggested_auto_order(report.data)
    report.write()
    print(summary(report.data, args.out))


if __name__ == "__main__":
    main()
