"""A ~1.2B-parameter Llama-3.2-1B-shaped model (GQA 32/8 heads, SwiGLU, RoPE, tied embeddings), bf16.

For accelerators; check a plan first (per-device memory, FLOPs, collectives) on any laptop:

    python train.py --config configs/llama_1b.py --dry_run --fake_devices=8 --config.mesh.fsdp=-1 --config.mesh.data=1

Train on a real corpus and tokenizer: --config.data.corpus=/path/to/text --config.data.tokenizer=/path/to/tokenizer.json
(the default `bpe:128256` trains a byte-level BPE of that size on the corpus first).
"""

from configs import base


def get_config(arg: str | None = None):
    config = base.get_config()
    config.model.update(
        d_model=2048,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        head_dim=64,
        d_ff=8192,
        rope_theta=500_000.0,
        tie_embeddings=True,
        dtype="bfloat16",
        param_dtype="float32",
        remat="dots_no_batch",
    )
    config.data.update(tokenizer="bpe:128256", seq_len=4096)
    config.train.update(
        steps=20_000, batch_size=256, lr=3e-4, warmup_steps=1000, log_every=10, eval_every=1000, eval_batches=16
    )
    config.checkpoint.update(every=1000, keep=3)
    return base.apply_arg(config, arg)
