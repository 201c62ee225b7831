"""Dense against sparse MLPs at equal active parameters and steps: configs/tiny.py vs configs/ablations/moe.py
(Mixtral-like softmax top-2 of 8) and configs/ablations/moe_deepseek.py (sigmoid, group-limited, shared expert,
bias balancing), 2 seeds each, 350 steps (configs/tiny.py's). Results: experiments/results/ablate_moe/ and
experiments/RESULTS.md (eval/bpb: DeepSeek-like 2.009, Mixtral-like 2.022, dense 2.037), with stdlib_mc and
stdlib_lambada accuracies and their paired-bootstrap differences from the dense baseline.

python -m experiments.sweep plan experiments/sweeps/ablate_moe.py --out sweeps/moe
python -m experiments.sweep run sweeps/moe --parallel 1
python -m experiments.sweep report sweeps/moe
"""


def get_sweep():
    return {
        "config": "configs/tiny.py",
        # The local downstream tasks at the end of each run (experiments/eval_tasks/): the report pairs them.
        "overrides": {
            "train.sample_tokens": 0,
            "train.eval_tasks": ("stdlib_mc", "stdlib_lambada"),
            "train.eval_tasks_every": 350,
        },
        "grid": {
            "config": [
                "configs/tiny.py",
                "configs/ablations/moe.py",
                "configs/ablations/moe_deepseek.py",
            ]
        },
        "seeds": [0, 1],
    }
