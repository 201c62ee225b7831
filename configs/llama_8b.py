"""An ~8B-parameter Llama-3-8B-shaped model (GQA 32/8 heads, SwiGLU, RoPE theta 5e5, untied head), bf16.

For a cluster. Plan it on a laptop, e.g. FSDP over 256 devices or FSDP x tensor over 64:

    python train.py --config configs/llama_8b.py --dry_run --fake_devices=256 --config.mesh.data=1 --config.mesh.fsdp=-1
    python train.py --config configs/llama_8b.py --dry_run --fake_devices=64 --config.mesh.data=1 \\
        --config.mesh.fsdp=-1 --config.mesh.tensor=4

Train on a real corpus and tokenizer: --config.data.corpus=... --config.data.tokenizer=/path/to/tokenizer.json.
"""

from configs import base


def get_config(arg: str | None = None):
    config = base.get_config()
    config.model.update(
        d_model=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        d_ff=14336,
        rope_theta=500_000.0,
        tie_embeddings=False,
        dtype="bfloat16",
        param_dtype="float32",
        remat="full",
    )
    config.data.update(tokenizer="bpe:128256", seq_len=8192)
    config.train.update(
        steps=100_000, batch_size=256, lr=3e-4, warmup_steps=2000, log_every=10, eval_every=1000, eval_batches=16
    )
    config.checkpoint.update(every=500, keep=3)
    return base.apply_arg(config, arg)
