"""Training throughput of a config: tokens/s and MFU of the jitted train step on random tokens.

    python benchmarks/throughput.py --config configs/bench_10m.py [--steps 20] [--vocab 8192]
    python benchmarks/throughput.py --config configs/bench_10m.py --compare model.causal_blocks=1 ''

Times the same compiled step that training.loop runs (forward, backward, AdamW), so data loading
is excluded; prints one JSON line at the end.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time

import jax
import jax.numpy as jnp

from configs.base import apply_arg
from model import Transformer, flops_per_token, param_counts
from training.allocator import reuse_freed_memory
from training.config import RunConfig, resolve, with_vocab
from training.metrics import peak_flops_per_device
from training.optim import make_optimizer
from training.step import init_state, make_train_step


def load_config(spec: str, vocab: int, overrides: str = "") -> RunConfig:
    """The resolved config of `path[:arg]` with `overrides` applied and the vocabulary size set."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return with_vocab(resolve(apply_arg(module.get_config(arg or None), overrides)), vocab)


def compiled_step(run: RunConfig, vocab: int):
    """(compiled train step, its initial state, a batch of random tokens) for `run`."""
    model, (tx, schedule) = Transformer(run.model), make_optimizer(run.train)
    state = init_state(model, tx, run.train.seed)
    B, T = run.train.batch_size, run.data.seq_len
    batch = {"tokens": jax.random.randint(jax.random.key(1), (B, T + 1), 0, vocab, jnp.int32)}
    step = jax.jit(make_train_step(model, tx, schedule, run.train), donate_argnums=0).lower(state, batch).compile()
    return step, state, batch


def time_steps(variants: list, warmup: int, steps: int) -> list[list[float]]:
    """Seconds per step of each (step, state, batch) variant, the variants taking turns step by step so
    that a slow spell of the machine hits all of them alike."""
    states = [state for _, state, _ in variants]
    times = [[] for _ in variants]
    for i in range(warmup + steps):
        for v, (step, _, batch) in enumerate(variants):
            start = time.perf_counter()
            states[v], metrics = step(states[v], batch)
            jax.block_until_ready(metrics)
            if i >= warmup:
                times[v].append(time.perf_counter() - start)
    return times


def main() -> None:
    reuse_freed_memory()  # as train.py does (training/allocator.py); JAX_LM_MALLOC=system: glibc's defaults
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/bench_10m.py")
    parser.add_argument("--vocab", type=int, default=8192, help="vocab size (no tokenizer is built)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--set", default="", help="config overrides as key=value,key=value")
    parser.add_argument(
        "--compare",
        nargs="+",
        metavar="OVERRIDES",
        help="A/B test: time these override sets (key=value,...; '' for the config as is) in one process, "
        "taking turns step by step, and print each one's median against the first",
    )
    args = parser.parse_args()
    if args.compare:
        return compare(args)

    run = load_config(args.config, args.vocab, args.set)
    step, state, batch = compiled_step(run, args.vocab)
    B, T = run.train.batch_size, run.data.seq_len
    median = statistics.median(time_steps([(step, state, batch)], args.warmup, args.steps)[0])
    flops = flops_per_token(run.model, T)
    peak, source = peak_flops_per_device(run.model.dtype)  # the peak training's perf/mfu uses
    result = {
        "framework": "jax",
        "jax_version": jax.__version__,
        "config": args.config + (f" {args.set}" if args.set else ""),
        "params_total": param_counts(run.model).total,
        "params_nonembed": param_counts(run.model).non_embedding,
        "flops_per_token": flops,
        "median_step_time": median,
        "tokens_per_sec": B * T / median,
        "achieved_gflops": flops * B * T / median / 1e9,
        "matmul_peak_gflops": peak / 1e9,  # on CPU a measured f32 matmul, on accelerators the table's peak
        "peak_source": source,
        "mfu": flops * B * T / median / peak,
    }
    print(f"{result['tokens_per_sec']:,.0f} tokens/s  step {median * 1e3:.1f} ms  MFU {result['mfu']:.1%}")
    print(json.dumps(result))


def compare(args) -> None:
    runs = [load_config(args.config, args.vocab, ",".join(filter(None, [args.set, o]))) for o in args.compare]
    times = time_steps([compiled_step(run, args.vocab) for run in runs], args.warmup, args.steps)
    medians = [statistics.median(t) for t in times]
    print("| overrides | median step (ms) | tokens/s | vs first |\n| --- | --- | --- | --- |")
    for overrides, run, median in zip(args.compare, runs, medians):
        tokens = run.train.batch_size * run.data.seq_len
        print(
            f"| `{overrides or '(as is)'}` | {median * 1e3:.1f} | {tokens / median:,.0f} | {medians[0] / median:.3f}x |"
        )
    print(json.dumps({"compare": args.compare, "median_step_time": medians}))


if __name__ == "__main__":
    main()
