"""Attention variants against the baseline at one budget: configs/tiny.py vs sliding window (64, a global layer
every 4), QK-norm and document masking (configs/ablations/), 3 seeds each.

python -m experiments.sweep plan experiments/sweeps/ablate_attention.py --out sweeps/attention
python -m experiments.sweep run sweeps/attention --parallel 1
python -m experiments.sweep report sweeps/attention
"""


def get_sweep():
    return {
        "config": "configs/tiny.py",
        "overrides": {"train.sample_tokens": 0},
        "grid": {
            "config": [
                "configs/tiny.py",
                "configs/ablations/sliding_window.py",
                "configs/ablations/qk_norm.py",
                "configs/ablations/document_mask.py",
            ]
        },
        "seeds": [0, 1, 2],
    }
