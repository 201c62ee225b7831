"""The CPU isoFLOP sweep: byte-level BPE on the stdlib corpus, 3 budgets x 5 model sizes. Models this small
reach only ~10 GFLOP/s on 2 CPU cores (two runs at a time), so the 2.2e13 FLOPs of the sweep take about
40 minutes.

    python -m experiments.sweep plan experiments/sweeps/isoflop_stdlib.py --out sweeps/isoflop_stdlib
    python -m experiments.sweep run sweeps/isoflop_stdlib
    python -m experiments.sweep collect sweeps/isoflop_stdlib
    python -m experiments.scaling fit sweeps/isoflop_stdlib/runs.csv --out sweeps/isoflop_stdlib/fit
"""


def get_sweep():
    return {
        "config": "configs/tiny.py",
        "overrides": {
            "data.tokenizer": "bpe:2048",
            "data.seq_len": 256,
            "train.batch_size": 16,
            "train.lr": 3e-3,
            "train.warmup_steps": 50,
            "train.eval_every": 100,
            "train.eval_batches": 8,
            "train.sample_tokens": 0,
            "checkpoint.every": 200,
        },
        "isoflop": {
            "budgets": [3e11, 1e12, 3e12],
            "sizes": 5,
            "spread": 4.0,  # sizes span N*/4 .. 4 N* around N* = sqrt(C / (6 * 20))
            "tokens_per_param": 20.0,
            "family": {"aspect": 32.0, "head_dim": 16, "ffn_ratio": 8 / 3, "ffn_multiple": 16},
        },
    }
