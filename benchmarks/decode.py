"""Decode speed of a config: tokens/s at batch 1 and 32 with the K/V cache, and the cache's speed-up over
full recomputation at 512 tokens of context.

    python benchmarks/decode.py --config configs/tiny.py --vocab 257
    python benchmarks/decode.py --config configs/bench_10m.py --vocab 8192

Random weights (speed does not depend on them), greedy decoding with no end token, so every run
decodes exactly the requested tokens. Each figure is the median of --repeats timed runs of the same
compiled program (compilation excluded); one JSON line at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.throughput import load_config
from model import Transformer, param_counts
from sampling import Rules, generate_batch


def decode_rate(
    model, params, batch: int, prompt_len: int, new_tokens: int, max_len: int, kv_cache: bool, repeats: int
):
    """Median decode tokens/s (all rows) and the prefill tokens/s of the same runs."""
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, model.cfg.vocab_size, size=(batch, prompt_len)).tolist()
    greedy = Rules(temperature=0)
    decode, prefill = [], []
    for _ in range(repeats + 1):  # the first run compiles
        out = generate_batch(model, params, prompts, new_tokens, greedy, max_len=max_len, kv_cache=kv_cache)
        decode.append(out.decode_tokens / out.decode_seconds)
        if out.prefill_seconds:
            prefill.append(out.prefill_tokens / out.prefill_seconds)
    return statistics.median(decode[1:]), (statistics.median(prefill[1:]) if prefill else None)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/tiny.py")
    parser.add_argument("--vocab", type=int, default=257)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--prompt_len", type=int, default=16)
    parser.add_argument("--context", type=int, default=512, help="context for the cache vs recompute comparison")
    parser.add_argument("--recompute_tokens", type=int, default=32, help="tokens decoded in that comparison")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    # The model is built for `context` positions so the comparison can fill a 512-token cache.
    run = load_config(args.config, args.vocab, f"data.seq_len={args.context}")
    model = Transformer(run.model)
    params = jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])()
    result = {
        "framework": "jax",
        "jax_version": jax.__version__,
        "device": jax.devices()[0].device_kind,
        "config": args.config,
        "params_total": param_counts(run.model).total,
    }
    max_len = args.prompt_len + args.new_tokens
    for batch in (1, 32):
        decode, prefill = decode_rate(
            model, params, batch, args.prompt_len, args.new_tokens, max_len, True, args.repeats
        )
        result[f"decode_tokens_per_sec_batch{batch}"] = decode
        result[f"prefill_tokens_per_sec_batch{batch}"] = prefill
        print(f"batch {batch:2d}: decode {decode:,.0f} tokens/s, prefill {prefill:,.0f} tokens/s")

    # At `context` tokens: prompt fills the cache but for the tokens decoded; same program shape both ways.
    prompt_len = args.context - args.recompute_tokens
    rates = {}
    for kv_cache in (True, False):
        rates[kv_cache], _ = decode_rate(
            model, params, 1, prompt_len, args.recompute_tokens, args.context, kv_cache, args.repeats
        )
    result["context"] = args.context
    result["cached_tokens_per_sec_at_context"] = rates[True]
    result["recompute_tokens_per_sec_at_context"] = rates[False]
    result["kv_cache_speedup"] = rates[True] / rates[False]
    print(
        f"at {args.context} tokens of context, batch 1: cache {rates[True]:,.0f} tokens/s, "
        f"recompute {rates[False]:,.0f} tokens/s, speed-up {result['kv_cache_speedup']:.1f}x"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
