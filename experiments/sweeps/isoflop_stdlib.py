"""The CPU isoFLOP sweep behind experiments/RESULTS.md: byte-level BPE (1024) on the stdlib corpus,
budgets 1e12, 2e12, 5e12 and 1e13 FLOPs x 7 model sizes, about 85 minutes on 2 CPU cores (two runs at a time).

    python -m experiments.sweep plan experiments/sweeps/isoflop_stdlib.py --out sweeps/iso
    python -m experiments.sweep run sweeps/iso --parallel 2
    python -m experiments.sweep collect sweeps/iso
    python -m experiments.scaling fit sweeps/iso/runs.csv --out sweeps/iso/fit

Choices that give models of 20k-450k params an interior optimum at these budgets:
- 1024 tokens per step (8 x 128): at a few million tokens, a larger batch leaves the larger models only a few
  hundred steps and moves every isoFLOP minimum onto the smallest model;
- a 1024-token vocabulary, so the output head (6 * vocab * d_model FLOPs per token) does not dwarf the body;
- head_dim 8, so the family has sizes ~1.4x apart even at one or two layers;
- centred on 25 tokens per param, where a pilot at 1e12 placed the minimum.
"""


def get_sweep():
    return {
        "config": "configs/tiny.py",
        "overrides": {
            "data.tokenizer": "bpe:1024",
            "data.seq_len": 128,
            "train.batch_size": 8,
            "train.lr": 3e-3,
            "train.warmup_steps": 50,
            "train.eval_every": 200,
            "train.eval_batches": 16,
            "train.sample_tokens": 0,
            "checkpoint.every": 500,
            # The committed results predate attention's causal query blocks and tiny.py's remat and unrolled
            # layer loop; these settings keep what they ran with.
            "model.causal_blocks": 1,
            "model.remat": "dots_no_batch",
            "model.scan_unroll": 1,
        },
        "isoflop": {
            "budgets": [1e12, 2e12, 5e12, 1e13],
            "sizes": 7,
            "spread": 3.0,
            "tokens_per_param": 25.0,
            "family": {"aspect": 32.0, "head_dim": 8, "ffn_ratio": 8 / 3, "ffn_multiple": 8},
        },
    }
