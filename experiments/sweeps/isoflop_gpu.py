"""The isoFLOP sweep of isoflop_stdlib.py scaled up for one GPU (H100 or H200): budgets 1e14, 3e14 and 1e15 FLOPs
(100x each of the CPU sweep's 1e12-1e13) x 7 model sizes, about 1e16 FLOPs in all, then the predicted optimum at 4e15
(4x the largest budget) with three seeds. Run on an H100 on 2026-11-23 (experiments/RESULTS.md): about 15 minutes for
the sweep with --parallel 7-10, and 8 minutes for the three checks side by side.

    python -m experiments.sweep plan experiments/sweeps/isoflop_gpu.py --out sweeps/gpu
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.06 python -m experiments.sweep run sweeps/gpu --parallel 10
    python -m experiments.sweep collect sweeps/gpu
    python -m experiments.scaling fit sweeps/gpu/runs.csv --out sweeps/gpu/fit
    python -m experiments.sweep plan-optimal experiments/sweeps/isoflop_gpu.py --fit sweeps/gpu/fit/fit.json \\
        --budget 4e15 --seeds 0,1,2 --out sweeps/gpu_verify
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.3 python -m experiments.sweep run sweeps/gpu_verify --parallel 3
    python -m experiments.sweep report sweeps/gpu_verify

How it differs from isoflop_stdlib.py, and why:
- The corpus is every `*.py` file of the interpreter's site-packages, not its standard library. The stdlib holds
  about 12M tokens of bpe:1024 (31 MB of text), so runs of 100M+ tokens would repeat it many times over, and
  repeated data bends scaling laws. A GPU machine's site-packages (PyTorch, JAX, transformers, SciPy, ...) holds
  hundreds of MB of Python: on the H100 image 25,127 files, 388 MB, 158M training tokens, against 142M for the
  largest run. Check its size (`meta.json` of the token store) on another machine before trusting the largest runs.
- 8192 tokens per step (32 x 256), not 1024: the runs see 10-150M tokens, so every model still gets a few thousand
  steps, and a GPU step of a model this small costs about as much at 32 rows as at 8.
- bfloat16 compute (params, softmax and loss stay float32), and no rematerialisation (memory is plentiful).
- head_dim 16 (8 on CPU) so that sizes can be about 1.4x apart at every budget; aspect 32 as on CPU.
- Several runs share the GPU (`--parallel`), each process with a fraction of its memory
  (XLA_PYTHON_CLIENT_MEM_FRACTION). One model this small leaves most of the GPU idle (about 5 ms a step, below 1% MFU),
  but processes take turns on it rather than overlapping: 7 at once gave about 1.2x the throughput of one.
- Checkpoints every 1000 steps, so an interrupted sweep (a lease that ends) loses little when it resumes.
"""

import sysconfig


def get_sweep():
    return {
        "config": "configs/tiny.py",
        "overrides": {
            "data.corpus": sysconfig.get_paths()["purelib"] + "/**/*.py",
            "data.tokenizer": "bpe:1024",
            "data.seq_len": 256,
            "train.batch_size": 32,
            "train.lr": 3e-3,
            "train.warmup_steps": 100,
            "train.eval_every": 500,
            "train.eval_batches": 16,
            "train.log_every": 100,
            "train.sample_tokens": 0,
            "checkpoint.every": 1000,
            "model.dtype": "bfloat16",
            "model.remat": "none",
            "model.scan_unroll": 1,  # the committed results ran the layers as a loop (tiny.py now unrolls them)
        },
        "isoflop": {
            "budgets": [1e14, 3e14, 1e15],
            "sizes": 7,
            "spread": 3.0,
            "tokens_per_param": 25.0,
            "family": {"aspect": 32.0, "head_dim": 16, "ffn_ratio": 8 / 3, "ffn_multiple": 16},
        },
    }
