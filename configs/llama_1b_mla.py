"""configs/llama_1b.py with DeepSeek's Multi-head Latent Attention (model/mla.py) at the same parameter count:
DeepSeek-V2-Lite's attention (16 heads, 128 nope + 64 rope query/key channels and 128 value channels per head, keys
and values rebuilt from a 512-wide latent, queries uncompressed). Decoding caches 512 + 64 = 576 values per token and
layer, against llama_1b's 2 x 8 heads x 64 = 1024. d_ff 7680 (not 8192) makes up for MLA's larger attention, so the
parameter count is llama_1b's within 0.2%.

    python train.py --config configs/llama_1b_mla.py --dry_run --fake_devices=8 --config.mesh.fsdp=-1 --config.mesh.data=1

benchmarks/accelerator.py measures its training MFU beside llama_1b's; no figures yet (BENCHMARKS.md).
"""

from configs import base, llama_1b


def get_config(arg: str | None = None):
    config = llama_1b.get_config()
    config.model.update(attention="mla", num_heads=16, d_ff=7680)
    config.model.mla.update(q_lora_rank=0, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128)
    return base.apply_arg(config, arg)
