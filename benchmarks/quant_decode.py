"""Quantized decoding on CPU: weight bytes per parameter and decode tokens/s at batch 1 and 16, float32 against
int8 (per channel) and int4 (groups of 32) multiplied by the C++ kernel (model/kernels/cpu_quant_matmul), the same
forced through the tiled matmul (model/weights.py `tiled_matmul`, the path without the kernel), and int8 read the
simple way (each weight dequantized whole per step).

    python -m benchmarks.quant_decode --config configs/bench_10m.py --vocab 8192

Random weights (speed does not depend on them), greedy decoding with no end token. The variants run interleaved,
round after round, so machine load hits them alike; each figure is the median over --repeats rounds (compilation
excluded). One JSON line at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics

import flax.linen as nn
import jax
import jax.numpy as jnp

from benchmarks.decode import decode_rate
from benchmarks.throughput import load_config
from model import Transformer, weights
from model.kernels import cpu_quant_matmul
from model.quant import params as qp
from model.quant.schemes import Spec

INT8, INT4 = Spec("int8", 0, skip=("router",)), Spec("int4", 32, skip=("router",))
VARIANTS = {  # name: (spec, how quantized weights are multiplied: "kernel" where it runs, "tiled", "whole")
    "float32": (None, "kernel"),
    "int8": (INT8, "kernel"),
    "int8 (tiled)": (INT8, "tiled"),
    "int8 (dequantized whole)": (INT8, "whole"),
    "int4 g32": (INT4, "kernel"),
    "int4 g32 (tiled)": (INT4, "tiled"),
}


def matmul_bytes_per_param(cfg, float_params, params) -> float:
    """Stored bytes of the matmul weights (codes, scales, zero points) per matmul parameter."""
    count = stored = 0
    for info in qp.weight_infos(cfg).values():
        parent, float_parent = params, float_params
        for k in info.path[:-1]:
            parent, float_parent = parent[k], float_parent[k]
        name = info.path[-1]
        count += float_parent[name].size
        stored += sum(v.size * v.dtype.itemsize for n, v in parent.items() if n == name or n.startswith(name + "_"))
    return stored / count


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/bench_10m.py")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--prompt_len", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", default="1,16")
    args = parser.parse_args()

    run = load_config(args.config, args.vocab)
    cfg = run.model
    model = Transformer(cfg)
    init = jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    float_params = nn.unbox(init())
    trees = {
        name: float_params if spec is None else qp.quantize_params(cfg, float_params, spec)
        for name, (spec, _) in VARIANTS.items()
    }
    print(f"kernel: {cpu_quant_matmul.unavailable_reason() or 'available'}")
    fuses, reason = weights.Quantized.fuses, cpu_quant_matmul.unavailable_reason
    max_len = args.prompt_len + args.new_tokens
    rates = {(name, b): [] for name in VARIANTS for b in map(int, args.batches.split(","))}
    for _ in range(args.repeats):
        for (name, batch), out in rates.items():
            path = VARIANTS[name][1]
            if path != "kernel":  # variants of one tree trace differently: no cached program may be shared
                jax.clear_caches()
                if path == "whole":
                    weights.Quantized.fuses = lambda *a: False
                else:
                    cpu_quant_matmul.unavailable_reason = lambda: "forced off"
            try:  # decode_rate's first run (compiling if need be) is not timed
                rate, _ = decode_rate(model, trees[name], batch, args.prompt_len, args.new_tokens, max_len, True, 1)
            finally:
                weights.Quantized.fuses, cpu_quant_matmul.unavailable_reason = fuses, reason
                if path != "kernel":
                    jax.clear_caches()
            out.append(rate)
    result = {"config": args.config, "jax_version": jax.__version__, "kernel": reason() is None, "variants": {}}
    print(f"{'weights':26s} {'bytes/param':>11s} " + " ".join(f"{'batch ' + b:>10s}" for b in args.batches.split(",")))
    for name in VARIANTS:
        per_param = matmul_bytes_per_param(cfg, float_params, trees[name])
        medians = {b: statistics.median(v) for (n, b), v in rates.items() if n == name}
        base = {b: statistics.median(v) for (n, b), v in rates.items() if n == "float32"}
        cells = " ".join(f"{medians[b]:7.1f} ({medians[b] / base[b]:.2f}x)" for b in medians)
        print(f"{name:26s} {per_param:11.3f} {cells}")
        result["variants"][name] = {"bytes_per_param": per_param, "tokens_per_s": medians}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
