"""The default: a small byte-level model on the Python standard library, 2-3 minutes on 2 CPU cores.

    python train.py --config configs/tiny.py --workdir runs/tiny

Expect eval/bpb to fall from ~8 (untrained) to about 2 and the final sample to read like Python.
"""

from configs import base


def get_config(arg: str | None = None):
    config = base.get_config()
    config.model.update(d_model=192, num_layers=4, num_heads=6, num_kv_heads=6, d_ff=512)
    # The layer loop fully unrolled, so XLA keeps no stacked per-layer buffers, and nothing recomputed in the
    # backward pass (this model's activations are small): 1.07x faster on a 2-core CPU than a rematerialised
    # loop (BENCHMARKS.md).
    config.model.update(scan_unroll=4, remat="none")
    config.data.update(tokenizer="bytes", seq_len=256)
    config.train.update(steps=350, batch_size=16, lr=3e-3, warmup_steps=30, log_every=25, eval_every=100)
    config.checkpoint.every = 100
    return base.apply_arg(config, arg)
