"""Position encodings at one budget: RoPE vs ALiBi vs none (NoPE), 3 seeds each, on the tiny config.

python -m experiments.sweep plan experiments/sweeps/ablate_positions.py --out sweeps/positions
python -m experiments.sweep run sweeps/positions --parallel 1
python -m experiments.sweep report sweeps/positions
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
        "grid": {"model.position": ["rope", "alibi", "none"]},
        "seeds": [0, 1, 2],
    }
