"""configs/tiny.py with Mistral-style sliding-window attention: layers 1-3 see the last 64 tokens, layer 4 all 256.

    python train.py --config configs/ablations/sliding_window.py --workdir runs/ablate_window

Compared with the baseline by experiments/sweeps/ablate_attention.py. Decoding keeps a rolling cache of 64 slots
in the local layers (BENCHMARKS.md: the cache memory it saves).
"""

from configs import base, tiny


def get_config(arg: str | None = None):
    config = tiny.get_config()
    config.model.update(sliding_window=64, global_every=4)
    return base.apply_arg(config, arg)
