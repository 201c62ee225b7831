"""configs/tiny.py with QK-norm: a per-head RMSNorm of queries and keys before RoPE (Qwen3, OLMo 2).

    python train.py --config configs/ablations/qk_norm.py --workdir runs/ablate_qk_norm

Compared with the baseline by experiments/sweeps/ablate_attention.py.
"""

from configs import base, tiny


def get_config(arg: str | None = None):
    config = tiny.get_config()
    config.model.qk_norm = True
    return base.apply_arg(config, arg)
