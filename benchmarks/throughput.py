"""Training throughput of a config: tokens/s and MFU of the jitted train step on random tokens.

    python benchmarks/throughput.py --config configs/bench_10m.py [--steps 20] [--vocab 8192]

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
from training.config import RunConfig, resolve, with_vocab
from training.loop import init_state, make_train_step
from training.metrics import measured_matmul_flops
from training.optim import make_optimizer


def load_config(spec: str, vocab: int, overrides: str = "") -> RunConfig:
    """The resolved config of `path[:arg]` with `overrides` applied and the vocabulary size set."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return with_vocab(resolve(apply_arg(module.get_config(arg or None), overrides)), vocab)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/bench_10m.py")
    parser.add_argument("--vocab", type=int, default=8192, help="vocab size (no tokenizer is built)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--set", default="", help="config overrides as key=value,key=value")
    args = parser.parse_args()

    run = load_config(args.config, args.vocab, args.set)
    model, (tx, schedule) = Transformer(run.model), make_optimizer(run.train)
    state = init_state(model, tx, run.train.seed)
    B, T = run.train.batch_size, run.data.seq_len
    batch = {"tokens": jax.random.randint(jax.random.key(1), (B, T + 1), 0, args.vocab, jnp.int32)}
    step = jax.jit(make_train_step(model, tx, schedule, run.train), donate_argnums=0).lower(state, batch).compile()

    times = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    flops = flops_per_token(run.model, T)
    peak = measured_matmul_flops()
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
        "matmul_peak_gflops": peak / 1e9,
        "mfu": flops * B * T / median / peak,
    }
    print(f"{result['tokens_per_sec']:,.0f} tokens/s  step {median * 1e3:.1f} ms  MFU {result['mfu']:.1%}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
