"""Grouped-query attention at one budget: 6 query heads over 6 (MHA), 3, 2 or 1 (MQA) K/V heads, 3 seeds
each, on the tiny config.

    python -m experiments.sweep plan experiments/sweeps/ablate_gqa.py --out sweeps/gqa
    python -m experiments.sweep run sweeps/gqa
    python -m experiments.sweep report sweeps/gqa
"""


def get_sweep():
    return {
        "config": "configs/tiny.py",
        # The committed results predate attention's causal query blocks and tiny.py's remat and unrolled layer
        # loop; the last three overrides keep those settings.
        "overrides": {
            "train.sample_tokens": 0,
            "model.causal_blocks": 1,
            "model.remat": "dots_no_batch",
            "model.scan_unroll": 1,
        },
        "grid": {"model.num_kv_heads": [6, 3, 2, 1]},
        "seeds": [0, 1, 2],
    }
