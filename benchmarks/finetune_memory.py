"""Memory of full fine-tuning, LoRA and QLoRA: parameter, gradient and optimizer bytes of one train step, from the
AOT dry run (`train.py --dry_run`: the step compiled on abstract shapes, nothing allocated), one row per method.

    python -m benchmarks.finetune_memory [--configs configs/bench_10m.py configs/llama_1b.py] [--rank 16]
        [--batch_size 8] [--seq_len 512]

Params, optimizer state and gradients follow from the shapes and dtypes alone (exact on any machine): gradients are
the trained params' (a LoRA run's adapters); AdamW keeps two moments per trained param. Temporaries and the peak
estimate are XLA:CPU's buffer assignment of the whole step (activations, the gradients, workspace).
"""

from __future__ import annotations

import argparse
import os
import sys

METHODS = {
    "full": "",
    "LoRA": "model.lora.rank={rank}",
    "QLoRA (NF4 base)": "model.lora.rank={rank},model.lora.base_quant=nf4",
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", nargs="+", default=["configs/bench_10m.py", "configs/llama_1b.py"])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=512)
    args = parser.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    from benchmarks.throughput import load_config
    from model import lora, param_counts
    from training.dry_run import dry_run
    from training.loop import model_params

    mib = 1 << 20
    print(f"batch {args.batch_size} x {args.seq_len} tokens, LoRA rank {args.rank} on every target, 1 device", file=sys.stderr)  # fmt: skip
    print("| config | method | trained params | params (MiB) | gradients (MiB) | AdamW state (MiB) | params + grads + state (MiB) | temporaries (MiB) | peak estimate (MiB) |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for config in args.configs:
        for method, sets in METHODS.items():
            sets = ",".join(
                filter(
                    None,
                    [
                        sets.format(rank=args.rank),
                        f"train.batch_size={args.batch_size}",
                        f"data.seq_len={args.seq_len}",
                        "mesh.data=1",
                    ],
                )  # fmt: skip
            )
            run = load_config(config, 257, sets)
            plan = dry_run(run)
            b = plan["bytes_per_device"]
            if run.model.lora.rank:
                trained = sum(x.size for x in jax.tree.leaves(lora.adapters(model_params(run.model))))
            else:
                trained = param_counts(run.model).total
            state = b["params"] + b["gradients"] + b["optimizer_state"]
            print(
                f"| {config} | {method} | {trained:,} | {b['params'] / mib:.1f} | {b['gradients'] / mib:.1f} "
                f"| {b['optimizer_state'] / mib:.1f} | {state / mib:.1f} | {b['temporaries'] / mib:.1f} "
                f"| {b['peak_estimate'] / mib:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
