"""Decode-cache memory of sliding-window models: the rolling caches of local layers against full caches.

    python benchmarks/window_cache.py                    # configs/ablations/sliding_window.py at 256 and 4096
    python benchmarks/window_cache.py --config configs/llama_1b.py --window 4096 --global_every 4 --max_len 32768

Counts the bytes of the cache the decoder allocates (keys, values and slot positions of every layer, from the
cache's abstract shapes: nothing is allocated), for the config as it is and with its window turned off.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import jax
import jax.numpy as jnp

from benchmarks.throughput import load_config
from model import Transformer
from model.cache import init_cache
from model.runtime import Runtime


def cache_bytes(cfg, batch: int, max_len: int) -> int:
    model = Transformer(dataclasses.replace(cfg, scan_layers=False, remat="none"), Runtime.decoding())
    shapes = jax.eval_shape(lambda: init_cache(model, batch, max_len))
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/ablations/sliding_window.py")
    parser.add_argument("--vocab", type=int, default=257)
    parser.add_argument("--window", type=int, default=0, help="override model.sliding_window")
    parser.add_argument("--global_every", type=int, default=-1, help="override model.global_every")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--max_len", type=int, nargs="+", default=[256, 4096])
    args = parser.parse_args()
    run = load_config(args.config, args.vocab)
    cfg = run.model
    if args.window:
        cfg = dataclasses.replace(cfg, sliding_window=args.window)
    if args.global_every >= 0:
        cfg = dataclasses.replace(cfg, global_every=args.global_every)
    rows = []
    for max_len in args.max_len:
        cfg_len = dataclasses.replace(cfg, max_seq_len=max(cfg.max_seq_len, max_len))
        windowed = cache_bytes(cfg_len, args.batch, max_len)
        full = cache_bytes(dataclasses.replace(cfg_len, sliding_window=0, global_every=0), args.batch, max_len)
        rows.append({"max_len": max_len, "windowed_bytes": windowed, "full_bytes": full, "saved": 1 - windowed / full})
        print(
            f"max_len {max_len:>6}: rolling {windowed / 2**20:9.2f} MiB, full {full / 2**20:9.2f} MiB, "
            f"{rows[-1]['saved']:.1%} saved (window {cfg.sliding_window}, global every {cfg.global_every}, "
            f"batch {args.batch}, {jnp.dtype(cfg.dtype).name})"
        )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
