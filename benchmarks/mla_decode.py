"""Multi-head Latent Attention's compressed decode cache against GQA and MHA: cache bytes per token and decode
tokens/s at batch 1 and 32, for MLA decoding absorbed (the default) and naive (full K/V rebuilt every step).

    python -m benchmarks.mla_decode
    python -m benchmarks.mla_decode --contexts 144,1024 --repeats 3

Models of about the same size (configs/tiny.py's width and depth, ~1.8M parameters with a 257-token vocabulary):
MHA is configs/tiny.py (6 K/V heads of 32), GQA the same with 2 K/V heads (d_ff raised to keep the size), MLA
configs/ablations/mla.py (a 96-wide latent plus a 16-wide rope key per token). Random weights, float32, greedy, no
end token; each context is a prompt that fills it but for `--new_tokens` decoded tokens. Each figure is the median
of --repeats timed runs of one compiled program (compilation excluded); one JSON line at the end.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

from benchmarks.decode import decode_rate
from benchmarks.throughput import load_config
from model import Transformer, param_counts
from model.cache import init_cache
from model.runtime import DecodeConfig, Runtime
from sampling.decode import for_inference

MODELS = {
    "MHA": ("configs/tiny.py", ""),
    "GQA": ("configs/tiny.py", "model.num_kv_heads=2,model.d_ff=596"),
    "MLA absorbed": ("configs/ablations/mla.py", ""),
    "MLA naive": ("configs/ablations/mla.py", ""),
}


def cache_bytes_per_token(model: Transformer, max_len: int) -> float:
    """Bytes the whole decode cache (every layer) holds per token slot, positions and counters included."""
    shapes = jax.eval_shape(lambda: init_cache(for_inference(model), 1, max_len))
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes)) / max_len


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vocab", type=int, default=257)
    parser.add_argument("--contexts", default="144,1024", help="cache sizes: prompt + new tokens")
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    batches = [int(b) for b in args.batches.split(",")]

    result = {"framework": "jax", "jax_version": jax.__version__, "device": jax.devices()[0].device_kind, "rows": []}
    for name in args.models.split(","):
        config, overrides = MODELS[name]
        run = load_config(config, args.vocab, ",".join(filter(None, [f"data.seq_len={max(contexts)}", overrides])))
        cfg = run.model
        variant = name.split()[-1] if name.startswith("MLA") else ""  # the decode variant the row's name gives
        model = Transformer(cfg, Runtime.decoding(DecodeConfig(attention=variant)))
        params = jax.jit(lambda m=model: m.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])()
        row = {
            "model": name,
            "params_total": param_counts(cfg).total,
            "cache_bytes_per_token": cache_bytes_per_token(model, max(contexts)),
        }
        for context in contexts:
            for batch in batches:
                rate, _ = decode_rate(
                    model, params, batch, context - args.new_tokens, args.new_tokens, context, True, args.repeats
                )
                row[f"decode_tokens_per_sec_ctx{context}_batch{batch}"] = rate
                print(f"{name:13s} context {context:5d} batch {batch:2d}: {rate:9,.0f} tokens/s", flush=True)
        print(f"{name:13s} {row['params_total']:,} params, {row['cache_bytes_per_token']:,.0f} cache bytes/token")
        result["rows"].append(row)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
