"""configs/tiny.py with DeepSeek's Multi-head Latent Attention (model/mla.py) at the same parameter count.

    python train.py --config configs/ablations/mla.py --workdir runs/ablate_mla

Per head 32 nope + 16 rope query/key channels and 32 value channels (DeepSeek-V3's 128/64/128, scaled by 1/4),
keys and values rebuilt from a 96-wide latent, queries uncompressed (as DeepSeek-V2-Lite). Decoding caches
96 + 16 = 112 values per token and layer, against tiny's 2 x 6 heads x 32 = 384. d_ff 506 (not 512) makes up for
MLA's slightly larger attention, so the parameter count is tiny's within 0.1%. The issue's goal is eval/bpb within
2% of configs/tiny.py's at the same steps; at 150 steps it ended 8.2% above (BENCHMARKS.md, one seed each).
"""

from configs import base, tiny


def get_config(arg: str | None = None):
    config = tiny.get_config()
    config.model.update(attention="mla", d_ff=506)
    config.model.mla.update(q_lora_rank=0, kv_lora_rank=96, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32)
    return base.apply_arg(config, arg)
